"""End-to-end benchmarks: one training step of the paper's network on a 572 tile (batch 1) and the
overlap-tile prediction of a 512x512 image, ours against a PyTorch U-Net of the same architecture
(bench/torch_unet.py) with the same initial weights, data, loss and optimiser.

Our precision modes (``unet_cuda.ops.cuda.PRECISIONS``, the conv3x3 kernel version each runs on
this GPU from ``precision_version``) are each paired with one PyTorch setting (PERFORMANCE.md,
"Peers"):

    ours fp32 (v3_igemm)     <->  PyTorch with TF32 off (true FP32)
    ours tf32 (v4_tf32_mma;  <->  PyTorch's default (cuDNN convolutions in TF32)
      v6_tf32_wgmma on Hopper)
    ours bf16 (v5_bf16_mma)  <->  PyTorch bf16 autocast + channels_last

* ``test_loss_matches_torch_fp32`` (first, not timed): from the same weights and data, dropout
  off, our loss (fp32 mode) before and after one SGD step equals PyTorch's true-FP32 loss to 1e-4
  relative, and every tensor's update (lr times its gradient) agrees to 1e-2 (relative L2; float32
  sums over 1e5 pixels in different orders, cuDNN's algorithms included, differ by some 1e-4 here).
* ``test_train_step_ours[fp32|tf32|bf16]``: forward, loss, backward and SGD update (lr 1e-3,
  momentum 0.99, Caffe's rule) of ``unet_cuda.UNet`` with dropout as in training, in each mode
  (``use_precision``).
* ``test_train_step_graphed[fp32|tf32|bf16]``: the same step as a CUDA graph
  (``unet_cuda.graph.GraphedTrainStep``, ``train --cuda-graph``): eager warm-up, capture, then
  replays are timed. Skipped with the reason where the module does not import.
* ``test_train_step_fusions[unfused|relu_fused]``: the tf32 step with the backward's fusions
  (``unet_cuda.functional``) switched: neither, or the ReLU's backward in its consumers' kernels
  as well as the default's skip-map sums in the pools' backward; impl ``ours_<variant>``.
* ``test_train_step_torch[fp32|tf32|bf16]``: the same step in PyTorch, cuDNN autotuned
  (``cudnn.benchmark = True``), in the three settings above.
* ``test_infer_512_ours[...]`` and ``test_infer_512_torch[...]``: softmax probabilities of a
  512x512 image by overlap-tile with the tile ``python -m unet_cuda.predict`` picks on a GPU (one
  tile of 700 px, 516 px out, mirrored borders; ``unet_cuda.tiling.inference_tile``), the same for
  PyTorch, in each mode and setting, including the host-side tiling and copies; wall time. The
  inference target is the bf16 figure.
* ``test_train_step_kernel[...]``: the tf32 step with v6_tf32_wgmma or v7_tf32_halo, the bf16
  step with v8_bf16_halo and the fp32 step with v9_fp32_halo (v7-v9: the input window copied once
  for the nine taps) in place of the mode's version, eager and graphed, where they can run (v6-v8:
  Hopper); impl ``ours_wgmma``, ``ours_halo`` (tf32), ``ours_halo_bf16`` (bf16),
  ``ours_halo_fp32`` (fp32), and ``..._graph``.
* ``test_train_step_autotuned[fp32|tf32|bf16]`` (last): our step with every GEMM's plan (tile and
  K split) measured on this GPU at its first call (``unet_cuda.ops.cuda.autotuning``) instead of
  ruled; impl ``ours_autotuned``, its record keeping the table of plans.

Step times are CUDA-event medians (no synchronisation inside the step; our loss stays on the
device); pytest-benchmark's own statistics are the synchronised wall time of a step.
"""

from __future__ import annotations

import gc
import time

import numpy as np
import pytest

import benchlib
import collect_results

pytestmark = pytest.mark.gpu

_SKIP = benchlib.cuda_skip_reason() or benchlib.torch_skip_reason()
if _SKIP:
    pytest.skip(f"GPU benchmarks skipped: {_SKIP}", allow_module_level=True)
pytest.importorskip("pytest_benchmark", reason="pytest-benchmark is not installed")

