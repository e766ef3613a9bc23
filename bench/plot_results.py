"""Renders a GPU check's results JSON: a PNG chart, a markdown table of every figure, and the
performance table of the top-level README.

    python3 bench/plot_results.py                       # the newest run in bench/results/
    python3 bench/plot_results.py path/to/results.json --png out.png --markdown out.md
    python3 bench/plot_results.py --readme README.md    # also the README's table (and chart link)

The newest run is the file with benchmark figures and the latest ``date`` field (file time breaks
ties; a check without its bench stage counts only where no file has figures). The chart has
four panels: the training step per precision mode (ours, ours as a CUDA graph, and PyTorch in the
paired setting), the 512x512 prediction per precision with the 2 ms target, the 3x3 convolution's
kernel versions at four layers (TFLOP/s of forward + both gradients: the progression of
docs/CONV3X3.md), and per layer the ratio of the 3x3 convolutions to PyTorch in each precision.

``--readme`` rewrites what lies between ``<!-- bench-table:start -->`` and
``<!-- bench-table:end -->`` in the README with the headline table of the run (card, commit and
date stated), or with "no GPU run recorded yet" when there is no results JSON; nothing else of the
README changes. Runs on the CPU (matplotlib's Agg backend).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from collect_results import KERNEL_STEPS, TARGETS

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "bench" / "results"
DEFAULT_PNG = ROOT / "bench" / "plots" / "results.png"
DEFAULT_MD = ROOT / "bench" / "plots" / "results.md"
README = ROOT / "README.md"
PRECISIONS = ("fp32", "tf32", "bf16")
VERSION_ORDER = ("v1_direct", "v2_smem", "v3_igemm", "v4_tf32_mma", "v5_bf16_mma", "v6_tf32_wgmma",
                 "v7_tf32_halo", "v8_bf16_halo", "v9_fp32_halo")
CONV_OPS = ("conv3x3_forward", "conv3x3_backward_data", "conv3x3_backward_weight")
# the decoder's first convolution of a level, on [up, crop of skip] in place
CONCAT_CONV_OPS = ("conv3x3_concat_forward", "conv3x3_concat_backward_data", "conv3x3_concat_backward_weight")
TORCH_SETTINGS = {"fp32": "TF32 off", "tf32": "default (TF32)", "bf16": "bf16 autocast + channels_last"}
SHORT_SETTINGS = {"fp32": "TF32 off", "tf32": "default TF32", "bf16": "bf16 AMP, NHWC"}
# the target of each precision's training step, and the prediction's (collect_results.TARGETS)
TARGET_ROWS = {t["precision"]: t["name"] for t in TARGETS if t["kind"] == "train_ratio"}
INFER_TARGET = next(t["name"] for t in TARGETS if t["kind"] == "infer_ms")

MARK_START = "<!-- bench-table:start -->"
MARK_END = "<!-- bench-table:end -->"
NO_RUN = ("No GPU run recorded yet: `bench/results/` holds no results JSON, so no speed is claimed here.\n"
          "`bash bench/gpu_check.sh OUTDIR` on a GPU machine writes one.")


def latest_results(results_dir: Path = RESULTS_DIR) -> Path:
    """The newest results JSON that holds benchmark figures, preferring those with per-op figures
    against their peers; the newest of all where none has any. A check run without its bench
    stage (tests, sanitizers, a profile), or whose bench stage ran out of time before the per-op
    cases, leaves the table and the chart to the run before it."""
    files = sorted(Path(results_dir).glob("*.json"))
    if not files:
        raise FileNotFoundError(f"no results JSON in {results_dir}")

    def key(path: Path):
        try:
            results = json.loads(path.read_text(encoding="utf-8"))
            date, benchmarks = results.get("date") or "", results.get("benchmarks") or []
            ops = any(isinstance(b, dict) and b.get("kind") == "op" and _num(b.get("peer_ms")) is not None
                      for b in benchmarks)
        except (OSError, ValueError, AttributeError):
            date, benchmarks, ops = "", [], False
        return (bool(benchmarks), ops, str(date), path.stat().st_mtime)

    return max(files, key=key)


def _num(value):
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _per_precision(results: dict) -> dict:
    summary = results.get("summary") or {}
    per = summary.get("per_precision")
    if isinstance(per, dict):
        return per
    # a results JSON from before the precision modes: rebuild what its flat dicts say
    out = {}
    for p in PRECISIONS:
        ours = (summary.get("train_step_ms") or {}).get(p)
        peer = (summary.get("torch_train_step_ms") or {}).get(p)
        out[p] = {"train_step_ms": ours, "torch_train_step_ms": peer,
                  "ratio": peer / ours if _num(ours) and _num(peer) else None,
                  "torch_infer_512_ms": (summary.get("torch_infer_512_ms") or {}).get(p)}
    return out


# ------------------------------------------------------------------------------------------------
# What the panels show
# ------------------------------------------------------------------------------------------------


def conv_layers(results: dict) -> list[dict]:
    """Per 3x3 layer and precision: our summed time of forward, data and weight gradient, and the
    summed time of the peer of the same precision.

    ``[{"layer": "d1b", "fp32": {"ours": ms, "peer": ms, "complete": bool}, "tf32": ...}, ...]``;
    records without a ``version`` (older runs) count as fp32.
    """
    layers: dict[str, dict] = {}
    for rec in results.get("benchmarks") or []:
        if rec.get("kind") != "op" or rec.get("op") not in CONV_OPS + CONCAT_CONV_OPS \
                or _num(rec.get("ms")) is None:
            continue
        precision = rec.get("precision") or "fp32"
        row = layers.setdefault(rec["layer"], {"layer": rec["layer"]})
        cell = row.setdefault(precision, {"ours": 0.0, "peer": 0.0, "complete": True})
        cell["ours"] += rec["ms"]
        peer = _num(rec.get(f"peer_{precision}_ms"))
        if peer is None and (rec.get("peer_precision") or "fp32") == precision:
            peer = _num(rec.get("peer_ms"))
        if peer is None:
            cell["complete"] = False
        else:
            cell["peer"] += peer
    return list(layers.values())


def version_progression(results: dict) -> dict[str, dict[str, float]]:
    """``{layer: {version: TFLOP/s}}`` of forward + data gradient + weight gradient together (their
    FLOPs over their summed time), from the ``op_version`` records; a layer counts for a version
    only when all of its directions were timed."""
    sums: dict[tuple[str, str], list] = {}
    for rec in results.get("benchmarks") or []:
        if rec.get("kind") != "op_version" or _num(rec.get("ms")) is None or _num(rec.get("flops")) is None:
            continue
        entry = sums.setdefault((rec.get("layer"), rec.get("version")), [0.0, 0.0, set()])
        entry[0] += rec["flops"]
        entry[1] += rec["ms"]
        entry[2].add(rec.get("op"))
    out: dict[str, dict[str, float]] = {}
    for (layer, version), (flops, ms, done) in sums.items():
        if ms > 0 and done >= set(CONV_OPS):
            out.setdefault(layer, {})[version] = flops / (ms * 1e-3) / 1e12
    for layer in out:
        out[layer] = dict(sorted(out[layer].items(),
                                 key=lambda kv: VERSION_ORDER.index(kv[0]) if kv[0] in VERSION_ORDER else 99))
    return out


def _title(results: dict) -> str:
    return (f"unet-cuda on {results.get('gpu') or 'unknown GPU'} - commit "
            f"{(results.get('commit') or 'unknown')[:10]}{' (dirty)' if results.get('dirty') else ''}"
            f" - {results.get('date') or ''}")


def render_png(results: dict, path: Path) -> Path:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415

    per = _per_precision(results)
    fig, axes = plt.subplots(2, 2, figsize=(14, 9))
    fig.suptitle(_title(results), fontsize=11)
    colours = {"ours": "#d62728", "graph": "#ff9896", "torch": "#1f77b4"}

    def no_data(ax, text: str):
        ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes)
        ax.set_xticks([])
        ax.set_yticks([])

    def grouped(ax, series: list[tuple[str, str, list]], groups: list[str], log: bool = False):
        """Bars per group (precision) for each (label, colour, values) series; value labels on top."""
        x = np.arange(len(groups))
        width = 0.8 / max(1, len(series))
        shown = []
        for k, (label, colour, values) in enumerate(series):
            offsets = x - 0.4 + width * (k + 0.5)
            ax.bar([xo for xo, v in zip(offsets, values) if v is not None],
                   [v for v in values if v is not None], width, label=label, color=colour)
            for xo, v in zip(offsets, values):
                if v is not None:
                    if len(series) * len(groups) <= 12:   # value labels where they fit
                        ax.text(xo, v, f"{v:.3g}", ha="center", va="bottom", fontsize=7)
                    shown.append(v)
        ax.set_xticks(x, groups)
        if log and shown and min(shown) > 0:
            ax.set_yscale("log")
            ax.set_ylim(min(shown) / 3, max(shown) * 3)
        else:
            ax.set_ylim(0, max(shown) * 1.18 if shown else 1)
        ax.legend(fontsize=8)

    # training step per precision
    ax = axes[0, 0]
    ax.set_title("training step, 572 tile, batch 1 (ms, lower is better)", fontsize=10)
    series = [("ours", colours["ours"], [_num(per.get(p, {}).get("train_step_ms")) for p in PRECISIONS]),
              ("ours, CUDA graph", colours["graph"],
               [_num(per.get(p, {}).get("graphed_train_step_ms")) for p in PRECISIONS]),
              ("PyTorch, paired setting", colours["torch"],
               [_num(per.get(p, {}).get("torch_train_step_ms")) for p in PRECISIONS])]
    series = [s for s in series if any(v is not None for v in s[2])]
    if series:
        groups = []
        for p in PRECISIONS:
            ratio = _num(per.get(p, {}).get("ratio"))
            groups.append(f"{p}\nvs {SHORT_SETTINGS[p]}" + (f"\n{ratio:.2f}x" if ratio else ""))
        grouped(ax, series, groups)
    else:
        no_data(ax, "no training-step figures")

    # 512x512 prediction per precision
    ax = axes[0, 1]
    ax.set_title("512x512 image, overlap-tile prediction (ms, log scale, lower is better)", fontsize=10)
    series = [("ours", colours["ours"], [_num(per.get(p, {}).get("infer_512_ms")) for p in PRECISIONS]),
              ("PyTorch, paired setting", colours["torch"],
               [_num(per.get(p, {}).get("torch_infer_512_ms")) for p in PRECISIONS])]
    series = [s for s in series if any(v is not None for v in s[2])]
    if series:
        grouped(ax, series, [f"{p}\nvs {SHORT_SETTINGS[p]}" for p in PRECISIONS], log=True)
        goal = ((results.get("summary") or {}).get("targets") or {}).get(INFER_TARGET, {}).get("goal")
        if _num(goal):
            ax.axhline(goal, color="k", linestyle="--", linewidth=0.8)
            ax.text(-0.45, goal, f" target bf16 <= {goal:g} ms", va="bottom", fontsize=7)
    else:
        no_data(ax, "no prediction figures")

    # the 3x3 convolution's kernel versions
    ax = axes[1, 0]
    ax.set_title("3x3 convolution by kernel version: fwd + both gradients (TFLOP/s, higher is better)",
                 fontsize=10)
    progression = version_progression(results)
    if progression:
        layers = list(progression)
        versions = [v for v in VERSION_ORDER if any(v in progression[l] for l in layers)]
        versions += sorted({v for l in layers for v in progression[l]} - set(versions))
        cmap = plt.get_cmap("viridis")
        grouped(ax, [(v, cmap(k / max(1, len(versions) - 1)), [progression[l].get(v) for l in layers])
                     for k, v in enumerate(versions)], layers)
    else:
        no_data(ax, "no per-version figures")

    # per layer: ours / PyTorch in each precision
    ax = axes[1, 1]
    ax.set_title("3x3 convolutions per layer: PyTorch time / ours, same precision (above 1: ours faster)",
                 fontsize=10)
    rows = conv_layers(results)
    plotted = False
    for p, colour in zip(PRECISIONS, ("#1f77b4", "#2ca02c", "#d62728")):
        points = [(k, r[p]["peer"] / r[p]["ours"]) for k, r in enumerate(rows)
                  if p in r and r[p]["complete"] and r[p]["ours"] > 0]
        if points:
            ax.plot([k for k, _ in points], [v for _, v in points], marker="o", label=p, color=colour)
            plotted = True
    if plotted:
        ax.axhline(1.0, color="k", linewidth=0.8)
        ax.set_xticks(range(len(rows)), [r["layer"] for r in rows], rotation=60, fontsize=8)
        ax.legend(fontsize=8)
    else:
        no_data(ax, "no per-op figures with peers")

    fig.tight_layout(rect=(0, 0, 1, 0.96))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------------
# Markdown
# ------------------------------------------------------------------------------------------------


def _cell(value, digits: int = 2, suffix: str = "") -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if _num(value) is None:
        return "-" if value is None else str(value)
    if isinstance(value, int) and not suffix:
        return str(value)
    return f"{value:.{digits}f}{suffix}"


def _target_cell(target: dict | None) -> str:
    if not target:
        return "-"
    goal = f"{target.get('comparison')} {target.get('goal')}{' ms' if target.get('unit') == 'ms' else 'x'}"
    status = {True: "**met**", False: "not met"}.get(target.get("met"), "not measured")
    return f"{goal}: {status}"


def headline_table(results: dict) -> list[str]:
    """The per-precision tables: the training step (ours, graphed, PyTorch, ratio, target) and the
    512x512 prediction; a note when the card is not the one the targets are set for."""
    per = _per_precision(results)
    targets = (results.get("summary") or {}).get("targets") or {}
    lines = ["| precision | 3x3 kernel | train step, ours (ms) | as a CUDA graph (ms) | PyTorch setting "
             "| PyTorch (ms) | PyTorch / ours | target |",
             "|---|---|---|---|---|---|---|---|"]
    for p in PRECISIONS:
        row = per.get(p) or {}
        lines.append(
            f"| {p} | {row.get('version') or '-'} | {_cell(row.get('train_step_ms'))} "
            f"| {_cell(row.get('graphed_train_step_ms'))} | {TORCH_SETTINGS[p]} "
            f"| {_cell(row.get('torch_train_step_ms'))} | {_cell(row.get('ratio'), 2, 'x')} "
            f"| {_target_cell(targets.get(TARGET_ROWS[p]))} |")
    lines += ["", "| precision | 512x512 prediction, ours (ms) | PyTorch (ms) | PyTorch / ours | target |",
              "|---|---|---|---|---|"]
    for p in PRECISIONS:
        row = per.get(p) or {}
        target = targets.get(INFER_TARGET) if p == "bf16" else None
        lines.append(f"| {p} | {_cell(row.get('infer_512_ms'))} | {_cell(row.get('torch_infer_512_ms'))} "
                     f"| {_cell(row.get('infer_ratio'), 2, 'x')} | {_target_cell(target)} |")
    card = results.get("gpu")
    if targets and "H100" not in (card or "").upper():
        lines += ["", f"The targets are set for an H100; this run is on {card or 'an unknown card'}."]
    return lines


def _shown(source: Path) -> str:
    """``source`` relative to the repository when inside it, else its name."""
    try:
        return Path(source).resolve().relative_to(ROOT).as_posix()
    except ValueError:
        return Path(source).name


def _run_line(results: dict, source: Path | None) -> str:
    commit = results.get("commit")
    text = (f"GPU run on **{results.get('gpu') or 'an unknown card'}**, commit "
            f"`{commit[:10] if commit else 'unknown'}`{' (uncommitted changes)' if results.get('dirty') else ''}, "
            f"{results.get('date') or 'no date'}")
    if source is not None:
        text += f" (`{_shown(source)}`)"
    return text + "."


def render_markdown(results: dict, source: Path | None = None) -> str:
    """Every figure of a run: the headline, the targets, the versions, every per-op row."""
    summary = results.get("summary") or {}
    lines = [f"### {_run_line(results, source)}", ""]
    tests = results.get("tests") or {}
    san = results.get("sanitizer") or {}
    counts = ", ".join(f"{_cell(tests.get(k))} {k}" for k in ("passed", "failed", "skipped", "errors"))
    errors = ", ".join(f"{tool} {_cell(san.get(f'{tool}_errors'))}"
                       for tool in ("memcheck", "racecheck", "initcheck", "synccheck"))
    lines += [f"GPU tests: {counts}. compute-sanitizer errors: {errors}.", ""]
    lines += headline_table(results)
    targets = summary.get("targets") or {}
    if targets:
        lines += ["", "| target | measured | goal | met | card |", "|---|---|---|---|---|"]
        for t in targets.values():
            unit = " ms" if t.get("unit") == "ms" else "x"
            lines.append(f"| {t.get('description')} | {_cell(t.get('value'), 2, unit)} "
                         f"| {t.get('comparison')} {t.get('goal')}{unit} "
                         f"| {_cell(t.get('met')) if t.get('met') is not None else 'not measured'} "
                         f"| {t.get('card') or '-'} |")
    lines += kernel_steps_table(results)
    check = summary.get("loss_check")
    if check:
        lines += ["", f"Loss against PyTorch FP32 after one step: relative error "
                      f"{_cell(check.get('rel_err_after'), 8)} (passed: {_cell(check.get('passed'))})."]
    progression = version_progression(results)
    if progression:
        versions = [v for v in VERSION_ORDER if any(v in row for row in progression.values())]
        lines += ["", "3x3 convolution by kernel version, forward + both gradients (TFLOP/s):", "",
                  "| layer | " + " | ".join(versions) + " |", "|---|" + "---|" * len(versions)]
        for layer, row in progression.items():
            lines.append(f"| {layer} | " + " | ".join(_cell(row.get(v), 1) for v in versions) + " |")
    ops = [r for r in results.get("benchmarks") or [] if r.get("kind") == "op"]
    if ops:
        lines += ["", "| op | layer | precision | shape | ms | TFLOP/s or GB/s | % of ceiling | PyTorch ms "
                      "(same precision) | ratio | cuDNN FP32 / TF32 / BF16 ms |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in ops:
            if _num(r.get("tflops")) is not None:
                rate = f"{r['tflops']:.2f} TFLOP/s"
            elif _num(r.get("gbps")) is not None:
                rate = f"{r['gbps']:.0f} GB/s"
            else:
                rate = "-"
            precision = r.get("precision") or "fp32"
            if r.get("version"):
                precision += f" ({r['version']})"
            settings = " / ".join(_cell(r.get(f"peer_{p}_ms"), 3) for p in PRECISIONS)
            lines.append(f"| {r.get('op')} | {r.get('layer')} | {precision} | {r.get('shape', '')} "
                         f"| {_cell(r.get('ms'), 3)} | {rate} | {_cell(r.get('pct_of_ceiling'), 1)} "
                         f"| {_cell(r.get('peer_ms'), 3)} | {_cell(r.get('ratio'))} | {settings} |")
    lines += autotune_table(results)
    lines += ncu_table(results)
    return "\n".join(lines) + "\n"


def kernel_steps_table(results: dict) -> list[str]:
    """The training step per named kernel, eager and as a CUDA graph, beside its mode's own step:
    where a kernel that is not yet the mode's default stands."""
    summary = results.get("summary") or {}
    own = summary.get("train_step_ms") or {}
    rows = []
    for key, (version, precision) in KERNEL_STEPS.items():  # collect_results' summary keys
        ms = summary.get(f"{key}_train_step_ms") or {}
        ratio = summary.get(f"{key}_train_step_ratio") or {}
        if any(_num(v) is not None for v in ms.values()):
            rows.append(f"| {version} | {precision} | {_cell(own.get(precision))} | {_cell(ms.get('eager'))} "
                        f"| {_cell(ms.get('graph'))} | {_cell(ratio.get('eager'))} | {_cell(ratio.get('graph'))} |")
    if not rows:
        return []
    return ["", "The training step by 3x3 kernel, beside its mode's own:", "",
            "| kernel | mode | the mode's step (ms) | step (ms) | as a CUDA graph (ms) | PyTorch / ours "
            "| as a graph |", "|---|---|---|---|---|---|---|"] + rows


