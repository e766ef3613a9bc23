"""What every benchmark of unet-cuda shares: the layer table of the paper's 572 tile, the FLOP and
byte counts, the ceilings of the card, CUDA-event timing, and the record each benchmark leaves.

Nothing here imports CuPy or PyTorch at module level, so the tables and the arithmetic are tested on
machines without a GPU (tests/test_gpu_check_tools.py).

Timing (docs PERFORMANCE.md, "How to time"): a few untimed calls first (they also let cuDNN's
autotuner and CuPy's kernel cache settle), one timed call to size the run, then ``repeats`` calls,
each preceded by a write of a 256 MiB buffer that evicts the 50 MB L2, each bracketed by two CUDA
events. Nothing synchronises inside that loop: the host queues the flush, the events and the op
while the GPU works, so the GPU time between the two events is the op's own, not the host's launch
overhead. The median of the repeats is the figure reported.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the package from this checkout when it is not installed
    sys.path.append(str(ROOT))

# ------------------------------------------------------------------------------------------------
# Ceilings (PERFORMANCE.md): dense peak of each path, HBM bandwidth
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ceilings:
    card: str
    fp32_tflops: float
    tf32_tflops: float
    bf16_tflops: float
    hbm_tbps: float
    assumed: bool = False       # True when the card is not one whose figures are known here
    note: str = ""

    def compute(self, precision: str) -> float:
        """Peak TFLOP/s of ``precision`` ("fp32", "tf32" or "bf16")."""
        return {"fp32": self.fp32_tflops, "tf32": self.tf32_tflops, "bf16": self.bf16_tflops}[precision]


H100_SXM = Ceilings("H100 SXM", 66.9, 494.7, 989.4, 3.35)
H200 = Ceilings("H200", 66.9, 494.7, 989.4, 4.8)


def ceilings_for(gpu_name: str | None) -> Ceilings:
    """The ceilings of the card named ``gpu_name`` (as nvidia-smi or CUDA report it)."""
    name = (gpu_name or "").upper()
    if "H200" in name:
        return H200
    if "H100" in name:
        if "PCIE" in name or "NVL" in name:
            return Ceilings(**{**asdict(H100_SXM), "assumed": True,
                               "note": f"{gpu_name}: H100 SXM figures used; this card's are lower"})
        return H100_SXM
    return Ceilings(**{**asdict(H100_SXM), "assumed": True,
                       "note": f"{gpu_name or 'unknown card'}: no figures known, H100 SXM figures used"})


# ------------------------------------------------------------------------------------------------
# The layers of the paper's network for one tile (PERFORMANCE.md table)
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layer:
    """One convolution of the network: ``x[1, cin, in_hw, in_hw] -> y[1, cout, out_hw, out_hw]``."""

    name: str        # d1a ... b2, up1 ... up4, u1a ... u4b, out (PERFORMANCE.md)
    kind: str        # "conv3x3", "upconv2x2" or "conv1x1"
    cin: int
    cout: int
    in_hw: int
    out_hw: int
    batch: int = 1

    @property
    def flops(self) -> float:
        """Forward FLOPs, 2 per multiply-add (PERFORMANCE.md); each backward op costs the same."""
        taps = {"conv3x3": 9, "upconv2x2": 1, "conv1x1": 1}[self.kind]
        return 2.0 * self.batch * self.out_hw ** 2 * self.cin * self.cout * taps

    @property
    def first(self) -> bool:
        """The input layer: its data gradient is never needed."""
        return self.name == "d1a"


@dataclass(frozen=True)
class Pool:
    name: str        # pool1 ... pool4, after d1b ... d4b
    channels: int
    in_hw: int
    batch: int = 1


@dataclass(frozen=True)
class Concat:
    name: str        # cat1 ... cat4, after up1 ... up4
    up_channels: int
    hw: int
    skip_channels: int
    skip_hw: int
    batch: int = 1


@dataclass(frozen=True)
class Network:
    tile: int
    depth: int
    in_channels: int
    base_channels: int
    num_classes: int
    layers: tuple[Layer, ...]
    pools: tuple[Pool, ...]
    concats: tuple[Concat, ...]
    dropout_layers: tuple[str, ...] = field(default=())   # layers whose output dropout follows

    def layer(self, name: str) -> Layer:
        return next(layer for layer in self.layers if layer.name == name)

    def forward_flops(self) -> float:
        return sum(layer.flops for layer in self.layers)

    def train_step_flops(self) -> float:
        """Forward + data gradient (not of the input layer) + weight gradient."""
        return sum(layer.flops * (2 if layer.first else 3) for layer in self.layers)


def network(tile: int = 572, depth: int = 5, in_channels: int = 1, base_channels: int = 64,
            num_classes: int = 2, batch: int = 1) -> Network:
    """The layer table of a U-Net, sizes from ``unet_cuda.sizes.plan`` (572/depth 5 is the paper's).

    Contracting levels are d1 ... d<depth-1>, the bottom level is b; expanding levels are numbered
    from the bottom up (up1/u1 is the deepest), as in PERFORMANCE.md.
    """
    from unet_cuda.sizes import plan  # noqa: PLC0415 - keeps this module importable on its own

    p = plan(tile, depth)
    ch = [base_channels * 2 ** level for level in range(depth)]
    layers, pools, concats = [], [], []
    size, cin = tile, in_channels
    for level in range(depth):
        prefix = f"d{level + 1}" if level < depth - 1 else "b"
        names = (f"{prefix}a", f"{prefix}b") if level < depth - 1 else ("b1", "b2")
        layers.append(Layer(names[0], "conv3x3", cin, ch[level], size, size - 2, batch))
        layers.append(Layer(names[1], "conv3x3", ch[level], ch[level], size - 2, size - 4, batch))
        size, cin = size - 4, ch[level]
        if level < depth - 1:
            pools.append(Pool(f"pool{level + 1}", ch[level], size, batch))
            size //= 2
    for k, level in enumerate(reversed(range(depth - 1)), start=1):
        up = 2 * size
        layers.append(Layer(f"up{k}", "upconv2x2", ch[level + 1], ch[level], size, up, batch))
        concats.append(Concat(f"cat{k}", ch[level], up, ch[level], p.skip_sizes[level], batch))
        layers.append(Layer(f"u{k}a", "conv3x3", 2 * ch[level], ch[level], up, up - 2, batch))
        layers.append(Layer(f"u{k}b", "conv3x3", ch[level], ch[level], up - 2, up - 4, batch))
        size = up - 4
    layers.append(Layer("out", "conv1x1", ch[0], num_classes, size, size, batch))
    if size != p.output_size:
        raise AssertionError(f"layer table ends at {size} px but sizes.plan says {p.output_size}")
    dropout_levels = [level for level in (depth - 2, depth - 1) if level >= 0]
    dropout_layers = tuple(("b2" if level == depth - 1 else f"d{level + 1}b") for level in dropout_levels)
    return Network(tile, depth, in_channels, base_channels, num_classes, tuple(layers), tuple(pools),
                   tuple(concats), dropout_layers)


# ------------------------------------------------------------------------------------------------
# Work of one op: FLOPs or bytes, and the figures derived from a time
# ------------------------------------------------------------------------------------------------


def figures(ms: float | None, *, flops: float | None = None, nbytes: float | None = None,
            ceilings: Ceilings, precision: str = "fp32") -> dict:
    """TFLOP/s or GB/s achieved in ``ms``, and the percentage of the matching ceiling."""
    out: dict = {}
    if ms is None or not ms > 0:
        return out
    if flops:
        tflops = flops / (ms * 1e-3) / 1e12
        out["tflops"] = tflops
        out["pct_of_ceiling"] = 100.0 * tflops / ceilings.compute(precision)
        out["ceiling"] = f"{precision} {ceilings.compute(precision)} TFLOP/s"
    elif nbytes:
        gbps = nbytes / (ms * 1e-3) / 1e9
        out["gbps"] = gbps
        out["pct_of_ceiling"] = 100.0 * gbps / (ceilings.hbm_tbps * 1e3)
        out["ceiling"] = f"HBM {ceilings.hbm_tbps} TB/s"
    return out


# ------------------------------------------------------------------------------------------------
# Precision modes (unet_cuda.ops.cuda.PRECISIONS) and the PyTorch setting each one is compared with
# ------------------------------------------------------------------------------------------------

PRECISIONS = ("fp32", "tf32", "bf16")
# PERFORMANCE.md, "Peers": our fp32 mode against PyTorch with TF32 off, our tf32 mode against
# PyTorch's default (cuDNN convolutions in TF32), our bf16 mode against bf16 autocast + channels_last.
TORCH_SETTINGS = {
    "fp32": "PyTorch, TF32 off (true FP32)",
    "tf32": "PyTorch default (TF32 convolutions)",
    "bf16": "PyTorch bf16 autocast + channels_last",
}


def conv3x3_precision(version: str | None, version_precision: dict) -> str:
    """What the 3x3 convolution kernel ``version`` computes in, from ``version_precision``
    (``unet_cuda.ops.cuda.CONV3X3_VERSION_PRECISION``: v1-v3 fp32, v4 and v6 tf32, v5 bf16); "fp32"
    for a version it does not list."""
    return version_precision.get(version, "fp32")


def shape_str(name: str, shape) -> str:
    return f"{name}[{','.join(str(int(s)) for s in shape)}]"


# ------------------------------------------------------------------------------------------------
# CUDA-event timing, the same for CuPy (our kernels) and PyTorch (the peer)
# ------------------------------------------------------------------------------------------------

FLUSH_BYTES = 256 << 20   # > 5x the H100's 50 MB L2


class CupyDevice:
    """Events, synchronisation and an L2 flush on CuPy's current stream."""

    name = "cupy"

    def __init__(self, flush_bytes: int = FLUSH_BYTES):
        import cupy  # noqa: PLC0415

        self.cupy = cupy
        self._flush = cupy.empty(flush_bytes // 4, dtype=cupy.float32) if flush_bytes else None

    def event(self):
        return self.cupy.cuda.Event()

    def record(self, event) -> None:
        event.record()

    def elapsed_ms(self, start, end) -> float:
        return float(self.cupy.cuda.get_elapsed_time(start, end))

    def synchronize(self) -> None:
        self.cupy.cuda.Device().synchronize()

    def flush(self) -> None:
        if self._flush is not None:
            self._flush.fill(0)


class TorchDevice:
    """Events, synchronisation and an L2 flush on PyTorch's current stream."""

    name = "torch"

    def __init__(self, flush_bytes: int = FLUSH_BYTES):
        import torch  # noqa: PLC0415

        self.torch = torch
        self._flush = torch.empty(flush_bytes // 4, dtype=torch.float32, device="cuda") if flush_bytes else None

    def event(self):
        return self.torch.cuda.Event(enable_timing=True)

    def record(self, event) -> None:
        event.record()

    def elapsed_ms(self, start, end) -> float:
        return float(start.elapsed_time(end))

    def synchronize(self) -> None:
        self.torch.cuda.synchronize()

    def flush(self) -> None:
        if self._flush is not None:
            self._flush.zero_()


@dataclass
class Timing:
    median_ms: float
    min_ms: float
    max_ms: float
    repeats: int
    samples_ms: list[float]

    def as_dict(self, prefix: str = "") -> dict:
        return {f"{prefix}ms": self.median_ms, f"{prefix}ms_min": self.min_ms,
                f"{prefix}ms_max": self.max_ms, f"{prefix}repeats": self.repeats}


def budget_scale() -> float:
    """``UNET_BENCH_SCALE`` (default 1) multiplies every time budget: 0.3 for a quick look."""
    try:
        return max(0.05, float(os.environ.get("UNET_BENCH_SCALE", "1")))
    except ValueError:
        return 1.0


def repeats_for(estimate_ms: float, budget_ms: float, min_repeats: int, max_repeats: int) -> int:
    """As many repeats as fit ``budget_ms`` at ``estimate_ms`` each, within [min, max]."""
    if not estimate_ms > 0:
        return max_repeats
    return int(min(max_repeats, max(min_repeats, math.ceil(budget_ms / estimate_ms))))


def time_gpu(fn: Callable[[], object], device, *, warmup: int = 3, budget_ms: float = 120.0,
             min_repeats: int = 5, max_repeats: int = 50, flush: bool = True) -> Timing:
    """Median GPU time of ``fn()`` over repeats sized to ``budget_ms`` (module docstring)."""
    budget_ms *= budget_scale()
    for _ in range(max(1, warmup)):
        fn()
    device.synchronize()
    start, end = device.event(), device.event()
    if flush:
        device.flush()
    device.record(start)
    fn()
    device.record(end)
    device.synchronize()
    estimate = device.elapsed_ms(start, end)
    repeats = repeats_for(estimate, budget_ms, min_repeats, max_repeats)
    events = [(device.event(), device.event()) for _ in range(repeats)]
    for start, end in events:
        if flush:
            device.flush()
        device.record(start)
        fn()
        device.record(end)
    device.synchronize()
    samples = [device.elapsed_ms(s, e) for s, e in events]
    return Timing(statistics.median(samples), min(samples), max(samples), repeats, samples)


def wall_benchmark(benchmark, fn: Callable[[], object], device, estimate_ms: float,
                   budget_ms: float = 60.0, max_rounds: int = 10) -> None:
    """Let pytest-benchmark time ``fn`` by the wall clock, synchronised after every call.

    This is the figure in pytest-benchmark's own statistics (``stats`` in its JSON): the time the
    caller waits for one op, launch overhead and synchronisation included. The GPU time is the
    event-timed median in ``extra_info["ms"]``.
    """
    rounds = repeats_for(estimate_ms, budget_ms * budget_scale(), 2, max_rounds)

    def setup():
        device.flush()
        device.synchronize()

    def target():
        fn()
        device.synchronize()

    benchmark.pedantic(target, setup=setup, rounds=rounds, iterations=1, warmup_rounds=0)


# ------------------------------------------------------------------------------------------------
# Records: what each benchmark leaves behind
# ------------------------------------------------------------------------------------------------

RECORD_ENV = "UNET_BENCH_RECORD"      # a JSON-lines file every record is appended to, when set
DEADLINE_ENV = "UNET_BENCH_DEADLINE"  # Unix time after which the remaining benchmarks skip


def record(benchmark, rec: dict) -> dict:
    """Put ``rec`` into the benchmark's ``extra_info`` and append it to ``$UNET_BENCH_RECORD``.

    The JSON-lines copy survives a run that is stopped before pytest-benchmark writes its JSON.
    """
    rec = {k: v for k, v in rec.items() if v is not None}
    if benchmark is not None:
        benchmark.extra_info.update(rec)
    path = os.environ.get(RECORD_ENV)
    if path:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(rec, sort_keys=True) + "\n")
    return rec


def seconds_left() -> float | None:
    """Seconds until ``$UNET_BENCH_DEADLINE`` (None when unset)."""
    value = os.environ.get(DEADLINE_ENV)
    if not value:
        return None
    try:
        return float(value) - time.time()
    except ValueError:
        return None


def skip_if_out_of_time(pytest, needed_s: float = 5.0) -> None:
    left = seconds_left()
    if left is not None and left < needed_s:
        pytest.skip(f"the benchmark stage's time budget is spent ({left:.0f} s left, "
                    f"{needed_s:.0f} s needed)")


# ------------------------------------------------------------------------------------------------
# Why a GPU benchmark cannot run here
# ------------------------------------------------------------------------------------------------


def cuda_skip_reason() -> str | None:
    """None when our CUDA backend runs here, else why not (CuPy, device, extension, backend)."""
    try:
        from unet_cuda import ops  # noqa: PLC0415
    except Exception as exc:  # noqa: BLE001 - any import failure is a reason to skip
        return f"unet_cuda does not import ({exc.__class__.__name__}: {exc})"
    why = ops.cuda_status()
    if why is not None:
        return why
    try:
        import unet_cuda.ops.cuda  # noqa: F401, PLC0415
    except Exception as exc:  # noqa: BLE001
        return f"the CUDA backend unet_cuda.ops.cuda does not import ({exc.__class__.__name__}: {exc})"
    return None


def torch_skip_reason() -> str | None:
    """None when PyTorch with CUDA runs here, else why not."""
    try:
        import torch  # noqa: PLC0415
    except Exception as exc:  # noqa: BLE001
        return f"PyTorch (the peer) is not installed ({exc.__class__.__name__}: {exc})"
    if not torch.cuda.is_available():
        return "PyTorch sees no CUDA device"
    return None


def gpu_name() -> str:
    """The current device's name as CUDA reports it (needs CuPy and a device)."""
    import cupy  # noqa: PLC0415

    props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
    name = props["name"]
    return name.decode() if isinstance(name, bytes) else str(name)


def environment() -> dict:
    """Versions and settings that bear on the figures; every entry is optional."""
    import platform  # noqa: PLC0415

    env: dict = {"python": platform.python_version()}
    try:
        import numpy  # noqa: PLC0415

        env["numpy"] = numpy.__version__
    except Exception:  # noqa: BLE001
        pass
    try:
        import cupy  # noqa: PLC0415

        env["cupy"] = cupy.__version__
        env["cuda_runtime"] = cupy.cuda.runtime.runtimeGetVersion()
        env["cuda_driver"] = cupy.cuda.runtime.driverGetVersion()
        props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
        env["gpu"] = gpu_name()
        env["sm_count"] = int(props["multiProcessorCount"])
        env["compute_capability"] = f"{props['major']}.{props['minor']}"
        env["l2_bytes"] = int(props.get("l2CacheSize", 0))
    except Exception as exc:  # noqa: BLE001
        env["cupy_error"] = f"{exc.__class__.__name__}: {exc}"
    try:
        import torch  # noqa: PLC0415

        env["torch"] = torch.__version__
        env["torch_cuda"] = torch.version.cuda
        env["cudnn"] = torch.backends.cudnn.version()
        env["cudnn_allow_tf32_default"] = bool(torch.backends.cudnn.allow_tf32)
        env["matmul_allow_tf32_default"] = bool(torch.backends.cuda.matmul.allow_tf32)
    except Exception as exc:  # noqa: BLE001
        env["torch_error"] = f"{exc.__class__.__name__}: {exc}"
    try:
        from unet_cuda import ops  # noqa: PLC0415

        env["unet_cuda_status"] = ops.cuda_status() or "ok"
    except Exception as exc:  # noqa: BLE001
        env["unet_cuda_status"] = f"{exc.__class__.__name__}: {exc}"
    return env


if __name__ == "__main__":
    # python3 bench/benchlib.py [FILE]: the environment as JSON, to FILE or to stdout
    text = json.dumps(environment(), indent=2, sort_keys=True)
    if len(sys.argv) > 1:
        Path(sys.argv[1]).write_text(text + "\n", encoding="utf-8")
    print(text)
