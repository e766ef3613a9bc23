"""Shared by the CPU-emulated and the GPU tests of the ReLU masks (``relu_mask`` of the
backward-data ops): mask values of every kind, and a comparison of float32 results bit for bit."""

from __future__ import annotations

import numpy as np


def relu_mask_like(rng, shape):
    """Mask values of every kind: positive (passed), +0 and -0 (a ReLU's zeros), negative and NaN
    (which relu_backward's `> 0` also stops)."""
    values = np.array([0.5, 1.0, 0.0, -0.0, -1.0, np.nan], np.float32)
    return rng.choice(values, size=shape, p=[0.3, 0.2, 0.2, 0.1, 0.1, 0.1]).astype(np.float32)


def _host(a):
    return a.get() if hasattr(a, "get") and not isinstance(a, np.ndarray) else a  # CuPy -> NumPy


def assert_same_bits(got, want, what):
    """``got`` and ``want`` (NumPy or CuPy) are the same float32 values bit for bit (-0 and NaN too)."""
    got = np.ascontiguousarray(_host(got), np.float32)
    want = np.ascontiguousarray(_host(want), np.float32)
    assert got.shape == want.shape, f"{what}: shape {got.shape}, expected {want.shape}"
    differ = got.view(np.uint32) != want.view(np.uint32)
    assert not differ.any(), f"{what}: {int(differ.sum())} of {got.size} elements differ in their bits"
