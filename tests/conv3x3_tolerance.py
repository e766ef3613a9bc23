"""How close each kernel version of the 3x3 convolution must come to the float64 NumPy reference
(docs/CONV3X3.md, "Precision"). Shared by the GPU tests (test_cuda_ops.py) and the CPU emulation
of the kernels (test_conv3x3_emulated.py).

* FP32 versions (v1_direct, v2_smem, v3_igemm): ``|got - ref| <= 2e-5 * (max |ref| + |ref|)``
  elementwise, the tolerance of every float32 sum of products in this project.
* TF32 (v4_tf32_mma): the tensor cores round both operands to a 10-bit mantissa (unit roundoff
  ``u = 2**-11``), multiply exactly and add in float32. A product is then off by up to about
  ``2u`` of its size, and K of them with independent signs add up to about
  ``2u * sqrt(K) * max|A| * max|B|``. Two checks: ``||got - ref|| / ||ref|| <= 5e-3`` and
  ``max |got - ref| <= 8u * sqrt(K) * max|A| * max|B|`` (several standard deviations of that sum).
* bf16 (v5_bf16_mma, v8_bf16_halo): the same reasoning with bf16's 7-bit mantissa (``u = 2**-8``, rounded to
  nearest even): ``||got - ref|| / ||ref|| <= 2e-2`` and the same max bound with that ``u``.
* TF32 by truncation (v6_tf32_wgmma and v7_tf32_halo: Hopper's wgmma reads the upper 19 bits of each float32, no
  rounding): an operand is off by up to ``2**-10`` of its size, so ``u = 2**-10`` and a relative L2
  bound of ``1e-2``.

The relative L2 bound is a statistic over many outputs: it applies from ``MIN_L2_ELEMENTS`` outputs
on. Below that a single sum that cancels to a small value dominates it (one bf16 output of K = 9
was seen 2.04e-2 off relatively, within a tenth of the max bound), and the max bound alone applies.

Outputs must be NaN exactly where the reference is (a NaN anywhere else is an element the kernel
failed to write: the callers poison outputs with NaN first). The errors are printed before any
assertion (pytest shows them on failure, or with ``-s``).
"""

from __future__ import annotations

import math

import numpy as np

TF32_VERSIONS = frozenset({"v4_tf32_mma", "v6_tf32_wgmma", "v7_tf32_halo"})
TRUNCATING_VERSIONS = frozenset({"v6_tf32_wgmma", "v7_tf32_halo"})  # TF32 by truncation, not rounding
BF16_VERSIONS = frozenset({"v5_bf16_mma", "v8_bf16_halo"})
FP32_REL = 2e-5
MIN_L2_ELEMENTS = 64
# Per reduced precision: (relative L2 bound, unit roundoff of the operands).
REDUCED = {"tf32": (5e-3, 2.0 ** -11), "bf16": (2e-2, 2.0 ** -8), "tf32-truncated": (1e-2, 2.0 ** -10)}
TF32_REL_L2, TF32_UNIT = REDUCED["tf32"]


def precision(version: str) -> str:
    """``"fp32"``, ``"tf32"`` or ``"bf16"``: what ``version`` computes in."""
    if version in TF32_VERSIONS:
        return "tf32"
    return "bf16" if version in BF16_VERSIONS else "fp32"


def _peak(a: np.ndarray) -> float:
    finite = np.abs(a[np.isfinite(a)])
    return float(finite.max()) if finite.size else 0.0


def check_conv3x3(got, want, version: str, name: str, *, k: int, a_max: float, b_max: float) -> dict:
    """Asserts that ``got`` (a kernel's output) matches ``want`` (the float64 reference) within the
    tolerance of ``version``. ``k`` is the length of the sums (9C forward, 9O backward data, N*P*Q
    backward weight); ``a_max`` and ``b_max`` bound the absolute values of the two operands."""
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, f"{name}: shape {got.shape}, reference {want.shape}"
    nan_want, nan_got = np.isnan(want), np.isnan(got)
    err = np.where(nan_want, 0.0, np.abs(got - want))
    max_abs = float(err.max()) if err.size else 0.0
    ref_norm = float(np.linalg.norm(np.where(nan_want, 0.0, want)))
    rel_l2 = float(np.linalg.norm(np.where(nan_got | nan_want, 0.0, err))) / ref_norm if ref_norm else 0.0
    peak = _peak(want)
    stats = {"max_abs": max_abs, "rel_l2": rel_l2, "max_ref": peak}
    mode = "tf32-truncated" if version in TRUNCATING_VERSIONS else precision(version)
    if mode in REDUCED:
        rel_bound, unit = REDUCED[mode]
        bound = 8.0 * unit * math.sqrt(max(k, 1)) * a_max * b_max
        print(f"{name} [{version}, {mode}]: max abs err {max_abs:.3e} (bound {bound:.3e}), "
              f"rel L2 err {rel_l2:.3e} (bound {rel_bound:.0e}), max |ref| {peak:.3e}, K {k}")
    else:
        print(f"{name} [{version}, fp32]: max abs err {max_abs:.3e}, rel L2 err {rel_l2:.3e}, "
              f"max |ref| {peak:.3e} (tolerance {FP32_REL:.0e} x (max |ref| + |ref|))")
    wrong_nan = nan_want != nan_got
    assert not wrong_nan.any(), (f"{name} [{version}]: {int(wrong_nan.sum())} elements NaN in one and not "
                                 f"the other, first at {np.argwhere(wrong_nan)[0].tolist()}")
    if mode in REDUCED:
        if np.count_nonzero(~nan_want) >= MIN_L2_ELEMENTS:
            assert rel_l2 <= rel_bound, f"{name} [{version}]: relative L2 error {rel_l2:.3e} > {rel_bound}"
        bad = err > bound
    else:
        bad = err > FP32_REL * (peak + np.abs(want))
    if bad.any():
        first = tuple(np.argwhere(bad)[0])
        raise AssertionError(f"{name} [{version}]: {int(bad.sum())} of {bad.size} elements out of "
                             f"tolerance; first at {list(first)}: got {got[first]!r}, reference "
                             f"{want[first]!r}")
    return stats
