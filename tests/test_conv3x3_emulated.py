"""The 3x3 convolution kernels of csrc/conv3x3.cu, every version, run on the CPU and compared with
the NumPy reference: no GPU needed. The 2x2 up-convolution (csrc/upconv.cu) runs the same GEMM
engine (csrc/implicit_gemm.cuh) through views of its own: it is checked here too, near the end,
and so are the element-wise ops and the max-pool (their vector and index-width paths).

g++ compiles csrc/conv3x3.cu unchanged against tests/cpu_emulation/cuda_runtime.h, a stand-in for
the CUDA runtime that runs each block's threads as fibers (the header says how: barriers, the
warp-wide mma.sync and its fragment layout, deferred cp.async copies, NaN-filled workspace). The
launchers are called through tests/cpu_emulation/conv3x3_entry.cpp, so what runs is the real
dispatch: tile choice, fast paths (16-byte copies), split-K plan and reduction, grid decoding,
bounds guards. What this cannot show is timing, and GPU-only failures (register spills, shared
memory limits, races that the fiber order hides): tests/test_cuda_ops.py checks the same on a GPU.

Every input sits between NaN guards (a read outside it would turn results into NaN), every output
between guards that must come back untouched (no write outside it), and outputs start as NaN (an
element never written shows). Tolerances per precision: tests/conv3x3_tolerance.py.
"""

from __future__ import annotations

import ctypes
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from conv3x3_tolerance import check_conv3x3, precision
from relu_masks import assert_same_bits, relu_mask_like

ROOT = Path(__file__).resolve().parents[1]
EMULATION = ROOT / "tests" / "cpu_emulation"
# The version names, from the registry in csrc/launchers.h.
VERSIONS = tuple(re.findall(r'\{"(\w+)", Conv3x3Version::',
                            (ROOT / "csrc" / "launchers.h").read_text()))
TILED = VERSIONS[1:]           # the versions with tiles, tile choices and split-K
GUARD = 4096                   # floats of guard before and after every array (keeps 16-byte alignment)
OUTPUT_GUARD_VALUE = 1234.5


# v7, v8 and v9 run the kernels of their GEMM version (v6, v5, v3) for the weight gradients (not
# v9, which has its own), the up-convolutions and the convolutions of fewer than 8 channels: where
# a case reaches only those,
# it is checked with that version, and the halo versions take it once (the first shape of a list),
# which checks the dispatch.
HALO_FALLBACKS = {"v7_tf32_halo": "v6_tf32_wgmma", "v8_bf16_halo": "v5_bf16_mma",
                  "v9_fp32_halo": "v3_igemm"}


def skip_gemm_fallback(version, reaches_halo_kernel, first_case=False):
    if version in HALO_FALLBACKS and not reaches_halo_kernel and not first_case:
        pytest.skip(f"{version} runs {HALO_FALLBACKS[version]}'s kernels here, checked with it")


