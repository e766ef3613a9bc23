"""Renders a GPU check's results JSON into a PNG bar chart and a markdown table (for the README).

    python3 bench/plot_results.py                       # the newest bench/results/*.json
    python3 bench/plot_results.py path/to/results.json --png out.png --markdown out.md

The newest file is the one with the latest ``date`` field (file time breaks ties). The chart has
three panels: the training step (ours against PyTorch in its three settings), the 512x512
prediction, and the 3x3 convolutions per layer (forward + both gradients, ours against cuDNN in
true FP32 and in TF32). Runs on the CPU (matplotlib's Agg backend).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "bench" / "results"
DEFAULT_PNG = ROOT / "bench" / "plots" / "results.png"
DEFAULT_MD = ROOT / "bench" / "plots" / "results.md"
SETTINGS = ("fp32", "tf32", "bf16")
CONV_OPS = ("conv3x3_forward", "conv3x3_backward_data", "conv3x3_backward_weight")


def latest_results(results_dir: Path = RESULTS_DIR) -> Path:
    files = sorted(Path(results_dir).glob("*.json"))
    if not files:
        raise FileNotFoundError(f"no results JSON in {results_dir}")

    def key(path: Path):
        try:
            date = json.loads(path.read_text(encoding="utf-8")).get("date") or ""
        except (OSError, ValueError, AttributeError):
            date = ""
        return (str(date), path.stat().st_mtime)

    return max(files, key=key)


def _num(value):
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def conv_layers(results: dict) -> list[dict]:
    """Per 3x3 layer: our and the peers' summed time of forward, data and weight gradient."""
    layers: dict[str, dict] = {}
    for rec in results.get("benchmarks") or []:
        if rec.get("kind") != "op" or rec.get("op") not in CONV_OPS or _num(rec.get("ms")) is None:
            continue
        row = layers.setdefault(rec["layer"], {"layer": rec["layer"], "ours": 0.0, "fp32": 0.0, "tf32": 0.0,
                                               "complete": True})
        row["ours"] += rec["ms"]
        for key, field in (("fp32", "peer_ms"), ("tf32", "peer_tf32_ms")):
            if _num(rec.get(field)) is None:
                row["complete"] = False
            else:
                row[key] += rec[field]
    return list(layers.values())


def render_png(results: dict, path: Path) -> Path:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    summary = results.get("summary") or {}
    fig = plt.figure(figsize=(13, 8.5))
    grid = fig.add_gridspec(2, 2, height_ratios=[1, 1.25])
    title = (f"unet-cuda on {results.get('gpu') or 'unknown GPU'} - commit "
             f"{(results.get('commit') or 'unknown')[:10]}{' (dirty)' if results.get('dirty') else ''}"
             f" - {results.get('date') or ''}")
    fig.suptitle(title, fontsize=11)

    def bars(ax, heading: str, ours: dict | float | None, peers: dict | None):
        labels, values, colours = [], [], []
        ours = {"fp32": ours} if _num(ours) is not None else (ours or {})
        for setting, ms in ours.items():
            if _num(ms) is not None:
                labels.append(f"ours {setting}")
                values.append(ms)
                colours.append("#d62728")
        for setting in SETTINGS:
            ms = (peers or {}).get(setting)
            if _num(ms) is not None:
                labels.append(f"PyTorch {setting}")
                values.append(ms)
                colours.append("#1f77b4")
        ax.set_title(heading, fontsize=10)
        if not values:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
            ax.set_axis_off()
            return
        positions = range(len(values))
        ax.barh(list(positions), values, color=colours)
        ax.set_yticks(list(positions), labels)
        ax.invert_yaxis()
        ax.set_xlabel("ms (lower is better)")
        for y, v in zip(positions, values):
            ax.text(v, y, f" {v:.1f}", va="center", fontsize=8)
        ax.set_xlim(0, max(values) * 1.2)

    bars(fig.add_subplot(grid[0, 0]), "training step, 572 tile, batch 1",
         summary.get("train_step_ms"), summary.get("torch_train_step_ms"))
    bars(fig.add_subplot(grid[0, 1]), "512x512 image, overlap-tile prediction",
         summary.get("infer_512_ms"), summary.get("torch_infer_512_ms"))

    ax = fig.add_subplot(grid[1, :])
    rows = conv_layers(results)
    ax.set_title("3x3 convolutions per layer: forward + data gradient + weight gradient", fontsize=10)
    if rows:
        import numpy as np  # noqa: PLC0415

        x = np.arange(len(rows))
        width = 0.27
        ax.bar(x - width, [r["ours"] for r in rows], width, label="ours (FP32)", color="#d62728")
        ax.bar(x, [r["fp32"] for r in rows], width, label="cuDNN FP32", color="#1f77b4")
        ax.bar(x + width, [r["tf32"] for r in rows], width, label="cuDNN TF32", color="#9ecae1")
        ax.set_xticks(x, [r["layer"] for r in rows])
        ax.set_ylabel("ms (lower is better)")
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no per-op figures", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _cell(value, digits: int = 2) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if _num(value) is None:
        return "-" if value is None else str(value)
    return f"{value:.{digits}f}"


