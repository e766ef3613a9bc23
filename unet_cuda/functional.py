"""The network's operations as autograd ops: each computes its output with ``unet_cuda.ops`` and
records how to send the gradient back, again with ``unet_cuda.ops``.

Nothing here computes: every line of math lives in the op functions (docs/OPS.md), so the same
wiring runs on the NumPy reference and on the CUDA kernels.

The ReLU's backward is fused where it can be (``autograd.py``): an op whose input is a ReLU's
output passes that input to its backward-data kernel as ``relu_mask`` and marks the gradient it
returns as masked; when every consumer of a ReLU's output did so, no ``relu_backward`` runs for
it. And the max-pool adds its gradient into the one its input already has (the skip maps: the
concatenation's backward runs first) in its own kernel, with no ``accumulate_`` after it.
``fused_relu_backward(enabled)`` and ``fused_accumulation(enabled)`` switch them (off: a separate
``relu_backward`` for every ReLU and an ``accumulate_`` for every sum, as a learner might write
them): the gradients have the same bits either way. By default the sums are fused and the ReLU's
backward is not (``FUSE_*_DEFAULT`` below: measured).
"""

from __future__ import annotations

import contextlib

from . import ops
from .autograd import AccumulatingGradient, Tensor

__all__ = ["conv3x3", "conv3x3_concat", "conv1x1", "max_pool2x2", "up_conv2x2", "crop_concat",
           "dropout", "softmax_cross_entropy", "fused_relu_backward", "fused_accumulation"]

# The fusions an op recorded outside a fused_* block uses. The ReLU's backward in its consumers
# measured slower than its own passes in the tf32 step (H100, eb6a939: the backward-data ops 0.96 ms
# slower in all, against 0.47 ms of ReLU passes saved): each masked store waits for its mask's load
# (docs/CONV3X3.md, "Fusing the ReLU's backward"). It stays available, and is timed beside the
# default in every GPU check (bench/test_bench_train_step.py, test_train_step_fusions).
FUSE_RELU_BACKWARD_DEFAULT = False
FUSE_ACCUMULATION_DEFAULT = True
# The settings ops read when they are recorded.
_fusions = {"relu_backward": FUSE_RELU_BACKWARD_DEFAULT, "accumulation": FUSE_ACCUMULATION_DEFAULT}


@contextlib.contextmanager
def _fusion(name: str, enabled: bool):
    previous, _fusions[name] = _fusions[name], bool(enabled)
    try:
        yield
    finally:
        _fusions[name] = previous


def fused_relu_backward(enabled: bool):
    """Within this block, ops recorded fuse (``True``) or do not fuse (``False``) the ReLU's
    backward of their inputs into their own backward-data kernels."""
    return _fusion("relu_backward", enabled)


def fused_accumulation(enabled: bool):
    """Within this block, max-pools recorded add their input's gradient into the one already
    there in their own kernel (``True``) or leave the sum to a separate ``accumulate_``."""
    return _fusion("accumulation", enabled)


def _masks(x: Tensor) -> bool:
    """Whether an op recorded now takes ``x``'s ReLU into its backward: ``x`` is the output of a
    recorded op that ends in a ReLU (not a leaf, whose gradient is its own, not its ReLU's input's)."""
    return _fusions["relu_backward"] and x.relu_output and x._backward is not None


def conv3x3(x: Tensor, w: Tensor, b: Tensor, relu: bool = True) -> Tensor:
    """Valid 3x3 convolution with bias, ReLU fused when ``relu``."""
    y = ops.conv3x3_forward(x.data, w.data, b.data, relu)
    mask_x = _masks(x)

    def backward(dy):  # dy: after this op's ReLU (autograd.py)
        dx = None
        if x.requires_grad:
            dx = ops.conv3x3_backward_data(dy, w.data, relu_mask=x.data if mask_x else None)
        dw, db = ops.conv3x3_backward_weight(x.data, dy)
        return dx, dw, db

    return Tensor.from_op(y, (x, w, b), backward, "conv3x3_relu" if relu else "conv3x3", relu=relu,
                          masked=(mask_x, False, False))


