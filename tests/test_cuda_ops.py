"""Every CUDA op (unet_cuda.ops.cuda over unet_cuda._C) against the NumPy reference, on the GPU.

* Inputs are fresh seeded random float32 arrays; the reference runs on float64 copies of them and
  the comparison allows float32 rounding (``assert_close`` prints the max abs and rel error first).
* Every output is poisoned before the call (NaN for floats, 0xFF for uint8), so an element a kernel
  forgets to write shows up.
* Shapes: awkward ones (sizes 1..13, odd; channel counts 1, 3, 5, 7, 33; batch 1 and 2) and the
  real layer shapes of the 572x572 tile (docs: shared/docs/PERFORMANCE.md), with channel counts
  scaled down where the NumPy reference would be slow.
* Exact equality where the arithmetic allows it: small-integer convolutions, max-pool (argmax too),
  crop/concat, dropout masks (bit-identical to the reference hash), ReLU and accumulation.
* Determinism: weight gradients and the loss are bitwise identical from call to call.
* The 3x3 convolution: every test runs for every kernel version (``CONV3X3_VERSIONS``), each with
  the tolerance of its precision (tests/conv3x3_tolerance.py: FP32 as everywhere, TF32 for
  v4_tf32_mma by relative L2 error and a max-error bound that grows with sqrt(K)).
* Past 2^31 elements: 64-bit indexing, when the GPU has the memory.
"""

from __future__ import annotations

import functools
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from conv3x3_tolerance import check_conv3x3 as assert_conv3x3_close
from relu_masks import assert_same_bits, relu_mask_like
from unet_cuda import ops
from unet_cuda.ops import reference as ref

_WHY_NOT = ops.cuda_status()
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(_WHY_NOT is not None, reason=f"the CUDA backend cannot run here: {_WHY_NOT}"),
]

if _WHY_NOT is None:
    import cupy

    from unet_cuda import _C
    from unet_cuda.ops import cuda as cu


# ------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------