def render_markdown(results: dict, source: Path | None = None) -> str:
    summary = results.get("summary") or {}
    lines = [
        f"### GPU check: {results.get('gpu') or 'unknown GPU'}, commit "
        f"`{(results.get('commit') or 'unknown')[:10]}`{' (dirty tree)' if results.get('dirty') else ''}, "
        f"{results.get('date') or 'no date'}",
        "",
    ]
    if source is not None:
        lines += [f"From `{source.name}`.", ""]
    tests = results.get("tests") or {}
    san = results.get("sanitizer") or {}
    counts = ", ".join(f"{_cell(tests.get(k))} {k}" for k in ("passed", "failed", "skipped", "errors"))
    errors = ", ".join(f"{tool} {_cell(san.get(f'{tool}_errors'))}"
                       for tool in ("memcheck", "racecheck", "initcheck", "synccheck"))
    lines += [f"GPU tests: {counts}. compute-sanitizer errors: {errors}.", ""]
    lines.append("| figure (ms, median) | ours | PyTorch FP32 | PyTorch TF32 | PyTorch BF16 |")
    lines.append("|---|---|---|---|---|")
    rows = (
        ("training step, 572 tile", (summary.get("train_step_ms") or {}).get("fp32"),
         summary.get("torch_train_step_ms")),
        ("512x512 prediction", summary.get("infer_512_ms"), summary.get("torch_infer_512_ms")),
    )
    for label, ours, peers in rows:
        peers = peers or {}
        lines.append(f"| {label} | {_cell(ours)} | " + " | ".join(_cell(peers.get(s)) for s in SETTINGS) + " |")
    check = summary.get("loss_check")
    if check:
        lines += ["", f"Loss against PyTorch FP32 after one step: relative error "
                      f"{_cell(check.get('rel_err_after'), 8)} (passed: {_cell(check.get('passed'))})."]
    ops = [r for r in results.get("benchmarks") or [] if r.get("kind") == "op"]
    if ops:
        lines += ["", "| op | layer | shape | ms | TFLOP/s or GB/s | % of ceiling | PyTorch FP32 ms | ratio "
                      "| cuDNN TF32 ms |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in ops:
            if _num(r.get("tflops")) is not None:
                rate = f"{r['tflops']:.2f} TFLOP/s"
            elif _num(r.get("gbps")) is not None:
                rate = f"{r['gbps']:.0f} GB/s"
            else:
                rate = "-"
            lines.append(f"| {r.get('op')} | {r.get('layer')} | {r.get('shape', '')} | {_cell(r.get('ms'), 3)} "
                         f"| {rate} | {_cell(r.get('pct_of_ceiling'), 1)} | {_cell(r.get('peer_ms'), 3)} "
                         f"| {_cell(r.get('ratio'))} | {_cell(r.get('peer_tf32_ms'), 3)} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Chart and table of a GPU check's results JSON.")
    parser.add_argument("results", nargs="?", type=Path, help="a results JSON (default: the newest in bench/results)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--png", type=Path, default=DEFAULT_PNG)
    parser.add_argument("--markdown", type=Path, default=DEFAULT_MD)
    args = parser.parse_args(argv)
    try:
        source = args.results or latest_results(args.results_dir)
    except FileNotFoundError as exc:
        print(f"plot_results: {exc}", file=sys.stderr)
        return 1
    results = json.loads(Path(source).read_text(encoding="utf-8"))
    png = render_png(results, args.png)
    args.markdown.parent.mkdir(parents=True, exist_ok=True)
    args.markdown.write_text(render_markdown(results, Path(source)), encoding="utf-8")
    print(f"{png}\n{args.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
