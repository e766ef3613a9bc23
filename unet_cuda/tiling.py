"""Tiles: random training tiles, and the overlap-tile strategy for inference on images of any size (paper Fig. 2).

Geometry
--------
With valid convolutions an input tile of ``tile`` px gives an output tile of ``out`` px
(:func:`unet_cuda.sizes.output_size`; 572 -> 388 at depth 5), and output pixel ``(i, j)`` sees the
input pixels ``[i, i + 2 b] x [j, j + 2 b]`` with the context border ``b = (tile - out) / 2``
(92 px at depth 5). An output window with origin ``(y, x)`` in image coordinates is therefore
predicted from the input window with origin ``(y - b, x - b)``.

Mirror extrapolation
--------------------
Where a window reaches outside the image, the missing pixels are the image mirrored at its edges
*without repeating the edge pixel* (numpy's ``'reflect'``): ``..., a2, a1, | a0, a1, a2, ... | ...``.
Applied again and again for windows far outside a small image, this is periodic with period
``2 (n - 1)``; see :func:`reflect_index`. Windows are gathered by index arrays, so the padded image
is never built.

Overlap-tile inference
----------------------
:func:`tile_grid` covers each axis of length ``n`` by ``ceil(n / out)`` output tiles at
``0, out, 2 out, ...``; the last one is shifted back to end exactly at the image edge (so it keeps
full real context where the image allows), and when ``n < out`` the single tile at 0 is cropped. A
shifted last tile overlaps its neighbour; each pixel is written only once, from the first tile that
covers it, so the output is a partition of the image into tile pieces (:func:`axis_tiles`).
:func:`overlap_tile_predict` streams the input tiles in batches: at most ``batch_size`` input tiles
exist at a time, besides the ``[K, H, W]`` result.

Which tile size
---------------
Every tile recomputes its context border, so small tiles waste work: four 572 tiles (388 px out)
cover a 512 x 512 image from 4 x 572^2 = 1.31 M input pixels, one 700 tile (516 px out) from
0.49 M. The paper favours large tiles for that reason. :func:`inference_tile` picks, among the
legal sizes up to a memory bound, the one that computes the fewest input pixels in all (tiles x
tile^2, the cost of a forward pass being about proportional to its input area).
"""

from __future__ import annotations

from typing import Callable, Iterator

import numpy as np

from . import ops
from .sizes import legal_input_sizes, plan
from .weightmap import WeightMapCache

__all__ = [
    "reflect_index",
    "mirror_window",
    "axis_tiles",
    "tile_grid",
    "inference_tile",
    "TrainingTileSampler",
    "overlap_tile_predict",
    "flip_tta",
]


def reflect_index(index: np.ndarray, n: int) -> np.ndarray:
    """Map any integer positions to ``[0, n)`` by mirroring without repeating the edge (period ``2(n-1)``).

    ``-1 -> 1``, ``-2 -> 2``, ``n -> n - 2``; for ``n == 1`` every position maps to 0. Equal to what
    ``numpy.pad(mode='reflect')`` produces for pads of any width.
    """
    index = np.asarray(index, dtype=np.int64)
    if n < 1:
        raise ValueError(f"reflect_index: axis length must be >= 1, got {n}")
    if n == 1:
        return np.zeros_like(index)
    period = 2 * (n - 1)
    folded = np.mod(index, period)
    return np.where(folded < n, folded, period - folded)


def mirror_window(array: np.ndarray, y0: int, x0: int, height: int, width: int) -> np.ndarray:
    """The window ``array[y0:y0+height, x0:x0+width]`` of a 2D array, mirrored where it leaves the array (a copy)."""
    rows = reflect_index(np.arange(y0, y0 + height), array.shape[0])
    columns = reflect_index(np.arange(x0, x0 + width), array.shape[1])
    return array[np.ix_(rows, columns)]


