"""The augmentation kernel's arithmetic on the CPU: csrc/warp.cu's per-pixel function, built as host
code by nvcc (tests/warp_host_entry.cu), against the NumPy reference with the GPU test's cases and
tolerances (tests/warp_checks.py). It checks the float32 math, the index mapping of the turns and
flips, the mirror and the tie rule without a GPU; what it cannot check is the launch itself (grid,
guards, device memory), which tests/test_cuda_ops.py and bench/sanitizer_driver.py cover on a GPU.
Skipped where no nvcc is installed."""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from warp_checks import WARP_CASES, WARP_GEOMETRIES, check_case, output_frame

ROOT = Path(__file__).resolve().parents[1]


def find_nvcc() -> str | None:
    candidates = [os.environ.get("CUDACXX"), shutil.which("nvcc"),
                  os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc") if os.environ.get("CUDA_HOME") else None,
                  "/usr/local/cuda/bin/nvcc"]
    return next((c for c in candidates if c and os.path.isfile(c) and os.access(c, os.X_OK)), None)


@pytest.fixture(scope="module")
def host_warp(tmp_path_factory):
    nvcc = find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found: the CPU build of csrc/warp.cu needs the CUDA compiler")
    library = tmp_path_factory.mktemp("warp_host") / "libwarp_host.so"
    command = [nvcc, "-std=c++17", "-O2", "-shared", "-Xcompiler", "-fPIC", "-I", str(ROOT / "csrc"),
               str(ROOT / "tests" / "warp_host_entry.cu"), "-o", str(library)]
    built = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, f"{' '.join(command)}\n{built.stdout}\n{built.stderr}"
    lib = ctypes.CDLL(str(library))
    pointer = ctypes.c_void_p
    lib.augment_warp_host.argtypes = [pointer] * 7 + [ctypes.c_int] * 7 + [ctypes.c_double] * 3
    lib.augment_warp_host.restype = None

    def run(image, labels, weights, coarse, quarter_turns=0, flip_rows=False, flip_columns=False,
            gamma=1.0, contrast=1.0, brightness=0.0):
        inputs = [np.ascontiguousarray(a, dtype=t) for a, t in
                  zip((image, labels, weights, coarse), (np.float32, np.int32, np.float32, np.float32))]
        h, w = inputs[0].shape
        # Poisoned outputs: a pixel the loop forgot shows.
        outputs = [np.full((h, w), np.nan, np.float32), np.full((h, w), -(2**31), np.int32),
                   np.full((h, w), np.nan, np.float32)]
        lib.augment_warp_host(*(a.ctypes.data for a in inputs), *(a.ctypes.data for a in outputs), h, w,
                              inputs[3].shape[1], inputs[3].shape[2], int(quarter_turns), int(flip_rows),
                              int(flip_columns), float(gamma), float(contrast), float(brightness))
        return outputs

    return run


@pytest.mark.parametrize("h,w,grid,sigma", WARP_CASES)
def test_kernel_arithmetic_against_the_reference(host_warp, h, w, grid, sigma):
    check_case(host_warp, h, w, grid, sigma)


@pytest.mark.parametrize("turns,flip_rows,flip_columns", WARP_GEOMETRIES)
def test_kernel_arithmetic_without_displacement_is_exact(host_warp, turns, flip_rows, flip_columns):
    rng = np.random.default_rng(3)
    image = rng.uniform(0.0, 1.0, (9, 9)).astype(np.float32)
    labels = rng.integers(-5, 5, (9, 9)).astype(np.int32)
    weights = rng.uniform(1.0, 11.0, (9, 9)).astype(np.float32)
    got = host_warp(image, labels, weights, np.zeros((2, 3, 3)), turns, flip_rows, flip_columns)
    for out, source in zip(got, (image, labels, weights)):
        np.testing.assert_array_equal(out, output_frame(source, turns, flip_rows, flip_columns))


def test_kernel_arithmetic_reads_nothing_outside_for_non_finite_nodes(host_warp):
    rng = np.random.default_rng(5)
    labels = rng.integers(0, 4, (11, 11)).astype(np.int32)
    image, weights = np.zeros((11, 11), np.float32), np.ones((11, 11), np.float32)
    for bad in (np.nan, np.inf, -np.inf, 3e38):
        coarse = np.full((2, 3, 3), bad, np.float32)
        got = host_warp(image, labels, weights, coarse, 1, True, False)
        assert set(np.unique(got[1])) <= set(np.unique(labels))


@pytest.mark.parametrize("dy,dx", [(0.5, -0.5), (-1.5, 2.5), (0.25, 0.75)])
def test_kernel_arithmetic_rounds_exact_ties_up(host_warp, dy, dx):
    # A one-node grid gives the shift exactly, so t = 1/2 really occurs: floor(s + 1/2) takes base + 1.
    from unet_cuda.ops import reference as ref

    rng = np.random.default_rng(6)
    labels = rng.integers(0, 1000, (7, 9)).astype(np.int32)
    image, weights = rng.uniform(0, 1, (7, 9)).astype(np.float32), rng.uniform(1, 11, (7, 9)).astype(np.float32)
    coarse = np.array([[[dy]], [[dx]]], np.float32)
    got = host_warp(image, labels, weights, coarse)
    want = ref.augment_warp(image, labels, weights, coarse)
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_allclose(got[0], want[0], rtol=0, atol=1e-6)
    np.testing.assert_allclose(got[2], want[2], rtol=0, atol=1e-5)
