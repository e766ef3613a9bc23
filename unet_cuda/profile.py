"""Where the time of one training step goes, op by op: ``python -m unet_cuda.profile``.

A training step of the U-Net is a few hundred op calls (docs/OPS.md): every convolution forward,
its data gradient and its weight gradient, the pools, the up-convolutions, the loss, one update
per parameter tensor. This module runs whole training steps (forward, loss, backward, SGD update)
with every op function of ``unet_cuda.ops`` wrapped in a timer, and prints one row per op and
argument shapes (which names the layer): calls per step, time per step, share of the step, and
TFLOP/s for the convolutions.

Two clocks:

* **host ms**: the wall time Python spends in the call: argument checks, allocation, the launch.
  On the CPU backend this is the op's whole cost.
* **GPU ms** (CUDA backend): the time between two CUDA events recorded on the current stream just
  before and just after the call. Kernels run asynchronously, so this is the op's time on the
  device, plus any gap in which the device waited for the host to launch the next kernel of the op.

The last lines compare the step's wall time with the sum of the ops' GPU times: when Python cannot
launch kernels as fast as the device runs them, the difference is time the GPU sat idle (the reason
for ``train --cuda-graph``). The step is the eager one of ``unet_cuda.train`` (no CUDA graph:
inside a graph there are no op calls left to time).

    python -m unet_cuda.profile                          # the paper's network on a GPU, else a small one
    python -m unet_cuda.profile --precision bf16 --top 15
    python -m unet_cuda.profile --kernel v7_tf32_halo        # one 3x3 kernel version by name
    python -m unet_cuda.profile --device cpu --json profile.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from . import functional as F
from . import ops, sizes
from .cli import fail, restores_precision
from .plans import format_plans
from .model import UNet
from .optim import SGD

__all__ = ["OpRow", "Profile", "profile_steps", "op_flops", "main"]


# ------------------------------------------------------------------------------------------------
# FLOPs of the convolutions, from the shapes of their arguments
# ------------------------------------------------------------------------------------------------

def _shape(a) -> tuple:
    return tuple(int(s) for s in getattr(a, "shape", ()))


# Per family: multiply-adds per output pixel and input channel, and the output size of a forward.
_CONV_FAMILIES = {
    "conv3x3": (9, lambda h, w: (h - 2) * (w - 2)),
    "conv1x1": (1, lambda h, w: h * w),
    "upconv2x2": (1, lambda h, w: 4 * h * w),  # each output pixel sees one tap per input channel
}


def op_flops(name: str, args: tuple) -> int:
    """FLOPs (2 x multiply-adds) of one call of a convolution op; 0 for the other ops.

    Each direction of a convolution costs the same, ``2 N O C taps P Q`` with ``P x Q`` the output
    size: the forward, the data gradient and the weight gradient.
    """
    family = next((f for f in _CONV_FAMILIES if name.startswith(f)), None)
    if family is None:
        return 0
    taps, out_pixels = _CONV_FAMILIES[family]
    concat = name.startswith("conv3x3_concat")
    if name.endswith("_forward"):
        x, w = args[0], args[2] if concat else args[1]         # (up, skip, w, ...) or (x, w, ...)
        n, _, h, wd = _shape(x)
        o, c = _shape(w)[:2]
        return 2 * n * o * c * taps * out_pixels(h, wd)
    if name.endswith("_backward_data"):
        n, o, p, q = _shape(args[0])                             # (dy, w, ...)
        return 2 * n * o * _shape(args[1])[1] * taps * p * q
    if name.endswith("_backward_weight"):
        n, o, p, q = _shape(args[-1])                            # (x, dy) or (up, skip, dy)
        c = _shape(args[0])[1] + (_shape(args[1])[1] if concat else 0)
        return 2 * n * o * c * taps * p * q
    return 0


# ------------------------------------------------------------------------------------------------
# Recording the op calls
# ------------------------------------------------------------------------------------------------

@dataclass
class OpRow:
    """The calls of one op with one set of argument shapes, per training step."""

    op: str
    shapes: str
    calls: float = 0.0        # per step
    host_ms: float = 0.0      # per step
    gpu_ms: float | None = None
    flops: float = 0.0        # per step

    @property
    def tflops(self) -> float | None:
        ms = self.gpu_ms if self.gpu_ms is not None else self.host_ms
        return self.flops / (ms * 1e9) if self.flops and ms > 0 else None


@dataclass
class Profile:
    """Per-step figures of a run of ``steps`` measured training steps."""

    device: str
    precision: str
    network: dict
    steps: int
    step_ms: float                       # wall time of a step, synchronised (median)
    rows: list[OpRow] = field(default_factory=list)

    @property
    def host_ms(self) -> float:
        return sum(r.host_ms for r in self.rows)

    @property
    def gpu_ms(self) -> float | None:
        if self.device != "cuda":
            return None
        return sum(r.gpu_ms or 0.0 for r in self.rows)

    def to_json(self) -> dict:
        return {"device": self.device, "precision": self.precision, "network": self.network,
                "steps": self.steps, "step_ms": self.step_ms, "host_ms": self.host_ms,
                "gpu_ms": self.gpu_ms,
                "rows": [dict(asdict(r), tflops=r.tflops) for r in self.rows]}


class _Recorder:
    """Wraps every op of ``unet_cuda.ops``; records host time and, on the GPU, a pair of events."""

    def __init__(self, cupy=None):
        self.cupy = cupy
        self.calls: list[tuple[str, str, float, object, object, int]] = []

    def wrap(self, name: str, fn):
        def timed(*args, **kwargs):
            cupy = self.cupy
            start = end = None
            if cupy is not None:
                start = cupy.cuda.Event()
                start.record()
            t0 = time.perf_counter()
            result = fn(*args, **kwargs)
            host = time.perf_counter() - t0
            if cupy is not None:
                end = cupy.cuda.Event()
                end.record()
            shapes = " ".join("x".join(map(str, _shape(a))) or "()" for a in args if hasattr(a, "shape"))
            # array keywords (a relu_mask, accumulate_into) by name: a masked call is its own row
            shapes += "".join(f" {key}={'x'.join(map(str, _shape(v)))}" for key, v in kwargs.items()
                              if hasattr(v, "shape"))
            self.calls.append((name, shapes, host, start, end, op_flops(name, args)))
            return result

        timed.__name__ = name
        return timed

    @contextlib.contextmanager
    def installed(self):
        originals = {name: getattr(ops, name) for name in ops.OP_NAMES}
        for name, fn in originals.items():
            setattr(ops, name, self.wrap(name, fn))
        try:
            yield self
        finally:
            for name, fn in originals.items():
                setattr(ops, name, fn)


def _synchronize(cupy) -> None:
    if cupy is not None:
        cupy.cuda.get_current_stream().synchronize()


def profile_steps(model: UNet, optimizer: SGD, x, labels, weights, steps: int = 3,
                  warmup: int = 1) -> Profile:
    """Runs ``warmup`` untimed and ``steps`` timed eager training steps on the one batch given
    (arrays on the model's device) and returns the per-step figures."""
    if steps < 1 or warmup < 0:
        raise ValueError(f"profile_steps: need steps >= 1 and warmup >= 0, got {steps} and {warmup}")
    cupy = None
    if model.device == "cuda":
        import cupy  # noqa: PLC0415 - only where the CUDA backend runs

    def one_step():
        loss = F.softmax_cross_entropy(model(x), labels, weights)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return loss

    model.train()
    for _ in range(warmup):  # first launches load kernels and fill the memory pool
        float(one_step().data)
    recorder = _Recorder(cupy)
    walls = []
    with recorder.installed():
        for _ in range(steps):
            _synchronize(cupy)
            t0 = time.perf_counter()
            loss = one_step()
            _synchronize(cupy)
            walls.append((time.perf_counter() - t0) * 1e3)
            if not math.isfinite(float(loss.data)):
                raise FloatingPointError("profile_steps: the loss became non-finite; the profile would "
                                         "time a diverged network")
    rows: dict[tuple[str, str], OpRow] = {}
    for name, shapes, host, start, end, flops in recorder.calls:
        row = rows.setdefault((name, shapes), OpRow(name, shapes, gpu_ms=0.0 if cupy else None))
        row.calls += 1 / steps
        row.host_ms += host * 1e3 / steps
        row.flops += flops / steps
        if cupy is not None:
            row.gpu_ms += cupy.cuda.get_elapsed_time(start, end) / steps
    network = dict(model.config, input=list(_shape(x)))
    precision = _current_precision(model.device)
    return Profile(model.device, precision, network, steps, float(np.median(walls)),
                   sorted(rows.values(), key=lambda r: -(r.gpu_ms if r.gpu_ms is not None else r.host_ms)))


def _current_precision(device: str) -> str:
    if device != "cuda":
        return "fp32"
    from .ops import cuda  # noqa: PLC0415

    return f"{cuda.get_precision()} ({cuda.get_conv3x3_version()})"


# ------------------------------------------------------------------------------------------------
# The report
# ------------------------------------------------------------------------------------------------

def format_profile(profile: Profile, top: int | None = None) -> str:
    """The table: one row per op and shapes, the largest first; then the step's totals."""
    gpu = profile.device == "cuda"
    key = "GPU ms" if gpu else "ms"
    total = profile.gpu_ms if gpu else profile.host_ms
    lines = [f"one training step: {profile.network} on {profile.device}, {profile.precision}; "
             f"median of {profile.steps} steps",
             f"{'op':<32} {'shapes':<44} {'calls':>5} {key:>9} {'share':>6} {'host ms':>8} {'TFLOP/s':>8}"]
    rows = profile.rows if top is None else profile.rows[:top]
    for r in rows:
        ms = r.gpu_ms if gpu else r.host_ms
        share = 100.0 * ms / total if total else 0.0
        tf = f"{r.tflops:8.2f}" if r.tflops is not None else f"{'':>8}"
        shapes = r.shapes if len(r.shapes) <= 44 else r.shapes[:41] + "..."
        lines.append(f"{r.op:<32} {shapes:<44} {r.calls:5.0f} {ms:9.3f} {share:5.1f}% {r.host_ms:8.3f} {tf}")
    if top is not None and len(profile.rows) > top:
        rest = profile.rows[top:]
        rest_ms = sum((r.gpu_ms if gpu else r.host_ms) or 0.0 for r in rest)
        lines.append(f"{'... ' + str(len(rest)) + ' more':<32} {'':<44} {sum(r.calls for r in rest):5.0f} "
                     f"{rest_ms:9.3f} {100.0 * rest_ms / total if total else 0.0:5.1f}%")
    lines.append(f"step wall time {profile.step_ms:.3f} ms; host time in the ops {profile.host_ms:.3f} ms")
    if gpu:
        idle = max(profile.step_ms - profile.gpu_ms, 0.0)
        lines.append(f"GPU time of the ops {profile.gpu_ms:.3f} ms: the GPU waited on the host for about "
                     f"{idle:.3f} ms of the step ({100.0 * idle / profile.step_ms:.0f}%)")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# The command line
# ------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m unet_cuda.profile",
        description="Time one training step of the U-Net op by op (forward, backward and update of "
                    "every layer), on random data.",
        epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cuda", "cpu"), default=None,
                   help="default: cuda when it can run here, else cpu")
    p.add_argument("--base-channels", type=int, default=None, metavar="N",
                   help="default: 64 on a GPU (the paper's network), 8 on the CPU")
    p.add_argument("--depth", type=int, default=None, metavar="N", help="default: 5 on a GPU, 4 on the CPU")
    p.add_argument("--tile", type=int, default=None, metavar="N", help="input tile; default: 572 on a GPU, 188 on the CPU")
    p.add_argument("--batch-size", type=int, default=1, metavar="N")
    p.add_argument("--precision", choices=ops.PRECISIONS, default=None,
                   help="the 3x3 convolutions' precision on the GPU (default tf32); the CPU computes in fp32")
    p.add_argument("--kernel", metavar="VERSION", default=None,
                   help="GPU only: the 3x3 convolutions' kernel version by name (unet_cuda.ops.cuda."
                        "CONV3X3_VERSIONS, e.g. v7_tf32_halo) in place of the precision's; the precision "
                        "is the kernel's (a different --precision is refused)")
    p.add_argument("--steps", type=int, default=3, metavar="N", help="timed steps after one warm-up step (3)")
    p.add_argument("--top", type=int, default=25, metavar="N", help="rows to print (25; 0 for all)")
    p.add_argument("--json", metavar="PATH", default=None, help="also write every row as JSON")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--autotune", action="store_true",
                   help="GPU only: the warm-up step times every GEMM plan (tile, K split) of each "
                        "convolution and keeps the fastest, as train --autotune does; the timed steps "
                        "run those, and --json gets the table of plans")
    return p


