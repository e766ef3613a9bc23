"""The U-Net as PAPER.md specifies it: layer count, parameter count, shapes, init, dropout placement,
and CPU training that lowers the loss."""

import numpy as np
import pytest
from scipy import ndimage as ndi

import unet_cuda as u
from unet_cuda import functional as F


def test_paper_network_layers_and_parameters():
    net = u.UNet()
    assert net.num_conv_layers() == 23
    assert net.num_parameters() == 31_030_658
    assert net.output_size(572) == 388
    names = [n for n, _ in net.named_parameters() if n.endswith(".weight")]
    assert sum(n.startswith("down") for n in names) == 10
    assert sum(n.endswith("upconv.weight") for n in names) == 4
    assert sum(n.startswith("up") and "conv" in n and "upconv" not in n for n in names) == 8


def test_paper_channel_plan():
    net = u.UNet()
    shapes = dict((n, p.shape) for n, p in net.named_parameters())
    assert shapes["down0.conv1.weight"] == (64, 1, 3, 3)
    assert shapes["down4.conv2.weight"] == (1024, 1024, 3, 3)
    assert shapes["up3.upconv.weight"] == (512, 1024, 2, 2)
    assert shapes["up3.conv1.weight"] == (512, 1024, 3, 3)   # concat [512 up, 512 skip]
    assert shapes["up0.conv2.weight"] == (64, 64, 3, 3)
    assert shapes["head.conv1x1.weight"] == (2, 64, 1, 1)


def test_572_tile_gives_388_through_real_forward():
    # The paper's depth and tile with few channels, so the CPU runs it in a moment.
    net = u.UNet(base_channels=2, seed=0)
    x = np.random.default_rng(0).random((1, 1, 572, 572), dtype=np.float32)
    with u.no_grad():
        y = net.eval()(x)
    assert y.shape == (1, 2, 388, 388)
    assert y.data.dtype == np.float32 and np.isfinite(y.data).all()


def test_illegal_input_size_names_nearest_legal_sizes():
    net = u.UNet(base_channels=2)
    with pytest.raises(u.IllegalSizeError, match="556 or 572"):
        net.output_size(570)
    with pytest.raises(u.IllegalSizeError, match="556 or 572"):
        net(np.zeros((1, 1, 570, 570), np.float32))
    assert 572 in net.legal_input_sizes(600) and 570 not in net.legal_input_sizes(600)


def test_bad_input_shape_and_dtype():
    net = u.UNet(base_channels=2, depth=2)
    with pytest.raises(ValueError, match=r"shape \[N, 1, H, W\]"):
        net(np.zeros((1, 3, 20, 20), np.float32))
    with pytest.raises(ValueError, match="float32"):
        net(np.zeros((1, 1, 20, 20), np.float64))


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="dropout"):
        u.UNet(dropout=1.0)
    with pytest.raises(ValueError, match="depth"):
        u.UNet(depth=0)
    with pytest.raises(ValueError, match="num_classes"):
        u.UNet(num_classes=1)


def test_he_initialisation_and_zero_biases():
    net = u.UNet(seed=3)
    params = dict(net.named_parameters())
    for name, fan_in in [("down1.conv2.weight", 9 * 128), ("up0.conv1.weight", 9 * 128),
                         ("down4.conv2.weight", 9 * 1024), ("up3.upconv.weight", 1024)]:
        w = params[name].data
        assert abs(w.std() - np.sqrt(2 / fan_in)) < 0.02 * np.sqrt(2 / fan_in), name
        assert abs(w.mean()) < 0.05 * np.sqrt(2 / fan_in), name
    assert all(not p.data.any() for n, p in net.named_parameters() if n.endswith(".bias"))


def test_same_seed_same_weights():
    a, b = u.UNet(base_channels=4, depth=3, seed=5), u.UNet(base_channels=4, depth=3, seed=5)
    for (na, pa), (nb, pb) in zip(a.named_parameters(), b.named_parameters()):
        np.testing.assert_array_equal(pa.data, pb.data)


def test_dropout_on_two_deepest_levels_in_training_only():
    net = u.UNet(base_channels=2, depth=3, seed=0)
    x = np.random.default_rng(1).random((1, 1, 44, 44), dtype=np.float32)
    loss = F.softmax_cross_entropy(net(x), np.zeros((1, 4, 4), np.int32), np.ones((1, 4, 4), np.float32))
    names = []
    stack = [loss]
    seen = set()
    while stack:  # walk the recorded graph
        t = stack.pop()
        if id(t) in seen:
            continue
        seen.add(id(t))
        names.append(t.name)
        stack.extend(t._parents)
    assert names.count("dropout") == 2
    with u.no_grad():
        y1, y2 = net.eval()(x).data, net(x).data
    np.testing.assert_array_equal(y1, y2)  # no dropout in eval mode: deterministic


def test_state_dict_round_trip_and_architecture_check():
    a = u.UNet(base_channels=4, depth=3, seed=1)
    b = u.UNet(base_channels=4, depth=3, seed=2)
    b.load_state_dict(a.state_dict())
    for (_, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        np.testing.assert_array_equal(pa.data, pb.data)
    with pytest.raises(ValueError, match="do not match this architecture"):
        u.UNet(base_channels=4, depth=2).load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="has shape"):
        u.UNet(base_channels=8, depth=3).load_state_dict(a.state_dict())


def _toy_problem(rng, size, out):
    """Smooth random blobs: foreground where a smoothed noise field is positive, seen through noise."""
    field = ndi.gaussian_filter(rng.standard_normal((size, size)), 3)
    labels = (field > 0).astype(np.int32)
    image = (0.2 + 0.6 * labels + rng.normal(0, 0.15, (size, size))).astype(np.float32)
    b = (size - out) // 2
    return image[None, None], labels[None, b:b + out, b:b + out].copy(), np.ones((1, out, out), np.float32)


def test_cpu_training_lowers_the_loss():
    rng = np.random.default_rng(0)
    net = u.UNet(base_channels=8, depth=3, seed=0)
    out = net.output_size(92)
    opt = u.SGD(net.parameters(), lr=0.01, momentum=0.99)
    losses = []
    for _ in range(60):
        x, labels, weights = _toy_problem(rng, 92, out)
        loss = F.softmax_cross_entropy(net(x), labels, weights)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.data))
    first, last = np.mean(losses[:10]), np.mean(losses[-10:])
    print(f"mean loss of the first 10 steps {first:.4f}, of the last 10 {last:.4f}")
    assert np.isfinite(losses).all()
    assert last < 0.5 * first


def test_sgd_rejects_bad_hyperparameters():
    net = u.UNet(base_channels=2, depth=2)
    with pytest.raises(ValueError, match="momentum"):
        u.SGD(net.parameters(), momentum=1.0)
    with pytest.raises(ValueError, match="lr"):
        u.SGD(net.parameters(), lr=float("nan"))
    with pytest.raises(ValueError, match="no parameters"):
        u.SGD([])