import cupy  # noqa: E402
import torch  # noqa: E402

import unet_cuda  # noqa: E402
from unet_cuda import functional as F  # noqa: E402
from unet_cuda import tiling  # noqa: E402
from unet_cuda.autograd import Tensor, no_grad  # noqa: E402
from unet_cuda.ops import cuda as cu  # noqa: E402
from unet_cuda.predict import GPU_MAX_TILE  # noqa: E402

try:  # the CUDA-graph training step; its benchmark skips with the reason where it is missing
    from unet_cuda.graph import GraphedTrainStep  # noqa: E402
    _GRAPH_SKIP = None
except Exception as exc:  # noqa: BLE001
    GraphedTrainStep = None
    _GRAPH_SKIP = f"unet_cuda.graph.GraphedTrainStep does not import ({exc.__class__.__name__}: {exc})"

from torch_unet import CaffeSGD, TorchUNet, weighted_softmax_loss  # noqa: E402

TILE = 572
IMAGE = 512
LR, MOMENTUM = 1e-3, 0.99
NET = benchlib.network(TILE)
STEP_FLOPS = NET.train_step_flops()
STEP_SHAPE = "x[1,1,572,572] -> logits[1,2,388,388]; forward + loss + backward + SGD"
PRECISIONS = tuple(cu.PRECISIONS)          # ours: fp32, tf32, bf16
TORCH_SETTINGS = tuple(benchlib.TORCH_SETTINGS)   # PyTorch's, by the same names (module docstring)
# The prediction's tile: what `python -m unet_cuda.predict` picks on a GPU for a 512x512 image
# (unet_cuda.tiling.inference_tile: one 700 tile, 516 px out, instead of four of 572); both sides
# use it.
INFER_TILE = tiling.inference_tile(IMAGE, IMAGE, 5, GPU_MAX_TILE)
INFER_NET = benchlib.network(INFER_TILE)
INFER_BATCH = 4           # tiles per forward pass (all of them, where there are several)

CHECK_LR = 1e-3           # the training default: one step lowers the loss of a random tile by some 20 %
LOSS_RTOL = 1e-4
UPDATE_RTOL = 1e-2        # per tensor, relative L2 of the SGD update (the gradient, in effect)


# ------------------------------------------------------------------------------------------------
# Shared state
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def env():
    saved = (torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32,
             torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.benchmark = True
    yield {
        "ours": benchlib.CupyDevice(flush_bytes=0),
        "peer": benchlib.TorchDevice(flush_bytes=0),
        "ceilings": benchlib.ceilings_for(benchlib.gpu_name()),
        "tf32_defaults": {"cudnn_allow_tf32": saved[1], "matmul_allow_tf32": saved[2]},
    }
    torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32 = saved[0], saved[1]
    torch.backends.cuda.matmul.allow_tf32 = saved[2]


@pytest.fixture(scope="module")
def data():
    """One training tile: random input, random binary labels, a weight map in [0.5, 10)."""
    rng = np.random.default_rng(2015)
    out = NET.layers[-1].out_hw
    x = rng.standard_normal((1, 1, TILE, TILE), dtype=np.float32)
    labels = (rng.random((1, out, out)) < 0.5).astype(np.int32)
    weights = rng.uniform(0.5, 10.0, (1, out, out)).astype(np.float32)
    image = rng.random((IMAGE, IMAGE), dtype=np.float32)
    return {"x": x, "labels": labels, "weights": weights, "image": image}


@pytest.fixture(scope="module")
def initial_state():
    """The paper network's initial weights (seed 0), as NumPy arrays by our parameter names."""
    return unet_cuda.UNet(seed=0).state_dict()


@pytest.fixture(autouse=True)
def _free_memory():
    yield
    gc.collect()
    cupy.get_default_memory_pool().free_all_blocks()
    torch.cuda.empty_cache()


def _torch_mode(setting: str, defaults: dict) -> None:
    """TF32 flags of a setting: "fp32" turns TF32 off; "tf32" and "bf16" keep PyTorch's defaults."""
    if setting == "fp32":
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
    else:
        torch.backends.cudnn.allow_tf32 = defaults["cudnn_allow_tf32"]
        torch.backends.cuda.matmul.allow_tf32 = defaults["matmul_allow_tf32"]


def _restore(defaults: dict) -> None:
    torch.backends.cudnn.allow_tf32 = defaults["cudnn_allow_tf32"]
    torch.backends.cuda.matmul.allow_tf32 = defaults["matmul_allow_tf32"]


def _torch_model(state: dict, setting: str, dropout: float = 0.5) -> TorchUNet:
    model = TorchUNet(dropout=dropout).load_unet_state(state).cuda()
    if setting == "bf16":
        model = model.to(memory_format=torch.channels_last)
    return model


def _torch_inputs(data: dict, setting: str):
    x = torch.from_numpy(data["x"]).cuda()
    if setting == "bf16":
        x = x.contiguous(memory_format=torch.channels_last)
    return x, torch.from_numpy(data["labels"]).cuda().long(), torch.from_numpy(data["weights"]).cuda()


def _autocast(setting: str):
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=(setting == "bf16"))


