"""Data augmentation on the GPU: the random draws of :class:`unet_cuda.augment.Augmenter`, applied by
our own kernel (the op ``augment_warp`` of docs/OPS.md), so that augmenting a tile costs the training
step one kernel launch instead of a CPU warp.

The random parameters
---------------------
:func:`unet_cuda.augment.draw_parameters` draws one augmentation from a ``numpy.random.Generator``, in this fixed
order, each draw made only when its part is switched on:

1. ``elastic``: the node displacements ``rng.normal(0, sigma, size=(2, grid, grid))`` (px;
   ``[0]`` rows, ``[1]`` columns); off: a single zero node;
2. ``flips``: ``flip_rows, flip_columns = rng.random(2) < 0.5``;
3. ``rot90``: ``quarter_turns = rng.integers(4)``;
4. ``gray``: ``log(gamma) ~ U(-log max_gamma, log max_gamma)``, then
   ``contrast ~ U(1 - max_contrast_change, 1 + max_contrast_change)``, then
   ``brightness ~ U(-max_brightness_change, max_brightness_change)``, each one ``rng.uniform``
   call; off: ``(1, 1, 0)``.

:class:`unet_cuda.augment.Augmenter` draws with the same function, so a :class:`GpuAugmenter`
and an ``Augmenter`` with the same seed draw the same augmentations, and a checkpoint's generator
state resumes either one.

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

import numpy as np

from . import ops
from .augment import AugmentParameters, Augmenter, draw_parameters

__all__ = ["AugmentParameters", "draw_parameters", "GpuAugmenter"]


class GpuAugmenter(Augmenter):
    """Joint random augmentation of (image, labels, weights) on the GPU, reproducible from a seed.

    The constructor options, :meth:`get_state` and :meth:`set_state` are inherited from
    :class:`unet_cuda.augment.Augmenter`; only the drawing and the warp differ. A call takes NumPy
    (or CuPy) windows, uploads them, draws
    one augmentation (:meth:`draw`) and returns CuPy arrays: the image float32, labels int32,
    weights float32, all of the source's shape (height and width swapped for an odd number of
    quarter turns). ``labels`` and ``weights`` may be ``None`` (returned as ``None``).
    """

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
