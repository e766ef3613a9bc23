"""Property tests of the size arithmetic: which tile sizes are legal, where the skips are cropped,
and how tiles cover images of any size.

Closed forms used below, derived from the layer arithmetic of a U-Net of depth d (two valid 3x3
convolutions per level, 2x2 pools and up-convolutions between levels):

* legal input sizes are n = 2^(d-1) b + 4 (2^d - 1) with an integer bottleneck size b >= 1 whose
  output n - 2 B is positive;
* the context border is B = 6 * 2^(d-1) - 4 px per side (92 for the paper's depth 5);
* the skip of level l (0 = top) is cropped by 12 * 2^(d-2-l) - 8 px per side, whatever the input
  size (88, 40, 16, 4 at depth 5).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from unet_cuda import ops, sizes
from unet_cuda.model import UNet
from unet_cuda.ops import reference
from unet_cuda.tiling import axis_tiles, overlap_tile_predict, tile_grid
from unet_cuda.train import parameter_count

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

depths = st.integers(min_value=1, max_value=6)


def border(depth: int) -> int:
    return 6 * 2 ** (depth - 1) - 4


def closed_form_legal(n: int, depth: int) -> bool:
    step, offset = 2 ** (depth - 1), 4 * (2 ** depth - 1)
    return n >= offset + step and (n - offset) % step == 0 and n - 2 * border(depth) >= 1


@st.composite
def legal_sizes(draw, max_depth: int = 6, max_size: int = 1200):
    """``(n, depth)`` with ``n`` a legal input size for ``depth``."""
    depth = draw(st.integers(1, max_depth))
    first = sizes.nearest_legal_input_sizes(1, depth)[1]
    step = 2 ** (depth - 1)
    k = draw(st.integers(0, max(0, (max_size - first) // step)))
    return first + k * step, depth


# --------------------------------------------------------------------------------------------------
# Legal sizes
# --------------------------------------------------------------------------------------------------

@FAST
@given(n=st.integers(-5, 1600), depth=depths)
def test_legality_has_a_closed_form(n, depth):
    assert sizes.is_legal_input_size(n, depth) == closed_form_legal(n, depth)


@FAST
@given(legal_sizes())
def test_legal_size_plan_is_consistent(case):
    n, depth = case
    plan = sizes.plan(n, depth)
    assert plan.input_size == n and plan.depth == depth
    assert plan.output_size == n - 2 * border(depth) == sizes.output_size(n, depth)
    # walk the network: every pool sees an even size, every up-conv doubles
    s = n
    for level in range(depth - 1):
        s -= 4
        assert s == plan.skip_sizes[level] and s % 2 == 0
        s //= 2
    assert s - 4 == plan.bottleneck_size >= 1
    s = plan.bottleneck_size
    for level in reversed(range(depth - 1)):
        assert plan.up_sizes[level] == 2 * s
        s = 2 * s - 4
    assert s == plan.output_size
    # and the next legal size is one pool stride further on
    assert sizes.nearest_legal_input_sizes(n + 1, depth)[1] == n + 2 ** (depth - 1)


@FAST
@given(n=st.integers(-3, 1500), depth=depths)
def test_illegal_size_error_names_the_nearest_legal_sizes(n, depth):
    if closed_form_legal(n, depth):
        return
    below, above = sizes.nearest_legal_input_sizes(n, depth)
    legal = [m for m in range(1, max(n, 0) + 400) if closed_form_legal(m, depth)]  # 380 is depth 6's first
    assert above == min(m for m in legal if m > n)
    assert below == max((m for m in legal if m < n), default=None)
    with pytest.raises(sizes.IllegalSizeError) as error:
        sizes.plan(n, depth)
    message = str(error.value)
    assert f"input size {n} is illegal for a U-Net of depth {depth}" in message
    named = " or ".join(str(v) for v in (below, above) if v is not None)
    assert message.endswith(f"Nearest legal input sizes: {named}.")


@FAST
@given(m=st.integers(1, 900), depth=depths)
def test_input_size_for_output_is_the_smallest_sufficient(m, depth):
    n = sizes.input_size_for_output(m, depth)
    assert closed_form_legal(n, depth) and sizes.output_size(n, depth) >= m
    smaller = n - 2 ** (depth - 1)
    assert not closed_form_legal(smaller, depth) or sizes.output_size(smaller, depth) < m


# --------------------------------------------------------------------------------------------------
# Crop offsets
# --------------------------------------------------------------------------------------------------

@FAST
@given(legal_sizes())
def test_crops_follow_the_closed_form_and_do_not_depend_on_the_input_size(case):
    n, depth = case
    plan = sizes.plan(n, depth)
    assert len(plan.crops) == depth - 1
    for level, crop in enumerate(plan.crops):
        difference = plan.skip_sizes[level] - plan.up_sizes[level]
        assert difference >= 0 and difference % 2 == 0
        assert crop == difference // 2 == 12 * 2 ** (depth - 2 - level) - 8


@FAST
@given(legal_sizes(max_depth=4, max_size=140), st.data())
def test_crop_concat_takes_the_window_at_the_plans_offset(case, data):
    n, depth = case
    if depth < 2:
        return
    plan = sizes.plan(n, depth)
    level = data.draw(st.integers(0, depth - 2), label="level")
    skip_size, up_size, crop = plan.skip_sizes[level], plan.up_sizes[level], plan.crops[level]
    c_up = data.draw(st.integers(1, 3), label="up channels")
    c_skip = data.draw(st.integers(1, 3), label="skip channels")
    up = np.random.default_rng(n).standard_normal((1, c_up, up_size, up_size)).astype(np.float32)
    # every skip pixel holds its own position, so the result says exactly where the window was taken
    skip = np.arange(c_skip * skip_size ** 2, dtype=np.float64).reshape(1, c_skip, skip_size, skip_size)
    y = ops.crop_concat_forward(up.astype(np.float64), skip)
    assert y.shape == (1, c_up + c_skip, up_size, up_size)
    np.testing.assert_array_equal(y[:, :c_up], up)
    np.testing.assert_array_equal(y[:, c_up:], skip[:, :, crop:crop + up_size, crop:crop + up_size])
    dup, dskip = reference.crop_concat_backward(y, skip.shape)
    np.testing.assert_array_equal(dup, up)
    window = np.zeros(skip.shape, bool)
    window[:, :, crop:crop + up_size, crop:crop + up_size] = True
    np.testing.assert_array_equal(dskip[window], skip[window])
    assert not dskip[~window].any()


# --------------------------------------------------------------------------------------------------
# Tile coverage of images of any size
# --------------------------------------------------------------------------------------------------

@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 3000), out=st.integers(1, 600))
def test_axis_tiles_partition_any_length(n, out):
    tiles = axis_tiles(n, out)
    assert len(tiles) == max(1, -(-n // out))
    covered = np.zeros(n, int)
    previous_stop = 0
    for origin, start, stop in tiles:
        assert 0 <= origin <= max(0, n - out)           # a tile never starts outside the image
        assert origin <= start < stop <= origin + out   # it writes only pixels it predicts
        assert start == previous_stop                   # written ranges follow each other
        covered[start:stop] += 1
        previous_stop = stop
    assert (covered == 1).all()


@FAST
@given(height=st.integers(1, 300), width=st.integers(1, 300), out=st.integers(4, 120))
def test_tile_grid_covers_every_pixel_exactly_once(height, width, out):
    grid = tile_grid(height, width, out)
    rows, columns = axis_tiles(height, out), axis_tiles(width, out)
    assert grid == [(r[0], c[0]) for r in rows for c in columns]  # raster order
    assert len(set(grid)) == len(grid)
    count = np.zeros((height, width), int)
    for (y, y0, y1) in rows:
        for (x, x0, x1) in columns:
            count[y0:y1, x0:x1] += 1
    assert (count == 1).all()


@FAST
@given(legal_sizes(max_depth=3, max_size=80), st.integers(1, 90), st.integers(1, 90), st.integers(1, 3))
def test_overlap_tile_reassembles_any_image(case, height, width, batch_size):
    # A "network" that returns the centre of its input tile must give back the image itself: this
    # checks the tile origins, the context border, the mirroring and the write-back together.
    tile, depth = case
    b = border(depth)
    out = tile - 2 * b
    image = np.random.default_rng(height * 1000 + width).random((height, width)).astype(np.float32)

    def centre(batch):
        assert batch.shape[1:] == (1, tile, tile) and len(batch) <= batch_size
        return np.concatenate([batch[:, :, b:b + out, b:b + out], 1 - batch[:, :, b:b + out, b:b + out]], axis=1)

    result = overlap_tile_predict(image, centre, tile=tile, depth=depth, batch_size=batch_size)
    assert result.shape == (2, height, width) and result.dtype == np.float32
    np.testing.assert_array_equal(result[0], image)
    np.testing.assert_array_equal(result[1], 1 - image)


# --------------------------------------------------------------------------------------------------
# The network's size, counted without building it
# --------------------------------------------------------------------------------------------------

def test_parameter_count_of_the_papers_network():
    assert parameter_count(1, 2, 64, 5) == 31_030_658


@settings(max_examples=25, deadline=None)
@given(in_channels=st.integers(1, 3), classes=st.integers(2, 4), base=st.integers(1, 4), depth=st.integers(1, 4))
def test_parameter_count_matches_the_built_network(in_channels, classes, base, depth):
    net = UNet(in_channels, classes, base, depth)
    assert parameter_count(in_channels, classes, base, depth) == net.num_parameters()
