"""Assembles the one results JSON of a GPU check from the files bench/gpu_check.sh leaves in the
output folder given as argument, and prints a short table.

    python3 bench/collect_results.py OUTDIR            # writes OUTDIR/results-<commit>-<gpu>.json
    python3 bench/collect_results.py OUTDIR --no-table

What it reads (each is optional; whatever is missing becomes null with the reason):

    meta.txt                  commit=, commit_source=, dirty=, date=, git_error= (key=value lines)
    gpu-info.csv              "# field,field,..." then nvidia-smi's values; gpu-info-after.csv likewise
    env.json                  versions and settings (python3 bench/benchlib.py)
    stages.tsv                stage, exit status, seconds, time limit, note (one line per stage)
    gpu-tests.xml             JUnit XML of the GPU tests; bench-tests.xml of the benchmark run
    sanitizer-<tool>.log      compute-sanitizer output for memcheck, racecheck, initcheck, synccheck
    benchmarks.json           pytest-benchmark JSON; its extra_info holds our figures
    bench-records.jsonl       the same records, one per line, written as each benchmark ends
    isbi.json                 the result of an ISBI training run, copied in as it is
    profile-<precision>.json  ``python -m unet_cuda.profile --json``: one training step op by op

The summary gives the headline figures per precision mode (our training step, eager and as a CUDA
graph, against PyTorch in the paired setting; the 512x512 prediction; the per-op sums) and where
each target stands (``TARGETS``: value, goal, met or not, the card).

Nothing here runs on or needs a GPU, and no figure is ever made up: a number is in the JSON only if
a file in the folder says it; a target whose figure is missing is null, not met or unmet.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import xml.etree.ElementTree as ET
from dataclasses import asdict
from pathlib import Path

from benchlib import PRECISIONS, ceilings_for
from benchlib import TORCH_SETTINGS as TORCH_SETTING_NAMES

SCHEMA = 2
SANITIZER_TOOLS = ("memcheck", "racecheck", "initcheck", "synccheck")

# The targets (572 tile, batch 1; training ratios are PyTorch's time over ours, in the same run).
TARGET_CARD = "H100"
TARGETS = (
    {"name": "train_tf32_vs_torch_default", "kind": "train_ratio", "precision": "tf32",
     "comparison": ">=", "goal": 1.5, "unit": "x",
     "description": "training step, ours tf32 vs PyTorch default (TF32): at least 1.5x faster"},
    {"name": "train_fp32_vs_torch_fp32", "kind": "train_ratio", "precision": "fp32",
     "comparison": ">=", "goal": 1.0, "unit": "x",
     "description": "training step, ours fp32 vs PyTorch with TF32 off: at least as fast"},
    {"name": "train_bf16_vs_torch_bf16", "kind": "train_ratio", "precision": "bf16",
     "comparison": ">=", "goal": 1.2, "unit": "x",
     "description": "training step, ours bf16 vs PyTorch bf16 autocast + channels_last: at least 1.2x faster"},
    {"name": "infer_512_bf16_ms", "kind": "infer_ms", "precision": "bf16",
     "comparison": "<=", "goal": 2.0, "unit": "ms",
     "description": "512x512 overlap-tile prediction in bf16: at most 2 ms"},
)
PYTEST_STAGES = ("gpu-tests", "bench")

_ERROR_SUMMARY = re.compile(r"ERROR SUMMARY:\s*(\d+)\s+errors?", re.IGNORECASE)
_RACECHECK_SUMMARY = re.compile(
    r"RACECHECK SUMMARY:\s*(\d+)\s+hazards?\s+displayed\s*\((\d+)\s+errors?,\s*(\d+)\s+warnings?\)",
    re.IGNORECASE)
_DRIVER_SUMMARY = re.compile(r"SANITIZER DRIVER:\s*(\d+)\s+calls,\s*(\d+)\s+failed")


# ------------------------------------------------------------------------------------------------
# Small readers
# ------------------------------------------------------------------------------------------------


def read_meta(path: Path) -> dict:
    """``key=value`` lines; missing file -> {}."""
    meta: dict = {}
    if not path.is_file():
        return meta
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            meta[key.strip()] = value.strip()
    return meta


def read_gpu_info(path: Path) -> dict | None:
    """nvidia-smi ``--format=csv,noheader,nounits`` values under a ``# field,...`` line (first GPU)."""
    if not path.is_file():
        return None
    fields: list[str] = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        line = line.strip()
        if not line:
            continue
        if line.startswith("#"):
            fields = [f.strip() for f in line[1:].split(",") if f.strip()]
            continue
        values = [v.strip() for v in line.split(",")]
        if fields and len(values) == len(fields):
            return {f: _number_or_text(v) for f, v in zip(fields, values)}
    return None


def _number_or_text(value: str):
    if value in ("", "[N/A]", "N/A", "[Not Supported]"):
        return None
    try:
        number = float(value)
    except ValueError:
        return value
    return int(number) if number.is_integer() and "." not in value else number


