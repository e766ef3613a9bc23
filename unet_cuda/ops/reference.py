"""NumPy reference of every U-Net operation: the executable specification and the CPU backend.

The contract (names, arguments, results, layouts) is ``docs/OPS.md``; the CUDA backend
(``unet_cuda/ops/cuda.py``) implements the same functions with the same arguments. In short:

* activations are NCHW, ``x[n, c, h, w]``; weights are OIHW, ``w[o, c, ky, kx]`` for every
  convolution (the 2x2 up-convolution included); biases are ``b[o]``;
* labels are integer ``[N, H, W]`` (int32 in the network), weight maps are float ``[N, H, W]``;
* max-pool argmax and dropout masks are uint8 with the shape of their output / input;
* the loss is a 0-d array, read with ``float(loss)``.

Every function works in any float dtype and keeps it (float64 in, float64 out), so the same code
serves finite-difference tests (float64) and CPU training (float32). Outputs are fresh C-contiguous
arrays, except for the two in-place updates whose names end in ``_``. Inputs are checked first: a
wrong rank, an inconsistent shape or a non-float array raises ``ValueError`` naming the op, the
argument and the shapes.

The code favours the obvious over the clever, but never loops over pixels: a 3x3 convolution is an
im2col (a strided window view, copied once) followed by one matrix product, and the other ops are
reshapes, slices and loops over the kernel taps (4 or 9, and the 4x4 of the augmentation warp).
"""

from __future__ import annotations

import operator

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

try:  # the first and one past the last byte address of an array's elements
    from numpy.lib.array_utils import byte_bounds as _byte_bounds  # NumPy >= 2
except ImportError:  # pragma: no cover - NumPy 1.x
    _byte_bounds = np.byte_bounds

__all__ = (
    "conv3x3_forward",
    "conv3x3_backward_data",
    "conv3x3_backward_weight",
    "relu_backward",
    "maxpool2x2_forward",
    "maxpool2x2_backward",
    "upconv2x2_forward",
    "upconv2x2_backward_data",
    "upconv2x2_backward_weight",
    "crop_concat_forward",
    "crop_concat_backward",
    "conv3x3_concat_forward",
    "conv3x3_concat_backward_data",
    "conv3x3_concat_backward_weight",
    "conv1x1_forward",
    "conv1x1_backward_data",
    "conv1x1_backward_weight",
    "softmax_xent_forward",
    "softmax_xent_backward",
    "dropout_mask",
    "dropout_forward",
    "dropout_backward",
    "dropout_seeded_forward",
    "dropout_seeded_backward",
    "accumulate_",
    "sgd_momentum_update_",
    "sgd_momentum_update_multi_",
    "augment_warp",
)


# --------------------------------------------------------------------------------------------------
# Input checks shared by all ops
# --------------------------------------------------------------------------------------------------

def _typed_array(op: str, name: str, a, layout: str, kind: type, kind_name: str) -> np.ndarray:
    """``a`` as an ndarray of a ``kind`` dtype whose rank matches ``layout`` (e.g. ``"[N,C,H,W]"``)."""
    a = np.asarray(a)
    ndim = layout.count(",") + 1
    if a.ndim != ndim:
        raise ValueError(f"{op}: {name} must be {ndim}-d {layout}, got shape {a.shape}")
    if not np.issubdtype(a.dtype, kind):
        raise ValueError(f"{op}: {name} must have {kind_name} dtype, got {a.dtype} (shape {a.shape})")
    return a


def _float_array(op: str, name: str, a, layout: str) -> np.ndarray:
    return _typed_array(op, name, a, layout, np.floating, "a float")


def _integer_array(op: str, name: str, a, layout: str) -> np.ndarray:
    return _typed_array(op, name, a, layout, np.integer, "an integer")


def _same_shape(op: str, name_a: str, a: np.ndarray, name_b: str, b: np.ndarray) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{op}: {name_a} has shape {a.shape} but {name_b} has shape {b.shape}")


def _check_weight(op: str, w: np.ndarray, x_name: str, x: np.ndarray, x_channel_axis_of_w: int,
                  kernel: int) -> None:
    """``w`` is OIHW with a ``kernel`` x ``kernel`` window whose axis ``x_channel_axis_of_w`` (0 = O,
    1 = C) matches the channel count of ``x``."""
    if w.shape[2:] != (kernel, kernel):
        raise ValueError(f"{op}: w must have shape [O,C,{kernel},{kernel}], got {w.shape}")
    if w.shape[x_channel_axis_of_w] != x.shape[1]:
        role = "input" if x_channel_axis_of_w == 1 else "output"
        raise ValueError(
            f"{op}: w has shape {w.shape} ({w.shape[x_channel_axis_of_w]} {role} channels) "
            f"but {x_name} has {x.shape[1]} channels ({x_name} shape {x.shape})"
        )


def _check_bias(op: str, b: np.ndarray, w: np.ndarray) -> None:
    if b.shape != (w.shape[0],):
        raise ValueError(f"{op}: b has shape {b.shape} but w has {w.shape[0]} output channels "
                         f"(w shape {w.shape})")


def _relu_masked(op: str, name: str, mask, dx: np.ndarray) -> np.ndarray:
    """``dx``, or with ``mask`` (not None): ``relu_backward(mask, dx)``, zero where ``mask <= 0``.

    The backward-data ops take such a mask where their input ``x`` is a ReLU's output (``x``
    itself): the ReLU's backward is then fused into them and needs no pass of its own. The mask must
    have ``dx``'s shape and a float dtype."""
    if mask is None:
        return dx
    mask = np.asarray(mask)
    if not np.issubdtype(mask.dtype, np.floating):
        raise ValueError(f"{op}: {name} must have a float dtype, got {mask.dtype} (shape {mask.shape})")
    if mask.shape != dx.shape:
        raise ValueError(f"{op}: {name} has shape {mask.shape} but the gradient it masks has "
                         f"shape {dx.shape}")
    return np.where(mask > 0, dx, np.zeros((), dtype=dx.dtype))


def _check_same_batch(op: str, name_a: str, a: np.ndarray, name_b: str, b: np.ndarray) -> None:
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"{op}: {name_a} has batch size {a.shape[0]} (shape {a.shape}) but "
                         f"{name_b} has batch size {b.shape[0]} (shape {b.shape})")


def _check_dropout_p(op: str, p) -> float:
    p = float(p)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"{op}: p must be in [0, 1), got {p}")
    return p


# --------------------------------------------------------------------------------------------------
# 3x3 valid convolution
# --------------------------------------------------------------------------------------------------

def _im2col3x3(x: np.ndarray) -> np.ndarray:
    """``cols[n, (c,ky,kx), (i,j)] = x[n, c, i+ky, j+kx]`` with shape ``[N, C*9, (H-2)*(W-2)]``."""
    n, c, h, w = x.shape
    windows = sliding_window_view(x, (3, 3), axis=(2, 3))          # [N, C, P, Q, 3, 3], a view
    return windows.transpose(0, 1, 4, 5, 2, 3).reshape(n, c * 9, (h - 2) * (w - 2))  # one copy


