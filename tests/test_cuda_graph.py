"""CUDA-graph capture and replay of the training step (unet_cuda/graph.py, train --cuda-graph).

Without a GPU (CI): the per-step scalars that a graph must not freeze, the dropout ``seed`` and the
learning rate ``lr``, are accepted by the reference as 0-d arrays and give exactly the results of the
plain numbers; wrong arrays are refused with the op and the argument named; the model takes its
dropout seeds from outside exactly as it draws them itself; SGD takes a per-step rate; and
``train --cuda-graph`` on the CPU ends with a one-line usage error. (The bindings' checks of the
device forms are in tests/test_bindings.py.)

On a GPU (marked ``gpu``): the 0-d device forms equal the number forms, including inside a replayed
graph whose scalar was rewritten after the capture; five graphed steps of a small U-Net (dropout
on, warm-up rate changing every step) equal five eager steps bit for bit, with the default memory
pool churned between steps; the non-finite guard names the step after a replay; the command line
trains with --cuda-graph, resumes, and ends with the weights of the eager run.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from unet_cuda import functional as F
from unet_cuda import ops
from unet_cuda.autograd import Tensor
from unet_cuda.model import UNet
from unet_cuda.ops import reference as ref
from unet_cuda.optim import SGD

ROOT = Path(__file__).resolve().parents[1]
_WHY_NOT = ops.cuda_status()


def run_train(args, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m unet_cuda.train args`` in ``cwd``, with the checkout on the import path."""
    paths = [str(ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths), OPENBLAS_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "unet_cuda.train", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


class FakeCudaScalar:
    """An object that claims to be a CUDA array (the reference must refuse it)."""

    __cuda_array_interface__ = {"shape": (), "typestr": "<u8", "data": (8, False), "version": 3}


# ------------------------------------------------------------------------------------------------
# The reference: 0-d seed and lr arrays
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1, 12345, 2**63 + 5, 2**64 - 1])
@pytest.mark.parametrize("p", [0.0, 0.3, 0.5])
def test_reference_dropout_mask_takes_a_0d_uint64_seed(seed, p):
    for shape in [(1,), (7, 3), (2, 3, 5, 4)]:
        want = ref.dropout_mask(shape, p, seed)
        got = ref.dropout_mask(shape, p, np.asarray(seed, dtype=np.uint64))
        assert got.dtype == np.uint8 and np.array_equal(got, want), (shape, p, seed)
        assert np.array_equal(ref.dropout_mask(shape, p, np.uint64(seed)), want)


def test_reference_sgd_takes_a_0d_float32_lr_with_identical_results():
    rng = np.random.default_rng(0)
    shape = (6, 3, 3, 3)
    param = rng.standard_normal(shape).astype(np.float32)
    param_a, param_b = param.copy(), param.copy()
    velocity_a, velocity_b = np.zeros_like(param), np.zeros_like(param)
    # A warm-up schedule: a different rate every step, none of them exact in float32.
    for step in range(6):
        lr = 0.01 * min(1.0, (step + 1) / 4)
        grad = rng.standard_normal(shape).astype(np.float32)
        ref.sgd_momentum_update_(param_a, grad, velocity_a, lr, 0.99, 1e-4)
        ref.sgd_momentum_update_(param_b, grad, velocity_b, np.asarray(lr, dtype=np.float32), 0.99, 1e-4)
        assert np.array_equal(velocity_a, velocity_b) and np.array_equal(param_a, param_b), step
    assert param_a.dtype == np.float32 and velocity_a.dtype == np.float32


@pytest.mark.parametrize("bad,what", [
    (np.asarray(5, dtype=np.int64), "0-d uint64"),
    (np.asarray([5], dtype=np.uint64), r"shape \(1,\)"),
    (np.asarray(5.0), "0-d uint64"),
])
def test_reference_refuses_other_seed_arrays(bad, what):
    with pytest.raises(ValueError, match=rf"dropout_mask: seed .*{what}"):
        ref.dropout_mask(4, 0.5, bad)


