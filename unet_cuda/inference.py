"""Turning a trained network into probabilities: one batch of tiles, or a whole image by overlap-tile.

Used by the validation of ``unet_cuda.train`` and by ``unet_cuda.predict``.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from . import ops
from .autograd import Tensor, no_grad
from .model import UNet
from .tiling import flip_tta, overlap_tile_predict

__all__ = ["tile_probabilities", "predict_image"]


def tile_probabilities(model: UNet, batch: np.ndarray):
    """Softmax class probabilities ``[B, K, out, out]`` for input tiles ``[B, C, tile, tile]``.

    The softmax is the one of the loss op (``softmax_xent_forward``), fed all-zero weights so its
    loss term is zero: one kernel family computes softmax for training and inference alike.
    """
    x = ops.to_device(np.ascontiguousarray(batch, dtype=np.float32), model.device)
    with no_grad():
        logits = model(Tensor(x)).data
    xp = ops.array_module(logits)
    n, _, h, w = logits.shape
    zeros_labels = xp.zeros((n, h, w), dtype=np.int32)
    zeros_weights = xp.zeros((n, h, w), dtype=np.float32)
    _, probs = ops.softmax_xent_forward(logits, zeros_labels, zeros_weights)
    return probs


def predict_image(model: UNet, image: np.ndarray, tile: int, batch_size: int = 1, tta: bool = False,
                  progress: Callable[[int, int], None] | None = None) -> np.ndarray:
    """Class probabilities ``[K, H, W]`` of a 2D image of any size, by overlap-tile (PAPER.md, Fig. 2).

    The model is put in eval mode (no dropout) for the call and restored afterwards.
    """
    was_training = model.training
    model.eval()
    try:
        def predict_fn(batch):
            return ops.to_numpy(tile_probabilities(model, batch))

        fn = flip_tta(predict_fn) if tta else predict_fn
        return overlap_tile_predict(image, fn, tile=tile, depth=model.depth, batch_size=batch_size,
                                    progress=progress)
    finally:
        model.train(was_training)