# ------------------------------------------------------------------------------------------------
# Correctness against the peer (not timed)
# ------------------------------------------------------------------------------------------------


def _relative(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-30)


def test_loss_matches_torch_fp32(env, data):
    """Our GPU loss in fp32 mode equals PyTorch's true-FP32 loss before and after one SGD step
    (dropout off)."""
    benchlib.skip_if_out_of_time(pytest, 20)
    net = unet_cuda.UNet(seed=1, dropout=0.0)
    state = net.state_dict()
    net.to("cuda").train()
    defaults = env["tf32_defaults"]
    _torch_mode("fp32", defaults)
    try:
        model = _torch_model(state, "fp32", dropout=0.0).train()
        opt = CaffeSGD(model.parameters(), lr=CHECK_LR, momentum=MOMENTUM)
        tx, tlabels, tweights = _torch_inputs(data, "fp32")

        def torch_step():
            opt.zero_grad()
            loss = weighted_softmax_loss(model(tx), tlabels, tweights)
            loss.backward()
            opt.step()
            return float(loss.item())

        torch_before = torch_step()
        with torch.no_grad():
            torch_after = float(weighted_softmax_loss(model(tx), tlabels, tweights).item())
        torch_state = model.unet_state()
    finally:
        _restore(defaults)

    our_opt = unet_cuda.SGD(net.parameters(), lr=CHECK_LR, momentum=MOMENTUM)
    x = Tensor(cupy.asarray(data["x"]))
    labels, weights = cupy.asarray(data["labels"]), cupy.asarray(data["weights"])
    with cu.use_precision("fp32"):
        loss = F.softmax_cross_entropy(net(x), labels, weights)
        our_opt.zero_grad()
        loss.backward()
        our_opt.step()
        ours_before = float(loss.data)
        with no_grad():
            ours_after = float(F.softmax_cross_entropy(net(x), labels, weights).data)
    ours_state = net.state_dict()

    update_errors = {
        name: float(np.linalg.norm(ours_state[name] - torch_state[name])
                    / max(float(np.linalg.norm(torch_state[name] - state[name])), 1e-30))
        for name in ours_state
    }
    worst = max(update_errors, key=update_errors.get)
    rel_before = _relative(ours_before, torch_before)
    rel_after = _relative(ours_after, torch_after)
    passed = rel_before <= LOSS_RTOL and rel_after <= LOSS_RTOL and update_errors[worst] <= UPDATE_RTOL
    benchlib.record(None, {
        "id": "check/loss_vs_torch_fp32", "kind": "check", "passed": passed, "precision": "fp32",
        "version": cu.precision_version("fp32"),
        "lr": CHECK_LR, "momentum": MOMENTUM, "loss_rtol": LOSS_RTOL, "update_rtol": UPDATE_RTOL,
        "ours_loss_before": ours_before, "torch_loss_before": torch_before, "rel_err_before": rel_before,
        "ours_loss_after": ours_after, "torch_loss_after": torch_after, "rel_err_after": rel_after,
        "worst_param": worst, "worst_update_rel_l2": update_errors[worst],
    })
    print(f"loss before: ours {ours_before:.7g} torch {torch_before:.7g} (rel {rel_before:.2e}); "
          f"after one step: ours {ours_after:.7g} torch {torch_after:.7g} (rel {rel_after:.2e}); "
          f"worst update {worst}: rel L2 {update_errors[worst]:.2e}")
    assert rel_before <= LOSS_RTOL, f"loss before the step: ours {ours_before} vs torch {torch_before}"
    assert rel_after <= LOSS_RTOL, f"loss after one step: ours {ours_after} vs torch {torch_after}"
    assert update_errors[worst] <= UPDATE_RTOL, f"the update of {worst} differs: rel L2 {update_errors[worst]:.2e}"


