"""Tests of the NumPy reference ops (unet_cuda/ops/reference.py) against docs/OPS.md.

* every backward against central finite differences in float64 on tiny, odd shapes;
* exact results on small-integer inputs against naive loops written here;
* the hand-specified rules: max-pool ties, crop offsets, the loss formula, the dropout hash bits,
  Caffe's SGD step, and the error messages for bad shapes.
"""

from __future__ import annotations

import math
import re
import zlib
from pathlib import Path

import numpy as np
import pytest

from unet_cuda.ops import reference as ref

FD_EPS = 1e-6
FD_RTOL = 1e-6


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------

def rng_for(*key) -> np.random.Generator:
    """A generator seeded from a test's parameters, so every case has its own fixed inputs."""
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def finite_difference_gradient(loss_of, array: np.ndarray, eps: float = FD_EPS) -> np.ndarray:
    """Central differences of the scalar ``loss_of()`` with respect to every element of ``array``,
    which ``loss_of`` reads (it is perturbed in place and restored)."""
    grad = np.zeros_like(array)
    flat = array.reshape(-1)                      # a view: perturbing it perturbs ``array``
    grad_flat = grad.reshape(-1)
    for k in range(flat.size):
        saved = flat[k]
        flat[k] = saved + eps
        plus = loss_of()
        flat[k] = saved - eps
        minus = loss_of()
        flat[k] = saved
        grad_flat[k] = (plus - minus) / (2 * eps)
    return grad


