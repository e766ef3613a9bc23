"""Whole-network checks on the GPU: a training step equals the NumPy step, the paper's network runs
a 572 tile forward and backward, training is bitwise deterministic, and a resumed run continues
bit for bit. Skipped with the reason where the CUDA backend cannot run."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
import pytest

import unet_cuda as u
from unet_cuda import functional as F
from unet_cuda import ops

_WHY_NOT = ops.cuda_status()
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(_WHY_NOT is not None, reason=f"the CUDA backend cannot run here: {_WHY_NOT}"),
]


def _problem(rng, n, size, out, classes=2):
    x = rng.random((n, 1, size, size), dtype=np.float32)
    labels = rng.integers(0, classes, (n, out, out)).astype(np.int32)
    weights = rng.uniform(0.5, 5.0, (n, out, out)).astype(np.float32)
    return x, labels, weights


def _step(net, opt, x, labels, weights):
    loss = F.softmax_cross_entropy(net(x), labels, weights)
    opt.zero_grad()
    loss.backward()
    grads = {name: ops.to_numpy(p.grad).copy() for name, p in net.named_parameters()}
    opt.step()
    return float(loss.data), grads


def _rel(a, b):
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))


@pytest.mark.parametrize("depth,base,size,batch", [(3, 8, 92, 1), (4, 6, 188, 2), (5, 4, 188, 1)])
def test_training_step_equals_numpy_step(depth, base, size, batch):
    """Forward, loss, backward and SGD update on the GPU vs the NumPy reference from the same
    weights, data and dropout seeds: relative error <= 1e-4 in the loss, every gradient and every
    updated weight (over two steps, so momentum is exercised too)."""
    rng = np.random.default_rng(depth * 1000 + size)
    cpu = u.UNet(base_channels=base, depth=depth, seed=3, device="cpu")
    gpu = u.UNet(base_channels=base, depth=depth, seed=3, device="cuda")
    opt_cpu = u.SGD(cpu.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    opt_gpu = u.SGD(gpu.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    out = cpu.output_size(size)
    worst = {"loss": 0.0, "grad": 0.0, "weight": 0.0}
    for _ in range(2):
        x, labels, weights = _problem(rng, batch, size, out)
        loss_c, grads_c = _step(cpu, opt_cpu, x, labels, weights)
        loss_g, grads_g = _step(gpu, opt_gpu, ops.to_device(x, "cuda"), ops.to_device(labels, "cuda"),
                                ops.to_device(weights, "cuda"))
        worst["loss"] = max(worst["loss"], abs(loss_g - loss_c) / abs(loss_c))
        for name in grads_c:
            worst["grad"] = max(worst["grad"], _rel(grads_g[name], grads_c[name]))
        for (name, pc), (_, pg) in zip(cpu.named_parameters(), gpu.named_parameters()):
            worst["weight"] = max(worst["weight"], _rel(ops.to_numpy(pg.data), pc.data))
    print(f"depth {depth} base {base} size {size} batch {batch}: worst relative errors {worst}")
    assert worst["loss"] <= 1e-4 and worst["grad"] <= 1e-4 and worst["weight"] <= 1e-4, worst


# How far a training step in a reduced precision may drift from the float64-checked NumPy step
# (relative to the largest value, per tensor): its operands carry 10 (tf32) or 7 (bf16) mantissa
# bits through some twenty layers, each adding errors of a few units of 2^-11 (2^-8). Loose enough
# for that rounding, far below the errors of order 1 that a wrong index or a lost tile gives.
PRECISION_TOLERANCE = {"fp32": 1e-4, "tf32": 3e-2, "bf16": 0.15}


def _step_against_numpy(name, precision, seed, data_seed, using):
    """One step of a depth-4 U-Net on the GPU (inside ``using()``, which sets the kernels) against
    the NumPy step: loss, every gradient and every updated weight within ``precision``'s
    tolerance."""
    rng = np.random.default_rng(data_seed)
    cpu = u.UNet(base_channels=8, depth=4, seed=seed, device="cpu")
    gpu = u.UNet(base_channels=8, depth=4, seed=seed, device="cuda")
    opt_cpu, opt_gpu = u.SGD(cpu.parameters(), lr=0.01), u.SGD(gpu.parameters(), lr=0.01)
    x, labels, weights = _problem(rng, 1, 188, cpu.output_size(188))
    loss_c, grads_c = _step(cpu, opt_cpu, x, labels, weights)
    with using():
        loss_g, grads_g = _step(gpu, opt_gpu, ops.to_device(x, "cuda"), ops.to_device(labels, "cuda"),
                                ops.to_device(weights, "cuda"))
    worst = {"loss": abs(loss_g - loss_c) / abs(loss_c),
             "grad": max(_rel(grads_g[n], grads_c[n]) for n in grads_c),
             "weight": max(_rel(ops.to_numpy(pg.data), pc.data)
                           for (_, pc), (_, pg) in zip(cpu.named_parameters(), gpu.named_parameters()))}
    print(f"{name}: worst relative errors {worst}")
    tolerance = PRECISION_TOLERANCE[precision]
    assert all(v <= tolerance for v in worst.values()), (name, worst, tolerance)


@pytest.mark.parametrize("precision", sorted(PRECISION_TOLERANCE))
def test_training_step_in_each_precision(precision):
    """One step in each precision mode against the NumPy step, within that mode's tolerance."""
    @contextlib.contextmanager
    def using():
        with ops.restoring_precision():
            ops.set_precision(precision, "cuda")
            yield

    _step_against_numpy(precision, precision, 5, 11, using)