# ------------------------------------------------------------------------------------------------
# Training step
# ------------------------------------------------------------------------------------------------


def _our_training_setup(data, initial_state):
    """The paper's network with the initial weights on the GPU, its optimiser, one batch there."""
    net = unet_cuda.UNet(seed=0)
    net.load_state_dict(initial_state)
    net.to("cuda").train()
    opt = unet_cuda.SGD(net.parameters(), lr=LR, momentum=MOMENTUM)
    batch = (cupy.asarray(data["x"]), cupy.asarray(data["labels"]), cupy.asarray(data["weights"]))
    return net, opt, batch


def _step_record(rec_id: str, impl: str, precision: str, name: str, timing, env, loss_after: float) -> dict:
    return {
        "id": rec_id, "kind": "train_step", "impl": impl, "precision": precision,
        "version": cu.precision_version(precision), "name": name, "shape": STEP_SHAPE, "flops": STEP_FLOPS,
        "torch_setting": benchlib.TORCH_SETTINGS[precision],
        **timing.as_dict(),
        **benchlib.figures(timing.median_ms, flops=STEP_FLOPS, ceilings=env["ceilings"], precision=precision),
        "loss_finite": bool(np.isfinite(loss_after)),
    }


def _eager_step(net, opt, xa, labels, weights):
    """One training step of ours, eagerly: forward, loss, backward, update; returns the 0-d loss."""
    x = Tensor(xa)

    def step():
        opt.zero_grad()
        loss = F.softmax_cross_entropy(net(x), labels, weights)
        loss.backward()
        opt.step()
        return loss.data

    return step


def _graphed_step(net, opt, x, labels, weights):
    """The same step as a CUDA graph (captured at its second call); returns the graph and the step."""
    graphed = GraphedTrainStep(net, opt, x.shape, labels.shape, weights.shape)
    return graphed, lambda: graphed(x, labels, weights, lr=LR)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_train_step_ours(benchmark, env, data, initial_state, precision):
    benchlib.skip_if_out_of_time(pytest, 20)
    net, opt, batch = _our_training_setup(data, initial_state)
    step = _eager_step(net, opt, *batch)
    with cu.use_precision(precision):
        timing = benchlib.time_gpu(step, env["ours"], warmup=2, budget_ms=1500, min_repeats=5,
                                   max_repeats=20, flush=False)
        loss_after = float(step())
        benchlib.wall_benchmark(benchmark, step, env["ours"], timing.median_ms, budget_ms=1000, max_rounds=5)
    benchlib.record(benchmark, _step_record(f"train_step/ours/{precision}", "ours", precision,
                                            f"unet_cuda train step ({precision})", timing, env, loss_after))
    assert np.isfinite(loss_after), f"our {precision} training step gave a non-finite loss {loss_after}"