@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Every output the CUDA backend allocates starts as NaN (floats) or 0xFF (integers)."""

    def poisoned_empty(shape, dtype=np.float32):
        dtype = np.dtype(dtype)
        fill = np.nan if dtype.kind == "f" else np.iinfo(dtype).max
        return cupy.full(shape, fill, dtype=dtype)

    monkeypatch.setattr(cu, "_empty", poisoned_empty)


def rand(rng, *shape, scale=1.0):
    """Uniform in [-scale, scale), float32."""
    return (rng.uniform(-1.0, 1.0, size=shape) * scale).astype(np.float32)


def small_ints(rng, *shape, low=-2, high=2):
    """Small integers as float32: sums of them are exact in float32 (and so must match exactly)."""
    return rng.integers(low, high + 1, size=shape).astype(np.float32)


def dev(a):
    return cupy.asarray(a)


def f64(a):
    return np.asarray(a, dtype=np.float64)


def host(a):
    return cupy.asnumpy(a)


def peak(a) -> float:
    a = np.asarray(a, dtype=np.float64)
    finite = np.abs(a[np.isfinite(a)])
    return float(finite.max()) if finite.size else 0.0


def assert_close(got, want, atol, rtol, name):
    """|got - want| <= atol + rtol * |want| elementwise, NaN exactly where the reference has NaN.
    Prints the max abs and rel error first (pytest shows it on failure, or with -s)."""
    got = np.asarray(host(got) if isinstance(got, cupy.ndarray) else got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, f"{name}: shape {got.shape}, reference {want.shape}"
    nan_want, nan_got = np.isnan(want), np.isnan(got)
    err = np.where(nan_want, 0.0, np.abs(got - want))
    rel = err / np.maximum(np.abs(want), np.finfo(np.float64).tiny)
    max_abs = float(err.max()) if err.size else 0.0
    max_rel = float(rel[~nan_want].max()) if (~nan_want).any() else 0.0
    print(f"{name}: max abs err {max_abs:.3e}, max rel err {max_rel:.3e}, max |ref| {peak(want):.3e} "
          f"(atol {atol:.2e}, rtol {rtol:.1e}), shape {want.shape}")
    wrong_nan = nan_want != nan_got
    assert not wrong_nan.any(), (f"{name}: {int(wrong_nan.sum())} elements NaN in one and not the "
                                 f"other, first at {np.argwhere(wrong_nan)[0].tolist()}")
    bad = err > atol + rtol * np.abs(want)
    if bad.any():
        first = tuple(np.argwhere(bad)[0])
        raise AssertionError(f"{name}: {int(bad.sum())} of {bad.size} elements out of tolerance; "
                             f"first at {list(first)}: got {got[first]!r}, reference {want[first]!r}")


def assert_close_f32(got, want, name, rel=2e-5):
    """Float32 tolerance for results that are sums of many products: errors measured against the
    largest reference value (cancellation makes small elements relatively less exact)."""
    assert_close(got, want, atol=rel * peak(want), rtol=rel, name=name)


def assert_equal(got, want, name):
    got = host(got)
    want = np.asarray(want)
    assert got.shape == want.shape, f"{name}: shape {got.shape}, reference {want.shape}"
    same = (got == want) | (np.isnan(got) & np.isnan(want)) if got.dtype.kind == "f" else got == want
    if not same.all():
        first = tuple(np.argwhere(~same)[0])
        raise AssertionError(f"{name}: {int((~same).sum())} of {same.size} elements differ; first at "
                             f"{list(first)}: got {got[first]!r}, reference {want[first]!r}")


def bitwise_equal(a, b) -> bool:
    return host(a).tobytes() == host(b).tobytes()


# ------------------------------------------------------------------------------------------------
# Shapes
# ------------------------------------------------------------------------------------------------

# (N, C, H, W, O): 3x3 convolutions need H, W >= 3.
CONV3X3_SHAPES = [(1, 1, 3, 3, 1), (2, 3, 5, 7, 5), (1, 5, 9, 4, 7), (2, 7, 3, 9, 3),
                  (1, 33, 8, 6, 2), (2, 3, 6, 5, 33), (1, 2, 13, 11, 4),
                  (1, 30, 14, 13, 33),  # v6's 256 x 64 tile, not tap-major (132 and 182 rows)
                  # v6's 128 x 256 tile of the weight gradient (9C = 2304 columns): two row tiles,
                  # the second partial; then two images of 1122 pixels each, K split in two
                  (1, 256, 20, 21, 130), (2, 256, 35, 36, 70),
                  # v6's 64 x 192 tile (O <= 64, 9C = 576): three column tiles; then O = 40 rows
                  # and two images, K split in two
                  (1, 64, 20, 21, 64), (2, 64, 35, 36, 40)]
CONV1X1_SHAPES = [(1, 1, 1, 1, 1), (2, 3, 5, 7, 5), (1, 33, 4, 9, 2), (2, 7, 1, 8, 3),
                  (1, 64, 9, 9, 2),
                  # O = 8, the last of the per-pixel kernels (v2), and 9 (v1); the weight gradient
                  # in slices, one ending inside an image (the paper's output layer:
                  # test_conv1x1_real_layer_shape)
                  (1, 5, 3, 4, 8), (2, 4, 3, 5, 9), (3, 3, 60, 61, 2)]
UPCONV_SHAPES = [(1, 1, 1, 1, 1), (2, 3, 2, 3, 5), (1, 33, 3, 5, 7), (2, 5, 4, 1, 33),
                 (1, 8, 9, 9, 3), (1, 1100, 2, 3, 3), (2, 6, 24, 22, 40),
                 (1, 256, 16, 16, 16), (1, 64, 12, 12, 64)]  # v6's 256 x 64 tile in each direction
# (N, C, H, W) with H, W even.
MAXPOOL_SHAPES = [(1, 1, 2, 2), (2, 3, 4, 6), (1, 5, 8, 2), (2, 7, 10, 14), (1, 33, 6, 6)]
# (N, Cu, Cs, H, W, Hs, Ws) with Hs-H, Ws-W even and >= 0.
CROP_SHAPES = [(1, 1, 1, 1, 1, 1, 1), (2, 3, 5, 2, 3, 6, 9), (1, 7, 3, 5, 4, 9, 4),
               (2, 1, 33, 3, 3, 5, 7)]
# (N, K, H, W)
SOFTMAX_SHAPES = [(1, 1, 1, 1), (2, 2, 3, 5), (1, 5, 7, 4), (2, 3, 9, 9), (1, 33, 2, 3)]
ELEMENTWISE_SHAPES = [(1,), (7,), (3, 5), (2, 3, 5, 7), (1, 33, 9, 9)]

# The 3x3 convolutions of the 572x572 tile: (layer, output size, Cin, Cout).
REAL_CONV3X3 = [
    ("d1a", 570, 1, 64), ("d1b", 568, 64, 64), ("d2a", 282, 64, 128), ("d2b", 280, 128, 128),
    ("d3a", 138, 128, 256), ("d3b", 136, 256, 256), ("d4a", 66, 256, 512), ("d4b", 64, 512, 512),
    ("b1", 30, 512, 1024), ("b2", 28, 1024, 1024), ("u1a", 54, 1024, 512), ("u1b", 52, 512, 512),
    ("u2a", 102, 512, 256), ("u2b", 100, 256, 256), ("u3a", 198, 256, 128), ("u3b", 196, 128, 128),
    ("u4a", 390, 128, 64), ("u4b", 388, 64, 64),
]
# The up-convolutions: (layer, output size, Cin, Cout).
REAL_UPCONV = [("up1", 56, 1024, 512), ("up2", 104, 512, 256), ("up3", 200, 256, 128),
               ("up4", 392, 128, 64)]
# The skip connections: (level, up size, skip size, channels of each).
REAL_CROPS = [(1, 56, 64, 512), (2, 104, 136, 256), (3, 200, 280, 128), (4, 392, 568, 64)]


def scaled_channels(cin, cout, flops_per_channel_pair, budget):
    """Channel counts scaled by one factor so that the layer costs at most `budget` FLOP (keeps the
    NumPy reference fast); layers under budget keep their real channel counts."""
    scale = min(1.0, math.sqrt(budget / (flops_per_channel_pair * cin * cout)))
    return max(1, round(cin * scale)), max(1, round(cout * scale))


def real_conv3x3_case(layer):
    _, size, cin, cout = layer
    c, o = scaled_channels(cin, cout, 2 * 9 * size * size, budget=1.5e9)
    return 1, c, size + 2, size + 2, o


# ------------------------------------------------------------------------------------------------
# 3x3 convolution, every kernel version
# ------------------------------------------------------------------------------------------------

# The registry of the extension (its names are known here even where the tests skip).
try:
    from unet_cuda import _C as _names

    CONV3X3_VERSIONS = tuple(_names.CONV3X3_VERSIONS)
except ImportError:
    CONV3X3_VERSIONS = ("v1_direct", "v2_smem", "v3_igemm", "v4_tf32_mma", "v5_bf16_mma", "v6_tf32_wgmma",
                        "v7_tf32_halo", "v8_bf16_halo", "v9_fp32_halo")


@pytest.fixture(params=CONV3X3_VERSIONS)
def conv3x3_version(request):
    """Runs the test with each kernel version of the 3x3 convolution in turn (v6 only where it
    can run: a Hopper GPU and a build with sm_90a code)."""
    if not cu.conv3x3_version_available(request.param):
        pytest.skip(f"{request.param} cannot run on this GPU or build (it needs sm_90a)")
    with cu.use_conv3x3_version(request.param):
        yield request.param


@functools.lru_cache(maxsize=None)
def conv3x3_case(n, c, h, w, o, relu, seed):
    """Inputs and float64 reference results, computed once for all versions (pytest runs every
    case of one version before the next version, so the cache keeps them all: about 1 GB)."""
    rng = np.random.default_rng(seed)
    x = rand(rng, n, c, h, w)
    wt = rand(rng, o, c, 3, 3, scale=1.0 / math.sqrt(9 * max(c, 1)))
    b = rand(rng, o)
    dy = rand(rng, n, o, h - 2, w - 2)
    y_ref = ref.conv3x3_forward(f64(x), f64(wt), f64(b), relu=relu)
    dx_ref = ref.conv3x3_backward_data(f64(dy), f64(wt))
    dw_ref, db_ref = ref.conv3x3_backward_weight(f64(x), f64(dy))
    return x, wt, b, dy, y_ref, dx_ref, dw_ref, db_ref


def check_conv3x3(version, n, c, h, w, o, relu=True, seed=0):
    x, wt, b, dy, y_ref, dx_ref, dw_ref, db_ref = conv3x3_case(n, c, h, w, o, relu, seed)
    name = f"[{n},{c},{h},{w}]->{o}"
    amax = lambda a: float(np.abs(a).max()) if a.size else 0.0  # noqa: E731

    y = cu.conv3x3_forward(dev(x), dev(wt), dev(b), relu=relu)
    assert y.dtype == cupy.float32 and y.flags.c_contiguous
    assert_conv3x3_close(host(y), y_ref, version, f"conv3x3_forward{name} relu={relu}",
                         k=9 * c, a_max=amax(x), b_max=amax(wt))

    dx = cu.conv3x3_backward_data(dev(dy), dev(wt))
    assert_conv3x3_close(host(dx), dx_ref, version, f"conv3x3_backward_data{name}",
                         k=9 * o, a_max=amax(dy), b_max=amax(wt))

    dw, db = cu.conv3x3_backward_weight(dev(x), dev(dy))
    assert_conv3x3_close(host(dw), dw_ref, version, f"conv3x3_backward_weight{name} dw",
                         k=n * (h - 2) * (w - 2), a_max=amax(dy), b_max=amax(x))
    assert_close_f32(db, db_ref, f"conv3x3_backward_weight{name} db")  # FP32 in every version


@pytest.mark.parametrize("shape", CONV3X3_SHAPES, ids=str)
@pytest.mark.parametrize("relu", [False, True])
def test_conv3x3_awkward_shapes(conv3x3_version, shape, relu):
    check_conv3x3(conv3x3_version, *shape, relu=relu, seed=hash(shape) % 2**32)


@pytest.mark.parametrize("layer", REAL_CONV3X3, ids=lambda layer: layer[0])
def test_conv3x3_real_layer_shapes(conv3x3_version, layer):
    check_conv3x3(conv3x3_version, *real_conv3x3_case(layer), relu=True, seed=layer[1])


# Channels in whole multiples of 32 (C for the forward, O for the backward data): the tap-major
# views of v4-v6 (K by tap in chunks of 32 channels), which the scaled-down real layers above do
# not reach. Partial pixel tiles, the backward data's zero border, split K (C = 128 forward, O = 128
# backward data), two column tiles, one plane of a real decoder layer's size, and v6's 256 x 64
# tile (64 columns, more than 128 rows: a partial second tile, a split K).
TAP_MAJOR_SHAPES = [(1, 32, 9, 11, 32), (2, 64, 7, 9, 32), (1, 128, 6, 7, 32), (1, 32, 5, 6, 128),
                    (1, 32, 20, 21, 70), (1, 64, 100, 100, 64), (2, 32, 14, 13, 64),
                    (1, 128, 14, 13, 32)]


@pytest.mark.parametrize("shape", TAP_MAJOR_SHAPES, ids=str)
def test_conv3x3_tap_major_shapes(conv3x3_version, shape):
    n, c, h, w, o = shape
    tensor_core = conv3x3_version in ("v4_tf32_mma", "v5_bf16_mma", "v6_tf32_wgmma")
    assert cu.conv3x3_tap_major(conv3x3_version, c) == tensor_core
    check_conv3x3(conv3x3_version, *shape, relu=True, seed=sum(shape))


# v7_tf32_halo's, v8_bf16_halo's and v9_fp32_halo's own kernels (csrc/conv3x3_halo.cuh) take the
# forward and backward data that sum 8 channels or more: partial slices and patches, both column
# tiles (64 and 128, a partial one), a split K both ways, several images, and two real layer planes
# (d3b's 138 x 138 with fewer channels, b2's 28 x 28 outputs split 4 ways at full width). The
# shapes of the tests above mostly sum fewer channels and reach their GEMM version's kernels.
HALO_SHAPES = [(1, 8, 12, 20, 16), (2, 13, 19, 23, 70), (1, 16, 30, 30, 130), (3, 9, 10, 11, 8),
               (1, 40, 11, 12, 64), (1, 256, 9, 9, 40), (1, 40, 9, 9, 256), (1, 64, 138, 138, 96),
               (1, 1024, 30, 30, 1024)]


@pytest.mark.parametrize("version", ["v7_tf32_halo", "v8_bf16_halo", "v9_fp32_halo"])
@pytest.mark.parametrize("shape", HALO_SHAPES, ids=str)
def test_conv3x3_halo_shapes(version, shape):
    if not cu.conv3x3_version_available(version):
        pytest.skip(f"{version} cannot run on this GPU or build (it needs sm_90a)")
    with cu.use_conv3x3_version(version):
        check_conv3x3(version, *shape, relu=True, seed=sum(shape))


def test_conv3x3_small_integers_exact(conv3x3_version):
    # Small integers are exact in TF32 too, and so are their float32 sums: v4 matches exactly.
    rng = np.random.default_rng(3)
    n, c, h, w, o = 2, 5, 9, 7, 3
    x, wt, b = small_ints(rng, n, c, h, w), small_ints(rng, o, c, 3, 3), small_ints(rng, o)
    dy = small_ints(rng, n, o, h - 2, w - 2)
    assert_equal(cu.conv3x3_forward(dev(x), dev(wt), dev(b), relu=True),
                 ref.conv3x3_forward(x, wt, b, relu=True), "conv3x3_forward")
    assert_equal(cu.conv3x3_backward_data(dev(dy), dev(wt)), ref.conv3x3_backward_data(dy, wt),
                 "conv3x3_backward_data")
    dw, db = cu.conv3x3_backward_weight(dev(x), dev(dy))
    dw_ref, db_ref = ref.conv3x3_backward_weight(x, dy)
    assert_equal(dw, dw_ref, "conv3x3_backward_weight dw")
    assert_equal(db, db_ref, "conv3x3_backward_weight db")


def test_conv3x3_relu_passes_nan_and_clamps_negatives(conv3x3_version):
    x = np.zeros((1, 1, 3, 3), np.float32)
    wt = np.zeros((3, 1, 3, 3), np.float32)
    b = np.array([-1.0, 2.0, np.nan], np.float32)
    y = host(cu.conv3x3_forward(dev(x), dev(wt), dev(b), relu=True)).ravel()
    assert y[0] == 0.0 and y[1] == 2.0 and np.isnan(y[2])


# ------------------------------------------------------------------------------------------------
# 3x3 convolution of [up, centre crop of skip] (never stored by the GEMM versions; the others
# store the concatenation first), every version
# ------------------------------------------------------------------------------------------------

# (N, Cu, Cs, H, W, Hs, Ws, O)
CONCAT_SHAPES = [(1, 3, 2, 5, 7, 9, 11, 4), (2, 1, 5, 4, 6, 8, 6, 3), (1, 4, 4, 12, 10, 16, 14, 6),
                 (1, 0, 3, 6, 6, 6, 6, 2), (1, 3, 0, 6, 6, 10, 10, 2),
                 (1, 32, 32, 18, 17, 20, 21, 32),  # tap-major; v6's 256-row tile
                 (1, 20, 13, 14, 13, 18, 17, 33),  # v6's 256-row tile, not tap-major
                 (1, 128, 128, 12, 13, 14, 15, 70)]  # 256 channels: v6's 128 x 256 weight-gradient tile
# The decoder's first convolutions (u1a .. u4a), channels reduced as for REAL_CONV3X3.
REAL_CONCAT = [(level, up, skip, c) for level, up, skip, c in REAL_CROPS]


def real_concat_case(crop):
    _, up, skip, c = crop
    cin, o = scaled_channels(2 * c, c, 2 * 9 * (up - 2) ** 2, budget=1.5e9)
    c_up = max(1, cin // 2)
    return 1, c_up, cin - c_up, up, up, skip, skip, o


@functools.lru_cache(maxsize=None)
def conv3x3_concat_case(n, c_up, c_skip, h, w, hs, ws, o, seed):
    """Inputs and float64 reference results, computed once for all versions."""
    rng = np.random.default_rng(seed)
    up, skip = rand(rng, n, c_up, h, w), rand(rng, n, c_skip, hs, ws)
    wt = rand(rng, o, c_up + c_skip, 3, 3, scale=1.0 / math.sqrt(9 * max(c_up + c_skip, 1)))
    b, dy = rand(rng, o), rand(rng, n, o, h - 2, w - 2)
    y_ref = ref.conv3x3_concat_forward(f64(up), f64(skip), f64(wt), f64(b), relu=True)
    dup_ref, dskip_ref = ref.conv3x3_concat_backward_data(f64(dy), f64(wt), skip.shape)
    dw_ref, db_ref = ref.conv3x3_concat_backward_weight(f64(up), f64(skip), f64(dy))
    return up, skip, wt, b, dy, y_ref, dup_ref, dskip_ref, dw_ref, db_ref


def check_conv3x3_concat(version, n, c_up, c_skip, h, w, hs, ws, o, seed=0):
    up, skip, wt, b, dy, y_ref, dup_ref, dskip_ref, dw_ref, db_ref = conv3x3_concat_case(
        n, c_up, c_skip, h, w, hs, ws, o, seed)
    name = f"[{n},{c_up}+{c_skip},{h},{w} / {hs},{ws}]->{o}"
    amax = lambda a: float(np.abs(a).max()) if a.size else 0.0  # noqa: E731
    x_max = max(amax(up), amax(skip))

    y = cu.conv3x3_concat_forward(dev(up), dev(skip), dev(wt), dev(b), relu=True)
    assert y.dtype == cupy.float32
    assert_conv3x3_close(host(y), y_ref, version, f"conv3x3_concat_forward{name}", k=9 * (c_up + c_skip),
                         a_max=x_max, b_max=amax(wt))
    dup, dskip = cu.conv3x3_concat_backward_data(dev(dy), dev(wt), skip.shape)
    assert_conv3x3_close(host(dup), dup_ref, version, f"conv3x3_concat_backward_data{name} dup",
                         k=9 * o, a_max=amax(dy), b_max=amax(wt))
    assert_conv3x3_close(host(dskip), dskip_ref, version, f"conv3x3_concat_backward_data{name} dskip",
                         k=9 * o, a_max=amax(dy), b_max=amax(wt))
    dw, db = cu.conv3x3_concat_backward_weight(dev(up), dev(skip), dev(dy))
    assert_conv3x3_close(host(dw), dw_ref, version, f"conv3x3_concat_backward_weight{name} dw",
                         k=n * (h - 2) * (w - 2), a_max=amax(dy), b_max=x_max)
    assert_close_f32(db, db_ref, f"conv3x3_concat_backward_weight{name} db")


@pytest.mark.parametrize("shape", CONCAT_SHAPES, ids=str)
def test_conv3x3_concat_awkward_shapes(conv3x3_version, shape):
    check_conv3x3_concat(conv3x3_version, *shape, seed=sum(shape))


@pytest.mark.parametrize("crop", REAL_CONCAT, ids=lambda crop: f"u{crop[0]}a")
def test_conv3x3_concat_real_layer_shapes(conv3x3_version, crop):
    check_conv3x3_concat(conv3x3_version, *real_concat_case(crop), seed=crop[1])


# Both parts' channels multiples of 32: the concatenated tap-major views (a tile from up or skip).
@pytest.mark.parametrize("shape", [(1, 32, 32, 6, 7, 10, 9, 32), (1, 64, 32, 5, 5, 7, 9, 128),
                                   (1, 64, 64, 40, 40, 56, 56, 64)], ids=str)
def test_conv3x3_concat_tap_major_shapes(conv3x3_version, shape):
    check_conv3x3_concat(conv3x3_version, *shape, seed=sum(shape))


def test_conv3x3_concat_equals_concat_then_conv_bitwise():
    """The fused op reads the same values in the same order as crop_concat + conv3x3: same bits."""
    rng = np.random.default_rng(8)
    up, skip = dev(rand(rng, 1, 5, 20, 18)), dev(rand(rng, 1, 6, 26, 22))
    wt, b, dy = dev(rand(rng, 7, 11, 3, 3, scale=0.1)), dev(rand(rng, 7)), dev(rand(rng, 1, 7, 18, 16))
    for version in filter(cu.conv3x3_version_available, cu.CONV3X3_CONCAT_VERSIONS):
        with cu.use_conv3x3_version(version):
            x = cu.crop_concat_forward(up, skip)
            assert bitwise_equal(cu.conv3x3_concat_forward(up, skip, wt, b, True),
                                 cu.conv3x3_forward(x, wt, b, True)), version
            fused = cu.conv3x3_concat_backward_data(dy, wt, skip.shape)
            plain = cu.crop_concat_backward(cu.conv3x3_backward_data(dy, wt), skip.shape)
            assert all(bitwise_equal(f, p) for f, p in zip(fused, plain)), version
            assert all(bitwise_equal(f, p) for f, p in zip(cu.conv3x3_concat_backward_weight(up, skip, dy),
                                                            cu.conv3x3_backward_weight(x, dy))), version


# ------------------------------------------------------------------------------------------------
# 1x1 convolution and 2x2 up-convolution
# ------------------------------------------------------------------------------------------------

def check_conv1x1(rng, n, c, h, w, o):
    x, wt, b = rand(rng, n, c, h, w), rand(rng, o, c, 1, 1, scale=1 / math.sqrt(c)), rand(rng, o)
    dy = rand(rng, n, o, h, w)
    name = f"[{n},{c},{h},{w}]->{o}"
    assert_close_f32(cu.conv1x1_forward(dev(x), dev(wt), dev(b)),
                     ref.conv1x1_forward(f64(x), f64(wt), f64(b)), f"conv1x1_forward{name}")
    assert_close_f32(cu.conv1x1_backward_data(dev(dy), dev(wt)),
                     ref.conv1x1_backward_data(f64(dy), f64(wt)), f"conv1x1_backward_data{name}")
    dw, db = cu.conv1x1_backward_weight(dev(x), dev(dy))
    dw_ref, db_ref = ref.conv1x1_backward_weight(f64(x), f64(dy))
    assert_close_f32(dw, dw_ref, f"conv1x1_backward_weight{name} dw")
    assert_close_f32(db, db_ref, f"conv1x1_backward_weight{name} db")


@pytest.mark.parametrize("shape", CONV1X1_SHAPES, ids=str)
def test_conv1x1_awkward_shapes(shape):
    check_conv1x1(np.random.default_rng(hash(shape) % 2**32), *shape)


@pytest.mark.parametrize("n", [1, 2])
def test_conv1x1_real_layer_shape(n):
    check_conv1x1(np.random.default_rng(388 + n), n, 64, 388, 388, 2)  # "out": 388² x 2 from 64


def check_upconv(version, rng, n, c, h, w, o):
    """The three directions under conv3x3 version ``version``: v1 and v2 run the direct kernels,
    v3-v6 the GEMM engine through upconv's views, each within its precision's tolerance."""
    x, wt, b = rand(rng, n, c, h, w), rand(rng, o, c, 2, 2, scale=1 / math.sqrt(c)), rand(rng, o)
    dy = rand(rng, n, o, 2 * h, 2 * w)
    name = f"[{n},{c},{h},{w}]->{o}"
    amax = lambda a: float(np.abs(a).max()) if a.size else 0.0  # noqa: E731
    assert_conv3x3_close(host(cu.upconv2x2_forward(dev(x), dev(wt), dev(b))),
                         ref.upconv2x2_forward(f64(x), f64(wt), f64(b)), version,
                         f"upconv2x2_forward{name}", k=c, a_max=amax(x), b_max=amax(wt))
    assert_conv3x3_close(host(cu.upconv2x2_backward_data(dev(dy), dev(wt))),
                         ref.upconv2x2_backward_data(f64(dy), f64(wt)), version,
                         f"upconv2x2_backward_data{name}", k=4 * o, a_max=amax(dy), b_max=amax(wt))
    dw, db = cu.upconv2x2_backward_weight(dev(x), dev(dy))
    dw_ref, db_ref = ref.upconv2x2_backward_weight(f64(x), f64(dy))
    assert_conv3x3_close(host(dw), dw_ref, version, f"upconv2x2_backward_weight{name} dw",
                         k=n * h * w, a_max=amax(dy), b_max=amax(x))
    assert_close_f32(db, db_ref, f"upconv2x2_backward_weight{name} db")  # FP32 in every version


@pytest.mark.parametrize("shape", UPCONV_SHAPES, ids=str)
def test_upconv2x2_awkward_shapes(conv3x3_version, shape):
    check_upconv(conv3x3_version, np.random.default_rng(hash(shape) % 2**32), *shape)


@pytest.mark.parametrize("layer", REAL_UPCONV, ids=lambda layer: layer[0])
def test_upconv2x2_real_layer_shapes(conv3x3_version, layer):
    _, size, cin, cout = layer
    c, o = scaled_channels(cin, cout, 2 * size * size, budget=0.5e9)
    check_upconv(conv3x3_version, np.random.default_rng(size), 1, c, size // 2, size // 2, o)


def test_upconv2x2_weight_gradient_is_deterministic(conv3x3_version):
    rng = np.random.default_rng(11)
    x, dy = dev(rand(rng, 1, 64, 98, 98)), dev(rand(rng, 1, 32, 196, 196))
    first = cu.upconv2x2_backward_weight(x, dy)
    second = cu.upconv2x2_backward_weight(x, dy)
    assert cupy.array_equal(first[0], second[0]) and cupy.array_equal(first[1], second[1])


def test_conv1x1_and_upconv_small_integers_exact():
    rng = np.random.default_rng(5)
    x, w1, b = small_ints(rng, 2, 7, 5, 3), small_ints(rng, 3, 7, 1, 1), small_ints(rng, 3)
    dy1 = small_ints(rng, 2, 3, 5, 3)
    assert_equal(cu.conv1x1_forward(dev(x), dev(w1), dev(b)), ref.conv1x1_forward(x, w1, b),
                 "conv1x1_forward")
    assert_equal(cu.conv1x1_backward_data(dev(dy1), dev(w1)), ref.conv1x1_backward_data(dy1, w1),
                 "conv1x1_backward_data")
    for got, want, part in zip(cu.conv1x1_backward_weight(dev(x), dev(dy1)),
                               ref.conv1x1_backward_weight(x, dy1), ("dw", "db")):
        assert_equal(got, want, f"conv1x1_backward_weight {part}")
    w2, dy2 = small_ints(rng, 4, 7, 2, 2), small_ints(rng, 2, 4, 10, 6)
    b2 = small_ints(rng, 4)
    assert_equal(cu.upconv2x2_forward(dev(x), dev(w2), dev(b2)), ref.upconv2x2_forward(x, w2, b2),
                 "upconv2x2_forward")
    assert_equal(cu.upconv2x2_backward_data(dev(dy2), dev(w2)),
                 ref.upconv2x2_backward_data(dy2, w2), "upconv2x2_backward_data")
    for got, want, part in zip(cu.upconv2x2_backward_weight(dev(x), dev(dy2)),
                               ref.upconv2x2_backward_weight(x, dy2), ("dw", "db")):
        assert_equal(got, want, f"upconv2x2_backward_weight {part}")


# ------------------------------------------------------------------------------------------------
# Max-pool, crop/concat, element-wise
# ------------------------------------------------------------------------------------------------

def check_maxpool(x, name):
    y, argmax = cu.maxpool2x2_forward(dev(x))
    y_ref, argmax_ref = ref.maxpool2x2_forward(x)
    assert argmax.dtype == cupy.uint8
    assert_equal(y, y_ref, f"maxpool2x2_forward{name} y")
    assert_equal(argmax, argmax_ref, f"maxpool2x2_forward{name} argmax")
    dy = rand(np.random.default_rng(x.size), *y_ref.shape)
    assert_equal(cu.maxpool2x2_backward(dev(dy), argmax), ref.maxpool2x2_backward(dy, argmax_ref),
                 f"maxpool2x2_backward{name}")


@pytest.mark.parametrize("shape", MAXPOOL_SHAPES, ids=str)
def test_maxpool_awkward_shapes(shape):
    check_maxpool(rand(np.random.default_rng(sum(shape)), *shape), str(shape))


def test_maxpool_ties_take_the_first_maximum():
    # Values in {0, 1, 2}: most windows hold ties, in every arrangement.
    x = small_ints(np.random.default_rng(11), 2, 3, 16, 18, low=0, high=2)
    check_maxpool(x, " ties")


def test_maxpool_nan_follows_the_reference():
    x = rand(np.random.default_rng(12), 1, 2, 8, 8)
    x[0, 0, 0, 0] = np.nan   # first in its window: taken
    x[0, 0, 2, 3] = np.nan   # second in its window: never taken
    x[0, 1, 5, 5] = np.nan   # last in its window: never taken
    check_maxpool(x, " NaN")


@pytest.mark.parametrize("layer", [("d1", 568, 64), ("d2", 280, 128), ("d3", 136, 256),
                                   ("d4", 64, 512)], ids=lambda layer: layer[0])
def test_maxpool_real_layer_shapes(layer):
    _, size, channels = layer
    x = rand(np.random.default_rng(size), 1, min(channels, 16), size, size)
    check_maxpool(x, f" {layer[0]}")


def check_crop_concat(rng, n, cu_, cs, h, w, hs, ws):
    up, skip = rand(rng, n, cu_, h, w), rand(rng, n, cs, hs, ws)
    name = f"up[{n},{cu_},{h},{w}] skip[{n},{cs},{hs},{ws}]"
    assert_equal(cu.crop_concat_forward(dev(up), dev(skip)), ref.crop_concat_forward(up, skip),
                 f"crop_concat_forward {name}")
    dy = rand(rng, n, cu_ + cs, h, w)
    dup, dskip = cu.crop_concat_backward(dev(dy), skip.shape)
    dup_ref, dskip_ref = ref.crop_concat_backward(dy, skip.shape)
    assert_equal(dup, dup_ref, f"crop_concat_backward {name} dup")
    assert_equal(dskip, dskip_ref, f"crop_concat_backward {name} dskip")


@pytest.mark.parametrize("shape", CROP_SHAPES, ids=str)
def test_crop_concat_awkward_shapes(shape):
    check_crop_concat(np.random.default_rng(sum(shape)), *shape)


@pytest.mark.parametrize("level", REAL_CROPS, ids=lambda level: f"level{level[0]}")
def test_crop_concat_real_layer_shapes(level):
    _, up_size, skip_size, channels = level
    c = min(channels, 32)
    check_crop_concat(np.random.default_rng(up_size), 1, c, c, up_size, up_size, skip_size,
                      skip_size)


@pytest.mark.parametrize("shape", ELEMENTWISE_SHAPES + [(1, 64, 568, 568)], ids=str)
def test_relu_backward_and_accumulate(shape):
    rng = np.random.default_rng(len(shape))
    y = np.maximum(rand(rng, *shape), 0)   # a ReLU output: exact zeros included
    dy = rand(rng, *shape)
    assert_equal(cu.relu_backward(dev(y), dev(dy)), ref.relu_backward(y, dy), f"relu_backward{shape}")
    dst, src = rand(rng, *shape), rand(rng, *shape)
    dst_dev = dev(dst)
    result = cu.accumulate_(dst_dev, dev(src))
    assert result is dst_dev
    assert_equal(dst_dev, ref.accumulate_(dst.copy(), src), f"accumulate_{shape}")


# ------------------------------------------------------------------------------------------------
# Loss
# ------------------------------------------------------------------------------------------------

def check_softmax_xent(rng, n, k, h, w, illegal=()):
    logits = rand(rng, n, k, h, w, scale=4.0)
    labels = rng.integers(0, k, size=(n, h, w)).astype(np.int32)
    for index, value in illegal:
        labels[index] = value
    weights = rng.uniform(0.5, 10.0, size=(n, h, w)).astype(np.float32)
    name = f"[{n},{k},{h},{w}]"

    loss, probs = cu.softmax_xent_forward(dev(logits), dev(labels), dev(weights))
    loss_ref, probs_ref = ref.softmax_xent_forward(f64(logits), labels, f64(weights))
    assert isinstance(loss, cupy.ndarray) and loss.shape == () and loss.dtype == cupy.float32
    assert_close(probs, probs_ref, atol=1e-7, rtol=1e-5, name=f"softmax_xent_forward{name} probs")
    assert_close(loss, loss_ref, atol=0.0, rtol=1e-5, name=f"softmax_xent_forward{name} loss")

    dloss = 0.75
    dlogits = cu.softmax_xent_backward(probs, dev(labels), dev(weights), dloss)
    dlogits_ref = ref.softmax_xent_backward(f64(host(probs)), labels, f64(weights), dloss)
    assert_close(dlogits, dlogits_ref, atol=1e-6 * peak(dlogits_ref), rtol=1e-5,
                 name=f"softmax_xent_backward{name}")
    return loss, probs


@pytest.mark.parametrize("shape", SOFTMAX_SHAPES, ids=str)
def test_softmax_xent_awkward_shapes(shape):
    check_softmax_xent(np.random.default_rng(sum(shape)), *shape)


@pytest.mark.parametrize("n", [1, 2])
def test_softmax_xent_real_layer_shape(n):
    check_softmax_xent(np.random.default_rng(n), n, 2, 388, 388)


def test_softmax_xent_illegal_labels_give_nan():
    rng = np.random.default_rng(21)
    loss, _ = check_softmax_xent(rng, 2, 3, 5, 4, illegal=[((0, 1, 2), -1), ((1, 4, 3), 3)])
    assert math.isnan(float(loss))


def test_softmax_xent_backward_takes_dloss_on_the_device():
    rng = np.random.default_rng(22)
    logits, labels = rand(rng, 2, 2, 6, 5), rng.integers(0, 2, size=(2, 6, 5)).astype(np.int32)
    weights = rng.uniform(0.5, 2.0, size=(2, 6, 5)).astype(np.float32)
    _, probs = cu.softmax_xent_forward(dev(logits), dev(labels), dev(weights))
    from_scalar = cu.softmax_xent_backward(probs, dev(labels), dev(weights), 0.5)
    from_array = cu.softmax_xent_backward(probs, dev(labels), dev(weights),
                                          cupy.asarray(0.5, dtype=cupy.float32))
    assert_close(from_array, host(from_scalar), atol=0.0, rtol=1e-6, name="dloss as a 0-d array")


# ------------------------------------------------------------------------------------------------
# Dropout and SGD
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("p", [0.0, 0.3, 0.5, 0.9])
@pytest.mark.parametrize("seed", [0, 1, 2**63 + 5, 2**64 - 1])
def test_dropout_mask_is_bit_identical_to_the_reference(p, seed):
    for shape in [(1,), (7, 3), (2, 5, 9, 9), (1, 1024, 28, 28)]:
        mask = cu.dropout_mask(shape, p, seed)
        assert mask.dtype == cupy.uint8 and mask.shape == shape
        assert_equal(mask, ref.dropout_mask(shape, p, seed), f"dropout_mask{shape} p={p} seed={seed}")


@pytest.mark.parametrize("shape", ELEMENTWISE_SHAPES, ids=str)
@pytest.mark.parametrize("p", [0.0, 0.5, 0.3])
def test_dropout_forward_backward_exact(shape, p):
    rng = np.random.default_rng(len(shape))
    x, dy = rand(rng, *shape), rand(rng, *shape)
    mask = ref.dropout_mask(shape, p, 1234)
    # Same float32 operations in the same order as the reference: bit-identical.
    assert_equal(cu.dropout_forward(dev(x), dev(mask), p), ref.dropout_forward(x, mask, p),
                 f"dropout_forward{shape}")
    assert_equal(cu.dropout_backward(dev(dy), dev(mask), p), ref.dropout_backward(dy, mask, p),
                 f"dropout_backward{shape}")


@pytest.mark.parametrize("shape", ELEMENTWISE_SHAPES, ids=str)
@pytest.mark.parametrize("p", [0.0, 0.5, 0.3])
def test_dropout_seeded_is_the_stored_mask_path(shape, p):
    """The seeded ops hash the mask where they apply it: the bits of the reference's mask path,
    with the seed given as a number and as a 0-d uint64 device array (the CUDA graph form)."""
    rng = np.random.default_rng(len(shape) + 7)
    x, dy = rand(rng, *shape), rand(rng, *shape)
    for seed in (1234, 2**64 - 1):
        mask = ref.dropout_mask(shape, p, seed)
        want_y, want_dx = ref.dropout_forward(x, mask, p), ref.dropout_backward(dy, mask, p)
        for given in (seed, cupy.asarray(np.uint64(seed))):
            assert_equal(cu.dropout_seeded_forward(dev(x), p, given), want_y,
                         f"dropout_seeded_forward{shape} p={p} seed={seed}")
            assert_equal(cu.dropout_seeded_backward(dev(dy), p, given), want_dx,
                         f"dropout_seeded_backward{shape} p={p} seed={seed}")


@pytest.mark.parametrize("shape", [(1,), (5,), (64, 1, 3, 3), (33, 7, 3, 3), (512, 1024, 2, 2)],
                         ids=str)
def test_sgd_momentum_update(shape):
    rng = np.random.default_rng(len(shape))
    param, grad, velocity = rand(rng, *shape), rand(rng, *shape), rand(rng, *shape, scale=0.1)
    lr, momentum, weight_decay = 0.01, 0.99, 5e-4
    param_dev, velocity_dev = dev(param), dev(velocity)
    assert cu.sgd_momentum_update_(param_dev, dev(grad), velocity_dev, lr, momentum,
                                   weight_decay) is None
    param_ref, velocity_ref = f64(param), f64(velocity)
    ref.sgd_momentum_update_(param_ref, f64(grad), velocity_ref, lr, momentum, weight_decay)
    assert_close(velocity_dev, velocity_ref, atol=1e-7, rtol=1e-5, name=f"sgd velocity{shape}")
    assert_close(param_dev, param_ref, atol=1e-7, rtol=1e-5, name=f"sgd param{shape}")


def test_sgd_momentum_update_multi_matches_one_call_each():
    """40 parameters (two launches of up to 32), sizes from 0 to a million, with the rate as a
    number and as a 0-d device array: the same bits as sgd_momentum_update_ on each, and the
    reference within float32's rounding."""
    rng = np.random.default_rng(40)
    sizes = [0, 1, 5, 64, 1_000_000, 33, 4096] + [int(n) for n in rng.integers(1, 20_000, 33)]
    shapes = [(n,) if i % 2 else (1, n) for i, n in enumerate(sizes)]
    params = [rand(rng, *s) for s in shapes]
    grads = [rand(rng, *s) for s in shapes]
    velocities = [rand(rng, *s, scale=0.1) for s in shapes]
    for lr in (0.01, cupy.asarray(np.float32(0.02))):
        one_p, one_v = [dev(p) for p in params], [dev(v) for v in velocities]
        for p, g, v in zip(one_p, grads, one_v):
            cu.sgd_momentum_update_(p, dev(g), v, lr, 0.99, 5e-4)
        multi_p, multi_v = [dev(p) for p in params], [dev(v) for v in velocities]
        assert cu.sgd_momentum_update_multi_(multi_p, [dev(g) for g in grads], multi_v, lr, 0.99,
                                             5e-4) is None
        for i in range(len(sizes)):
            assert_equal(multi_p[i], host(one_p[i]), f"sgd multi param[{i}] of {sizes[i]}")
            assert_equal(multi_v[i], host(one_v[i]), f"sgd multi velocity[{i}] of {sizes[i]}")
        rate = 0.01 if isinstance(lr, float) else 0.02
        for i in (4, len(sizes) - 1):
            param_ref, velocity_ref = f64(params[i]), f64(velocities[i])
            ref.sgd_momentum_update_(param_ref, f64(grads[i]), velocity_ref, rate, 0.99, 5e-4)
            assert_close(multi_p[i], param_ref, atol=1e-7, rtol=1e-5, name=f"sgd multi param[{i}]")