def test_reference_refuses_a_cuda_seed_or_lr():
    with pytest.raises(ValueError, match="dropout_mask: seed is a CUDA array"):
        ref.dropout_mask(4, 0.5, FakeCudaScalar())
    with pytest.raises(ValueError, match="sgd_momentum_update_: lr is a CUDA array"):
        ref.sgd_momentum_update_(np.zeros(3, np.float32), np.zeros(3, np.float32), np.zeros(3, np.float32),
                                 FakeCudaScalar(), 0.9, 0.0)


@pytest.mark.parametrize("bad,what", [
    (np.asarray(0.1), "0-d float32"),                        # float64
    (np.asarray([0.1], dtype=np.float32), r"shape \(1,\)"),
    (np.asarray(1, dtype=np.int32), "0-d float32"),
])
def test_reference_refuses_other_lr_arrays(bad, what):
    param, velocity = np.ones(3, np.float32), np.zeros(3, np.float32)
    with pytest.raises(ValueError, match=rf"sgd_momentum_update_: lr .*{what}"):
        ref.sgd_momentum_update_(param, np.ones(3, np.float32), velocity, bad, 0.9, 0.0)
    assert np.array_equal(param, np.ones(3, np.float32))  # refused before anything changed


def test_dispatcher_passes_0d_scalars_to_the_reference():
    like = np.zeros(1, np.float32)
    assert np.array_equal(ops.dropout_mask((3, 4), 0.5, np.asarray(9, dtype=np.uint64), like=like),
                          ref.dropout_mask((3, 4), 0.5, 9))


# ------------------------------------------------------------------------------------------------
# Model and optimiser: seeds and rate from outside, drawn as the eager step draws them
# ------------------------------------------------------------------------------------------------

def _batch(rng, size, out):
    x = rng.random((1, 1, size, size), dtype=np.float32)
    labels = rng.integers(0, 2, (1, out, out)).astype(np.int32)
    weights = rng.uniform(0.5, 2.0, (1, out, out)).astype(np.float32)
    return x, labels, weights


@pytest.mark.parametrize("depth,dropout,count", [(1, 0.5, 1), (3, 0.5, 2), (3, 0.0, 0)])
def test_num_dropout_layers(depth, dropout, count):
    net = UNet(base_channels=2, depth=depth, dropout=dropout)
    assert net.num_dropout_layers() == count
    assert len(net.draw_dropout_seeds()) == count


def test_seeds_drawn_first_give_the_forward_that_draws_them_itself():
    rng = np.random.default_rng(1)
    drawing, given = UNet(base_channels=2, depth=3, seed=4), UNet(base_channels=2, depth=3, seed=4)
    x, _, _ = _batch(rng, 44, 4)
    for _ in range(3):
        want = drawing(Tensor(x)).data
        seeds = given.draw_dropout_seeds()
        assert np.array_equal(given(Tensor(x), dropout_seeds=seeds).data, want)
    assert given.dropout_rng.bit_generator.state == drawing.dropout_rng.bit_generator.state
    # The same seeds as 0-d uint64 arrays (the form a graphed step passes, here on the CPU).
    seeds = given.draw_dropout_seeds()
    as_arrays = [np.asarray(s, dtype=np.uint64) for s in seeds]
    assert np.array_equal(given(Tensor(x), dropout_seeds=as_arrays).data,
                          given(Tensor(x), dropout_seeds=seeds).data)


def test_forward_refuses_the_wrong_number_of_seeds_and_ignores_them_in_eval():
    net = UNet(base_channels=2, depth=3)
    x = np.zeros((1, 1, 44, 44), np.float32)
    with pytest.raises(ValueError, match="dropout_seeds must hold 2 seeds"):
        net(Tensor(x), dropout_seeds=[1])
    state = net.dropout_rng.bit_generator.state
    net.eval()
    net(Tensor(x), dropout_seeds=[1])
    assert net.dropout_rng.bit_generator.state == state


