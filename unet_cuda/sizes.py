"""Size arithmetic of the U-Net: which tile sizes are legal, what comes out, where skips are cropped.

Everything here follows from the layer arithmetic, for any depth (number of resolution levels;
the paper's network has 5):

* each level applies two valid 3x3 convolutions: size ``s -> s - 4``;
* between contracting levels a 2x2 stride-2 max-pool: ``s -> s / 2``, legal only for even ``s``;
* each expanding level up-convolves (``s -> 2 s``), concatenates the centre-cropped skip, and
  applies two valid 3x3 convolutions again (``s -> s - 4``).

For depth 5 this gives 572 -> 388 with skip crops of 4, 16, 40 and 88 px per side.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "IllegalSizeError",
    "SizePlan",
    "plan",
    "output_size",
    "is_legal_input_size",
    "legal_input_sizes",
    "nearest_legal_input_sizes",
    "input_size_for_output",
    "context_border",
]


class IllegalSizeError(ValueError):
    """An input size that the network cannot process (a pool would see an odd size, or a map vanishes)."""


@dataclass(frozen=True)
class SizePlan:
    """Spatial size of every stage for one input size.

    ``skip_sizes[l]``: size of the contracting path's feature map at level ``l`` (after its convs);
    ``up_sizes[l]``: size of the up-convolved map that is concatenated with it;
    ``crops[l]``: pixels cropped from each side of the skip, ``(skip - up) / 2``.
    Levels are numbered from the top (full resolution) down, so ``crops[0]`` is the largest.
    """

    depth: int
    input_size: int
    skip_sizes: tuple[int, ...]
    bottleneck_size: int
    up_sizes: tuple[int, ...]
    crops: tuple[int, ...]
    output_size: int


def _check_depth(depth: int) -> None:
    if not isinstance(depth, int) or depth < 1:
        raise ValueError(f"depth must be an integer >= 1, got {depth!r}")


def _try_plan(n: int, depth: int) -> SizePlan | str:
    """The plan for input size ``n``, or a string saying why ``n`` is illegal."""
    if n < 1:
        return f"input size {n} is not positive"
    s = n
    skips = []
    for level in range(depth - 1):
        s -= 4
        if s < 2:
            return f"level {level} convolutions leave {s} px"
        if s % 2:
            return f"the max-pool after level {level} would see an odd size ({s} px)"
        skips.append(s)
        s //= 2
    s -= 4
    if s < 1:
        return f"the bottleneck convolutions leave {s} px"
    bottleneck = s
    ups, crops = [], []
    for level in reversed(range(depth - 1)):
        s *= 2
        up = s
        crop2 = skips[level] - up
        if crop2 < 0 or crop2 % 2:  # cannot happen for depth >= 1 with valid convs; kept as a guard
            return f"skip at level {level} ({skips[level]} px) cannot be centre-cropped to {up} px"
        ups.append(up)
        crops.append(crop2 // 2)
        s -= 4
        if s < 1:
            return f"the expanding level {level} convolutions leave {s} px"
    ups.reverse()
    crops.reverse()
    return SizePlan(depth, n, tuple(skips), bottleneck, tuple(ups), tuple(crops), s)


def plan(n: int, depth: int = 5) -> SizePlan:
    """The full size plan for input size ``n``; raises :class:`IllegalSizeError` naming the nearest legal sizes."""
    _check_depth(depth)
    result = _try_plan(int(n), depth)
    if isinstance(result, str):
        below, above = nearest_legal_input_sizes(n, depth)
        near = " or ".join(str(v) for v in (below, above) if v is not None)
        raise IllegalSizeError(
            f"input size {n} is illegal for a U-Net of depth {depth}: {result}. "
            f"Nearest legal input sizes: {near}."
        )
    return result


def output_size(n: int, depth: int = 5) -> int:
    """Output size for an ``n`` x ``n`` input tile (572 -> 388 at depth 5)."""
    return plan(n, depth).output_size


def is_legal_input_size(n: int, depth: int = 5) -> bool:
    _check_depth(depth)
    return not isinstance(_try_plan(int(n), depth), str)


def legal_input_sizes(depth: int = 5, max_size: int = 1024, min_size: int = 1) -> list[int]:
    """All legal input sizes in ``[min_size, max_size]``, ascending."""
    _check_depth(depth)
    return [n for n in range(max(1, min_size), max_size + 1) if is_legal_input_size(n, depth)]


def _smallest_legal(depth: int) -> int:
    n = 1
    while not is_legal_input_size(n, depth):
        n += 1
    return n


def nearest_legal_input_sizes(n: int, depth: int = 5) -> tuple[int | None, int]:
    """The largest legal size <= n (None if there is none) and the smallest legal size >= n.

    Legal sizes form an arithmetic progression with step ``2**(depth-1)`` starting at the smallest one.
    """
    _check_depth(depth)
    first = _smallest_legal(depth)
    step = 2 ** (depth - 1)
    if n <= first:
        return (first if n == first else None), first
    k = (n - first) // step
    below = first + k * step
    above = below if below == n else below + step
    return below, above


def input_size_for_output(m: int, depth: int = 5) -> int:
    """The smallest legal input size whose output is at least ``m`` px."""
    _check_depth(depth)
    first = _smallest_legal(depth)
    step = 2 ** (depth - 1)
    n = first
    while output_size(n, depth) < m:
        n += step
    return n


def context_border(depth: int = 5) -> int:
    """Pixels lost on each side between input and output (92 at depth 5)."""
    n = _smallest_legal(depth)
    return (n - output_size(n, depth)) // 2