# ------------------------------------------------------------------------------------------------
# Determinism
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(2, 16, 130, 130, 24), (1, 3, 66, 66, 5), (1, 64, 66, 66, 64),
                                   (1, 1, 150, 150, 16)],  # the first layer's own kernel, 5 slices
                         ids=str)
def test_conv3x3_weight_gradient_is_bitwise_reproducible(conv3x3_version, shape):
    n, c, h, w, o = shape
    rng = np.random.default_rng(32)
    x, dy = dev(rand(rng, n, c, h, w)), dev(rand(rng, n, o, h - 2, w - 2))
    splits = _C.conv3x3_backward_weight_splits(n, c, h, w, o, version=conv3x3_version)
    print(f"conv3x3_backward_weight{list(shape)} [{conv3x3_version}]: {splits} split(s) of K")
    first, second = cu.conv3x3_backward_weight(x, dy), cu.conv3x3_backward_weight(x, dy)
    assert all(bitwise_equal(a, b) for a, b in zip(first, second))


def test_conv3x3_version_setting():
    assert cu.CONV3X3_VERSIONS == tuple(_C.CONV3X3_VERSIONS)
    assert cu.get_conv3x3_version() == os.environ.get(cu.CONV3X3_VERSION_ENV, cu.DEFAULT_CONV3X3_VERSION)
    previous = cu.get_conv3x3_version()
    with cu.use_conv3x3_version("v3_igemm"):
        assert cu.get_conv3x3_version() == "v3_igemm"
    assert cu.get_conv3x3_version() == previous
    with pytest.raises(ValueError, match="'v1_direct', 'v2_smem', 'v3_igemm', 'v4_tf32_mma', 'v5_bf16_mma', "
                                         "'v6_tf32_wgmma', 'v7_tf32_halo', 'v8_bf16_halo', 'v9_fp32_halo'"):
        cu.set_conv3x3_version("v99_missing")
    assert cu.get_conv3x3_version() == previous