def assert_close(name: str, actual, expected, rtol: float = FD_RTOL) -> None:
    """Max abs error and error relative to the largest expected magnitude, printed, then asserted."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    abs_err = float(np.max(np.abs(actual - expected))) if actual.size else 0.0
    scale = max(float(np.max(np.abs(expected))) if expected.size else 0.0, 1e-12)
    rel_err = abs_err / scale
    print(f"{name}: max abs err {abs_err:.3e}, rel err {rel_err:.3e} (scale {scale:.3e})")
    assert rel_err < rtol, f"{name}: relative error {rel_err:.3e} >= {rtol:.0e}"


def projection_loss(output_of, projection: np.ndarray):
    """``L = sum(output_of() * R)``: a random linear functional of an op's output, whose gradient
    with respect to the output is ``R`` itself."""
    return lambda: float(np.sum(output_of() * projection))


def fd_check(name: str, loss_of, array: np.ndarray, analytic: np.ndarray) -> None:
    assert_close(name, analytic, finite_difference_gradient(loss_of, array))


# --------------------------------------------------------------------------------------------------
# The op list
# --------------------------------------------------------------------------------------------------

def test_all_lists_exactly_the_ops_of_the_contract():
    ops_md = Path(__file__).resolve().parents[1] / "docs" / "OPS.md"
    if not ops_md.exists():
        pytest.skip(f"{ops_md} not found")
    documented = set(re.findall(r"^\| `(\w+)` \|", ops_md.read_text(), flags=re.MULTILINE))
    print("documented ops:", sorted(documented))
    assert isinstance(ref.__all__, tuple)
    assert set(ref.__all__) == documented
    assert len(ref.__all__) == len(set(ref.__all__))
    for name in ref.__all__:
        assert callable(getattr(ref, name))


# --------------------------------------------------------------------------------------------------
# 3x3 convolution
# --------------------------------------------------------------------------------------------------

CONV3X3_SHAPES = [  # (N, C, H, W, O)
    (1, 1, 5, 5, 1),
    (2, 3, 7, 9, 2),
    (1, 2, 9, 6, 3),
    (2, 1, 3, 3, 2),
]


def naive_conv3x3(x, w, b):
    n_batch, _, h, width = x.shape
    n_out, n_in = w.shape[:2]
    y = np.zeros((n_batch, n_out, h - 2, width - 2), dtype=np.float64)
    for n in range(n_batch):
        for o in range(n_out):
            for i in range(h - 2):
                for j in range(width - 2):
                    total = b[o]
                    for c in range(n_in):
                        for ky in range(3):
                            for kx in range(3):
                                total += x[n, c, i + ky, j + kx] * w[o, c, ky, kx]
                    y[n, o, i, j] = total
    return y


def test_conv3x3_forward_exact_on_small_integers():
    rng = np.random.default_rng(1)
    x = rng.integers(-4, 5, size=(2, 3, 6, 7)).astype(np.float64)
    w = rng.integers(-3, 4, size=(2, 3, 3, 3)).astype(np.float64)
    b = np.array([1.0, -2.0])
    y = ref.conv3x3_forward(x, w, b)
    expected = naive_conv3x3(x, w, b)
    print("conv3x3 exact: max abs err", np.max(np.abs(y - expected)))
    assert y.shape == (2, 2, 4, 5)
    assert np.array_equal(y, expected)
    assert np.array_equal(ref.conv3x3_forward(x, w, b, relu=True), np.maximum(expected, 0))


def test_conv3x3_forward_hand_case():
    # A single 3x3 window of ones against a kernel 1..9 sums the kernel: 45, plus the bias.
    x = np.ones((1, 1, 3, 4))
    w = np.arange(1.0, 10.0).reshape(1, 1, 3, 3)
    y = ref.conv3x3_forward(x, w, np.array([0.5]))
    assert np.array_equal(y, np.full((1, 1, 1, 2), 45.5))


@pytest.mark.parametrize("relu", [False, True], ids=["linear", "relu"])
@pytest.mark.parametrize("shape", CONV3X3_SHAPES, ids=str)
def test_conv3x3_gradients_by_finite_differences(shape, relu):
    n, c, h, width, o = shape
    rng = rng_for("conv3x3", shape, relu)
    x = rng.standard_normal((n, c, h, width))
    w = rng.standard_normal((o, c, 3, 3))
    b = rng.standard_normal(o)
    projection = rng.standard_normal((n, o, h - 2, width - 2))

    y = ref.conv3x3_forward(x, w, b, relu=relu)
    dy = ref.relu_backward(y, projection) if relu else projection
    dx = ref.conv3x3_backward_data(dy, w)
    dw, db = ref.conv3x3_backward_weight(x, dy)
    assert dx.shape == x.shape and dw.shape == w.shape and db.shape == b.shape

    loss_of = projection_loss(lambda: ref.conv3x3_forward(x, w, b, relu=relu), projection)
    fd_check("conv3x3 dx", loss_of, x, dx)
    fd_check("conv3x3 dw", loss_of, w, dw)
    fd_check("conv3x3 db", loss_of, b, db)


def test_conv3x3_accepts_non_contiguous_inputs():
    rng = np.random.default_rng(2)
    big_x = rng.standard_normal((2, 6, 11, 14))
    big_w = rng.standard_normal((3, 4, 3, 3, 2))
    x = big_x[:, ::2, 1:, ::2]                    # strided view [2, 3, 10, 7]
    w = big_w[:, :3, :, :, 1]                     # strided view [3, 3, 3, 3]
    b = np.array([0.1, 0.2, 0.3])
    assert not x.flags.c_contiguous and not w.flags.c_contiguous
    y = ref.conv3x3_forward(x, w, b)
    assert y.flags.c_contiguous
    assert_close("conv3x3 strided", y, ref.conv3x3_forward(x.copy(), w.copy(), b), rtol=1e-14)


def test_relu_backward_hand_case():
    y = np.array([[-1.0, 0.0, 2.0, 1e-30]])
    dy = np.array([[5.0, 6.0, 7.0, 8.0]])
    assert np.array_equal(ref.relu_backward(y, dy), [[0.0, 0.0, 7.0, 8.0]])


# --------------------------------------------------------------------------------------------------
# Max-pool
# --------------------------------------------------------------------------------------------------

def pool_input(*windows):
    """A [1, len(windows), 2, 2] input, one hand-written 2x2 window per channel."""
    return np.array(windows, dtype=np.float64).reshape(1, len(windows), 2, 2)


def test_maxpool_tie_rule_first_maximum_in_raster_order_wins():
    x = pool_input(
        [[3, 3], [3, 3]],      # all equal               -> (0,0), argmax 0
        [[1, 7], [7, 2]],      # two maxima (0,1),(1,0)  -> (0,1), argmax 1
        [[5, 1], [2, 5]],      # two maxima (0,0),(1,1)  -> (0,0), argmax 0
        [[1, 2], [4, 4]],      # two maxima (1,0),(1,1)  -> (1,0), argmax 2
        [[1, 2], [3, 4]],      # single maximum          -> (1,1), argmax 3
        [[-2, -1], [-1, -3]],  # negative, tie           -> (0,1), argmax 1
    )
    y, argmax = ref.maxpool2x2_forward(x)
    assert argmax.dtype == np.uint8
    assert argmax.reshape(-1).tolist() == [0, 1, 0, 2, 3, 1]
    assert y.reshape(-1).tolist() == [3, 7, 5, 4, 4, -1]

    dy = np.arange(1.0, 7.0).reshape(y.shape)
    dx = ref.maxpool2x2_backward(dy, argmax)
    expected = np.zeros_like(x)
    for channel, (a, b) in enumerate([(0, 0), (0, 1), (0, 0), (1, 0), (1, 1), (0, 1)]):
        expected[0, channel, a, b] = channel + 1
    assert np.array_equal(dx, expected)


def test_maxpool_nan_follows_the_strictly_greater_scan():
    # No comparison with NaN is true: a NaN first element is kept, a later NaN is never taken.
    x = pool_input([[np.nan, 1], [2, 3]], [[1, np.nan], [2, 0]])
    y, argmax = ref.maxpool2x2_forward(x)
    assert argmax.reshape(-1).tolist() == [0, 2]
    assert np.isnan(y[0, 0, 0, 0]) and y[0, 1, 0, 0] == 2


def test_maxpool_windows_are_independent():
    x = np.arange(16.0).reshape(1, 1, 4, 4)[:, :, ::-1]   # strided view, max at each window's (0,1)
    y, argmax = ref.maxpool2x2_forward(x)
    assert y[0, 0].tolist() == [[13, 15], [5, 7]]
    assert argmax[0, 0].tolist() == [[1, 1], [1, 1]]


@pytest.mark.parametrize("shape", [(1, 1, 2, 2), (2, 3, 6, 4), (1, 2, 8, 10)], ids=str)
def test_maxpool_gradient_by_finite_differences(shape):
    rng = rng_for("maxpool", shape)
    x = rng.standard_normal(shape)
    y, argmax = ref.maxpool2x2_forward(x)
    assert y.shape == argmax.shape == (shape[0], shape[1], shape[2] // 2, shape[3] // 2)
    projection = rng.standard_normal(y.shape)
    dx = ref.maxpool2x2_backward(projection, argmax)
    loss_of = projection_loss(lambda: ref.maxpool2x2_forward(x)[0], projection)
    fd_check("maxpool dx", loss_of, x, dx)


@pytest.mark.parametrize("shape", [(1, 1, 5, 4), (1, 1, 4, 7), (2, 2, 3, 3)], ids=str)
def test_maxpool_rejects_odd_sizes(shape):
    with pytest.raises(ValueError, match=r"maxpool2x2_forward: x must have even H and W"):
        ref.maxpool2x2_forward(np.zeros(shape))


# --------------------------------------------------------------------------------------------------
# Up-convolution
# --------------------------------------------------------------------------------------------------

def naive_upconv2x2(x, w, b):
    n_batch, n_in, h, width = x.shape
    n_out = w.shape[0]
    y = np.zeros((n_batch, n_out, 2 * h, 2 * width))
    for n in range(n_batch):
        for o in range(n_out):
            for i in range(h):
                for j in range(width):
                    for ky in range(2):
                        for kx in range(2):
                            y[n, o, 2 * i + ky, 2 * j + kx] = b[o] + sum(
                                x[n, c, i, j] * w[o, c, ky, kx] for c in range(n_in))
    return y


def test_upconv2x2_forward_hand_case():
    x = np.array([[1.0, 2.0], [3.0, 4.0]]).reshape(1, 1, 2, 2)
    w = np.array([[1.0, 10.0], [100.0, 1000.0]]).reshape(1, 1, 2, 2)
    y = ref.upconv2x2_forward(x, w, np.array([0.5]))
    expected = np.array([
        [1.5, 10.5, 2.5, 20.5],
        [100.5, 1000.5, 200.5, 2000.5],
        [3.5, 30.5, 4.5, 40.5],
        [300.5, 3000.5, 400.5, 4000.5],
    ])
    assert np.array_equal(y[0, 0], expected)


def test_upconv2x2_forward_hand_case_sums_over_input_channels():
    # Two input channels, two outputs: output 0 adds the channels, output 1 subtracts them,
    # with the tap (ky, kx) scaled by 1 + 2*ky + kx.
    x = np.array([[[[1.0]], [[3.0]]]])                    # [1, 2, 1, 1]
    tap_scale = np.array([[1.0, 2.0], [3.0, 4.0]])
    w = np.stack([np.stack([tap_scale, tap_scale]), np.stack([tap_scale, -tap_scale])])
    y = ref.upconv2x2_forward(x, w, np.array([0.0, 1.0]))
    assert np.array_equal(y[0, 0], [[4, 8], [12, 16]])     # (1 + 3) * tap_scale
    assert np.array_equal(y[0, 1], [[-1, -3], [-5, -7]])   # (1 - 3) * tap_scale + 1


def test_upconv2x2_forward_exact_on_small_integers():
    rng = np.random.default_rng(3)
    x = rng.integers(-4, 5, size=(2, 3, 3, 4)).astype(np.float64)
    w = rng.integers(-3, 4, size=(2, 3, 2, 2)).astype(np.float64)
    b = np.array([2.0, -1.0])
    assert np.array_equal(ref.upconv2x2_forward(x, w, b), naive_upconv2x2(x, w, b))


UPCONV_SHAPES = [  # (N, C, H, W, O)
    (1, 1, 1, 1, 1),
    (2, 3, 3, 5, 2),
    (1, 2, 4, 3, 3),
]


@pytest.mark.parametrize("shape", UPCONV_SHAPES, ids=str)
def test_upconv2x2_gradients_by_finite_differences(shape):
    n, c, h, width, o = shape
    rng = rng_for("upconv", shape)
    x = rng.standard_normal((n, c, h, width))
    w = rng.standard_normal((o, c, 2, 2))
    b = rng.standard_normal(o)
    projection = rng.standard_normal((n, o, 2 * h, 2 * width))
    dx = ref.upconv2x2_backward_data(projection, w)
    dw, db = ref.upconv2x2_backward_weight(x, projection)
    assert dx.shape == x.shape and dw.shape == w.shape and db.shape == b.shape
    loss_of = projection_loss(lambda: ref.upconv2x2_forward(x, w, b), projection)
    fd_check("upconv dx", loss_of, x, dx)
    fd_check("upconv dw", loss_of, w, dw)
    fd_check("upconv db", loss_of, b, db)


# --------------------------------------------------------------------------------------------------
# Crop + concat
# --------------------------------------------------------------------------------------------------

def test_crop_concat_square_offset_two():
    skip = np.arange(64.0).reshape(1, 1, 8, 8)
    up = -np.ones((1, 2, 4, 4))
    y = ref.crop_concat_forward(up, skip)
    assert y.shape == (1, 3, 4, 4)
    assert np.array_equal(y[:, :2], up)
    # Rows 2..5, columns 2..5 of arange(64) laid out 8 per row.
    expected = np.array([[8 * r + col for col in range(2, 6)] for r in range(2, 6)], dtype=float)
    assert np.array_equal(y[0, 2], expected)


def test_crop_concat_non_square_offsets():
    skip = np.arange(2 * 60.0).reshape(1, 2, 10, 6)
    up = np.zeros((1, 1, 4, 2))
    y = ref.crop_concat_forward(up, skip)
    # offset ((10 - 4) / 2, (6 - 2) / 2) = (3, 2)
    assert np.array_equal(y[0, 1:], skip[0, :, 3:7, 2:4])
    assert y[0, 1, 0, 0] == 3 * 6 + 2
    # no crop at all when the sizes agree
    assert np.array_equal(ref.crop_concat_forward(np.zeros((1, 1, 10, 6)), skip)[:, 1:], skip)


def test_crop_concat_backward_hand_case():
    dy = np.arange(1.0, 1 + 3 * 2 * 2).reshape(1, 3, 2, 2)
    dup, dskip = ref.crop_concat_backward(dy, (1, 2, 4, 6))
    assert np.array_equal(dup, dy[:, :1])
    expected = np.zeros((1, 2, 4, 6))
    expected[:, :, 1:3, 2:4] = dy[:, 1:]                  # offset (1, 2)
    assert np.array_equal(dskip, expected)


@pytest.mark.parametrize("up_shape, skip_shape", [
    ((1, 1, 3, 3), (1, 2, 7, 5)),
    ((2, 2, 4, 2), (2, 1, 4, 8)),
    ((1, 3, 1, 1), (1, 1, 3, 1)),
], ids=str)
def test_crop_concat_gradients_by_finite_differences(up_shape, skip_shape):
    rng = rng_for("crop_concat", up_shape, skip_shape)
    up = rng.standard_normal(up_shape)
    skip = rng.standard_normal(skip_shape)
    out_shape = (up_shape[0], up_shape[1] + skip_shape[1]) + up_shape[2:]
    projection = rng.standard_normal(out_shape)
    dup, dskip = ref.crop_concat_backward(projection, skip_shape)
    loss_of = projection_loss(lambda: ref.crop_concat_forward(up, skip), projection)
    fd_check("crop_concat dup", loss_of, up, dup)
    fd_check("crop_concat dskip", loss_of, skip, dskip)


@pytest.mark.parametrize("up_shape, skip_shape, message", [
    ((1, 1, 4, 4), (1, 1, 7, 8), r"crop_concat_forward: skip \(7x8.*even"),
    ((1, 1, 4, 4), (1, 1, 8, 5), r"crop_concat_forward: skip \(8x5.*even"),
    ((1, 1, 4, 4), (1, 1, 2, 8), r"crop_concat_forward: skip \(2x8.*smaller than up \(4x4\)"),
    ((2, 1, 4, 4), (1, 1, 8, 8), r"crop_concat_forward: up has batch size 2"),
], ids=str)
def test_crop_concat_rejects_bad_sizes(up_shape, skip_shape, message):
    with pytest.raises(ValueError, match=message):
        ref.crop_concat_forward(np.zeros(up_shape), np.zeros(skip_shape))


def test_crop_concat_backward_rejects_bad_skip_shape():
    dy = np.zeros((1, 3, 4, 4))
    with pytest.raises(ValueError, match=r"crop_concat_backward: skip \(7x8.*even"):
        ref.crop_concat_backward(dy, (1, 1, 7, 8))
    too_many_channels = r"crop_concat_backward: skip_shape \(1, 4, 8, 8\) has 4 channels"
    with pytest.raises(ValueError, match=too_many_channels):
        ref.crop_concat_backward(dy, (1, 4, 8, 8))
    with pytest.raises(ValueError, match=r"crop_concat_backward: skip_shape must be 4"):
        ref.crop_concat_backward(dy, (1, 4, 8))


# --------------------------------------------------------------------------------------------------
# 1x1 convolution
# --------------------------------------------------------------------------------------------------

def test_conv1x1_forward_hand_case():
    x = np.array([1.0, 2.0, 3.0]).reshape(1, 3, 1, 1) * np.ones((1, 3, 2, 1))
    w = np.array([[1.0, 10.0, 100.0], [-1.0, 0.0, 1.0]]).reshape(2, 3, 1, 1)
    y = ref.conv1x1_forward(x, w, np.array([0.5, 0.0]))
    assert np.array_equal(y[0, :, :, 0], [[321.5, 321.5], [2.0, 2.0]])


@pytest.mark.parametrize("shape", [(1, 1, 1, 1, 1), (2, 3, 5, 7, 2), (1, 2, 3, 2, 3)], ids=str)
def test_conv1x1_gradients_by_finite_differences(shape):
    n, c, h, width, o = shape
    rng = rng_for("conv1x1", shape)
    x = rng.standard_normal((n, c, h, width))
    w = rng.standard_normal((o, c, 1, 1))
    b = rng.standard_normal(o)
    projection = rng.standard_normal((n, o, h, width))
    dx = ref.conv1x1_backward_data(projection, w)
    dw, db = ref.conv1x1_backward_weight(x, projection)
    assert dx.shape == x.shape and dw.shape == w.shape and db.shape == b.shape
    loss_of = projection_loss(lambda: ref.conv1x1_forward(x, w, b), projection)
    fd_check("conv1x1 dx", loss_of, x, dx)
    fd_check("conv1x1 dw", loss_of, w, dw)
    fd_check("conv1x1 db", loss_of, b, db)


# --------------------------------------------------------------------------------------------------
# Softmax + weighted cross entropy
# --------------------------------------------------------------------------------------------------

def direct_weighted_xent(logits, labels, weights):
    """The loss straight from its definition, pixel by pixel, without the max subtraction."""
    n_batch, _, h, width = logits.shape
    total = 0.0
    for n in range(n_batch):
        for i in range(h):
            for j in range(width):
                scores = [math.exp(a) for a in logits[n, :, i, j]]
                p_label = scores[labels[n, i, j]] / sum(scores)
                total += weights[n, i, j] * -math.log(p_label)
    return total / (n_batch * h * width)


def test_softmax_xent_hand_case():
    # Pixel 0: logits (0, 0), label 0 -> p = 1/2, -log p = log 2, weight 1.
    # Pixel 1: logits (log 3, 0), label 1 -> p = 1/4, -log p = log 4, weight 2.
    # loss = (log 2 + 2 log 4) / 2 = 2.5 log 2.
    logits = np.array([[[[0.0, math.log(3.0)]], [[0.0, 0.0]]]])   # [1, 2, 1, 2]
    labels = np.array([[[0, 1]]], dtype=np.int32)
    weights = np.array([[[1.0, 2.0]]])
    loss, probs = ref.softmax_xent_forward(logits, labels, weights)
    assert isinstance(loss, np.ndarray) and loss.ndim == 0
    print("hand loss", float(loss), "expected", 2.5 * math.log(2.0))
    assert float(loss) == pytest.approx(2.5 * math.log(2.0), rel=1e-15)
    assert np.allclose(probs[0, :, 0], [[0.5, 0.75], [0.5, 0.25]], rtol=1e-15, atol=0)
    dlogits = ref.softmax_xent_backward(probs, labels, weights)
    # (p - onehot) * w / 2: pixel 0 -> (0.5-1, 0.5) * 1/2, pixel 1 -> (0.75, 0.25-1) * 2/2
    assert np.allclose(dlogits[0, :, 0], [[-0.25, 0.75], [0.25, -0.75]], rtol=1e-15, atol=0)


@pytest.mark.parametrize("shape", [(1, 2, 1, 1), (2, 3, 3, 5), (1, 4, 5, 2)], ids=str)
def test_softmax_xent_matches_direct_formula(shape):
    n, k, h, width = shape
    rng = rng_for("xent formula", shape)
    logits = 3 * rng.standard_normal(shape)
    labels = rng.integers(0, k, size=(n, h, width)).astype(np.int32)
    weights = rng.uniform(0.1, 5.0, size=(n, h, width))
    loss, probs = ref.softmax_xent_forward(logits, labels, weights)
    expected_probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    assert_close("xent loss", loss, direct_weighted_xent(logits, labels, weights), rtol=1e-13)
    assert_close("xent probs", probs, expected_probs, rtol=1e-13)


def test_softmax_xent_is_stable_for_huge_logits():
    logits = np.array([[[[1000.0]], [[0.0]], [[-1000.0]]]])         # [1, 3, 1, 1]
    weights = np.ones((1, 1, 1))
    loss0, probs = ref.softmax_xent_forward(logits, np.array([[[0]]], np.int32), weights)
    loss2, _ = ref.softmax_xent_forward(logits, np.array([[[2]]], np.int32), weights)
    assert np.all(np.isfinite(probs))
    assert float(loss0) == 0.0
    assert float(loss2) == pytest.approx(2000.0, rel=1e-12)    # -log p = 2000 exactly in the limit


@pytest.mark.parametrize("dloss", [1.0, 0.37])
@pytest.mark.parametrize("shape", [(1, 2, 3, 3), (2, 3, 2, 5)], ids=str)
def test_softmax_xent_gradient_by_finite_differences(shape, dloss):
    n, k, h, width = shape
    rng = rng_for("xent grad", shape, dloss)
    logits = rng.standard_normal(shape)
    labels = rng.integers(0, k, size=(n, h, width)).astype(np.int32)
    weights = rng.uniform(0.1, 5.0, size=(n, h, width))
    _, probs = ref.softmax_xent_forward(logits, labels, weights)
    dlogits = ref.softmax_xent_backward(probs, labels, weights, dloss)
    loss_of = lambda: dloss * float(ref.softmax_xent_forward(logits, labels, weights)[0])  # noqa: E731
    fd_check("xent dlogits", loss_of, logits, dlogits)


@pytest.mark.parametrize("bad_label", [-1, 3, 2**31 - 1, -2**31])
def test_softmax_xent_illegal_label_gives_nan(bad_label):
    rng = np.random.default_rng(4)
    logits = rng.standard_normal((2, 3, 2, 3))
    labels = rng.integers(0, 3, size=(2, 2, 3)).astype(np.int32)
    labels[1, 0, 2] = bad_label
    weights = np.ones((2, 2, 3))
    loss, probs = ref.softmax_xent_forward(logits, labels, weights)
    assert np.isnan(float(loss))
    assert np.all(np.isfinite(probs))
    dlogits = ref.softmax_xent_backward(probs, labels, weights)
    nan_pixels = np.isnan(dlogits).any(axis=1)
    assert np.isnan(dlogits[1, :, 0, 2]).all()
    assert nan_pixels.sum() == 1                      # only the pixel with the illegal label
    # a zero weight does not hide an illegal label
    weights[1, 0, 2] = 0.0
    assert np.isnan(float(ref.softmax_xent_forward(logits, labels, weights)[0]))


# --------------------------------------------------------------------------------------------------
# Dropout
# --------------------------------------------------------------------------------------------------

MASK64 = 2**64 - 1


def splitmix64_bits(seed: int, index: int) -> int:
    """The hash of docs/OPS.md with plain Python integers."""
    z = (seed + (index + 1) * 0x9E3779B97F4A7C15) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def test_splitmix64_helper_matches_published_sequence():
    # The first outputs of the splitmix64 generator started from state 0 are well known.
    assert [splitmix64_bits(0, i) for i in range(4)] == [
        0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F, 0xF88BB8A8724C81EC]


@pytest.mark.parametrize("seed", [0, 1, 12345, 2**63 + 7, 2**64 - 1])
def test_dropout_mask_matches_python_integer_hash(seed):
    shape = (3, 5, 7)
    p = 0.3
    expected = [1 if (splitmix64_bits(seed, i) >> 40) / 2**24 >= p else 0
                for i in range(3 * 5 * 7)]
    mask = ref.dropout_mask(shape, p, seed)
    assert mask.dtype == np.uint8 and mask.shape == shape
    assert mask.reshape(-1).tolist() == expected


def test_dropout_mask_threshold_is_exact_to_24_bits():
    # u for seed 0: 0xE220A8 / 2**24, 0x6E789E / 2**24, 0x06C45D / 2**24, 0xF88BB8 / 2**24.
    u = [0xE220A8 / 2**24, 0x6E789E / 2**24, 0x06C45D / 2**24, 0xF88BB8 / 2**24]
    assert ref.dropout_mask(4, 0.0, 0).tolist() == [1, 1, 1, 1]
    assert ref.dropout_mask(4, u[0], 0).tolist() == [1, 0, 0, 1]              # u >= p keeps
    assert ref.dropout_mask(4, u[0] + 2**-24, 0).tolist() == [0, 0, 0, 1]
    assert ref.dropout_mask(4, u[2], 0).tolist() == [1, 1, 1, 1]
    assert ref.dropout_mask(4, u[2] + 2**-24, 0).tolist() == [1, 1, 0, 1]
    assert ref.dropout_mask((2, 2), 0.5, 0).tolist() == [[1, 0], [0, 1]]


def test_dropout_mask_determinism_seeds_and_keep_fraction():
    shape = (4, 25, 1000)                                  # 1e5 elements
    a = ref.dropout_mask(shape, 0.5, 42)
    assert np.array_equal(a, ref.dropout_mask(shape, 0.5, 42))
    b = ref.dropout_mask(shape, 0.5, 43)
    print("fraction of elements that differ between seeds 42, 43:", np.mean(a != b))
    assert 0.45 < np.mean(a != b) < 0.55
    for p in (0.1, 0.5, 0.9):
        keep = ref.dropout_mask(shape, p, 7).mean()
        print(f"p={p}: keep fraction {keep:.4f}, expected {1 - p}")
        assert abs(keep - (1 - p)) < 0.01
    # the mask depends on the flat index only, not on how the shape is split
    assert np.array_equal(ref.dropout_mask((6, 10), 0.5, 9).reshape(-1), ref.dropout_mask(60, 0.5, 9))


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5])
def test_dropout_rejects_p_outside_unit_interval(p):
    with pytest.raises(ValueError, match=r"dropout_mask: p must be in \[0, 1\)"):
        ref.dropout_mask((2, 2), p, 0)
    with pytest.raises(ValueError, match=r"dropout_forward: p must be in \[0, 1\)"):
        ref.dropout_forward(np.ones((2, 2)), np.ones((2, 2), np.uint8), p)


def test_dropout_rejects_bad_seed():
    with pytest.raises(ValueError, match=r"dropout_mask: seed must be in \[0, 2\*\*64\)"):
        ref.dropout_mask(3, 0.5, -1)
    with pytest.raises(ValueError, match=r"dropout_mask: seed must be an integer"):
        ref.dropout_mask(3, 0.5, 1.5)


@pytest.mark.parametrize("p", [0.0, 0.25, 0.5])
def test_dropout_forward_and_backward_scale_kept_elements(p):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 3, 4, 5))
    mask = ref.dropout_mask(x.shape, p, 11)
    y = ref.dropout_forward(x, mask, p)
    assert_close("dropout forward", y, np.where(mask == 1, x / (1 - p), 0.0), rtol=1e-15)
    projection = rng.standard_normal(x.shape)
    dx = ref.dropout_backward(projection, mask, p)
    assert_close("dropout backward", dx, np.where(mask == 1, projection / (1 - p), 0.0), rtol=1e-15)
    fd_check("dropout dx", projection_loss(lambda: ref.dropout_forward(x, mask, p), projection), x, dx)


@pytest.mark.parametrize("p", [0.0, 0.3, 0.5])
def test_dropout_seeded_ops_are_the_mask_path(p):
    """The seeded ops (what the network runs) give the bits of mask + apply, the seed as a number
    or as a 0-d uint64 array, for float32 and float64; their gradient checks by finite differences."""
    rng = np.random.default_rng(12)
    for dtype in (np.float32, np.float64):
        x, dy = rng.standard_normal((2, 3, 5, 7)).astype(dtype), rng.standard_normal((2, 3, 5, 7)).astype(dtype)
        for seed in (0, 99, 2**64 - 1):
            mask = ref.dropout_mask(x.shape, p, seed)
            for given in (seed, np.asarray(seed, dtype=np.uint64)):
                y = ref.dropout_seeded_forward(x, p, given)
                dx = ref.dropout_seeded_backward(dy, p, given)
                assert y.dtype == dx.dtype == dtype
                assert np.array_equal(y, ref.dropout_forward(x, mask, p))
                assert np.array_equal(dx, ref.dropout_backward(dy, mask, p))
    x = rng.standard_normal((3, 4))
    projection = rng.standard_normal(x.shape)
    dx = ref.dropout_seeded_backward(projection, p, 5)
    fd_check("dropout_seeded dx", projection_loss(lambda: ref.dropout_seeded_forward(x, p, 5), projection), x, dx)


def test_dropout_seeded_ops_name_themselves_in_errors():
    with pytest.raises(ValueError, match=r"dropout_seeded_forward: p must be in \[0, 1\)"):
        ref.dropout_seeded_forward(np.ones(3), 1.0, 0)
    with pytest.raises(ValueError, match=r"dropout_seeded_backward: seed must be in \[0, 2\*\*64\)"):
        ref.dropout_seeded_backward(np.ones(3), 0.5, -1)
    with pytest.raises(ValueError, match=r"dropout_seeded_forward: seed must be an integer"):
        ref.dropout_seeded_forward(np.ones(3), 0.5, 1.5)
    with pytest.raises(ValueError, match=r"dropout_seeded_backward: dy must have a float dtype"):
        ref.dropout_seeded_backward(np.ones(3, np.int32), 0.5, 0)


def test_dropout_half_doubles_exactly_in_float32():
    x = np.array([1.5, -3.0, 7.25], dtype=np.float32)
    y = ref.dropout_forward(x, np.array([1, 0, 1], np.uint8), 0.5)
    assert y.dtype == np.float32
    assert y.tolist() == [3.0, 0.0, 14.5]


# --------------------------------------------------------------------------------------------------
# In-place updates
# --------------------------------------------------------------------------------------------------

def test_sgd_momentum_two_steps_by_hand():
    param = np.array([1.0, -2.0])
    velocity = np.zeros(2)
    lr, momentum, weight_decay = 0.1, 0.9, 0.01
    # step 1: v = 0.9*0 + 0.1*(g + 0.01*param), g = (0.5, 1.0)
    #   v = 0.1*(0.5 + 0.01, 1.0 - 0.02) = (0.051, 0.098); param = (0.949, -2.098)
    assert ref.sgd_momentum_update_(param, np.array([0.5, 1.0]), velocity, lr, momentum,
                                    weight_decay) is None
    assert np.allclose(velocity, [0.051, 0.098], rtol=1e-14, atol=0)
    assert np.allclose(param, [0.949, -2.098], rtol=1e-14, atol=0)
    # step 2: g = (-1.0, 0.0)
    #   v = 0.9*(0.051, 0.098) + 0.1*(-1.0 + 0.00949, 0.0 - 0.02098)
    #     = (0.0459 - 0.099051, 0.0882 - 0.002098) = (-0.053151, 0.086102)
    #   param = (0.949 + 0.053151, -2.098 - 0.086102) = (1.002151, -2.184102)
    ref.sgd_momentum_update_(param, np.array([-1.0, 0.0]), velocity, lr, momentum, weight_decay)
    print("sgd after two steps:", param, velocity)
    assert np.allclose(velocity, [-0.053151, 0.086102], rtol=1e-13, atol=0)
    assert np.allclose(param, [1.002151, -2.184102], rtol=1e-13, atol=0)


def test_sgd_updates_float32_in_place():
    param = np.ones((2, 3), np.float32)
    velocity = np.zeros((2, 3), np.float32)
    param_id, velocity_id = id(param), id(velocity)
    ref.sgd_momentum_update_(param, np.full((2, 3), 2.0, np.float32), velocity, 0.5, 0.99, 0.0)
    assert id(param) == param_id and id(velocity) == velocity_id
    assert param.dtype == velocity.dtype == np.float32
    assert np.array_equal(velocity, np.full((2, 3), 1.0)) and np.array_equal(param, np.zeros((2, 3)))


def test_sgd_multi_is_one_call_per_parameter():
    rng = np.random.default_rng(11)
    shapes = [(4, 3, 3, 3), (4,), (0,), (2, 5)]
    params = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    grads = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    velocities = [rng.standard_normal(s).astype(np.float32) * 0.1 for s in shapes]
    want_p, want_v = [p.copy() for p in params], [v.copy() for v in velocities]
    for p, g, v in zip(want_p, grads, want_v):
        ref.sgd_momentum_update_(p, g, v, np.float32(0.01), 0.99, 5e-4)
    assert ref.sgd_momentum_update_multi_(params, tuple(grads), velocities, np.array(0.01, np.float32),
                                          0.99, 5e-4) is None
    for got, want in zip(params + velocities, want_p + want_v):
        assert np.array_equal(got, want)
    assert ref.sgd_momentum_update_multi_([], [], [], 0.1, 0.9, 0.0) is None


def test_sgd_multi_checks_every_triple_before_updating():
    params = [np.ones(3, np.float32), np.ones(2, np.float32)]
    grads = [np.ones(3, np.float32), np.ones(3, np.float32)]   # grads[1] has the wrong shape
    velocities = [np.zeros(3, np.float32), np.zeros(2, np.float32)]
    with pytest.raises(ValueError, match=r"sgd_momentum_update_multi_: params\[1\] has shape \(2,\) "
                                         r"but grads\[1\] has shape \(3,\)"):
        ref.sgd_momentum_update_multi_(params, grads, velocities, 0.1, 0.9, 0.0)
    assert np.array_equal(params[0], np.ones(3)) and np.array_equal(velocities[0], np.zeros(3))
    with pytest.raises(ValueError, match="grads must hold as many arrays as params \\(2\\), got 1"):
        ref.sgd_momentum_update_multi_(params, grads[:1], velocities, 0.1, 0.9, 0.0)
    with pytest.raises(TypeError, match="params must be a sequence of arrays"):
        ref.sgd_momentum_update_multi_(np.ones(3, np.float32), grads, velocities, 0.1, 0.9, 0.0)
    with pytest.raises(ValueError, match=r"velocities\[0\] is updated in place but is read-only"):
        frozen = np.zeros(3, np.float32)
        frozen.flags.writeable = False
        ref.sgd_momentum_update_multi_(params[:1], grads[:1], [frozen], 0.1, 0.9, 0.0)


def test_sgd_multi_refuses_before_updating_anything():
    from unet_cuda import ops

    def fresh():
        return [np.ones(3, np.float32), np.ones(2, np.float32)], [np.zeros(3, np.float32), np.zeros(2, np.float32)]

    params, velocities = fresh()
    grads = [np.ones(3, np.float32), np.array(["a", "b"])]
    with pytest.raises(ValueError, match=r"grads\[1\] must have a real dtype"):
        ref.sgd_momentum_update_multi_(params, grads, velocities, 0.1, 0.9, 0.0)
    assert np.array_equal(params[0], np.ones(3)) and np.array_equal(velocities[0], np.zeros(3))
    params, velocities = fresh()
    with pytest.raises(ValueError, match=r"velocities\[1\] overlaps velocities\[0\] in memory"):
        ref.sgd_momentum_update_multi_([params[0], params[0].copy()], [np.ones(3, np.float32)] * 2,
                                       [velocities[0], velocities[0]], 0.1, 0.9, 0.0)
    with pytest.raises(TypeError, match="momentum must be a real number"):
        ref.sgd_momentum_update_multi_(params, [np.ones(3, np.float32), np.ones(2, np.float32)], velocities,
                                       0.1, [0.9, 0.5], 0.0)
    assert np.array_equal(params[0], np.ones(3))
    # The dispatcher: an array is no sequence of arrays (not split into its rows), and no arrays at
    # all still need as many of each.
    with pytest.raises(TypeError, match="params must be a sequence of arrays"):
        ops.sgd_momentum_update_multi_(np.ones((2, 3), np.float32), [np.ones(3)] * 2, velocities, 0.1, 0.9, 0.0)
    with pytest.raises(ValueError, match="grads must hold as many arrays as params \\(0\\), got 1"):
        ops.sgd_momentum_update_multi_([], [np.ones(3)], [], 0.1, 0.9, 0.0)
    assert ops.sgd_momentum_update_multi_((), [], [], 0.1, 0.9, 0.0) is None


def test_accumulate_adds_in_place_and_returns_dst():
    dst = np.array([[1.0, 2.0]])
    result = ref.accumulate_(dst, np.array([[10.0, 20.0]]))
    assert result is dst
    assert dst.tolist() == [[11.0, 22.0]]


# --------------------------------------------------------------------------------------------------
# dtype, layout and error messages
# --------------------------------------------------------------------------------------------------

def float32_calls():
    """One call of every op with float32 inputs: (name, thunk)."""
    rng = np.random.default_rng(6)
    f32 = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    x, w3, w2, w1, b = f32(1, 2, 6, 6), f32(3, 2, 3, 3), f32(3, 2, 2, 2), f32(3, 2, 1, 1), f32(3)
    labels = rng.integers(0, 3, size=(1, 6, 6)).astype(np.int32)
    weights = f32(1, 6, 6)
    mask = ref.dropout_mask(x.shape, 0.5, 1)
    _, argmax = ref.maxpool2x2_forward(x)
    probs = ref.softmax_xent_forward(f32(1, 3, 6, 6), labels, weights)[1]
    return [
        ("conv3x3_forward", lambda: ref.conv3x3_forward(x, w3, b, relu=True)),
        ("conv3x3_backward_data", lambda: ref.conv3x3_backward_data(f32(1, 3, 4, 4), w3)),
        ("conv3x3_backward_weight", lambda: ref.conv3x3_backward_weight(x, f32(1, 3, 4, 4))),
        ("relu_backward", lambda: ref.relu_backward(x, x)),
        ("maxpool2x2_forward", lambda: ref.maxpool2x2_forward(x)[0]),
        ("maxpool2x2_backward", lambda: ref.maxpool2x2_backward(f32(1, 2, 3, 3), argmax)),
        ("upconv2x2_forward", lambda: ref.upconv2x2_forward(x, w2, b)),
        ("upconv2x2_backward_data", lambda: ref.upconv2x2_backward_data(f32(1, 3, 12, 12), w2)),
        ("upconv2x2_backward_weight", lambda: ref.upconv2x2_backward_weight(x, f32(1, 3, 12, 12))),
        ("crop_concat_forward", lambda: ref.crop_concat_forward(f32(1, 1, 4, 4), x)),
        ("crop_concat_backward", lambda: ref.crop_concat_backward(f32(1, 3, 4, 4), (1, 2, 6, 6))),
        ("conv1x1_forward", lambda: ref.conv1x1_forward(x, w1, b)),
        ("conv1x1_backward_data", lambda: ref.conv1x1_backward_data(f32(1, 3, 6, 6), w1)),
        ("conv1x1_backward_weight", lambda: ref.conv1x1_backward_weight(x, f32(1, 3, 6, 6))),
        ("softmax_xent_forward", lambda: ref.softmax_xent_forward(f32(1, 3, 6, 6), labels, weights)),
        ("softmax_xent_backward", lambda: ref.softmax_xent_backward(probs, labels, weights, 0.5)),
        ("dropout_forward", lambda: ref.dropout_forward(x, mask, 0.5)),
        ("dropout_backward", lambda: ref.dropout_backward(x, mask, 0.5)),
    ]


@pytest.mark.parametrize("name, call", float32_calls(), ids=lambda v: v if isinstance(v, str) else "")
def test_float32_in_float32_out_c_contiguous(name, call):
    result = call()
    arrays = result if isinstance(result, tuple) else (result,)
    for array in arrays:
        assert array.dtype == np.float32, f"{name}: got {array.dtype}"
        assert array.flags.c_contiguous, f"{name}: result is not C-contiguous"
    if name == "softmax_xent_forward":
        assert arrays[0].ndim == 0


def test_float64_is_kept():
    x = np.ones((1, 1, 4, 4))
    assert ref.conv3x3_forward(x, np.ones((1, 1, 3, 3)), np.zeros(1)).dtype == np.float64
    assert ref.maxpool2x2_forward(x)[0].dtype == np.float64


BAD_CALLS = [
    (lambda: ref.conv3x3_forward(np.zeros((1, 5, 10, 10)), np.zeros((4, 3, 3, 3)), np.zeros(4)),
     r"conv3x3_forward: w has shape \(4, 3, 3, 3\).* "
     r"but x has 5 channels \(x shape \(1, 5, 10, 10\)\)"),
    (lambda: ref.conv3x3_forward(np.zeros((5, 10, 10)), np.zeros((4, 5, 3, 3)), np.zeros(4)),
     r"conv3x3_forward: x must be 4-d \[N,C,H,W\], got shape \(5, 10, 10\)"),
    (lambda: ref.conv3x3_forward(np.zeros((1, 3, 10, 10)), np.zeros((4, 3, 2, 2)), np.zeros(4)),
     r"conv3x3_forward: w must have shape \[O,C,3,3\], got \(4, 3, 2, 2\)"),
    (lambda: ref.conv3x3_forward(np.zeros((1, 3, 10, 10)), np.zeros((4, 3, 3, 3)), np.zeros(3)),
     r"conv3x3_forward: b has shape \(3,\) but w has 4 output channels"),
    (lambda: ref.conv3x3_forward(np.zeros((1, 3, 2, 10)), np.zeros((4, 3, 3, 3)), np.zeros(4)),
     r"conv3x3_forward: x must be at least 3x3 pixels, got shape \(1, 3, 2, 10\)"),
    (lambda: ref.conv3x3_forward(np.zeros((1, 3, 5, 5), np.int32), np.zeros((4, 3, 3, 3)), np.zeros(4)),
     r"conv3x3_forward: x must have a float dtype, got int32"),
    (lambda: ref.conv3x3_backward_data(np.zeros((1, 3, 8, 8)), np.zeros((4, 3, 3, 3))),
     r"conv3x3_backward_data: w has shape \(4, 3, 3, 3\).* but dy has 3 channels"),
    (lambda: ref.conv3x3_backward_weight(np.zeros((1, 3, 10, 10)), np.zeros((1, 4, 9, 8))),
     r"conv3x3_backward_weight: dy has shape \(1, 4, 9, 8\) but x has shape \(1, 3, 10, 10\), "
     r"so dy must have shape \(1, 4, 8, 8\)"),
    (lambda: ref.relu_backward(np.zeros((2, 3)), np.zeros((3, 2))),
     r"relu_backward: y has shape \(2, 3\) but dy has shape \(3, 2\)"),
    (lambda: ref.maxpool2x2_backward(np.zeros((1, 1, 2, 2)), np.zeros((1, 1, 2, 3), np.uint8)),
     r"maxpool2x2_backward: dy has shape \(1, 1, 2, 2\) but argmax has shape \(1, 1, 2, 3\)"),
    (lambda: ref.maxpool2x2_backward(np.zeros((1, 1, 1, 1)), np.full((1, 1, 1, 1), 4, np.uint8)),
     r"maxpool2x2_backward: argmax values must be in \[0, 3\]"),
    (lambda: ref.upconv2x2_forward(np.zeros((1, 2, 3, 3)), np.zeros((4, 3, 2, 2)), np.zeros(4)),
     r"upconv2x2_forward: w has shape \(4, 3, 2, 2\).* but x has 2 channels"),
    (lambda: ref.upconv2x2_backward_data(np.zeros((1, 4, 5, 6)), np.zeros((4, 3, 2, 2))),
     r"upconv2x2_backward_data: dy must have even H and W"),
    (lambda: ref.upconv2x2_backward_weight(np.zeros((1, 3, 3, 3)), np.zeros((1, 4, 6, 5))),
     r"upconv2x2_backward_weight: dy has shape \(1, 4, 6, 5\) but must have shape \(1, 4, 6, 6\)"),
    (lambda: ref.conv1x1_forward(np.zeros((1, 3, 4, 4)), np.zeros((2, 3, 3, 3)), np.zeros(2)),
     r"conv1x1_forward: w must have shape \[O,C,1,1\], got \(2, 3, 3, 3\)"),
    (lambda: ref.conv1x1_backward_weight(np.zeros((2, 3, 4, 4)), np.zeros((1, 2, 4, 4))),
     r"conv1x1_backward_weight: dy has shape \(1, 2, 4, 4\) but x has shape \(2, 3, 4, 4\)"),
    (lambda: ref.softmax_xent_forward(np.zeros((1, 2, 4, 4)), np.zeros((1, 4, 5), np.int32),
                                      np.zeros((1, 4, 4))),
     r"softmax_xent_forward: labels has shape \(1, 4, 5\) but logits has shape \(1, 2, 4, 4\)"),
    (lambda: ref.softmax_xent_forward(np.zeros((1, 2, 4, 4)), np.zeros((1, 4, 4)),
                                      np.zeros((1, 4, 4))),
     r"softmax_xent_forward: labels must have an integer dtype, got float64"),
    (lambda: ref.softmax_xent_backward(np.zeros((1, 2, 4, 4)), np.zeros((1, 4, 4), np.int32),
                                       np.zeros((2, 4, 4))),
     r"softmax_xent_backward: weights has shape \(2, 4, 4\) but probs has shape \(1, 2, 4, 4\)"),
    (lambda: ref.dropout_forward(np.zeros((2, 3)), np.zeros((3, 2), np.uint8), 0.5),
     r"dropout_forward: x has shape \(2, 3\) but mask has shape \(3, 2\)"),
    (lambda: ref.accumulate_(np.zeros((2, 3)), np.zeros((2, 4))),
     r"accumulate_: dst has shape \(2, 3\) but src has shape \(2, 4\)"),
    (lambda: ref.sgd_momentum_update_(np.zeros(3), np.zeros(3), np.zeros(4), 0.1, 0.9, 0.0),
     r"sgd_momentum_update_: param has shape \(3,\) but velocity has shape \(4,\)"),
]


@pytest.mark.parametrize("call, message", BAD_CALLS, ids=[m.split(":")[0] for _, m in BAD_CALLS])
def test_bad_shapes_raise_value_error_naming_op_and_argument(call, message):
    with pytest.raises(ValueError, match=message) as error:
        call()
    print(error.value)


def test_precision_setting_on_the_cpu():
    """The reference computes in fp32 (float64 inside) only: "fp32" is accepted on the CPU and
    changes nothing, the tensor-core precisions are refused with a message that says why."""
    from unet_cuda import ops

    assert ops.PRECISIONS == ("fp32", "tf32", "bf16")
    with ops.restoring_precision():
        ops.set_precision("fp32", "cpu")
    for name in ("tf32", "bf16"):
        with pytest.raises(ValueError, match=f"precision {name} runs on the GPU's tensor cores"):
            ops.set_precision(name, "cpu")
    with pytest.raises(ValueError, match="precision must be one of fp32, tf32, bf16, got 'fp16'"):
        ops.set_precision("fp16", "cpu")


# --------------------------------------------------------------------------------------------------
# relu_mask: the ReLU's backward fused into the backward-data ops (and the max-pool's backward)
# --------------------------------------------------------------------------------------------------

def _relu_output(rng, shape):
    """A ReLU's output: about half zeros, the rest positive."""
    return np.maximum(rng.standard_normal(shape), 0.0)