def _set_kernel(name: str, precision: str | None, gpu: bool) -> str | None:
    """Runs the 3x3 convolutions with kernel version ``name``; what is wrong with the request, or
    None."""
    if not gpu:
        return "the kernel versions are the CUDA backend's; on the CPU the convolutions are NumPy's"
    from .ops import cuda  # noqa: PLC0415 (CuPy: only on the GPU)

    if name not in cuda.CONV3X3_VERSIONS:
        return f"not a kernel version; one of {', '.join(cuda.CONV3X3_VERSIONS)}"
    own = cuda.CONV3X3_VERSION_PRECISION[name]
    if precision is not None and precision != own:
        return f"computes in {own}, not in --precision {precision}"
    if not cuda.conv3x3_version_available(name):
        return "cannot run on this GPU or build (v6, v7 and v8 need a Hopper GPU and an sm_90a build)"
    cuda.set_conv3x3_version(name)
    return None


def _main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    try:
        device = ops.choose_device(args.device)
    except ops.CudaUnavailableError as exc:
        return fail(str(exc))
    gpu = device == "cuda"
    base = args.base_channels if args.base_channels is not None else (64 if gpu else 8)
    depth = args.depth if args.depth is not None else (5 if gpu else 4)
    tile = args.tile if args.tile is not None else (572 if gpu else 188)
    for name, value in (("--base-channels", base), ("--depth", depth), ("--batch-size", args.batch_size),
                        ("--steps", args.steps)):
        if value < 1:
            return fail(f"{name} must be >= 1, got {value}")
    if depth > 8 or base > 256:
        return fail(f"--depth {depth} / --base-channels {base}: this tool profiles networks up to depth 8 "
                    "and 256 base channels")
    try:
        ops.set_precision(args.precision or ops.default_precision(device), device)
        out = sizes.output_size(tile, depth)
    except ValueError as exc:  # IllegalSizeError is one
        return fail(f"--tile: {exc}" if isinstance(exc, sizes.IllegalSizeError) else f"--precision: {exc}")
    if args.kernel is not None:
        problem = _set_kernel(args.kernel, args.precision, gpu)
        if problem:
            return fail(f"--kernel {args.kernel}: {problem}")
    try:
        ops.set_autotune(args.autotune, device)
    except ValueError as exc:
        return fail(f"--autotune: {exc}")
    rng = np.random.default_rng(args.seed)
    n = args.batch_size
    x = rng.random((n, 1, tile, tile), dtype=np.float32)
    labels = rng.integers(0, 2, (n, out, out)).astype(np.int32)
    weights = rng.uniform(0.5, 2.0, (n, out, out)).astype(np.float32)
    try:
        model = UNet(base_channels=base, depth=depth, seed=args.seed, device=device)
        optimizer = SGD(model.parameters(), lr=1e-4, momentum=0.99)
        arrays = [ops.to_device(a, device) for a in (x, labels, weights)]
        profile = profile_steps(model, optimizer, *arrays, steps=args.steps)
    except Exception as exc:
        if ops.is_out_of_memory(exc) or isinstance(exc, MemoryError):
            return fail(f"out of memory with --tile {tile} and --batch-size {n} ({exc}); try a smaller "
                        "--tile or --base-channels", code=4)
        raise
    print(format_profile(profile, top=args.top or None))
    if args.autotune:
        print(format_plans(ops.tuned_plans()))
    if args.json:
        data = profile.to_json()
        if args.autotune:
            data["plans"] = ops.tuned_plans()
        try:
            Path(args.json).write_text(json.dumps(data, indent=1))
        except OSError as exc:
            return fail(f"--json {args.json}: cannot write it ({exc.strerror or exc})")
    return 0


main = restores_precision(_main)


if __name__ == "__main__":
    sys.exit(main())