def test_precision_modes_name_kernel_versions():
    assert cu.PRECISIONS == ops.PRECISIONS == ("fp32", "tf32", "bf16")
    previous = cu.get_conv3x3_version()
    hopper = cu.conv3x3_version_available("v6_tf32_wgmma")
    assert cu.precision_version("tf32") == ("v6_tf32_wgmma" if hopper else "v4_tf32_mma")
    assert cu.precision_version("fp32") == "v3_igemm" and cu.precision_version("bf16") == "v5_bf16_mma"
    for precision in cu.PRECISIONS:
        with cu.use_precision(precision):
            assert cu.get_conv3x3_version() == cu.precision_version(precision)
            assert cu.get_precision() == precision
        assert cu.get_conv3x3_version() == previous
    with ops.restoring_precision():
        ops.set_precision("bf16", "cuda")
        assert cu.get_conv3x3_version() == "v5_bf16_mma"
    assert cu.get_conv3x3_version() == previous
    with pytest.raises(ValueError, match="'fp32', 'tf32', 'bf16'"):
        cu.set_precision("fp16")
    with pytest.raises(ValueError, match="precision_version: the precision must be one of"):
        cu.precision_version("fp64")


@pytest.mark.parametrize("value,expected", [("v2_smem", "v2_smem"), ("v4_tf32_mma", "v4_tf32_mma"),
                                            ("bogus", "ValueError")])