def _masked_ops(rng):
    """(name, unmasked call, masked call, mask) for each op that takes a relu_mask."""
    dy3, w3 = rng.standard_normal((2, 4, 5, 6)), rng.standard_normal((4, 3, 3, 3))
    m3 = _relu_output(rng, (2, 3, 7, 8))
    dyu, wu = rng.standard_normal((2, 4, 6, 8)), rng.standard_normal((4, 3, 2, 2))
    mu = _relu_output(rng, (2, 3, 3, 4))
    dy1, w1 = rng.standard_normal((2, 2, 5, 4)), rng.standard_normal((2, 3, 1, 1))
    m1 = _relu_output(rng, (2, 3, 5, 4))
    return [
        ("conv3x3_backward_data", lambda: ref.conv3x3_backward_data(dy3, w3),
         lambda m: ref.conv3x3_backward_data(dy3, w3, relu_mask=m), m3),
        ("upconv2x2_backward_data", lambda: ref.upconv2x2_backward_data(dyu, wu),
         lambda m: ref.upconv2x2_backward_data(dyu, wu, relu_mask=m), mu),
        ("conv1x1_backward_data", lambda: ref.conv1x1_backward_data(dy1, w1),
         lambda m: ref.conv1x1_backward_data(dy1, w1, relu_mask=m), m1),
    ]