@pytest.mark.parametrize("version,precision", [("v7_tf32_halo", "tf32"), ("v8_bf16_halo", "bf16"),
                                               ("v9_fp32_halo", "fp32")])
def test_training_step_with_a_halo_kernel(tmp_path: Path, version, precision):
    """v7_tf32_halo, v8_bf16_halo and v9_fp32_halo (their own forward and backward data, v9 its own
    weight gradients too; v6's, v5's or v3's GEMMs for the rest) in a whole step against the NumPy
    step, in their precision's tolerance; and python -m unet_cuda.profile --kernel runs them."""
    from unet_cuda.ops import cuda  # noqa: PLC0415
    from unet_cuda.profile import main as profile_main  # noqa: PLC0415

    if not cuda.conv3x3_version_available(version):
        pytest.skip(f"{version} cannot run on this GPU or build (v7 and v8 need sm_90a)")
    _step_against_numpy(version, precision, 6, 12, lambda: cuda.use_conv3x3_version(version))

    out = tmp_path / "profile.json"
    assert profile_main(["--device", "cuda", "--base-channels", "8", "--depth", "3", "--tile", "92",
                         "--steps", "1", "--kernel", version, "--json", str(out)]) == 0
    assert json.loads(out.read_text())["precision"] == f"{precision} ({version})"
    other = "bf16" if precision == "fp32" else "fp32"
    assert profile_main(["--device", "cuda", "--kernel", version, "--precision", other]) == 2


def test_paper_network_forward_and_backward_on_a_572_tile():
    rng = np.random.default_rng(0)
    net = u.UNet(device="cuda", seed=0)
    assert net.num_parameters() == 31_030_658
    x, labels, weights = _problem(rng, 1, 572, 388)
    logits = net(ops.to_device(x, "cuda"))
    assert logits.shape == (1, 2, 388, 388)
    loss = F.softmax_cross_entropy(logits, ops.to_device(labels, "cuda"), ops.to_device(weights, "cuda"))
    loss.backward()
    assert np.isfinite(float(loss.data))
    for name, p in net.named_parameters():
        g = ops.to_numpy(p.grad)
        assert g.shape == p.shape and np.isfinite(g).all(), name
    assert np.abs(ops.to_numpy(net.named_parameters()[0][1].grad)).sum() > 0