def test_registry_is_read():
    assert VERSIONS == ("v1_direct", "v2_smem", "v3_igemm", "v4_tf32_mma", "v5_bf16_mma", "v6_tf32_wgmma",
                        "v7_tf32_halo", "v8_bf16_halo", "v9_fp32_halo")


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    cxx = shutil.which("g++")
    if cxx is None:
        pytest.skip("g++ is not installed")
    out = tmp_path_factory.mktemp("conv3x3_emulated") / "libconv3x3_emulated.so"
    cmd = [cxx, "-std=c++17", "-O2", "-shared", "-fPIC", "-Wall", "-Wno-unknown-pragmas",
           "-I", str(EMULATION), "-I", str(ROOT / "csrc"), "-x", "c++", str(ROOT / "csrc" / "conv3x3.cu"),
           str(ROOT / "csrc" / "upconv.cu"), str(ROOT / "csrc" / "bias_backward.cu"),
           str(ROOT / "csrc" / "conv1x1.cu"), str(ROOT / "csrc" / "dropout.cu"),
           str(ROOT / "csrc" / "elementwise.cu"), str(ROOT / "csrc" / "maxpool.cu"),
           str(ROOT / "csrc" / "optimizer.cu"),
           str(EMULATION / "conv3x3_entry.cpp"), "-o", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"building the emulation failed:\n{proc.stderr[-6000:]}"
    assert "warning" not in proc.stderr, proc.stderr[-6000:]
    return ctypes.CDLL(str(out))


class Guarded:
    """An array inside a larger buffer: NaN guards around inputs, fixed values around outputs."""

    def __init__(self, values=None, *, shape=None, output=False):
        shape = tuple(values.shape) if values is not None else tuple(shape)
        size = int(np.prod(shape))
        self.output = output
        self.buffer = np.full(size + 2 * GUARD, OUTPUT_GUARD_VALUE if output else np.nan, np.float32)
        self.array = self.buffer[GUARD:GUARD + size].reshape(shape)
        self.array[...] = np.nan if values is None else values

    @property
    def ptr(self):
        return self.buffer[GUARD:].ctypes.data_as(ctypes.c_void_p)

    def check_guards(self, name):
        if self.output:
            outside = np.concatenate([self.buffer[:GUARD], self.buffer[-GUARD:]])
            assert (outside == OUTPUT_GUARD_VALUE).all(), f"{name}: written outside the output"


def call(lib, fn, version, *args):
    error = ctypes.create_string_buffer(1024)
    rc = getattr(lib, fn)(version.encode(), *args, error, len(error))
    assert rc == 0, f"{fn}({version}): {error.value.decode()}"


def make_inputs(rng, n, c, h, w, o):
    x = rng.uniform(-1.0, 1.0, (n, c, h, w)).astype(np.float32)
    wt = (rng.uniform(-1.0, 1.0, (o, c, 3, 3)) / np.sqrt(9 * max(c, 1))).astype(np.float32)
    b = rng.uniform(-1.0, 1.0, o).astype(np.float32)
    dy = rng.uniform(-1.0, 1.0, (n, o, h - 2, w - 2)).astype(np.float32)
    return x, wt, b, dy


def amax(a):
    return float(np.abs(a).max()) if a.size else 0.0


def run_forward(lib, version, x, wt, b, relu):
    n, c, h, w = x.shape
    o = wt.shape[0]
    gx, gw, gb = Guarded(x), Guarded(wt), Guarded(b)
    y = Guarded(shape=(n, o, h - 2, w - 2), output=True)
    call(lib, "emulated_conv3x3_forward", version, gx.ptr, gw.ptr, gb.ptr, y.ptr, n, c, h, w, o, int(relu))
    y.check_guards("conv3x3_forward")
    return y.array.copy()


def mask_ptr(relu_mask):
    """A relu_mask argument: NULL for None, else the mask between NaN guards."""
    return None if relu_mask is None else Guarded(relu_mask).ptr


def run_backward_data(lib, version, dy, wt, relu_mask=None):
    n, o, p, q = dy.shape
    c = wt.shape[1]
    gdy, gw = Guarded(dy), Guarded(wt)
    dx = Guarded(shape=(n, c, p + 2, q + 2), output=True)
    call(lib, "emulated_conv3x3_backward_data", version, gdy.ptr, gw.ptr, mask_ptr(relu_mask), dx.ptr,
         n, c, p + 2, q + 2, o)
    dx.check_guards("conv3x3_backward_data")
    return dx.array.copy()


def run_backward_weight(lib, version, x, dy):
    n, c, h, w = x.shape
    o = dy.shape[1]
    gx, gdy = Guarded(x), Guarded(dy)
    dw, db = Guarded(shape=(o, c, 3, 3), output=True), Guarded(shape=(o,), output=True)
    call(lib, "emulated_conv3x3_backward_weight", version, gx.ptr, gdy.ptr, dw.ptr, db.ptr, n, c, h, w, o)
    dw.check_guards("conv3x3_backward_weight dw")
    db.check_guards("conv3x3_backward_weight db")
    return dw.array.copy(), db.array.copy()


def f64(a):
    return np.asarray(a, dtype=np.float64)


def check_forward(lib, version, shape, relu=True, seed=0):
    from unet_cuda.ops import reference as ref

    x, wt, b, _ = make_inputs(np.random.default_rng(seed), *shape)
    got = run_forward(lib, version, x, wt, b, relu)
    want = ref.conv3x3_forward(f64(x), f64(wt), f64(b), relu=relu)
    check_conv3x3(got, want, version, f"conv3x3_forward{list(shape)} relu={relu}",
                  k=9 * shape[1], a_max=amax(x), b_max=amax(wt))


def check_backward_data(lib, version, shape, seed=0):
    from unet_cuda.ops import reference as ref

    _, wt, _, dy = make_inputs(np.random.default_rng(seed), *shape)
    got = run_backward_data(lib, version, dy, wt)
    check_conv3x3(got, ref.conv3x3_backward_data(f64(dy), f64(wt)), version,
                  f"conv3x3_backward_data{list(shape)}", k=9 * shape[4], a_max=amax(dy), b_max=amax(wt))


def check_backward_weight(lib, version, shape, seed=0):
    from unet_cuda.ops import reference as ref

    x, _, _, dy = make_inputs(np.random.default_rng(seed), *shape)
    got, db = run_backward_weight(lib, version, x, dy)
    n, _, h, w, _ = shape
    dw_ref, db_ref = ref.conv3x3_backward_weight(f64(x), f64(dy))
    check_conv3x3(got, dw_ref, version, f"conv3x3_backward_weight{list(shape)} dw", k=n * (h - 2) * (w - 2),
                  a_max=amax(dy), b_max=amax(x))
    # db: csrc/bias_backward.cu (FP32 in every version); a sum of n*p*q values of size <= 1
    np.testing.assert_allclose(db, db_ref, rtol=1e-5, atol=1e-6 * np.sqrt(dy[:, 0].size))


# (N, C, H, W, O): the awkward shapes of the GPU tests, then the shapes that reach each path.
AWKWARD = [(1, 1, 3, 3, 1), (2, 3, 5, 7, 5), (1, 5, 9, 4, 7), (2, 7, 3, 9, 3), (1, 33, 8, 6, 2),
           (2, 3, 6, 5, 33), (1, 2, 13, 11, 4)]
PATHS = [
    (1, 4, 12, 10, 6),   # C % 4 == 0 and P*Q % 4 == 0: v4's 16-byte copies of w and of dy
    (2, 3, 40, 40, 5),   # few channels, many pixels: the weight gradient splits K (checked below)
    (1, 5, 20, 21, 70),  # O > 64: two column tiles, the second one partial
    (2, 7, 35, 70, 9),   # several pixel tiles per image, split-K across two images
    # v6's 256 x 64 tile (64 columns or fewer, more than 128 rows, at least 8 K tiles of 32): the
    # weight gradient of O = 130 rows and 9C = 27 columns over 240 pixels; the forward and backward
    # data of channels that are no multiple of 32 (not tap-major)
    (1, 3, 18, 17, 130),
    (1, 3, 19, 17, 130),  # the same with 255 pixels: 4-byte copies of dy
    (1, 30, 14, 13, 33),
]


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("shape", AWKWARD + PATHS, ids=str)
def test_every_direction(lib, version, shape):
    skip_gemm_fallback(version, max(shape[1], shape[4]) >= 8, shape == AWKWARD[1])
    check_forward(lib, version, shape, relu=True)
    check_forward(lib, version, shape, relu=False, seed=1)
    check_backward_data(lib, version, shape)
    check_backward_weight(lib, version, shape)


# The 128 x 128 tiles of v3 and v4 (chosen when the GEMM gives >= 264 of them), one direction
# each, on shapes that keep the emulation short.
@pytest.mark.parametrize("version", TILED)
def test_large_tiles_forward(lib, version):
    check_forward(lib, version, (1, 4, 134, 134, 130))      # 137 x 2 tiles of 128 x 128


@pytest.mark.parametrize("version", TILED)
def test_large_tiles_backward_data(lib, version):
    check_backward_data(lib, version, (1, 130, 134, 134, 1))  # 141 x 2 tiles, C = 130 columns


@pytest.mark.parametrize("version", TILED)
def test_large_tiles_backward_weight(lib, version):
    skip_gemm_fallback(version, False)
    shape = (1, 1900, 3, 3, 130)                             # 2 x 134 tiles of O x 9C, K = 1
    assert lib.emulated_conv3x3_backward_weight_splits(version.encode(), *shape) == 1
    check_backward_weight(lib, version, shape)


def test_split_k_plans(lib):
    def splits(version, shape):
        return lib.emulated_conv3x3_backward_weight_splits(version.encode(), *shape)

    assert splits("v1_direct", (2, 3, 40, 40, 5)) == 1   # one block per (o, c): no split
    for version in TILED:
        assert splits(version, (2, 3, 40, 40, 5)) > 1, version
        assert splits(version, (2, 7, 35, 70, 9)) > 1, version
    # The paper's first layers at batch 1: the few-channel weight gradients split; the deep ones not.
    for version in TILED:
        assert splits(version, (1, 64, 570, 570, 64)) > 8, version
        assert splits(version, (1, 1024, 30, 30, 1024)) == 1, version
    # ... v6's into whole waves of 132 blocks (one per SM): d2a's 5 tiles (128 x 576) into 52 splits
    # (260 blocks, two waves) rather than 53 (265, three); d1b's 3 tiles of 64 x 192 into 88 (264);
    # d3a's 18 tiles of 128 x 128 (256 x 1152) and d3b's 18 of 128 x 256 (256 x 2304) into 14 (252)
    # rather than 15 (270). The other versions, whose blocks per SM vary, keep ceil(264 / tiles):
    # d1b's 9 tiles of 64 x 64 -> 30.
    assert splits("v6_tf32_wgmma", (1, 64, 284, 284, 128)) == 52
    assert splits("v6_tf32_wgmma", (1, 64, 570, 570, 64)) == 88
    assert splits("v6_tf32_wgmma", (1, 128, 140, 140, 256)) == 14
    assert splits("v6_tf32_wgmma", (1, 256, 138, 138, 256)) == 14
    for version in ("v3_igemm", "v4_tf32_mma", "v5_bf16_mma"):
        assert splits(version, (1, 64, 570, 570, 64)) == 30, version
    # v6's 128 x 64 tile (9C <= 64, M <= 128 rows) holds one block of the weight gradient per SM
    # and two of the forward, so no single wave size fits it: 30 splits (M = O = 100, one tile,
    # ceil(264 / 1) capped at 30 by the pixels: 176 x 176 / 1024). Its 256 x 64 tile (more rows)
    # holds one block per SM: O = 640 rows make 3 tiles, at most 56 splits (240 x 240 / 1024),
    # and 44 fill one wave of 132 where 56 would make 168 blocks, two waves.
    assert splits("v6_tf32_wgmma", (1, 5, 178, 178, 100)) == 30
    assert splits("v6_tf32_wgmma", (1, 5, 242, 242, 640)) == 44
    # The first layer (C = 1) in the GEMM versions: conv3x3_backward_weight_few_channels, two waves
    # of (o, slice) blocks; too few pixels for a second slice: one.
    for version in TILED[1:]:
        assert splits(version, (1, 1, 572, 572, 64)) == 9, version
        assert splits(version, (1, 2, 40, 40, 5)) == 1, version


def test_weight_gradient_tiles(lib):
    def columns(version, shape):
        return lib.emulated_conv3x3_backward_weight_tile_columns(version.encode(), *shape)

    # v6's wide tile (128 x 256) where 9C is a whole number of 256 columns: C = 256, 512, 1024
    # (d3b to b2 and the decoder's first three levels); else 128 columns (d3a: 9C = 1152), or 64
    # where 9C <= 64. No GEMM (0): v1 and v2, and the few-channel kernel of the first layer.
    assert columns("v6_tf32_wgmma", (1, 256, 138, 138, 256)) == 256
    assert columns("v6_tf32_wgmma", (1, 512, 66, 66, 512)) == 256
    assert columns("v6_tf32_wgmma", (1, 1024, 30, 30, 1024)) == 256
    assert columns("v6_tf32_wgmma", (1, 128, 140, 140, 256)) == 128
    # the 64 x 192 tile where O <= 64 and 9C is a whole number of 192 (d1b, u4b: 576; u4a: 1152)
    assert columns("v6_tf32_wgmma", (1, 64, 570, 570, 64)) == 192
    assert columns("v6_tf32_wgmma", (1, 128, 392, 392, 64)) == 192
    assert columns("v6_tf32_wgmma", (1, 64, 284, 284, 128)) == 128  # d2a: O = 128
    assert columns("v6_tf32_wgmma", (1, 5, 20, 20, 9)) == 64
    assert columns("v6_tf32_wgmma", (1, 1, 572, 572, 64)) == 0
    # v4 and v5: the 128 x 128 tile wherever O and 9C both pass 64 (K split to fill the GPU), else
    # 64 x 64 (d1b: O = 64). v3: the large tile only where it alone makes 264 blocks (b2's 8 x 72).
    for version in ("v4_tf32_mma", "v5_bf16_mma"):
        assert columns(version, (1, 256, 138, 138, 256)) == 128, version
        assert columns(version, (1, 64, 284, 284, 128)) == 128, version
        assert columns(version, (1, 64, 570, 570, 64)) == 64, version
        assert columns(version, (1, 5, 20, 20, 100)) == 64, version
    assert columns("v3_igemm", (1, 256, 138, 138, 256)) == 64
    assert columns("v3_igemm", (1, 1024, 30, 30, 1024)) == 128
    assert columns("v1_direct", (1, 256, 138, 138, 256)) == 0


# v4's and v5's 128 x 128 tile where the weight gradient's rows and columns pass 64 but make too
# few tiles by themselves (O = 70, 9C = 108: one tile), K split in two over 48 x 48 pixels.
@pytest.mark.parametrize("version", ("v4_tf32_mma", "v5_bf16_mma"))
def test_large_tile_split_backward_weight(lib, version):
    shape = (1, 12, 50, 50, 70)
    assert lib.emulated_conv3x3_backward_weight_tile_columns(version.encode(), *shape) == 128
    assert lib.emulated_conv3x3_backward_weight_splits(version.encode(), *shape) == 2
    check_backward_weight(lib, version, shape, seed=7)


# v6's weight-gradient tiles, each with its columns and its shapes (the one whose K splits in two
# marked):
# * the wide 128 x 256 tile: two row tiles (the second of 2 rows) and two K tiles of 16 pixels (the
#   second partial) over 4 x 5 pixels (16-byte copies of dy); 5 x 5 pixels (4-byte copies); K split
#   in two over 46 x 46 pixels; three images of 3 x 4 pixels, a K tile each;
# * the 64 x 192 tile (O <= 64, 9C a multiple of 192), whose two warpgroups own 96 columns each:
#   three column tiles over 9 x 8 pixels (16-byte copies of dy, three K tiles); 4-byte copies and
#   fewer rows (O = 40) with K split in two over 45 x 46 pixels; two images of 15 pixels; 9C = 1152
#   (six column tiles).
# The concatenated input's weight gradient takes them too (CONCAT_SHAPES).
WEIGHT_TILE_SHAPES = [(256, shape, shape[2] == 48) for shape in
                      [(1, 256, 6, 7, 130), (1, 256, 7, 7, 65), (1, 256, 48, 48, 70), (3, 256, 5, 6, 129)]] + \
                     [(192, shape, shape[2] == 47) for shape in
                      [(1, 64, 11, 10, 64), (1, 64, 47, 48, 40), (2, 64, 5, 7, 33), (1, 128, 6, 7, 64)]]


@pytest.mark.parametrize("columns,shape,split", WEIGHT_TILE_SHAPES, ids=str)
def test_v6_weight_gradient_tiles(lib, columns, shape, split):
    assert lib.emulated_conv3x3_backward_weight_tile_columns(b"v6_tf32_wgmma", *shape) == columns
    if split:
        assert lib.emulated_conv3x3_backward_weight_splits(b"v6_tf32_wgmma", *shape) == 2
    check_backward_weight(lib, "v6_tf32_wgmma", shape, seed=sum(shape))


# The weight gradient of one or two input channels (the first layer) in the GEMM versions: a block
# per (o, slice of the pixels), slices added in order; against v1 and the reference.
@pytest.mark.parametrize("version", TILED[1:])
@pytest.mark.parametrize("shape", [(1, 1, 130, 70, 3), (2, 2, 70, 67, 2), (3, 1, 5, 1000, 1)], ids=str)
def test_few_input_channels_weight_gradient(lib, version, shape):
    skip_gemm_fallback(version, False)
    n, c, h, w, o = shape
    assert lib.emulated_conv3x3_backward_weight_splits(version.encode(), *shape) > 1
    check_backward_weight(lib, version, shape, seed=sum(shape))


# Few output tiles and a long K: the GEMM versions split the forward's and the backward data's K
# too (the deep layers at batch 1), then add the partials and apply the epilogue.
OUTPUT_SPLIT_SHAPES = [(1, 120, 6, 7, 120), (2, 200, 5, 5, 9), (1, 9, 5, 5, 200)]


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("shape", OUTPUT_SPLIT_SHAPES, ids=str)
def test_split_forward_and_backward_data(lib, version, shape):
    n, c, h, w, o = shape
    forward = lib.emulated_conv3x3_forward_splits(version.encode(), *shape)
    data = lib.emulated_conv3x3_backward_data_splits(version.encode(), *shape)
    if version in ("v1_direct", "v2_smem"):
        assert forward == data == 1
    else:
        assert forward == (1 if 9 * c < 1024 else 9 * c // 512), (version, forward)
        assert data == (1 if 9 * o < 1024 else min(9 * o // 512, 264)), (version, data)
    check_forward(lib, version, shape, relu=True)
    check_backward_data(lib, version, shape)


# The tap-major views (k ordered by tap within chunks of 32 channels, the weights rearranged): v4-v6
# take them where the channels summed are a multiple of 32, with every tile then one tap. Partial
# pixel tiles, dy's zero border (backward data), several chunks, a split K (forward of C = 128,
# backward data of O = 128) and two column tiles.
TAP_MAJOR_SHAPES = [(1, 32, 9, 11, 32), (2, 64, 7, 9, 32), (1, 128, 6, 7, 32), (1, 32, 5, 6, 128),
                    (1, 32, 20, 21, 70),
                    # v6's 256 x 64 tile (64 columns, more than 128 rows): two tiles, the second of 8
                    # rows of the second image (forward), of 108 (backward data); a split K
                    (2, 32, 14, 13, 64), (1, 128, 14, 13, 32)]


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("shape", TAP_MAJOR_SHAPES, ids=str)
def test_tap_major_views(lib, version, shape):
    n, c, h, w, o = shape
    tensor_core = version in ("v4_tf32_mma", "v5_bf16_mma", "v6_tf32_wgmma")
    assert lib.emulated_conv3x3_tap_major(version.encode(), c) == int(tensor_core)
    assert lib.emulated_conv3x3_tap_major(version.encode(), o) == int(tensor_core and o % 32 == 0)
    check_forward(lib, version, shape, relu=True, seed=sum(shape))
    check_backward_data(lib, version, shape, seed=sum(shape) + 1)


def test_tap_major_needs_whole_tiles(lib):
    for channels in (1, 3, 16, 48, 100):
        assert lib.emulated_conv3x3_tap_major(b"v6_tf32_wgmma", channels) == 0, channels
    assert lib.emulated_conv3x3_tap_major(b"v6_tf32_wgmma", 0) == 0
    assert lib.emulated_conv3x3_tap_major(b"v3_igemm", 64) == 0


def test_output_split_plans(lib):
    def splits(fn, version, shape):
        return getattr(lib, fn)(version.encode(), *shape)

    for version in GEMM_VERSIONS:
        # b2 at batch 1 (28 x 28 outputs of 1024 channels from 1024): 208 tiles of 64 x 64 -> 2
        # splits (v3-v5); v6's 56 tiles of 128 x 128 -> 4 (224 blocks, two waves of 132; 5 would
        # make 280, three waves).
        expected = 4 if version == "v6_tf32_wgmma" else 2
        assert splits("emulated_conv3x3_forward_splits", version, (1, 1024, 30, 30, 1024)) == expected
        assert splits("emulated_conv3x3_backward_data_splits", version, (1, 1024, 30, 30, 1024)) == expected
        # d1b and u4b (570 x 570 pixels): tiles enough, no split.
        assert splits("emulated_conv3x3_forward_splits", version, (1, 64, 570, 570, 64)) == 1
        assert splits("emulated_conv3x3_backward_data_splits", version, (1, 64, 570, 570, 64)) == 1


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("shape", [(2, 5, 9, 7, 3), (1, 9, 12, 20, 10)], ids=str)
def test_small_integers_exact(lib, version, shape):
    """Small integers are exact in TF32 too, and so are their sums in float32: every version must
    match the reference bit for bit. The second shape (9 and 10 channels) reaches the halo
    versions' own kernels."""
    from unet_cuda.ops import reference as ref

    if shape[1] >= 8 and version not in HALO_FALLBACKS:
        pytest.skip("the first shape checks this version's kernels")
    rng = np.random.default_rng(3)
    n, c, h, w, o = shape
    ints = lambda *s: rng.integers(-2, 3, size=s).astype(np.float32)  # noqa: E731
    x, wt, b, dy = ints(n, c, h, w), ints(o, c, 3, 3), ints(o), ints(n, o, h - 2, w - 2)
    np.testing.assert_array_equal(run_forward(lib, version, x, wt, b, True),
                                  ref.conv3x3_forward(x, wt, b, relu=True))
    np.testing.assert_array_equal(run_backward_data(lib, version, dy, wt), ref.conv3x3_backward_data(dy, wt))
    dw, db = run_backward_weight(lib, version, x, dy)
    dw_ref, db_ref = ref.conv3x3_backward_weight(x, dy)
    np.testing.assert_array_equal(dw, dw_ref)
    np.testing.assert_array_equal(db, db_ref)


@pytest.mark.parametrize("version", VERSIONS)
def test_relu_passes_nan_and_clamps_negatives(lib, version):
    x = np.zeros((1, 1, 3, 3), np.float32)
    wt = np.zeros((3, 1, 3, 3), np.float32)
    b = np.array([-1.0, 2.0, np.nan], np.float32)
    y = run_forward(lib, version, x, wt, b, True).ravel()
    assert y[0] == 0.0 and y[1] == 2.0 and np.isnan(y[2]), (version, y)


@pytest.mark.parametrize("version", VERSIONS)
def test_empty_sums(lib, version):
    """C = 0 (forward: y = b), O = 0 (dx = 0), N = 0 (dw = 0): outputs are still written."""
    rng = np.random.default_rng(5)
    b = rng.uniform(-1, 1, 4).astype(np.float32)
    zeros = lambda *s: np.zeros(s, np.float32)  # noqa: E731
    y = run_forward(lib, version, zeros(2, 0, 5, 6), zeros(4, 0, 3, 3), b, False)
    np.testing.assert_array_equal(y, np.broadcast_to(b[None, :, None, None], y.shape))
    dx = run_backward_data(lib, version, zeros(2, 0, 3, 4), zeros(0, 3, 3, 3))
    np.testing.assert_array_equal(dx, 0.0)
    dw, db = run_backward_weight(lib, version, zeros(0, 3, 5, 5), zeros(0, 2, 3, 3))
    np.testing.assert_array_equal(dw, 0.0)
    np.testing.assert_array_equal(db, 0.0)
    dw, _ = run_backward_weight(lib, version, zeros(0, 8, 5, 5), zeros(0, 2, 3, 3))  # v9's own kernel
    np.testing.assert_array_equal(dw, 0.0)


def test_precision_names():
    assert [precision(v) for v in VERSIONS] == ["fp32", "fp32", "fp32", "tf32", "bf16", "tf32", "tf32", "bf16",
                                                "fp32"]


# ------------------------------------------------------------------------------------------------
# The convolution of a concatenated input [up, centre crop of skip], never stored (the decoder's
# first convolution of each level): the GEMM versions read the two inputs directly.
# ------------------------------------------------------------------------------------------------

GEMM_VERSIONS = ("v3_igemm", "v4_tf32_mma", "v5_bf16_mma", "v6_tf32_wgmma")
CONCAT_VERSIONS = GEMM_VERSIONS + ("v7_tf32_halo", "v8_bf16_halo", "v9_fp32_halo")  # their kernel reads both too
# (N, Cu, Cs, H, W, Hs, Ws, O)
CONCAT_SHAPES = [
    (1, 3, 2, 5, 7, 9, 11, 4),       # odd sizes, crop offsets (2, 2)
    (2, 1, 5, 4, 6, 8, 6, 3),        # Ws == W: no crop along x
    (1, 4, 4, 12, 10, 16, 14, 6),    # Cu + Cs = 8 and P*Q % 4 == 0: the 16-byte copies
    (2, 3, 4, 40, 40, 44, 44, 5),    # many pixels, few channels: the weight gradient splits K
    (1, 0, 3, 6, 6, 6, 6, 2),        # no up channels: everything from skip
    (1, 3, 0, 6, 6, 10, 10, 2),      # no skip channels
    (1, 60, 64, 6, 6, 8, 8, 130),    # long K both ways: the forward and backward data split K
    (1, 32, 32, 6, 7, 10, 9, 32),    # tap-major (v4-v6): a tile's channels from up or from skip
    (1, 64, 32, 5, 5, 7, 9, 128),    # tap-major, K split in the backward data
    (1, 32, 64, 5, 6, 9, 8, 32),     # tap-major, two chunks of skip channels after one of up
    (1, 32, 32, 18, 17, 20, 21, 32), # tap-major, v6's 256-row tile (240 rows; 306 in the data grad.)
    (1, 20, 13, 14, 13, 18, 17, 33), # v6's 256-row tile, not tap-major (132 rows; 182)
    (1, 128, 128, 5, 6, 7, 8, 20),   # Cu + Cs = 256: v6's 128 x 256 tile of the weight gradient
    (1, 32, 32, 6, 7, 8, 9, 64),     # Cu + Cs = 64, O = 64: v6's 64 x 192 tile of the weight gradient
]


def _concat_inputs(rng, n, cu, cs, h, w, hs, ws, o):
    up = rng.uniform(-1.0, 1.0, (n, cu, h, w)).astype(np.float32)
    skip = rng.uniform(-1.0, 1.0, (n, cs, hs, ws)).astype(np.float32)
    c = cu + cs
    wt = (rng.uniform(-1.0, 1.0, (o, c, 3, 3)) / np.sqrt(9 * max(c, 1))).astype(np.float32)
    b = rng.uniform(-1.0, 1.0, o).astype(np.float32)
    dy = rng.uniform(-1.0, 1.0, (n, o, h - 2, w - 2)).astype(np.float32)
    return up, skip, wt, b, dy


@pytest.mark.parametrize("version", CONCAT_VERSIONS)
@pytest.mark.parametrize("shape", CONCAT_SHAPES, ids=str)
def test_concat_every_direction(lib, version, shape):
    check_concat(lib, version, shape)


def check_concat(lib, version, shape):
    """All three directions of the concatenated-input convolution against the float64 reference."""
    from unet_cuda.ops import reference as ref

    n, cu, cs, h, w, hs, ws, o = shape
    up, skip, wt, b, dy = _concat_inputs(np.random.default_rng(sum(shape)), *shape)
    gup, gskip, gw, gb, gdy = Guarded(up), Guarded(skip), Guarded(wt), Guarded(b), Guarded(dy)
    dims = (n, cu, cs, h, w, hs, ws, o)
    a_max = max(amax(up), amax(skip))

    y = Guarded(shape=(n, o, h - 2, w - 2), output=True)
    call(lib, "emulated_conv3x3_concat_forward", version, gup.ptr, gskip.ptr, gw.ptr, gb.ptr, y.ptr,
         *dims, 1)
    y.check_guards("conv3x3_concat_forward")
    check_conv3x3(y.array, ref.conv3x3_concat_forward(f64(up), f64(skip), f64(wt), f64(b), relu=True),
                  version, f"conv3x3_concat_forward{list(shape)}", k=9 * (cu + cs), a_max=a_max,
                  b_max=amax(wt))

    dup = Guarded(shape=up.shape, output=True)
    dskip = Guarded(shape=skip.shape, output=True)
    call(lib, "emulated_conv3x3_concat_backward_data", version, gdy.ptr, gw.ptr, None, None, dup.ptr,
         dskip.ptr, *dims)
    dup.check_guards("conv3x3_concat_backward_data dup")
    dskip.check_guards("conv3x3_concat_backward_data dskip")
    want_up, want_skip = ref.conv3x3_concat_backward_data(f64(dy), f64(wt), skip.shape)
    for got, want, name in ((dup.array, want_up, "dup"), (dskip.array, want_skip, "dskip")):
        check_conv3x3(got, want, version, f"conv3x3_concat_backward_data{list(shape)} {name}",
                      k=9 * o, a_max=amax(dy), b_max=amax(wt))
    # Outside the crop window dskip is exactly 0, written (the outputs started as NaN).
    top, left = (hs - h) // 2, (ws - w) // 2
    border = np.ones(skip.shape, bool)
    border[:, :, top:top + h, left:left + w] = False
    assert (dskip.array[border] == 0.0).all()

    dw = Guarded(shape=wt.shape, output=True)
    db = Guarded(shape=(o,), output=True)
    call(lib, "emulated_conv3x3_concat_backward_weight", version, gup.ptr, gskip.ptr, gdy.ptr, dw.ptr,
         db.ptr, *dims)
    dw.check_guards("conv3x3_concat_backward_weight dw")
    want_dw, want_db = ref.conv3x3_concat_backward_weight(f64(up), f64(skip), f64(dy))
    check_conv3x3(dw.array, want_dw, version, f"conv3x3_concat_backward_weight{list(shape)} dw",
                  k=n * (h - 2) * (w - 2), a_max=amax(dy), b_max=a_max)
    np.testing.assert_allclose(db.array, want_db, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("version", ("v1_direct", "v2_smem"))
def test_concat_needs_a_gemm_version(lib, version):
    up, skip, wt, b, _ = _concat_inputs(np.random.default_rng(0), 1, 2, 2, 5, 5, 7, 7, 3)
    y = np.zeros((1, 3, 3, 3), np.float32)
    error = ctypes.create_string_buffer(1024)
    rc = lib.emulated_conv3x3_concat_forward(
        version.encode(), up.ctypes.data_as(ctypes.c_void_p), skip.ctypes.data_as(ctypes.c_void_p),
        wt.ctypes.data_as(ctypes.c_void_p), b.ctypes.data_as(ctypes.c_void_p),
        y.ctypes.data_as(ctypes.c_void_p), 1, 2, 2, 5, 5, 7, 7, 3, 1, error, len(error))
    assert rc == -1
    assert f"version {version} cannot read a concatenated input" in error.value.decode()


# ------------------------------------------------------------------------------------------------
# The 2x2 up-convolution: its direct kernels (v1, v2) and its GEMM views on the engine (v3-v6)
# ------------------------------------------------------------------------------------------------

def upconv_inputs(rng, n, c, h, w, o):
    x = rng.uniform(-1.0, 1.0, (n, c, h, w)).astype(np.float32)
    wt = (rng.uniform(-1.0, 1.0, (o, c, 2, 2)) / np.sqrt(max(c, 1))).astype(np.float32)
    b = rng.uniform(-1.0, 1.0, o).astype(np.float32)
    dy = rng.uniform(-1.0, 1.0, (n, o, 2 * h, 2 * w)).astype(np.float32)
    return x, wt, b, dy


def check_upconv(lib, version, shape, seed=0):
    """All three directions of upconv2x2 against the float64 reference (guards checked)."""
    from unet_cuda.ops import reference as ref

    n, c, h, w, o = shape
    x, wt, b, dy = upconv_inputs(np.random.default_rng(seed), *shape)
    name = f"upconv2x2{list(shape)}"

    gx, gw, gb = Guarded(x), Guarded(wt), Guarded(b)
    y = Guarded(shape=(n, o, 2 * h, 2 * w), output=True)
    call(lib, "emulated_upconv2x2_forward", version, gx.ptr, gw.ptr, gb.ptr, y.ptr, n, c, h, w, o)
    y.check_guards(f"{name} forward")
    check_conv3x3(y.array, ref.upconv2x2_forward(f64(x), f64(wt), f64(b)), version, f"{name} forward",
                  k=c, a_max=amax(x), b_max=amax(wt))

    gdy = Guarded(dy)
    dx = Guarded(shape=(n, c, h, w), output=True)
    call(lib, "emulated_upconv2x2_backward_data", version, gdy.ptr, gw.ptr, None, dx.ptr, n, c, h, w, o)
    dx.check_guards(f"{name} backward_data")
    check_conv3x3(dx.array, ref.upconv2x2_backward_data(f64(dy), f64(wt)), version,
                  f"{name} backward_data", k=4 * o, a_max=amax(dy), b_max=amax(wt))

    dw, db = Guarded(shape=(o, c, 2, 2), output=True), Guarded(shape=(o,), output=True)
    call(lib, "emulated_upconv2x2_backward_weight", version, gx.ptr, gdy.ptr, dw.ptr, db.ptr, n, c, h, w, o)
    dw.check_guards(f"{name} backward_weight dw")
    dw_ref, db_ref = ref.upconv2x2_backward_weight(f64(x), f64(dy))
    check_conv3x3(dw.array, dw_ref, version, f"{name} backward_weight dw", k=n * h * w,
                  a_max=amax(dy), b_max=amax(x))
    np.testing.assert_allclose(db.array, db_ref, rtol=1e-5, atol=1e-5)


# (N, C, H, W, O): sizes 1..9 and odd, channel counts off every multiple, then the paths: a plane
# of a multiple of 4 pixels (16-byte copies of x in the weight gradient), many pixels over few
# channels (the weight gradient splits K), more than 64 and 128 columns (4O), and a deep, small
# layer (the forward and backward data split K: few output tiles, K >= 1024).
UPCONV_SHAPES = [(1, 1, 1, 1, 1), (2, 3, 5, 7, 5), (1, 5, 9, 4, 7), (2, 33, 3, 1, 2), (1, 4, 6, 6, 3),
                 (2, 3, 24, 22, 2), (1, 6, 5, 9, 17), (1, 9, 7, 5, 40)]
# Shapes for the GEMM engine's paths only: the split K above, and v6's 256 x 64 tile: the forward
# and weight gradient (4O = 64 columns, K = C = 256), the backward data (C = 64 columns over 144
# pixels, K = 4O = 256); the second's weight gradient (4O = 256 columns) takes the 128 x 256 tile.
# v1 and v2 (a thread or a block per output, no tiles or splits) take 9-11 s each on them here.
UPCONV_GEMM_SHAPES = [(1, 1100, 2, 3, 3), (1, 256, 16, 16, 16), (1, 64, 12, 12, 64)]


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("shape", UPCONV_SHAPES + UPCONV_GEMM_SHAPES, ids=str)
def test_upconv2x2_every_direction(lib, version, shape):
    if shape in UPCONV_GEMM_SHAPES and version in ("v1_direct", "v2_smem"):
        pytest.skip(f"{version} has no GEMM paths; the shapes above check its kernels")
    skip_gemm_fallback(version, False, shape == UPCONV_SHAPES[1])
    check_upconv(lib, version, shape, seed=sum(shape))


def test_upconv2x2_weight_gradient_is_deterministic(lib):
    """Two runs of the split weight gradient give the same bits (fixed-order split-K)."""
    n, c, h, w, o = 2, 3, 24, 22, 2
    x, _, _, dy = upconv_inputs(np.random.default_rng(5), n, c, h, w, o)
    runs = []
    for _ in range(2):
        dw, db = Guarded(shape=(o, c, 2, 2), output=True), Guarded(shape=(o,), output=True)
        call(lib, "emulated_upconv2x2_backward_weight", "v4_tf32_mma", Guarded(x).ptr, Guarded(dy).ptr,
             dw.ptr, db.ptr, n, c, h, w, o)
        runs.append(dw.array.copy())
    assert np.array_equal(runs[0], runs[1])


# ------------------------------------------------------------------------------------------------
# The 1x1 convolution (csrc/conv1x1.cu): v2 (a thread per pixel; the weight gradient in slices of
# the pixels, then a fixed-order reduction) where O <= 8, v1 beyond
# ------------------------------------------------------------------------------------------------

# (N, C, H, W, O): sizes 1..9 and odd; O = 8 (the last v2 shape) and 9 (v1); and the weight
# gradient in two slices, the first ending inside the second image (3 x 3660 pixels).
CONV1X1_SHAPES = [(1, 1, 1, 1, 1), (2, 3, 5, 7, 5), (1, 33, 4, 9, 2), (2, 7, 1, 8, 3), (1, 64, 9, 9, 2),
                  (1, 5, 3, 4, 8), (2, 4, 3, 5, 9), (3, 3, 60, 61, 2)]


def run_conv1x1(lib, x, wt, b, dy):
    n, c, h, w = x.shape
    o = wt.shape[0]
    y = Guarded(shape=(n, o, h, w), output=True)
    plain_call(lib, "emulated_conv1x1_forward", Guarded(x).ptr, Guarded(wt).ptr, Guarded(b).ptr, y.ptr,
               n, c, h, w, o)
    dx = Guarded(shape=(n, c, h, w), output=True)
    plain_call(lib, "emulated_conv1x1_backward_data", Guarded(dy).ptr, Guarded(wt).ptr, None, dx.ptr,
               n, c, h, w, o)
    dw, db = Guarded(shape=(o, c, 1, 1), output=True), Guarded(shape=(o,), output=True)
    plain_call(lib, "emulated_conv1x1_backward_weight", Guarded(x).ptr, Guarded(dy).ptr, dw.ptr, db.ptr,
               n, c, h, w, o)
    for name, out in (("y", y), ("dx", dx), ("dw", dw), ("db", db)):
        out.check_guards(f"conv1x1 {name}")
    return y.array, dx.array, dw.array, db.array


@pytest.mark.parametrize("shape", CONV1X1_SHAPES, ids=str)
def test_conv1x1_every_direction(lib, shape):
    from unet_cuda.ops import reference as ref

    n, c, h, w, o = shape
    rng = np.random.default_rng(sum(shape))
    x = rng.uniform(-1.0, 1.0, (n, c, h, w)).astype(np.float32)
    wt = rng.uniform(-1.0, 1.0, (o, c, 1, 1)).astype(np.float32)
    b = rng.uniform(-1.0, 1.0, o).astype(np.float32)
    dy = rng.uniform(-1.0, 1.0, (n, o, h, w)).astype(np.float32)
    y, dx, dw, db = run_conv1x1(lib, x, wt, b, dy)
    dw_ref, db_ref = ref.conv1x1_backward_weight(f64(x), f64(dy))
    # float32 sums of k terms of size <= 1 against float64
    for name, got, want, k in (("forward", y, ref.conv1x1_forward(f64(x), f64(wt), f64(b)), c + 1),
                               ("backward_data", dx, ref.conv1x1_backward_data(f64(dy), f64(wt)), o),
                               ("backward_weight dw", dw, dw_ref, n * h * w),
                               ("backward_weight db", db, db_ref, n * h * w)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-6 * np.sqrt(k),
                                   err_msg=f"conv1x1_{name}{list(shape)}")


def test_conv1x1_weight_gradient_is_deterministic(lib):
    """The sliced weight gradient gives the same bits twice (fixed slices, fixed order)."""
    n, c, h, w, o = 3, 3, 60, 61, 2
    rng = np.random.default_rng(11)
    x = rng.uniform(-1.0, 1.0, (n, c, h, w)).astype(np.float32)
    wt = rng.uniform(-1.0, 1.0, (o, c, 1, 1)).astype(np.float32)
    b = rng.uniform(-1.0, 1.0, o).astype(np.float32)
    dy = rng.uniform(-1.0, 1.0, (n, o, h, w)).astype(np.float32)
    first, second = run_conv1x1(lib, x, wt, b, dy), run_conv1x1(lib, x, wt, b, dy)
    assert all(np.array_equal(a, b) for a, b in zip(first, second))


# ------------------------------------------------------------------------------------------------
# The bias gradient (csrc/bias_backward.cu): one block per channel (v2), or, where that leaves the
# GPU idle, blocks over slices of the pixels added in a fixed order (v3)
# ------------------------------------------------------------------------------------------------

# (N, O, HW): v2 (one slice); two slices, the first ending inside the second image; 64 channels of
# 70000 pixels in 8 slices (a 64-channel layer, smaller).
@pytest.mark.parametrize("shape", [(2, 1, 100), (3, 5, 6000), (1, 64, 70000)], ids=str)
def test_bias_backward(lib, shape):
    lib.emulated_bias_backward.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int,
                                           ctypes.c_int64, ctypes.c_char_p, ctypes.c_int]
    n, o, hw = shape
    dy = np.random.default_rng(hw).uniform(-1.0, 1.0, (n, o, hw)).astype(np.float32)
    gdy, db = Guarded(dy), Guarded(shape=(o,), output=True)
    runs = []
    for _ in range(2):
        plain_call(lib, "emulated_bias_backward", gdy.ptr, db.ptr, n, o, hw)
        db.check_guards("bias_backward db")
        runs.append(db.array.copy())
    np.testing.assert_allclose(runs[0], dy.astype(np.float64).sum(axis=(0, 2)), rtol=1e-5,
                               atol=2e-6 * np.sqrt(n * hw))
    assert runs[0].tobytes() == runs[1].tobytes()


# ------------------------------------------------------------------------------------------------
# Dropout (csrc/dropout.cu): the seeded kernel, which hashes each mask bit where it applies it, gives
# the bits of the stored-mask path and of the reference, the seed by value or read from memory
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 7, 4099])
@pytest.mark.parametrize("p", [0.0, 0.5, 0.3])
def test_dropout_seeded_is_the_mask_path(lib, n, p):
    from unet_cuda.ops import reference as ref

    lib.emulated_dropout_mask.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_double, ctypes.c_uint64,
                                          ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int]
    lib.emulated_dropout_forward.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                             ctypes.c_double, ctypes.c_char_p, ctypes.c_int]
    lib.emulated_dropout_seeded.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_double,
                                            ctypes.c_uint64, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int]
    x = np.random.default_rng(n).standard_normal(n).astype(np.float32)
    x[:3] = [np.inf, -0.0, np.nan][:min(n, 3)]  # dropped: NaN (inf * 0) and a signed zero, as the mask path
    for seed in (5, 2**64 - 1):
        mask = np.zeros(n, np.uint8)
        plain_call(lib, "emulated_dropout_mask", mask.ctypes.data, n, p, seed, None)
        assert np.array_equal(mask, ref.dropout_mask(n, p, seed))
        want = np.zeros(n, np.float32)
        plain_call(lib, "emulated_dropout_forward", x.ctypes.data, mask.ctypes.data, want.ctypes.data, n, p)
        on_device = np.array([seed], np.uint64)
        for by_value, pointer in ((seed, None), (0, on_device.ctypes.data)):
            got = np.full(n, 1234.5, np.float32)
            plain_call(lib, "emulated_dropout_seeded", x.ctypes.data, got.ctypes.data, n, p, by_value, pointer)
            assert got.tobytes() == want.tobytes(), (n, p, seed, pointer is not None)
            with np.errstate(invalid="ignore"):  # inf * 0, as on the GPU
                assert got.tobytes() == ref.dropout_seeded_forward(x, p, seed).tobytes()