def test_sgd_step_with_a_0d_rate_equals_setting_lr():
    rng = np.random.default_rng(2)
    nets = [UNet(base_channels=2, depth=2, seed=7) for _ in range(2)]
    opts = [SGD(net.parameters(), lr=0.5, momentum=0.99, weight_decay=1e-4) for net in nets]
    for step in range(3):
        x, labels, weights = _batch(rng, 36, 20)
        lr = 0.01 * (step + 1) / 3
        for i, (net, opt) in enumerate(zip(nets, opts)):
            loss = F.softmax_cross_entropy(net(Tensor(x)), labels, weights)
            opt.zero_grad()
            loss.backward()
            if i == 0:
                opt.lr = lr
                opt.step()
            else:
                opt.step(lr=np.asarray(lr, dtype=np.float32))
    for (name, a), (_, b) in zip(nets[0].named_parameters(), nets[1].named_parameters()):
        assert np.array_equal(a.data, b.data), name
    assert all(np.array_equal(a, b) for a, b in zip(opts[0].velocity, opts[1].velocity))


# ------------------------------------------------------------------------------------------------
# The command line and the module without a GPU
# ------------------------------------------------------------------------------------------------

def _assert_usage_error(result, *fragments):
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 2, f"exit code {result.returncode}\n{result.stderr}"
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_cuda_graph_on_the_cpu_is_a_usage_error(tmp_path):
    result = run_train(["--cuda-graph", "--device", "cpu", "--base-channels", "2", "--depth", "2",
                        "--tile", "36", "--steps", "2", "--out", "run", "--quiet"], cwd=tmp_path, timeout=120)
    _assert_usage_error(result, "--cuda-graph", "needs the GPU", "--device cuda")
    assert not (tmp_path / "run").exists()  # refused before anything was created


@pytest.mark.skipif(_WHY_NOT is None, reason="CUDA works here, so the default device is the GPU")
def test_cuda_graph_without_a_gpu_says_why(tmp_path):
    result = run_train(["--cuda-graph", "--steps", "2", "--out", "run", "--quiet"], cwd=tmp_path, timeout=120)
    _assert_usage_error(result, "--cuda-graph", "CUDA cannot run here")


def test_help_explains_the_flag(tmp_path):
    result = run_train(["--help"], cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())
    assert "--cuda-graph" in text and "CUDA graph" in text and "bit for bit" in text


@pytest.mark.skipif(_WHY_NOT is None, reason="CUDA works here")
def test_graphed_step_needs_the_cuda_backend():
    from unet_cuda.graph import GraphedTrainStep

    net = UNet(base_channels=2, depth=2)
    with pytest.raises(ops.CudaUnavailableError, match="CUDA graph needs the CUDA backend"):
        GraphedTrainStep(net, SGD(net.parameters()), (1, 1, 36, 36), (1, 20, 20))


# ------------------------------------------------------------------------------------------------
# GPU: the device forms, a captured op, graphed == eager, the guard, the command line
# ------------------------------------------------------------------------------------------------

def _cupy():
    import cupy  # noqa: PLC0415 - GPU tests only

    return cupy


@pytest.mark.parametrize("seed", [0, 1, 2**63 + 5, 2**64 - 1])
@pytest.mark.parametrize("p", [0.0, 0.5, 0.9])
@pytest.mark.gpu
@pytest.mark.skipif(_WHY_NOT is not None, reason=f"the CUDA backend cannot run here: {_WHY_NOT}")
def test_device_seed_equals_the_integer_seed(seed, p):
    cupy = _cupy()
    from unet_cuda.ops import cuda as cu

    for shape in [(1,), (7, 3), (2, 5, 9, 9), (1, 64, 28, 28)]:
        want = cu.dropout_mask(shape, p, seed)
        got = cu.dropout_mask(shape, p, cupy.asarray(seed, dtype=cupy.uint64))
        assert cupy.array_equal(got, want), (shape, p, seed)
        assert np.array_equal(got.get(), ref.dropout_mask(shape, p, seed))


