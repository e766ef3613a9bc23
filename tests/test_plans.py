"""Plans by measurement (csrc/launchers.h, "Plans measured instead of ruled"; docs/CONV3X3.md):
the table of GEMM plans in the extension, its checks, the command lines' --autotune and --plans,
and the benchmark summary of an autotuned step. All without a GPU: the table and its checks are
host code. That every plan computes the convolution is checked by the CPU emulation
(tests/test_conv3x3_emulated.py); the timing itself on a GPU (tests/test_cuda_ops.py).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

from test_cuda_graph import _assert_usage_error, run_train
from unet_cuda import ops

ROOT = Path(__file__).resolve().parents[1]

from test_bindings import _C, _SKIP_REASON  # noqa: E402  the extension, where it is built

needs_extension = pytest.mark.skipif(_C is None, reason=_SKIP_REASON or "built")

V6 = "v6_tf32_wgmma"
# d4b's forward at batch 1: 62 x 62 output pixels, 512 channels, K = 9 x 512
D4B_FORWARD = ("conv3x3_forward", V6, 62 * 62, 512, 9 * 512, 1)


@pytest.fixture()
def table():
    """The extension's table, empty and with autotuning off, before and after the test."""
    _C.set_gemm_autotune(False)
    _C.clear_tuned_gemm_plans()
    yield _C
    _C.set_gemm_autotune(False)
    _C.clear_tuned_gemm_plans()


@needs_extension
def test_autotune_switch_and_ops(table):
    assert table.gemm_autotune() is False
    table.set_gemm_autotune(True)
    assert table.gemm_autotune() is True
    table.set_gemm_autotune(False)
    assert table.gemm_autotune() is False
    # Every GEMM op of the 3x3 and 2x2 convolutions, no other.
    assert set(table.GEMM_PLAN_OPS) == {
        f"{family}_{direction}" for family in ("conv3x3", "conv3x3_concat", "upconv2x2")
        for direction in ("forward", "backward_data", "backward_weight")}


@needs_extension
def test_candidates_start_with_the_rule(table):
    candidates = table.gemm_plan_candidates(*D4B_FORWARD)
    rule = candidates[0]
    assert rule == (128, 128, table.conv3x3_forward_splits(1, 512, 64, 64, 512, version=V6))
    assert len(set(candidates)) == len(candidates) > 3
    assert {c[:2] for c in candidates} == {(128, 128), (128, 64), (256, 64), (256, 128)}
    assert all(1 <= c[2] <= 18 for c in candidates)  # K / 256 slices at most
    # The same for the weight gradient of d1b: the 64 x 192 tile by rule, in 88 slices.
    wgrad = table.gemm_plan_candidates("conv3x3_backward_weight", V6, 64, 576, 568 * 568, 1)
    assert wgrad[0] == (64, 192, table.conv3x3_backward_weight_splits(1, 64, 570, 570, 64, version=V6)) == (64, 192, 88)
    # v3's own two tiles for the fp32 mode.
    assert {c[:2] for c in table.gemm_plan_candidates("conv3x3_forward", "v3_igemm", 3844, 512, 4608)} == {
        (128, 128), (64, 64)}


@needs_extension
def test_set_and_clear(table):
    assert table.tuned_gemm_plans() == []
    table.set_tuned_gemm_plan(*D4B_FORWARD, 256, 64, 2)
    (entry,) = table.tuned_gemm_plans()
    assert {k: entry[k] for k in ("op", "version", "M", "cols", "K", "images")} == dict(
        zip(("op", "version", "M", "cols", "K", "images"), D4B_FORWARD))
    assert entry["plan"] == (256, 64, 2) and entry["rule"] == table.gemm_plan_candidates(*D4B_FORWARD)[0]
    assert math.isnan(entry["ms"]) and math.isnan(entry["rule_ms"]) and entry["candidates"] == 0
    table.set_tuned_gemm_plan(*D4B_FORWARD, 128, 128, 1)  # replaces it
    assert [e["plan"] for e in table.tuned_gemm_plans()] == [(128, 128, 1)]
    table.clear_tuned_gemm_plans()
    assert table.tuned_gemm_plans() == []


@needs_extension
@pytest.mark.parametrize("bad, message", [
    ((D4B_FORWARD, (96, 128, 1)), r"tile 96 x 128 in 1 slices is not one of its plans \(tile/slices\): 128x128/"),
    ((D4B_FORWARD, (128, 128, 24)), "not one of its plans"),
    ((D4B_FORWARD, (128, 256, 1)), "not one of its plans"),  # the wide tile: weight gradients only
    ((("conv3x3_sideways",) + D4B_FORWARD[1:], (128, 128, 1)), "no op conv3x3_sideways has GEMM plans; those"),
    (((D4B_FORWARD[0], "v2_smem") + D4B_FORWARD[2:], (128, 128, 1)), "v2_smem runs no GEMM"),
    (((D4B_FORWARD[0], "v9") + D4B_FORWARD[2:], (128, 128, 1)), "argument version must be one of"),
    ((D4B_FORWARD[:5] + (2,), (128, 128, 1)), "images = 1"),
    ((D4B_FORWARD[:2] + (0,) + D4B_FORWARD[3:], (128, 128, 1)), "needs M, cols, K >= 1"),
])
def test_bad_plans_are_refused_by_name(table, bad, message):
    key, plan = bad
    with pytest.raises(ValueError, match=message):
        table.set_tuned_gemm_plan(*key, *plan)
    assert table.tuned_gemm_plans() == []