def _correlate3x3(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Valid cross-correlation without bias:
    ``y[n,o,i,j] = sum_{c,ky,kx} x[n,c,i+ky,j+kx] w[o,c,ky,kx]``."""
    n, _, h, width = x.shape
    o = w.shape[0]
    y = w.reshape(o, -1) @ _im2col3x3(x)                           # [N, O, P*Q]
    return y.reshape(n, o, h - 2, width - 2)


def _check_spatial_at_least(op: str, name: str, a: np.ndarray, size: int) -> None:
    if a.shape[2] < size or a.shape[3] < size:
        raise ValueError(f"{op}: {name} must be at least {size}x{size} pixels, got shape {a.shape}")


def conv3x3_forward(x, w, b, relu=False):
    """Valid 3x3 cross-correlation, optionally followed by ReLU.

    ``y[n,o,i,j] = b[o] + sum_{c,ky,kx} x[n,c,i+ky,j+kx] w[o,c,ky,kx]``, then ``max(y, 0)`` if
    ``relu``. Shapes: ``x[N,C,H,W], w[O,C,3,3], b[O] -> y[N,O,H-2,W-2]``.
    """
    op = "conv3x3_forward"
    x = _float_array(op, "x", x, "[N,C,H,W]")
    w = _float_array(op, "w", w, "[O,C,3,3]")
    b = _float_array(op, "b", b, "[O]")
    _check_weight(op, w, "x", x, 1, 3)
    _check_bias(op, b, w)
    _check_spatial_at_least(op, "x", x, 3)
    y = _correlate3x3(x, w)
    y += b.reshape(1, -1, 1, 1)
    if relu:
        np.maximum(y, 0, out=y)
    return y


def conv3x3_backward_data(dy, w, relu_mask=None):
    """Gradient of a valid 3x3 convolution with respect to its input.

    ``dx[n,c,i+ky,j+kx] += dy[n,o,i,j] w[o,c,ky,kx]``, i.e. the full correlation of ``dy`` (zero-padded
    by 2 on each side) with the kernel flipped in space and transposed in channels:
    ``dx[n,c,a,b] = sum_{o,ky,kx} dy_pad[n,o,a+ky,b+kx] w[o,c,2-ky,2-kx]``.
    With ``relu_mask`` (``dx``'s shape; the input ``x`` where it is a ReLU's output), ``dx`` is 0
    where ``relu_mask <= 0``: ``relu_backward(relu_mask, dx)`` in the same op.
    Shapes: ``dy[N,O,P,Q], w[O,C,3,3] -> dx[N,C,P+2,Q+2]``.
    """
    op = "conv3x3_backward_data"
    dy = _float_array(op, "dy", dy, "[N,O,P,Q]")
    w = _float_array(op, "w", w, "[O,C,3,3]")
    _check_weight(op, w, "dy", dy, 0, 3)
    dy_padded = np.pad(dy, ((0, 0), (0, 0), (2, 2), (2, 2)))
    w_flipped = w[:, :, ::-1, ::-1].transpose(1, 0, 2, 3)           # [C, O, 3, 3]
    return _relu_masked(op, "relu_mask", relu_mask, _correlate3x3(dy_padded, w_flipped))


def conv3x3_backward_weight(x, dy):
    """Gradients of a valid 3x3 convolution with respect to its weights and bias.

    ``dw[o,c,ky,kx] = sum_{n,i,j} dy[n,o,i,j] x[n,c,i+ky,j+kx]``, ``db[o] = sum_{n,i,j} dy[n,o,i,j]``.
    Shapes: ``x[N,C,H,W], dy[N,O,H-2,W-2] -> (dw[O,C,3,3], db[O])``.
    """
    op = "conv3x3_backward_weight"
    x = _float_array(op, "x", x, "[N,C,H,W]")
    dy = _float_array(op, "dy", dy, "[N,O,H-2,W-2]")
    _check_spatial_at_least(op, "x", x, 3)
    n, c, h, width = x.shape
    expected = (n, dy.shape[1], h - 2, width - 2)
    if dy.shape != expected:
        raise ValueError(f"{op}: dy has shape {dy.shape} but x has shape {x.shape}, so dy must have "
                         f"shape {expected}")
    o = dy.shape[1]
    dy_flat = dy.reshape(n, o, -1)
    dw = np.tensordot(dy_flat, _im2col3x3(x), axes=([0, 2], [0, 2]))  # [O, C*9]
    db = dy_flat.sum(axis=(0, 2))
    return dw.reshape(o, c, 3, 3), db


def relu_backward(y, dy):
    """Gradient of ReLU given its output ``y``: ``dx = dy`` where ``y > 0``, else 0 (same shape)."""
    op = "relu_backward"
    y = np.asarray(y)
    dy = np.asarray(dy)
    for name, a in (("y", y), ("dy", dy)):
        if not np.issubdtype(a.dtype, np.floating):
            raise ValueError(f"{op}: {name} must have a float dtype, got {a.dtype} (shape {a.shape})")
    _same_shape(op, "y", y, "dy", dy)
    return np.where(y > 0, dy, np.zeros((), dtype=dy.dtype))


# --------------------------------------------------------------------------------------------------
# 2x2 max-pool, stride 2
# --------------------------------------------------------------------------------------------------

# Window element k = 2*dy + dx, in raster order (0,0), (0,1), (1,0), (1,1).
_POOL_TAPS = ((0, 0), (0, 1), (1, 0), (1, 1))


def maxpool2x2_forward(x):
    """2x2 max-pool with stride 2.

    ``y[n,c,i,j] = max_{dy,dx} x[n,c,2i+dy,2j+dx]`` and ``argmax = 2*dy + dx`` of the element taken.
    Tie rule: the window is scanned in raster order and a later element replaces the current best
    only if it is strictly greater, so the first maximum wins (as does a NaN in the first position;
    a later NaN is never taken, because no comparison with NaN is true).
    Shapes: ``x[N,C,H,W] -> (y[N,C,H/2,W/2], argmax uint8 [N,C,H/2,W/2])``; H and W must be even.
    """
    op = "maxpool2x2_forward"
    x = _float_array(op, "x", x, "[N,C,H,W]")
    n, c, h, w = x.shape
    if h % 2 or w % 2:
        raise ValueError(f"{op}: x must have even H and W, got shape {x.shape}")
    windows = x.reshape(n, c, h // 2, 2, w // 2, 2)
    best = windows[:, :, :, 0, :, 0].copy()
    argmax = np.zeros(best.shape, dtype=np.uint8)
    for k, (dy, dx) in enumerate(_POOL_TAPS[1:], start=1):
        candidate = windows[:, :, :, dy, :, dx]
        greater = candidate > best                                 # strictly: ties keep the first
        np.copyto(best, candidate, where=greater)
        argmax[greater] = k
    return best, argmax


def maxpool2x2_backward(dy, argmax, relu_mask=None, accumulate_into=None):
    """Gradient of the 2x2 max-pool: ``dy`` goes to the window element named by ``argmax``.

    ``dx[n,c,2i+a,2j+b] = dy[n,c,i,j]`` if ``argmax[n,c,i,j] == 2a+b``, else 0.
    With ``relu_mask`` (``dy``'s shape: the pool's output ``y``, where its input ``x`` is a ReLU's
    output), ``dx`` is also 0 where ``relu_mask <= 0``. Since ``x`` at the element taken is ``y``,
    that is ``relu_backward(x, dx)`` in the same op.
    With ``accumulate_into`` (an array of ``dx``'s shape), ``dx`` is added into it in place and it
    is returned: ``accumulate_(accumulate_into, dx)`` in one pass (the gradient of a map that also
    feeds another op: the skip connections).
    Shapes: ``dy[N,C,h,w], argmax[N,C,h,w] -> dx[N,C,2h,2w]``.
    """
    op = "maxpool2x2_backward"
    dy = _float_array(op, "dy", dy, "[N,C,h,w]")
    argmax = _integer_array(op, "argmax", argmax, "[N,C,h,w]")
    _same_shape(op, "dy", dy, "argmax", argmax)
    dy = _relu_masked(op, "relu_mask", relu_mask, dy)
    if argmax.size and (argmax.min() < 0 or argmax.max() > 3):
        raise ValueError(f"{op}: argmax values must be in [0, 3], got range "
                         f"[{argmax.min()}, {argmax.max()}]")
    n, c, h, w = dy.shape
    dx = np.zeros((n, c, h, 2, w, 2), dtype=dy.dtype)
    for k, (a, b) in enumerate(_POOL_TAPS):
        dx[:, :, :, a, :, b] = np.where(argmax == k, dy, 0)
    dx = dx.reshape(n, c, 2 * h, 2 * w)
    if accumulate_into is None:
        return dx
    if np.asarray(accumulate_into).shape != dx.shape:
        raise ValueError(f"{op}: accumulate_into has shape {np.asarray(accumulate_into).shape} but dx "
                         f"has shape {dx.shape}")
    return accumulate_(accumulate_into, dx)


# --------------------------------------------------------------------------------------------------
# 2x2 up-convolution (transposed convolution, stride 2)
# --------------------------------------------------------------------------------------------------
# Each output pixel receives exactly one tap: y[n,o,2i+ky,2j+kx] = b[o] + sum_c x[n,c,i,j] w[o,c,ky,kx].
# With the weights as a matrix W[(o,ky,kx), c] this is one matrix product per image followed by an
# interleaving of the four taps into the 2x larger grid.

def _upconv_weight_matrix(w: np.ndarray) -> np.ndarray:
    """``W[(o,ky,kx), c] = w[o,c,ky,kx]``, shape ``[O*4, C]``."""
    o, c = w.shape[:2]
    return w.transpose(0, 2, 3, 1).reshape(o * 4, c)


def _upconv_taps(dy: np.ndarray) -> np.ndarray:
    """``taps[n, (o,ky,kx), (i,j)] = dy[n,o,2i+ky,2j+kx]``, shape ``[N, O*4, H*W]``."""
    n, o, h2, w2 = dy.shape
    h, w = h2 // 2, w2 // 2
    return dy.reshape(n, o, h, 2, w, 2).transpose(0, 1, 3, 5, 2, 4).reshape(n, o * 4, h * w)


def _check_upconv_dy(op: str, dy: np.ndarray, expected: tuple) -> None:
    if dy.shape != expected:
        raise ValueError(f"{op}: dy has shape {dy.shape} but must have shape {expected} "
                         f"([N,O,2H,2W] for the given x and w)")


def upconv2x2_forward(x, w, b):
    """2x2 transposed convolution with stride 2 (the U-Net "up-convolution").

    ``y[n,o,2i+ky,2j+kx] = b[o] + sum_c x[n,c,i,j] w[o,c,ky,kx]``.
    Shapes: ``x[N,C,H,W], w[O,C,2,2], b[O] -> y[N,O,2H,2W]``.
    """
    op = "upconv2x2_forward"
    x = _float_array(op, "x", x, "[N,C,H,W]")
    w = _float_array(op, "w", w, "[O,C,2,2]")
    b = _float_array(op, "b", b, "[O]")
    _check_weight(op, w, "x", x, 1, 2)
    _check_bias(op, b, w)
    n, c, h, width = x.shape
    o = w.shape[0]
    taps = _upconv_weight_matrix(w) @ x.reshape(n, c, h * width)    # [N, O*4, H*W]
    y = taps.reshape(n, o, 2, 2, h, width).transpose(0, 1, 4, 2, 5, 3).reshape(n, o, 2 * h, 2 * width)
    y += b.reshape(1, -1, 1, 1)
    return y


def upconv2x2_backward_data(dy, w, relu_mask=None):
    """Gradient of the up-convolution with respect to its input.

    ``dx[n,c,i,j] = sum_{o,ky,kx} dy[n,o,2i+ky,2j+kx] w[o,c,ky,kx]``; with ``relu_mask``, 0 where
    ``relu_mask <= 0`` (as in ``conv3x3_backward_data``).
    Shapes: ``dy[N,O,2H,2W], w[O,C,2,2] -> dx[N,C,H,W]``.
    """
    op = "upconv2x2_backward_data"
    dy = _float_array(op, "dy", dy, "[N,O,2H,2W]")
    w = _float_array(op, "w", w, "[O,C,2,2]")
    _check_weight(op, w, "dy", dy, 0, 2)
    n, o, h2, w2 = dy.shape
    if h2 % 2 or w2 % 2:
        raise ValueError(f"{op}: dy must have even H and W ([N,O,2H,2W]), got shape {dy.shape}")
    dx = _upconv_weight_matrix(w).T @ _upconv_taps(dy)              # [N, C, H*W]
    return _relu_masked(op, "relu_mask", relu_mask, dx.reshape(n, w.shape[1], h2 // 2, w2 // 2))


def upconv2x2_backward_weight(x, dy):
    """Gradients of the up-convolution with respect to its weights and bias.

    ``dw[o,c,ky,kx] = sum_{n,i,j} dy[n,o,2i+ky,2j+kx] x[n,c,i,j]``, ``db[o] = sum_{n,i,j} dy[n,o,i,j]``.
    Shapes: ``x[N,C,H,W], dy[N,O,2H,2W] -> (dw[O,C,2,2], db[O])``.
    """
    op = "upconv2x2_backward_weight"
    x = _float_array(op, "x", x, "[N,C,H,W]")
    dy = _float_array(op, "dy", dy, "[N,O,2H,2W]")
    n, c, h, width = x.shape
    o = dy.shape[1]
    _check_upconv_dy(op, dy, (n, o, 2 * h, 2 * width))
    dw = np.tensordot(_upconv_taps(dy), x.reshape(n, c, h * width), axes=([0, 2], [0, 2]))
    dw = dw.reshape(o, 2, 2, c).transpose(0, 3, 1, 2)               # [O, C, 2, 2]
    return np.ascontiguousarray(dw), dy.sum(axis=(0, 2, 3))


# --------------------------------------------------------------------------------------------------
# Skip connection: centre crop + channel concatenation
# --------------------------------------------------------------------------------------------------

def _crop_offset(op: str, up_name: str, up_hw: tuple, skip_shape: tuple) -> tuple:
    """``((Hs-H)//2, (Ws-W)//2)``; the differences must be even and non-negative."""
    h, w = up_hw
    hs, ws = skip_shape[2], skip_shape[3]
    if hs < h or ws < w:
        raise ValueError(f"{op}: skip ({hs}x{ws}, shape {tuple(skip_shape)}) is smaller than "
                         f"{up_name} ({h}x{w})")
    if (hs - h) % 2 or (ws - w) % 2:
        raise ValueError(f"{op}: skip ({hs}x{ws}, shape {tuple(skip_shape)}) cannot be centre-cropped "
                         f"to {up_name} ({h}x{w}): the size differences must be even")
    return (hs - h) // 2, (ws - w) // 2


def crop_concat_forward(up, skip):
    """Concatenate ``up`` with the centre crop of ``skip`` along channels: ``[up, crop(skip)]``.

    The crop window starts at ``((Hs-H)//2, (Ws-W)//2)``; ``Hs-H`` and ``Ws-W`` must be even, >= 0.
    Shapes: ``up[N,Cu,H,W], skip[N,Cs,Hs,Ws] -> y[N,Cu+Cs,H,W]``.
    """
    op = "crop_concat_forward"
    up = _float_array(op, "up", up, "[N,Cu,H,W]")
    skip = _float_array(op, "skip", skip, "[N,Cs,Hs,Ws]")
    _check_same_batch(op, "up", up, "skip", skip)
    h, w = up.shape[2:]
    top, left = _crop_offset(op, "up", (h, w), skip.shape)
    return np.concatenate([up, skip[:, :, top:top + h, left:left + w]], axis=1)


def crop_concat_backward(dy, skip_shape):
    """Split the gradient of ``crop_concat_forward`` back into its two inputs.

    ``dup = dy[:, :Cu]``; ``dskip`` is ``dy[:, Cu:]`` inside the crop window and 0 elsewhere.
    Shapes: ``dy[N,Cu+Cs,H,W], skip_shape (N,Cs,Hs,Ws) -> (dup[N,Cu,H,W], dskip[N,Cs,Hs,Ws])``.
    """
    op = "crop_concat_backward"
    dy = _float_array(op, "dy", dy, "[N,Cu+Cs,H,W]")
    try:
        skip_shape = tuple(operator.index(s) for s in skip_shape)
    except TypeError:
        raise ValueError(f"{op}: skip_shape must be a tuple of 4 ints (N,Cs,Hs,Ws), "
                         f"got {skip_shape!r}") from None
    if len(skip_shape) != 4 or min(skip_shape) < 0:
        raise ValueError(f"{op}: skip_shape must be 4 non-negative ints (N,Cs,Hs,Ws), got {skip_shape}")
    n, c_total, h, w = dy.shape
    c_skip = skip_shape[1]
    if skip_shape[0] != n:
        raise ValueError(f"{op}: skip_shape {skip_shape} has batch size {skip_shape[0]} but dy has "
                         f"batch size {n} (dy shape {dy.shape})")
    if c_skip > c_total:
        raise ValueError(f"{op}: skip_shape {skip_shape} has {c_skip} channels but dy has only "
                         f"{c_total} (dy shape {dy.shape})")
    top, left = _crop_offset(op, "dy", (h, w), skip_shape)
    c_up = c_total - c_skip
    dup = dy[:, :c_up].copy()
    dskip = np.zeros(skip_shape, dtype=dy.dtype)
    dskip[:, :, top:top + h, left:left + w] = dy[:, c_up:]
    return dup, dskip


# --------------------------------------------------------------------------------------------------
# 1x1 convolution (the final classifier)
# --------------------------------------------------------------------------------------------------

def conv1x1_forward(x, w, b):
    """1x1 convolution: ``y[n,o,i,j] = b[o] + sum_c x[n,c,i,j] w[o,c,0,0]``.

    Shapes: ``x[N,C,H,W], w[O,C,1,1], b[O] -> y[N,O,H,W]``.
    """
    op = "conv1x1_forward"
    x = _float_array(op, "x", x, "[N,C,H,W]")
    w = _float_array(op, "w", w, "[O,C,1,1]")
    b = _float_array(op, "b", b, "[O]")
    _check_weight(op, w, "x", x, 1, 1)
    _check_bias(op, b, w)
    n, c, h, width = x.shape
    o = w.shape[0]
    y = (w.reshape(o, c) @ x.reshape(n, c, h * width)).reshape(n, o, h, width)
    y += b.reshape(1, -1, 1, 1)
    return y


def _as_concat_op(op: str, compute):
    """Runs ``compute()``; a ValueError of the ops it composes is re-raised naming ``op``."""
    try:
        return compute()
    except ValueError as exc:
        raise ValueError(f"{op}: {exc}") from None


def conv3x3_concat_forward(up, skip, w, b, relu=False):
    """The 3x3 convolution of the concatenation ``[up, centre crop of skip]`` (the decoder's first
    convolution of a level), by definition ``conv3x3_forward(crop_concat_forward(up, skip), w, b,
    relu)``. The CUDA kernels compute it without storing the concatenation.
    Shapes: ``up[N,Cu,H,W], skip[N,Cs,Hs,Ws], w[O,Cu+Cs,3,3], b[O] -> y[N,O,H-2,W-2]``.
    """
    return _as_concat_op("conv3x3_concat_forward",
                         lambda: conv3x3_forward(crop_concat_forward(up, skip), w, b, relu))


def conv3x3_concat_backward_data(dy, w, skip_shape, up_relu_mask=None, skip_relu_mask=None):
    """Gradient of ``conv3x3_concat_forward`` with respect to ``up`` and ``skip``:
    ``crop_concat_backward(conv3x3_backward_data(dy, w), skip_shape)``; ``dskip`` is 0 outside the
    crop window. With ``up_relu_mask`` (``skip_relu_mask``), of ``dup``'s (``dskip``'s) shape,
    ``dup`` (``dskip``) is 0 where the mask is ``<= 0`` (as in ``conv3x3_backward_data``).
    Shapes: ``dy[N,O,P,Q], w[O,Cu+Cs,3,3], skip_shape (N,Cs,Hs,Ws) ->
    (dup[N,Cu,P+2,Q+2], dskip[N,Cs,Hs,Ws])``.
    """
    op = "conv3x3_concat_backward_data"
    dup, dskip = _as_concat_op(op, lambda: crop_concat_backward(conv3x3_backward_data(dy, w),
                                                                skip_shape))
    return (_relu_masked(op, "up_relu_mask", up_relu_mask, dup),
            _relu_masked(op, "skip_relu_mask", skip_relu_mask, dskip))


def conv3x3_concat_backward_weight(up, skip, dy):
    """Gradients of ``conv3x3_concat_forward`` with respect to its weights and bias:
    ``conv3x3_backward_weight(crop_concat_forward(up, skip), dy)``.
    Shapes: ``up[N,Cu,H,W], skip[N,Cs,Hs,Ws], dy[N,O,H-2,W-2] -> (dw[O,Cu+Cs,3,3], db[O])``.
    """
    return _as_concat_op("conv3x3_concat_backward_weight",
                         lambda: conv3x3_backward_weight(crop_concat_forward(up, skip), dy))


def conv1x1_backward_data(dy, w, relu_mask=None):
    """Gradient of the 1x1 convolution with respect to its input.

    ``dx[n,c,i,j] = sum_o dy[n,o,i,j] w[o,c,0,0]``; with ``relu_mask``, 0 where
    ``relu_mask <= 0`` (as in ``conv3x3_backward_data``).

    Shapes: ``dy[N,O,H,W], w[O,C,1,1] -> dx[N,C,H,W]``.
    """
    op = "conv1x1_backward_data"
    dy = _float_array(op, "dy", dy, "[N,O,H,W]")
    w = _float_array(op, "w", w, "[O,C,1,1]")
    _check_weight(op, w, "dy", dy, 0, 1)
    n, o, h, width = dy.shape
    c = w.shape[1]
    dx = (w.reshape(o, c).T @ dy.reshape(n, o, h * width)).reshape(n, c, h, width)
    return _relu_masked(op, "relu_mask", relu_mask, dx)


def conv1x1_backward_weight(x, dy):
    """Gradients of the 1x1 convolution with respect to its weights and bias.

    ``dw[o,c,0,0] = sum_{n,i,j} dy[n,o,i,j] x[n,c,i,j]``, ``db[o] = sum_{n,i,j} dy[n,o,i,j]``.

    Shapes: ``x[N,C,H,W], dy[N,O,H,W] -> (dw[O,C,1,1], db[O])``.
    """
    op = "conv1x1_backward_weight"
    x = _float_array(op, "x", x, "[N,C,H,W]")
    dy = _float_array(op, "dy", dy, "[N,O,H,W]")
    n, c, h, width = x.shape
    o = dy.shape[1]
    if dy.shape != (n, o, h, width):
        raise ValueError(f"{op}: dy has shape {dy.shape} but x has shape {x.shape}, so dy must have "
                         f"shape {(n, o, h, width)}")
    dy_flat = dy.reshape(n, o, h * width)
    dw = np.tensordot(dy_flat, x.reshape(n, c, h * width), axes=([0, 2], [0, 2]))
    return dw.reshape(o, c, 1, 1), dy_flat.sum(axis=(0, 2))


# --------------------------------------------------------------------------------------------------
# Pixel-wise softmax + weighted cross entropy
# --------------------------------------------------------------------------------------------------

def _check_loss_inputs(op: str, scores_name: str, scores, labels, weights):
    scores = _float_array(op, scores_name, scores, "[N,K,H,W]")
    labels = _integer_array(op, "labels", labels, "[N,H,W]")
    weights = _float_array(op, "weights", weights, "[N,H,W]")
    n, k, h, w = scores.shape
    if k < 1:
        raise ValueError(f"{op}: {scores_name} must have at least one class, got shape {scores.shape}")
    for name, a in (("labels", labels), ("weights", weights)):
        if a.shape != (n, h, w):
            raise ValueError(f"{op}: {name} has shape {a.shape} but {scores_name} has shape "
                             f"{scores.shape}, so {name} must have shape {(n, h, w)}")
    return scores, labels, weights


def _legal_labels(labels: np.ndarray, num_classes: int) -> tuple:
    """``(legal, safe)``: where a label lies in ``[0, K)``, and the labels with illegal ones set to 0
    (so they can be used as indices; the caller turns those pixels into NaN)."""
    legal = (labels >= 0) & (labels < num_classes)
    safe = np.where(legal, labels, 0).astype(np.intp)
    return legal, safe


def softmax_xent_forward(logits, labels, weights):
    """Pixel-wise softmax and weighted cross-entropy loss, normalised by the number of pixels.

    ``p[n,k,i,j] = exp(a_k - m) / sum_k' exp(a_k' - m)`` with ``m = max_k a_k`` (no overflow);
    ``loss = sum_{n,i,j} w[n,i,j] * -log p[n,label,i,j] / (N*H*W)``, where
    ``-log p[label] = log(sum_k exp(a_k - m)) - (a_label - m)`` (log-sum-exp: finite even where
    ``p`` underflows to 0).
    A label outside ``[0, K)`` makes the loss NaN.
    Shapes: ``logits[N,K,H,W], labels int[N,H,W], weights[N,H,W] -> (loss 0-d, probs[N,K,H,W])``.
    """
    op = "softmax_xent_forward"
    logits, labels, weights = _check_loss_inputs(op, "logits", logits, labels, weights)
    n, k, h, w = logits.shape
    dtype = np.result_type(logits, weights)
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    sum_exp = exp.sum(axis=1, keepdims=True)
    probs = exp / sum_exp
    legal, safe = _legal_labels(labels, k)
    shifted_of_label = np.take_along_axis(shifted, safe[:, None], axis=1)[:, 0]
    neg_log_p = np.log(sum_exp[:, 0]) - shifted_of_label
    neg_log_p = np.where(legal, neg_log_p, np.nan)
    loss = np.sum(weights * neg_log_p) / (n * h * w)
    return np.asarray(loss, dtype=dtype), probs


def softmax_xent_backward(probs, labels, weights, dloss=1.0):
    """Gradient of ``softmax_xent_forward``'s loss with respect to the logits.

    ``dlogits[n,k,i,j] = dloss * w[n,i,j] * (p[n,k,i,j] - [k == label[n,i,j]]) / (N*H*W)``;
    NaN at every pixel whose label lies outside ``[0, K)``.
    Shapes: ``probs[N,K,H,W], labels int[N,H,W], weights[N,H,W], dloss scalar -> dlogits[N,K,H,W]``.
    """
    op = "softmax_xent_backward"
    probs, labels, weights = _check_loss_inputs(op, "probs", probs, labels, weights)
    if np.ndim(dloss) != 0:
        raise ValueError(f"{op}: dloss must be a scalar or 0-d array, got shape {np.shape(dloss)}")
    n, k, h, w = probs.shape
    dtype = np.result_type(probs, weights)
    legal, safe = _legal_labels(labels, k)
    one_hot = safe[:, None] == np.arange(k).reshape(1, k, 1, 1)
    pixel_scale = weights * (np.asarray(dloss, dtype=dtype) / dtype.type(n * h * w))
    pixel_scale = np.where(legal, pixel_scale, np.nan).astype(dtype, copy=False)
    return ((probs - one_hot) * pixel_scale[:, None]).astype(dtype, copy=False)


# --------------------------------------------------------------------------------------------------
# Dropout with a counter-based mask (identical bits on CPU and GPU)
# --------------------------------------------------------------------------------------------------

_GOLDEN_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_MIX_1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX_2 = np.uint64(0x94D049BB133111EB)


def _device_scalar(op: str, name: str, value, dtype: type):
    """``value`` itself, unless it is an array: then it must be a 0-d NumPy array of ``dtype``, and
    its value is returned as a NumPy scalar of that dtype.

    The CUDA backend also takes these scalars as 0-d arrays in device memory, which its kernels
    read when they run (so that a captured CUDA graph sees each replay's value). Here the array is
    read now; the same value gives the same result in either form. A CuPy array is refused: the
    scalar must live where the data does.
    """
    if hasattr(value, "__cuda_array_interface__"):
        raise ValueError(f"{op}: {name} is a CUDA array, but this is the NumPy reference (CPU): pass "
                         f"a number or a 0-d {np.dtype(dtype).name} NumPy array")
    if not isinstance(value, np.ndarray):
        return value
    if value.ndim != 0 or value.dtype != dtype:
        raise ValueError(f"{op}: {name} given as an array must be 0-d {np.dtype(dtype).name}, got "
                         f"shape {value.shape} and dtype {value.dtype}")
    return value[()]


def dropout_mask(shape, p, seed):
    """Dropout keep-mask (1 = keep) from the splitmix64 finaliser of each element's flat index.

    For the C-order flat index ``i`` and a 64-bit ``seed``, all arithmetic modulo 2**64:
    ``z = seed + (i+1) * 0x9E3779B97F4A7C15``; ``z = (z ^ z>>30) * 0xBF58476D1CE4E5B9``;
    ``z = (z ^ z>>27) * 0x94D049BB133111EB``; ``z = z ^ z>>31``; ``u = (z >> 40) / 2**24`` (24
    uniform bits in [0, 1)); ``mask[i] = 1 if u >= p else 0``. Returns uint8 of the given shape.
    ``p`` must lie in [0, 1); ``seed`` must be an integer in [0, 2**64), or a 0-d uint64 array
    holding one (the form whose value a CUDA graph reads at each replay; docs/OPS.md).
    """
    op = "dropout_mask"
    p = _check_dropout_p(op, p)
    seed = _dropout_seed(op, seed)
    try:
        shape = (operator.index(shape),)
    except TypeError:
        shape = tuple(operator.index(s) for s in shape)
    if any(s < 0 for s in shape):
        raise ValueError(f"{op}: shape must be non-negative, got {shape}")
    return _keep_mask(int(np.prod(shape, dtype=np.int64)), p, seed).reshape(shape)


def _dropout_seed(op: str, seed) -> int:
    """``seed`` checked for ``op``: an integer in [0, 2**64), or a 0-d uint64 array holding one."""
    seed = _device_scalar(op, "seed", seed, np.uint64)
    try:
        seed = operator.index(seed)
    except TypeError:
        raise ValueError(f"{op}: seed must be an integer or a 0-d uint64 array, got {seed!r}") from None
    if not 0 <= seed < 2**64:
        raise ValueError(f"{op}: seed must be in [0, 2**64), got {seed}")
    return seed


def _keep_mask(count: int, p: float, seed: int) -> np.ndarray:
    """The flat uint8 keep-mask of ``count`` elements (the hash of ``dropout_mask``)."""
    with np.errstate(over="ignore"):
        z = np.uint64(seed) + (np.arange(count, dtype=np.uint64) + np.uint64(1)) * _GOLDEN_GAMMA
        z = (z ^ (z >> np.uint64(30))) * _MIX_1
        z = (z ^ (z >> np.uint64(27))) * _MIX_2
        z = z ^ (z >> np.uint64(31))
    uniform = (z >> np.uint64(40)).astype(np.float64) / 2.0**24   # exact: 24-bit integers
    return (uniform >= p).astype(np.uint8)


def _check_dropout_inputs(op: str, a_name: str, a, mask, p):
    a = np.asarray(a)
    if not np.issubdtype(a.dtype, np.floating):
        raise ValueError(f"{op}: {a_name} must have a float dtype, got {a.dtype} (shape {a.shape})")
    mask = np.asarray(mask)
    if not (np.issubdtype(mask.dtype, np.integer) or mask.dtype == np.bool_):
        raise ValueError(f"{op}: mask must be uint8 (0 or 1), got dtype {mask.dtype}")
    _same_shape(op, a_name, a, "mask", mask)
    return a, mask, _check_dropout_p(op, p)


def dropout_forward(x, mask, p):
    """Inverted dropout: ``y = x * mask / (1 - p)`` (kept elements are scaled up, so the expectation
    is unchanged and inference needs no rescaling)."""
    x, mask, p = _check_dropout_inputs("dropout_forward", "x", x, mask, p)
    return x * mask.astype(x.dtype) / x.dtype.type(1.0 - p)


def dropout_backward(dy, mask, p):
    """Gradient of inverted dropout: ``dx = dy * mask / (1 - p)``."""
    dy, mask, p = _check_dropout_inputs("dropout_backward", "dy", dy, mask, p)
    return dy * mask.astype(dy.dtype) / dy.dtype.type(1.0 - p)


def _dropout_seeded(op: str, a_name: str, a, p, seed):
    a = np.asarray(a)
    if not np.issubdtype(a.dtype, np.floating):
        raise ValueError(f"{op}: {a_name} must have a float dtype, got {a.dtype} (shape {a.shape})")
    p = _check_dropout_p(op, p)
    mask = _keep_mask(a.size, p, _dropout_seed(op, seed)).reshape(a.shape)
    return a * mask.astype(a.dtype) / a.dtype.type(1.0 - p)


def dropout_seeded_forward(x, p, seed):
    """``dropout_forward(x, dropout_mask(x.shape, p, seed), p)`` as one op: the mask is made where
    it is applied and never kept (on the GPU, hashed per element by the kernel that applies it).
    ``seed`` as for ``dropout_mask``."""
    return _dropout_seeded("dropout_seeded_forward", "x", x, p, seed)


def dropout_seeded_backward(dy, p, seed):
    """The gradient of ``dropout_seeded_forward`` with the same ``p`` and ``seed``:
    ``dropout_backward(dy, dropout_mask(dy.shape, p, seed), p)``, the mask made again."""
    return _dropout_seeded("dropout_seeded_backward", "dy", dy, p, seed)


# --------------------------------------------------------------------------------------------------
# In-place updates
# --------------------------------------------------------------------------------------------------

def _writable_float_array(op: str, name: str, a) -> np.ndarray:
    if not isinstance(a, np.ndarray):
        raise ValueError(f"{op}: {name} is updated in place and must be a numpy array, got {type(a)}")
    if not np.issubdtype(a.dtype, np.floating):
        raise ValueError(f"{op}: {name} must have a float dtype, got {a.dtype} (shape {a.shape})")
    if not a.flags.writeable:
        raise ValueError(f"{op}: {name} is updated in place but is read-only (shape {a.shape})")
    return a


def accumulate_(dst, src):
    """Gradient accumulation in place: ``dst += src``; returns ``dst``."""
    op = "accumulate_"
    dst = _writable_float_array(op, "dst", dst)
    src = np.asarray(src)
    _same_shape(op, "dst", dst, "src", src)
    dst += src
    return dst


def sgd_momentum_update_(param, grad, velocity, lr, momentum, weight_decay):
    """One SGD step with momentum and weight decay, in place (Caffe's rule); returns None.

    ``v = momentum * v + lr * (grad + weight_decay * param)``; ``param -= v``. ``lr`` is a number or
    a 0-d float32 array (the form whose value a CUDA graph reads at each replay; docs/OPS.md); for
    float32 parameters the rate ``r`` and the array ``np.float32(r)`` give identical results.
    """
    op = "sgd_momentum_update_"
    lr = _device_scalar(op, "lr", lr, np.float32)
    param = _writable_float_array(op, "param", param)
    velocity = _writable_float_array(op, "velocity", velocity)
    grad = np.asarray(grad)
    _same_shape(op, "param", param, "grad", grad)
    _same_shape(op, "param", param, "velocity", velocity)
    _sgd_step(param, grad, velocity, lr, momentum, weight_decay)
    return None


def _sgd_step(param, grad, velocity, lr, momentum, weight_decay) -> None:
    """Caffe's rule in place on arrays already checked (both SGD ops)."""
    velocity[...] = momentum * velocity + lr * (grad + weight_decay * param)
    param -= velocity


def array_sequence(op: str, name: str, value) -> list:
    """``value`` as a list of its arrays: a list, tuple or other sized sequence, not an array (which
    ``list`` would split into rows), a string or a mapping."""
    if isinstance(value, (str, bytes, dict, np.ndarray)) or hasattr(value, "__cuda_array_interface__") \
            or not hasattr(value, "__len__") or not hasattr(value, "__iter__"):
        raise TypeError(f"{op}: {name} must be a sequence of arrays, got {type(value).__name__}")
    return list(value)


def _real_scalar(op: str, name: str, value) -> None:
    if np.ndim(value) != 0 or not np.isrealobj(value) or isinstance(value, (bool, np.bool_)) \
            or not np.issubdtype(np.asarray(value).dtype, np.number):
        raise TypeError(f"{op}: {name} must be a real number, got {value!r}")


def sgd_momentum_update_multi_(params, grads, velocities, lr, momentum, weight_decay):
    """``sgd_momentum_update_`` of every ``(params[i], grads[i], velocities[i])``, in place; returns
    None. Everything is checked before anything is updated, so a bad argument changes nothing: the
    arrays (float parameters and velocities, writable; real gradients of their shapes), the
    scalars, and that no parameter or velocity shares memory with another argument (as the CUDA
    backend checks). The CUDA backend updates up to 32 parameters per launch, with the same bits as
    one call each.
    """
    op = "sgd_momentum_update_multi_"
    params = array_sequence(op, "params", params)
    grads = array_sequence(op, "grads", grads)
    velocities = array_sequence(op, "velocities", velocities)
    for name, seq in (("grads", grads), ("velocities", velocities)):
        if len(seq) != len(params):
            raise ValueError(f"{op}: {name} must hold as many arrays as params ({len(params)}), "
                             f"got {len(seq)}")
    lr = _device_scalar(op, "lr", lr, np.float32)
    for name, value in (("lr", lr), ("momentum", momentum), ("weight_decay", weight_decay)):
        _real_scalar(op, name, value)
    triples, named = [], []
    for i, (param, grad, velocity) in enumerate(zip(params, grads, velocities)):
        param = _writable_float_array(op, f"params[{i}]", param)
        velocity = _writable_float_array(op, f"velocities[{i}]", velocity)
        grad = np.asarray(grad)
        if not np.issubdtype(grad.dtype, np.number) or np.iscomplexobj(grad):
            raise ValueError(f"{op}: grads[{i}] must have a real dtype, got {grad.dtype}")
        _same_shape(op, f"params[{i}]", param, f"grads[{i}]", grad)
        _same_shape(op, f"params[{i}]", param, f"velocities[{i}]", velocity)
        triples.append((param, grad, velocity))
        named += [(f"params[{i}]", param, True), (f"grads[{i}]", grad, False),
                  (f"velocities[{i}]", velocity, True)]
    # overlaps by memory extents, sorted: each array against those that start inside it
    spans = sorted((*_byte_bounds(a), i) for i, (_, a, _) in enumerate(named) if a.size)
    for k, (low, high, i) in enumerate(spans):
        for low_j, _, j in spans[k + 1:]:
            if low_j >= high:
                break
            if named[i][2] or named[j][2]:
                first, second = sorted((i, j))
                out, other = (second, first) if named[second][2] else (first, second)
                raise ValueError(f"{op}: {named[out][0]} overlaps {named[other][0]} in memory")
    for param, grad, velocity in triples:
        _sgd_step(param, grad, velocity, lr, momentum, weight_decay)
    return None


# --------------------------------------------------------------------------------------------------
# The augmentation warp: elastic deformation, flips, quarter turns and gray values as one gather
# --------------------------------------------------------------------------------------------------

def _keys_weights(t: np.ndarray) -> tuple:
    """Keys' cubic-convolution weights (a = -0.5) of the taps at offsets -1, 0, 1, 2 from ``floor(s)``,
    for the fraction ``t = s - floor(s)`` in [0, 1). They sum to 1 and are exactly (0, 1, 0, 0) at
    ``t = 0``; the same polynomials, in the same form, as csrc/warp.cu."""
    return (t * (t * (-0.5 * t + 1.0) - 0.5),
            t * t * (1.5 * t - 2.5) + 1.0,
            t * (t * (-1.5 * t + 2.0) + 0.5),
            t * t * (0.5 * t - 0.5))


def _node_weights(n_pixels: int, n_nodes: int) -> np.ndarray:
    """``[n_pixels, n_nodes]``: row ``p`` holds the weights with which pixel ``p`` reads the nodes of one axis.

    Node ``a`` sits at pixel ``a (n_pixels - 1) / (n_nodes - 1)``, so pixel ``p`` has the node
    coordinate ``u = p (n_nodes - 1) / (n_pixels - 1)`` (0 when either count is 1), whose integer
    part and fraction come exactly from the integer ``p (n_nodes - 1)`` divided by ``n_pixels - 1``.
    Keys taps ``floor(u) - 1 .. floor(u) + 2``, clamped to the nodes (edge nodes replicated).
    """
    pixels = np.arange(n_pixels, dtype=np.int64)
    if n_nodes == 1 or n_pixels == 1:
        base, t = np.zeros(n_pixels, dtype=np.int64), np.zeros(n_pixels)
    else:
        base, remainder = np.divmod(pixels * (n_nodes - 1), n_pixels - 1)
        t = remainder / (n_pixels - 1)
    matrix = np.zeros((n_pixels, n_nodes))
    for offset, weight in zip((-1, 0, 1, 2), _keys_weights(t)):
        np.add.at(matrix, (pixels, np.clip(base + offset, 0, n_nodes - 1)), weight)
    return matrix


def _augment_displacement(coarse, height: int, width: int) -> np.ndarray:
    """The per-pixel displacement ``[2, height, width]`` (float64, px) of :func:`augment_warp`: the
    node values ``coarse[2, gy, gx]`` interpolated by Keys' cubic convolution along each axis."""
    coarse = np.asarray(coarse, dtype=np.float64)
    rows = _node_weights(height, coarse.shape[1])
    columns = _node_weights(width, coarse.shape[2])
    return np.stack([rows @ nodes @ columns.T for nodes in coarse])


def _mirror(index: np.ndarray, n: int) -> np.ndarray:
    """Integer positions mirrored into ``[0, n)`` without repeating the edge (numpy's ``'reflect'``):
    period ``2 (n - 1)``; every position is 0 when ``n == 1``."""
    if n == 1:
        return np.zeros_like(index)
    period = 2 * (n - 1)
    folded = np.mod(index, period)
    return np.where(folded < n, folded, period - folded)


def _source_taps(position: np.ndarray, shift: np.ndarray, n: int) -> tuple:
    """Tap base ``position + floor(shift)`` (int64) and fraction ``shift - floor(shift)`` (exact).

    ``floor(shift)`` is first reduced modulo the mirror period ``2 (n - 1)``, which changes no
    mirrored tap and keeps any finite shift, however far outside, within int64.
    """
    whole = np.floor(shift)
    fraction = shift - whole
    whole = np.mod(whole, 2 * (n - 1)) if n > 1 else np.zeros_like(whole)
    return position + whole.astype(np.int64), fraction


def _check_augment_scalars(op: str, quarter_turns, gamma, contrast, brightness) -> tuple:
    if isinstance(quarter_turns, (bool, np.bool_)):
        raise ValueError(f"{op}: quarter_turns must be an integer 0, 1, 2 or 3, got {quarter_turns!r}")
    try:
        turns = operator.index(quarter_turns)
    except TypeError:
        raise ValueError(f"{op}: quarter_turns must be an integer 0, 1, 2 or 3, got {quarter_turns!r}") from None
    if not 0 <= turns <= 3:
        raise ValueError(f"{op}: quarter_turns must be an integer 0, 1, 2 or 3, got {turns}")
    values = []
    for name, value, rule in (("gamma", gamma, "finite and > 0"), ("contrast", contrast, "finite"),
                              ("brightness", brightness, "finite")):
        value = float(value)
        if not np.isfinite(value) or (name == "gamma" and value <= 0.0):
            raise ValueError(f"{op}: {name} must be {rule}, got {value!r}")
        values.append(value)
    return (turns, *values)


def augment_warp(image, labels, weights, coarse, quarter_turns=0, flip_rows=False, flip_columns=False,
                 gamma=1.0, contrast=1.0, brightness=0.0):
    """One draw of the training augmentation applied jointly to a window; docs/OPS.md defines it.

    ``image[H,W]`` (float), ``labels[H,W]`` (integer), ``weights[H,W]`` (float) are the source
    window; ``coarse[2,gy,gx]`` the displacements in px at the nodes of the elastic grid
    (``[0]`` rows, ``[1]`` columns). Returns ``(image_out, labels_out, weights_out)`` of shape
    ``[H,W]`` and the input dtypes: the composition of

    1. the elastic warp ``out[y, x] = in[y + dy(y, x), x + dx(y, x)]`` with the displacement
       Keys-bicubic in the nodes (node ``(a, b)`` at pixel ``(a (H-1)/(gy-1), b (W-1)/(gx-1))``),
       image Keys bicubic, labels nearest (``floor(s + 1/2)``), weights bilinear, positions outside
       mirrored without repeating the edge (numpy's ``'reflect'``);
    2. ``flip_rows`` (up-down) and ``flip_columns`` (left-right);
    3. ``quarter_turns`` counter-clockwise quarter turns, as ``np.rot90`` (``H == W`` when odd);
    4. on the image: ``clip(v, 0, 1)``, ``v ** gamma`` (skipped for gamma 1), then
       ``clip(contrast v + 0.5 - 0.5 contrast + brightness, 0, 1)``.

    Every output pixel is gathered from the source directly: the turns and flips are undone to find
    its position in the warped window, the displacement there gives the source position. Computed
    in float64. ``coarse`` must be finite.
    """
    op = "augment_warp"
    image = _float_array(op, "image", image, "[H,W]")
    labels = _integer_array(op, "labels", labels, "[H,W]")
    weights = _float_array(op, "weights", weights, "[H,W]")
    coarse = _float_array(op, "coarse", coarse, "[2,gy,gx]")
    _same_shape(op, "image", image, "labels", labels)
    _same_shape(op, "image", image, "weights", weights)
    height, width = image.shape
    if height < 1 or width < 1:
        raise ValueError(f"{op}: image must have H and W >= 1, got shape {image.shape}")
    if coarse.shape[0] != 2 or coarse.shape[1] < 1 or coarse.shape[2] < 1:
        raise ValueError(f"{op}: coarse must have shape (2, gy, gx) with gy, gx >= 1, got {coarse.shape}")
    if not np.isfinite(coarse).all():
        raise ValueError(f"{op}: coarse holds NaN or Inf (shape {coarse.shape})")
    turns, gamma, contrast, brightness = _check_augment_scalars(op, quarter_turns, gamma, contrast, brightness)
    if turns % 2 == 1 and height != width:
        raise ValueError(f"{op}: quarter_turns {turns} needs a square window (the output keeps the "
                         f"source shape), got image shape {image.shape}")

    # Output pixel (i, j) -> (p, q) in the flipped window (undo the turns) -> (y, x) in the warped one.
    i, j = np.indices((height, width))
    last_row, last_column = height - 1, width - 1
    p, q = {0: (i, j), 1: (j, last_column - i), 2: (last_row - i, last_column - j),
            3: (last_row - j, i)}[turns]
    y = last_row - p if flip_rows else p
    x = last_column - q if flip_columns else q

    field = _augment_displacement(coarse, height, width)
    base_y, t_y = _source_taps(y, field[0][y, x], height)
    base_x, t_x = _source_taps(x, field[1][y, x], width)
    rows = [_mirror(base_y + k, height) for k in (-1, 0, 1, 2)]
    columns = [_mirror(base_x + k, width) for k in (-1, 0, 1, 2)]

    source = image.astype(np.float64)
    weights_x = _keys_weights(t_x)
    value = np.zeros((height, width))
    for row, weight_y in zip(rows, _keys_weights(t_y)):
        along_row = np.zeros((height, width))
        for column, weight_x in zip(columns, weights_x):
            along_row += weight_x * source[row, column]
        value += weight_y * along_row
    value = np.clip(value, 0.0, 1.0)
    if gamma != 1.0:
        value = value ** gamma
    value = np.clip(value * contrast + (0.5 - 0.5 * contrast + brightness), 0.0, 1.0)

    # Nearest neighbour: floor(s + 1/2) is tap base + 1 when the fraction is >= 1/2, else base.
    nearest_y = np.where(t_y >= 0.5, rows[2], rows[1])
    nearest_x = np.where(t_x >= 0.5, columns[2], columns[1])
    labels_out = labels[nearest_y, nearest_x]

    w = weights.astype(np.float64)
    weights_out = ((1.0 - t_y) * ((1.0 - t_x) * w[rows[1], columns[1]] + t_x * w[rows[1], columns[2]])
                   + t_y * ((1.0 - t_x) * w[rows[2], columns[1]] + t_x * w[rows[2], columns[2]]))
    return value.astype(image.dtype), labels_out, weights_out.astype(weights.dtype)