@pytest.mark.gpu
@pytest.mark.skipif(_WHY_NOT is not None, reason=f"the CUDA backend cannot run here: {_WHY_NOT}")
def test_device_lr_equals_the_number():
    cupy = _cupy()
    from unet_cuda.ops import cuda as cu

    rng = np.random.default_rng(3)
    for shape in [(1,), (5,), (33, 7, 3, 3), (512, 64, 2, 2)]:
        param = rng.standard_normal(shape).astype(np.float32)
        velocity = (0.1 * rng.standard_normal(shape)).astype(np.float32)
        grad = rng.standard_normal(shape).astype(np.float32)
        for lr in (0.0, 1e-3, 0.0123456789, 0.5):
            p_a, v_a = cupy.asarray(param), cupy.asarray(velocity)
            p_b, v_b = cupy.asarray(param), cupy.asarray(velocity)
            cu.sgd_momentum_update_(p_a, cupy.asarray(grad), v_a, lr, 0.99, 5e-4)
            cu.sgd_momentum_update_(p_b, cupy.asarray(grad), v_b, cupy.asarray(lr, dtype=cupy.float32), 0.99, 5e-4)
            assert cupy.array_equal(p_a, p_b) and cupy.array_equal(v_a, v_b), (shape, lr)


@pytest.mark.gpu
@pytest.mark.skipif(_WHY_NOT is not None, reason=f"the CUDA backend cannot run here: {_WHY_NOT}")
def test_device_scalars_are_checked():
    cupy = _cupy()
    from unet_cuda.ops import cuda as cu

    with pytest.raises(ValueError, match="dropout_mask: argument seed is a NumPy array"):
        cu.dropout_mask(4, 0.5, np.asarray(3, dtype=np.uint64))
    with pytest.raises(ValueError, match=r"dropout_mask: argument seed must have dtype uint64"):
        cu.dropout_mask(4, 0.5, cupy.asarray(3, dtype=cupy.int64))
    with pytest.raises(ValueError, match=r"dropout_mask: argument seed must have 0 dimensions"):
        cu.dropout_mask(4, 0.5, cupy.asarray([3], dtype=cupy.uint64))
    param, grad, velocity = (cupy.zeros(3, cupy.float32) for _ in range(3))
    with pytest.raises(ValueError, match="sgd_momentum_update_: argument lr is a NumPy array"):
        cu.sgd_momentum_update_(param, grad, velocity, np.asarray(0.1, np.float32), 0.9, 0.0)
    with pytest.raises(ValueError, match=r"sgd_momentum_update_: argument lr must have dtype float32"):
        cu.sgd_momentum_update_(param, grad, velocity, cupy.asarray(0.1), 0.9, 0.0)
    with pytest.raises(ValueError, match=r"sgd_momentum_update_: argument lr must have 0 dimensions"):
        cu.sgd_momentum_update_(param, grad, velocity, cupy.asarray([0.1], cupy.float32), 0.9, 0.0)


@pytest.mark.gpu
@pytest.mark.skipif(_WHY_NOT is not None, reason=f"the CUDA backend cannot run here: {_WHY_NOT}")
def test_a_replayed_graph_reads_the_scalars_written_after_capture():
    """The point of the device forms: the kernel reads the value when it runs, not when captured."""
    cupy = _cupy()
    from unet_cuda.ops import cuda as cu

    stream = cupy.cuda.Stream(non_blocking=True)
    pool = cupy.cuda.MemoryPool()
    shape = (3, 17, 5)
    with stream, cupy.cuda.using_allocator(pool.malloc):
        seed = cupy.zeros((), dtype=cupy.uint64)
        lr = cupy.zeros((), dtype=cupy.float32)
        param = cupy.ones(1000, dtype=cupy.float32)
        grad = cupy.full(1000, 2.0, dtype=cupy.float32)
        velocity = cupy.zeros(1000, dtype=cupy.float32)
        cu.dropout_mask(shape, 0.5, seed)                    # loads the kernels before the capture
        cu.sgd_momentum_update_(param, grad, velocity, lr, 0.0, 0.0)   # lr 0: param unchanged
        stream.synchronize()
        stream.begin_capture()
        mask = cu.dropout_mask(shape, 0.5, seed)
        cu.sgd_momentum_update_(param, grad, velocity, lr, 0.0, 0.0)
        graph = stream.end_capture()
    for value, rate in [(7, 0.25), (2**64 - 3, 0.5), (123456789, 0.125)]:
        seed.set(np.asarray(value, dtype=np.uint64))  # written after the capture, then synchronised
        lr.set(np.asarray(rate, dtype=np.float32))
        cupy.cuda.Device().synchronize()
        before = param.get()
        graph.launch(stream)
        stream.synchronize()
        assert np.array_equal(mask.get(), ref.dropout_mask(shape, 0.5, value)), value
        assert np.array_equal(param.get(), before - np.float32(rate) * np.float32(2.0)), rate