@pytest.mark.parametrize("precision", PRECISIONS)
def test_train_step_graphed(benchmark, env, data, initial_state, precision):
    """The same step replayed as a CUDA graph; the graph keeps the kernel version it captured, so
    each precision captures its own."""
    if _GRAPH_SKIP:
        pytest.skip(_GRAPH_SKIP)
    benchlib.skip_if_out_of_time(pytest, 20)
    net, opt, batch = _our_training_setup(data, initial_state)
    with cu.use_precision(precision):
        graphed, step = _graphed_step(net, opt, *batch)
        # warm-up 3: the eager first step, the capture (and its first replay), one more replay
        timing = benchlib.time_gpu(step, env["ours"], warmup=3, budget_ms=1500, min_repeats=5,
                                   max_repeats=30, flush=False)
        loss_after = float(step())
        benchlib.wall_benchmark(benchmark, step, env["ours"], timing.median_ms, budget_ms=1000, max_rounds=5)
    assert graphed.captured, "the graphed step never captured its graph"
    rec = _step_record(f"train_step/ours_graph/{precision}", "ours_graph", precision,
                       f"unet_cuda train step, CUDA graph ({precision})", timing, env, loss_after)
    rec["graph_steps"] = graphed.steps
    benchlib.record(benchmark, rec)
    assert np.isfinite(loss_after), f"our graphed {precision} step gave a non-finite loss {loss_after}"


# The backward's fusions (unet_cuda/functional.py) switched, in the tf32 step, beside the default
# (the skip maps' sums in the pools' backward; the ReLU's backward on its own): neither fusion, and
# both (the ReLU's backward in its consumers' kernels too). (fused_relu_backward, fused_accumulation)
FUSIONS = {"unfused": (False, False), "relu_fused": (True, True)}


@pytest.mark.parametrize("variant", list(FUSIONS))
def test_train_step_fusions(benchmark, env, data, initial_state, variant):
    """impl "ours_unfused" / "ours_relu_fused": what each fusion buys, measured in one run."""
    benchlib.skip_if_out_of_time(pytest, 20)
    relu, accumulate = FUSIONS[variant]
    net, opt, batch = _our_training_setup(data, initial_state)
    default_step = _eager_step(net, opt, *batch)

    def step():
        with F.fused_relu_backward(relu), F.fused_accumulation(accumulate):
            return default_step()

    with cu.use_precision("tf32"):
        timing = benchlib.time_gpu(step, env["ours"], warmup=2, budget_ms=1500, min_repeats=5,
                                   max_repeats=20, flush=False)
        loss_after = float(step())
        benchlib.wall_benchmark(benchmark, step, env["ours"], timing.median_ms, budget_ms=1000, max_rounds=5)
    impl = f"ours_{variant}"
    rec = _step_record(f"train_step/{impl}/tf32", impl, "tf32",
                       f"unet_cuda train step, tf32, backward {variant.replace('_', ' ')}", timing, env,
                       loss_after)
    benchlib.record(benchmark, rec)
    assert np.isfinite(loss_after), f"the {variant} step gave a non-finite loss {loss_after}"


@pytest.mark.parametrize("setting", TORCH_SETTINGS)
def test_train_step_torch(benchmark, env, data, initial_state, setting):
    benchlib.skip_if_out_of_time(pytest, 20)
    defaults = env["tf32_defaults"]
    _torch_mode(setting, defaults)
    try:
        model = _torch_model(initial_state, setting).train()
        opt = CaffeSGD(model.parameters(), lr=LR, momentum=MOMENTUM)
        x, labels, weights = _torch_inputs(data, setting)

        def step():
            opt.zero_grad()
            with _autocast(setting):
                logits = model(x)
            loss = weighted_softmax_loss(logits, labels, weights)
            loss.backward()
            opt.step()
            return loss

        timing = benchlib.time_gpu(step, env["peer"], warmup=3, budget_ms=1000, min_repeats=10,
                                   max_repeats=30, flush=False)
        loss_after = float(step().item())
        benchlib.wall_benchmark(benchmark, step, env["peer"], timing.median_ms, budget_ms=500, max_rounds=5)
    finally:
        _restore(defaults)
    precision = setting  # the path the convolutions take
    benchlib.record(benchmark, {
        "id": f"train_step/torch/{setting}", "kind": "train_step", "impl": "torch", "precision": precision,
        "name": f"{benchlib.TORCH_SETTINGS[setting]}: train step", "torch_setting": benchlib.TORCH_SETTINGS[setting],
        "shape": STEP_SHAPE, "flops": STEP_FLOPS,
        **timing.as_dict(),
        **benchlib.figures(timing.median_ms, flops=STEP_FLOPS, ceilings=env["ceilings"], precision=precision),
        "channels_last": setting == "bf16", "autocast": "bf16" if setting == "bf16" else None,
        "cudnn_allow_tf32": setting != "fp32" and defaults["cudnn_allow_tf32"],
        "loss_finite": bool(np.isfinite(loss_after)),
        "torch": torch.__version__, "cudnn": torch.backends.cudnn.version(),
    })