def read_json(path: Path):
    """(value, None) or (None, reason)."""
    if not path.is_file():
        return None, f"{path.name} not found"
    try:
        return json.loads(path.read_text(encoding="utf-8")), None
    except (OSError, ValueError) as exc:
        return None, f"{path.name} is unreadable ({exc.__class__.__name__}: {exc})"


def read_stages(path: Path) -> dict:
    """``stage<TAB>rc<TAB>seconds<TAB>limit<TAB>note`` lines -> {stage: {...}}."""
    stages: dict = {}
    if not path.is_file():
        return stages
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        parts = line.split("\t")
        if len(parts) < 2 or not parts[0]:
            continue
        name, rc = parts[0], parts[1]
        entry: dict = {"rc": int(rc) if rc.lstrip("-").isdigit() else None}
        if len(parts) > 2 and parts[2].isdigit():
            entry["seconds"] = int(parts[2])
        if len(parts) > 3 and parts[3].isdigit():
            entry["limit_s"] = int(parts[3])
        note = parts[4] if len(parts) > 4 else ""
        if entry["rc"] is None:
            entry["status"] = "skipped"
        elif entry["rc"] == 0:
            entry["status"] = "ok"
        elif entry["rc"] in (124, 137):
            entry["status"] = "timeout"
        elif entry["rc"] == 5 and name in PYTEST_STAGES:
            entry["status"] = "no tests"   # pytest's exit status when nothing was collected
        else:
            entry["status"] = "failed"
        if note:
            entry["note"] = note
        stages[name] = entry
    return stages


# ------------------------------------------------------------------------------------------------
# JUnit XML -> test counts
# ------------------------------------------------------------------------------------------------


def parse_junit(path: Path) -> dict:
    """``{"passed", "failed", "skipped", "errors", "total"}`` from a JUnit XML file.

    Each ``<testcase>`` counts once: failed if it has a ``<failure>``, else an error if it has an
    ``<error>`` (pytest writes collection and fixture errors so), else skipped if ``<skipped>``,
    else passed. A missing or unreadable file gives null counts and a ``reason``.
    """
    empty = {"passed": None, "failed": None, "skipped": None, "errors": None, "total": None}
    if not path.is_file():
        return {**empty, "reason": f"{path.name} not found (the stage did not run or did not finish)"}
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as exc:
        return {**empty, "reason": f"{path.name} is unreadable ({exc})"}
    counts = {"passed": 0, "failed": 0, "skipped": 0, "errors": 0}
    failed_names: list[str] = []
    for case in root.iter("testcase"):
        tags = {child.tag for child in case}
        name = f"{case.get('classname', '')}::{case.get('name', '')}".strip(":")
        if "failure" in tags:
            counts["failed"] += 1
            failed_names.append(name)
        elif "error" in tags:
            counts["errors"] += 1
            failed_names.append(name)
        elif "skipped" in tags:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    result: dict = {**counts, "total": sum(counts.values())}
    if failed_names:
        result["not_passed"] = failed_names[:50]
    if result["total"] == 0:
        result["reason"] = "no test ran (none collected or none selected)"
    return result


# ------------------------------------------------------------------------------------------------
# compute-sanitizer logs -> error counts
# ------------------------------------------------------------------------------------------------


def parse_sanitizer_log(path: Path, stage: dict | None = None, driver_required: bool = True) -> dict:
    """``{"errors": N or None, "reason": ..., "driver": {...}}`` from one compute-sanitizer log.

    N is the sum of every ``ERROR SUMMARY: N errors`` line (one per process); a racecheck log that
    has only its ``RACECHECK SUMMARY`` line gives that line's error count. No summary line: None,
    with the reason (timed out, tool not found, or stopped before its summary). With
    ``driver_required``, a log without the driver's own summary line (bench/sanitizer_driver.py
    stopped early) gives None instead of 0: the ops were not all checked.
    """
    stage = stage or {}
    if not path.is_file():
        why = stage.get("note") or "the stage did not run"
        return {"errors": None, "reason": f"{path.name} not found ({why})"}
    text = path.read_text(encoding="utf-8", errors="replace")
    out: dict = {}
    driver = _DRIVER_SUMMARY.findall(text)
    if driver:
        calls, failed = (int(v) for v in driver[-1])
        out["driver"] = {"calls": calls, "failed": failed}
    summaries = _ERROR_SUMMARY.findall(text)
    if summaries:
        out["errors"] = sum(int(n) for n in summaries)
    else:
        race = _RACECHECK_SUMMARY.findall(text)
        if race:
            out["errors"] = sum(int(errors) for _, errors, _ in race)
            out["warnings"] = sum(int(warnings) for _, _, warnings in race)
        else:
            out["errors"] = None
            out["reason"] = _why_no_summary(text, stage)
    if out.get("driver", {}).get("failed"):
        out["note"] = (f"{out['driver']['failed']} of {out['driver']['calls']} driver calls raised "
                       "(see the log); the count covers the calls that ran")
    elif driver_required and "driver" not in out and out.get("errors") is not None:
        if out["errors"] == 0:
            # no summary from the driver: it stopped before calling every op, so 0 proves nothing
            out["errors"] = None
            out["reason"] = ("the driver stopped before its summary line (see the log), "
                             "so the tool's 0 errors do not cover the ops")
        else:
            out["note"] = "the driver stopped before its summary line (see the log)"
    return out


