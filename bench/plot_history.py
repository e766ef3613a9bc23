"""The training step across GPU checks: one row per committed results JSON that timed it, oldest
first, as a chart and a markdown table.

    python3 bench/plot_history.py                    # bench/results/ -> bench/plots/history.{png,md}
    python3 bench/plot_history.py --results-dir DIR --png out.png --markdown out.md

Each check times our step and PyTorch's in the same run, on the card it ran on; the ratio
(PyTorch's time over ours, above 1: ours is faster) is what compares across runs, since the cards
differ (an H100 or an H200: the same SMs and clocks, the H200 with 1.4x the memory bandwidth).
Runs without a timed step (a check of tests and a profile only) are left out. Runs on the CPU
(matplotlib's Agg backend).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "bench" / "results"
DEFAULT_PNG = ROOT / "bench" / "plots" / "history.png"
DEFAULT_MD = ROOT / "bench" / "plots" / "history.md"
PRECISIONS = ("fp32", "tf32", "bf16")
TARGETS = {"fp32": 1.0, "tf32": 1.5, "bf16": 1.2}   # the goals of the training step's ratio


def _number(value):
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def short_gpu(name: str | None) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'H100'; 'NVIDIA H200' -> 'H200'."""
    words = (name or "unknown GPU").replace("NVIDIA", "").split()
    return words[0] if words else "unknown GPU"


def history(results_dir: Path = RESULTS_DIR) -> list[dict]:
    """One row per results JSON with a timed training step, by the run's date: commit, card,
    date, and per precision our step, PyTorch's and their ratio (ms; None where not timed)."""
    rows = []
    for path in sorted(Path(results_dir).glob("*.json")):
        try:
            results = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        summary = results.get("summary") if isinstance(results, dict) else None
        ours = (summary or {}).get("train_step_ms") or {}
        torch = (summary or {}).get("torch_train_step_ms") or {}
        if not isinstance(ours, dict) or not any(_number(ours.get(p)) for p in PRECISIONS):
            continue
        row = {"file": path.name, "commit": (results.get("commit") or "unknown")[:7],
               "dirty": bool(results.get("dirty")), "gpu": short_gpu(results.get("gpu")),
               "date": str(results.get("date") or "")}
        for p in PRECISIONS:
            mine, theirs = _number(ours.get(p)), _number(torch.get(p) if isinstance(torch, dict) else None)
            row[p] = {"ms": mine, "torch_ms": theirs,
                      "ratio": theirs / mine if mine and theirs else None}
        rows.append(row)
    rows.sort(key=lambda r: (r["date"], r["file"]))
    return rows


def label(row: dict) -> str:
    return f"{row['commit']}{'+' if row['dirty'] else ''}\n{row['gpu']}"


def _fmt(value, suffix: str = "") -> str:
    return "-" if value is None else f"{value:.2f}{suffix}"


def render_markdown(rows: list[dict]) -> str:
    lines = ["# The training step across GPU checks", "",
             "Ours and PyTorch's time for one training step of the 572 tile (batch 1) in each "
             "precision mode, measured side by side in each check; the ratio is PyTorch's time over "
             "ours (above 1: ours is faster). Oldest first; written by `python3 bench/plot_history.py` "
             "from `bench/results/`.", "",
             "| run | card | date | " + " | ".join(f"{p}: ours / PyTorch (ms), ratio" for p in PRECISIONS) + " |",
             "|---|---|---|" + "---|" * len(PRECISIONS)]
    for row in rows:
        cells = [f"{_fmt(row[p]['ms'])} / {_fmt(row[p]['torch_ms'])}, {_fmt(row[p]['ratio'], 'x')}"
                 for p in PRECISIONS]
        commit = f"`{row['commit']}`" + (" (uncommitted changes)" if row["dirty"] else "")
        lines.append(f"| {commit} | {row['gpu']} | {row['date'][:16].replace('T', ' ')} | "
                     + " | ".join(cells) + " |")
    if not rows:
        lines.append("| - | - | - |" + " - |" * len(PRECISIONS))
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], png: Path) -> None:
    os.environ.setdefault("MPLBACKEND", "Agg")
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 5.2))
    xs = list(range(len(rows)))
    colors = {"fp32": "#7f7f7f", "tf32": "#d62728", "bf16": "#1f77b4"}
    for p in PRECISIONS:
        ys = [row[p]["ratio"] for row in rows]
        left.plot(xs, [y if y is not None else float("nan") for y in ys], "o-", color=colors[p], label=p)
        left.axhline(TARGETS[p], color=colors[p], linestyle=":", linewidth=1)
    left.axhline(1.0, color="black", linewidth=0.8)
    left.set_title("training step: PyTorch time / ours (above 1: ours faster; dotted: targets)")
    left.set_ylabel("ratio")
    left.legend(loc="upper left")
    ours = [row["tf32"]["ms"] for row in rows]
    theirs = [row["tf32"]["torch_ms"] for row in rows]
    right.plot(xs, [y if y is not None else float("nan") for y in ours], "o-", color=colors["tf32"],
               label="ours, tf32")
    right.plot(xs, [y if y is not None else float("nan") for y in theirs], "s--", color="#1f77b4",
               label="PyTorch + cuDNN, default TF32")
    for x, y in zip(xs, ours):
        if y is not None:
            right.annotate(f"{y:.1f}", (x, y), textcoords="offset points", xytext=(0, 6), ha="center",
                           fontsize=8)
    right.set_title("tf32 training step (ms, lower is better)")
    right.set_ylabel("ms")
    right.set_ylim(bottom=0)
    right.legend(loc="upper right")
    for ax in (left, right):
        ax.set_xticks(xs)
        ax.set_xticklabels([label(r) for r in rows], fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("unet-cuda across GPU checks (each ratio measured within one run, on its card)")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="The training step across the committed GPU checks: "
                                                 "a chart and a markdown table.")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--png", type=Path, default=DEFAULT_PNG)
    parser.add_argument("--markdown", type=Path, default=DEFAULT_MD)
    args = parser.parse_args(argv)
    rows = history(args.results_dir)
    if not rows:
        print(f"plot_history: no results JSON with a timed training step in {args.results_dir}",
              file=sys.stderr)
        return 1
    args.markdown.parent.mkdir(parents=True, exist_ok=True)
    args.markdown.write_text(render_markdown(rows), encoding="utf-8")
    plot(rows, args.png)
    print(args.png)
    print(args.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