# ------------------------------------------------------------------------------------------------
# The command lines and the device-agnostic layer: GPU options, refused on the CPU with the reason
# ------------------------------------------------------------------------------------------------

TINY = ["--device", "cpu", "--base-channels", "2", "--depth", "2", "--tile", "36", "--steps", "2",
        "--out", "run", "--quiet"]


@pytest.mark.parametrize("option", [["--autotune"], ["--plans", "plans.json"]], ids=lambda o: o[0])
def test_train_refuses_plan_options_on_the_cpu(tmp_path, option):
    (tmp_path / "plans.json").write_text('{"plans": []}')
    result = run_train(option + TINY, cwd=tmp_path, timeout=120)
    _assert_usage_error(result, option[0], "the CPU backend has none", "--device cuda")
    assert not (tmp_path / "run").exists()  # refused before anything was created


def test_predict_refuses_autotune_on_the_cpu(tmp_path):
    import subprocess

    result = subprocess.run([sys.executable, "-m", "unet_cuda.predict", "--checkpoint", "none.ckpt", "--input",
                             "none.tif", "--output", "out.tif", "--device", "cpu", "--autotune"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120,
                            env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    _assert_usage_error(result, "--autotune", "the CPU backend has none")


def test_ops_layer_on_the_cpu(tmp_path):
    ops.set_autotune(False, "cpu")  # nothing to switch off
    with pytest.raises(ValueError, match="the CPU backend has none"):
        ops.set_autotune(True, "cpu")
    with pytest.raises(ValueError, match="the CPU backend has none"):
        ops.load_tuned_plans(tmp_path / "plans.json", "cpu")


# ------------------------------------------------------------------------------------------------
# The benchmark's summary of an autotuned step
# ------------------------------------------------------------------------------------------------

def test_autotune_tables_in_the_summary():
    sys.path.insert(0, str(ROOT / "bench"))
    import collect_results as cr

    plans = [
        {"op": "conv3x3_forward", "plan": [128, 64, 2], "rule": [128, 128, 1], "ms": 0.20, "rule_ms": 0.25},
        {"op": "conv3x3_backward_data", "plan": [128, 128, 1], "rule": [128, 128, 1], "ms": 0.30,
         "rule_ms": 0.30},
        {"op": "conv3x3_backward_weight", "plan": [128, 256, 4], "rule": [128, 128, 8], "ms": None,
         "rule_ms": None},  # set by hand: counted, not timed
    ]
    records = [
        {"kind": "train_step", "impl": "ours_autotuned", "precision": "tf32", "ms": 13.0, "plans": plans,
         "first_step_s": 2.5},
        {"kind": "train_step", "impl": "ours", "precision": "tf32", "ms": 14.0},
        {"kind": "train_step", "impl": "torch", "precision": "tf32", "ms": 11.7},
    ]
    tables = cr._autotune_tables(records)
    assert tables == {"tf32": {"gemms": 3, "changed": 2, "rule_ms": pytest.approx(0.55),
                               "chosen_ms": pytest.approx(0.50), "first_step_s": 2.5}}
    summary = cr.summarize(records)
    assert summary["autotuned_train_step_ms"] == {"tf32": 13.0}
    assert summary["autotuned_train_step_ratio"] == {"tf32": pytest.approx(11.7 / 13.0)}
    assert summary["autotune_tables"] == tables
    assert records[0]["ratio"] == pytest.approx(11.7 / 13.0)  # the step's record gets its peer too


def test_profile_refuses_autotune_on_the_cpu(capsys):
    from unet_cuda import profile

    assert profile.main(["--device", "cpu", "--autotune", "--steps", "1"]) == 2
    assert "--autotune" in capsys.readouterr().err


def test_collect_keeps_the_autotuned_profile_and_its_plans(tmp_path):
    sys.path.insert(0, str(ROOT / "bench"))
    import json

    import collect_results as cr

    plans = [{"op": "conv3x3_forward", "version": "v6_tf32_wgmma", "M": 3844, "cols": 512, "K": 4608,
              "images": 1, "plan": [128, 64, 2], "rule": [128, 128, 3], "ms": 0.2, "rule_ms": 0.22,
              "candidates": 21}]
    rows = [{"op": "conv3x3_forward", "shapes": "1x512x64x64", "calls": 1.0, "gpu_ms": 0.2}]
    (tmp_path / "profile-tf32.json").write_text(json.dumps({"precision": "tf32", "step_ms": 14.0, "rows": rows}))
    (tmp_path / "profile-tf32-autotuned.json").write_text(
        json.dumps({"precision": "tf32", "step_ms": 13.5, "rows": rows, "plans": plans}))
    profiles = cr.read_profiles(tmp_path)
    assert set(profiles) == {"tf32", "tf32-autotuned"}
    assert profiles["tf32-autotuned"]["step_ms"] == 13.5 and profiles["tf32-autotuned"]["plans"] == plans
    assert "plans" not in profiles["tf32"]
