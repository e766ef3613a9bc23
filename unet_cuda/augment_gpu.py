"""Data augmentation on the GPU: the random draws of :class:`unet_cuda.augment.Augmenter`, applied by
our own kernel (the op ``augment_warp`` of docs/OPS.md), so that augmenting a tile costs the training
step one kernel launch instead of a CPU warp.

The random parameters
---------------------
:func:`draw_parameters` draws one augmentation from a ``numpy.random.Generator``, in this fixed
order, each draw made only when its part is switched on:

1. ``elastic``: the node displacements ``rng.normal(0, sigma, size=(2, grid, grid))`` (px;
   ``[0]`` rows, ``[1]`` columns); off: a single zero node;
2. ``flips``: ``flip_rows, flip_columns = rng.random(2) < 0.5``;
3. ``rot90``: ``quarter_turns = rng.integers(4)``;
4. ``gray``: ``log(gamma) ~ U(-log max_gamma, log max_gamma)``, then
   ``contrast ~ U(1 - max_contrast_change, 1 + max_contrast_change)``, then
   ``brightness ~ U(-max_brightness_change, max_brightness_change)``, each one ``rng.uniform``
   call; off: ``(1, 1, 0)``.

These are the calls :class:`unet_cuda.augment.Augmenter` makes, in the same order, so a
:class:`GpuAugmenter` and an ``Augmenter`` with the same seed draw the same augmentations, and a
checkpoint's generator state resumes either one.

What differs from the CPU augmenter
-----------------------------------
Both interpolate bicubically, with different cubics. The CPU augmenter uses
``scipy.ndimage.map_coordinates(order=3)``: a cubic B-spline fitted through the samples by a
prefilter (C2, every sample has some influence everywhere), for the displacement field and for
the image. The kernel uses Keys' cubic convolution (a = -0.5: C1, 4x4 samples per pixel,
reproduces quadratics), with clamped edge nodes for the field. Both pass through the node values
and agree at integer shifts; elsewhere they differ by a small fraction of a gray level. Labels
round half up here (``floor(s + 1/2)``) where the CPU rounds half to even, and the image is always
clipped to [0, 1] here (the CPU clips after the elastic and the gray steps only). A non-square
window with an odd number of quarter turns is warped by the kernel with one turn fewer and turned
once more by CuPy (the kernel keeps the source shape).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import ops
from .augment import Augmenter

__all__ = ["AugmentParameters", "draw_parameters", "GpuAugmenter"]


@dataclass(frozen=True)
class AugmentParameters:
    """One draw: the arguments of ``ops.augment_warp`` after the three arrays."""

    coarse: np.ndarray       # float32 [2, g, g] node displacements in px
    quarter_turns: int       # 0..3 counter-clockwise
    flip_rows: bool
    flip_columns: bool
    gamma: float
    contrast: float
    brightness: float

    def as_dict(self) -> dict:
        """JSON-serialisable."""
        return {"coarse": self.coarse.tolist(), "quarter_turns": self.quarter_turns,
                "flip_rows": self.flip_rows, "flip_columns": self.flip_columns, "gamma": self.gamma,
                "contrast": self.contrast, "brightness": self.brightness}


def draw_parameters(
    rng: np.random.Generator,
    *,
    elastic: bool = True,
    flips: bool = True,
    rot90: bool = True,
    gray: bool = True,
    grid: int = 3,
    sigma: float = 10.0,
    max_gamma: float = 1.25,
    max_contrast_change: float = 0.15,
    max_brightness_change: float = 0.08,
) -> AugmentParameters:
    """One augmentation drawn from ``rng`` in the fixed order of the module docstring."""
    if elastic:
        if grid < 2:
            raise ValueError(f"draw_parameters: grid must be >= 2, got {grid}")
        coarse = rng.normal(0.0, sigma, size=(2, grid, grid)).astype(np.float32)
    else:
        coarse = np.zeros((2, 1, 1), dtype=np.float32)
    flip_rows = flip_columns = False
    if flips:
        flip_rows, flip_columns = (bool(f) for f in rng.random(2) < 0.5)
    quarter_turns = int(rng.integers(4)) if rot90 else 0
    gamma, contrast, brightness = 1.0, 1.0, 0.0
    if gray:
        gamma = float(np.exp(rng.uniform(-np.log(max_gamma), np.log(max_gamma))))
        contrast = float(rng.uniform(1.0 - max_contrast_change, 1.0 + max_contrast_change))
        brightness = float(rng.uniform(-max_brightness_change, max_brightness_change))
    return AugmentParameters(coarse, quarter_turns, flip_rows, flip_columns, gamma, contrast, brightness)


class GpuAugmenter(Augmenter):
    """Joint random augmentation of (image, labels, weights) on the GPU, reproducible from a seed.

    The constructor options, :meth:`get_state` and :meth:`set_state` are inherited from
    :class:`unet_cuda.augment.Augmenter`; only the drawing and the warp differ. A call takes NumPy
    (or CuPy) windows, uploads them, draws
    one augmentation (:meth:`draw`) and returns CuPy arrays: the image float32, labels int32,
    weights float32, all of the source's shape (height and width swapped for an odd number of
    quarter turns). ``labels`` and ``weights`` may be ``None`` (returned as ``None``).
    """

    def draw(self) -> AugmentParameters:
        """The next augmentation's parameters (advances the generator)."""
        return draw_parameters(
            self.rng, elastic=self.elastic, flips=self.flips, rot90=self.rot90, gray=self.gray,
            grid=self.grid, sigma=self.sigma, max_gamma=self.max_gamma,
            max_contrast_change=self.max_contrast_change, max_brightness_change=self.max_brightness_change)

    def __call__(self, image, labels=None, weights=None):
        shape = tuple(np.shape(image))
        if len(shape) != 2:
            raise ValueError(f"GpuAugmenter: expected a 2D image, got shape {shape}")
        for name, other in (("labels", labels), ("weights", weights)):
            if other is not None and tuple(np.shape(other)) != shape:
                raise ValueError(f"GpuAugmenter: {name} shape {tuple(np.shape(other))} differs from image "
                                 f"shape {shape}")
        image_d = _upload(image, np.float32)
        xp = ops.array_module(image_d)
        labels_d = xp.zeros(shape, dtype=np.int32) if labels is None else _upload(labels, np.int32)
        weights_d = xp.zeros(shape, dtype=np.float32) if weights is None else _upload(weights, np.float32)

        p = self.draw()
        turns = p.quarter_turns
        turn_after = turns % 2 == 1 and shape[0] != shape[1]
        outputs = ops.augment_warp(image_d, labels_d, weights_d, _upload(p.coarse, np.float32),
                                   turns - 1 if turn_after else turns, p.flip_rows, p.flip_columns,
                                   p.gamma, p.contrast, p.brightness)
        if turn_after:
            outputs = tuple(xp.ascontiguousarray(xp.rot90(a)) for a in outputs)
        image_out, labels_out, weights_out = outputs
        return image_out, None if labels is None else labels_out, None if weights is None else weights_out


def _upload(array, dtype):
    """A C-contiguous CuPy copy of a NumPy array (a CuPy array is converted only where needed)."""
    if isinstance(array, np.ndarray) or not hasattr(array, "__cuda_array_interface__"):
        return ops.to_device(np.ascontiguousarray(array, dtype=dtype), "cuda")
    xp = ops.array_module(array)
    return xp.ascontiguousarray(array.astype(dtype, copy=False))
