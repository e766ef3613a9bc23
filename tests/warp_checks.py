"""The comparison of an ``augment_warp`` implementation with the NumPy reference, shared by the GPU
test of the kernel (test_cuda_ops.py) and the CPU build of its arithmetic (test_warp_emulated.py).

The kernel computes in float32, the reference in float64. The kernel's displacement is off by
about ``eps32 |d|`` px (~6e-6 px at the paper's 10 px, 6e-4 px at 1000 px), and the error that
causes is that times the local slope: a few per px on the white-noise test image (values in
[-0.1, 1.1]), up to 10 on the weights (values in [1, 11]). The tolerances follow. Labels must match
exactly except where the reference's displacement lies within that rounding of a half-integer,
where nearest-neighbour rounding can go either way; random nodes make such pixels rare.
"""

from __future__ import annotations

import numpy as np

from unet_cuda.ops import reference as ref

WARP_GEOMETRIES = [(k, fr, fc) for k in range(4) for fr in (False, True) for fc in (False, True)]
# (H, W, grid, sigma): the paper's training window (572 tile + 2 x 32 px margin), the reduced CPU
# network's (188 + 64), and awkward ones: one pixel, one row, one column, odd sizes, non-square,
# a one-node grid, and displacements far beyond the window (mirrored many times over).
WARP_CASES = [(636, 636, 3, 10.0), (252, 252, 3, 10.0), (1, 1, 3, 10.0), (1, 7, 3, 10.0),
              (7, 1, 2, 5.0), (5, 5, 3, 10.0), (13, 13, 5, 30.0), (7, 11, 3, 10.0), (3, 3, 1, 100.0),
              (37, 37, 3, 1000.0)]


def warp_case_inputs(rng, h, w, grid, sigma):
    """image (beyond [0, 1], so the clip is tested), labels 0..6, weights in [1, 11), nodes ~ N(0, sigma^2)."""
    image = rng.uniform(-0.1, 1.1, (h, w)).astype(np.float32)
    labels = rng.integers(0, 7, (h, w)).astype(np.int32)
    weights = rng.uniform(1.0, 11.0, (h, w)).astype(np.float32)
    coarse = rng.normal(0.0, sigma, (2, grid, grid)).astype(np.float32)
    return image, labels, weights, coarse


def random_gray(rng):
    """(gamma, contrast, brightness) in the Augmenter's default ranges."""
    return (float(np.exp(rng.uniform(-0.22, 0.22))), float(rng.uniform(0.85, 1.15)),
            float(rng.uniform(-0.08, 0.08)))


def output_frame(a, turns, flip_rows, flip_columns):
    """A source-frame array seen from the output: the flips, then np.rot90 (as the op composes)."""
    if flip_rows:
        a = a[::-1, :]
    if flip_columns:
        a = a[:, ::-1]
    return np.rot90(a, turns)


def _check_close(name, got, want, atol):
    err = np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64))
    print(f"{name}: max abs err {err.max():.3e} (atol {atol:.2e}), shape {want.shape}")
    bad = ~(err <= atol)        # NaN counts as bad
    if bad.any():
        first = tuple(np.argwhere(bad)[0])
        raise AssertionError(f"{name}: {int(bad.sum())} of {bad.size} elements out of tolerance; first at "
                             f"{list(first)}: got {got[first]!r}, reference {want[first]!r}")


def compare_with_reference(run, rng, h, w, grid, sigma, turns, flip_rows, flip_columns, gray):
    """Draws inputs, calls ``run(image, labels, weights, coarse, turns, flip_rows, flip_columns,
    gamma, contrast, brightness)`` (which returns the three outputs as NumPy arrays) and asserts
    that they match the reference within the float32 tolerances of the module docstring."""
    image, labels, weights, coarse = warp_case_inputs(rng, h, w, grid, sigma)
    args = (turns, flip_rows, flip_columns, *gray)
    got = run(image, labels, weights, coarse, *args)
    want = ref.augment_warp(image, labels, weights, coarse, *args)
    tag = f"augment_warp {h}x{w} grid {grid} sigma {sigma} turns {turns} flips {flip_rows},{flip_columns}"
    for a, b, name in zip(got, want, ("image", "labels", "weights")):
        assert a.shape == b.shape and a.dtype == b.dtype, f"{tag} {name}: {a.shape} {a.dtype}, " \
                                                          f"reference {b.shape} {b.dtype}"
    position = 2 * float(np.finfo(np.float32).eps) * (float(np.abs(coarse).max()) + 1.0)
    _check_close(tag + " image", got[0], want[0], 1e-5 + 4 * position)
    _check_close(tag + " weights", got[2], want[2], 1e-5 * 11 + 12 * position)
    tie = np.zeros((h, w), dtype=bool)
    for component in ref._augment_displacement(coarse, h, w):
        fraction = component - np.floor(component)
        tie |= np.abs(fraction - 0.5) < 1e-6 + 4 * position
    tie = output_frame(tie, turns, flip_rows, flip_columns)
    differ = got[1] != want[1]
    print(f"{tag} labels: {int(differ.sum())} of {differ.size} differ, {int(tie.sum())} near a tie")
    assert not (differ & ~tie).any(), f"{tag}: labels differ away from rounding ties at " \
                                      f"{np.argwhere(differ & ~tie)[:5].tolist()}"
    assert tie.mean() < 0.05, f"{tag}: the tie band is too wide to test the labels"


def check_case(run, h, w, grid, sigma):
    """One case of WARP_CASES in every legal geometry (odd turns need a square), random gray values."""
    rng = np.random.default_rng(h * 1000 + w + grid)
    for turns, flip_rows, flip_columns in WARP_GEOMETRIES:
        if turns % 2 and h != w:
            continue
        compare_with_reference(run, rng, h, w, grid, sigma, turns, flip_rows, flip_columns, random_gray(rng))
