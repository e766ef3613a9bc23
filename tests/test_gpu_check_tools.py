"""The GPU check's tools, on machines without a GPU: the results collector on synthetic inputs, the
sanitizer and JUnit parsers, the chart, the shell script's syntax, the layer table and the
benchmark cases against the NumPy reference (and against PyTorch where it is installed)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

import benchlib  # noqa: E402
import collect_results as cr  # noqa: E402
import op_cases  # noqa: E402
import plot_history  # noqa: E402
import plot_results  # noqa: E402

COMMIT = "0123456789abcdef0123456789abcdef01234567"
GPU = "NVIDIA H100 80GB HBM3"


# ------------------------------------------------------------------------------------------------
# The shell script
# ------------------------------------------------------------------------------------------------


def test_gpu_check_script_parses():
    result = subprocess.run(["bash", "-n", str(BENCH / "gpu_check.sh")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_gpu_check_script_refuses_bad_arguments(tmp_path):
    usage = subprocess.run(["bash", str(BENCH / "gpu_check.sh")], capture_output=True, text=True)
    assert usage.returncode == 2 and "usage" in usage.stderr
    inside = BENCH / "results" / "not-here"
    refused = subprocess.run(["bash", str(BENCH / "gpu_check.sh"), str(inside)], capture_output=True, text=True)
    assert refused.returncode == 2 and "bench/results" in refused.stderr
    assert not inside.exists()


# ------------------------------------------------------------------------------------------------
# compute-sanitizer logs
# ------------------------------------------------------------------------------------------------


def _log(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("text, expected", [
    ("========= COMPUTE-SANITIZER\nok conv\n========= ERROR SUMMARY: 0 errors\n", 0),
    ("========= Invalid __global__ read of size 4 bytes\n" * 3 + "========= ERROR SUMMARY: 3 errors\n", 3),
    ("========= ERROR SUMMARY: 1 error\n", 1),
    ("========= ERROR SUMMARY: 2 errors\n========= ERROR SUMMARY: 5 errors\n", 7),   # two processes
])
def test_sanitizer_summary_counts(tmp_path, text, expected):
    text = "SANITIZER DRIVER: 49 calls, 0 failed\n" + text
    parsed = cr.parse_sanitizer_log(_log(tmp_path, "sanitizer-memcheck.log", text))
    assert parsed["errors"] == expected
    assert "reason" not in parsed


def test_sanitizer_zero_errors_without_the_driver_summary_is_null(tmp_path):
    text = "ModuleNotFoundError: No module named 'cupy'\n========= ERROR SUMMARY: 0 errors\n"
    parsed = cr.parse_sanitizer_log(_log(tmp_path, "sanitizer-memcheck.log", text))
    assert parsed["errors"] is None and "driver stopped" in parsed["reason"]
    found = cr.parse_sanitizer_log(_log(tmp_path, "b.log", "========= ERROR SUMMARY: 2 errors\n"))
    assert found["errors"] == 2 and "driver stopped" in found["note"]
    plain = cr.parse_sanitizer_log(_log(tmp_path, "c.log", "========= ERROR SUMMARY: 0 errors\n"),
                                   driver_required=False)
    assert plain["errors"] == 0


def test_sanitizer_racecheck_summary_without_error_summary(tmp_path):
    text = ("SANITIZER DRIVER: 49 calls, 0 failed\n"
            "========= RACECHECK SUMMARY: 4 hazards displayed (3 errors, 1 warning)\n")
    parsed = cr.parse_sanitizer_log(_log(tmp_path, "sanitizer-racecheck.log", text))
    assert parsed["errors"] == 3 and parsed["warnings"] == 1


def test_sanitizer_missing_log_is_null_with_reason(tmp_path):
    parsed = cr.parse_sanitizer_log(tmp_path / "sanitizer-initcheck.log",
                                    {"status": "skipped", "note": "compute-sanitizer not found"})
    assert parsed["errors"] is None
    assert "not found" in parsed["reason"] and "compute-sanitizer not found" in parsed["reason"]


def test_sanitizer_log_without_summary(tmp_path):
    path = _log(tmp_path, "sanitizer-synccheck.log", "========= COMPUTE-SANITIZER\nok conv3x3_forward\n")
    timed_out = cr.parse_sanitizer_log(path, {"status": "timeout", "seconds": 90})
    assert timed_out["errors"] is None and "timed out" in timed_out["reason"]
    stopped = cr.parse_sanitizer_log(path, {"status": "failed"})
    assert stopped["errors"] is None and "ERROR SUMMARY" in stopped["reason"]


def test_sanitizer_driver_summary_is_read(tmp_path):
    text = ("FAILED upconv2x2_forward: RuntimeError: boom\n"
            "SANITIZER DRIVER: 49 calls, 1 failed (upconv2x2_forward)\n========= ERROR SUMMARY: 0 errors\n")
    parsed = cr.parse_sanitizer_log(_log(tmp_path, "sanitizer-memcheck.log", text))
    assert parsed["errors"] == 0
    assert parsed["driver"] == {"calls": 49, "failed": 1}
    assert "1 of 49" in parsed["note"]


def test_sanitizer_driver_runs_every_op_on_the_reference():
    result = subprocess.run([sys.executable, str(BENCH / "sanitizer_driver.py"), "--device", "cpu"],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    calls, failed = (int(v) for v in cr._DRIVER_SUMMARY.findall(result.stdout)[-1])
    assert failed == 0 and calls >= 40
    called = {line.split()[1] for line in result.stdout.splitlines() if line.startswith("ok ")}
    from unet_cuda.ops import OP_NAMES  # noqa: PLC0415

    assert set(OP_NAMES) <= called, f"ops the driver never calls: {set(OP_NAMES) - called}"


# ------------------------------------------------------------------------------------------------
# JUnit XML
# ------------------------------------------------------------------------------------------------

JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites name="pytest tests"><testsuite name="pytest" errors="1" failures="1" skipped="2" tests="6">
<testcase classname="tests.test_a" name="test_ok" time="0.1"/>
<testcase classname="tests.test_a" name="test_ok2" time="0.1"/>
<testcase classname="tests.test_a" name="test_bad" time="0.1"><failure message="assert 1 == 2">x</failure></testcase>
<testcase classname="tests.test_b" name="test_fixture" time="0.0"><error message="fixture failed">y</error></testcase>
<testcase classname="tests.test_b" name="test_skip" time="0.0"><skipped message="no GPU">z</skipped></testcase>
<testcase classname="tests.test_b" name="test_xfail" time="0.0"><skipped type="pytest.xfail" message="known">z</skipped></testcase>
</testsuite></testsuites>
"""


def test_junit_counts(tmp_path):
    counts = cr.parse_junit(_log(tmp_path, "gpu-tests.xml", JUNIT))
    assert {k: counts[k] for k in ("passed", "failed", "skipped", "errors", "total")} == \
        {"passed": 2, "failed": 1, "skipped": 2, "errors": 1, "total": 6}
    assert counts["not_passed"] == ["tests.test_a::test_bad", "tests.test_b::test_fixture"]


def test_junit_missing_or_broken(tmp_path):
    missing = cr.parse_junit(tmp_path / "gpu-tests.xml")
    assert missing["passed"] is None and "not found" in missing["reason"]
    broken = cr.parse_junit(_log(tmp_path, "broken.xml", "<testsuites><testcase"))
    assert broken["failed"] is None and "unreadable" in broken["reason"]


# ------------------------------------------------------------------------------------------------
# A whole synthetic output folder
# ------------------------------------------------------------------------------------------------


PEER_SETTINGS = ("fp32", "tf32", "bf16")


def _op_record(op, layer, ms, peers, *, flops=None, nbytes=None, version=None, precision="fp32",
               kind="op", **extra):
    """A record as test_bench_kernels writes it; ``peers``: {setting: ms} of the settings timed."""
    ceilings = benchlib.ceilings_for(GPU)
    rec = {"id": f"{kind}/{op}/{layer}" + (f"/{version}" if version else ""), "kind": kind, "op": op,
           "layer": layer, "shape": "x[1,64,570,570] w[64,64,3,3] -> y[1,64,568,568]",
           "precision": precision, "version": version, "flops": flops, "bytes": nbytes, "ms": ms,
           "ms_min": ms * 0.98, "ms_max": ms * 1.05, "repeats": 20, "ceilings_card": ceilings.card,
           **benchlib.figures(ms, flops=flops, nbytes=nbytes, ceilings=ceilings, precision=precision), **extra}
    for setting, peer_ms in peers.items():
        rec[f"peer_{setting}_ms"] = peer_ms
        rec[f"ratio_{setting}"] = peer_ms / ms
    matched = precision if precision in peers else "fp32"
    if matched in peers:
        rec.update(peer="cuDNN", peer_precision=matched, peer_ms=peers[matched], ratio=peers[matched] / ms)
    return {k: v for k, v in rec.items() if v is not None}


