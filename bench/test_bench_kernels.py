"""Per-op benchmarks: every op of a training step at every layer of the paper's 572 tile, batch 1,
ours against the same work through PyTorch/cuDNN, in the same process on the same card.

Each test times our op and its peer with CUDA events (benchlib.time_gpu: warm-up, L2 flushed
before every repeat, median), turns the time into TFLOP/s or GB/s and a percentage of the card's
ceiling, and records everything in ``benchmark.extra_info`` (see bench/README.md for the fields).
pytest-benchmark's own statistics are the synchronised wall time of one call of ours.

Precision: the 3x3 convolution and the 2x2 up-convolution (the same GEMM kernels) run, at every
layer, the kernel version of each precision mode (``unet_cuda.ops.cuda.precision_version``: fp32
v3_igemm, tf32 v4_tf32_mma or on Hopper v6_tf32_wgmma, bf16 v5_bf16_mma), and each is measured
against the ceiling of what it computes in (FP32 CUDA cores, TF32 or bf16 tensor cores). Every
other op computes in FP32 in every mode. The peer of a convolution (3x3, 2x2 up, 1x1)
runs in three settings, each timed once per op and layer and shared by the versions: cuDNN in true
FP32 (``allow_tf32 = False``), in TF32 (PyTorch's default) and in bf16 (bf16 tensors, channels_last).
``peer_ms`` and ``ratio = peer_ms / ms`` are against the peer of the record's own precision
(``peer_precision``); ``peer_<p>_ms`` and ``ratio_<p>`` hold every setting timed. Memory-bound
ops have their FP32 peer only.

``test_conv3x3_version`` times every kernel version (v1_direct ... v5_bf16_mma) at four
representative layers (``op_cases.CONV3X3_VERSION_LAYERS``) as records of kind ``op_version``: the
progression of docs/CONV3X3.md. It runs first (it is short), and its peer is the one of the
version's precision, from the same shared timings.

    python3 -m pytest bench/test_bench_kernels.py --benchmark-json=benchmarks.json -q
"""

from __future__ import annotations

import gc

import pytest

import benchlib
import op_cases

pytestmark = pytest.mark.gpu

_SKIP = benchlib.cuda_skip_reason() or benchlib.torch_skip_reason()
if _SKIP:
    pytest.skip(f"GPU benchmarks skipped: {_SKIP}", allow_module_level=True)
pytest.importorskip("pytest_benchmark", reason="pytest-benchmark is not installed")

import cupy  # noqa: E402
import torch  # noqa: E402

from unet_cuda import ops  # noqa: E402
from unet_cuda.ops import cuda as cu  # noqa: E402

NET = benchlib.network()
# The conv3x3 version of each precision mode on this GPU, in the order of cu.PRECISIONS.
MODE_VERSIONS = tuple(cu.precision_version(p) for p in cu.PRECISIONS)
CASES = op_cases.with_conv3x3_versions(op_cases.op_cases(NET), MODE_VERSIONS)
VERSION_CASES = op_cases.conv3x3_version_cases(NET, cu.CONV3X3_VERSIONS)

# Time budgets per measurement (ms of GPU time; UNET_BENCH_SCALE scales them).
OURS_BUDGET_MS = 60.0
PEER_BUDGET_MS = 30.0
VERSION_BUDGET_MS = 40.0   # 60 version cases: about 20 s in all

# Peer medians (ms) by (op, layer, precision): each setting is timed once per op and layer, and the
# versions of the op at that layer share it.
_PEER_MS: dict[tuple[str, str, str], float] = {}


def _precision(version: str | None) -> str:
    """What an op computes in: its conv3x3 version's precision, FP32 for every other op."""
    return benchlib.conv3x3_precision(version, cu.CONV3X3_VERSION_PRECISION) if version else "fp32"


