"""What the three command lines (``train``, ``predict``, ``profile``) share."""

from __future__ import annotations

import functools
import sys
from typing import Callable

from . import ops


def fail(message: str, code: int = 2) -> int:
    """Prints ``error: message`` to stderr and returns the exit code (2: a usage error)."""
    print(f"error: {message}", file=sys.stderr)
    return code


def restores_precision(body: Callable[..., int]) -> Callable[..., int]:
    """``main = restores_precision(_main)``: the command line's entry point; the precision mode it
    selects (``--precision``) ends with it, so a caller in the same process keeps its own."""

    @functools.wraps(body)
    def main(argv=None) -> int:
        with ops.restoring_precision():
            return body(argv)

    main.__doc__ = "The command line; returns the exit code. The precision it selects ends with it."
    return main