def _plan_cell(plan) -> str:
    return f"{plan[0]} x {plan[1]} / {plan[2]}" if plan and len(plan) == 3 else "-"


def autotune_table(results: dict) -> list[str]:
    """The autotuned steps' tables of plans (train_step/ours_autotuned/<precision>): per precision a
    line of totals, then every GEMM whose measured plan differs from the rule's, the largest saving
    first."""
    records = [r for r in results.get("benchmarks") or []
               if r.get("kind") == "train_step" and r.get("impl") == "ours_autotuned" and r.get("plans")]
    if not records:
        return []
    lines = ["", "GEMM plans measured in the autotuned training steps (tile bm x bn / K slices; the rule's "
                 "plan and the one kept, as timed while tuning):"]
    for rec in records:
        plans = rec["plans"]
        changed = [e for e in plans if list(e.get("plan", [])) != list(e.get("rule", []))]
        timed = [e for e in plans if _num(e.get("ms")) is not None and _num(e.get("rule_ms")) is not None]
        rule_ms = sum(e["rule_ms"] for e in timed)
        chosen_ms = sum(e["ms"] for e in timed)
        lines += ["", f"**{rec.get('precision')}** ({rec.get('version')}): {len(plans)} GEMMs, {len(changed)} off "
                      f"the rule; their rule plans {_cell(rule_ms, 3)} ms, the plans kept {_cell(chosen_ms, 3)} ms; "
                      f"the step {_cell(rec.get('ms'), 2)} ms (first step, tuning: {_cell(rec.get('first_step_s'), 1)} s).",
                  "", "| op | M x cols x K (images) | rule | ms | kept | ms | rule / kept |",
                  "|---|---|---|---|---|---|---|"]

        def saving(e):
            return (e.get("rule_ms") or 0.0) - (e.get("ms") or 0.0)

        for e in sorted(changed, key=saving, reverse=True):
            dims = f"{e.get('M')} x {e.get('cols')} x {e.get('K')}"
            if e.get("images", 1) != 1:
                dims += f" ({e['images']})"
            ratio = e["rule_ms"] / e["ms"] if _num(e.get("ms")) and _num(e.get("rule_ms")) else None
            lines.append(f"| {e.get('op')} | {dims} | {_plan_cell(e.get('rule'))} | {_cell(e.get('rule_ms'), 3)} "
                         f"| {_plan_cell(e.get('plan'))} | {_cell(e.get('ms'), 3)} | {_cell(ratio)} |")
    return lines