def test_conv3x3_version_from_the_environment(value, expected):
    code = ("from unet_cuda.ops import cuda\n"
            "print(cuda.get_conv3x3_version())")
    env = dict(os.environ, **{cu.CONV3X3_VERSION_ENV: value})
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=120)
    if expected == "ValueError":
        assert proc.returncode != 0 and "UNET_CUDA_CONV3X3" in proc.stderr, proc.stderr
        assert "ValueError" in proc.stderr and "'v1_direct'" in proc.stderr, proc.stderr
    else:
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip().splitlines()[-1] == expected


def test_weight_gradients_and_loss_are_bitwise_reproducible():
    rng = np.random.default_rng(31)
    x, dy3 = dev(rand(rng, 2, 16, 130, 130)), dev(rand(rng, 2, 24, 128, 128))
    assert all(bitwise_equal(a, b) for a, b in zip(cu.conv3x3_backward_weight(x, dy3),
                                                   cu.conv3x3_backward_weight(x, dy3)))
    dy1 = dev(rand(rng, 2, 24, 130, 130))
    assert all(bitwise_equal(a, b) for a, b in zip(cu.conv1x1_backward_weight(x, dy1),
                                                   cu.conv1x1_backward_weight(x, dy1)))
    dy2 = dev(rand(rng, 2, 2, 130, 130))  # O = 2: v2, the pixels in 8 slices
    assert all(bitwise_equal(a, b) for a, b in zip(cu.conv1x1_backward_weight(x, dy2),
                                                   cu.conv1x1_backward_weight(x, dy2)))
    dy_up = dev(rand(rng, 2, 8, 260, 260))
    assert all(bitwise_equal(a, b) for a, b in zip(cu.upconv2x2_backward_weight(x, dy_up),
                                                   cu.upconv2x2_backward_weight(x, dy_up)))
    logits = dev(rand(rng, 2, 2, 388, 388, scale=3.0))
    labels = dev(rng.integers(0, 2, size=(2, 388, 388)).astype(np.int32))
    weights = dev(rng.uniform(0.5, 10.0, size=(2, 388, 388)).astype(np.float32))
    losses = [cu.softmax_xent_forward(logits, labels, weights)[0] for _ in range(3)]
    assert all(bitwise_equal(losses[0], other) for other in losses[1:])