def _why_no_summary(text: str, stage: dict) -> str:
    if stage.get("status") == "timeout":
        return f"timed out after {stage.get('seconds', '?')} s before the summary"
    if stage.get("status") == "skipped":
        return stage.get("note") or "the stage was skipped"
    lowered = text.lower()
    if "compute-sanitizer" in lowered and ("command not found" in lowered or "no such file" in lowered):
        return "compute-sanitizer was not found"
    if "cannot run on the gpu" in lowered:
        return "the driver could not run on the GPU (see the log)"
    return "no ERROR SUMMARY line in the log (the tool or the program stopped before its summary)"


# ------------------------------------------------------------------------------------------------
# Benchmarks
# ------------------------------------------------------------------------------------------------


def load_benchmarks(bench_json: Path, records_jsonl: Path) -> tuple[list[dict], str]:
    """Every benchmark and check record, merged by ``id``; and where they came from.

    The records file is written as each benchmark ends; pytest-benchmark's JSON at the end of the
    run, with the same ``extra_info`` plus its wall-clock statistics (``wall_ms``). Either alone is
    enough.
    """
    merged: dict[str, dict] = {}
    sources = []
    if records_jsonl.is_file():
        count = 0
        for line in records_jsonl.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and rec.get("id"):
                merged.setdefault(rec["id"], {}).update(rec)
                count += 1
        if count:
            sources.append(records_jsonl.name)
    data, _ = read_json(bench_json)
    if isinstance(data, dict) and isinstance(data.get("benchmarks"), list):
        sources.append(bench_json.name)
        for bench in data["benchmarks"]:
            rec = dict(bench.get("extra_info") or {})
            rec_id = rec.get("id") or bench.get("fullname") or bench.get("name")
            rec.setdefault("id", rec_id)
            rec["test"] = bench.get("name")
            stats = bench.get("stats") or {}
            if isinstance(stats.get("median"), (int, float)):
                rec["wall_ms"] = stats["median"] * 1e3
                rec["wall_rounds"] = stats.get("rounds")
            merged.setdefault(rec_id, {}).update(rec)
    for rec in merged.values():
        if "name" not in rec and rec.get("kind") == "op":
            rec["name"] = f"{rec.get('op')} {rec.get('layer')}"
        rec.setdefault("name", rec.get("id"))
    return list(merged.values()), " + ".join(sources) if sources else "none"


def _find(records: list[dict], rec_id: str) -> dict | None:
    return next((r for r in records if r.get("id") == rec_id), None)


def _ms(rec: dict | None):
    value = rec.get("ms") if rec else None
    return value if isinstance(value, (int, float)) and math.isfinite(value) else None


def _by_precision(records: list[dict], kind: str, impl: str) -> dict:
    """``{precision: ms}`` of the records of ``kind`` and ``impl`` that have a time."""
    out = {r["precision"]: _ms(r) for r in records
           if r.get("kind") == kind and r.get("impl") == impl and r.get("precision") and _ms(r) is not None}
    return {p: out[p] for p in _ordered(out)}


def _ordered(keys) -> list:
    """``keys`` with the precisions first, in the order of PRECISIONS."""
    keys = list(keys)
    return [p for p in PRECISIONS if p in keys] + sorted(k for k in keys if k not in PRECISIONS)


def _ratios(peers: dict, ours: dict) -> dict:
    """``peer / ours`` per precision present in both: above 1 ours is faster."""
    return {p: peers[p] / ms for p, ms in ours.items() if p in peers and ms}


# The tf32 training steps with the backward's fusions switched off, or all on
FUSION_IMPLS = ("ours_unfused", "ours_relu_fused")
# the steps with a named kernel in place of their mode's version, eager and graphed: the summary's
# key for each (impl "ours_<key>" and "ours_<key>_graph"), the kernel and the mode it runs in
# (bench/test_bench_train_step.py times them, bench/plot_results.py lists them)
KERNEL_STEPS = {"wgmma": ("v6_tf32_wgmma", "tf32"), "halo": ("v7_tf32_halo", "tf32"),
                "halo_bf16": ("v8_bf16_halo", "bf16"), "halo_fp32": ("v9_fp32_halo", "fp32")}
KERNEL_STEP_IMPLS = tuple(f"ours_{key}{graph}" for key in KERNEL_STEPS for graph in ("", "_graph"))


def _autotune_tables(records: list[dict]) -> dict:
    """Per precision, from the autotuned step's table of plans: the GEMMs, how many of them left
    the rule's plan, and the rule's and the chosen plans' times summed (ms, as measured while
    tuning)."""
    tables = {}
    for rec in records:
        if rec.get("kind") != "train_step" or rec.get("impl") != "ours_autotuned" or not rec.get("plans"):
            continue
        timed = [e for e in rec["plans"] if e.get("ms") is not None and e.get("rule_ms") is not None]
        tables[rec.get("precision", "fp32")] = {
            "gemms": len(rec["plans"]),
            "changed": sum(1 for e in rec["plans"] if list(e.get("plan", [])) != list(e.get("rule", []))),
            "rule_ms": sum(e["rule_ms"] for e in timed),
            "chosen_ms": sum(e["ms"] for e in timed),
            "first_step_s": rec.get("first_step_s"),
        }
    return tables