# Nsight Compute's figures of each profiled GEMM kernel that the table shows (metric names as ncu
# reports them in its details page; bench/collect_results.py keeps every metric in "ncu").
NCU_COLUMNS = ("Duration", "Compute (SM) Throughput", "Memory Throughput", "Registers Per Thread",
               "Achieved Occupancy", "Issue Slots Busy", "Warp Cycles Per Issued Instruction")


def ncu_table(results: dict) -> list[str]:
    """One row per profiled GEMM kernel (the run's "ncu" entry): where its time goes."""
    cases = (results.get("ncu") or {}).get("cases") or []
    rows = []
    for case in cases:
        gemm = next((k for k in case.get("kernels") or [] if "template" in k), None)
        if gemm is None:
            continue
        by_name = {key.split(": ", 1)[-1].split(" [")[0]: (value, key.rsplit(" [", 1)[1].rstrip("]")
                                                            if " [" in key else "")
                   for key, value in (gemm.get("metrics") or {}).items()}
        cells = []
        for name in NCU_COLUMNS:
            value, unit = by_name.get(name, (None, ""))
            cells.append("-" if value is None else f"{_cell(value)} {unit}".strip())
        rows.append(f"| {case.get('op')} | {case.get('layer')} | {case.get('version')} | " + " | ".join(cells) + " |")
    if not rows:
        return []
    return ["", "Nsight Compute, the GEMM kernels (bench/ncu_driver.py):", "",
            "| op | layer | version | " + " | ".join(NCU_COLUMNS) + " |",
            "|---|---|---|" + "---|" * len(NCU_COLUMNS)] + rows


