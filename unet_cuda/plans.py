"""Tables of GEMM plans as JSON-ready entries: their checks, their files and a view of them,
without CuPy.

A plan (docs/CONV3X3.md, "Plans by measurement") is a block tile ``bm x bn`` and a number of K
slices, for one GEMM known by its op, kernel version and dimensions. ``unet_cuda.ops.cuda`` keeps
the extension's table of them (``tuned_plans``, ``set_tuned_plans``, ``save_tuned_plans``,
``load_tuned_plans``); this module checks entries before any is entered and reads and writes the
files, so that a bad file is refused whole, with the entry and the reason named.

As a command, it shows what a table measured (a ``plans.json`` of ``train --autotune``)::

    python -m unet_cuda.plans runs/isbi-tuned/plans.json            # the GEMMs off the rule
    python -m unet_cuda.plans runs/isbi-tuned/plans.json --all --plot plans.png
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Callable, Iterable

KEY_FIELDS = ("op", "version", "M", "cols", "K", "images")
_TEXT_FIELDS = ("op", "version")


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def checked_entries(plans: Iterable, candidates: Callable[..., list]) -> list[tuple[tuple, tuple]]:
    """``[(key, plan)]`` of table entries (dicts with ``op``, ``version``, ``M``, ``cols``, ``K``,
    ``images`` and ``plan`` = ``[bm, bn, splits]``; other fields are ignored), each plan one that
    ``candidates(*key)`` offers. A ValueError names the first entry that is not such an entry."""
    if isinstance(plans, (str, bytes, dict)) or not isinstance(plans, Iterable):
        raise ValueError(f"the plans must be a list of entries, got {type(plans).__name__}")
    checked = []
    for i, entry in enumerate(plans):
        if not isinstance(entry, dict):
            raise ValueError(f"plan entry {i} must be a JSON object, got {entry!r}")
        missing = [f for f in KEY_FIELDS + ("plan",) if f not in entry]
        if missing:
            raise ValueError(f"plan entry {i} lacks {', '.join(missing)}: {entry!r}")
        bad = [f for f in _TEXT_FIELDS if not isinstance(entry[f], str)]
        bad += [f for f in KEY_FIELDS if f not in _TEXT_FIELDS and not _whole(entry[f])]
        if bad:
            raise ValueError(f"plan entry {i}: {', '.join(bad)} must be "
                             f"{'text' if set(bad) <= set(_TEXT_FIELDS) else 'whole numbers (op, version: text)'}: "
                             f"{entry!r}")
        plan = entry["plan"]
        if not isinstance(plan, (list, tuple)) or len(plan) != 3 or not all(_whole(v) for v in plan):
            raise ValueError(f"plan entry {i}: plan must be [bm, bn, splits], three whole numbers, got {plan!r}")
        key = tuple(entry[f] for f in KEY_FIELDS)
        try:
            offered = [tuple(p) for p in candidates(*key)]
        except (ValueError, TypeError, OverflowError) as exc:
            raise ValueError(f"plan entry {i}: {exc}") from None
        if tuple(plan) not in offered:
            raise ValueError(f"plan entry {i} ({key[0]}, {key[1]}, M {key[2]}, cols {key[3]}, K {key[4]}, "
                             f"images {key[5]}): plan {list(plan)} is not one of {offered}")
        checked.append((key, tuple(plan)))
    return checked


def read_plans_file(path) -> list:
    """The entries of a file written by ``write_plans_file`` (not yet checked)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("plans"), list):
        raise ValueError(f"{path} is not a table of plans (a JSON object with a list 'plans')")
    return data["plans"]