D1B_FLOPS = 23.79e9
VERSION_MS = {"v1_direct": 10.0, "v2_smem": 5.0, "v3_igemm": 2.0, "v4_tf32_mma": 0.5, "v5_bf16_mma": 0.3}
VERSION_PRECISION = {"v3_igemm": "fp32", "v4_tf32_mma": "tf32", "v5_bf16_mma": "bf16"}


def _synthetic_records() -> list[dict]:
    """Per-op, per-version, training-step and prediction records of a made-up run (no card ran them)."""
    conv_peers = {"fp32": 1.0, "tf32": 0.25, "bf16": 0.15}
    records = [
        # the 3x3 forward at d1b in each precision mode's version, against the peer of its precision
        *(_op_record("conv3x3_forward", "d1b", VERSION_MS[v], conv_peers, flops=D1B_FLOPS, version=v,
                     precision=VERSION_PRECISION[v]) for v in ("v3_igemm", "v4_tf32_mma", "v5_bf16_mma")),
        _op_record("conv3x3_backward_data", "d1b", 2.5, {"fp32": 1.1, "tf32": 0.3, "bf16": 0.2},
                   flops=D1B_FLOPS, version="v3_igemm"),
        _op_record("conv3x3_backward_weight", "d1b", 3.0, {"fp32": 1.2, "tf32": 0.3, "bf16": 0.2},
                   flops=D1B_FLOPS, version="v3_igemm"),
        _op_record("maxpool2x2_forward", "pool1", 0.1, {"fp32": 0.12}, nbytes=1e8),
        _op_record("crop_concat_forward", "cat1", 0.2, {"fp32": 0.3}, nbytes=1e8, in_step=False),
        # fused into another op in our step, on its own in PyTorch's: the peer's sum only
        _op_record("relu_backward", "d1a", 0.09, {"fp32": 0.08}, nbytes=1e8, in_step=False, peer_in_step=True),
        # the version progression at d1b
        *(_op_record(op, "d1b", ms, {}, flops=D1B_FLOPS, version=v, kind="op_version",
                     precision=VERSION_PRECISION.get(v, "fp32"))
          for v, ms in VERSION_MS.items()
          for op in ("conv3x3_forward", "conv3x3_backward_data", "conv3x3_backward_weight")),
    ]
    step = {"kind": "train_step", "shape": "x[1,1,572,572]", "flops": 902e9}
    for impl, times in (("ours", {"fp32": 40.0, "tf32": 6.0, "bf16": 4.0}),
                        ("ours_graph", {"fp32": 38.0, "tf32": 5.0}),           # no bf16 graph figure
                        ("torch", {"tf32": 9.0, "fp32": 30.0, "bf16": 6.0})):
        for p, ms in times.items():
            records.append({**step, "id": f"train_step/{impl}/{p}", "impl": impl, "precision": p, "ms": ms,
                            "name": f"{impl} train step ({p})",
                            **({"version": {v: k for k, v in VERSION_PRECISION.items()}[p]} if impl != "torch" else {})})
    for impl, times in (("ours", {"fp32": 80.0, "bf16": 1.5}),                  # no tf32 prediction
                        ("torch", {"fp32": 40.0, "tf32": 20.0, "bf16": 10.0})):
        for p, ms in times.items():
            records.append({"id": f"infer_512/{impl}/{p}", "kind": "infer", "impl": impl, "precision": p,
                            "ms": ms, "batch_size": 4, "tiles": 4})
    return records


def _bench_entry(name, extra, wall_s):
    return {"group": extra.get("op"), "name": name, "fullname": f"bench/x.py::{name}", "params": None,
            "stats": {"min": wall_s, "max": wall_s, "mean": wall_s, "median": wall_s, "rounds": 5},
            "extra_info": extra}