def render_readme_section(results: dict | None, source: Path | None = None,
                          image: str | None = None) -> str:
    """The text between the README's markers: the headline table of ``results`` with its card,
    commit and date, and the chart ``image`` (a path relative to the README) when given; or the
    statement that no GPU run is recorded yet."""
    if results is None:
        return NO_RUN + "\n"
    lines = [_run_line(results, source), ""]
    lines += headline_table(results)
    lines += ["", "Ratios are PyTorch's time over ours in the same run (above 1: ours is faster); "
                  "times are CUDA-event medians, the prediction wall time. Every figure: "
                  "`python3 bench/plot_results.py` writes `bench/plots/results.md`."]
    if image:
        lines += ["", f"![benchmark chart of this run]({image})"]
    return "\n".join(lines) + "\n"


def update_readme(readme: Path, section: str) -> bool:
    """Replaces the text between the two markers of ``readme`` with ``section``; True if the file
    changed. The markers must each appear once, start before end (ValueError otherwise)."""
    readme = Path(readme)
    text = readme.read_text(encoding="utf-8")
    if text.count(MARK_START) != 1 or text.count(MARK_END) != 1 or text.index(MARK_START) > text.index(MARK_END):
        raise ValueError(f"{readme} must hold {MARK_START} once, followed by {MARK_END} once")
    head, rest = text.split(MARK_START, 1)
    _, tail = rest.split(MARK_END, 1)
    new = f"{head}{MARK_START}\n{section.rstrip()}\n{MARK_END}{tail}"
    if new == text:
        return False
    readme.write_text(new, encoding="utf-8")
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Chart and tables of a GPU check's results JSON.")
    parser.add_argument("results", nargs="?", type=Path, help="a results JSON (default: the newest in bench/results)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--png", type=Path, default=DEFAULT_PNG)
    parser.add_argument("--markdown", type=Path, default=DEFAULT_MD)
    parser.add_argument("--readme", type=Path, nargs="?", const=README, default=None,
                        help="also rewrite the table between the markers of this README (default README.md); "
                             "with no results JSON it says that no GPU run is recorded yet")
    args = parser.parse_args(argv)
    try:
        source = args.results or latest_results(args.results_dir)
    except FileNotFoundError as exc:
        if args.readme is None:
            print(f"plot_results: {exc}", file=sys.stderr)
            return 1
        changed = update_readme(args.readme, render_readme_section(None))
        print(f"plot_results: {exc}; {args.readme}: no GPU run recorded yet"
              f"{'' if changed else ' (unchanged)'}")
        return 0
    results = json.loads(Path(source).read_text(encoding="utf-8"))
    png = None
    try:
        png = render_png(results, args.png)
    except ImportError as exc:   # matplotlib missing: the tables still render
        print(f"plot_results: no chart ({exc})", file=sys.stderr)
    args.markdown.parent.mkdir(parents=True, exist_ok=True)
    args.markdown.write_text(render_markdown(results, Path(source)), encoding="utf-8")
    print("\n".join(str(p) for p in (png, args.markdown) if p))
    if args.readme is not None:
        image = Path(os.path.relpath(png.resolve(), args.readme.resolve().parent)).as_posix() if png else None
        update_readme(args.readme, render_readme_section(results, Path(source), image))
        print(args.readme)
    return 0


if __name__ == "__main__":
    sys.exit(main())
