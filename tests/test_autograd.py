"""The tape: topological order, gradient accumulation, no_grad, and whole-network gradients by
finite differences through every op (float64, NumPy reference)."""

import numpy as np
import pytest

import unet_cuda as u
from unet_cuda import functional as F
from unet_cuda.autograd import Tensor, no_grad


def rand(rng, *shape):
    return rng.standard_normal(shape)


def test_tensor_used_twice_accumulates_gradient():
    # y = crop_concat(pool(h), h-cropped): h feeds two ops; its gradient is the sum of both paths.
    rng = np.random.default_rng(0)
    x = Tensor(rand(rng, 1, 2, 8, 8), requires_grad=True)
    up = Tensor(rand(rng, 1, 1, 4, 4), requires_grad=True)
    pooled = F.max_pool2x2(x)                      # [1,2,4,4]
    cat = F.crop_concat(up, x)                     # [1,3,4,4], x cropped by 2 px per side
    r1, r2 = rand(rng, 1, 2, 4, 4), rand(rng, 1, 3, 4, 4)
    # loss = <pooled, r1> + <cat, r2>, through a 1x1 conv-free path: use the ops' backward directly
    pooled.backward(r1)
    g_pool = x.grad.copy()
    x.grad = None
    cat.backward(r2)
    g_cat = x.grad.copy()
    assert np.abs(g_pool).sum() > 0 and np.abs(g_cat).sum() > 0

    # Same thing as one graph: conv1x1 with identity weights turns both into one scalar-free graph.
    x.grad = None
    up.grad = None
    pooled = F.max_pool2x2(x)
    cat = F.crop_concat(pooled, x)                 # pooled (2 ch) and cropped x (2 ch) -> 4 ch
    r = rand(rng, 1, 4, 4, 4)
    cat.backward(r)
    expected = u.ops.maxpool2x2_backward(r[:, :2], u.ops.maxpool2x2_forward(x.data)[1])
    expected[:, :, 2:6, 2:6] += r[:, 2:]
    np.testing.assert_allclose(x.grad, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("relu", [False, True])
def test_conv3x3_concat_equals_crop_concat_then_conv3x3(relu):
    """The fused op (one tape node) gives the output and every gradient of the two-op chain."""
    rng = np.random.default_rng(4)
    values = [rand(rng, 1, 2, 6, 5), rand(rng, 1, 3, 10, 9), rand(rng, 4, 5, 3, 3), rand(rng, 4)]
    r = rand(rng, 1, 4, 4, 3)
    results = []
    for fused in (True, False):
        up, skip, w, b = (Tensor(v.copy(), requires_grad=True) for v in values)
        y = F.conv3x3_concat(up, skip, w, b, relu) if fused else F.conv3x3(F.crop_concat(up, skip), w, b, relu)
        y.backward(r)
        results.append([y.data, up.grad, skip.grad, w.grad, b.grad])
    for got, want in zip(*results):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_no_grad_records_nothing():
    rng = np.random.default_rng(1)
    w = Tensor(rand(rng, 2, 1, 3, 3), requires_grad=True)
    b = Tensor(np.zeros(2), requires_grad=True)
    with no_grad():
        y = F.conv3x3(Tensor(rand(rng, 1, 1, 5, 5)), w, b)
    assert not y.requires_grad
    with pytest.raises(RuntimeError, match="does not require a gradient"):
        y.backward(np.ones(y.shape))


def test_non_scalar_backward_needs_gradient():
    rng = np.random.default_rng(2)
    x = Tensor(rand(rng, 1, 1, 4, 4), requires_grad=True)
    with pytest.raises(RuntimeError, match="explicit gradient"):
        F.max_pool2x2(x).backward()


def test_graph_is_freed_after_backward():
    rng = np.random.default_rng(3)
    x = Tensor(rand(rng, 1, 1, 6, 6), requires_grad=True)
    y = F.max_pool2x2(F.max_pool2x2(Tensor(rand(rng, 1, 1, 12, 12), requires_grad=True)))
    y.backward(np.ones(y.shape))
    assert y._parents == () and y.grad is None
    assert x.grad is None


def test_deep_chain_does_not_recurse():
    x = Tensor(np.ones((1, 1, 4, 4)), requires_grad=True)
    h = x
    for _ in range(3000):  # deeper than Python's default recursion limit
        h = F.dropout(h, 0.0, seed=0)
    h.backward(np.ones(h.shape))
    np.testing.assert_array_equal(x.grad, np.ones((1, 1, 4, 4)))


def _float64_net(depth, base, dropout, seed):
    net = u.UNet(in_channels=1, num_classes=3, base_channels=base, depth=depth, dropout=dropout, seed=seed)
    for p in net.parameters():
        p.data = p.data.astype(np.float64)
        p.data += 0.05 * np.random.default_rng(seed).standard_normal(p.data.shape)  # non-zero biases
    return net


@pytest.mark.parametrize("depth,size,dropout", [(2, 20, 0.0), (3, 44, 0.0), (3, 52, 0.0), (2, 20, 0.5)])
def test_unet_gradients_by_finite_differences(depth, size, dropout):
    """d loss / d parameter and d loss / d input through the whole U-Net, against central differences."""
    rng = np.random.default_rng(depth * 100 + size)
    net = _float64_net(depth, base=2, dropout=dropout, seed=7)
    out = net.output_size(size)
    x = Tensor(rng.standard_normal((1, 1, size, size)), requires_grad=True)
    labels = rng.integers(0, 3, (1, out, out)).astype(np.int32)
    weights = rng.uniform(0.5, 3.0, (1, out, out))
    state = net.dropout_rng.bit_generator.state

    def loss_value():
        net.dropout_rng.bit_generator.state = state  # the same dropout masks every evaluation
        return float(F.softmax_cross_entropy(net(x), labels, weights).data)

    net.dropout_rng.bit_generator.state = state
    loss = F.softmax_cross_entropy(net(x), labels, weights)
    loss.backward()
    checked = [("input", x)] + [(p.name, p) for p in net.parameters()]
    # small enough that a shift rarely crosses a ReLU kink or a max-pool tie (both make FD lie)
    eps = 1e-7
    worst = 0.0
    for name, t in checked:
        flat = t.data.reshape(-1)
        grad = t.grad.reshape(-1)
        for i in rng.choice(flat.size, size=min(4, flat.size), replace=False):
            old = flat[i]
            flat[i] = old + eps
            up = loss_value()
            flat[i] = old - eps
            down = loss_value()
            flat[i] = old
            numeric = (up - down) / (2 * eps)
            # central differences in float64: truncation ~eps^2, rounding ~1e-16/eps = 1e-9 absolute
            err = abs(numeric - grad[i]) / (abs(numeric) + 1e-4)
            worst = max(worst, err)
            assert abs(numeric - grad[i]) <= 2e-8 + 1e-5 * abs(numeric), (
                f"{name}[{i}]: analytic {grad[i]:.9g} vs numeric {numeric:.9g} (rel {err:.2e})")
    print(f"depth {depth}: worst relative gradient error {worst:.2e} over {len(checked)} tensors")


# ------------------------------------------------------------------------------------------------
# The ReLU's backward fused into the consumers' backward-data ops (functional.py, autograd.py)
# ------------------------------------------------------------------------------------------------

def _count_calls(monkeypatch, op):
    """The shapes of the first array argument of every call of ``unet_cuda.ops.<op>`` from now on."""
    calls = []
    real = getattr(u.ops, op)

    def counting(first, *args, **kwargs):
        calls.append(first.shape)
        return real(first, *args, **kwargs)

    monkeypatch.setattr(u.ops, op, counting)
    return calls


def _unet_gradients(fuse, depth, dropout, dtype, accumulate=None):
    net = u.UNet(in_channels=1, num_classes=2, base_channels=3, depth=depth, dropout=dropout, seed=3)
    for p in net.parameters():
        p.data = p.data.astype(dtype)
        p.data += dtype(0.05) * np.random.default_rng(4).standard_normal(p.data.shape).astype(dtype)
    size = net.legal_input_sizes(120)[0]
    rng = np.random.default_rng(5)
    x = Tensor(rng.standard_normal((2, 1, size, size)).astype(dtype), requires_grad=True)
    out = net.output_size(size)
    labels = rng.integers(0, 2, (2, out, out)).astype(np.int32)
    weights = rng.uniform(0.5, 2.0, (2, out, out)).astype(dtype)
    with F.fused_relu_backward(fuse), F.fused_accumulation(fuse if accumulate is None else accumulate):
        loss = F.softmax_cross_entropy(net(x, dropout_seeds=[11, 12, 13][:net.num_dropout_layers()]),
                                       labels, weights)
    loss.backward()
    return [x.grad] + [p.grad for p in net.parameters()]


@pytest.mark.parametrize("dropout", [0.0, 0.5])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fused_relu_backward_gives_the_same_bits(monkeypatch, dropout, dtype):
    """Every gradient of the network, fused or not: the same bits; and the fusion leaves a separate
    ReLU backward only where a ReLU's output feeds a dropout (depth 3: the last two levels), and no
    separate accumulation (the skip maps' sums happen in the pools' backward)."""
    calls = _count_calls(monkeypatch, "relu_backward")
    sums = _count_calls(monkeypatch, "accumulate_")
    unfused = _unet_gradients(False, 3, dropout, dtype)
    relu_layers = 2 * (2 * 3 - 1)  # two 3x3 convolutions per level, going down and coming up
    assert len(calls) == relu_layers
    assert len(sums) == 2  # the two skip maps, from the pool and from the concatenation
    calls.clear()
    sums.clear()
    fused = _unet_gradients(True, 3, dropout, dtype)
    assert len(calls) == (2 if dropout else 0)
    assert len(sums) == 0
    only_masks = _unet_gradients(True, 3, dropout, dtype, accumulate=False)
    only_sums = _unet_gradients(False, 3, dropout, dtype, accumulate=True)
    for a, b, c, d in zip(unfused, fused, only_masks, only_sums):
        assert a.dtype == b.dtype == dtype
        for other in (b, c, d):
            np.testing.assert_array_equal(a.view(np.uint8), other.view(np.uint8))


def test_relu_output_with_an_unmasking_consumer_is_masked_once(monkeypatch):
    """A ReLU's output feeding a masking op (max-pool) and one that does not mask (crop_concat): the
    engine masks the summed gradient itself, and the result is that of the unfused graph."""
    rng = np.random.default_rng(6)
    x = Tensor(rand(rng, 1, 2, 10, 10), requires_grad=True)
    w, b = Tensor(rand(rng, 2, 2, 3, 3), requires_grad=True), Tensor(rand(rng, 2), requires_grad=True)
    r = rand(rng, 1, 4, 4, 4)
    grads = {}
    calls = _count_calls(monkeypatch, "relu_backward")
    for fuse in (False, True):
        x.grad = w.grad = b.grad = None
        with F.fused_relu_backward(fuse):
            h = F.conv3x3(x, w, b)                       # [1,2,8,8], a ReLU's output
            cat = F.crop_concat(F.max_pool2x2(h), h)     # pooled (2 ch) and h cropped to 4x4 (2 ch)
        cat.backward(r)
        grads[fuse] = (x.grad.copy(), w.grad.copy(), b.grad.copy())
    assert len(calls) == 2  # once per graph: crop_concat does not mask, so the engine does
    for a, c in zip(grads[False], grads[True]):
        np.testing.assert_array_equal(a, c)


def test_relu_output_as_the_output_is_masked():
    """backward() started at a ReLU's output passes the given gradient through that ReLU."""
    rng = np.random.default_rng(7)
    x = Tensor(rand(rng, 1, 1, 5, 5), requires_grad=False)
    w, b = Tensor(rand(rng, 1, 1, 3, 3), requires_grad=True), Tensor(np.zeros(1), requires_grad=True)
    y = F.conv3x3(x, w, b)
    dy = np.ones(y.shape)
    y.backward(dy)
    np.testing.assert_array_equal(b.grad, [float((y.data > 0).sum())])


def test_masked_flag_needs_a_relu_output():
    rng = np.random.default_rng(8)
    x = Tensor(rand(rng, 1, 1, 4, 4), requires_grad=True)
    with pytest.raises(ValueError, match="recorded op's ReLU"):
        Tensor.from_op(x.data, (x,), lambda g: (g,), "identity", masked=(True,))
    with pytest.raises(ValueError, match="1 inputs"):
        Tensor.from_op(x.data, (x,), lambda g: (g,), "identity", masked=(False, False))


def test_accumulating_gradient_first_second_and_alone():
    """A max-pool's gradient as the only contribution (a new array), as the second (added into
    the first in its kernel), and two pools of one map: the bits of the unfused graph."""
    rng = np.random.default_rng(9)
    x = Tensor(rand(rng, 1, 2, 10, 10), requires_grad=True)
    w, b = Tensor(rand(rng, 2, 2, 3, 3), requires_grad=True), Tensor(rand(rng, 2), requires_grad=True)
    r_pool, r_cat = rand(rng, 1, 2, 4, 4), rand(rng, 1, 4, 4, 4)
    for build in ("alone", "after the concat", "two pools"):
        grads = []
        for fuse in (False, True):
            x.grad = w.grad = b.grad = None
            with F.fused_accumulation(fuse), F.fused_relu_backward(fuse):
                h = F.conv3x3(x, w, b)
                if build == "alone":
                    out, r = F.max_pool2x2(h), r_pool
                elif build == "after the concat":
                    out, r = F.crop_concat(F.max_pool2x2(h), h), r_cat
                else:
                    out, r = F.crop_concat(F.max_pool2x2(h), F.max_pool2x2(h)), r_cat
            out.backward(r)
            grads.append((x.grad.copy(), w.grad.copy(), b.grad.copy()))
        for a, c in zip(*grads):
            np.testing.assert_array_equal(a.view(np.uint8), c.view(np.uint8), err_msg=build)


def test_a_leaf_made_by_a_relu_op_gets_its_own_gradient():
    """A ReLU op's output made without a tape (no_grad) and then made a leaf: its consumers must not
    mask, since its gradient is its own and no engine ReLU backward follows."""
    rng = np.random.default_rng(10)
    x = Tensor(rand(rng, 1, 2, 9, 9))
    w, b = Tensor(rand(rng, 2, 2, 3, 3)), Tensor(rand(rng, 2))
    with no_grad():
        h = F.conv3x3(x, w, b)
    assert (h.data == 0).any()
    h.requires_grad = True
    w2, b2 = Tensor(rand(rng, 3, 2, 3, 3), requires_grad=True), Tensor(rand(rng, 3), requires_grad=True)
    r = rand(rng, 1, 3, 5, 5)
    F.conv3x3(h, w2, b2, relu=False).backward(r)
    np.testing.assert_array_equal(h.grad, u.ops.conv3x3_backward_data(r, w2.data))
    with pytest.raises(ValueError, match="recorded op's ReLU"):
        Tensor.from_op(h.data, (h,), lambda g: (g,), "identity", masked=(True,))
