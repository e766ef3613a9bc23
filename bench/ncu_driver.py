"""Runs a few representative GEMM ops once each between ``cudaProfilerStart`` and ``cudaProfilerStop``:
the program Nsight Compute profiles in the ``ncu`` stage of bench/gpu_check.sh.

    ncu --profile-from-start off --section SpeedOfLight ... python3 bench/ncu_driver.py CASES.json

The cases: the three directions of the 3x3 convolution at three layers of the 572 tile that span
the network's shapes (d1b: 568² x 64 channels, d3b: 136² x 256, b2: 28² x 1024; batch 1), and of
the first up-convolution (up1), each with the kernel version of every precision mode on this GPU
(``unet_cuda.ops.cuda.precision_version``), plus v4_tf32_mma where tf32 runs another version. Every
case is run once before profiling starts (the v6 probe, shared-memory attributes and CuPy's
allocations happen there), then once inside the profiled range, in the order written to
CASES.json: each case launches exactly one GEMM kernel (its name holds ``conv3x3_v``), which is
how bench/collect_results.py matches ncu's kernels to the cases. The kernels a case launches after
its GEMM (split-K epilogue or reduction, the bias gradient) belong to that case.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# (layer, input size, Cin, Cout) of the 3x3 convolutions profiled, and of the up-convolution.
CONV_LAYERS = (("d1b", 570, 64, 64), ("d3b", 138, 256, 256), ("b2", 30, 1024, 1024))
UPCONV_LAYERS = (("up1", 28, 1024, 512),)
DIRECTIONS = ("forward", "backward_data", "backward_weight")


# The modes in the order profiled: the default (tf32) first, so that a run cut by its time limit
# still holds the kernels of the training step people run.
PROFILE_ORDER = ("tf32", "bf16", "fp32")


def profiled_versions(cu) -> list[tuple[str, str]]:
    """(precision, version) pairs: each mode's version here, the default mode first, and v4 where
    tf32 runs another one."""
    order = [p for p in PROFILE_ORDER if p in cu.PRECISIONS]
    order += [p for p in cu.PRECISIONS if p not in PROFILE_ORDER]
    pairs = [(p, cu.precision_version(p)) for p in order]
    if cu.precision_version("tf32") != "v4_tf32_mma":
        pairs.append(("tf32", "v4_tf32_mma"))
    return pairs


def build_cases(cu, cupy) -> list[dict]:
    rng = np.random.default_rng(0)

    def normal(*shape, std=1.0):
        return cupy.asarray((rng.standard_normal(shape) * std).astype(np.float32))

    cases = []
    for precision, version in profiled_versions(cu):
        for layer, size, cin, cout in CONV_LAYERS:
            x = normal(1, cin, size, size)
            w = normal(cout, cin, 3, 3, std=1.0 / math.sqrt(9 * cin))
            b = normal(cout)
            dy = normal(1, cout, size - 2, size - 2)
            calls = {"forward": lambda x=x, w=w, b=b: cu.conv3x3_forward(x, w, b, relu=True),
                     "backward_data": lambda dy=dy, w=w: cu.conv3x3_backward_data(dy, w),
                     "backward_weight": lambda x=x, dy=dy: cu.conv3x3_backward_weight(x, dy)}
            for direction in DIRECTIONS:
                cases.append({"op": f"conv3x3_{direction}", "layer": layer, "precision": precision,
                              "version": version, "call": calls[direction]})
        for layer, size, cin, cout in UPCONV_LAYERS:
            x = normal(1, cin, size, size)
            w = normal(cout, cin, 2, 2, std=1.0 / math.sqrt(cin))
            b = normal(cout)
            dy = normal(1, cout, 2 * size, 2 * size)
            calls = {"forward": lambda x=x, w=w, b=b: cu.upconv2x2_forward(x, w, b),
                     "backward_data": lambda dy=dy, w=w: cu.upconv2x2_backward_data(dy, w),
                     "backward_weight": lambda x=x, dy=dy: cu.upconv2x2_backward_weight(x, dy)}
            for direction in DIRECTIONS:
                cases.append({"op": f"upconv2x2_{direction}", "layer": layer, "precision": precision,
                              "version": version, "call": calls[direction]})
    return cases


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cases_json", help="where to write the list of cases, in launch order")
    args = parser.parse_args(argv)

    from unet_cuda import ops  # noqa: PLC0415

    why = ops.cuda_status()
    if why is not None:
        print(f"ncu_driver: cannot run on the GPU: {why}", file=sys.stderr)
        return 2
    import cupy  # noqa: PLC0415

    from unet_cuda.ops import cuda as cu  # noqa: PLC0415

    cases = build_cases(cu, cupy)
    for case in cases:  # outside the profiled range: first-use work happens here
        with cu.use_conv3x3_version(case["version"]):
            case["call"]()
    cupy.cuda.Device().synchronize()
    # The list first: where ncu's time limit stops the run, the kernels it did profile still match
    # the first cases (bench/collect_results.py), and the rest are left with none.
    listed = [{k: v for k, v in case.items() if k != "call"} for case in cases]
    Path(args.cases_json).write_text(json.dumps(listed, indent=1))
    cupy.cuda.runtime.profilerStart()
    for case in cases:
        with cu.use_conv3x3_version(case["version"]):
            case["call"]()
        cupy.cuda.Device().synchronize()
    cupy.cuda.runtime.profilerStop()
    print(f"ncu_driver: {len(cases)} cases profiled")
    return 0


if __name__ == "__main__":
    sys.exit(main())