def test_relu_mask_is_relu_backward_of_the_unmasked_gradient():
    rng = np.random.default_rng(40)
    for name, plain, masked, mask in _masked_ops(rng):
        got = masked(mask)
        np.testing.assert_array_equal(got, ref.relu_backward(mask, plain()), err_msg=name)
        assert (got[mask <= 0] == 0).all() and (got[mask > 0] != 0).any(), name


def test_relu_mask_of_the_concatenated_convolution():
    rng = np.random.default_rng(41)
    dy, w = rng.standard_normal((1, 4, 4, 5)), rng.standard_normal((4, 5, 3, 3))
    skip_shape = (1, 2, 10, 9)
    up_mask, skip_mask = _relu_output(rng, (1, 3, 6, 7)), _relu_output(rng, skip_shape)
    dup, dskip = ref.conv3x3_concat_backward_data(dy, w, skip_shape)
    mup, mskip = ref.conv3x3_concat_backward_data(dy, w, skip_shape, up_relu_mask=up_mask,
                                                  skip_relu_mask=skip_mask)
    np.testing.assert_array_equal(mup, ref.relu_backward(up_mask, dup))
    np.testing.assert_array_equal(mskip, ref.relu_backward(skip_mask, dskip))
    only_skip = ref.conv3x3_concat_backward_data(dy, w, skip_shape, skip_relu_mask=skip_mask)
    np.testing.assert_array_equal(only_skip[0], dup)
    np.testing.assert_array_equal(only_skip[1], mskip)