def _op_summary(records: list[dict]) -> dict:
    """The per-op records added up per precision mode: every op a training step runs once, the 3x3
    convolutions in the mode's version (records with a ``version``), the others shared by all modes;
    ops the step does not run (``in_step`` false: crop + concat) are left out of the sums; those it
    fuses into others but a PyTorch step runs on its own (``peer_in_step``: the ReLU's backward, the
    skip maps' sums) count in the peer's sum only."""
    op_records = [r for r in records if r.get("kind") == "op" and _ms(r) is not None]
    if not op_records:
        return {}
    in_step = [r for r in op_records if r.get("in_step", True) is not False]
    shared = [r for r in in_step if not r.get("version")]
    versioned = [r for r in in_step if r.get("version")]
    peer_only = [r for r in op_records if r.get("in_step", True) is False and r.get("peer_in_step")]
    modes = _ordered({r.get("precision") or "fp32" for r in versioned}) or ["fp32"]
    counts, totals, peer_totals = {}, {}, {}
    for mode in modes:
        rows = shared + [r for r in versioned if (r.get("precision") or "fp32") == mode]
        counts[mode] = len(rows)
        totals[mode] = sum(r["ms"] for r in rows)
        # the peer in the mode's setting where it was timed (convolutions), else its FP32 peer
        peers = [next((r[k] for k in (f"peer_{mode}_ms", "peer_fp32_ms", "peer_ms")
                       if isinstance(r.get(k), (int, float))), None) for r in rows + peer_only]
        if any(v is not None for v in peers):
            peer_totals[mode] = sum(v for v in peers if v is not None)
    out: dict = {"ops_count": counts, "ops_total_ms": totals, "ops_peer_total_ms": peer_totals or None}
    with_ratio = [r for r in op_records if isinstance(r.get("ratio"), (int, float))]
    if with_ratio:
        ranked = sorted(with_ratio, key=lambda r: r["ratio"])
        out["slowest_vs_peer"] = [
            {"id": r["id"], "precision": r.get("precision"), "ms": r["ms"], "peer_ms": r.get("peer_ms"),
             "peer_precision": r.get("peer_precision", "fp32"), "ratio": r["ratio"]}
            for r in ranked[:5]
        ]
    return out


def _compare(value, comparison: str, goal: float):
    if value is None:
        return None
    return bool(value >= goal) if comparison == ">=" else bool(value <= goal)


def evaluate_targets(summary: dict, card: str | None) -> dict:
    """Where each target stands: the measured value, the goal, whether it is met (null when not
    measured) and the card it was measured on. Training ratios use our eager step; the graphed step
    is given beside it."""
    per = summary.get("per_precision") or {}
    out: dict = {}
    for target in TARGETS:
        entry = {"description": target["description"], "goal": target["goal"],
                 "comparison": target["comparison"], "unit": target["unit"],
                 "target_card": TARGET_CARD, "card": card}
        row = per.get(target["precision"]) or {}
        if target["kind"] == "train_ratio":
            entry.update(value=row.get("ratio"), ours_ms=row.get("train_step_ms"),
                         torch_ms=row.get("torch_train_step_ms"), graphed_value=row.get("graphed_ratio"))
            entry["graphed_met"] = _compare(entry["graphed_value"], target["comparison"], target["goal"])
        else:
            entry.update(value=row.get("infer_512_ms"), torch_ms=row.get("torch_infer_512_ms"))
        entry["met"] = _compare(entry["value"], target["comparison"], target["goal"])
        if entry["value"] is None:
            entry["note"] = "not measured in this run"
        elif TARGET_CARD not in (card or "").upper():
            entry["note"] = f"the target is set for an {TARGET_CARD}; this run is on {card or 'an unknown card'}"
        out[target["name"]] = entry
    return out


