"""The augmentation warp (docs/OPS.md, "The augmentation warp"): the NumPy reference's properties,
and the GPU augmenter's random draws, which need no GPU. The kernel itself is compared with the
reference in tests/test_cuda_ops.py; the GPU augmenter end to end at the bottom of this file (both
skipped where CUDA cannot run)."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from unet_cuda import ops
from unet_cuda.augment import Augmenter, upsample_grid
from unet_cuda.augment_gpu import AugmentParameters, GpuAugmenter, draw_parameters
from unet_cuda.ops import reference as ref
from unet_cuda.tiling import mirror_window

warp = ref.augment_warp
ALL_GEOMETRIES = list(itertools.product(range(4), (False, True), (False, True)))


def window(rng, height, width, classes=6, low=0.0, high=1.0, dtype=np.float32):
    image = rng.uniform(low, high, (height, width)).astype(dtype)
    labels = rng.integers(0, classes, (height, width)).astype(np.int32)
    weights = rng.uniform(1.0, 11.0, (height, width)).astype(dtype)
    return image, labels, weights


def constant_grid(dy, dx, grid=3):
    coarse = np.empty((2, grid, grid))
    coarse[0], coarse[1] = dy, dx
    return coarse


def flipped_and_turned(a, quarter_turns, flip_rows, flip_columns):
    """What the Augmenter does after the warp: flips, then np.rot90."""
    if flip_rows:
        a = a[::-1, :]
    if flip_columns:
        a = a[:, ::-1]
    return np.rot90(a, quarter_turns)


# ------------------------------------------------------------------------------------------------
# Geometry
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (7, 1), (5, 5), (13, 17), (64, 48)])
@pytest.mark.parametrize("grid", [1, 2, 3, 5])
def test_identity_returns_the_inputs_exactly(shape, grid):
    image, labels, weights = window(np.random.default_rng(0), *shape)
    out = warp(image, labels, weights, np.zeros((2, grid, grid), np.float32))
    for got, want in zip(out, (image, labels, weights)):
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("shape,turns,flip_rows,flip_columns",
                         [((9, 9), *g) for g in ALL_GEOMETRIES] + [((1, 1), *g) for g in ALL_GEOMETRIES]
                         + [((6, 10), *g) for g in ALL_GEOMETRIES if g[0] % 2 == 0])
def test_flips_and_quarter_turns_equal_numpy(shape, turns, flip_rows, flip_columns):
    image, labels, weights = window(np.random.default_rng(1), *shape)
    out = warp(image, labels, weights, np.zeros((2, 3, 3)), turns, flip_rows, flip_columns)
    for got, source in zip(out, (image, labels, weights)):
        np.testing.assert_array_equal(got, flipped_and_turned(source, turns, flip_rows, flip_columns))


@pytest.mark.parametrize("grid", [1, 3, 4])
@pytest.mark.parametrize("dy,dx", [(3, -5), (-2, 0), (0, 7), (11, 12)])
def test_integer_constant_displacement_is_a_mirrored_shift(grid, dy, dx):
    rng = np.random.default_rng(2)
    image, labels, weights = window(rng, 10, 8)
    out = warp(image, labels, weights, constant_grid(dy, dx, grid))
    # out[y, x] = in[y + dy, x + dx], mirrored outside: the window of the mirror-extended input.
    np.testing.assert_allclose(out[0], mirror_window(image, dy, dx, 10, 8), rtol=0, atol=1e-6)
    np.testing.assert_array_equal(out[1], mirror_window(labels, dy, dx, 10, 8))
    np.testing.assert_allclose(out[2], mirror_window(weights, dy, dx, 10, 8), rtol=0, atol=1e-5)


@pytest.mark.parametrize("turns,flip_rows,flip_columns", ALL_GEOMETRIES)
def test_shift_then_flips_and_turns(turns, flip_rows, flip_columns):
    # The warp happens in the source frame, before the flips and turns (the Augmenter's order).
    image, labels, weights = window(np.random.default_rng(3), 7, 7)
    out = warp(image, labels, weights, constant_grid(2, -3), turns, flip_rows, flip_columns)
    for got, source, atol in zip(out, (image, labels, weights), (1e-6, 0, 1e-5)):
        want = flipped_and_turned(mirror_window(source, 2, -3, 7, 7), turns, flip_rows, flip_columns)
        np.testing.assert_allclose(got, want, rtol=0, atol=atol)


def test_labels_keep_the_input_label_set():
    rng = np.random.default_rng(4)
    image, _, weights = window(rng, 40, 40)
    labels = rng.choice(np.array([-3, 0, 2, 7, 1000], dtype=np.int32), size=(40, 40))
    for turns, flip_rows, flip_columns in ALL_GEOMETRIES[::3]:
        coarse = rng.normal(0.0, 25.0, (2, 3, 3))
        out = warp(image, labels, weights, coarse, turns, flip_rows, flip_columns)
        assert out[1].dtype == np.int32
        assert set(np.unique(out[1])) <= set(np.unique(labels))


def test_labels_round_half_up():
    # floor(s + 1/2): a shift of exactly +0.5 reads the next pixel, -0.5 the pixel itself.
    labels = np.arange(5, dtype=np.int32)[None, :].repeat(3, axis=0)
    image = np.zeros((3, 5), np.float32)
    up = warp(image, labels, image, constant_grid(0.0, 0.5))[1]
    down = warp(image, labels, image, constant_grid(0.0, -0.5))[1]
    np.testing.assert_array_equal(up[0], [1, 2, 3, 4, 3])       # position 4.5 -> 5 -> mirrored to 3
    np.testing.assert_array_equal(down[0], [0, 1, 2, 3, 4])


def test_keys_bicubic_reproduces_ramps_in_the_interior():
    height, width = 48, 40
    y, x = np.indices((height, width), dtype=np.float64)

    def ramp(yy, xx):
        return 0.1 + 0.006 * yy + 0.009 * xx    # within [0, 1] on and around the window

    image = ramp(y, x)
    labels = np.zeros((height, width), np.int32)
    for coarse in (constant_grid(1.3, -2.7), np.random.default_rng(5).normal(0.0, 2.0, (2, 3, 3))):
        out_image, _, out_weights = warp(image, labels, image, coarse)
        d = ref._augment_displacement(coarse, height, width)
        sy, sx = y + d[0], x + d[1]
        inside = (np.floor(sy) >= 1) & (np.floor(sy) + 2 <= height - 1) & \
                 (np.floor(sx) >= 1) & (np.floor(sx) + 2 <= width - 1)
        assert inside.mean() > 0.6
        np.testing.assert_allclose(out_image[inside], ramp(sy, sx)[inside], rtol=0, atol=1e-12)
        np.testing.assert_allclose(out_weights[inside], ramp(sy, sx)[inside], rtol=0, atol=1e-12)


def test_keys_bicubic_reproduces_quadratics_bilinear_does_not():
    height, width = 30, 30
    y, x = np.indices((height, width), dtype=np.float64)
    image = 0.2 + 0.0004 * (y - 10.0) ** 2 + 0.0003 * (x - 12.0) ** 2
    out_image, _, out_weights = warp(image, np.zeros((height, width), np.int32), image,
                                     constant_grid(0.5, 0.25))
    interior = (slice(2, height - 4), slice(2, width - 4))
    want = 0.2 + 0.0004 * (y + 0.5 - 10.0) ** 2 + 0.0003 * (x + 0.25 - 12.0) ** 2
    np.testing.assert_allclose(out_image[interior], want[interior], rtol=0, atol=1e-12)
    assert np.abs(out_weights[interior] - want[interior]).max() > 1e-5


def test_displacement_passes_through_the_nodes_where_upsample_grid_puts_them():
    height, width = 101, 61  # odd sides put the middle nodes on pixels
    coarse = np.random.default_rng(6).normal(0.0, 10.0, (2, 3, 3))
    field = ref._augment_displacement(coarse, height, width)
    nodes_y, nodes_x = [0, 50, 100], [0, 30, 60]
    np.testing.assert_allclose(field[:, nodes_y][:, :, nodes_x], coarse, rtol=0, atol=1e-12)
    cpu_field = upsample_grid(coarse, (height, width))
    np.testing.assert_allclose(cpu_field[:, nodes_y][:, :, nodes_x], coarse, rtol=0, atol=1e-4)
    # Both are smooth bicubic interpolants of the same nodes: close everywhere, not equal.
    assert 0 < np.abs(field - cpu_field).max() < 0.25 * np.abs(coarse).max()


def test_grid_of_one_node_is_a_constant_field():
    field = ref._augment_displacement(np.array([[[2.5]], [[-1.0]]]), 7, 9)
    np.testing.assert_array_equal(field[0], 2.5)
    np.testing.assert_array_equal(field[1], -1.0)


# ------------------------------------------------------------------------------------------------
# Gray values and the mirror
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("gamma,contrast,brightness", [(1.0, 1.0, 0.0), (0.8, 1.15, -0.08), (1.25, 0.85, 0.08),
                                                       (1.0, 2.0, 0.3), (2.5, -1.0, 0.0)])
def test_gray_values_follow_the_augmenter_formula(gamma, contrast, brightness):
    rng = np.random.default_rng(7)
    image, labels, weights = window(rng, 12, 9, low=-0.2, high=1.2, dtype=np.float64)
    out = warp(image, labels, weights, np.zeros((2, 3, 3)), gamma=gamma, contrast=contrast,
               brightness=brightness)
    want = np.clip((np.clip(image, 0.0, 1.0) ** gamma - 0.5) * contrast + 0.5 + brightness, 0.0, 1.0)
    np.testing.assert_allclose(out[0], want, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(out[1], labels)   # gray values touch the image only
    np.testing.assert_array_equal(out[2], weights)


@pytest.mark.parametrize("shape", [(5, 7), (2, 3), (1, 4)])
@pytest.mark.parametrize("dy,dx", [(1000, -537), (-4096, 77), (123457, -98765)])
def test_mirror_matches_numpy_reflect_far_outside(shape, dy, dx):
    image, labels, weights = window(np.random.default_rng(8), *shape)
    out = warp(image, labels, weights, constant_grid(dy, dx, grid=2))
    height, width = shape
    pad = max(abs(dy), abs(dx)) + max(shape)
    # numpy's 'reflect' padding of the row and column indices (padding the arrays would take GiBs)
    rows = np.pad(np.arange(height), pad, mode="reflect")[pad + dy: pad + dy + height]
    columns = np.pad(np.arange(width), pad, mode="reflect")[pad + dx: pad + dx + width]
    for got, source, atol in zip(out, (image, labels, weights), (1e-6, 0, 1e-5)):
        np.testing.assert_allclose(got, source[np.ix_(rows, columns)], rtol=0, atol=atol)


def test_mirror_is_periodic_for_fractional_shifts():
    image, labels, weights = window(np.random.default_rng(9), 6, 5)
    near = warp(image, labels, weights, constant_grid(1.25, -0.75))
    period_y, period_x = 2 * (6 - 1), 2 * (5 - 1)
    far = warp(image, labels, weights, constant_grid(1.25 + 300 * period_y, -0.75 - 41 * period_x))
    for a, b in zip(near, far):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-9)


# ------------------------------------------------------------------------------------------------
# Arguments
# ------------------------------------------------------------------------------------------------

def test_bad_arguments_are_rejected_with_the_argument_named():
    image, labels, weights = window(np.random.default_rng(10), 6, 5)
    coarse = np.zeros((2, 3, 3))
    cases = [
        (dict(labels=labels[:, :4]), "labels"),
        (dict(weights=weights[:5]), "weights"),
        (dict(labels=labels.astype(np.float32)), "labels"),
        (dict(image=image.astype(np.int32)), "image"),
        (dict(coarse=np.zeros((3, 3, 3))), "coarse"),
        (dict(coarse=np.zeros((2, 0, 3))), "coarse"),
        (dict(coarse=np.full((2, 3, 3), np.nan)), "coarse"),
        (dict(quarter_turns=1), "square window"),
        (dict(quarter_turns=4), "quarter_turns"),
        (dict(quarter_turns=-1), "quarter_turns"),
        (dict(quarter_turns=True), "quarter_turns"),
        (dict(quarter_turns=1.0), "quarter_turns"),
        (dict(gamma=0.0), "gamma"),
        (dict(gamma=np.inf), "gamma"),
        (dict(contrast=np.nan), "contrast"),
        (dict(brightness=-np.inf), "brightness"),
    ]
    for change, fragment in cases:
        args = dict(image=image, labels=labels, weights=weights, coarse=coarse)
        args.update(change)
        with pytest.raises(ValueError, match=fragment) as info:
            warp(**args)
        assert str(info.value).startswith("augment_warp: "), info.value
    empty = np.zeros((0, 5), np.float32)
    with pytest.raises(ValueError, match="H and W >= 1"):
        warp(empty, empty.astype(np.int32), empty, coarse)


def test_dispatcher_runs_the_reference_on_numpy_arrays():
    image, labels, weights = window(np.random.default_rng(11), 8, 8)
    coarse = np.random.default_rng(12).normal(0.0, 3.0, (2, 3, 3))
    for a, b in zip(ops.augment_warp(image, labels, weights, coarse, 3, True, False, 1.1, 0.9, 0.02),
                    warp(image, labels, weights, coarse, 3, True, False, 1.1, 0.9, 0.02)):
        np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------------------------------------
# The GPU augmenter's random draws (no GPU needed)
# ------------------------------------------------------------------------------------------------

def test_draws_are_reproducible_and_in_range():
    first = draw_parameters(np.random.default_rng(3))
    again = draw_parameters(np.random.default_rng(3))
    assert first.as_dict() == again.as_dict()
    rng = np.random.default_rng(4)
    draws = [draw_parameters(rng) for _ in range(400)]
    assert all(d.coarse.shape == (2, 3, 3) and d.coarse.dtype == np.float32 for d in draws)
    assert 8.0 < np.std([d.coarse for d in draws]) < 12.0
    assert {d.quarter_turns for d in draws} == {0, 1, 2, 3}
    assert 0.3 < np.mean([d.flip_rows for d in draws]) < 0.7
    assert 0.3 < np.mean([d.flip_columns for d in draws]) < 0.7
    assert all(1 / 1.25 <= d.gamma <= 1.25 and 0.85 <= d.contrast <= 1.15 and abs(d.brightness) <= 0.08
               for d in draws)


def test_switched_off_parts_draw_nothing_and_are_the_identity():
    rng = np.random.default_rng(5)
    before = json.dumps(rng.bit_generator.state)
    d = draw_parameters(rng, elastic=False, flips=False, rot90=False, gray=False)
    assert json.dumps(rng.bit_generator.state) == before
    assert (d.quarter_turns, d.flip_rows, d.flip_columns, d.gamma, d.contrast, d.brightness) == \
           (0, False, False, 1.0, 1.0, 0.0)
    np.testing.assert_array_equal(d.coarse, np.zeros((2, 1, 1)))
    with pytest.raises(ValueError, match="grid"):
        draw_parameters(rng, grid=1)


@pytest.mark.parametrize("options", [{}, dict(elastic=False), dict(gray=False, rot90=False),
                                     dict(grid=4, sigma=3.0)])
def test_gpu_augmenter_draws_what_the_cpu_augmenter_draws(options):
    """Same seed, same calls in the same order: the generators stay in step, draw after draw."""
    cpu, gpu = Augmenter(seed=21, **options), GpuAugmenter(seed=21, **options)
    image, labels, weights = window(np.random.default_rng(0), 16, 16)
    for _ in range(3):
        reference_rng = np.random.default_rng()
        reference_rng.bit_generator.state = cpu.get_state()
        drawn = gpu.draw()
        cpu(image, labels, weights)
        assert cpu.get_state() == gpu.get_state()
        if options.get("elastic", True):
            grid = options.get("grid", 3)
            expected = reference_rng.normal(0.0, options.get("sigma", 10.0), size=(2, grid, grid))
            np.testing.assert_allclose(drawn.coarse, expected, rtol=1e-6)


def test_flips_and_turns_drawn_for_the_gpu_are_those_the_cpu_applies():
    cpu = Augmenter(seed=8, elastic=False, gray=False)
    gpu = GpuAugmenter(seed=8, elastic=False, gray=False)
    image, labels, weights = window(np.random.default_rng(1), 12, 12)
    for _ in range(8):
        p = gpu.draw()
        cpu_out = cpu(image, labels, weights)
        ref_out = warp(image, labels, weights, p.coarse, p.quarter_turns, p.flip_rows, p.flip_columns,
                       p.gamma, p.contrast, p.brightness)
        for a, b in zip(cpu_out, ref_out):
            np.testing.assert_array_equal(a, b)


def test_gpu_augmenter_state_round_trips_through_json():
    augmenter = GpuAugmenter(seed=13)
    augmenter.draw()
    state = json.loads(json.dumps(augmenter.get_state()))
    expected = [augmenter.draw().as_dict() for _ in range(3)]
    resumed = GpuAugmenter(seed=999)
    resumed.set_state(state)
    assert [resumed.draw().as_dict() for _ in range(3)] == expected
    state["state"]["state"] = 0           # the saved dict is a copy: changing it changes nothing
    assert augmenter.get_state() != state


def test_parameters_are_json_serialisable():
    p = draw_parameters(np.random.default_rng(2))
    assert isinstance(p, AugmentParameters)
    again = json.loads(json.dumps(p.as_dict()))
    np.testing.assert_array_equal(np.asarray(again["coarse"], np.float32), p.coarse)


@pytest.mark.skipif(ops.cuda_available(), reason="CUDA can run here")
def test_gpu_augmenter_without_cuda_says_why():
    augmenter = GpuAugmenter(seed=0)
    state = augmenter.get_state()
    with pytest.raises(ops.CudaUnavailableError, match="CUDA backend is unavailable"):
        augmenter(np.zeros((8, 8), np.float32))
    assert augmenter.get_state() == state   # nothing drawn by a call that could not run


def test_gpu_augmenter_checks_shapes_first():
    augmenter = GpuAugmenter(seed=0)
    with pytest.raises(ValueError, match="2D image"):
        augmenter(np.zeros((2, 8, 8), np.float32))
    with pytest.raises(ValueError, match="labels shape"):
        augmenter(np.zeros((8, 8), np.float32), np.zeros((8, 7), np.int32))


# ------------------------------------------------------------------------------------------------
# On the GPU: the augmenter end to end, the sampler and the trainer with it
# ------------------------------------------------------------------------------------------------

_WHY_NOT = ops.cuda_status()
needs_gpu = pytest.mark.skipif(_WHY_NOT is not None, reason=f"the CUDA backend cannot run here: {_WHY_NOT}")


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("shape", [(96, 96), (40, 56)])
def test_gpu_augmenter_applies_its_draws(shape):
    import cupy

    rng = np.random.default_rng(14)
    image, labels, weights = window(rng, *shape)
    augmenter, twin = GpuAugmenter(seed=3), GpuAugmenter(seed=3)
    for _ in range(6):
        p = twin.draw()
        out = augmenter(image, labels, weights)
        assert all(isinstance(a, cupy.ndarray) for a in out)
        turns = p.quarter_turns
        if turns % 2 and shape[0] != shape[1]:   # warped with one turn fewer, then turned by CuPy
            want = warp(image, labels, weights, p.coarse, turns - 1, p.flip_rows, p.flip_columns,
                        p.gamma, p.contrast, p.brightness)
            want = [np.rot90(a) for a in want]
        else:
            want = warp(image, labels, weights, p.coarse, turns, p.flip_rows, p.flip_columns,
                        p.gamma, p.contrast, p.brightness)
        got = [cupy.asnumpy(a) for a in out]
        assert [g.shape for g in got] == [w.shape for w in want]
        np.testing.assert_allclose(got[0], want[0], rtol=0, atol=5e-5)
        np.testing.assert_allclose(got[2], want[2], rtol=0, atol=5e-4)
        assert np.mean(got[1] != want[1]) < 1e-3        # only at rounding ties (test_cuda_ops.py)
    assert augmenter.get_state() == twin.get_state()


@pytest.mark.gpu
@needs_gpu
def test_gpu_augmenter_resumes_bit_for_bit_and_handles_missing_arrays():
    import cupy

    image, labels, weights = window(np.random.default_rng(15), 64, 64)
    augmenter = GpuAugmenter(seed=4)
    augmenter(image, labels, weights)
    state = augmenter.get_state()
    first = [cupy.asnumpy(a) for a in augmenter(image, labels, weights)]
    augmenter.set_state(state)
    again = [cupy.asnumpy(a) for a in augmenter(image, labels, weights)]
    for a, b in zip(first, again):
        assert a.tobytes() == b.tobytes()
    augmenter.set_state(state)
    image_only, none_labels, none_weights = augmenter(cupy.asarray(image))
    assert none_labels is None and none_weights is None
    assert cupy.asnumpy(image_only).tobytes() == first[0].tobytes()


@pytest.mark.gpu
@needs_gpu
def test_sampler_and_trainer_batch_stay_on_the_gpu(tmp_path):
    import cupy

    from unet_cuda.train import Trainer, build_parser, resolve_config

    cfg, _ = resolve_config(build_parser().parse_args(
        ["--device", "cuda", "--base-channels", "4", "--depth", "3", "--tile", "92", "--batch-size", "2"]))
    trainer = Trainer(cfg, tmp_path)
    assert isinstance(trainer.augmenter, GpuAugmenter)
    tile, labels, weights = trainer.sampler.sample()
    out = trainer.model.output_size(92)
    assert isinstance(tile, cupy.ndarray) and tile.shape == (92, 92) and tile.dtype == cupy.float32
    assert labels.shape == (out, out) and labels.dtype == cupy.int32 and labels.flags.c_contiguous
    assert weights.shape == (out, out) and weights.dtype == cupy.float32
    x, batch_labels, batch_weights = trainer.next_batch()
    assert isinstance(x, cupy.ndarray) and x.shape == (2, 1, 92, 92)
    assert batch_labels.shape == (2, out, out) and batch_weights.shape == (2, out, out)
    assert np.isfinite(trainer.train_step())