# ------------------------------------------------------------------------------------------------
# Inference: a 512x512 image by overlap-tile
# ------------------------------------------------------------------------------------------------


def _time_wall(benchmark, fn, rounds: int = 5) -> list[float]:
    """Wall times (ms) of ``fn()`` measured by pytest-benchmark's own rounds (one warm-up)."""
    times: list[float] = []

    def target():
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)

    benchmark.pedantic(target, rounds=rounds, iterations=1, warmup_rounds=1)
    return times[1:] if len(times) > rounds else times


def _tiles(image_size: int) -> int:
    out = INFER_NET.layers[-1].out_hw
    return len(tiling.tile_grid(image_size, image_size, out))


def _infer_record(rec_id: str, impl: str, precision: str, name: str, times: list[float]) -> dict:
    tiles = _tiles(IMAGE)
    return {
        "id": rec_id, "kind": "infer", "impl": impl, "precision": precision, "name": name,
        "tiles": tiles, "batch_size": INFER_BATCH,
        "shape": f"image[{IMAGE},{IMAGE}] -> probs[2,{IMAGE},{IMAGE}], {tiles} tile(s) of {INFER_TILE}",
        "ms": float(np.median(times)), "ms_min": min(times), "ms_max": max(times), "repeats": len(times),
        "flops": INFER_NET.forward_flops() * tiles, "timing": "wall clock, host-side tiling and copies included",
    }


@pytest.mark.parametrize("precision", PRECISIONS)
def test_infer_512_ours(benchmark, env, data, initial_state, precision):
    benchlib.skip_if_out_of_time(pytest, 15)
    from unet_cuda.inference import predict_image  # noqa: PLC0415

    net = unet_cuda.UNet(seed=0)
    net.load_state_dict(initial_state)
    net.to("cuda").eval()

    def predict():
        return predict_image(net, data["image"], tile=INFER_TILE, batch_size=INFER_BATCH)

    with cu.use_precision(precision):
        probs = predict()
        assert probs.shape == (2, IMAGE, IMAGE) and np.isfinite(probs).all()
        times = _time_wall(benchmark, predict)
    rec = _infer_record(f"infer_512/ours/{precision}", "ours", precision,
                        f"unet_cuda 512x512 overlap-tile prediction ({precision})", times)
    rec.update(version=cu.precision_version(precision), how="unet_cuda.inference.predict_image")
    benchlib.record(benchmark, rec)


@pytest.mark.parametrize("setting", TORCH_SETTINGS)
def test_infer_512_torch(benchmark, env, data, initial_state, setting):
    benchlib.skip_if_out_of_time(pytest, 15)
    defaults = env["tf32_defaults"]
    _torch_mode(setting, defaults)
    try:
        model = _torch_model(initial_state, setting).eval()

        def predict_fn(batch):
            x = torch.from_numpy(np.ascontiguousarray(batch)).cuda()
            if setting == "bf16":
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.no_grad(), _autocast(setting):
                logits = model(x)
            return torch.softmax(logits.float(), dim=1).cpu().numpy()

        def predict():
            return tiling.overlap_tile_predict(data["image"], predict_fn, tile=INFER_TILE, depth=NET.depth,
                                               batch_size=INFER_BATCH)

        probs = predict()
        assert probs.shape == (2, IMAGE, IMAGE) and np.isfinite(probs).all()
        times = _time_wall(benchmark, predict)
    finally:
        _restore(defaults)
    rec = _infer_record(f"infer_512/torch/{setting}", "torch", setting,
                        f"{benchlib.TORCH_SETTINGS[setting]}: 512x512 overlap-tile prediction", times)
    rec["torch_setting"] = benchlib.TORCH_SETTINGS[setting]
    benchlib.record(benchmark, rec)