def summarize(records: list[dict], card: str | None = None) -> dict:
    """The headline figures per precision mode, the targets, and the peer of each end-to-end figure
    filled into its record."""
    summary: dict = {}
    ours_steps = _by_precision(records, "train_step", "ours")
    graphed_steps = _by_precision(records, "train_step", "ours_graph")
    torch_steps = _by_precision(records, "train_step", "torch")
    ours_infer = _by_precision(records, "infer", "ours")
    torch_infer = _by_precision(records, "infer", "torch")
    summary["train_step_ms"] = ours_steps or None
    summary["torch_train_step_ms"] = torch_steps or None
    # > 1: ours is faster than PyTorch in the setting paired with the same precision.
    summary["train_step_ratio"] = _ratios(torch_steps, ours_steps) or None
    summary["graphed_train_step_ms"] = graphed_steps or None
    summary["graphed_train_step_ratio"] = _ratios(torch_steps, graphed_steps) or None
    # The steps with the named kernels in place of their mode's version, eager and graphed:
    # v6_tf32_wgmma ("wgmma") and v7_tf32_halo ("halo") in tf32, v8_bf16_halo ("halo_bf16") in bf16,
    # v9_fp32_halo ("halo_fp32") in fp32; their ratios to PyTorch's step in the same mode.
    for kernel, (_, mode_precision) in KERNEL_STEPS.items():
        steps = {mode: _by_precision(records, "train_step", impl).get(mode_precision)
                 for mode, impl in (("eager", f"ours_{kernel}"), ("graph", f"ours_{kernel}_graph"))}
        summary[f"{kernel}_train_step_ms"] = steps if any(v is not None for v in steps.values()) else None
        summary[f"{kernel}_train_step_ratio"] = (
            {mode: torch_steps[mode_precision] / ms for mode, ms in steps.items()
             if ms and mode_precision in torch_steps} or None)
    # the tf32 step with the backward's fusions switched (bench/test_bench_train_step.py), beside
    # the default's: {variant: ms}
    fusions = {impl[len("ours_"):]: _by_precision(records, "train_step", impl).get("tf32")
               for impl in FUSION_IMPLS}
    summary["fusion_train_step_ms"] = ({k: v for k, v in fusions.items() if v is not None} or None)
    # the step with the GEMM plans measured (autotuned) instead of ruled, per precision, and what
    # its table says: GEMMs whose plan changed, and the time the rule's plans took against the
    # chosen ones (summed over the step's GEMMs, as timed during tuning)
    autotuned = _by_precision(records, "train_step", "ours_autotuned")
    summary["autotuned_train_step_ms"] = autotuned or None
    summary["autotuned_train_step_ratio"] = _ratios(torch_steps, autotuned) or None
    summary["autotune_tables"] = _autotune_tables(records) or None
    summary["infer_512_ms"] = ours_infer.get("bf16")      # the inference target's figure (bf16)
    summary["infer_512_ms_by_precision"] = ours_infer or None
    summary["torch_infer_512_ms"] = torch_infer or None
    summary["infer_512_ratio"] = _ratios(torch_infer, ours_infer) or None

    for kind, impls, peers in (("train_step", ("ours", "ours_graph") + KERNEL_STEP_IMPLS
                                + ("ours_autotuned",) + FUSION_IMPLS, torch_steps),
                               ("infer", ("ours",), torch_infer)):
        for rec in records:
            if rec.get("kind") == kind and rec.get("impl") in impls and _ms(rec) and peers:
                precision = rec.get("precision", "fp32")
                if precision in peers:
                    rec["peer"] = TORCH_SETTING_NAMES.get(precision, f"PyTorch {precision}")
                    rec["peer_precision"] = precision
                    rec["peer_ms"] = peers[precision]
                    rec["ratio"] = peers[precision] / rec["ms"]
                for other in PRECISIONS:
                    if other != precision and other in peers:
                        rec[f"ratio_{other}"] = peers[other] / rec["ms"]

    ops_summary = _op_summary(records)
    summary.update(ops_summary)
    versions = {}
    for rec in records:
        if (rec.get("kind") in ("train_step", "infer", "op") and rec.get("version")
                and rec.get("impl") not in ("torch",) + KERNEL_STEP_IMPLS):
            versions.setdefault(rec.get("precision"), rec["version"])
    per: dict = {}
    for p in PRECISIONS:
        per[p] = {
            "version": versions.get(p),
            "torch_setting": TORCH_SETTING_NAMES[p],
            "train_step_ms": ours_steps.get(p),
            "torch_train_step_ms": torch_steps.get(p),
            "ratio": (summary["train_step_ratio"] or {}).get(p),
            "graphed_train_step_ms": graphed_steps.get(p),
            "graphed_ratio": (summary["graphed_train_step_ratio"] or {}).get(p),
            "infer_512_ms": ours_infer.get(p),
            "torch_infer_512_ms": torch_infer.get(p),
            "infer_ratio": (summary["infer_512_ratio"] or {}).get(p),
            "ops_total_ms": (ops_summary.get("ops_total_ms") or {}).get(p),
            "ops_peer_total_ms": (ops_summary.get("ops_peer_total_ms") or {}).get(p),
        }
    summary["per_precision"] = per

    check = _find(records, "check/loss_vs_torch_fp32")
    if check:
        summary["loss_check"] = {k: check[k] for k in (
            "passed", "rel_err_before", "rel_err_after", "worst_param", "worst_update_rel_l2") if k in check}
    summary["targets"] = evaluate_targets(summary, card)
    return summary


# ------------------------------------------------------------------------------------------------
# The results JSON
# ------------------------------------------------------------------------------------------------


def gpu_slug(name: str | None) -> str:
    """``"NVIDIA H100 80GB HBM3"`` -> ``"h100-80gb-hbm3"``."""
    slug = re.sub(r"[^a-z0-9]+", "-", (name or "unknown-gpu").lower()).strip("-")
    return re.sub(r"^nvidia-", "", slug) or "unknown-gpu"


