"""Segmentation metrics for one 2D image: pixel error, Rand error (ISBI 2012), IoU and Dice.

Inputs
------
* ``prediction``: a foreground probability map (float, foreground where ``p > threshold``), or a
  mask (bool as is; integers compared with ``threshold`` too, so 0/1 and 0/255 masks both work with
  the default 0.5). For a softmax output ``probs[K, H, W]`` pass ``probs[1]``.
* ``truth``: binary labels (any values, foreground = ``> 0``) or instance labels (0 = background).

With ``P`` the predicted foreground set, ``T`` the true one and ``N`` the number of pixels:

* pixel error  = |P xor T| / N                       (1 - pixel accuracy, as in the ISBI challenge);
* IoU          = |P and T| / |P or T|;
* Dice         = 2 |P and T| / (|P| + |T|) = 2 IoU / (1 + IoU);
  both are 1 when P and T are empty (nothing to find, nothing found).

Rand error (foreground-restricted, ISBI 2012)
---------------------------------------------
The challenge scores the *segmentation into objects*, not pixels: 1 - the Rand F-score of the pairs
of pixels that lie in the same object. We pass to :func:`skimage.metrics.adapted_rand_error`:

* as the true segmentation: the truth's instances -- given instance labels as they are, binary
  labels split into 4-connected components of the foreground; label 0 (membrane) is ignored, which
  restricts the score to the true foreground;
* as the test segmentation: the 4-connected components of the predicted foreground, numbered from 1,
  with predicted background as label 0. skimage treats test label 0 as one ordinary segment, so
  predicted-membrane pixels inside true cells count as one large merged segment. (The challenge
  first thinned predicted borders; we do not.)

With ``n_ij`` the number of true-foreground pixels in true object ``i`` and test segment ``j``,
``t_i = sum_j n_ij`` and ``s_j = sum_i n_ij``, counting pairs of distinct pixels:

    F = 2 sum_ij n_ij (n_ij - 1) / ( sum_i t_i (t_i - 1) + sum_j s_j (s_j - 1) ),   Rand error = 1 - F.

When no pair can be scored (no true foreground, or only isolated single pixels on both sides) the
Rand error is 0.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

__all__ = ["foreground", "pixel_error", "rand_error", "iou", "dice", "evaluate"]


def _check_2d(array, what: str) -> np.ndarray:
    array = np.asarray(array)
    if array.ndim != 2:
        raise ValueError(f"{what}: expected one 2D image, got shape {array.shape}")
    return array


def foreground(prediction, threshold: float = 0.5) -> np.ndarray:
    """The predicted foreground mask (bool): a bool mask as is, anything else ``> threshold``."""
    prediction = _check_2d(prediction, "prediction")
    if prediction.dtype == np.bool_:
        return prediction
    if prediction.dtype.kind == "f" and not np.isfinite(prediction).all():
        raise ValueError("prediction contains NaN or Inf")
    return prediction > threshold


def _pair(prediction, truth, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    predicted = foreground(prediction, threshold)
    truth = _check_2d(truth, "truth")
    if predicted.shape != truth.shape:
        raise ValueError(f"prediction shape {predicted.shape} differs from truth shape {truth.shape}")
    return predicted, truth > 0


def pixel_error(prediction, truth, threshold: float = 0.5) -> float:
    """Fraction of pixels whose thresholded class differs from the truth's."""
    predicted, true = _pair(prediction, truth, threshold)
    return float(np.mean(predicted != true))


def iou(prediction, truth, threshold: float = 0.5) -> float:
    """Intersection over union of the foregrounds (1 when both are empty)."""
    predicted, true = _pair(prediction, truth, threshold)
    union = np.count_nonzero(predicted | true)
    return 1.0 if union == 0 else np.count_nonzero(predicted & true) / union


def dice(prediction, truth, threshold: float = 0.5) -> float:
    """Dice coefficient of the foregrounds (1 when both are empty)."""
    predicted, true = _pair(prediction, truth, threshold)
    sizes = np.count_nonzero(predicted) + np.count_nonzero(true)
    return 1.0 if sizes == 0 else 2.0 * np.count_nonzero(predicted & true) / sizes


def _true_instances(truth: np.ndarray) -> np.ndarray:
    truth = np.asarray(truth)
    if truth.dtype.kind == "f":
        if not np.isfinite(truth).all() or (truth != np.round(truth)).any():
            raise ValueError("truth must hold integer labels")
        truth = truth.astype(np.int64)
    if truth.dtype.kind not in "biu" or (truth.size and truth.min() < 0):
        raise ValueError("truth must hold binary or non-negative instance labels")
    nonzero_values = np.unique(truth[truth > 0])
    if len(nonzero_values) <= 1:  # binary: split the foreground into connected objects
        return ndimage.label(truth > 0)[0]
    return truth.astype(np.int64)


def rand_error(prediction, truth, threshold: float = 0.5) -> float:
    """Foreground-restricted adapted Rand error (ISBI 2012); see the module docstring for what is compared."""
    from skimage.metrics import adapted_rand_error

    predicted, true = _pair(prediction, truth, threshold)
    if not true.any():
        return 0.0
    true_instances = _true_instances(truth)
    predicted_segments = ndimage.label(predicted)[0]
    with np.errstate(divide="ignore", invalid="ignore"):
        error, _, _ = adapted_rand_error(true_instances, predicted_segments, ignore_labels=(0,))
    # 0/0 happens only when no two scored pixels share a segment in either image: nothing to disagree on.
    return 0.0 if np.isnan(error) else float(error)


def evaluate(prediction, truth, threshold: float = 0.5) -> dict[str, float]:
    """All four metrics: ``{'pixel_error', 'rand_error', 'iou', 'dice'}``."""
    return {
        "pixel_error": pixel_error(prediction, truth, threshold),
        "rand_error": rand_error(prediction, truth, threshold),
        "iou": iou(prediction, truth, threshold),
        "dice": dice(prediction, truth, threshold),
    }
