"""Tests of mirroring, the tile grid, the training tile sampler and overlap-tile inference."""

import json

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from unet_cuda.augment import Augmenter
from unet_cuda.data import Dataset
from unet_cuda.sizes import IllegalSizeError, context_border, output_size
from unet_cuda.synthetic import make_em_like
from unet_cuda.tiling import (
    TrainingTileSampler,
    axis_tiles,
    flip_tta,
    mirror_window,
    overlap_tile_predict,
    reflect_index,
    tile_grid,
)
from unet_cuda.weightmap import weight_map
from unet_cuda import sizes, tiling

# depth 3: 140 -> 100 with a 20 px context border; depth 2: 20 -> 4 (border 8) for many tiny tiles
SMALL_TILE, SMALL_DEPTH = 140, 3


# --------------------------------------------------------------------------------------------------
# mirroring
# --------------------------------------------------------------------------------------------------


def test_reflect_does_not_repeat_the_edge_pixel():
    np.testing.assert_array_equal(reflect_index(np.arange(-3, 7), 4), [3, 2, 1, 0, 1, 2, 3, 2, 1, 0])
    np.testing.assert_array_equal(reflect_index(np.arange(-2, 3), 1), [0, 0, 0, 0, 0])


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 12), pad=st.integers(0, 40))
def test_reflect_equals_numpy_reflect_padding_of_any_width(n, pad):
    values = np.arange(n) * 10
    expected = np.pad(values, pad, mode="reflect")
    np.testing.assert_array_equal(values[reflect_index(np.arange(-pad, n + pad), n)], expected)


def test_mirror_window_equals_a_window_of_the_padded_image():
    image = np.arange(5 * 7, dtype=np.float32).reshape(5, 7)
    padded = np.pad(image, 30, mode="reflect")
    for y0, x0, h, w in ((-30, -30, 65, 67), (-3, 2, 10, 4), (4, 6, 20, 20), (0, 0, 5, 7)):
        np.testing.assert_array_equal(mirror_window(image, y0, x0, h, w), padded[y0 + 30: y0 + 30 + h, x0 + 30: x0 + 30 + w])