def collect(outdir: Path) -> dict:
    outdir = Path(outdir)
    meta = read_meta(outdir / "meta.txt")
    stages = read_stages(outdir / "stages.tsv")
    gpu_info = read_gpu_info(outdir / "gpu-info.csv")
    gpu_after = read_gpu_info(outdir / "gpu-info-after.csv")
    env, env_reason = read_json(outdir / "env.json")
    env = env if isinstance(env, dict) else None

    commit = meta.get("commit") or None
    if commit and not re.fullmatch(r"[0-9a-f]{40}", commit):
        commit = None
    gpu = (gpu_info or {}).get("name") or (env or {}).get("gpu")
    results: dict = {
        "commit": commit,
        "dirty": meta.get("dirty") == "true" if "dirty" in meta else None,
        "gpu": gpu,
        "date": meta.get("date") or None,
        "schema": SCHEMA,
    }
    if not commit:
        results["commit_reason"] = meta.get("git_error") or "meta.txt has no commit (not a git checkout?)"
    elif meta.get("commit_source") not in (None, "git"):
        results["commit_source"] = meta["commit_source"]
        if meta.get("git_error"):
            results["commit_reason"] = meta["git_error"]
    results["gpu_info"] = gpu_info
    if gpu_after:
        results["gpu_info_after_benchmarks"] = gpu_after
    results["environment"] = env if env is not None else {"reason": env_reason}
    results["stages"] = stages

    results["tests"] = parse_junit(outdir / "gpu-tests.xml")
    results["bench_tests"] = parse_junit(outdir / "bench-tests.xml")

    sanitizer: dict = {}
    details: dict = {}
    for tool in SANITIZER_TOOLS:
        parsed = parse_sanitizer_log(outdir / f"sanitizer-{tool}.log", stages.get(f"sanitizer-{tool}"))
        sanitizer[f"{tool}_errors"] = parsed.get("errors")
        details[tool] = {k: v for k, v in parsed.items() if k != "errors"}
    sanitizer["details"] = details
    results["sanitizer"] = sanitizer

    records, source = load_benchmarks(outdir / "benchmarks.json", outdir / "bench-records.jsonl")
    summary = summarize(records, gpu)
    results["benchmarks_source"] = source
    results["benchmarks"] = [r for r in records if r.get("kind") != "check"]
    results["checks"] = [r for r in records if r.get("kind") == "check"]
    results["summary"] = summary
    if gpu:
        results["ceilings"] = asdict(ceilings_for(gpu))

    isbi, isbi_reason = read_json(outdir / "isbi.json")
    if isbi is not None:
        results["isbi"] = isbi
    elif (outdir / "isbi.json").is_file():
        results["isbi"] = {"reason": isbi_reason}
    profiles = read_profiles(outdir)
    if profiles:
        results["profile"] = profiles
    ncu = read_ncu(outdir)
    if ncu is not None:
        results["ncu"] = ncu
    return results


# The figures of each profiled kernel that the short table prints (ncu's metric names).
NCU_HEADLINE = ("Duration", "Compute (SM) Throughput", "Memory Throughput", "Registers Per Thread",
                "Achieved Occupancy", "Issue Slots Busy", "Warp Cycles Per Issued Instruction")


def _ncu_value(text: str):
    text = (text or "").strip().replace(",", "")
    if text.lstrip("-").isdigit():
        return int(text)
    try:
        return float(text)
    except ValueError:
        return text or None


# ncu's stall reasons (the WarpStateStats charts), one metric each in the raw page:
# smsp__average_warps_issue_stalled_<reason>_per_issue_active.ratio, the cycles a warp spends per
# issued instruction stalled for that reason (long_scoreboard: waiting on global memory, or on a
# cp.async group; barrier: __syncthreads; wait: fixed latencies; ...).
STALL_PREFIX, STALL_SUFFIX = "smsp__average_warps_issue_stalled_", "_per_issue_active.ratio"


def read_ncu_stalls(outdir: Path) -> dict:
    """``ncu-raw.csv`` (``ncu --import ... --csv --page raw``: a header of metric names, a row of
    units, then one row per kernel): per kernel ID, its stall reasons as {reason: cycles per issued
    instruction}, largest first, zeros left out. Empty where the file is missing or unreadable."""
    path = outdir / "ncu-raw.csv"
    if not path.is_file():
        return {}
    import csv  # noqa: PLC0415
    import io  # noqa: PLC0415

    text = path.read_text(errors="replace")
    start = text.find('"ID"')
    if start < 0:
        return {}
    rows = list(csv.reader(io.StringIO(text[start:])))
    if len(rows) < 3:
        return {}
    header = rows[0]
    columns = [(i, name[len(STALL_PREFIX):-len(STALL_SUFFIX)]) for i, name in enumerate(header)
               if name.startswith(STALL_PREFIX) and name.endswith(STALL_SUFFIX)]
    stalls = {}
    for row in rows[2:]:
        if len(row) != len(header) or not row[0]:
            continue
        values = {reason: _ncu_value(row[i]) for i, reason in columns}
        values = {r: v for r, v in values.items() if isinstance(v, (int, float)) and v > 0}
        stalls[row[0]] = dict(sorted(values.items(), key=lambda item: -item[1]))
    return stalls