# The named kernels, each in place of its mode's version: (version, impl, precision), from
# collect_results.KERNEL_STEPS (whose summary reads them back). On Hopper the tf32 mode runs v6
# itself (it measured faster than v4 there); its step keeps its own name.
KERNEL_STEPS = [(version, f"ours_{key}", precision)
                for key, (version, precision) in collect_results.KERNEL_STEPS.items()]


# The experiments last, after the headline figures above, which the stage's time budget must reach
# first: the kernels' steps, then the measured plans.
@pytest.mark.parametrize("mode", ["eager", "graph"])
@pytest.mark.parametrize("kernel", KERNEL_STEPS, ids=lambda k: k[0])
def test_train_step_kernel(benchmark, env, data, initial_state, kernel, mode):
    """impl "ours_wgmma", "ours_halo", "ours_halo_bf16", "ours_halo_fp32" (eager) and "..._graph":
    the tf32 step with v6_tf32_wgmma or v7_tf32_halo, the bf16 step with v8_bf16_halo, the fp32 step
    with v9_fp32_halo (v7-v9 copy each input window of the forward and backward data once for the
    nine taps), where they can run (v6-v8: a Hopper GPU, an sm_90a build)."""
    version, impl, precision = kernel
    if not cu.conv3x3_version_available(version):
        pytest.skip(f"{version} cannot run on this GPU or build (it needs sm_90a)")
    if mode == "graph" and _GRAPH_SKIP:
        pytest.skip(_GRAPH_SKIP)
    benchlib.skip_if_out_of_time(pytest, 20)
    net, opt, batch = _our_training_setup(data, initial_state)
    with cu.use_conv3x3_version(version):
        step = _graphed_step(net, opt, *batch)[1] if mode == "graph" else _eager_step(net, opt, *batch)
        timing = benchlib.time_gpu(step, env["ours"], warmup=3, budget_ms=1500, min_repeats=5,
                                   max_repeats=30, flush=False)
        loss_after = float(step())
        benchlib.wall_benchmark(benchmark, step, env["ours"], timing.median_ms, budget_ms=1000, max_rounds=5)
    impl = impl if mode == "eager" else f"{impl}_graph"
    rec = _step_record(f"train_step/{impl}/{precision}", impl, precision,
                       f"unet_cuda train step, {precision} with {version} ({mode})", timing, env, loss_after)
    rec["version"] = version
    benchlib.record(benchmark, rec)
    assert np.isfinite(loss_after), f"the {version} step ({mode}) gave a non-finite loss {loss_after}"
@pytest.mark.parametrize("precision", PRECISIONS)
def test_train_step_autotuned(benchmark, env, data, initial_state, precision):
    """impl "ours_autotuned": the step with every GEMM's plan (tile, K split) measured on this GPU
    at its first call (unet_cuda.ops.cuda.autotuning) instead of ruled. The record keeps the table:
    per GEMM, the plan kept and the rule's, with both times."""
    benchlib.skip_if_out_of_time(pytest, 30)
    net, opt, batch = _our_training_setup(data, initial_state)
    step = _eager_step(net, opt, *batch)
    cu.clear_tuned_plans()
    try:
        with cu.use_precision(precision), cu.autotuning():
            started = time.perf_counter()
            step()  # the first step times the plans
            cupy.cuda.get_current_stream().synchronize()
            tuning_s = time.perf_counter() - started
            timing = benchlib.time_gpu(step, env["ours"], warmup=2, budget_ms=1500, min_repeats=5,
                                       max_repeats=20, flush=False)
            loss_after = float(step())
            benchlib.wall_benchmark(benchmark, step, env["ours"], timing.median_ms, budget_ms=1000, max_rounds=5)
        plans = cu.tuned_plans()
    finally:
        cu.clear_tuned_plans()
    rec = _step_record(f"train_step/ours_autotuned/{precision}", "ours_autotuned", precision,
                       f"unet_cuda train step, GEMM plans measured ({precision})", timing, env, loss_after)
    rec["first_step_s"] = tuning_s
    rec["plans"] = plans
    benchlib.record(benchmark, rec)
    assert plans, "autotuning entered no plan"
    assert np.isfinite(loss_after), f"the autotuned {precision} step gave a non-finite loss {loss_after}"