# ------------------------------------------------------------------------------------------------
# Element-wise ops (16-byte path where aligned, scalar otherwise) and the max-pool
# ------------------------------------------------------------------------------------------------

def plain_call(lib, fn, *args):
    error = ctypes.create_string_buffer(1024)
    rc = getattr(lib, fn)(*args, error, len(error))
    assert rc == 0, f"{fn}: {error.value.decode()}"


@pytest.mark.parametrize("n", [1, 3, 4, 7, 1029, 4096 + 2])
@pytest.mark.parametrize("shift", [0, 1])
def test_relu_backward_and_accumulate(lib, n, shift):
    from unet_cuda.ops import reference as ref

    rng = np.random.default_rng(n + shift)
    y = np.maximum(rng.uniform(-1, 1, n), 0).astype(np.float32)   # exact zeros included
    dy = rng.uniform(-1, 1, n).astype(np.float32)
    gy, gdy = Guarded(np.concatenate([np.zeros(shift, np.float32), y])), \
        Guarded(np.concatenate([np.zeros(shift, np.float32), dy]))
    gdx = Guarded(shape=(n + shift,), output=True)
    ptr = lambda g: ctypes.c_void_p(g.buffer[GUARD + shift:].ctypes.data)  # noqa: E731
    plain_call(lib, "emulated_relu_backward", ptr(gy), ptr(gdy), ptr(gdx), ctypes.c_int64(n))
    np.testing.assert_array_equal(gdx.array[shift:], ref.relu_backward(y, dy))
    gdx.check_guards("relu_backward")

    dst, src = rng.uniform(-1, 1, n).astype(np.float32), rng.uniform(-1, 1, n).astype(np.float32)
    gdst = Guarded(np.concatenate([np.zeros(shift, np.float32), dst]))
    gsrc = Guarded(np.concatenate([np.zeros(shift, np.float32), src]))
    plain_call(lib, "emulated_accumulate", ptr(gdst), ptr(gsrc), ctypes.c_int64(n))
    np.testing.assert_array_equal(gdst.array[shift:], dst + src)
    assert np.isnan(gdst.buffer[:GUARD]).all() and np.isnan(gdst.buffer[-GUARD:]).all()