def _eager_step(net, opt, x, labels, weights, lr):
    """train.Trainer.train_step without its data and guard: forward, loss, backward, update."""
    net.train()
    loss = F.softmax_cross_entropy(net(Tensor(x)), labels, weights)
    opt.zero_grad()
    loss.backward()
    opt.lr = lr
    opt.step()
    return loss.data


def _warmup_lr(step, base=0.01, warmup=3):
    return base * min(1.0, (step + 1) / warmup)


@pytest.mark.gpu
@pytest.mark.skipif(_WHY_NOT is not None, reason=f"the CUDA backend cannot run here: {_WHY_NOT}")
def test_graphed_steps_equal_eager_steps_bitwise():
    cupy = _cupy()
    from unet_cuda.graph import GraphedTrainStep

    rng = np.random.default_rng(11)
    size, out = 92, 52
    nets = [UNet(base_channels=4, depth=3, dropout=0.5, seed=5, device="cuda") for _ in range(2)]
    opts = [SGD(net.parameters(), lr=0.01, momentum=0.99, weight_decay=1e-4) for net in nets]
    eager_net, graph_net = nets
    eager_opt, graph_opt = opts
    graphed = GraphedTrainStep(graph_net, graph_opt, (2, 1, size, size), (2, out, out))
    for step in range(5):
        x = cupy.asarray(rng.random((2, 1, size, size), dtype=np.float32))
        labels = cupy.asarray(rng.integers(0, 2, (2, out, out)).astype(np.int32))
        weights = cupy.asarray(rng.uniform(0.5, 5.0, (2, out, out)).astype(np.float32))
        lr = _warmup_lr(step)
        want = _eager_step(eager_net, eager_opt, x, labels, weights, lr)
        got = graphed(x, labels, weights, lr)
        assert graphed.captured == (step >= 1)
        assert float(got) == float(want), step
        for (name, a), (_, b) in zip(eager_net.named_parameters(), graph_net.named_parameters()):
            assert cupy.array_equal(a.data, b.data), f"step {step + 1}: {name}"
            assert cupy.array_equal(a.grad, b.grad), f"step {step + 1}: gradient of {name}"
        for i, (a, b) in enumerate(zip(eager_opt.velocity, graph_opt.velocity)):
            assert cupy.array_equal(a, b), f"step {step + 1}: velocity {i}"
        assert eager_net.dropout_rng.bit_generator.state == graph_net.dropout_rng.bit_generator.state
        # Churn the default memory pool: a graph that used it would have its buffers overwritten.
        junk = [cupy.full(1 << 18, cupy.nan, dtype=cupy.float32) for _ in range(16)]
        del junk, x, labels, weights
    # Replacing the weights under the graph is refused, not silently ignored.
    graph_net.load_state_dict(eager_net.state_dict())
    x = cupy.zeros((2, 1, size, size), cupy.float32)
    with pytest.raises(RuntimeError, match="replaced since the step was captured"):
        graphed(x, cupy.zeros((2, out, out), cupy.int32), cupy.ones((2, out, out), cupy.float32), 0.01)
    with pytest.raises(ValueError, match="x must have shape"):
        GraphedTrainStep(graph_net, graph_opt, (2, 1, size, size), (2, out, out))(
            x[:1], cupy.zeros((1, out, out), cupy.int32), cupy.ones((1, out, out), cupy.float32), 0.01)