def read_ncu(outdir: Path) -> dict | None:
    """``ncu-details.csv`` (``ncu --import ... --csv --page details``) with ``ncu-cases.json`` (the
    driver's cases in launch order): per case, its kernels and every metric ncu reported, as
    ``"<section>: <metric> [<unit>]": value``. The k-th kernel whose name holds ``conv3x3_v`` is the
    k-th case's GEMM; the kernels after it (split-K, bias gradient) belong to the same case."""
    csv_path, cases_path = outdir / "ncu-details.csv", outdir / "ncu-cases.json"
    if not csv_path.is_file():
        return None
    import csv  # noqa: PLC0415
    import io  # noqa: PLC0415

    text = csv_path.read_text(errors="replace")
    start = text.find('"ID"')
    if start < 0:
        return {"reason": "ncu-details.csv holds no CSV header (see ncu.log)"}
    kernels: dict[str, dict] = {}
    for row in csv.DictReader(io.StringIO(text[start:])):
        kid = row.get("ID")
        if kid is None or not row.get("Metric Name"):
            continue
        entry = kernels.setdefault(kid, {"kernel": row.get("Kernel Name", ""), "metrics": {}})
        unit = (row.get("Metric Unit") or "").strip()
        key = f"{row.get('Section Name', '')}: {row['Metric Name']}" + (f" [{unit}]" if unit else "")
        entry["metrics"][key] = _ncu_value(row.get("Metric Value"))
    for kid, stalls in read_ncu_stalls(outdir).items():
        if kid in kernels and stalls:
            kernels[kid]["stall_cycles_per_instruction"] = stalls
    cases, reason = read_json(cases_path)
    cases = cases if isinstance(cases, list) else []
    out_cases = [dict(case, kernels=[]) for case in cases]
    unmatched = []
    index = -1
    for kid in sorted(kernels, key=lambda k: int(k) if str(k).isdigit() else 0):
        entry = kernels[kid]
        full = entry["kernel"]
        entry["kernel"] = full.split("(")[0].split("<")[0].strip() or full
        if "conv3x3_v" in full:
            index += 1
            entry["template"] = full.split("(")[0][:300]
        if 0 <= index < len(out_cases):
            out_cases[index]["kernels"].append(entry)
        else:
            unmatched.append(entry)
    result = {"cases": out_cases, "kernels_profiled": len(kernels)}
    if unmatched:
        result["unmatched_kernels"] = unmatched
    if not cases:
        result["reason"] = f"ncu-cases.json: {reason}"
    return result


def _ncu_headline(metrics: dict) -> dict:
    """The NCU_HEADLINE figures of one kernel: {short name: "value unit"}."""
    out = {}
    for name in NCU_HEADLINE:
        for key, value in metrics.items():
            if key.split(": ", 1)[-1].split(" [")[0] == name:
                unit = key.rsplit(" [", 1)[1].rstrip("]") if " [" in key else ""
                out[name] = f"{_fmt(value) if isinstance(value, float) else value}{(' ' + unit) if unit else ''}"
                break
    return out


# The rows of each op-by-op profile that the results JSON keeps, largest first: all of the paper's
# network (about 130 per precision), so that every layer's time per op is on record even where the
# bench stage runs out of time before the per-op table.
PROFILE_ROWS = 200


def read_profiles(outdir: Path) -> dict:
    """``profile-<name>.json`` files by name (a precision, or ``<precision>-autotuned`` for
    ``profile --autotune``, with its table of plans): the step's totals and its largest rows."""
    profiles = {}
    for path in sorted(outdir.glob("profile-*.json")):
        data, reason = read_json(path)
        name = path.stem.removeprefix("profile-")
        if data is None:
            profiles[name] = {"reason": reason}
            continue
        rows = data.get("rows") or []
        profiles[name] = {key: data.get(key) for key in ("device", "precision", "network", "steps", "step_ms",
                                                         "host_ms", "gpu_ms")}
        profiles[name]["rows"] = rows[:PROFILE_ROWS]
        profiles[name]["rows_left_out"] = max(len(rows) - PROFILE_ROWS, 0)
        if data.get("plans"):  # profile --autotune: the GEMM plans its timed steps ran
            profiles[name]["plans"] = data["plans"]
    return profiles


def results_filename(results: dict) -> str:
    commit = results.get("commit")
    short = commit[:7] if commit else "nocommit"
    dirty = "-dirty" if results.get("dirty") else ""
    return f"results-{short}{dirty}-{gpu_slug(results.get('gpu'))}.json"


def write_results(outdir: Path, results: dict, path: Path | None = None) -> Path:
    path = Path(path) if path else Path(outdir) / results_filename(results)
    path.write_text(json.dumps(_finite(results), indent=2, allow_nan=False) + "\n", encoding="utf-8")
    return path


def _finite(value):
    """A copy of ``value`` that strict JSON accepts: NaN and infinities become null."""
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