@pytest.mark.parametrize("shape", [(1, 1, 2, 2), (2, 3, 4, 6), (1, 5, 8, 2), (2, 7, 10, 14), (1, 3, 18, 22)],
                         ids=str)
def test_maxpool2x2(lib, shape):
    from unet_cuda.ops import reference as ref

    n, c, h, w = shape
    rng = np.random.default_rng(sum(shape))
    x = rng.integers(-3, 4, size=shape).astype(np.float32)   # ties: the first maximum must win
    gx = Guarded(x)
    y = Guarded(shape=(n, c, h // 2, w // 2), output=True)
    argmax = np.full(n * c * (h // 2) * (w // 2) + 2 * GUARD, 77, np.uint8)
    arg = argmax[GUARD:GUARD + n * c * (h // 2) * (w // 2)]
    plain_call(lib, "emulated_maxpool2x2_forward", gx.ptr, y.ptr, ctypes.c_void_p(arg.ctypes.data), n, c, h, w)
    y_ref, arg_ref = ref.maxpool2x2_forward(x)
    np.testing.assert_array_equal(y.array, y_ref)
    np.testing.assert_array_equal(arg.reshape(arg_ref.shape), arg_ref)
    assert (argmax[:GUARD] == 77).all() and (argmax[-GUARD:] == 77).all()
    y.check_guards("maxpool2x2_forward")

    dy = rng.uniform(-1, 1, y_ref.shape).astype(np.float32)
    dx = Guarded(shape=shape, output=True)
    plain_call(lib, "emulated_maxpool2x2_backward", Guarded(dy).ptr, ctypes.c_void_p(arg.ctypes.data), None,
               dx.ptr, 0, n, c, h, w)
    np.testing.assert_array_equal(dx.array, ref.maxpool2x2_backward(dy, arg_ref))
    dx.check_guards("maxpool2x2_backward")


# ------------------------------------------------------------------------------------------------
# The optimizer's two kernels (csrc/optimizer.cu): the update of many parameters in one launch per
# 32 of them gives the bits of one launch each, and both Caffe's rule in float32.
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device_rate", [False, True], ids=["lr-by-value", "lr-on-device"])
def test_sgd_multi_matches_one_launch_each(lib, device_rate):
    rng = np.random.default_rng(7 + device_rate)
    sizes = [0, 1, 5, 257, 3000] + [int(n) for n in rng.integers(1, 700, 35)]   # 40: two launches
    params = [rng.uniform(-1, 1, n).astype(np.float32) for n in sizes]
    grads = [rng.uniform(-1, 1, n).astype(np.float32) for n in sizes]
    velocities = [rng.uniform(-0.1, 0.1, n).astype(np.float32) for n in sizes]
    lr, momentum, weight_decay = np.float32(0.01), np.float32(0.99), np.float32(5e-4)
    rate = np.array([lr], np.float32)
    rate_ptr = rate.ctypes.data_as(ctypes.c_void_p) if device_rate else None
    fp = lambda a: a.ctypes.data_as(ctypes.c_void_p)  # noqa: E731

    one_p, one_v = [p.copy() for p in params], [v.copy() for v in velocities]
    for p, g, v in zip(one_p, grads, one_v):
        plain_call(lib, "emulated_sgd_momentum_update", fp(p), fp(g), fp(v), ctypes.c_int64(p.size),
                   ctypes.c_float(0.0 if device_rate else lr), rate_ptr, ctypes.c_float(momentum),
                   ctypes.c_float(weight_decay))
    multi_p, multi_v = [p.copy() for p in params], [v.copy() for v in velocities]
    table = lambda arrays: (ctypes.c_void_p * len(arrays))(*[a.ctypes.data for a in arrays])  # noqa: E731
    plain_call(lib, "emulated_sgd_momentum_update_multi", table(multi_p), table(grads), table(multi_v),
               (ctypes.c_int64 * len(sizes))(*sizes), ctypes.c_int(len(sizes)),
               ctypes.c_float(0.0 if device_rate else lr), rate_ptr, ctypes.c_float(momentum),
               ctypes.c_float(weight_decay))
    for i, n in enumerate(sizes):
        np.testing.assert_array_equal(multi_p[i], one_p[i], err_msg=f"param {i} of {n}")
        np.testing.assert_array_equal(multi_v[i], one_v[i], err_msg=f"velocity {i} of {n}")
        # Caffe's rule in float32 (the kernel may fuse a multiply-add: within a few ulps)
        v = momentum * velocities[i] + lr * (grads[i] + weight_decay * params[i])
        np.testing.assert_allclose(multi_v[i], v, rtol=1e-6, atol=1e-8)
        np.testing.assert_allclose(multi_p[i], params[i] - v, rtol=1e-6, atol=1e-7)



# ------------------------------------------------------------------------------------------------
# v7_tf32_halo and v8_bf16_halo (csrc/conv3x3_halo.cuh): the forward and backward data read each
# input window once for the nine taps, through shifted wgmma descriptors (v8: after rounding it
# into a bf16 copy). Their own paths: slices of 8 channels (v8: 16; a partial last one), 16 x 8
# output patches by 128 channels and 16 x 16 by 64 (O <= 64; partial at the right and bottom edges,
# several per image and several images), a partial column tile, K split over the slices, the
# backward data's 2-pixel zero border, a concatenation whose parts share a slice, and the ReLU
# masks. The first layer (C < 8) runs their GEMM version's kernels (v6, v5).
# ------------------------------------------------------------------------------------------------

V7 = "v7_tf32_halo"
HALO_VERSIONS = (V7, "v8_bf16_halo", "v9_fp32_halo")
HALO_GEMM_VERSION = HALO_FALLBACKS
# (N, C, H, W, O); the forward sums C channels into O, the backward data O into C.
HALO_SHAPES = [
    (1, 8, 12, 20, 16),    # one whole slice; a 10 x 18 output: two patches across, two down
    (2, 13, 19, 23, 70),   # a partial slice both ways; O = 70: one partial tile of 128 columns
    (1, 16, 30, 30, 130),  # two column tiles (128 + 2) forward, 130 channels summed backward
    (3, 9, 10, 11, 8),     # three images of one partial patch each; 8 channels out backward
    (1, 40, 11, 12, 64),   # 64 output channels: the 64-column tile, exactly full
    (1, 64, 27, 37, 72),   # patches partial in both directions, many slices
]


@pytest.mark.parametrize("version", HALO_VERSIONS)
@pytest.mark.parametrize("shape", HALO_SHAPES, ids=str)
def test_halo_forward_and_backward_data(lib, version, shape):
    n, c, h, w, o = shape
    assert lib.emulated_conv3x3_tap_major(version.encode(), c) == 0  # its own kernel, no GEMM view
    check_forward(lib, version, shape, relu=True, seed=sum(shape))
    check_forward(lib, version, shape, relu=False, seed=sum(shape) + 1)
    check_backward_data(lib, version, shape, seed=sum(shape) + 2)


# v7, v8 and v9 split K (their slices) as v4-v6 do: where the output tiles are too few for two
# waves of one block per SM (v9, two blocks per SM: one wave), with at least 512 of K a split.
# (1, 256, 9, 9, 40): one tile, 2304 of K -> 4 splits (the backward data sums 40 channels: 360 of
# K, no split); b2 at batch 1 (28 x 28 outputs of 1024 channels from 1024): 8 patches x 8 column
# tiles = 64 blocks -> 4 splits (256 blocks, two waves of 132; for v9 one wave of 264).
@pytest.mark.parametrize("version", HALO_VERSIONS)
def test_halo_split_plans(lib, version):
    v = version.encode()
    assert lib.emulated_conv3x3_forward_splits(v, 1, 256, 9, 9, 40) == 4
    assert lib.emulated_conv3x3_backward_data_splits(v, 1, 256, 9, 9, 40) == 1
    assert lib.emulated_conv3x3_forward_splits(v, 1, 1024, 30, 30, 1024) == 4
    assert lib.emulated_conv3x3_backward_data_splits(v, 1, 1024, 30, 30, 1024) == 4
    # d1b (568 x 568 outputs of 64 channels): 1296 patches, no split; the first layer (C = 1)
    # is the GEMM version's, by its plan
    assert lib.emulated_conv3x3_forward_splits(v, 1, 64, 570, 570, 64) == 1
    gemm = HALO_GEMM_VERSION[version].encode()
    assert (lib.emulated_conv3x3_forward_splits(v, 1, 1, 572, 572, 64)
            == lib.emulated_conv3x3_forward_splits(gemm, 1, 1, 572, 572, 64))
    check_forward(lib, version, (1, 256, 9, 9, 40), relu=True, seed=11)
    check_backward_data(lib, version, (1, 40, 9, 9, 256), seed=12)  # 2304 of K backward: split
    # 80 x 160 outputs of 128 channels: 100 tiles of 16 x 8 by 128. v7 and v8 hold one block per
    # SM and split K in 3 (300 blocks); v9 holds two, 264 at once, and splits in 2 (200).
    assert lib.emulated_conv3x3_forward_splits(v, 1, 256, 82, 162, 128) == (2 if version == "v9_fp32_halo" else 3)


@pytest.mark.parametrize("shape", [
    (1, 5, 6, 12, 10, 16, 14, 20),     # 11 channels: the first slice holds up's 5 and skip's
    (2, 16, 16, 14, 14, 18, 20, 70),   # crop offsets (2, 3); both parts whole slices
    (1, 4, 60, 8, 9, 12, 11, 130),     # a split K (64 channels into 130: 8 slices; 130 back: 17)
], ids=str)
@pytest.mark.parametrize("version", HALO_VERSIONS)
def test_halo_concat(lib, version, shape):
    check_concat(lib, version, shape)


@pytest.mark.parametrize("version", HALO_VERSIONS)
def test_halo_concat_without_up_channels_reads_skip_alone(lib, version):
    """Cu = 0 with up passed as a null pointer (an empty array's): skip becomes the only source, and
    no copy takes null for its stand-in address (the emulated cp.async refuses one)."""
    from unet_cuda.ops import reference as ref

    n, cu, cs, h, w, hs, ws, o = 1, 0, 9, 6, 7, 10, 9, 12
    up, skip, wt, b, dy = _concat_inputs(np.random.default_rng(21), n, cu, cs, h, w, hs, ws, o)
    y = Guarded(shape=(n, o, h - 2, w - 2), output=True)
    call(lib, "emulated_conv3x3_concat_forward", version, None, Guarded(skip).ptr, Guarded(wt).ptr,
         Guarded(b).ptr, y.ptr, n, cu, cs, h, w, hs, ws, o, 1)
    y.check_guards("conv3x3_concat_forward")
    check_conv3x3(y.array, ref.conv3x3_concat_forward(f64(up), f64(skip), f64(wt), f64(b), relu=True),
                  version, "conv3x3_concat_forward without up", k=9 * cs, a_max=amax(skip), b_max=amax(wt))


# v9_fp32_halo's own weight gradient (ffma_weight_block): K is the patches of 4 x 16 output pixels
# of all images, each staging dy and the x window it reads once; 128 output channels by 16 input
# channels a block, or 64 by 32 where O <= 64; the patches split over blockIdx.z. (Its concatenated
# input: test_halo_concat above; C < 8: v3's kernels, test_every_direction.)
V9 = "v9_fp32_halo"
V9_WEIGHT_SHAPES = [
    (1, 8, 12, 20, 16),    # 10 x 18 outputs: 3 patch rows (the last of 2 rows), 2 patch columns (16 + 2)
    (2, 13, 19, 23, 70),   # a partial input-channel tile (13 of 16); O = 70: the wide tile, partial
    (1, 40, 11, 12, 64),   # the 64 x 32 tile: two input-channel tiles, the second of 8
    (3, 9, 10, 11, 130),   # three images of one partial patch; two output tiles (128 + 2)
    (1, 8, 66, 66, 16),    # 64 patches: K split in 4
    (3, 20, 30, 34, 130),  # 2 x 2 tiles, 42 patches split in 2 (21 each: the boundary inside image 1)
]


@pytest.mark.parametrize("shape", V9_WEIGHT_SHAPES, ids=str)
def test_v9_weight_gradient(lib, shape):
    assert lib.emulated_conv3x3_backward_weight_tile_columns(V9.encode(), *shape) == 0  # no GEMM
    check_backward_weight(lib, V9, shape, seed=sum(shape))


def test_v9_weight_gradient_plans(lib):
    def splits(version, shape):
        return lib.emulated_conv3x3_backward_weight_splits(version.encode(), *shape)

    assert splits(V9, (1, 8, 66, 66, 16)) == 4         # one tile, 64 patches of 64 pixels: 4096 / 1024
    assert splits(V9, (1, 64, 570, 570, 64)) == 128    # d1b: two tiles of 64 x 32, the cap of 128
    assert splits(V9, (1, 1024, 30, 30, 1024)) == 1    # b2: 8 x 64 tiles
    assert splits(V9, (1, 1, 572, 572, 64)) == splits("v3_igemm", (1, 1, 572, 572, 64))  # C = 1: v3's
    assert splits(V9, (3, 20, 30, 34, 130)) == 2
    # (Same bits from run to run: the emulation runs its threads in one order, so only a GPU can
    # show it; tests/test_cuda_ops.py checks every version's weight gradient there.)


def test_v9_weight_gradient_multiplies_only_real_pixels(lib):
    """A patch's pixels past dy's edge (its 4 x 16 pixels cover 3 x 3 outputs here) are not
    multiplied: an Inf of x that only they would read leaves the other taps finite, as in the
    reference (0 * Inf would be NaN)."""
    from unet_cuda.ops import reference as ref

    x, _, _, _ = make_inputs(np.random.default_rng(4), 1, 8, 5, 5, 2)
    x[0, 0, 0, 4] = np.inf                      # read by output (0, 2) only, through tap (0, 2)
    dy = np.ones((1, 2, 3, 3), np.float32)
    dw, _ = run_backward_weight(lib, V9, x, dy)
    want, _ = ref.conv3x3_backward_weight(x, dy)
    inf = np.zeros(want.shape, bool)
    inf[:, 0, 0, 2] = True
    assert np.isinf(want[inf]).all() and np.isfinite(want[~inf]).all()
    np.testing.assert_array_equal(np.isinf(dw), inf)
    np.testing.assert_allclose(dw[~inf], want[~inf], rtol=1e-5, atol=1e-5)


def test_v9_concat_weight_gradient_without_up_channels(lib):
    """Cu = 0 with a null up pointer: skip alone is the weight gradient's source (its window's
    stand-in address is then skip's)."""
    from unet_cuda.ops import reference as ref

    n, cu, cs, h, w, hs, ws, o = 1, 0, 9, 6, 7, 10, 9, 12
    up, skip, _, _, dy = _concat_inputs(np.random.default_rng(22), n, cu, cs, h, w, hs, ws, o)
    dw, db = Guarded(shape=(o, cs, 3, 3), output=True), Guarded(shape=(o,), output=True)
    call(lib, "emulated_conv3x3_concat_backward_weight", V9, None, Guarded(skip).ptr, Guarded(dy).ptr,
         dw.ptr, db.ptr, n, cu, cs, h, w, hs, ws, o)
    dw.check_guards("conv3x3_concat_backward_weight dw")
    want, _ = ref.conv3x3_concat_backward_weight(f64(up), f64(skip), f64(dy))
    check_conv3x3(dw.array, want, V9, "conv3x3_concat_backward_weight without up", k=(h - 2) * (w - 2),
                  a_max=amax(dy), b_max=amax(skip))


# ------------------------------------------------------------------------------------------------
# The ReLU's backward fused into the backward-data ops (relu_mask): the gradient of an input that is
# a ReLU's output comes out already masked. Same kernel, same sums: the masked result must have the
# bits of relu_backward(mask, unmasked result), for every version and path (split K, tap-major).
# ------------------------------------------------------------------------------------------------

def relu_backward_of(mask, dx):
    from unet_cuda.ops import reference as ref

    return ref.relu_backward(mask, dx)


MASKED_SHAPES = [(2, 3, 5, 7, 5), (1, 30, 14, 13, 33), (1, 32, 20, 21, 70),
                 (1, 120, 6, 7, 120),  # K split
                 (1, 32, 5, 6, 128)]   # tap-major (v4-v6), K split


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("shape", MASKED_SHAPES, ids=str)
def test_relu_mask_in_backward_data(lib, version, shape):
    rng = np.random.default_rng(sum(shape) + 7)
    n, c, h, w, o = shape
    _, wt, _, dy = make_inputs(rng, *shape)
    mask = relu_mask_like(rng, (n, c, h, w))
    plain = run_backward_data(lib, version, dy, wt)
    masked = run_backward_data(lib, version, dy, wt, relu_mask=mask)
    assert_same_bits(masked, relu_backward_of(mask, plain), f"conv3x3_backward_data{list(shape)} {version}")


@pytest.mark.parametrize("version", CONCAT_VERSIONS)
@pytest.mark.parametrize("shape", [CONCAT_SHAPES[0], CONCAT_SHAPES[6], CONCAT_SHAPES[8]], ids=str)
def test_relu_mask_in_concat_backward_data(lib, version, shape):
    n, cu, cs, h, w, hs, ws, o = shape
    rng = np.random.default_rng(sum(shape) + 8)
    up, skip, wt, _, dy = _concat_inputs(rng, *shape)
    up_mask, skip_mask = relu_mask_like(rng, up.shape), relu_mask_like(rng, skip.shape)

    def run(masks):
        dup, dskip = Guarded(shape=up.shape, output=True), Guarded(shape=skip.shape, output=True)
        call(lib, "emulated_conv3x3_concat_backward_data", version, Guarded(dy).ptr, Guarded(wt).ptr,
             *(mask_ptr(m) for m in masks), dup.ptr, dskip.ptr, n, cu, cs, h, w, hs, ws, o)
        dup.check_guards("dup")
        dskip.check_guards("dskip")
        return dup.array.copy(), dskip.array.copy()

    plain_up, plain_skip = run((None, None))
    masked_up, masked_skip = run((up_mask, skip_mask))
    assert_same_bits(masked_up, relu_backward_of(up_mask, plain_up), f"dup {shape} {version}")
    assert_same_bits(masked_skip, relu_backward_of(skip_mask, plain_skip), f"dskip {shape} {version}")
    only_skip_up, only_skip_skip = run((None, skip_mask))  # one mask alone
    assert_same_bits(only_skip_up, plain_up, f"dup, no mask {shape} {version}")
    assert_same_bits(only_skip_skip, masked_skip, f"dskip, its mask alone {shape} {version}")


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("shape", [(2, 3, 5, 7, 5), (1, 9, 7, 5, 40), (1, 1100, 2, 3, 3)], ids=str)
def test_relu_mask_in_upconv2x2_backward_data(lib, version, shape):
    n, c, h, w, o = shape
    rng = np.random.default_rng(sum(shape) + 9)
    _, wt, _, dy = upconv_inputs(rng, *shape)
    mask = relu_mask_like(rng, (n, c, h, w))

    def run(relu_mask):
        dx = Guarded(shape=(n, c, h, w), output=True)
        call(lib, "emulated_upconv2x2_backward_data", version, Guarded(dy).ptr, Guarded(wt).ptr,
             mask_ptr(relu_mask), dx.ptr, n, c, h, w, o)
        dx.check_guards("upconv2x2_backward_data")
        return dx.array.copy()

    assert_same_bits(run(mask), relu_backward_of(mask, run(None)), f"upconv2x2_backward_data{list(shape)} {version}")


@pytest.mark.parametrize("shape", [(2, 7, 5, 9, 2), (1, 5, 3, 4, 8), (2, 4, 3, 5, 9)], ids=str)
def test_relu_mask_in_conv1x1_backward_data(lib, shape):
    """O <= 8 (one thread per pixel) and O = 9 (one thread per element)."""
    n, c, h, w, o = shape
    rng = np.random.default_rng(sum(shape) + 10)
    wt = rng.uniform(-1.0, 1.0, (o, c, 1, 1)).astype(np.float32)
    dy = rng.uniform(-1.0, 1.0, (n, o, h, w)).astype(np.float32)
    mask = relu_mask_like(rng, (n, c, h, w))

    def run(relu_mask):
        dx = Guarded(shape=(n, c, h, w), output=True)
        plain_call(lib, "emulated_conv1x1_backward_data", Guarded(dy).ptr, Guarded(wt).ptr,
                   mask_ptr(relu_mask), dx.ptr, n, c, h, w, o)
        dx.check_guards("conv1x1_backward_data")
        return dx.array.copy()

    assert_same_bits(run(mask), relu_backward_of(mask, run(None)), f"conv1x1_backward_data{list(shape)}")


def test_relu_mask_in_maxpool2x2_backward(lib):
    """Masked by the pool's output y, the gradient has the bits of relu_backward(x, unmasked dx)
    where x is a ReLU's output (here with ties, zeros and a NaN)."""
    from unet_cuda.ops import reference as ref

    rng = np.random.default_rng(12)
    shape = n, c, h, w = (2, 3, 10, 14)
    x = np.maximum(rng.integers(-2, 3, size=shape), 0).astype(np.float32)
    x[0, 0, 0, 0] = np.nan
    y, arg = ref.maxpool2x2_forward(x)
    dy = rng.uniform(-1, 1, y.shape).astype(np.float32)
    argmax = np.ascontiguousarray(arg, np.uint8)

    def run(relu_mask):
        dx = Guarded(shape=shape, output=True)
        plain_call(lib, "emulated_maxpool2x2_backward", Guarded(dy).ptr, ctypes.c_void_p(argmax.ctypes.data),
                   mask_ptr(relu_mask), dx.ptr, 0, n, c, h, w)
        dx.check_guards("maxpool2x2_backward")
        return dx.array.copy()

    masked = run(y)
    assert_same_bits(masked, relu_backward_of(x, run(None)), "maxpool2x2_backward masked by y")
    assert_same_bits(masked, ref.maxpool2x2_backward(dy, arg, relu_mask=y), "against the reference")


@pytest.mark.parametrize("masked", [False, True])
def test_maxpool2x2_backward_accumulates(lib, masked):
    """Accumulating into a gradient already there (a skip map's, begun by the concatenation's
    backward): the bits of accumulate_(dst, the gradient), -0 in dst included."""
    from unet_cuda.ops import reference as ref

    rng = np.random.default_rng(13)
    shape = n, c, h, w = (2, 3, 10, 14)
    x = np.maximum(rng.integers(-2, 3, size=shape), 0).astype(np.float32)
    y, arg = ref.maxpool2x2_forward(x)
    dy = rng.uniform(-1, 1, y.shape).astype(np.float32)
    start = rng.uniform(-1, 1, shape).astype(np.float32)
    start[0, 0, 0, :4] = -0.0
    argmax = np.ascontiguousarray(arg, np.uint8)
    dst = Guarded(start, output=True)
    dst.buffer[:GUARD] = dst.buffer[-GUARD:] = OUTPUT_GUARD_VALUE
    mask = y if masked else None
    plain_call(lib, "emulated_maxpool2x2_backward", Guarded(dy).ptr, ctypes.c_void_p(argmax.ctypes.data),
               mask_ptr(mask), dst.ptr, 1, n, c, h, w)
    dst.check_guards("maxpool2x2_backward accumulate")
    want = ref.accumulate_(start.copy(), ref.maxpool2x2_backward(dy, arg, relu_mask=mask))
    assert_same_bits(dst.array, want, "accumulated")
    assert_same_bits(want, ref.maxpool2x2_backward(dy, arg, relu_mask=mask, accumulate_into=start.copy()),
                     "the reference's own accumulate_into")


# ------------------------------------------------------------------------------------------------
# Plans by measurement (csrc/launchers.h, "Plans measured instead of ruled"): every plan a version
# offers a GEMM computes the same convolution; autotuning times them all and keeps one.
# ------------------------------------------------------------------------------------------------

def tuned_table(lib):
    """The table of measured plans: {(op, version, M, cols, K, images): entry}."""
    text = ctypes.create_string_buffer(1 << 16)
    needed = lib.emulated_tuned_gemm_plans(text, len(text))
    assert needed <= len(text), "the table's text was cut"
    table = {}
    for line in text.value.decode().splitlines():
        op, version, *numbers = line.split()
        m, cols, k, images, bm, bn, splits, rule_bm, rule_bn, rule_splits, candidates, uses = map(int, numbers)
        table[(op, version, m, cols, k, images)] = {
            "plan": (bm, bn, splits), "rule": (rule_bm, rule_bn, rule_splits), "candidates": candidates,
            "uses": uses}
    return table


def _plan_key_args(key):
    op, version, m, cols, k, images = key
    return [op.encode(), version.encode(), ctypes.c_int64(m), ctypes.c_int64(cols), ctypes.c_int64(k),
            ctypes.c_int64(images)]


def plan_candidates(lib, key):
    """Every plan of the key, the rule's first; or the error, raised as ValueError."""
    most = 1024
    plans = (ctypes.c_int * (3 * most))()
    error = ctypes.create_string_buffer(1024)
    count = lib.emulated_gemm_plan_candidates(*_plan_key_args(key), plans, most, error, len(error))
    if count < 0:
        raise ValueError(error.value.decode())
    assert count <= most
    return [tuple(plans[3 * i:3 * i + 3]) for i in range(count)]


def set_plan(lib, key, plan):
    error = ctypes.create_string_buffer(1024)
    if lib.emulated_set_tuned_gemm_plan(*_plan_key_args(key), *plan, error, len(error)) != 0:
        raise ValueError(error.value.decode())


@pytest.fixture()
def plans(lib):
    """A clean table with autotuning off, before and after the test."""
    lib.emulated_set_gemm_autotune(0)
    lib.emulated_clear_tuned_gemm_plans()
    yield lib
    lib.emulated_set_gemm_autotune(0)
    lib.emulated_clear_tuned_gemm_plans()


# Each case runs and checks some ops against the reference at shapes where the versions offer
# several tiles and split counts: K of 1152 (two slices of 512 or more) for the forward and
# backward data, 2 x 1056 pixels for the weight gradient; the up-convolution's weight gradient
# has 4O = 256 columns (v6's 128 x 256 tile). The "rows" cases have more than 128 rows and 64
# columns: v6's 256-row tiles, 256 x 128 among them (offered to measurement only); the concatenated
# input's forward and backward data split K in two (576 and 648 k).
PLAN_CASES = [
    ("conv3x3_forward", lambda lib, v: check_forward(lib, v, (1, 128, 6, 7, 8))),
    ("conv3x3_backward_data", lambda lib, v: check_backward_data(lib, v, (1, 8, 6, 7, 128))),
    ("conv3x3_backward_weight", lambda lib, v: check_backward_weight(lib, v, (2, 8, 34, 35, 8))),
    ("upconv2x2", lambda lib, v: check_upconv(lib, v, (1, 64, 8, 8, 64))),
    ("conv3x3_forward_rows", lambda lib, v: check_forward(lib, v, (1, 128, 14, 13, 72))),
    ("conv3x3_backward_data_rows", lambda lib, v: check_backward_data(lib, v, (1, 72, 12, 14, 128))),
    ("conv3x3_concat_rows", lambda lib, v: check_concat(lib, v, (1, 32, 32, 13, 15, 15, 17, 72))),
    # the first layer's K = 9: one partial K tile, in the 256-row tiles too
    ("conv3x3_forward_k9_rows", lambda lib, v: check_forward(lib, v, (1, 1, 14, 13, 72))),
]
V6_ONLY_PLAN_CASES = ("conv3x3_forward_rows", "conv3x3_backward_data_rows", "conv3x3_concat_rows",
                      "conv3x3_forward_k9_rows")


@pytest.mark.parametrize("version", GEMM_VERSIONS)
@pytest.mark.parametrize("case", PLAN_CASES, ids=lambda c: c[0])
def test_every_plan_computes_the_convolution(plans, version, case):
    name, run = case
    if (name in V6_ONLY_PLAN_CASES and version != "v6_tf32_wgmma") or (
            name == "upconv2x2" and version in ("v3_igemm", "v5_bf16_mma")):
        pytest.skip("the same tiles and plans as the plain convolution's, checked there")
    if version == "v5_bf16_mma" and name != "conv3x3_forward":
        pytest.skip("v4's tiles and plans, checked with v4; v5's kernels on its forward")
    lib = plans
    # Autotuned: every plan of every GEMM of the case is timed, one kept per GEMM, and the results
    # (those of the plans kept) are right.
    lib.emulated_set_gemm_autotune(1)
    run(lib, version)
    lib.emulated_set_gemm_autotune(0)
    table = tuned_table(lib)
    assert table, f"{name}: autotuning entered no plan"
    several = 0
    for key, entry in table.items():
        assert key[1] == version, key
        assert entry["uses"] == 1, f"{key}: the tuned plan ran {entry['uses']} times from the table"
        candidates = plan_candidates(lib, key)
        assert len(set(candidates)) == len(candidates), f"{key}: a plan offered twice: {candidates}"
        assert entry["rule"] == candidates[0], key
        assert entry["candidates"] == len(candidates), f"{key}: {entry['candidates']} of {len(candidates)} timed"
        assert entry["plan"] in candidates, key
        several += len(candidates) > 1
    assert several, f"{name}: no GEMM with more than one plan; the case tests nothing"
    if name.endswith("_rows"):
        assert any((256, 128) in {p[:2] for p in plan_candidates(lib, key)} for key in table), name
    # Each plan set by hand: the same convolution, within the version's tolerance.
    for key in table:
        for plan in plan_candidates(lib, key):
            lib.emulated_clear_tuned_gemm_plans()
            set_plan(lib, key, plan)
            assert tuned_table(lib)[key]["plan"] == plan and tuned_table(lib)[key]["uses"] == 0
            try:
                run(lib, version)
            except AssertionError as exc:
                raise AssertionError(f"plan {plan} of {key}: {exc}") from None
            assert tuned_table(lib)[key]["uses"] == 1, f"{key}: the plan set was not the one that ran"


def test_plan_candidates_and_rules(plans):
    lib = plans
    v6 = "v6_tf32_wgmma"
    # d4b's forward (62 x 62 outputs, 512 channels, K = 9 x 512): the rule's plan first, as the
    # planner's split count says; v6's four output tiles; never more slices than K / 256.
    key = ("conv3x3_forward", v6, 62 * 62, 512, 9 * 512, 1)
    candidates = plan_candidates(lib, key)
    rule = candidates[0]
    assert rule[:2] == (128, 128)
    assert rule[2] == lib.emulated_conv3x3_forward_splits(v6.encode(), 1, 512, 64, 64, 512)
    assert {plan[:2] for plan in candidates} == {(128, 128), (128, 64), (256, 64), (256, 128)}
    assert max(plan[2] for plan in candidates) == 16  # of the ladder, the last within 9 * 512 / 256
    assert (128, 128, 1) in candidates and len(set(candidates)) == len(candidates)
    # d1b's weight gradient: the 64 x 192 tile and its wave-balanced 88 slices by rule.
    key = ("conv3x3_backward_weight", v6, 64, 9 * 64, 568 * 568, 1)
    candidates = plan_candidates(lib, key)
    assert candidates[0] == (64, 192, lib.emulated_conv3x3_backward_weight_splits(v6.encode(), 1, 64, 570, 570, 64))
    assert candidates[0] == (64, 192, 88)
    assert {plan[:2] for plan in candidates} == {(128, 128), (128, 64), (64, 192)}
    # up2's weight gradient (1024 x 2048 outputs over 28 x 28 pixels): by rule the wide tile, one
    # slice (64 blocks); measured plans may split its 784 pixels in three.
    key = ("upconv2x2_backward_weight", v6, 1024, 2048, 28 * 28, 1)
    candidates = plan_candidates(lib, key)
    assert candidates[0] == (128, 256, 1)
    assert {p[2] for p in candidates} == {1, 2, 3}
    # An up-convolution's weight gradient with 4O = 256 columns: v6's wide tile among its plans;
    # v4's two tiles.
    assert (128, 256) in {p[:2] for p in plan_candidates(lib, ("upconv2x2_backward_weight", v6, 64, 256, 4096, 1))}
    assert {p[:2] for p in plan_candidates(lib, ("conv3x3_forward", "v4_tf32_mma", 3844, 512, 4608, 1))} == {
        (128, 128), (64, 64)}


def test_plans_refused_by_name(plans):
    lib = plans
    key = ("conv3x3_forward", "v6_tf32_wgmma", 20, 8, 1152, 1)
    with pytest.raises(ValueError, match=r"96 x 128 in 1 slices is not one of its plans.*128x128/1"):
        set_plan(lib, key, (96, 128, 1))
    with pytest.raises(ValueError, match="not one of its plans"):
        set_plan(lib, key, (128, 128, 6))  # K = 1152 allows four slices of 256 at most
    with pytest.raises(ValueError, match="no op conv3x3_sideways has GEMM plans"):
        plan_candidates(lib, ("conv3x3_sideways",) + key[1:])
    with pytest.raises(ValueError, match="v1_direct runs no GEMM"):
        plan_candidates(lib, (key[0], "v1_direct") + key[2:])
    with pytest.raises(ValueError, match="images = 1"):
        plan_candidates(lib, key[:5] + (2,))
    with pytest.raises(ValueError, match="needs M, cols, K >= 1"):
        plan_candidates(lib, (key[0], key[1], 0) + key[3:])
    assert tuned_table(lib) == {}
    set_plan(lib, key, (128, 64, 2))
    assert tuned_table(lib) == {key: {"plan": (128, 64, 2), "rule": plan_candidates(lib, key)[0], "candidates": 0,
                                      "uses": 0}}
    lib.emulated_clear_tuned_gemm_plans()
    assert tuned_table(lib) == {}
