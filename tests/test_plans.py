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
    assert entry["timed"] == [] and entry["uses"] == 0
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
    (((D4B_FORWARD[0], "v7_tf32_halo") + D4B_FORWARD[2:], (128, 128, 1)),
     "v7_tf32_halo's forward and backward data run its own kernel, which has no plans"),
    (((D4B_FORWARD[0], "v8_bf16_halo") + D4B_FORWARD[2:], (128, 128, 1)),
     "its other ops the GEMMs of v5_bf16_mma: name that version"),
    (((D4B_FORWARD[0], "v9_fp32_halo") + D4B_FORWARD[2:], (128, 128, 1)),
     "its other ops the GEMMs of v3_igemm: name that version"),
    (((D4B_FORWARD[0], "v99_missing") + D4B_FORWARD[2:], (128, 128, 1)), "argument version must be one of"),
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


def test_the_results_markdown_lists_the_plans_off_the_rule():
    sys.path.insert(0, str(ROOT / "bench"))
    import plot_results

    plans = [
        {"op": "upconv2x2_backward_weight", "M": 1024, "cols": 2048, "K": 784, "images": 1,
         "plan": [128, 128, 3], "rule": [128, 256, 1], "ms": 0.05, "rule_ms": 0.10},
        {"op": "conv3x3_forward", "M": 3844, "cols": 512, "K": 4608, "images": 1,
         "plan": [256, 128, 2], "rule": [128, 128, 3], "ms": 0.20, "rule_ms": 0.22},
        {"op": "conv3x3_backward_weight", "M": 64, "cols": 576, "K": 322624, "images": 1,
         "plan": [64, 192, 88], "rule": [64, 192, 88], "ms": 0.33, "rule_ms": 0.33},
    ]
    results = {"benchmarks": [{"kind": "train_step", "impl": "ours_autotuned", "precision": "tf32",
                               "version": "v6_tf32_wgmma", "ms": 13.9, "first_step_s": 2.0, "plans": plans}]}
    lines = plot_results.autotune_table(results)
    text = "\n".join(lines)
    assert "3 GEMMs, 2 off the rule; their rule plans 0.650 ms, the plans kept 0.580 ms" in text
    rows = [line for line in lines if line.startswith("| upconv") or line.startswith("| conv3x3")]
    assert rows == [  # the plan that stays the rule's is not listed; the largest saving first
        "| upconv2x2_backward_weight | 1024 x 2048 x 784 | 128 x 256 / 1 | 0.100 | 128 x 128 / 3 | 0.050 | 2.00 |",
        "| conv3x3_forward | 3844 x 512 x 4608 | 128 x 128 / 3 | 0.220 | 256 x 128 / 2 | 0.200 | 1.10 |",
    ]
    assert plot_results.autotune_table({"benchmarks": []}) == []
    assert text in plot_results.render_markdown(results)


# ------------------------------------------------------------------------------------------------
# A table's entries and files, checked before any plan is entered (unet_cuda/plans.py)
# ------------------------------------------------------------------------------------------------

def _entry(**changes):
    entry = dict(zip(("op", "version", "M", "cols", "K", "images"), D4B_FORWARD), plan=[128, 128, 1])
    entry.update(changes)
    return entry


@needs_extension
def test_checked_entries_accept_good_ones_and_ignore_other_fields():
    from unet_cuda.plans import checked_entries

    good = [_entry(ms=0.2, rule_ms=0.3, uses=7), _entry(plan=(256, 128, 2))]
    assert checked_entries(good, _C.gemm_plan_candidates) == [(D4B_FORWARD, (128, 128, 1)),
                                                               (D4B_FORWARD, (256, 128, 2))]
    assert checked_entries([], _C.gemm_plan_candidates) == []


@needs_extension
@pytest.mark.parametrize("bad, message", [
    ({"plan": [128, 128, 1]}, "entry 1 lacks op, version, M, cols, K, images"),
    (_entry(M=None), "entry 1: M must be whole numbers"),
    (_entry(M=3844.0), "entry 1: M must be whole numbers"),
    (_entry(images=True), "entry 1: images must be whole numbers"),
    (_entry(op=5), "entry 1: op must be text"),
    (_entry(plan=[128, 128]), r"entry 1: plan must be \[bm, bn, splits\]"),
    (_entry(plan=[128, 128.9, 1]), "three whole numbers"),
    (_entry(plan=[96, 128, 1]), r"entry 1 \(conv3x3_forward, v6_tf32_wgmma, M 3844.*plan \[96, 128, 1\] is not one of"),
    (_entry(version="v99_missing"), "entry 1: gemm_plan_candidates: argument version must be one of"),
    (_entry(M=2 ** 31), "entry 1: .*below 2\\^31"),      # refused, not a crash in the planners
    (_entry(M=2 ** 70), "entry 1: "),                     # past int64: the binding's own refusal
    ("not an entry", "entry 1 must be a JSON object"),
])
def test_checked_entries_name_the_first_bad_entry(bad, message):
    from unet_cuda.plans import checked_entries

    with pytest.raises(ValueError, match=message):
        checked_entries([_entry(), bad], _C.gemm_plan_candidates)