def _synthetic_outdir(tmp_path: Path, *, with_json: bool = True) -> Path:
    out = tmp_path / "out"
    out.mkdir()
    (out / "meta.txt").write_text(f"commit={COMMIT}\ndirty=true\ndate=2026-01-02T03:04:05Z\n")
    (out / "gpu-info.csv").write_text(
        "# name,driver_version,clocks.sm,clocks.max.sm,memory.total\n"
        f"{GPU}, 580.65.06, 1980, 1980, 81559\n")
    (out / "env.json").write_text(json.dumps({"torch": "2.11.0", "cupy": "14.2.0"}))
    (out / "stages.tsv").write_text(
        "info\t0\t1\t0\t\nbuild\t0\t61\t300\t\ngpu-tests\t1\t40\t150\t\n"
        "sanitizer-memcheck\t0\t20\t90\t\nsanitizer-racecheck\t0\t30\t90\t\n"
        "sanitizer-initcheck\tskipped\t0\t0\tno time left in the 540 s budget\n"
        "sanitizer-synccheck\t124\t90\t90\ttimed out after 90 s\nbench\t0\t150\t300\t\n")
    (out / "gpu-tests.xml").write_text(JUNIT)
    (out / "sanitizer-memcheck.log").write_text(
        "SANITIZER DRIVER: 49 calls, 0 failed\n========= ERROR SUMMARY: 0 errors\n")
    (out / "sanitizer-racecheck.log").write_text(
        "SANITIZER DRIVER: 49 calls, 0 failed\n========= ERROR SUMMARY: 3 errors\n")
    (out / "sanitizer-synccheck.log").write_text("ok conv3x3_forward\n")
    records = _synthetic_records()
    check = {"id": "check/loss_vs_torch_fp32", "kind": "check", "passed": True, "rel_err_before": 1e-7,
             "rel_err_after": 2e-6, "worst_param": "down0.conv1.bias", "worst_update_rel_l2": 1e-4}
    (out / "bench-records.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in records + [check]) + "not json\n")
    if with_json:
        entries = [_bench_entry(f"test_{i}", r, r["ms"] * 1.1e-3) for i, r in enumerate(records)]
        (out / "benchmarks.json").write_text(json.dumps({"machine_info": {}, "benchmarks": entries}))
    (out / "bench-tests.xml").write_text(JUNIT.replace('name="test_bad"', 'name="test_bench_bad"'))
    (out / "isbi.json").write_text(json.dumps({"rand_error": 0.05, "pixel_error": 0.07, "steps": 2000}))
    return out


def test_collect_synthetic_folder(tmp_path, capsys):
    out = _synthetic_outdir(tmp_path)
    assert cr.main([str(out)]) == 0
    table = capsys.readouterr().out
    path = out / f"results-{COMMIT[:7]}-dirty-h100-80gb-hbm3.json"
    assert path.is_file(), list(out.iterdir())
    text = path.read_text()
    results = json.loads(text)

    # the newest-run check of the project's hooks reads the first "commit" line of the file
    assert re.search(r'"commit": *"([0-9a-f]{7,40})"', text).group(1) == COMMIT
    assert results["commit"] == COMMIT and results["dirty"] is True
    assert results["gpu"] == GPU and results["date"] == "2026-01-02T03:04:05Z"
    assert results["gpu_info"]["clocks.max.sm"] == 1980
    assert results["ceilings"]["hbm_tbps"] == 3.35 and results["ceilings"]["assumed"] is False
    assert results["environment"]["torch"] == "2.11.0"
    assert {k: results["tests"][k] for k in ("passed", "failed", "skipped", "errors")} == \
        {"passed": 2, "failed": 1, "skipped": 2, "errors": 1}
    assert results["bench_tests"]["not_passed"][0].endswith("test_bench_bad")

    san = results["sanitizer"]
    assert san["memcheck_errors"] == 0 and san["racecheck_errors"] == 3
    assert san["initcheck_errors"] is None and "no time left" in san["details"]["initcheck"]["reason"]
    assert san["synccheck_errors"] is None and "timed out" in san["details"]["synccheck"]["reason"]
    assert results["stages"]["sanitizer-synccheck"]["status"] == "timeout"
    assert results["stages"]["gpu-tests"]["status"] == "failed"

    benchmarks = {b["id"]: b for b in results["benchmarks"]}
    conv = benchmarks["op/conv3x3_forward/d1b/v3_igemm"]
    for key in ("name", "shape", "ms", "tflops", "pct_of_ceiling", "peer_ms", "ratio", "wall_ms",
                "peer_bf16_ms", "ratio_tf32"):
        assert key in conv, key
    assert conv["tflops"] == pytest.approx(D1B_FLOPS / 2e-3 / 1e12)
    assert conv["pct_of_ceiling"] == pytest.approx(100 * conv["tflops"] / 66.9)
    assert conv["wall_ms"] == pytest.approx(2.2)
    bf16 = benchmarks["op/conv3x3_forward/d1b/v5_bf16_mma"]
    assert bf16["pct_of_ceiling"] == pytest.approx(100 * D1B_FLOPS / 0.3e-3 / 1e12 / 989.4)
    assert bf16["peer_precision"] == "bf16" and bf16["ratio"] == pytest.approx(0.15 / 0.3)
    assert benchmarks["op/maxpool2x2_forward/pool1"]["gbps"] == pytest.approx(1e8 / 1e-4 / 1e9)
    ours_step = benchmarks["train_step/ours/fp32"]
    assert ours_step["peer_ms"] == 30.0 and ours_step["ratio"] == pytest.approx(0.75)
    assert ours_step["ratio_tf32"] == pytest.approx(9.0 / 40.0)
    graphed = benchmarks["train_step/ours_graph/tf32"]
    assert graphed["peer_ms"] == 9.0 and graphed["ratio"] == pytest.approx(9.0 / 5.0)

    summary = results["summary"]
    assert summary["train_step_ms"] == {"fp32": 40.0, "tf32": 6.0, "bf16": 4.0}
    assert summary["torch_train_step_ms"] == {"fp32": 30.0, "tf32": 9.0, "bf16": 6.0}
    assert summary["train_step_ratio"] == pytest.approx({"fp32": 0.75, "tf32": 1.5, "bf16": 1.5})
    assert summary["graphed_train_step_ms"] == {"fp32": 38.0, "tf32": 5.0}
    assert summary["infer_512_ms"] == 1.5                       # the bf16 figure
    assert summary["infer_512_ms_by_precision"] == {"fp32": 80.0, "bf16": 1.5}
    assert summary["torch_infer_512_ms"] == {"fp32": 40.0, "tf32": 20.0, "bf16": 10.0}

    per = summary["per_precision"]
    assert list(per) == ["fp32", "tf32", "bf16"]
    assert per["tf32"]["version"] == "v4_tf32_mma"
    assert per["tf32"]["train_step_ms"] == 6.0 and per["tf32"]["torch_train_step_ms"] == 9.0
    assert per["tf32"]["ratio"] == pytest.approx(1.5) and per["tf32"]["graphed_ratio"] == pytest.approx(1.8)
    assert per["bf16"]["graphed_train_step_ms"] is None and per["bf16"]["graphed_ratio"] is None
    assert per["tf32"]["infer_512_ms"] is None and per["tf32"]["torch_infer_512_ms"] == 20.0
    assert per["bf16"]["infer_ratio"] == pytest.approx(10.0 / 1.5)

    # per-op sums per mode: the shared ops once, the 3x3 convolutions of the mode's version, and
    # not crop + concat (in_step false); the fused ReLU backward in the peer's sum only
    assert summary["ops_count"] == {"fp32": 4, "tf32": 2, "bf16": 2}
    assert summary["ops_total_ms"] == pytest.approx({"fp32": 7.6, "tf32": 0.6, "bf16": 0.4})
    assert summary["ops_peer_total_ms"] == pytest.approx({"fp32": 3.50, "tf32": 0.45, "bf16": 0.35})
    assert per["fp32"]["ops_total_ms"] == pytest.approx(7.6)
    assert summary["slowest_vs_peer"][0]["id"] == "op/conv3x3_backward_weight/d1b/v3_igemm"   # ratio 0.4
    assert summary["loss_check"]["passed"] is True
    assert results["checks"][0]["id"] == "check/loss_vs_torch_fp32"
    assert results["isbi"]["rand_error"] == 0.05

    targets = summary["targets"]
    assert set(targets) == {"train_tf32_vs_torch_default", "train_fp32_vs_torch_fp32",
                            "train_bf16_vs_torch_bf16", "infer_512_bf16_ms"}
    tf32 = targets["train_tf32_vs_torch_default"]
    assert tf32["value"] == pytest.approx(1.5) and tf32["goal"] == 1.5 and tf32["met"] is True
    assert tf32["card"] == GPU and "note" not in tf32
    assert tf32["graphed_value"] == pytest.approx(1.8) and tf32["graphed_met"] is True
    fp32 = targets["train_fp32_vs_torch_fp32"]
    assert fp32["value"] == pytest.approx(0.75) and fp32["met"] is False
    bf16_target = targets["train_bf16_vs_torch_bf16"]
    assert bf16_target["met"] is True and bf16_target["graphed_met"] is None
    infer = targets["infer_512_bf16_ms"]
    assert infer["value"] == 1.5 and infer["goal"] == 2.0 and infer["comparison"] == "<=" and infer["met"] is True

    assert "train" in table and "racecheck 3" in table
    assert re.search(r"target +train_fp32_vs_torch_fp32 +0\.75 x \(goal >= 1\.0 x\): not met", table), table
    assert re.search(r"target +infer_512_bf16_ms +1\.50 ms \(goal <= 2\.0 ms\): met", table), table
    assert table.strip().splitlines()[-1].startswith("results:")


def test_collect_uses_the_records_file_when_the_json_is_missing(tmp_path):
    out = _synthetic_outdir(tmp_path, with_json=False)
    results = cr.collect(out)
    assert results["benchmarks_source"] == "bench-records.jsonl"
    assert results["summary"]["train_step_ms"] == {"fp32": 40.0, "tf32": 6.0, "bf16": 4.0}
    assert all("wall_ms" not in b for b in results["benchmarks"])


def test_collect_empty_folder_gives_nulls_with_reasons(tmp_path):
    results = cr.collect(tmp_path)
    assert results["commit"] is None and "commit_reason" in results
    assert results["tests"]["passed"] is None and "not found" in results["tests"]["reason"]
    assert all(results["sanitizer"][f"{t}_errors"] is None for t in cr.SANITIZER_TOOLS)
    assert results["benchmarks"] == [] and results["summary"]["train_step_ms"] is None
    assert results["summary"]["infer_512_ms"] is None
    assert all(v is None for row in results["summary"]["per_precision"].values()
               for k, v in row.items() if k not in ("torch_setting",))
    targets = results["summary"]["targets"]
    assert len(targets) == 4
    for target in targets.values():
        assert target["value"] is None and target["met"] is None and target["card"] is None
        assert target["goal"] > 0 and target["note"] == "not measured in this run"
    assert "isbi" not in results
    path = cr.write_results(tmp_path, results)
    assert path.name == "results-nocommit-unknown-gpu.json"
    print(cr.format_table(results))


def test_collect_reads_the_op_by_op_profiles(tmp_path):
    """profile-<precision>.json, as `python -m unet_cuda.profile --json` writes it (here on the CPU),
    goes into the results under "profile" with its totals and largest rows; a broken one gives its
    reason."""
    from unet_cuda.profile import main as profile_main

    assert profile_main(["--device", "cpu", "--base-channels", "2", "--depth", "3", "--tile", "92", "--steps", "1",
                         "--top", "3", "--json", str(tmp_path / "profile-fp32.json")]) == 0
    (tmp_path / "profile-bf16.json").write_text("{not json")
    results = cr.collect(tmp_path)
    fp32 = results["profile"]["fp32"]
    assert fp32["device"] == "cpu" and fp32["step_ms"] > 0 and fp32["gpu_ms"] is None
    written = json.loads((tmp_path / "profile-fp32.json").read_text())["rows"]
    assert fp32["rows"] == written[:cr.PROFILE_ROWS]
    assert fp32["rows_left_out"] == max(len(written) - cr.PROFILE_ROWS, 0)
    assert "reason" in results["profile"]["bf16"]
    table = cr.format_table(results)
    assert "profile     fp32: step" in table


NCU_HEADER = ('"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size",'
              '"Grid Size","Device","CC","Section Name","Metric Name","Metric Unit","Metric Value","Rule Name",'
              '"Rule Type","Rule Description"')


def _ncu_row(kid, kernel, section, metric, unit, value):
    return (f'"{kid}","77","python3","host","{kernel}","1","7","(256, 1, 1)","(132, 2, 1)","0","9.0",'
            f'"{section}","{metric}","{unit}","{value}","","",""')


def test_collect_reads_the_ncu_report(tmp_path):
    """ncu-details.csv (ncu --import --csv --page details, with ncu's own lines before the header)
    and ncu-cases.json: every kernel's metrics land under its case, in launch order, the kernels
    after a GEMM (split reduction, bias gradient) with it; the short table names each GEMM's
    headline figures."""
    gemm1 = "void unet::conv3x3_v4_tf32_mma<unet::Conv3x3ForwardGemm, unet::V4Tile<128, 128, 2, 4>, false, true>(T1)"
    gemm2 = "void unet::conv3x3_v6_tf32_wgmma<unet::Conv3x3BackwardWeightGemm, 128, true, false>(T1)"
    rows = [
        _ncu_row(0, gemm1, "GPU Speed Of Light Throughput", "Duration", "usecond", "683.49"),
        _ncu_row(0, gemm1, "GPU Speed Of Light Throughput", "Compute (SM) Throughput", "%", "41.20"),
        _ncu_row(0, gemm1, "Launch Statistics", "Registers Per Thread", "register/thread", "168"),
        _ncu_row(0, gemm1, "Occupancy", "Achieved Occupancy", "%", "12.41"),
        _ncu_row(1, gemm2, "GPU Speed Of Light Throughput", "Duration", "usecond", "1,349.00"),
        _ncu_row(2, "void unet::{anonymous}::conv3x3_split_k_reduce(const float *, float *, long, int)",
                 "GPU Speed Of Light Throughput", "Duration", "usecond", "12.10"),
        _ncu_row(3, "bias_backward_v1_block_per_channel(const float *, float *, int, int, long)",
                 "GPU Speed Of Light Throughput", "Duration", "usecond", "30.00"),
    ]
    (tmp_path / "ncu-details.csv").write_text("==PROF== Connected to process 77\n" + NCU_HEADER + "\n"
                                              + "\n".join(rows) + "\n")
    cases = [{"op": "conv3x3_forward", "layer": "d1b", "precision": "tf32", "version": "v4_tf32_mma"},
             {"op": "conv3x3_backward_weight", "layer": "d1b", "precision": "tf32", "version": "v6_tf32_wgmma"}]
    (tmp_path / "ncu-cases.json").write_text(json.dumps(cases))
    ncu = cr.collect(tmp_path)["ncu"]
    assert ncu["kernels_profiled"] == 4 and "unmatched_kernels" not in ncu
    first, second = ncu["cases"]
    assert [k["kernel"] for k in first["kernels"]] == ["void unet::conv3x3_v4_tf32_mma"]
    assert first["kernels"][0]["metrics"]["Occupancy: Achieved Occupancy [%]"] == 12.41
    assert first["kernels"][0]["metrics"]["Launch Statistics: Registers Per Thread [register/thread]"] == 168
    assert len(second["kernels"]) == 3
    assert second["kernels"][0]["metrics"]["GPU Speed Of Light Throughput: Duration [usecond]"] == 1349.0
    assert second["kernels"][1]["kernel"] == "void unet::{anonymous}::conv3x3_split_k_reduce"
    table = cr.format_table(cr.collect(tmp_path))
    assert "ncu         conv3x3_forward/d1b/v4_tf32_mma: Duration 683.49 usecond, Compute (SM) Throughput 41.20 %" in table
    markdown = plot_results.render_markdown(cr.collect(tmp_path))
    assert "| conv3x3_forward | d1b | v4_tf32_mma | 683.49 usecond | 41.20 % | - | 168 register/thread | 12.41 % |" in markdown


def test_collect_reads_the_stall_reasons_of_the_raw_page(tmp_path):
    """ncu-raw.csv (ncu --import --csv --page raw: metric names, a row of units, one row per kernel)
    adds each kernel's stall reasons to its entry, largest first and zeros left out; the short
    table names the GEMM's largest three."""
    gemm = "void unet::conv3x3_v6_tf32_wgmma<unet::Conv3x3ForwardTapGemm, 128, 128, false, true>(T1)"
    (tmp_path / "ncu-details.csv").write_text(NCU_HEADER + "\n" + _ncu_row(
        0, gemm, "GPU Speed Of Light Throughput", "Duration", "usecond", "265.50") + "\n")
    (tmp_path / "ncu-cases.json").write_text(json.dumps(
        [{"op": "conv3x3_forward", "layer": "d3b", "precision": "tf32", "version": "v6_tf32_wgmma"}]))
    stall = lambda reason: f"smsp__average_warps_issue_stalled_{reason}_per_issue_active.ratio"  # noqa: E731
    names = ["ID", "Kernel Name", stall("barrier"), stall("long_scoreboard"), stall("wait"),
             stall("gmma"), stall("sleeping"), "lts__throughput.avg.pct_of_peak_sustained_elapsed"]
    lines = ["==PROF== Disconnected", ",".join(f'"{n}"' for n in names),
             ",".join(['""', '""'] + ['"inst"'] * 5 + ['"%"']),
             ",".join(f'"{v}"' for v in ["0", gemm, "0.9", "7.76", "1.22", "0.9", "0", "62.2"])]
    (tmp_path / "ncu-raw.csv").write_text("\n".join(lines) + "\n")
    kernel = cr.collect(tmp_path)["ncu"]["cases"][0]["kernels"][0]
    stalls = kernel["stall_cycles_per_instruction"]
    assert list(stalls) == ["long_scoreboard", "wait", "barrier", "gmma"] and stalls["long_scoreboard"] == 7.76
    table = cr.format_table(cr.collect(tmp_path))
    assert "Duration 265.50 usecond; stalled per instruction: long_scoreboard 7.76, wait 1.22, barrier 0.90" in table
    (tmp_path / "ncu-raw.csv").write_text("==ERROR== no report\n")
    assert "stall_cycles_per_instruction" not in cr.collect(tmp_path)["ncu"]["cases"][0]["kernels"][0]


def test_collect_ncu_without_a_header_gives_the_reason(tmp_path):
    (tmp_path / "ncu-details.csv").write_text("==ERROR== The application returned an error code (1).\n")
    assert "no CSV header" in cr.collect(tmp_path)["ncu"]["reason"]
    assert "ncu" not in cr.collect(tmp_path / "nothing-here")


def test_ncu_driver_profiles_each_mode_and_v4_beside_a_faster_tf32():
    import ncu_driver  # noqa: PLC0415

    class Hopper:
        PRECISIONS = ("fp32", "tf32", "bf16")

        @staticmethod
        def precision_version(p):
            return {"fp32": "v3_igemm", "tf32": "v6_tf32_wgmma", "bf16": "v5_bf16_mma"}[p]

    class Ampere(Hopper):
        @staticmethod
        def precision_version(p):
            return {"fp32": "v3_igemm", "tf32": "v4_tf32_mma", "bf16": "v5_bf16_mma"}[p]

    # the default mode (tf32) first: a run cut by ncu's time limit keeps the step people run
    assert ncu_driver.profiled_versions(Hopper) == [("tf32", "v6_tf32_wgmma"), ("bf16", "v5_bf16_mma"),
                                                    ("fp32", "v3_igemm"), ("tf32", "v4_tf32_mma")]
    assert [v for _, v in ncu_driver.profiled_versions(Ampere)] == ["v4_tf32_mma", "v5_bf16_mma", "v3_igemm"]


def test_summary_of_the_wgmma_step():
    """The tf32 step with v6_tf32_wgmma (impl ours_wgmma / ours_wgmma_graph) gets its own summary
    figures and its ratio to PyTorch's tf32 step, and leaves the tf32 mode's figures and version
    (v4) alone."""
    records = _synthetic_records()
    step = {"kind": "train_step", "shape": "x[1,1,572,572]", "flops": 902e9, "precision": "tf32",
            "version": "v6_tf32_wgmma"}
    records[:0] = [{**step, "id": "train_step/ours_wgmma/tf32", "impl": "ours_wgmma", "ms": 4.5},
                   {**step, "id": "train_step/ours_wgmma_graph/tf32", "impl": "ours_wgmma_graph", "ms": 3.0}]
    summary = cr.summarize(records, card=GPU)
    assert summary["wgmma_train_step_ms"] == {"eager": 4.5, "graph": 3.0}
    assert summary["wgmma_train_step_ratio"] == {"eager": 9.0 / 4.5, "graph": 9.0 / 3.0}
    assert summary["train_step_ms"]["tf32"] == 6.0 and summary["per_precision"]["tf32"]["version"] == "v4_tf32_mma"
    wgmma = next(r for r in records if r["id"] == "train_step/ours_wgmma/tf32")
    assert wgmma["ratio"] == 9.0 / 4.5 and wgmma["peer_precision"] == "tf32"
    assert cr.summarize(_synthetic_records(), card=GPU)["wgmma_train_step_ms"] is None


def test_summary_and_table_of_the_halo_step():
    """The tf32 step with v7_tf32_halo (impl ours_halo / ours_halo_graph) gets summary figures of
    its own, leaves the tf32 mode's version alone, and results.md lists it beside v6's step."""
    records = _synthetic_records()
    step = {"kind": "train_step", "shape": "x[1,1,572,572]", "flops": 902e9, "precision": "tf32",
            "version": "v7_tf32_halo"}
    records[:0] = [{**step, "id": "train_step/ours_halo/tf32", "impl": "ours_halo", "ms": 3.6},
                   {**step, "id": "train_step/ours_halo_graph/tf32", "impl": "ours_halo_graph", "ms": 3.0},
                   {**step, "id": "train_step/ours_wgmma/tf32", "impl": "ours_wgmma", "ms": 4.5,
                    "version": "v6_tf32_wgmma"}]
    summary = cr.summarize(records, card=GPU)
    assert summary["halo_train_step_ms"] == {"eager": 3.6, "graph": 3.0}
    assert summary["halo_train_step_ratio"] == {"eager": 9.0 / 3.6, "graph": 9.0 / 3.0}
    assert summary["wgmma_train_step_ms"] == {"eager": 4.5, "graph": None}
    assert summary["per_precision"]["tf32"]["version"] == "v4_tf32_mma"
    halo = next(r for r in records if r["id"] == "train_step/ours_halo/tf32")
    assert halo["ratio"] == 9.0 / 3.6 and halo["peer_precision"] == "tf32"
    lines = plot_results.kernel_steps_table({"summary": summary})
    assert "| v7_tf32_halo | tf32 | 6.00 | 3.60 | 3.00 | 2.50 | 3.00 |" in lines
    assert "| v6_tf32_wgmma | tf32 | 6.00 | 4.50 | - | 2.00 | - |" in lines
    assert not any("v8_bf16_halo" in line for line in lines)
    bf16_step = {**step, "precision": "bf16", "version": "v8_bf16_halo", "ms": 2.0,
                 "id": "train_step/ours_halo_bf16/bf16", "impl": "ours_halo_bf16"}
    summary = cr.summarize(_synthetic_records() + [bf16_step], card=GPU)
    bf16_torch = cr._by_precision(_synthetic_records(), "train_step", "torch")["bf16"]
    assert summary["halo_bf16_train_step_ms"] == {"eager": 2.0, "graph": None}
    assert summary["halo_bf16_train_step_ratio"] == {"eager": bf16_torch / 2.0}
    assert summary["per_precision"]["bf16"]["version"] == "v5_bf16_mma"
    assert plot_results.kernel_steps_table({"summary": cr.summarize(_synthetic_records(), card=GPU)}) == []


def test_commit_given_where_the_checkout_has_no_git(tmp_path):
    (tmp_path / "meta.txt").write_text(f"commit={COMMIT}\ncommit_source=GPU_CHECK_COMMIT\n"
                                       "git_error=git rev-parse HEAD failed (see info.log)\n")
    results = cr.collect(tmp_path)
    assert results["commit"] == COMMIT and results["dirty"] is None
    assert results["commit_source"] == "GPU_CHECK_COMMIT" and "rev-parse" in results["commit_reason"]
    (tmp_path / "meta.txt").write_text("commit=not-a-hash\n")
    assert cr.collect(tmp_path)["commit"] is None


def test_non_finite_numbers_become_null(tmp_path):
    results = {"commit": COMMIT, "gpu": GPU, "benchmarks": [{"ms": float("nan"), "ratio": float("inf")}]}
    path = cr.write_results(tmp_path, results)
    data = json.loads(path.read_text())
    assert data["benchmarks"] == [{"ms": None, "ratio": None}]


def test_gpu_slug():
    assert cr.gpu_slug("NVIDIA H100 80GB HBM3") == "h100-80gb-hbm3"
    assert cr.gpu_slug("NVIDIA H200") == "h200"
    assert cr.gpu_slug(None) == "unknown-gpu"


# ------------------------------------------------------------------------------------------------
# The chart and the markdown table
# ------------------------------------------------------------------------------------------------


def _results_dir(tmp_path: Path) -> tuple[Path, Path]:
    """A results folder with the synthetic run and an older copy of it; returns (folder, newest)."""
    out = _synthetic_outdir(tmp_path)
    results_dir = tmp_path / "results"
    results_dir.mkdir()
    newest = cr.write_results(out, cr.collect(out), results_dir / "results-new.json")
    older = json.loads(newest.read_text())
    older["date"] = "2025-01-01T00:00:00Z"
    older["commit"] = "f" * 40
    (results_dir / "results-old.json").write_text(json.dumps(older))
    return results_dir, newest


def test_latest_results_prefers_a_run_with_benchmarks(tmp_path):
    """A newer check without its bench stage (tests and a profile only) does not blank the table:
    the newest run with benchmark figures is chosen, and the newest of all only where none has any."""
    results_dir, newest = _results_dir(tmp_path)
    no_bench = json.loads(newest.read_text())
    no_bench["date"] = "2099-01-01T00:00:00Z"
    no_bench["benchmarks"] = []
    (results_dir / "results-tests-only.json").write_text(json.dumps(no_bench))
    assert plot_results.latest_results(results_dir) == newest
    for path in results_dir.glob("*.json"):
        if path.name != "results-tests-only.json":
            path.unlink()
    assert plot_results.latest_results(results_dir).name == "results-tests-only.json"


def test_latest_results_prefers_a_run_with_per_op_figures(tmp_path):
    """A newer check whose bench stage ran out of time before the per-op cases (train steps only)
    leaves the table and chart to the older complete run; it is chosen over runs without
    benchmarks."""
    results_dir, newest = _results_dir(tmp_path)
    assert any(b.get("kind") == "op" and b.get("peer_ms") for b in json.loads(newest.read_text())["benchmarks"])
    cut = json.loads(newest.read_text())
    cut["date"] = "2099-01-01T00:00:00Z"
    cut["benchmarks"] = [b for b in cut["benchmarks"] if b.get("kind") != "op"]
    assert cut["benchmarks"]
    (results_dir / "results-cut.json").write_text(json.dumps(cut))
    assert plot_results.latest_results(results_dir) == newest
    for path in results_dir.glob("*.json"):
        if path.name != "results-cut.json":
            path.unlink()
    no_bench = dict(cut, date="2100-01-01T00:00:00Z", benchmarks=[])
    (results_dir / "results-tests-only.json").write_text(json.dumps(no_bench))
    assert plot_results.latest_results(results_dir).name == "results-cut.json"


def test_history_orders_the_runs_with_a_timed_step(tmp_path):
    """plot_history: one row per results JSON with a timed training step, by date; ratios from the
    run's own PyTorch figures; a chart and a table; no such run: exit 1 with the reason."""
    def run(name, date, commit, gpu, tf32, torch_tf32, **extra):
        summary = {"train_step_ms": {"tf32": tf32, "fp32": None}, "torch_train_step_ms": {"tf32": torch_tf32}}
        (tmp_path / name).write_text(json.dumps(dict(commit=commit, date=date, gpu=gpu, summary=summary, **extra)))

    run("results-b.json", "2026-02-01T00:00:00Z", "b" * 40, "NVIDIA H200", 10.0, 8.0)
    run("results-a.json", "2026-01-01T00:00:00Z", "a" * 40, GPU, 20.0, 10.0, dirty=True)
    (tmp_path / "results-tests-only.json").write_text(json.dumps({"commit": "c" * 40, "summary": {}}))
    (tmp_path / "broken.json").write_text("{")
    rows = plot_history.history(tmp_path)
    assert [(r["commit"], r["gpu"], r["dirty"]) for r in rows] == [("aaaaaaa", "H100", True), ("bbbbbbb", "H200", False)]
    assert rows[0]["tf32"]["ratio"] == pytest.approx(0.5) and rows[1]["tf32"]["ratio"] == pytest.approx(0.8)
    assert rows[0]["fp32"] == {"ms": None, "torch_ms": None, "ratio": None}
    table = plot_history.render_markdown(rows)
    assert "| `aaaaaaa` (uncommitted changes) | H100 | 2026-01-01 00:00 | - / -, - | 20.00 / 10.00, 0.50x |" in table
    pytest.importorskip("matplotlib")
    png, md = tmp_path / "h.png", tmp_path / "h.md"
    assert plot_history.main(["--results-dir", str(tmp_path), "--png", str(png), "--markdown", str(md)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and md.read_text() == table
    assert plot_history.main(["--results-dir", str(tmp_path / "none"), "--png", str(png)]) == 1


def test_plot_renders_png_and_markdown(tmp_path):
    pytest.importorskip("matplotlib")
    results_dir, newest = _results_dir(tmp_path)
    assert plot_results.latest_results(results_dir) == newest

    png, md = tmp_path / "chart.png", tmp_path / "table.md"
    assert plot_results.main(["--results-dir", str(results_dir), "--png", str(png), "--markdown", str(md)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    table = md.read_text()
    assert "| tf32 | v4_tf32_mma | 6.00 | 5.00 | default (TF32) | 9.00 | 1.50x | >= 1.5x: **met** |" in table
    assert "| bf16 | 1.50 | 10.00 | 6.67x | <= 2.0 ms: **met** |" in table
    assert "| conv3x3_forward | d1b | bf16 (v5_bf16_mma) |" in table
    assert "| d1b | 2.4 | 4.8 | 11.9 | 47.6 | 79.3 |" in table          # the version progression
    assert "GPU tests: 2 passed, 1 failed" in table


def test_plot_panels_from_the_records():
    results = {"benchmarks": _synthetic_records()}
    progression = plot_results.version_progression(results)
    assert list(progression) == ["d1b"] and list(progression["d1b"]) == list(VERSION_MS)
    assert progression["d1b"]["v3_igemm"] == pytest.approx(D1B_FLOPS / 2e-3 / 1e12)
    layers = {row["layer"]: row for row in plot_results.conv_layers(results)}
    fp32 = layers["d1b"]["fp32"]
    assert fp32["ours"] == pytest.approx(7.5) and fp32["peer"] == pytest.approx(3.3) and fp32["complete"]
    assert layers["d1b"]["bf16"]["peer"] == pytest.approx(0.15)


def test_plot_without_results_fails_cleanly(tmp_path, capsys):
    assert plot_results.main(["--results-dir", str(tmp_path)]) == 1
    assert "no results JSON" in capsys.readouterr().err


README_TEXT = """# project

## Performance

Some words.

{start}
old table
{end}

## Next section

untouched
"""


def _readme(tmp_path: Path) -> Path:
    path = tmp_path / "README.md"
    path.write_text(README_TEXT.format(start=plot_results.MARK_START, end=plot_results.MARK_END))
    return path


def test_readme_table_from_a_results_json(tmp_path):
    pytest.importorskip("matplotlib")
    results_dir, newest = _results_dir(tmp_path)
    readme = _readme(tmp_path)
    png = tmp_path / "plots" / "results.png"
    assert plot_results.main(["--results-dir", str(results_dir), "--png", str(png),
                              "--markdown", str(tmp_path / "plots" / "results.md"), "--readme", str(readme)]) == 0
    text = readme.read_text()
    head, rest = text.split(plot_results.MARK_START)
    section, tail = rest.split(plot_results.MARK_END)
    assert head == "# project\n\n## Performance\n\nSome words.\n\n"
    assert tail == "\n\n## Next section\n\nuntouched\n"
    # the newest run's card, commit and date
    assert f"**{GPU}**" in section and f"`{COMMIT[:10]}`" in section and "2026-01-02T03:04:05Z" in section
    assert "ffffffffff" not in section and "old table" not in section
    assert "| fp32 | v3_igemm | 40.00 | 38.00 | TF32 off | 30.00 | 0.75x | >= 1.0x: not met |" in section
    assert "| bf16 | 1.50 | 10.00 | 6.67x | <= 2.0 ms: **met** |" in section
    assert "![benchmark chart of this run](plots/results.png)" in section
    assert "targets are set for an H100" not in section
    # rendering again changes nothing
    assert plot_results.update_readme(readme, plot_results.render_readme_section(
        json.loads(newest.read_text()), newest, "plots/results.png")) is False


def test_readme_table_without_a_run(tmp_path, capsys):
    readme = _readme(tmp_path)
    empty = tmp_path / "results"
    empty.mkdir()
    assert plot_results.main(["--results-dir", str(empty), "--readme", str(readme)]) == 0
    text = readme.read_text()
    section = text.split(plot_results.MARK_START)[1].split(plot_results.MARK_END)[0]
    assert "No GPU run recorded yet" in section and "old table" not in section
    assert text.endswith("## Next section\n\nuntouched\n")
    assert "no GPU run recorded yet" in capsys.readouterr().out


def test_readme_table_other_card_and_missing_figures():
    results = {"gpu": "NVIDIA H200", "commit": COMMIT, "date": "2026-01-02T03:04:05Z",
               "summary": cr.summarize([r for r in _synthetic_records() if r["kind"] != "infer"], "NVIDIA H200")}
    section = plot_results.render_readme_section(results)
    assert "The targets are set for an H100; this run is on NVIDIA H200." in section
    assert "| bf16 | - | - | - | <= 2.0 ms: not measured |" in section
    assert results["summary"]["targets"]["infer_512_bf16_ms"]["met"] is None
    assert "H100" in results["summary"]["targets"]["train_tf32_vs_torch_default"]["note"]


def test_readme_markers_must_be_there_once(tmp_path):
    path = tmp_path / "README.md"
    for text in ("no markers\n", f"{plot_results.MARK_END}\n{plot_results.MARK_START}\n",
                 f"{plot_results.MARK_START}\n{plot_results.MARK_START}\n{plot_results.MARK_END}\n"):
        path.write_text(text)
        with pytest.raises(ValueError, match="must hold"):
            plot_results.update_readme(path, "table")
        assert path.read_text() == text


def test_repository_readme_shows_the_newest_results():
    """README.md's performance table is the one rendered from the newest bench/results JSON."""
    text = (ROOT / "README.md").read_text()
    assert text.count(plot_results.MARK_START) == 1 and text.count(plot_results.MARK_END) == 1
    section = text.split(plot_results.MARK_START)[1].split(plot_results.MARK_END)[0]
    try:
        newest = plot_results.latest_results(plot_results.RESULTS_DIR)
    except FileNotFoundError:
        assert section.strip() == plot_results.render_readme_section(None).strip()
        return
    commit = json.loads(newest.read_text()).get("commit") or "unknown"
    assert f"`{commit[:10]}`" in section, "run python3 bench/plot_results.py --readme"


# ------------------------------------------------------------------------------------------------
# Layer table, ceilings and timing arithmetic
# ------------------------------------------------------------------------------------------------


def _performance_md_gflops() -> dict[str, float]:
    doc = ROOT.parent / "shared" / "docs" / "PERFORMANCE.md"
    if not doc.is_file():
        pytest.skip(f"{doc} not found")
    rows = re.findall(r"^\| (\w+) \| [^|]+ \| \d+ \| ([\d.]+) \|$", doc.read_text(), flags=re.M)
    return {name: float(gflop) for name, gflop in rows}


def test_layer_table_matches_performance_md():
    net = benchlib.network()
    expected = _performance_md_gflops()
    assert [layer.name for layer in net.layers] == list(expected)
    for layer in net.layers:
        assert layer.flops / 1e9 == pytest.approx(expected[layer.name], abs=0.006), layer.name
    assert net.forward_flops() / 1e9 == pytest.approx(300.9, abs=0.05)
    assert net.train_step_flops() / 1e9 == pytest.approx(902, abs=1)
    assert net.dropout_layers == ("d4b", "b2")
    assert [(p.name, p.channels, p.in_hw) for p in net.pools][0] == ("pool1", 64, 568)
    assert [(c.name, c.hw, c.skip_hw) for c in net.concats][-1] == ("cat4", 392, 568)


def test_op_cases_cover_a_training_step():
    cases = op_cases.op_cases(benchlib.network())
    ids = [c.id for c in cases]
    assert len(ids) == len(set(ids)) == 121                # bench/README.md counts them
    from unet_cuda.ops import OP_NAMES  # noqa: PLC0415

    assert {c.op for c in cases} == set(OP_NAMES)
    assert "conv3x3_backward_data-d1a" not in ids          # the input needs no gradient
    # the decoder's first convolution of each level reads [up, crop of skip] in place
    assert sum(c.op == "conv3x3_forward" for c in cases) == 14
    fused = [c for c in cases if c.op == "conv3x3_concat_forward"]
    assert [c.layer for c in fused] == ["u1a", "u2a", "u3a", "u4a"]
    assert fused[-1].shape == "up[1,64,392,392] skip[1,64,568,568] w[64,128,3,3] -> y[1,64,390,390]"
    assert fused[-1].flops == benchlib.network().layer("u4a").flops
    # crop + concat, the update one parameter at a time and dropout through a stored mask are
    # timed, but a step in the precision modes does not run them
    assert {c.op for c in cases if not c.in_step} == {"crop_concat_forward", "crop_concat_backward",
                                                      "sgd_momentum_update_", "dropout_mask",
                                                      "dropout_forward", "dropout_backward",
                                                      "accumulate_"}
    # the skip maps' sums happen in the pools' backward, which add into the concatenation's part
    assert all(c.dims.get("accumulate") for c in cases if c.op == "maxpool2x2_backward")
    # by default the ReLU's backward runs on its own (unet_cuda.functional.FUSE_RELU_BACKWARD_DEFAULT)
    assert not any(c.dims.get("relu_mask") or c.dims.get("skip_relu_mask") for c in cases)
    for op in ("sgd_momentum_update_", "sgd_momentum_update_multi_"):
        sgd = next(c for c in cases if c.op == op)
        assert sum(int(np.prod(s)) for s in sgd.param_shapes) == 31_030_658
    assert all((c.flops is None) != (c.nbytes is None) for c in cases)


def test_op_cases_with_the_relu_backward_fused():
    cases = op_cases.op_cases(benchlib.network(), relu_fused=True)
    assert len(cases) == 121
    # the ReLU's backward runs on its own only where dropout follows the ReLU (d4b, b2); everywhere
    # else the consumers' backward-data ops (and the pools' backward) take it as their relu_mask
    relu = [c for c in cases if c.op == "relu_backward"]
    assert len(relu) == 18 and [c.layer for c in relu if c.in_step] == ["d4b", "b2"]
    masked = {c.layer for c in cases if c.op.endswith("_backward_data") or c.op == "maxpool2x2_backward"
              if c.dims.get("relu_mask") or c.dims.get("skip_relu_mask")}
    assert masked == {"d1b", "d2b", "d3b", "d4b", "b2", "u1b", "u2b", "u3b", "u4b",  # conv3x3 data
                      "up2", "up3", "up4", "out",                                    # after a "b"
                      "u2a", "u3a", "u4a",                                           # their skips
                      "pool1", "pool2", "pool3"}
    data = {c.layer: c for c in cases if c.op.endswith("_backward_data")}
    assert not data["up1"].dims["relu_mask"] and not data["u1a"].dims["skip_relu_mask"]
    assert data["u4a"].dims["skip_relu_mask"] and "relu_mask" not in data["u4a"].dims  # up: no ReLU
    assert all(c.peer_in_step for c in cases if c.op in ("relu_backward", "accumulate_"))


def test_conv3x3_versions_per_precision():
    # the table of unet_cuda.ops.cuda (it needs CuPy to import): read from its source
    import ast  # noqa: PLC0415
    tree = ast.parse((ROOT / "unet_cuda" / "ops" / "cuda.py").read_text())
    table = next(ast.literal_eval(node.value) for node in tree.body if isinstance(node, ast.AnnAssign)
                 and getattr(node.target, "id", None) == "CONV3X3_VERSION_PRECISION")
    assert [benchlib.conv3x3_precision(v, table) for v in op_cases.CONV3X3_VERSIONS] == \
        ["fp32", "fp32", "fp32", "tf32", "bf16", "tf32", "tf32", "bf16", "fp32"]
    assert benchlib.conv3x3_precision("v10_other", table) == "fp32"
    assert tuple(benchlib.TORCH_SETTINGS) == benchlib.PRECISIONS == cr.PRECISIONS
    modes = {"fp32": "v3_igemm", "tf32": "v4_tf32_mma", "bf16": "v5_bf16_mma"}

    cases = op_cases.op_cases(benchlib.network())
    expanded = op_cases.with_conv3x3_versions(cases, tuple(modes.values()))
    conv = [c for c in cases if c.op.startswith(("conv3x3_", "upconv2x2_"))]
    assert len(conv) == (3 * 14 - 1) + 3 * 4 + 3 * 4   # 3x3 (d1a: no dx), concatenated, up-convolutions
    assert len(expanded) == len(cases) + 2 * len(conv)
    d1b = [c for c in expanded if c.op == "conv3x3_forward" and c.layer == "d1b"]
    assert [c.version for c in d1b] == list(modes.values())
    assert [c.id for c in d1b] == [f"conv3x3_forward-d1b-{v}" for v in modes.values()]
    assert len({c.seed for c in d1b}) == 1              # every version (and the peer) sees one input
    up1 = [c for c in expanded if c.op == "upconv2x2_backward_weight" and c.layer == "up1"]
    assert [c.version for c in up1] == list(modes.values())
    assert all(c.version is None for c in expanded if not c.op.startswith(("conv3x3_", "upconv2x2_")))
    versions = op_cases.conv3x3_version_cases(benchlib.network())
    assert len(versions) == 4 * 3 * 9 and {c.layer for c in versions} == set(op_cases.CONV3X3_VERSION_LAYERS)


def test_ceilings():
    assert benchlib.ceilings_for("NVIDIA H100 80GB HBM3").hbm_tbps == 3.35
    assert benchlib.ceilings_for("NVIDIA H200").hbm_tbps == 4.8
    unknown = benchlib.ceilings_for("NVIDIA A100-SXM4-40GB")
    assert unknown.assumed and "A100" in unknown.note
    assert benchlib.ceilings_for("NVIDIA H100 PCIe").assumed
    fig = benchlib.figures(1.0, flops=66.9e9, ceilings=benchlib.H100_SXM)
    assert fig["tflops"] == pytest.approx(66.9) and fig["pct_of_ceiling"] == pytest.approx(100.0)
    fig = benchlib.figures(2.0, nbytes=3.35e9, ceilings=benchlib.H100_SXM, precision="fp32")
    assert fig["gbps"] == pytest.approx(1675.0) and fig["pct_of_ceiling"] == pytest.approx(50.0)
    assert benchlib.figures(None, flops=1.0, ceilings=benchlib.H200) == {}


class _FakeDevice:
    """A device whose clock advances by a fixed time per call of the timed function."""

    def __init__(self, ms_per_call: float):
        self.ms_per_call = ms_per_call
        self.clock = 0.0
        self.syncs = 0
        self.flushes = 0

    def tick(self):
        self.clock += self.ms_per_call

    def event(self):
        return {}

    def record(self, event):
        event["t"] = self.clock

    def elapsed_ms(self, start, end):
        return end["t"] - start["t"]

    def synchronize(self):
        self.syncs += 1

    def flush(self):
        self.flushes += 1


def test_time_gpu_sizes_repeats_to_the_budget(monkeypatch):
    monkeypatch.delenv("UNET_BENCH_SCALE", raising=False)
    fast = _FakeDevice(0.5)
    timing = benchlib.time_gpu(fast.tick, fast, budget_ms=10, min_repeats=3, max_repeats=50)
    assert timing.repeats == 20 and timing.median_ms == pytest.approx(0.5)
    assert fast.flushes == 21   # the sizing call and every repeat
    slow = _FakeDevice(40.0)
    assert benchlib.time_gpu(slow.tick, slow, budget_ms=10, min_repeats=3).repeats == 3
    monkeypatch.setenv("UNET_BENCH_SCALE", "0.5")
    assert benchlib.time_gpu(fast.tick, fast, budget_ms=10, min_repeats=3).repeats == 10


def test_records_go_to_the_records_file(tmp_path, monkeypatch):
    path = tmp_path / "records.jsonl"
    monkeypatch.setenv(benchlib.RECORD_ENV, str(path))

    class Bench:
        extra_info: dict = {}

    bench = Bench()
    benchlib.record(bench, {"id": "op/x/y", "ms": 1.5, "skip_me": None})
    assert bench.extra_info == {"id": "op/x/y", "ms": 1.5}
    assert json.loads(path.read_text()) == {"id": "op/x/y", "ms": 1.5}


def test_deadline_skips(monkeypatch):
    import time  # noqa: PLC0415

    monkeypatch.setenv(benchlib.DEADLINE_ENV, str(time.time() - 1))
    with pytest.raises(pytest.skip.Exception, match="time budget"):
        benchlib.skip_if_out_of_time(pytest)
    monkeypatch.setenv(benchlib.DEADLINE_ENV, str(time.time() + 3600))
    benchlib.skip_if_out_of_time(pytest)


# ------------------------------------------------------------------------------------------------
# The benchmark cases, run on the NumPy reference (and against PyTorch where it is installed)
# ------------------------------------------------------------------------------------------------

SMALL_NET = dict(tile=188, base_channels=2)   # the paper's depth, few channels: fast on a CPU


def _arrays(result) -> list[np.ndarray]:
    if result is None:
        return []
    if isinstance(result, (tuple, list)):
        return [a for item in result for a in _arrays(item)]
    if hasattr(result, "detach"):
        return [result.detach().float().cpu().numpy()]
    return [np.asarray(result)]


def test_op_cases_call_the_reference():
    from unet_cuda import ops  # noqa: PLC0415

    for case in op_cases.op_cases(benchlib.network(**SMALL_NET)):
        inputs = op_cases.make_inputs(case, np, ops)
        result = op_cases.ours(case, inputs, ops)()
        for a in _arrays(result):
            assert np.isfinite(a).all(), case.id


def test_peers_compute_what_our_ops_compute():
    torch = pytest.importorskip("torch")
    from unet_cuda import ops  # noqa: PLC0415

    skip = {"dropout_mask", "accumulate_", "sgd_momentum_update_", "sgd_momentum_update_multi_",
            # random or in place: run only
            "augment_warp"}                                            # another cubic: run only
    for case in op_cases.op_cases(benchlib.network(**SMALL_NET)):
        inputs = op_cases.make_inputs(case, np, ops)
        ours = _arrays(op_cases.ours(case, inputs, ops)())
        theirs = _arrays(op_cases.peer(case, inputs, torch)())
        if case.op in skip:
            continue
        if case.op == "maxpool2x2_forward":          # our argmax is uint8, PyTorch's a flat int64 index
            ours, theirs = ours[:1], theirs[:1]
        if case.op == "upconv2x2_backward_weight":   # PyTorch's weight layout is [Cin, Cout, 2, 2]
            theirs[0] = theirs[0].transpose(1, 0, 2, 3)
        assert len(ours) == len(theirs), case.id
        for a, b in zip(ours, theirs):
            assert a.shape == b.shape, case.id
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=case.id)
        if case.compute_bound:
            # the bf16 peer: bf16 copies of the operands in channels_last, the same work
            theirs = _arrays(op_cases.peer(case, inputs, torch, "bf16")())
            if case.op == "upconv2x2_backward_weight":
                theirs[0] = theirs[0].transpose(1, 0, 2, 3)
            for a, b in zip(ours, theirs):
                assert a.shape == b.shape, case.id
                assert np.linalg.norm(a - b) <= 2e-2 * np.linalg.norm(a), case.id


def test_torch_unet_matches_our_network():
    """The PyTorch peer is our network: same loss, same SGD step (small network, CPU, float32)."""
    torch = pytest.importorskip("torch")
    import unet_cuda as u  # noqa: PLC0415
    from unet_cuda import functional as F  # noqa: PLC0415
    from torch_unet import CaffeSGD, TorchUNet, weighted_softmax_loss  # noqa: PLC0415

    net = u.UNet(base_channels=4, depth=3, dropout=0.0, seed=3)
    tile = 60
    out = net.output_size(tile)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 1, tile, tile), dtype=np.float32)
    labels = (rng.random((1, out, out)) < 0.5).astype(np.int32)
    weights = rng.uniform(0.5, 10, (1, out, out)).astype(np.float32)
    model = TorchUNet(base_channels=4, depth=3, dropout=0.0).load_unet_state(net.state_dict())
    assert set(model.unet_state()) == set(net.state_dict())
    np.testing.assert_array_equal(model.unet_state()["up0.upconv.weight"], net.state_dict()["up0.upconv.weight"])

    ours_opt = u.SGD(net.parameters(), lr=0.01, momentum=0.99)
    torch_opt = CaffeSGD(model.parameters(), lr=0.01, momentum=0.99)
    for _ in range(2):
        loss = F.softmax_cross_entropy(net(u.Tensor(x)), labels, weights)
        ours_opt.zero_grad()
        loss.backward()
        ours_opt.step()
        torch_opt.zero_grad()
        peer = weighted_softmax_loss(model(torch.from_numpy(x)), torch.from_numpy(labels), torch.from_numpy(weights))
        peer.backward()
        torch_opt.step()
        assert float(loss.data) == pytest.approx(float(peer.item()), rel=1e-5)
    theirs = model.unet_state()
    for name, value in net.state_dict().items():
        np.testing.assert_allclose(value, theirs[name], rtol=1e-4, atol=1e-6, err_msg=name)


# ------------------------------------------------------------------------------------------------
# The benchmark modules skip cleanly without a GPU
# ------------------------------------------------------------------------------------------------


def test_benchmarks_skip_cleanly_without_a_gpu():
    reason = benchlib.cuda_skip_reason() or benchlib.torch_skip_reason()
    if reason is None:
        pytest.skip("this machine can run the GPU benchmarks")
    result = subprocess.run([sys.executable, "-m", "pytest", "bench/", "-q", "-p", "no:cacheprovider"],
                            capture_output=True, text=True, cwd=ROOT, timeout=300)
    text = result.stdout + result.stderr
    assert result.returncode in (0, 5), text[-3000:]   # 5: every module skipped, nothing collected
    assert not re.search(r"^(ERROR|FAILED)\b|\b\d+ (errors?|failed)\b", text, flags=re.M), text[-3000:]
    assert text.count("GPU benchmarks skipped:") >= 2, text[-3000:]


def test_isbi_run_writes_a_summary(tmp_path):
    """bench/isbi_run.py on the CPU with a tiny network and a tiny ISBI-layout stack."""
    import json
    import subprocess
    import sys

    import numpy as np
    import tifffile

    from unet_cuda.synthetic import make_em_like

    data = tmp_path / "isbi"
    data.mkdir()
    images, instances = make_em_like(5, size=48, seed=1)
    tifffile.imwrite(data / "train-volume.tif", (images * 255).astype(np.uint8), photometric="minisblack")
    tifffile.imwrite(data / "train-labels.tif", ((instances > 0) * 255).astype(np.uint8), photometric="minisblack")
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "isbi_run.py"), "--data", str(data), "--out", str(out),
         "--minutes", "0.00001", "--device", "cpu", "--train-args", "--base-channels 2 --depth 2 --tile 36"],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((out / "isbi.json").read_text())
    assert summary["exit_code"] == 0 and summary["steps"] == 1
    assert set(summary["validation"]) >= {"pixel_error", "rand_error", "iou", "dice"}
    assert summary["config"]["depth"] == 2 and summary["dataset"] == "isbi"