def axis_tiles(n: int, out: int) -> list[tuple[int, int, int]]:
    """Output tiles along one axis of length ``n``: ``(origin, start, stop)`` per tile.

    The tile covers ``[origin, origin + out)``; it writes ``[start, stop)``. The written ranges
    partition ``[0, n)``. Origins are ``0, out, 2 out, ...`` with the last one ``n - out`` when
    ``n > out``, and the single origin 0 when ``n <= out``.
    """
    if n < 1 or out < 1:
        raise ValueError(f"axis_tiles: need n >= 1 and out >= 1, got n={n}, out={out}")
    if n <= out:
        return [(0, 0, n)]
    count = -(-n // out)
    origins = [k * out for k in range(count - 1)] + [n - out]
    tiles, written_to = [], 0
    for origin in origins:
        stop = min(origin + out, n)
        tiles.append((origin, written_to, stop))
        written_to = stop
    return tiles


def tile_grid(height: int, width: int, out: int) -> list[tuple[int, int]]:
    """Origins ``(y, x)`` of the output tiles covering a ``height`` x ``width`` image, in raster order."""
    return [(y, x) for y, _, _ in axis_tiles(height, out) for x, _, _ in axis_tiles(width, out)]


def inference_tile(height: int, width: int, depth: int = 5, max_tile: int = 572) -> int:
    """The legal input tile size, at most ``max_tile``, that predicts a ``height`` x ``width`` image
    by :func:`overlap_tile_predict` with the fewest input pixels computed in all (ties: the smaller
    tile). ``max_tile`` bounds the memory of one forward pass.

    >>> inference_tile(512, 512, depth=5, max_tile=1052)   # one tile of 700 (516 px out)
    700
    """
    if height < 1 or width < 1:
        raise ValueError(f"inference_tile: need an image of at least 1 x 1 px, got {height} x {width}")
    candidates = legal_input_sizes(depth, max_size=int(max_tile))
    if not candidates:
        raise ValueError(f"inference_tile: no legal tile size for depth {depth} is <= {max_tile}")

    def cost(tile: int) -> int:
        out = plan(tile, depth).output_size
        return len(axis_tiles(height, out)) * len(axis_tiles(width, out)) * tile * tile

    return min(candidates, key=lambda tile: (cost(tile), tile))


def _tile_sizes(tile: int, depth: int) -> tuple[int, int]:
    """``(out, border)`` for a legal ``tile`` (raises :class:`unet_cuda.sizes.IllegalSizeError` otherwise)."""
    out = plan(tile, depth).output_size
    return out, (tile - out) // 2


# --------------------------------------------------------------------------------------------------
# Training tiles
# --------------------------------------------------------------------------------------------------


class TrainingTileSampler:
    """Random training tiles: ``(input float32 [tile, tile], labels int32 [out, out], weights float32 [out, out])``.

    Each sample picks an image uniformly, then an output window of ``out`` x ``out`` px: uniformly
    inside the image along an axis where the image is at least ``out`` px long, and otherwise
    uniformly among the positions that contain the whole image (origin in ``[n - out, 0]``), the
    rest being mirrored. The input tile is the window grown by the context border on each side;
    labels are the binary classes (0 background, 1 foreground) and weights the loss weight map
    (:mod:`unet_cuda.weightmap`) of the image, both cut to the output window, mirrored likewise.

    With an ``augmenter`` (e.g. :class:`unet_cuda.augment.Augmenter`), the input-sized windows of
    image, labels and weights, grown further by ``augment_margin`` px on each side, are augmented
    jointly first and then cut to the input tile and the output window; the margin lets an elastic
    deformation pull in real neighbouring pixels rather than mirrored ones. An augmenter that returns
    CuPy arrays (:class:`unet_cuda.augment_gpu.GpuAugmenter`) makes the tiles CuPy arrays too.

    ``rng``: a ``numpy.random.Generator`` or an integer seed (``None`` means seed 0). Weight maps
    come from ``weights`` (a precomputed ``[n, H, W]`` array) or else from ``weight_cache``
    (default: an in-memory :class:`WeightMapCache` with the paper's w0 = 10, sigma = 5), computed
    the first time an image is drawn.
    """

    def __init__(
        self,
        dataset,
        tile: int = 572,
        depth: int = 5,
        rng: np.random.Generator | int | None = None,
        *,
        augmenter: Callable | None = None,
        augment_margin: int = 32,
        weights: np.ndarray | None = None,
        weight_cache: WeightMapCache | None = None,
    ):
        self.dataset = dataset
        self.tile = int(tile)
        self.depth = int(depth)
        self.out, self.border = _tile_sizes(self.tile, self.depth)
        self.rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(0 if rng is None else rng)
        self.augmenter = augmenter
        self.augment_margin = int(augment_margin) if augmenter is not None else 0
        if weights is not None:
            weights = np.asarray(weights, dtype=np.float32)
            if weights.shape != dataset.images.shape:
                raise ValueError(f"TrainingTileSampler: weights shape {weights.shape} differs from images "
                                 f"shape {dataset.images.shape}")
        self.weights = weights
        self.weight_cache = weight_cache if weight_cache is not None else WeightMapCache()
        self._weights_by_index: dict[int, np.ndarray] = {}

    def weight_map(self, index: int) -> np.ndarray:
        """The full-image weight map of image ``index`` (looked up in the cache once per image)."""
        if self.weights is not None:
            return self.weights[index]
        if index not in self._weights_by_index:
            self._weights_by_index[index] = self.weight_cache.get(self.dataset.instances[index])
        return self._weights_by_index[index]

    def get_state(self) -> dict:
        """The random generator's position (JSON-serialisable)."""
        return self.rng.bit_generator.state

    def set_state(self, state: dict) -> None:
        self.rng.bit_generator.state = state

    def _window_origin(self, n: int) -> int:
        if n >= self.out:
            return int(self.rng.integers(0, n - self.out + 1))
        return int(self.rng.integers(n - self.out, 1))

    def sample(self, index: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One training tile from image ``index`` (random image when ``None``)."""
        if index is None:
            index = int(self.rng.integers(len(self.dataset)))
        image = self.dataset.images[index]
        labels = self.dataset.labels[index]
        weights = self.weight_map(index)
        out_y = self._window_origin(image.shape[0])
        out_x = self._window_origin(image.shape[1])
        grow = self.border + self.augment_margin
        size = self.out + 2 * grow
        windows = [mirror_window(a, out_y - grow, out_x - grow, size, size) for a in (image, labels, weights)]
        if self.augmenter is not None:
            windows = list(self.augmenter(windows[0], windows[1], windows[2]))
        m, c = self.augment_margin, self.augment_margin + self.border
        input_tile = windows[0][m: m + self.tile, m: m + self.tile]
        label_tile = windows[1][c: c + self.out, c: c + self.out]
        weight_tile = windows[2][c: c + self.out, c: c + self.out]
        xp = ops.array_module(input_tile)  # CuPy when the augmenter ran on the GPU
        return (
            xp.ascontiguousarray(input_tile, dtype=np.float32),
            xp.ascontiguousarray(label_tile, dtype=np.int32),
            xp.ascontiguousarray(weight_tile, dtype=np.float32),
        )

    __call__ = sample

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        while True:
            yield self.sample()


# --------------------------------------------------------------------------------------------------
# Overlap-tile inference
# --------------------------------------------------------------------------------------------------


def _to_numpy(array) -> np.ndarray:
    """A NumPy copy of a NumPy or CuPy-like array (anything with ``.get()``)."""
    if isinstance(array, np.ndarray):
        return array
    if hasattr(array, "get"):
        return np.asarray(array.get())
    return np.asarray(array)


def overlap_tile_predict(
    image_2d: np.ndarray,
    predict_fn: Callable[[np.ndarray], np.ndarray],
    tile: int = 572,
    depth: int = 5,
    batch_size: int = 1,
    progress: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """Predict a 2D image of any size tile by tile; returns ``[K, H, W]`` float32.

    ``predict_fn(batch)`` takes ``[B, 1, tile, tile]`` float32 (``B <= batch_size``) and returns
    ``[B, K, out, out]`` (NumPy, or CuPy-like with ``.get()``). Tiles follow :func:`tile_grid`;
    borders are mirror-extrapolated (module docstring). ``progress(done, total)`` is called after
    every batch with the number of tiles done.
    """
    image = np.asarray(image_2d, dtype=np.float32)
    if image.ndim != 2 or image.size == 0:
        raise ValueError(f"overlap_tile_predict: expected a non-empty 2D image, got shape {image.shape}")
    if not np.isfinite(image).all():
        raise ValueError("overlap_tile_predict: the image contains NaN or Inf")
    if batch_size < 1:
        raise ValueError(f"overlap_tile_predict: batch_size must be >= 1, got {batch_size}")
    tile = int(tile)
    out, border = _tile_sizes(tile, int(depth))
    height, width = image.shape
    rows, columns = axis_tiles(height, out), axis_tiles(width, out)
    jobs = [(r, c) for r in rows for c in columns]
    total = len(jobs)
    result: np.ndarray | None = None
    batch = np.empty((min(batch_size, total), 1, tile, tile), dtype=np.float32)
    for first in range(0, total, batch_size):
        chunk = jobs[first: first + batch_size]
        for slot, ((y, _, _), (x, _, _)) in enumerate(chunk):
            batch[slot, 0] = mirror_window(image, y - border, x - border, tile, tile)
        predicted = _to_numpy(predict_fn(batch[: len(chunk)]))
        if predicted.ndim != 4 or predicted.shape[0] != len(chunk) or predicted.shape[2:] != (out, out):
            raise ValueError(
                f"overlap_tile_predict: predict_fn returned shape {predicted.shape} for a batch of "
                f"{len(chunk)} tiles of {tile} px; expected [{len(chunk)}, K, {out}, {out}]"
            )
        if result is None:
            result = np.empty((predicted.shape[1], height, width), dtype=np.float32)
        elif predicted.shape[1] != result.shape[0]:
            raise ValueError(f"overlap_tile_predict: predict_fn changed its class count from "
                             f"{result.shape[0]} to {predicted.shape[1]}")
        for slot, ((y, y_start, y_stop), (x, x_start, x_stop)) in enumerate(chunk):
            result[:, y_start:y_stop, x_start:x_stop] = predicted[
                slot, :, y_start - y: y_stop - y, x_start - x: x_stop - x
            ]
        if progress is not None:
            progress(first + len(chunk), total)
    return result


def flip_tta(predict_fn: Callable[[np.ndarray], np.ndarray]) -> Callable[[np.ndarray], np.ndarray]:
    """Wrap ``predict_fn`` to average its prediction over the 4 flips of each input tile.

    ``f_tta(x) = 1/4 sum_{F in {id, up-down, left-right, both}} F(f(F(x)))``: each flip is undone on
    the output. The output window is centred in the input tile, so flipping the input flips the
    window in place. Costs four calls of ``predict_fn`` per batch.
    """

    def predict_with_flips(batch: np.ndarray) -> np.ndarray:
        total = None
        for axes in ((), (2,), (3,), (2, 3)):
            flipped = np.ascontiguousarray(np.flip(batch, axis=axes)) if axes else batch
            predicted = _to_numpy(predict_fn(flipped)).astype(np.float32)
            predicted = np.flip(predicted, axis=axes) if axes else predicted
            total = predicted.copy() if total is None else total + predicted
        return total / np.float32(4.0)

    return predict_with_flips