@needs_extension
def test_huge_dimensions_are_refused_not_crashing():
    for dims in ((2 ** 31, 512, 4608, 1), (2 ** 31 - 1, 2 ** 31 - 1, 4608, 1), (64, 576, 2 ** 31 - 1, 2 ** 30)):
        with pytest.raises(ValueError, match="below 2\\^31, M x cols and images x K at most 2\\^60"):
            _C.gemm_plan_candidates("conv3x3_backward_weight", V6, *dims)
    # at the bounds: plans, computed without overflow (one slice: no room for partials)
    assert {p[2] for p in _C.gemm_plan_candidates("conv3x3_backward_weight", V6, 2 ** 30, 2 ** 30, 4608, 1)} == {1}


def test_plans_files(tmp_path):
    from unet_cuda.plans import read_plans_file, write_plans_file

    path = tmp_path / "plans.json"
    write_plans_file(path, [_entry()], "NVIDIA H100 80GB HBM3")
    assert read_plans_file(path) == [_entry()]
    assert not list(tmp_path.glob("*.tmp"))
    for text, message in (("{not json", "cannot read"), ('{"plans": {}}', "not a table of plans"),
                          ("[]", "not a table of plans")):
        path.write_text(text)
        with pytest.raises(ValueError, match=message):
            read_plans_file(path)
    with pytest.raises(ValueError, match="cannot read"):
        read_plans_file(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="must be a list of entries"):
        from unet_cuda.plans import checked_entries

        checked_entries({"plans": []}, lambda *key: [])


def test_profile_prints_the_plans_measured():
    from unet_cuda.plans import format_plans

    plans = [
        {"op": "conv3x3_forward", "M": 3844, "cols": 512, "K": 4608, "plan": [256, 128, 2],
         "rule": [128, 128, 3], "ms": 0.20, "rule_ms": 0.22},
        {"op": "upconv2x2_backward_weight", "M": 1024, "cols": 2048, "K": 784, "plan": [128, 128, 3],
         "rule": [128, 256, 1], "ms": 0.05, "rule_ms": 0.10},
        {"op": "conv3x3_backward_data", "M": 4096, "cols": 512, "K": 4608, "plan": [128, 128, 1],
         "rule": [128, 128, 1], "ms": 0.25, "rule_ms": 0.25},
    ]
    assert format_plans(plans).splitlines() == [
        "GEMM plans measured: 3 GEMMs, 2 off the rule; the rules' plans 0.570 ms, the plans kept 0.500 ms "
        "(per run: medians of five, timed while tuning)",
        "  upconv2x2_backward_weight 1024x2048x784: rule 128x256/1 0.100 ms -> 128x128/3 0.050 ms",
        "  conv3x3_forward 3844x512x4608: rule 128x128/3 0.220 ms -> 256x128/2 0.200 ms",
    ]


def test_cpu_checkpoints_hold_no_plans_and_drop_a_stale_plans_file(tmp_path):
    """A checkpoint records the GEMM plans and whether the run autotunes; on the CPU there are none,
    and a plans.json left in OUT by an earlier GPU segment goes (it no longer matches)."""
    from unet_cuda.checkpoint import load_checkpoint
    from unet_cuda.train import main

    out = tmp_path / "run"
    out.mkdir()
    (out / "plans.json").write_text('{"device": "GPU", "plans": []}')
    assert main(TINY[:-3] + ["--out", str(out), "--quiet", "--no-plots"]) == 0
    meta = load_checkpoint(out / "last.ckpt")["meta"]
    assert meta["gemm_plans"] == [] and meta["autotune"] is False
    assert not (out / "plans.json").exists()


def test_the_plans_command_shows_a_table_and_draws_it(tmp_path, capsys):
    from unet_cuda import plans as p

    entries = [
        {"op": "conv3x3_forward", "version": V6, "M": 3844, "cols": 512, "K": 4608, "images": 1,
         "plan": [256, 128, 2], "rule": [128, 128, 3], "ms": 0.20, "rule_ms": 0.22},
        {"op": "conv3x3_backward_weight", "version": V6, "M": 512, "cols": 4608, "K": 2704, "images": 2,
         "plan": [128, 128, 4], "rule": [128, 256, 2], "ms": 0.15, "rule_ms": 0.24},
        {"op": "conv3x3_backward_data", "version": V6, "M": 4096, "cols": 512, "K": 4608, "images": 1,
         "plan": [128, 128, 1], "rule": [128, 128, 1], "ms": 0.25, "rule_ms": 0.25},
    ]
    path = tmp_path / "plans.json"
    p.write_plans_file(path, entries, "NVIDIA H100 80GB HBM3")
    assert p.main([str(path), "--plot", str(tmp_path / "plans.png")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("GEMM plans measured: 3 GEMMs, 2 off the rule; the rules' plans 0.710 ms, "
                               "the plans kept 0.600 ms")
    assert lines[1] == "  conv3x3_backward_weight 512x4608x2704 (2 images): rule 128x256/2 0.240 ms -> 128x128/4 0.150 ms"
    assert lines[2] == "  conv3x3_forward 3844x512x4608: rule 128x128/3 0.220 ms -> 256x128/2 0.200 ms"
    assert lines[3] == str(tmp_path / "plans.png") and (tmp_path / "plans.png").stat().st_size > 1000
    (tmp_path / "bad.json").write_text('{"plans": [{"op": "conv3x3_forward"}]}')
    assert p.main([str(tmp_path / "bad.json")]) == 2
    assert "every entry needs op, M, cols, K, plan and rule" in capsys.readouterr().err
