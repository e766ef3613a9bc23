"""Tables of GEMM plans as JSON-ready entries: their checks and their files, without CuPy.

A plan (docs/CONV3X3.md, "Plans by measurement") is a block tile ``bm x bn`` and a number of K
slices, for one GEMM known by its op, kernel version and dimensions. ``unet_cuda.ops.cuda`` keeps
the extension's table of them (``tuned_plans``, ``set_tuned_plans``, ``save_tuned_plans``,
``load_tuned_plans``); this module checks entries before any is entered and reads and writes the
files, so that a bad file is refused whole, with the entry and the reason named.
"""

from __future__ import annotations

import json
import os
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