def test_maxpool_relu_mask_by_the_output_is_the_relu_backward_of_the_input():
    """Masking by the pool's output y is relu_backward(x, dx) when x is a ReLU's output: x at the
    element taken is y, and every other element of dx is 0."""
    rng = np.random.default_rng(42)
    x = _relu_output(rng, (2, 3, 8, 6))
    x[0, 0, :2, :2] = 0.0  # a window of zeros: y = 0 there, its gradient stopped
    y, argmax = ref.maxpool2x2_forward(x)
    dy = rng.standard_normal(y.shape)
    got = ref.maxpool2x2_backward(dy, argmax, relu_mask=y)
    np.testing.assert_array_equal(got, ref.relu_backward(x, ref.maxpool2x2_backward(dy, argmax)))
    assert got[0, 0, 0, 0] == 0.0 and dy[0, 0, 0, 0] != 0.0


@pytest.mark.parametrize("bad,message", [
    (np.zeros((2, 3, 7, 7)), r"relu_mask has shape \(2, 3, 7, 7\) but the gradient it masks has shape "
                             r"\(2, 3, 7, 8\)"),
    (np.zeros((2, 3, 7, 8), np.int32), r"relu_mask must have a float dtype, got int32"),
])
def test_relu_mask_is_checked(bad, message):
    rng = np.random.default_rng(43)
    dy, w = rng.standard_normal((2, 4, 5, 6)), rng.standard_normal((4, 3, 3, 3))
    with pytest.raises(ValueError, match="conv3x3_backward_data: " + message):
        ref.conv3x3_backward_data(dy, w, relu_mask=bad)
    with pytest.raises(ValueError, match="conv3x3_concat_backward_data: skip_relu_mask has shape"):
        ref.conv3x3_concat_backward_data(dy, w, (2, 1, 9, 8), skip_relu_mask=np.zeros((2, 1, 7, 8)))
    with pytest.raises(ValueError, match="maxpool2x2_backward: relu_mask has shape"):
        ref.maxpool2x2_backward(np.zeros((1, 1, 2, 2)), np.zeros((1, 1, 2, 2), np.uint8),
                                relu_mask=np.zeros((1, 1, 4, 4)))