def test_conv3x3_weight_gradient_wide_tiles_are_bitwise_reproducible(conv3x3_version):
    # C = 256: v6's 128 x 256 tile; C = 64, O = 40: its 64 x 192 tile; K split in two over 2 x 1122
    # pixels
    rng = np.random.default_rng(32)
    for c, o in ((256, 70), (64, 40)):
        x, dy = dev(rand(rng, 2, c, 35, 36)), dev(rand(rng, 2, o, 33, 34))
        assert all(bitwise_equal(a, b) for a, b in zip(cu.conv3x3_backward_weight(x, dy),
                                                       cu.conv3x3_backward_weight(x, dy)))


# ------------------------------------------------------------------------------------------------
# Streams, dispatch, bad arguments on real arrays
# ------------------------------------------------------------------------------------------------

def test_runs_on_the_current_stream_and_through_the_dispatcher(conv3x3_version):
    rng = np.random.default_rng(41)
    x, wt, b = rand(rng, 2, 3, 9, 9), rand(rng, 4, 3, 3, 3), rand(rng, 4)
    want = ref.conv3x3_forward(f64(x), f64(wt), f64(b), relu=True)
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        y = ops.conv3x3_forward(dev(x), dev(wt), dev(b), relu=True)
        assert isinstance(y, cupy.ndarray)
        # The weight gradient's split partials live in stream-ordered memory of this stream.
        dw, _ = ops.conv3x3_backward_weight(dev(x), dev(rand(rng, 2, 4, 7, 7)))
    stream.synchronize()
    assert_conv3x3_close(host(y), want, conv3x3_version, "conv3x3_forward on a non-blocking stream",
                         k=27, a_max=1.0, b_max=1.0)
    assert np.isfinite(host(dw)).all()


def test_rejects_host_arrays_strided_views_and_wrong_dtypes():
    rng = np.random.default_rng(42)
    x, wt, b = dev(rand(rng, 2, 3, 9, 9)), dev(rand(rng, 4, 3, 3, 3)), dev(rand(rng, 4))
    with pytest.raises(ValueError, match="conv3x3_forward: argument w is host memory"):
        cu.conv3x3_forward(x, host(wt), b)
    with pytest.raises(ValueError, match="conv3x3_forward: argument x must be C-contiguous"):
        cu.conv3x3_forward(dev(rand(rng, 2, 3, 9, 18))[:, :, :, ::2], wt, b)
    with pytest.raises(ValueError, match="conv3x3_forward: argument x must have dtype float32"):
        cu.conv3x3_forward(x.astype(cupy.float64), wt, b)
    with pytest.raises(ValueError, match="maxpool2x2_forward: argument x needs even"):
        cu.maxpool2x2_forward(dev(rand(rng, 1, 2, 5, 4)))
    with pytest.raises(ValueError, match="crop_concat_forward: argument skip cannot be centre-cropped"):
        cu.crop_concat_forward(dev(rand(rng, 1, 2, 4, 4)), dev(rand(rng, 1, 2, 7, 8)))
    with pytest.raises(ValueError, match="dropout_mask: argument p"):
        cu.dropout_mask((3, 4), 1.0, 0)
    # A host pointer dressed up as a CUDA array is caught by the device-memory check.
    host_array = np.zeros(4, np.float32)

    class HostMemory:
        __cuda_array_interface__ = {"shape": (4,), "typestr": "<f4", "version": 3,
                                    "data": (host_array.ctypes.data, False), "strides": None}

    with pytest.raises(ValueError, match="accumulate_: argument src is host memory"):
        _C.accumulate_(cupy.zeros(4, cupy.float32), HostMemory(), stream=0)


# ------------------------------------------------------------------------------------------------
# Past 2^31 elements
# ------------------------------------------------------------------------------------------------