def _trainer(tmp_path, *extra, cuda_graph=True):
    from unet_cuda.train import Trainer, build_parser, resolve_config

    args = build_parser().parse_args(["--device", "cuda", "--base-channels", "4", "--depth", "3", "--tile", "92",
                                      "--steps", "5", "--out", str(tmp_path), *extra])
    cfg, _ = resolve_config(args)
    return Trainer(cfg, tmp_path, cuda_graph=cuda_graph)


@pytest.fixture
def keeps_conv3x3_version():
    """A Trainer may select the conv3x3 kernel of its precision; the tests after this one keep theirs."""
    from unet_cuda.ops import cuda as cu

    with cu.use_conv3x3_version(cu.get_conv3x3_version()):
        yield


@pytest.mark.gpu
@pytest.mark.skipif(_WHY_NOT is not None, reason=f"the CUDA backend cannot run here: {_WHY_NOT}")
def test_trainer_guard_names_the_step_after_a_replay(tmp_path, keeps_conv3x3_version):
    cupy = _cupy()
    from unet_cuda.train import NonFiniteError

    trainer = _trainer(tmp_path)
    real_next_batch, calls = trainer.next_batch, []

    def next_batch():
        x, labels, weights = real_next_batch()
        calls.append(1)
        if len(calls) == 3:  # a replayed step (1: warm-up, 2: capture and first replay)
            weights = weights.copy()
            weights[0, 0, 0] = cupy.nan
        return x, labels, weights

    trainer.next_batch = next_batch
    assert np.isfinite(trainer.train_step()) and np.isfinite(trainer.train_step())
    with pytest.raises(NonFiniteError, match=r"training stopped at step 3: the loss is nan and the update ran "
                                             r"inside the CUDA graph .*non-finite gradients first in layer"):
        trainer.train_step()
    assert trainer.step == 2


def _checkpoint_state(path):
    from unet_cuda.checkpoint import load_checkpoint

    checkpoint = load_checkpoint(path)
    return checkpoint["model_state"], checkpoint["optimizer_state"]["velocity"], checkpoint["meta"]["history"]["loss"]


@pytest.mark.gpu
@pytest.mark.skipif(_WHY_NOT is not None, reason=f"the CUDA backend cannot run here: {_WHY_NOT}")
def test_cli_graphed_run_and_resume_equal_the_eager_run(tmp_path):
    common = ["--device", "cuda", "--base-channels", "4", "--depth", "3", "--tile", "92", "--val-every", "2",
              "--warmup-steps", "3", "--no-plots", "--quiet"]
    eager = run_train([*common, "--steps", "4", "--out", "eager"], cwd=tmp_path)
    assert eager.returncode == 0, eager.stderr
    graphed = run_train([*common, "--steps", "4", "--out", "graphed", "--cuda-graph"], cwd=tmp_path)
    assert graphed.returncode == 0 and "Traceback" not in graphed.stderr, graphed.stderr
    assert "--cuda-graph" in graphed.stderr
    first = run_train([*common, "--steps", "2", "--out", "resumed", "--cuda-graph"], cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    resumed = run_train([*common, "--steps", "4", "--out", "resumed", "--resume", "--cuda-graph"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    want_weights, want_velocity, want_loss = _checkpoint_state(tmp_path / "eager" / "last.ckpt")
    for run in ("graphed", "resumed"):
        weights, velocity, loss = _checkpoint_state(tmp_path / run / "last.ckpt")
        assert loss == want_loss, run
        for name in want_weights:
            assert np.array_equal(weights[name], want_weights[name]), f"{run}: {name}"
        assert all(np.array_equal(a, b) for a, b in zip(velocity, want_velocity)), run