# ------------------------------------------------------------------------------------------------
# The short table
# ------------------------------------------------------------------------------------------------


def _fmt(value, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _fmt_sci(value) -> str:
    return f"{value:.1e}" if isinstance(value, (int, float)) else "-"


def _fmt_ratio(value) -> str:
    return "-" if value is None else f"{_fmt(value)}x"


def target_status(met) -> str:
    return {True: "met", False: "not met"}.get(met, "not measured")


def format_table(results: dict) -> str:
    lines = []
    commit = (results.get("commit") or "no commit")[:10] + (" (dirty)" if results.get("dirty") else "")
    lines.append(f"unet-cuda GPU check  {commit}  {results.get('gpu') or 'unknown GPU'}  {results.get('date') or ''}")
    stages = results.get("stages") or {}
    if stages:
        lines.append("stages      " + "  ".join(
            f"{name}:{entry.get('status')}({entry.get('seconds', '-')}s)" for name, entry in stages.items()))
    for key, label in (("tests", "gpu tests"), ("bench_tests", "bench tests")):
        t = results.get(key) or {}
        text = "  ".join(f"{k} {_fmt(t.get(k))}" for k in ("passed", "failed", "skipped", "errors"))
        if t.get("reason"):
            text += f"  ({t['reason']})"
        lines.append(f"{label:<11} {text}")
    s = results.get("sanitizer") or {}
    lines.append("sanitizer   " + "  ".join(f"{tool} {_fmt(s.get(f'{tool}_errors'))}" for tool in SANITIZER_TOOLS))
    summary = results.get("summary") or {}
    per = summary.get("per_precision") or {}
    if any(v is not None for row in per.values() for k, v in row.items() if k.endswith("_ms")):
        lines.append("ms (median)  train: ours  graph  torch  ratio  |  infer 512: ours  torch  |  ops sum: ours  torch")
        for p, row in per.items():
            lines.append(f"  {p:<5} {row.get('version') or '':<12} "
                         f"{_fmt(row.get('train_step_ms')):>6} {_fmt(row.get('graphed_train_step_ms')):>6} "
                         f"{_fmt(row.get('torch_train_step_ms')):>6} {_fmt_ratio(row.get('ratio')):>6}  |  "
                         f"{_fmt(row.get('infer_512_ms')):>13} {_fmt(row.get('torch_infer_512_ms')):>6}  |  "
                         f"{_fmt(row.get('ops_total_ms')):>12} {_fmt(row.get('ops_peer_total_ms')):>6}")
    worst = summary.get("slowest_vs_peer") or []
    if worst:
        lines.append("behind peer " + "  ".join(f"{w['id'].removeprefix('op/')} {_fmt(w.get('ratio'))}x"
                                                for w in worst[:3]))
    targets = summary.get("targets") or {}
    for name, t in targets.items():
        value = "-" if t.get("value") is None else f"{_fmt(t.get('value'))} {t.get('unit', '')}"
        lines.append(f"target      {name:<28} {value} (goal {t.get('comparison')} {t.get('goal')} "
                     f"{t.get('unit', '')}): {target_status(t.get('met'))}")
    check = summary.get("loss_check")
    if check:
        lines.append(f"loss check  passed {check.get('passed')}  rel err before "
                     f"{_fmt_sci(check.get('rel_err_before'))}  after {_fmt_sci(check.get('rel_err_after'))}")
    if results.get("isbi") is not None:
        lines.append("isbi        " + json.dumps(results["isbi"])[:100])
    for case in (results.get("ncu") or {}).get("cases") or []:
        gemm = next((k for k in case.get("kernels") or [] if "template" in k), None)
        if gemm is not None:
            figures = _ncu_headline(gemm.get("metrics") or {})
            stalls = list((gemm.get("stall_cycles_per_instruction") or {}).items())[:3]
            lines.append(f"ncu         {case.get('op')}/{case.get('layer')}/{case.get('version')}: "
                         + ", ".join(f"{k} {v}" for k, v in figures.items())
                         + ("; stalled per instruction: " + ", ".join(f"{r} {_fmt(v)}" for r, v in stalls)
                            if stalls else ""))
    for name, prof in (results.get("profile") or {}).items():
        lines.append(f"profile     {name}: step {_fmt(prof.get('step_ms'))} ms, ops on the GPU "
                     f"{_fmt(prof.get('gpu_ms'))} ms, host {_fmt(prof.get('host_ms'))} ms"
                     + (f" ({prof['reason']})" if prof.get("reason") else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Assemble the GPU check's results JSON.")
    parser.add_argument("outdir", type=Path, help="the output folder of bench/gpu_check.sh")
    parser.add_argument("--out", type=Path, default=None, help="write the JSON here instead")
    parser.add_argument("--no-table", action="store_true", help="do not print the short table")
    args = parser.parse_args(argv)
    if not args.outdir.is_dir():
        parser.error(f"{args.outdir} is not a folder")
    results = collect(args.outdir)
    path = write_results(args.outdir, results, args.out)
    if not args.no_table:
        print(format_table(results))
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