def _train_weights(steps, seed=0):
    rng = np.random.default_rng(seed)
    net = u.UNet(base_channels=8, depth=4, seed=seed, device="cuda")
    opt = u.SGD(net.parameters(), lr=0.001, momentum=0.99)
    out = net.output_size(188)
    for _ in range(steps):
        x, labels, weights = _problem(rng, 1, 188, out)
        _step(net, opt, ops.to_device(x, "cuda"), ops.to_device(labels, "cuda"), ops.to_device(weights, "cuda"))
    return net.state_dict()


def test_same_seed_gives_bitwise_identical_weights():
    """No float atomics in any reduction: two runs from the same seed agree to the last bit."""
    a, b = _train_weights(5), _train_weights(5)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_autotuned_resume_keeps_the_plans(tmp_path: Path):
    """train --autotune: the checkpoint keeps the measured plans and plans.json holds them; a
    resume runs them again (without --autotune), and a run given them with --plans computes the
    same 8 steps bit for bit."""
    import json

    from unet_cuda.checkpoint import load_checkpoint
    from unet_cuda.ops import cuda as cu
    from unet_cuda.train import main

    common = ["--device", "cuda", "--base-channels", "4", "--depth", "3", "--tile", "92",
              "--val-every", "4", "--no-plots", "--quiet"]
    assert main(common + ["--steps", "4", "--autotune", "--out", str(tmp_path / "split")]) == 0
    assert cu.tuned_plans() == [] and not cu.get_autotune()  # main() leaves the caller's settings
    plans = load_checkpoint(tmp_path / "split" / "last.ckpt")["meta"]["gemm_plans"]
    assert plans and all(e["candidates"] > 0 for e in plans)
    saved = json.loads((tmp_path / "split" / "plans.json").read_text())["plans"]
    assert [e["plan"] for e in saved] == [e["plan"] for e in plans]
    assert main(["--out", str(tmp_path / "split"), "--resume", "--steps", "8", "--quiet", "--no-plots"]) == 0
    assert main(common + ["--steps", "8", "--plans", str(tmp_path / "split" / "plans.json"),
                          "--out", str(tmp_path / "straight")]) == 0
    straight = load_checkpoint(tmp_path / "straight" / "last.ckpt")
    split = load_checkpoint(tmp_path / "split" / "last.ckpt")
    assert [e["plan"] for e in split["meta"]["gemm_plans"]] == [e["plan"] for e in plans]
    assert straight["meta"]["history"]["loss"] == split["meta"]["history"]["loss"]
    for name, value in straight["model_state"].items():
        np.testing.assert_array_equal(value, split["model_state"][name], err_msg=name)


def test_resume_on_the_gpu_is_bit_identical(tmp_path: Path):
    """train.py on the GPU: 4 steps + resume to 8 equals 8 uninterrupted steps, bit for bit."""
    from unet_cuda.checkpoint import load_checkpoint
    from unet_cuda.train import main

    common = ["--device", "cuda", "--base-channels", "4", "--depth", "3", "--tile", "92",
              "--val-every", "4", "--no-plots", "--quiet"]
    assert main(common + ["--steps", "8", "--out", str(tmp_path / "straight")]) == 0
    assert main(common + ["--steps", "4", "--out", str(tmp_path / "split")]) == 0
    assert main(["--out", str(tmp_path / "split"), "--resume", "--steps", "8", "--quiet", "--no-plots"]) == 0
    straight = load_checkpoint(tmp_path / "straight" / "last.ckpt")
    split = load_checkpoint(tmp_path / "split" / "last.ckpt")
    assert straight["meta"]["history"]["loss"] == split["meta"]["history"]["loss"]
    for name, value in straight["model_state"].items():
        np.testing.assert_array_equal(value, split["model_state"][name], err_msg=name)