def write_plans_file(path, plans: list[dict], device: str | None) -> None:
    """Writes the entries, with the GPU's name (plans are timed on one card), atomically."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"device": device, "plans": plans}, indent=1) + "\n")
    os.replace(tmp, path)


def _measured(e: dict) -> bool:
    return e.get("ms") is not None and e.get("rule_ms") is not None


def _saving(e: dict) -> float:
    return (e["rule_ms"] - e["ms"]) if _measured(e) else 0.0


def _dims(e: dict) -> str:
    dims = f"{e['M']}x{e['cols']}x{e['K']}"
    return dims + (f" ({e['images']} images)" if e.get("images", 1) != 1 else "")


def _plan(p) -> str:
    return f"{p[0]}x{p[1]}/{p[2]}"


def format_plans(plans: list[dict], most: int | None = 5) -> str:
    """The GEMM plans of a table: a line of how many GEMMs, how many left the rule's plan, and the
    time of the rules' plans against the plans kept; then the GEMMs off the rule, the largest
    saving first (``most`` of them; None for all), a line each."""
    timed = [e for e in plans if _measured(e)]
    changed = [e for e in plans if list(e["plan"]) != list(e["rule"])]
    rule_ms, kept_ms = sum(e["rule_ms"] for e in timed), sum(e["ms"] for e in timed)
    lines = [f"GEMM plans measured: {len(plans)} GEMMs, {len(changed)} off the rule; the rules' plans "
             f"{rule_ms:.3f} ms, the plans kept {kept_ms:.3f} ms (per run: medians of five, timed while tuning)"]
    for e in sorted(changed, key=_saving, reverse=True)[:most]:
        where = f"  {e['op']} {_dims(e)}: "
        lines.append(where + (f"rule {_plan(e['rule'])} {e['rule_ms']:.3f} ms -> {_plan(e['plan'])} {e['ms']:.3f} ms"
                              if _measured(e) else f"{_plan(e['plan'])} (set by hand)"))
    return "\n".join(lines)


def plot_plans(plans: list[dict], path) -> Path:
    """A bar per measured GEMM off the rule, largest saving on top: the rule's plan's time beside
    the kept plan's."""
    from .plots import _pyplot

    plt = _pyplot()
    rows = sorted((e for e in plans if _measured(e) and list(e["plan"]) != list(e["rule"])), key=_saving)
    fig, ax = plt.subplots(figsize=(10, max(2.5, 0.32 * len(rows) + 1.2)))
    y = range(len(rows))
    ax.barh([i + 0.2 for i in y], [e["rule_ms"] for e in rows], height=0.4, color="0.7", label="rule's plan")
    ax.barh([i - 0.2 for i in y], [e["ms"] for e in rows], height=0.4, color="C0", label="plan kept")
    ax.set_yticks(list(y))
    ax.set_yticklabels([f"{e['op']} {_dims(e)}  {_plan(e['rule'])} -> {_plan(e['plan'])}" for e in rows],
                       fontsize=7)
    ax.set_xlabel("ms per run")
    ax.set_title(f"GEMM plans measured: {len(rows)} of {len(plans)} GEMMs off the rule")
    if rows:
        ax.legend(loc="lower right")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    """``python -m unet_cuda.plans FILE [--all] [--plot PNG]``; returns the exit code."""
    p = argparse.ArgumentParser(prog="python -m unet_cuda.plans",
                                description="Show a table of GEMM plans (the plans.json of train --autotune): "
                                            "how many GEMMs left the rules' plans, and what each saved.")
    p.add_argument("file", help="a plans.json (train --autotune writes one into its --out folder)")
    p.add_argument("--all", action="store_true", help="list every GEMM off the rule, not the five largest savings")
    p.add_argument("--plot", metavar="PNG", default=None, help="also draw the rule's time beside the kept plan's")
    args = p.parse_args(argv)
    try:
        plans = read_plans_file(args.file)
        if not all(isinstance(e, dict) and {"op", "M", "cols", "K", "plan", "rule"} <= set(e) for e in plans):
            raise ValueError(f"{args.file}: every entry needs op, M, cols, K, plan and rule")
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_plans(plans, None if args.all else 5))
    if args.plot:
        print(plot_plans(plans, args.plot))
    return 0


if __name__ == "__main__":
    sys.exit(main())