@pytest.fixture(scope="module")
def bench_env():
    defaults = {"cudnn_allow_tf32": bool(torch.backends.cudnn.allow_tf32),
                "matmul_allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32)}
    benchmark_flag = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    env = {
        "ours": benchlib.CupyDevice(),
        "peer": benchlib.TorchDevice(),
        "ceilings": benchlib.ceilings_for(benchlib.gpu_name()),
        "tf32_defaults": defaults,
    }
    yield env
    torch.backends.cudnn.benchmark = benchmark_flag
    _set_tf32(defaults["cudnn_allow_tf32"], defaults["matmul_allow_tf32"])


def _set_tf32(cudnn_flag: bool, matmul_flag: bool) -> None:
    torch.backends.cudnn.allow_tf32 = cudnn_flag
    torch.backends.cuda.matmul.allow_tf32 = matmul_flag


def _peer_ms(case, inputs: dict, env: dict, precision: str) -> float:
    """The peer's median time of ``case`` in ``precision`` (timed at the first request)."""
    key = (case.op, case.layer, precision)
    if key not in _PEER_MS:
        peer_fn = op_cases.peer(case, inputs, torch, precision)
        defaults = env["tf32_defaults"]
        try:
            if precision == "fp32":
                _set_tf32(False, False)       # the like-for-like peer of FP32: true FP32
            elif precision == "tf32":
                _set_tf32(True, True)         # cuDNN as it runs by default: TF32 tensor cores
            # bf16: bf16 tensors, the flags do not apply to them
            _PEER_MS[key] = benchlib.time_gpu(peer_fn, env["peer"], budget_ms=PEER_BUDGET_MS).median_ms
        finally:
            _set_tf32(defaults["cudnn_allow_tf32"], defaults["matmul_allow_tf32"])
        del peer_fn
    return _PEER_MS[key]


def _peer_figures(prefix: str, ms: float, case, ceilings, precision: str) -> dict:
    work = benchlib.figures(ms, flops=case.flops, nbytes=case.nbytes, ceilings=ceilings,
                            precision=precision)
    out = {f"{prefix}ms": ms}
    for key in ("tflops", "gbps", "pct_of_ceiling"):
        if key in work:
            out[f"{prefix}{key}"] = work[key]
    return out


def _peers(case, inputs: dict, env: dict, ours_ms: float, precision: str, settings) -> dict:
    """The peer fields of a record: each setting in ``settings`` and the one of ``precision``."""
    ceilings = env["ceilings"]
    out: dict = {}
    for setting in settings:
        ms = _peer_ms(case, inputs, env, setting)
        out.update(_peer_figures(f"peer_{setting}_", ms, case, ceilings, setting))
        out[f"ratio_{setting}"] = ms / ours_ms
    matched = precision if precision in settings else "fp32"
    if matched in settings:
        out.update(_peer_figures("peer_", out[f"peer_{matched}_ms"], case, ceilings, matched))
        out["peer_precision"] = matched
        out["peer"] = op_cases.peer_description(case, matched)
        out["ratio"] = out[f"ratio_{matched}"]
    return out


@pytest.mark.parametrize("case", VERSION_CASES, ids=[c.id for c in VERSION_CASES])
def test_conv3x3_version(benchmark, bench_env, case):
    """One 3x3 convolution op at one layer with one kernel version, against the peer of its
    precision (v6 only where it can run: a Hopper GPU and a build with sm_90a code)."""
    benchlib.skip_if_out_of_time(pytest)
    if not cu.conv3x3_version_available(case.version):
        pytest.skip(f"{case.version} cannot run on this GPU or build (it needs sm_90a)")
    ceilings = bench_env["ceilings"]
    benchmark.group = f"{case.op} versions"
    inputs = op_cases.make_inputs(case, cupy, ops)
    ours_fn = op_cases.ours(case, inputs, ops)
    precision = _precision(case.version)
    with cu.use_conv3x3_version(case.version):
        timing = benchlib.time_gpu(ours_fn, bench_env["ours"], budget_ms=VERSION_BUDGET_MS)
        benchlib.wall_benchmark(benchmark, ours_fn, bench_env["ours"], timing.median_ms)
    rec = {
        "id": f"op_version/{case.op}/{case.layer}/{case.version}",
        "kind": "op_version",
        "op": case.op,
        "layer": case.layer,
        "version": case.version,
        "shape": case.shape,
        "precision": precision,
        "flops": case.flops,
        **timing.as_dict(),
        **benchlib.figures(timing.median_ms, flops=case.flops, ceilings=ceilings, precision=precision),
        "ceilings_card": ceilings.card,
    }
    rec.update(_peers(case, inputs, bench_env, timing.median_ms, precision, (precision,)))
    benchlib.record(benchmark, rec)
    del inputs, ours_fn
    gc.collect()


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_op(benchmark, bench_env, case):
    benchlib.skip_if_out_of_time(pytest)
    ceilings = bench_env["ceilings"]
    benchmark.group = case.op
    inputs = op_cases.make_inputs(case, cupy, ops)
    ours_fn = op_cases.ours(case, inputs, ops)
    version = case.version          # set for the 3x3 convolutions, one case per precision mode
    precision = _precision(version)
    if version is not None:
        with cu.use_conv3x3_version(version):
            timing = benchlib.time_gpu(ours_fn, bench_env["ours"], budget_ms=OURS_BUDGET_MS)
            benchlib.wall_benchmark(benchmark, ours_fn, bench_env["ours"], timing.median_ms)
    else:
        timing = benchlib.time_gpu(ours_fn, bench_env["ours"], budget_ms=OURS_BUDGET_MS)
        benchlib.wall_benchmark(benchmark, ours_fn, bench_env["ours"], timing.median_ms)
    rec = {
        "id": f"op/{case.op}/{case.layer}" + (f"/{version}" if version else ""),
        "kind": "op",
        "op": case.op,
        "layer": case.layer,
        "shape": case.shape,
        "precision": precision,
        "version": version,
        "flops": case.flops,
        "bytes": case.nbytes,
        "in_step": case.in_step,   # False: crop + concat, which the fused decoder convolution replaces
        "peer_in_step": case.peer_in_step,  # True: fused in our step, on its own in PyTorch's
        **timing.as_dict(),
        **benchlib.figures(timing.median_ms, flops=case.flops, nbytes=case.nbytes,
                           ceilings=ceilings, precision=precision),
        "tf32_defaults": bench_env["tf32_defaults"],
        "ceilings_card": ceilings.card,
    }
    settings = op_cases.PEER_PRECISIONS if case.compute_bound else ("fp32",)
    rec.update(_peers(case, inputs, bench_env, timing.median_ms, precision, settings))
    benchlib.record(benchmark, rec)
    del inputs, ours_fn
    gc.collect()