BIG = 2**31 + 1029  # elements: past the int32 range, and not a multiple of any block size
# The bindings take extents below 2^31 only (csrc/bindings.cpp), so BIG elements come as 13 rows;
# the element-wise ops index the flat array, which still runs past 2^31.
BIG_SHAPE = (13, BIG // 13)
assert BIG_SHAPE[0] * BIG_SHAPE[1] == BIG


def require_free_gib(gib):
    free, _ = cupy.cuda.Device().mem_info
    if free < gib * 2**30:
        pytest.skip(f"needs {gib:.1f} GiB of free GPU memory, {free / 2**30:.1f} GiB free")


def splitmix_mask(indices, p, seed):
    """The hash of docs/OPS.md for chosen flat indices (checked against the reference below)."""
    with np.errstate(over="ignore"):
        z = np.uint64(seed) + (indices.astype(np.uint64) + np.uint64(1)) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return ((z >> np.uint64(40)).astype(np.float64) / 2.0**24 >= p).astype(np.uint8)


def test_64bit_indexing_elementwise_and_dropout():
    require_free_gib(20)
    p, seed = 0.5, 99
    assert np.array_equal(splitmix_mask(np.arange(1000), p, seed), ref.dropout_mask(1000, p, seed))
    mask = cu.dropout_mask(BIG_SHAPE, p, seed).ravel()  # C-contiguous: a flat view
    tail = np.arange(BIG - 4096, BIG)
    assert_equal(mask[-4096:], splitmix_mask(tail, p, seed), "dropout_mask tail past 2^31")
    around = np.arange(2**31 - 2048, BIG)  # BIG ends 1029 elements past 2^31
    assert_equal(mask[around[0]:], splitmix_mask(around, p, seed), "dropout_mask around 2^31")
    del mask
    dst = cupy.zeros(BIG_SHAPE, cupy.float32)
    src = cupy.ones(BIG_SHAPE, cupy.float32)
    cu.accumulate_(dst, src)
    del src
    assert int(cupy.count_nonzero(dst != 1.0)) == 0, "accumulate_ missed elements past 2^31"


def test_64bit_indexing_conv3x3_on_a_big_batch(conv3x3_version):
    # 103 tiles of 64 x 572 x 572 hold 2.16e9 > 2^31 elements: the last tile lies past int32.
    n, c, size, o = 103, 64, 572, 2
    require_free_gib(2 * n * c * size * size * 4 / 2**30 + 2)
    cupy.random.seed(7)
    x = cupy.random.random((n, c, size, size), dtype=cupy.float32)
    x -= 0.5
    rng = np.random.default_rng(8)
    wt, b = rand(rng, o, c, 3, 3, scale=1 / 24), rand(rng, o)
    y = cu.conv3x3_forward(x, dev(wt), dev(b))
    patch = host(x[-1:, :, -12:, -12:])
    assert_conv3x3_close(host(y[-1:, :, -10:, -10:]), ref.conv3x3_forward(f64(patch), f64(wt), f64(b)),
                         conv3x3_version, "conv3x3_forward, last tile of a batch past 2^31 elements",
                         k=9 * c, a_max=0.5, b_max=float(np.abs(wt).max()))
    dx = cu.conv3x3_backward_data(y, dev(wt))   # dx has as many elements as x
    del x
    dy_patch = host(y[-1:, :, -10:, -10:])
    want = ref.conv3x3_backward_data(f64(dy_patch), f64(wt))[:, :, 2:, 2:]  # interior of the patch
    assert_conv3x3_close(host(dx[-1:, :, -10:, -10:]), want, conv3x3_version,
                         "conv3x3_backward_data, last tile past 2^31", k=9 * o,
                         a_max=float(np.abs(host(y[-1:, :, -12:, -12:])).max()),
                         b_max=float(np.abs(wt).max()))


# ------------------------------------------------------------------------------------------------
# The augmentation warp (csrc/warp.cu)
# ------------------------------------------------------------------------------------------------

from warp_checks import WARP_CASES, WARP_GEOMETRIES, check_case, output_frame, warp_case_inputs  # noqa: E402


def run_augment_warp_kernel(image, labels, weights, coarse, *args):
    return [host(a) for a in cu.augment_warp(dev(image), dev(labels), dev(weights), dev(coarse), *args)]


@pytest.mark.parametrize("h,w,grid,sigma", WARP_CASES)
def test_augment_warp_against_the_reference(h, w, grid, sigma):
    # tests/warp_checks.py: all turns and flips, random gray values; image ~1e-5 and weights ~1e-4
    # at the paper's 10 px (float32 rounding of the displacement times the slope), labels exact
    # except at rounding ties of the nearest neighbour.
    check_case(run_augment_warp_kernel, h, w, grid, sigma)


@pytest.mark.parametrize("turns,flip_rows,flip_columns", WARP_GEOMETRIES)
def test_augment_warp_without_displacement_is_exact(turns, flip_rows, flip_columns):
    # Zero nodes give d = 0 exactly and the taps' weights (0, 1, 0, 0): flips and turns are copies,
    # and identity gray values leave an image within [0, 1] untouched.
    rng = np.random.default_rng(3)
    image = rng.uniform(0.0, 1.0, (33, 33)).astype(np.float32)
    labels = rng.integers(-5, 5, (33, 33)).astype(np.int32)
    weights = rng.uniform(1.0, 11.0, (33, 33)).astype(np.float32)
    got = cu.augment_warp(dev(image), dev(labels), dev(weights), cupy.zeros((2, 3, 3), cupy.float32),
                          turns, flip_rows, flip_columns)
    for out, source, name in zip(got, (image, labels, weights), ("image", "labels", "weights")):
        assert_equal(out, output_frame(source, turns, flip_rows, flip_columns), f"augment_warp {name}")


@pytest.mark.parametrize("dy,dx", [(0.5, -0.5), (-1.5, 2.5)])
def test_augment_warp_rounds_exact_label_ties_up(dy, dx):
    # A one-node grid gives the shift exactly, so t = 1/2 really occurs: floor(s + 1/2) takes base + 1.
    rng = np.random.default_rng(6)
    labels = rng.integers(0, 1000, (7, 9)).astype(np.int32)
    image, weights = rng.uniform(0, 1, (7, 9)).astype(np.float32), rng.uniform(1, 11, (7, 9)).astype(np.float32)
    coarse = np.array([[[dy]], [[dx]]], np.float32)
    got = cu.augment_warp(dev(image), dev(labels), dev(weights), dev(coarse))
    assert_equal(got[1], ref.augment_warp(image, labels, weights, coarse)[1], "augment_warp labels at ties")


def test_augment_warp_is_deterministic_and_checks_its_arguments():
    rng = np.random.default_rng(4)
    image, labels, weights, coarse = (dev(a) for a in warp_case_inputs(rng, 64, 64, 3, 10.0))
    first = cu.augment_warp(image, labels, weights, coarse, 1, True, False, 1.1, 0.9, 0.05)
    again = cu.augment_warp(image, labels, weights, coarse, 1, True, False, 1.1, 0.9, 0.05)
    assert all(bitwise_equal(a, b) for a, b in zip(first, again))
    with pytest.raises(ValueError, match="augment_warp: argument quarter_turns .*square"):
        cu.augment_warp(image[:, :63].copy(), labels[:, :63].copy(), weights[:, :63].copy(), coarse, 3)
    with pytest.raises(ValueError, match="augment_warp: argument image must be C-contiguous"):
        cu.augment_warp(image[:, ::2], labels[:, ::2].copy(), weights[:, ::2].copy(), coarse)
    with pytest.raises(ValueError, match="augment_warp: argument labels must have dtype int32"):
        cu.augment_warp(image, labels.astype(cupy.int64), weights, coarse)
    with pytest.raises(ValueError, match="augment_warp: argument gamma"):
        cu.augment_warp(image, labels, weights, coarse, 0, False, False, 0.0)


def test_augment_warp_survives_non_finite_nodes():
    # The result is unspecified, but no read may leave the inputs (compute-sanitizer checks this
    # call too, via bench/sanitizer_driver.py) and the call must not fail.
    rng = np.random.default_rng(5)
    image, labels, weights, _ = warp_case_inputs(rng, 17, 17, 3, 10.0)
    coarse = np.array([[[np.nan, 1e30, -np.inf]] * 3, [[np.inf, -1e38, 3.0]] * 3], dtype=np.float32)
    got = cu.augment_warp(dev(image), dev(labels), dev(weights), dev(coarse), 2, True, True)
    assert set(np.unique(host(got[1]))) <= set(np.unique(labels))


# ------------------------------------------------------------------------------------------------
# The ReLU's backward fused into the backward-data ops (relu_mask): the masked result has the bits of
# relu_backward(mask, unmasked result) of the same kernel, for every version and path; and a whole
# network's gradients come out with the same bits fused or not.
# ------------------------------------------------------------------------------------------------

# (N, C, H, W, O) of dx: awkward, K split (O = 120, 1024), tap-major, and d1b's and u1b's data
# gradient at full size
MASKED_SHAPES = [(2, 3, 5, 7, 5), (1, 32, 20, 21, 70), (1, 120, 6, 7, 120), (1, 64, 18, 17, 1024),
                 (1, 64, 570, 570, 64), (1, 64, 390, 390, 64)]


@pytest.mark.parametrize("shape", MASKED_SHAPES, ids=str)
def test_relu_mask_in_conv3x3_and_upconv_backward_data(conv3x3_version, shape):
    n, c, h, w, o = shape
    rng = np.random.default_rng(sum(shape))
    mask = dev(relu_mask_like(rng, (n, c, h, w)))
    dy = dev(rand(rng, n, o, h - 2, w - 2))
    wt = dev(rand(rng, o, c, 3, 3, scale=1.0 / math.sqrt(9 * c)))
    plain = cu.conv3x3_backward_data(dy, wt)
    assert_same_bits(cu.conv3x3_backward_data(dy, wt, relu_mask=mask), cu.relu_backward(mask, plain),
                     f"conv3x3_backward_data{list(shape)}")
    if h * w > 200_000:  # the up-convolution's at the smaller full-size shape only
        return
    dyu = dev(rand(rng, n, o, 2 * h, 2 * w))
    wu = dev(rand(rng, o, c, 2, 2, scale=1.0 / math.sqrt(c)))
    plain = cu.upconv2x2_backward_data(dyu, wu)
    assert_same_bits(cu.upconv2x2_backward_data(dyu, wu, relu_mask=mask), cu.relu_backward(mask, plain),
                     f"upconv2x2_backward_data{list(shape)}")


@pytest.mark.parametrize("shape", [(1, 3, 2, 5, 7, 9, 11, 4), (1, 60, 64, 6, 6, 8, 8, 130),
                                   (1, 64, 32, 5, 5, 7, 9, 128), (1, 64, 64, 392, 392, 568, 568, 64)],
                         ids=str)
def test_relu_mask_in_concat_backward_data(conv3x3_version, shape):
    n, cu_, cs, h, w, hs, ws, o = shape
    rng = np.random.default_rng(sum(shape))
    dy = dev(rand(rng, n, o, h - 2, w - 2))
    wt = dev(rand(rng, o, cu_ + cs, 3, 3, scale=1.0 / math.sqrt(9 * (cu_ + cs))))
    up_mask = dev(relu_mask_like(rng, (n, cu_, h, w)))
    skip_mask = dev(relu_mask_like(rng, (n, cs, hs, ws)))
    skip_shape = (n, cs, hs, ws)
    dup, dskip = cu.conv3x3_concat_backward_data(dy, wt, skip_shape)
    mup, mskip = cu.conv3x3_concat_backward_data(dy, wt, skip_shape, up_relu_mask=up_mask,
                                                 skip_relu_mask=skip_mask)
    assert_same_bits(mup, cu.relu_backward(up_mask, dup), f"dup {shape}")
    assert_same_bits(mskip, cu.relu_backward(skip_mask, dskip), f"dskip {shape}")


@pytest.mark.parametrize("shape", [(2, 7, 5, 9, 2), (1, 64, 388, 388, 2), (2, 4, 3, 5, 9)], ids=str)
def test_relu_mask_in_conv1x1_backward_data(shape):
    n, c, h, w, o = shape
    rng = np.random.default_rng(sum(shape))
    mask = dev(relu_mask_like(rng, (n, c, h, w)))
    dy, wt = dev(rand(rng, n, o, h, w)), dev(rand(rng, o, c, 1, 1))
    assert_same_bits(cu.conv1x1_backward_data(dy, wt, relu_mask=mask),
                     cu.relu_backward(mask, cu.conv1x1_backward_data(dy, wt)), f"conv1x1_backward_data{list(shape)}")


@pytest.mark.parametrize("shape", [(2, 3, 10, 14), (1, 64, 568, 568)], ids=str)
def test_relu_mask_in_maxpool_backward(shape):
    rng = np.random.default_rng(sum(shape))
    x = dev(np.maximum(small_ints(rng, *shape), 0.0))  # a ReLU's output, with ties and zero windows
    y, argmax = cu.maxpool2x2_forward(x)
    dy = dev(rand(rng, *y.shape))
    assert_same_bits(cu.maxpool2x2_backward(dy, argmax, relu_mask=y),
                     cu.relu_backward(x, cu.maxpool2x2_backward(dy, argmax)), f"maxpool2x2_backward{list(shape)}")


@pytest.mark.parametrize("shape", [(2, 3, 10, 14), (1, 64, 568, 568)], ids=str)
@pytest.mark.parametrize("masked", [False, True])
def test_maxpool_backward_accumulates(shape, masked):
    """Added into a gradient already there: the bits of accumulate_ after the plain backward."""
    rng = np.random.default_rng(sum(shape) + 1)
    x = dev(np.maximum(small_ints(rng, *shape), 0.0))
    y, argmax = cu.maxpool2x2_forward(x)
    dy = dev(rand(rng, *y.shape))
    start = rand(rng, *shape)
    start[0, 0, 0, :4] = -0.0
    mask = y if masked else None
    want = cu.accumulate_(dev(start), cu.maxpool2x2_backward(dy, argmax, relu_mask=mask))
    into = dev(start)
    got = cu.maxpool2x2_backward(dy, argmax, relu_mask=mask, accumulate_into=into)
    assert got is into
    assert_same_bits(got, want, f"maxpool2x2_backward accumulate{list(shape)} masked={masked}")


def network_case(base_channels, dropout, size, batch, seed):
    """A depth-3 U-Net on the GPU (weights seeded 4) and a batch for it: input, labels, weights."""
    import unet_cuda as u
    from unet_cuda.autograd import Tensor

    net = u.UNet(base_channels=base_channels, depth=3, dropout=dropout, seed=4).to("cuda")
    rng = np.random.default_rng(seed)
    x = Tensor(dev(rand(rng, batch, 1, size, size)))
    out = net.output_size(size)
    labels = dev(rng.integers(0, 2, (batch, out, out)).astype(np.int32))
    weights = dev(rng.uniform(0.5, 2.0, (batch, out, out)).astype(np.float32))
    return net, x, labels, weights


def test_fused_relu_backward_gives_the_network_the_same_gradients(conv3x3_version):
    """A training step's gradients with the ReLU's backward fused into the consumers and the skip
    maps' sums into the pools' backward, and without either."""
    from unet_cuda import functional as F

    net, x, labels, weights = network_case(base_channels=8, dropout=0.5, size=140, batch=2, seed=9)
    grads = {}
    for fuse in (False, True):
        for p in net.parameters():
            p.grad = None
        with F.fused_relu_backward(fuse), F.fused_accumulation(fuse):
            seeds = [5, 6, 7, 8][:net.num_dropout_layers()]
            loss = F.softmax_cross_entropy(net(x, dropout_seeds=seeds), labels, weights)
        loss.backward()
        grads[fuse] = [host(p.grad) for p in net.parameters()]
    for (name, _), a, b in zip(net.named_parameters(), grads[False], grads[True]):
        assert_same_bits(b, a, f"{name}.grad")


def test_autotuned_plans_compute_the_same_step(conv3x3_version, tmp_path):
    """Autotuning (every GEMM's plans timed at its first call, the fastest kept): a training
    step's gradients stay within the version's tolerance of the rule's plans, the table holds each
    GEMM of the step with the plans it timed, and the same plans set again from a saved table give
    the same bits."""
    from unet_cuda import functional as F

    if conv3x3_version in ("v1_direct", "v2_smem"):
        pytest.skip("v1 and v2 run no GEMM: nothing to plan")
    net, x, labels, weights = network_case(base_channels=32, dropout=0.0, size=124, batch=1, seed=10)

    def gradients():
        for p in net.parameters():
            p.grad = None
        F.softmax_cross_entropy(net(x), labels, weights).backward()
        return [host(p.grad) for p in net.parameters()]

    cu.clear_tuned_plans()
    try:
        by_rule = gradients()
        with cu.autotuning():
            tuned = gradients()
        assert not cu.get_autotune()
        plans = cu.tuned_plans()
        assert plans and all(e["version"] == conv3x3_version for e in plans)
        assert {e["op"] for e in plans} == set(_C.GEMM_PLAN_OPS)  # every GEMM op of the network
        assert all(e["uses"] == 1 for e in plans), plans  # tuned, then run from the table once
        for e in plans:
            offered = cu.gemm_plan_candidates(e["op"], e["version"], e["M"], e["cols"], e["K"], e["images"])
            assert e["candidates"] == len(offered) == len(e["timed"]), e
            assert [tuple(t[:3]) for t in e["timed"]] == offered and min(t[3] for t in e["timed"]) == e["ms"], e
            assert tuple(e["plan"]) in offered and tuple(e["rule"]) == offered[0], e
            assert 0 < e["ms"] <= e["rule_ms"], e
        again = gradients()  # from the table, without timing
        assert [{**e, "uses": 2} for e in plans] == cu.tuned_plans()
        path = tmp_path / "plans.json"
        assert cu.save_tuned_plans(path) == len(plans)
        cu.clear_tuned_plans()
        assert cu.load_tuned_plans(path) == len(plans)
        reloaded = gradients()
    finally:
        cu.clear_tuned_plans()
    for (name, _), a, b, c, d in zip(net.named_parameters(), by_rule, tuned, again, reloaded):
        assert_same_bits(c, b, f"{name}.grad, the table's plans again")
        assert_same_bits(d, b, f"{name}.grad, the saved table's plans")
        scale = float(np.abs(a).max()) or 1.0
        tol = {"fp32": 1e-4, "tf32": 2e-2, "bf16": 6e-2}[cu.CONV3X3_VERSION_PRECISION[conv3x3_version]]
        err = float(np.abs(b - a).max()) / scale
        assert err <= tol, f"{name}.grad: autotuned plans {err:.2e} of the largest value from the rule's"


@pytest.mark.parametrize("shape", [(1, 256, 24, 24, 192), (1, 64, 70, 70, 64)], ids=str)
def test_every_gemm_plan_matches_the_reference(conv3x3_version, shape):
    """Each plan its version offers a layer's three GEMMs, set by hand in turn, against the float64
    reference: the tiles the rules never take (v6's 256 x 128) and every split count included. The
    GEMM of each direction (csrc/launchers.h): forward M = N P Q pixels, cols = O, K = 9C; backward
    data M = N H W, cols = C, K = 9O; weight gradient M = O, cols = 9C, K = P Q per image."""
    if conv3x3_version in ("v1_direct", "v2_smem"):
        pytest.skip("v1 and v2 run no GEMM: nothing to plan")
    n, c, h, w, o = shape
    x, wt, b, dy, y_ref, dx_ref, dw_ref, _ = conv3x3_case(n, c, h, w, o, True, 3)
    p, q = h - 2, w - 2
    amax = lambda a: float(np.abs(a).max())  # noqa: E731
    directions = [
        ("conv3x3_forward", (n * p * q, o, 9 * c, 1), lambda: cu.conv3x3_forward(dev(x), dev(wt), dev(b), relu=True),
         y_ref, 9 * c, amax(x), amax(wt)),
        ("conv3x3_backward_data", (n * h * w, c, 9 * o, 1), lambda: cu.conv3x3_backward_data(dev(dy), dev(wt)),
         dx_ref, 9 * o, amax(dy), amax(wt)),
        ("conv3x3_backward_weight", (o, 9 * c, p * q, n), lambda: cu.conv3x3_backward_weight(dev(x), dev(dy))[0],
         dw_ref, n * p * q, amax(dy), amax(x)),
    ]
    cu.clear_tuned_plans()
    try:
        for op, dims, run, want, k, a_max, b_max in directions:
            candidates = cu.gemm_plan_candidates(op, conv3x3_version, *dims)
            assert len(candidates) > 1, f"{op}{list(shape)}: one plan only"
            cu.clear_tuned_plans()
            with cu.autotuning():  # the op's GEMM is the one these dims name: autotuning enters it
                run()
            assert [(e["op"], e["M"], e["cols"], e["K"], e["images"]) for e in cu.tuned_plans()] == [(op, *dims)]
            for plan in candidates:
                cu.clear_tuned_plans()
                cu.set_tuned_plans([dict(zip(("op", "version", "M", "cols", "K", "images"), (op, conv3x3_version, *dims)),
                                         plan=list(plan))])
                got = host(run())
                assert_conv3x3_close(got, want, conv3x3_version, f"{op}{list(shape)} plan {plan}",
                                     k=k, a_max=a_max, b_max=b_max)
    finally:
        cu.clear_tuned_plans()


def test_autotuning_inside_a_capture_enters_the_rule_untimed(conv3x3_version):
    """A GEMM first met inside a CUDA graph capture with autotuning on: nothing is timed (a capture
    cannot synchronise), the rule's plan enters the table, and the eager calls after it run that
    plan, the graph's, instead of tuning: the same bits from the graph and from an eager call."""
    if conv3x3_version in ("v1_direct", "v2_smem"):
        pytest.skip("v1 and v2 run no GEMM: nothing to plan")
    rng = np.random.default_rng(44)
    x, wt, b = dev(rand(rng, 1, 64, 40, 40)), dev(rand(rng, 96, 64, 3, 3, scale=0.05)), dev(rand(rng, 96))
    pool, stream = cupy.cuda.MemoryPool(), cupy.cuda.Stream(non_blocking=True)
    cu.clear_tuned_plans()
    try:
        with cupy.cuda.using_allocator(pool.malloc), stream:
            cu.conv3x3_forward(x, wt, b, relu=True)  # warms the pool; autotuning off: no entry
            assert cu.tuned_plans() == []
            with cu.autotuning():
                stream.begin_capture()
                try:
                    y_graph = cu.conv3x3_forward(x, wt, b, relu=True)
                finally:
                    graph = stream.end_capture()
                graph.launch(stream)
                (entry,) = cu.tuned_plans()
                assert entry["plan"] == entry["rule"] and entry["candidates"] == 0 and entry["ms"] is None
                y_eager = cu.conv3x3_forward(x, wt, b, relu=True)  # reads the entry: no tuning
            stream.synchronize()
        (after,) = cu.tuned_plans()
        assert after["candidates"] == 0 and after["uses"] == 2, after
        assert_same_bits(host(y_graph), host(y_eager), "the captured and the eager forward")
    finally:
        cu.clear_tuned_plans()