def conv3x3_concat(up: Tensor, skip: Tensor, w: Tensor, b: Tensor, relu: bool = True) -> Tensor:
    """``conv3x3(crop_concat(up, skip), w, b, relu)`` as one op: the decoder's first convolution
    of a level. On the GPU the concatenation is never stored; the kernels read ``up`` and the
    crop window of ``skip`` where they are."""
    y = ops.conv3x3_concat_forward(up.data, skip.data, w.data, b.data, relu)
    skip_shape = skip.shape
    mask_up, mask_skip = _masks(up), _masks(skip)

    def backward(dy):  # dy: after this op's ReLU (autograd.py)
        dup = dskip = None
        if up.requires_grad or skip.requires_grad:
            dup, dskip = ops.conv3x3_concat_backward_data(
                dy, w.data, skip_shape, up_relu_mask=up.data if mask_up else None,
                skip_relu_mask=skip.data if mask_skip else None)
        dw, db = ops.conv3x3_concat_backward_weight(up.data, skip.data, dy)
        return dup, dskip, dw, db

    return Tensor.from_op(y, (up, skip, w, b), backward,
                          "conv3x3_concat_relu" if relu else "conv3x3_concat", relu=relu,
                          masked=(mask_up, mask_skip, False, False))


def conv1x1(x: Tensor, w: Tensor, b: Tensor) -> Tensor:
    y = ops.conv1x1_forward(x.data, w.data, b.data)
    mask_x = _masks(x)

    def backward(dy):
        dx = None
        if x.requires_grad:
            dx = ops.conv1x1_backward_data(dy, w.data, relu_mask=x.data if mask_x else None)
        dw, db = ops.conv1x1_backward_weight(x.data, dy)
        return dx, dw, db

    return Tensor.from_op(y, (x, w, b), backward, "conv1x1", masked=(mask_x, False, False))


def max_pool2x2(x: Tensor) -> Tensor:
    y, argmax = ops.maxpool2x2_forward(x.data)
    mask_x = _masks(x)
    accumulate = _fusions["accumulation"]

    def backward(dy):
        # x at the element taken is y: masking by y > 0 is x's ReLU backward
        relu_mask = y if mask_x else None
        if accumulate:
            return (AccumulatingGradient(lambda into: ops.maxpool2x2_backward(
                dy, argmax, relu_mask=relu_mask, accumulate_into=into)),)
        return (ops.maxpool2x2_backward(dy, argmax, relu_mask=relu_mask),)

    return Tensor.from_op(y, (x,), backward, "max_pool2x2", masked=(mask_x,))


def up_conv2x2(x: Tensor, w: Tensor, b: Tensor) -> Tensor:
    """2x2 stride-2 up-convolution (transposed convolution) with bias."""
    y = ops.upconv2x2_forward(x.data, w.data, b.data)
    mask_x = _masks(x)

    def backward(dy):
        dx = None
        if x.requires_grad:
            dx = ops.upconv2x2_backward_data(dy, w.data, relu_mask=x.data if mask_x else None)
        dw, db = ops.upconv2x2_backward_weight(x.data, dy)
        return dx, dw, db

    return Tensor.from_op(y, (x, w, b), backward, "up_conv2x2", masked=(mask_x, False, False))


def crop_concat(up: Tensor, skip: Tensor) -> Tensor:
    """Channels ``[up, centre crop of skip]``."""
    y = ops.crop_concat_forward(up.data, skip.data)
    skip_shape = skip.shape

    def backward(dy):
        return ops.crop_concat_backward(dy, skip_shape)

    return Tensor.from_op(y, (up, skip), backward, "crop_concat")


def dropout(x: Tensor, p: float, seed) -> Tensor:
    """Inverted dropout with the counter-based mask of ``seed`` (identical on CPU and GPU). The
    mask is never stored: the forward and the backward each make it again from ``seed`` where they
    apply it (an int, or a 0-d uint64 array on the device, read when the op runs)."""
    y = ops.dropout_seeded_forward(x.data, p, seed)

    def backward(dy):
        return (ops.dropout_seeded_backward(dy, p, seed),)

    return Tensor.from_op(y, (x,), backward, "dropout")


def softmax_cross_entropy(logits: Tensor, labels, weights) -> Tensor:
    """Pixel-wise softmax and weighted cross-entropy, normalised by the pixel count (a 0-d Tensor).

    ``labels`` (int32 [N,H,W]) and ``weights`` (float32 [N,H,W]) are plain arrays on the logits' device.
    """
    loss, probs = ops.softmax_xent_forward(logits.data, labels, weights)

    def backward(dloss):
        return (ops.softmax_xent_backward(probs, labels, weights, dloss),)

    return Tensor.from_op(loss, (logits,), backward, "softmax_cross_entropy")