# --------------------------------------------------------------------------------------------------
# tile grid
# --------------------------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 5000), out=st.integers(1, 600))
def test_axis_tiles_partition_the_axis(n, out):
    tiles = axis_tiles(n, out)
    assert len(tiles) == -(-n // out)
    assert tiles[0][1] == 0 and tiles[-1][2] == n
    for (origin, start, stop), following in zip(tiles, tiles[1:] + [None]):
        assert 0 <= origin <= max(0, n - out)  # every tile lies inside the image when it fits
        assert origin <= start < stop <= origin + out  # writes only what it predicts
        if following is not None:
            assert following[1] == stop  # contiguous, no pixel written twice
    if n >= out:
        assert all(stop - origin <= out and origin + out <= n for origin, _, stop in tiles)


@settings(max_examples=40, deadline=None)
@given(height=st.integers(1, 90), width=st.integers(1, 90), out=st.integers(1, 40))
def test_tile_grid_covers_every_pixel(height, width, out):
    covered = np.zeros((height, width), dtype=int)
    origins = tile_grid(height, width, out)
    for y, x in origins:
        assert 0 <= y <= max(0, height - out) and 0 <= x <= max(0, width - out)
        covered[y: y + out, x: x + out] += 1
    assert (covered >= 1).all()
    assert len(origins) == (-(-height // out)) * (-(-width // out))


# --------------------------------------------------------------------------------------------------
# overlap-tile inference
# --------------------------------------------------------------------------------------------------


def local_operator(padded: np.ndarray, radius: int) -> np.ndarray:
    """A valid local operator: channel 0 = the centre pixel, channel 1 = the box mean of radius ``radius``.

    ``padded[..., H + 2r, W + 2r] -> [..., 2, H, W]``; output (i, j) depends on input
    ``[i, i + 2r] x [j, j + 2r]`` only, like a U-Net with context border ``r``.
    """
    values = padded.astype(np.float64)
    height, width = values.shape[-2] - 2 * radius, values.shape[-1] - 2 * radius
    integral = np.zeros(values.shape[:-2] + (values.shape[-2] + 1, values.shape[-1] + 1))
    integral[..., 1:, 1:] = values.cumsum(-2).cumsum(-1)
    k = 2 * radius + 1
    box = (
        integral[..., k:, k:] - integral[..., :-k, k:] - integral[..., k:, :-k] + integral[..., :-k, :-k]
    )[..., :height, :width] / k**2
    centre = values[..., radius: radius + height, radius: radius + width]
    return np.stack([centre, box], axis=-3).astype(np.float32)


def make_tile_predictor(radius: int, calls: list | None = None):
    def predict(batch: np.ndarray) -> np.ndarray:
        assert batch.dtype == np.float32 and batch.ndim == 4 and batch.shape[1] == 1
        if calls is not None:
            calls.append(batch.shape[0])
        return local_operator(batch[:, 0], radius)

    return predict


def whole_image_reference(image: np.ndarray, radius: int) -> np.ndarray:
    return local_operator(np.pad(image, radius, mode="reflect"), radius)


@pytest.mark.parametrize(
    "shape, tile, depth",
    [
        ((250, 333), SMALL_TILE, SMALL_DEPTH),  # 3 x 4 tiles, last row and column shifted back
        ((37, 61), SMALL_TILE, SMALL_DEPTH),  # smaller than one output tile
        ((5, 9), SMALL_TILE, SMALL_DEPTH),  # smaller than the context border: repeated mirroring
        ((100, 200), SMALL_TILE, SMALL_DEPTH),  # exact multiples of the output tile
        ((45, 38), 20, 2),  # many tiny tiles (4 px out, 8 px border)
        ((130, 101), 572, 5),  # the paper's tile on a small image
    ],
)
def test_tiled_prediction_equals_whole_image_prediction(shape, tile, depth):
    rng = np.random.default_rng(sum(shape))
    image = rng.random(shape, dtype=np.float32)
    radius = context_border(depth)
    assert (tile - output_size(tile, depth)) // 2 == radius
    tiled = overlap_tile_predict(image, make_tile_predictor(radius), tile=tile, depth=depth, batch_size=3)
    expected = whole_image_reference(image, radius)
    assert tiled.shape == (2, *shape) and tiled.dtype == np.float32
    np.testing.assert_array_equal(tiled[0], image)  # alignment: exact
    np.testing.assert_allclose(tiled[1], expected[1], rtol=1e-6, atol=1e-6)


def test_batching_streams_tiles_and_reports_progress():
    image = np.random.default_rng(0).random((250, 333), dtype=np.float32)
    radius = context_border(SMALL_DEPTH)
    reference = overlap_tile_predict(image, make_tile_predictor(radius), SMALL_TILE, SMALL_DEPTH, batch_size=1)
    for batch_size in (2, 5, 12, 50):
        calls, progress = [], []
        result = overlap_tile_predict(
            image, make_tile_predictor(radius, calls), SMALL_TILE, SMALL_DEPTH, batch_size,
            progress=lambda done, total: progress.append((done, total)),
        )
        np.testing.assert_array_equal(result, reference)
        assert max(calls) <= batch_size and sum(calls) == 12  # 3 x 4 tiles, never more than a batch at once
        assert progress[-1] == (12, 12) and len(progress) == len(calls)


def test_flip_tta_averages_the_four_flips():
    radius = context_border(SMALL_DEPTH)
    image = np.random.default_rng(1).random((120, 90), dtype=np.float32)
    plain = make_tile_predictor(radius)
    # The local operator commutes with flips, so averaging over flips changes nothing ...
    np.testing.assert_allclose(
        overlap_tile_predict(image, flip_tta(plain), SMALL_TILE, SMALL_DEPTH),
        overlap_tile_predict(image, plain, SMALL_TILE, SMALL_DEPTH), atol=1e-6,
    )

    # ... while for one that does not (reads the pixel one step down-right), it averages the 4 reads.
    def shifted(batch):
        return batch[:, :, radius + 1: -radius + 1, radius + 1: -radius + 1]

    tile = np.random.default_rng(2).random((1, 1, SMALL_TILE, SMALL_TILE), dtype=np.float32)
    x = tile[0, 0]
    r = radius
    expected = (
        x[r + 1: -r + 1, r + 1: -r + 1] + x[r - 1: -r - 1, r + 1: -r + 1]
        + x[r + 1: -r + 1, r - 1: -r - 1] + x[r - 1: -r - 1, r - 1: -r - 1]
    ) / 4
    np.testing.assert_allclose(flip_tta(shifted)(tile)[0, 0], expected, atol=1e-6)


def test_overlap_tile_predict_errors():
    image = np.zeros((30, 30), dtype=np.float32)
    with pytest.raises(IllegalSizeError):
        overlap_tile_predict(image, make_tile_predictor(20), tile=141, depth=3)
    with pytest.raises(ValueError, match="expected"):
        overlap_tile_predict(image, lambda b: b, tile=SMALL_TILE, depth=SMALL_DEPTH)
    with pytest.raises(ValueError, match="2D"):
        overlap_tile_predict(np.zeros((2, 30, 30)), make_tile_predictor(20), SMALL_TILE, SMALL_DEPTH)
    with pytest.raises(ValueError, match="NaN"):
        overlap_tile_predict(np.full((30, 30), np.nan), make_tile_predictor(20), SMALL_TILE, SMALL_DEPTH)


# --------------------------------------------------------------------------------------------------
# training tiles
# --------------------------------------------------------------------------------------------------


def position_dataset(shape=(150, 170), count=2) -> Dataset:
    """Images whose gray value encodes the pixel position (unique values), with real cell labels."""
    height, width = shape
    ramp = (np.arange(height * width).reshape(height, width) / (height * width - 1)).astype(np.float32)
    _, instances = make_em_like(count, size=shape, seed=3)
    images = np.stack([ramp] * count)
    return Dataset(images, instances > 0, instances, "positions")


def locate(dataset: Dataset, index: int, input_tile: np.ndarray, border: int) -> tuple[int, int]:
    """The image position of the output window, read from the position-coded centre of the input tile."""
    height, width = dataset.image_shape
    code = int(round(float(input_tile[border, border]) * (height * width - 1)))
    return code // width, code % width


@pytest.mark.parametrize("tile, depth, expected_out", [(572, 5, 388), (SMALL_TILE, SMALL_DEPTH, 100)])
def test_sampler_shapes(tile, depth, expected_out):
    dataset = position_dataset()
    sampler = TrainingTileSampler(dataset, tile=tile, depth=depth, rng=0)
    assert sampler.out == expected_out == output_size(tile, depth)
    image, labels, weights = sampler.sample()
    assert image.shape == (tile, tile) and image.dtype == np.float32
    assert labels.shape == weights.shape == (expected_out, expected_out)
    assert labels.dtype == np.int32 and weights.dtype == np.float32
    assert set(np.unique(labels)) <= {0, 1}


def test_sampler_windows_line_up_with_the_image():
    dataset = position_dataset()
    sampler = TrainingTileSampler(dataset, tile=SMALL_TILE, depth=SMALL_DEPTH, rng=7)
    border, out = sampler.border, sampler.out
    for _ in range(6):
        index = 1
        image, labels, weights = sampler.sample(index)
        y, x = locate(dataset, index, image, border)
        assert 0 <= y <= 150 - out and 0 <= x <= 170 - out  # the output window lies inside the image
        np.testing.assert_array_equal(image, mirror_window(dataset.images[index], y - border, x - border, 140, 140))
        np.testing.assert_array_equal(labels, dataset.labels[index][y: y + out, x: x + out])
        expected_weights = weight_map(dataset.instances[index])[y: y + out, x: x + out]
        np.testing.assert_array_equal(weights, expected_weights)


def test_sampler_on_an_image_smaller_than_the_output_tile_mirrors():
    dataset = position_dataset(shape=(60, 45), count=1)
    sampler = TrainingTileSampler(dataset, tile=SMALL_TILE, depth=SMALL_DEPTH, rng=1)
    seen = set()
    for _ in range(5):
        image, labels, _ = sampler.sample()
        # the whole image sits inside the output window, at a random place
        codes = np.round(image * (60 * 45 - 1)).astype(int)
        assert len(np.unique(codes)) == 60 * 45
        seen.add(int(codes[sampler.border, sampler.border]))
    assert len(seen) > 1


def test_sampler_is_reproducible_and_resumable():
    dataset = position_dataset()
    first = TrainingTileSampler(dataset, tile=SMALL_TILE, depth=SMALL_DEPTH, rng=np.random.default_rng(5))
    second = TrainingTileSampler(dataset, tile=SMALL_TILE, depth=SMALL_DEPTH, rng=5)
    np.testing.assert_array_equal(first.sample()[0], second.sample()[0])
    state = json.loads(json.dumps(first.get_state()))
    expected = first.sample()
    second.set_state(state)
    again = second.sample()
    for a, b in zip(expected, again):
        np.testing.assert_array_equal(a, b)


def test_sampler_with_augmenter_keeps_labels_and_input_together():
    images, instances = make_em_like(2, size=120, seed=9)
    binary = (instances > 0).astype(np.uint8)
    dataset = Dataset(binary.astype(np.float32), binary, instances, "labels-as-images")
    sampler = TrainingTileSampler(
        dataset, tile=SMALL_TILE, depth=SMALL_DEPTH, rng=2, augmenter=Augmenter(seed=2, gray=False)
    )
    border = sampler.border
    for _ in range(3):
        image, labels, weights = sampler.sample()
        assert image.shape == (SMALL_TILE, SMALL_TILE) and labels.shape == (100, 100)
        centre = image[border:-border, border:-border]
        assert np.mean((centre > 0.5) == (labels == 1)) > 0.97
        assert weights.min() > 0


def test_sampler_accepts_precomputed_weights():
    dataset = position_dataset(count=1)
    weights = np.full(dataset.images.shape, 3.0, dtype=np.float32)
    _, _, tile_weights = TrainingTileSampler(dataset, SMALL_TILE, SMALL_DEPTH, rng=0, weights=weights).sample()
    np.testing.assert_array_equal(tile_weights, 3.0)
    with pytest.raises(ValueError, match="weights shape"):
        TrainingTileSampler(dataset, SMALL_TILE, SMALL_DEPTH, weights=weights[:, :10])
    with pytest.raises(IllegalSizeError):
        TrainingTileSampler(dataset, tile=141, depth=SMALL_DEPTH)


# --------------------------------------------------------------------------------------------------
# The inference tile size
# --------------------------------------------------------------------------------------------------

def test_inference_tile_prefers_one_large_tile_over_four_small_ones():
    # 512 x 512 at depth 5: one 700 tile (516 px out, 0.49 M input px) instead of four of 572 (1.31 M)
    assert tiling.inference_tile(512, 512, depth=5, max_tile=1052) == 700
    # capped at 572: four 444 tiles (260 px out, 4 x 444^2 = 0.79 M px) beat four 572 tiles
    assert tiling.inference_tile(512, 512, depth=5, max_tile=572) == 444
    # an image the size of one output tile takes exactly that tile
    assert tiling.inference_tile(388, 388, depth=5, max_tile=1052) == 572


@pytest.mark.parametrize("height,width,depth,max_tile", [
    (1, 1, 5, 1052), (30, 30, 2, 36), (512, 512, 5, 1052), (1000, 300, 4, 700), (2000, 2000, 5, 1052),
    (37, 1500, 3, 300)])
def test_inference_tile_is_legal_bounded_and_cheapest(height, width, depth, max_tile):
    chosen = tiling.inference_tile(height, width, depth, max_tile)
    legal = sizes.legal_input_sizes(depth, max_size=max_tile)
    assert chosen in legal and chosen <= max_tile

    def pixels(tile):
        out = sizes.output_size(tile, depth)
        return len(tiling.tile_grid(height, width, out)) * tile * tile

    assert pixels(chosen) == min(pixels(t) for t in legal)
    assert all(pixels(t) > pixels(chosen) or t >= chosen for t in legal)  # ties go to the smaller tile


def test_inference_tile_errors():
    with pytest.raises(ValueError, match="at least 1 x 1 px"):
        tiling.inference_tile(0, 5)
    with pytest.raises(ValueError, match="no legal tile size for depth 5 is <= 100"):
        tiling.inference_tile(50, 50, depth=5, max_tile=100)
