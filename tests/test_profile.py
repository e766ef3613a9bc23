"""``python -m unet_cuda.profile``: one training step timed op by op (here on the CPU backend; the
GPU's event timing runs in the GPU check)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from unet_cuda import UNet, ops
from unet_cuda.optim import SGD
from unet_cuda.profile import format_profile, op_flops, profile_steps

ROOT = Path(__file__).resolve().parents[1]


def run(*args, cwd):
    return subprocess.run([sys.executable, "-m", "unet_cuda.profile", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(ROOT), "OPENBLAS_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})


def test_flops_of_each_convolution_direction():
    z = lambda *s: np.zeros(s, np.float32)  # noqa: E731
    # d1b of the paper's network: 2 x 64 x 64 x 9 x 568^2 = 23.8 GFLOP, in every direction
    d1b = 2 * 64 * 64 * 9 * 568 * 568
    assert op_flops("conv3x3_forward", (z(1, 64, 570, 570), z(64, 64, 3, 3), z(64))) == d1b
    assert op_flops("conv3x3_backward_data", (z(1, 64, 568, 568), z(64, 64, 3, 3))) == d1b
    assert op_flops("conv3x3_backward_weight", (z(1, 64, 570, 570), z(1, 64, 568, 568))) == d1b
    # the concatenated input counts both parts' channels
    up, skip = z(1, 3, 8, 8), z(1, 5, 12, 12)
    concat = 2 * 4 * 8 * 9 * 6 * 6
    assert op_flops("conv3x3_concat_forward", (up, skip, z(4, 8, 3, 3), z(4))) == concat
    assert op_flops("conv3x3_concat_backward_data", (z(1, 4, 6, 6), z(4, 8, 3, 3), (1, 5, 12, 12))) == concat
    assert op_flops("conv3x3_concat_backward_weight", (up, skip, z(1, 4, 6, 6))) == concat
    # up-convolution: each of the 4HW output pixels sees one tap per input channel
    assert op_flops("upconv2x2_forward", (z(2, 6, 5, 7), z(3, 6, 2, 2), z(3))) == 2 * 2 * 3 * 6 * 4 * 35
    assert op_flops("conv1x1_forward", (z(1, 64, 388, 388), z(2, 64, 1, 1), z(2))) == 2 * 2 * 64 * 388 * 388
    assert op_flops("maxpool2x2_forward", (z(1, 2, 4, 4),)) == 0


def test_profile_steps_counts_every_op_of_a_step():
    depth, base, tile = 3, 4, 92
    model = UNet(base_channels=base, depth=depth, seed=0, device="cpu")
    optimizer = SGD(model.parameters(), lr=1e-4)
    out = model.output_size(tile)
    rng = np.random.default_rng(0)
    batch = (rng.random((1, 1, tile, tile), dtype=np.float32), rng.integers(0, 2, (1, out, out)).astype(np.int32),
             np.ones((1, out, out), np.float32))
    profile = profile_steps(model, optimizer, *batch, steps=2)
    calls = {}
    for row in profile.rows:
        calls[row.op] = calls.get(row.op, 0) + row.calls
    assert calls["conv3x3_forward"] == 2 * depth + (depth - 1)          # the other decoder conv reads the concat
    assert calls["conv3x3_concat_forward"] == depth - 1
    assert calls["maxpool2x2_forward"] == calls["upconv2x2_forward"] == depth - 1
    assert calls["sgd_momentum_update_multi_"] == 1 and "sgd_momentum_update_" not in calls
    assert calls["softmax_xent_forward"] == calls["softmax_xent_backward"] == 1
    # dropout as one op per direction, the mask hashed where it is applied
    assert calls["dropout_seeded_forward"] == calls["dropout_seeded_backward"] == 2
    assert not {"dropout_mask", "dropout_forward", "dropout_backward"} & set(calls)
    assert profile.device == "cpu" and profile.gpu_ms is None and profile.steps == 2
    assert 0 < profile.host_ms <= profile.step_ms * 1.05
    text = format_profile(profile, top=5)
    assert "conv3x3" in text and "more" in text and "step wall time" in text


def test_command_line_on_the_cpu(tmp_path):
    result = run("--device", "cpu", "--base-channels", "4", "--depth", "3", "--tile", "92", "--steps", "1",
                 "--top", "0", "--json", "p.json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "one training step" in result.stdout and "conv3x3_backward_weight" in result.stdout
    data = json.loads((tmp_path / "p.json").read_text())
    assert data["device"] == "cpu" and data["precision"] == "fp32" and data["network"]["depth"] == 3
    ops_seen = {row["op"] for row in data["rows"]}
    # the concatenation is fused into its convolution and the skip maps' sums into the pools'
    # backward; the ReLU's backward runs on its own by default (one per 3x3 convolution)
    assert {"conv3x3_forward", "conv3x3_concat_backward_data", "upconv2x2_backward_weight", "accumulate_",
            "relu_backward", "crop_concat_forward"} - ops_seen == {"crop_concat_forward", "accumulate_"}
    assert sum(row["calls"] for row in data["rows"] if row["op"] == "relu_backward") == 2 * (2 * 3 - 1)
    assert not any("relu_mask=" in row["shapes"] for row in data["rows"])
    assert any("accumulate_into=" in row["shapes"] for row in data["rows"] if row["op"] == "maxpool2x2_backward")
    assert all(row["tflops"] is None or row["tflops"] > 0 for row in data["rows"])


@pytest.mark.parametrize("args,message", [
    (["--device", "cpu", "--precision", "bf16"], "--precision: precision bf16 runs on the GPU's tensor cores"),
    (["--device", "cpu", "--tile", "35", "--depth", "2"], "--tile: input size 35 is illegal"),
    (["--device", "cpu", "--steps", "0"], "--steps must be >= 1, got 0"),
    (["--device", "cpu", "--kernel", "v7_tf32_halo"],
     "--kernel v7_tf32_halo: the kernel versions are the CUDA backend's; on the CPU the convolutions are NumPy's"),
    (["--device", "cpu", "--depth", "40"], "--depth 40 / --base-channels 8: this tool profiles networks up to depth 8"),
    (["--device", "cpu", "--tile", "92", "--depth", "3", "--base-channels", "2", "--json", "."],
     "--json .: cannot write it"),
])
def test_bad_arguments(tmp_path, args, message):
    result = run(*args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and f"error: {message}" in result.stderr, result.stderr


@pytest.mark.skipif(ops.cuda_status() is None, reason="CUDA works here")
def test_device_cuda_without_a_gpu_says_why(tmp_path):
    result = run("--device", "cuda", cwd=tmp_path)
    assert result.returncode == 2 and "--device cuda was asked for but CUDA cannot run here" in result.stderr
