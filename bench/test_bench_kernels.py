"""Per-op benchmarks: every op of a training step at every layer of the paper's 572 tile, batch 1,
ours against the same work through PyTorch/cuDNN, in the same process on the same card.

Each test times our op and its peer with CUDA events (benchlib.time_gpu: warm-up, L2 flushed
before every repeat, median), turns the time into TFLOP/s or GB/s and a percentage of the card's
ceiling, and records everything in ``benchmark.extra_info`` (see bench/README.md for the fields).
Our kernels compute in FP32 on CUDA cores, so the ratio ``peer_ms / ms`` is taken against cuDNN in
true FP32 (``allow_tf32 = False``); cuDNN's default TF32 is timed too and reported beside it.
pytest-benchmark's own statistics are the synchronised wall time of one call of ours.

The 3x3 convolution runs the backend's kernel version (``UNET_CUDA_CONV3X3``, default v1_direct) at
every layer; ``test_conv3x3_version`` also times every version at four representative layers
(``op_cases.CONV3X3_VERSION_LAYERS``), without the peer, as records of kind ``op_version``. A TF32
version (v4_tf32_mma) is measured against the TF32 ceiling.

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
CASES = op_cases.op_cases(NET)
VERSION_CASES = op_cases.conv3x3_version_cases(NET, cu.CONV3X3_VERSIONS)

# Time budgets per measurement (ms of GPU time; UNET_BENCH_SCALE scales them).
OURS_BUDGET_MS = 100.0
PEER_BUDGET_MS = 50.0
VERSION_BUDGET_MS = 50.0   # 48 version cases: about 20 s in all


def _conv3x3_precision(version: str | None) -> str:
    return "tf32" if version == "v4_tf32_mma" else "fp32"


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


def _peer_figures(prefix: str, ms: float, case, ceilings, precision: str) -> dict:
    work = benchlib.figures(ms, flops=case.flops, nbytes=case.nbytes, ceilings=ceilings,
                            precision=precision)
    out = {f"{prefix}ms": ms}
    for key in ("tflops", "gbps", "pct_of_ceiling"):
        if key in work:
            out[f"{prefix}{key}"] = work[key]
    return out


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_op(benchmark, bench_env, case):
    benchlib.skip_if_out_of_time(pytest)
    ceilings = bench_env["ceilings"]
    benchmark.group = case.op
    inputs = op_cases.make_inputs(case, cupy, ops)
    ours_fn = op_cases.ours(case, inputs, ops)
    timing = benchlib.time_gpu(ours_fn, bench_env["ours"], budget_ms=OURS_BUDGET_MS)
    version = cu.get_conv3x3_version() if case.op.startswith("conv3x3_") else None
    precision = _conv3x3_precision(version)
    rec = {
        "id": f"op/{case.op}/{case.layer}",
        "kind": "op",
        "op": case.op,
        "layer": case.layer,
        "shape": case.shape,
        "precision": precision,
        "version": version,
        "flops": case.flops,
        "bytes": case.nbytes,
        **timing.as_dict(),
        **benchlib.figures(timing.median_ms, flops=case.flops, nbytes=case.nbytes,
                           ceilings=ceilings, precision=precision),
        "peer": op_cases.peer_description(case),
        "tf32_defaults": bench_env["tf32_defaults"],
        "ceilings_card": ceilings.card,
    }

    peer_fn = op_cases.peer(case, inputs, torch)
    try:
        # The like-for-like peer: true FP32.
        _set_tf32(False, False)
        peer = benchlib.time_gpu(peer_fn, bench_env["peer"], budget_ms=PEER_BUDGET_MS)
        rec.update(_peer_figures("peer_", peer.median_ms, case, ceilings, "fp32"))
        rec["peer_precision"] = "fp32"
        rec["ratio"] = peer.median_ms / timing.median_ms
        if case.compute_bound:
            # cuDNN as it runs by default: TF32 tensor cores.
            _set_tf32(True, True)
            peer_tf32 = benchlib.time_gpu(peer_fn, bench_env["peer"], budget_ms=PEER_BUDGET_MS)
            rec.update(_peer_figures("peer_tf32_", peer_tf32.median_ms, case, ceilings, "tf32"))
            rec["ratio_tf32"] = peer_tf32.median_ms / timing.median_ms
    finally:
        defaults = bench_env["tf32_defaults"]
        _set_tf32(defaults["cudnn_allow_tf32"], defaults["matmul_allow_tf32"])

    benchlib.wall_benchmark(benchmark, ours_fn, bench_env["ours"], timing.median_ms)
    benchlib.record(benchmark, rec)
    del inputs, ours_fn, peer_fn
    gc.collect()


@pytest.mark.parametrize("case", VERSION_CASES, ids=[c.id for c in VERSION_CASES])
def test_conv3x3_version(benchmark, bench_env, case):
    """One 3x3 convolution op at one layer with one kernel version (the peer: test_op's record of
    the same op and layer)."""
    benchlib.skip_if_out_of_time(pytest)
    ceilings = bench_env["ceilings"]
    benchmark.group = f"{case.op} versions"
    inputs = op_cases.make_inputs(case, cupy, ops)
    ours_fn = op_cases.ours(case, inputs, ops)
    precision = _conv3x3_precision(case.version)
    with cu.use_conv3x3_version(case.version):
        timing = benchlib.time_gpu(ours_fn, bench_env["ours"], budget_ms=VERSION_BUDGET_MS)
        benchlib.wall_benchmark(benchmark, ours_fn, bench_env["ours"], timing.median_ms)
    benchlib.record(benchmark, {
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
    })
    del inputs, ours_fn
    gc.collect()
