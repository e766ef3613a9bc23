"""Data augmentation (paper Sec. 3.1): elastic deformation, flips, 90-degree rotations, gray-value changes.

Elastic deformation
-------------------
The paper draws "random displacement vectors on a coarse 3x3 grid" from a Gaussian with 10 px
standard deviation and interpolates them bicubically to every pixel. Here:

* grid nodes sit at ``y_a = a (H - 1) / (grid - 1)``, ``x_b = b (W - 1) / (grid - 1)`` for
  ``a, b = 0..grid-1``, i.e. on the image corners, edge midpoints and centre for ``grid = 3``;
* ``coarse[c, a, b] ~ N(0, sigma^2)`` for the two components ``c`` (0 = rows/y, 1 = columns/x);
* the per-pixel field is the cubic-spline interpolant of the nodes
  (``scipy.ndimage.map_coordinates(order=3)`` with its spline prefilter), evaluated at grid
  coordinates ``(y (grid - 1) / (H - 1), x (grid - 1) / (W - 1))``. An interpolating spline passes
  through the node values exactly, is twice continuously differentiable, and with ``mode='mirror'``
  has zero slope across the image edges.

A warp reads every output pixel from the displaced position:
``out[y, x] = in[y + dy(y, x), x + dx(y, x)]``, interpolated with order 3 (bicubic spline) for
images, order 1 (bilinear) for weight maps and order 0 (nearest) for labels, so labels keep their
values. Positions outside the array are mirrored without repeating the edge pixel (scipy's
``'mirror'``, numpy's ``'reflect'``), the same extrapolation as the overlap-tile strategy.

Gray values (ours; the paper names only "gray value variations")
----------------------------------------------------------------
On the image only: ``x <- clip(x, 0, 1) ** gamma``, then ``x <- (x - 0.5) * contrast + 0.5 + brightness``,
clipped to [0, 1], with ``log(gamma) ~ U(-log 1.25, log 1.25)``, ``contrast ~ U(0.85, 1.15)`` and
``brightness ~ U(-0.08, 0.08)`` by default.

Reproducibility
---------------
All randomness comes from one ``numpy.random.Generator`` (PCG64) per :class:`Augmenter`; the same
seed and the same calls give the same results, and :meth:`Augmenter.get_state` /
:meth:`Augmenter.set_state` save and restore its position as a JSON-serialisable dict.
"""

from __future__ import annotations

import copy

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

__all__ = ["elastic_displacement", "upsample_grid", "warp", "AugmentParameters", "draw_parameters", "Augmenter"]


def upsample_grid(coarse: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Interpolate node values ``coarse[C, gy, gx]`` to a per-pixel field ``[C, H, W]`` (float32) by cubic splines.

    Node ``(a, b)`` sits at pixel ``(a (H-1)/(gy-1), b (W-1)/(gx-1))``; a side with one node is constant.
    """
    coarse = np.asarray(coarse, dtype=np.float64)
    if coarse.ndim != 3:
        raise ValueError(f"upsample_grid: expected coarse values [C, gy, gx], got shape {coarse.shape}")
    height, width = (int(s) for s in shape)
    grid_y, grid_x = coarse.shape[1:]

    def grid_coordinates(n_pixels: int, n_nodes: int) -> np.ndarray:
        if n_nodes == 1 or n_pixels == 1:
            return np.zeros(n_pixels)
        return np.arange(n_pixels) * ((n_nodes - 1) / (n_pixels - 1))

    coords = np.meshgrid(grid_coordinates(height, grid_y), grid_coordinates(width, grid_x), indexing="ij")
    field = np.empty((coarse.shape[0], height, width), dtype=np.float32)
    for component, nodes in enumerate(coarse):
        field[component] = ndimage.map_coordinates(nodes, coords, order=3, mode="mirror")
    return field


def elastic_displacement(
    shape: tuple[int, int], rng: np.random.Generator, grid: int = 3, sigma: float = 10.0
) -> np.ndarray:
    """A random smooth displacement field ``[2, H, W]`` float32 (``[0]`` = dy, ``[1]`` = dx) in px.

    Node values on a ``grid`` x ``grid`` lattice are drawn from ``N(0, sigma^2)`` (one
    ``rng.normal`` call of shape ``(2, grid, grid)``) and interpolated by :func:`upsample_grid`.
    """
    if grid < 2:
        raise ValueError(f"elastic_displacement: grid must be >= 2, got {grid}")
    coarse = rng.normal(0.0, sigma, size=(2, grid, grid))
    return upsample_grid(coarse, shape)


def warp(array: np.ndarray, displacement: np.ndarray, order: int, mode: str = "mirror") -> np.ndarray:
    """``out[y, x] = array[y + dy, x + dx]`` by spline interpolation of ``order`` (0, 1 or 3); same dtype.

    Float results are not clipped: bicubic interpolation can overshoot the input's range slightly.
    """
    array = np.asarray(array)
    displacement = np.asarray(displacement)
    if array.ndim != 2 or displacement.shape != (2, *array.shape):
        raise ValueError(
            f"warp: expected a 2D array and a displacement [2, H, W] of its size, "
            f"got {array.shape} and {displacement.shape}"
        )
    if order not in (0, 1, 3):
        raise ValueError(f"warp: order must be 0 (labels), 1 (weights) or 3 (images), got {order}")
    grid_y, grid_x = np.meshgrid(
        np.arange(array.shape[0], dtype=np.float64), np.arange(array.shape[1], dtype=np.float64), indexing="ij"
    )
    coords = np.stack([grid_y + displacement[0], grid_x + displacement[1]])
    if order == 0:
        # Nearest neighbour by rounding the coordinates ourselves: exact for any integer dtype.
        return ndimage.map_coordinates(array, np.round(coords), order=0, mode=mode, output=array.dtype)
    source = array.astype(np.float64) if array.dtype.kind != "f" else array
    return ndimage.map_coordinates(source, coords, order=order, mode=mode).astype(
        array.dtype if array.dtype.kind == "f" else np.float32
    )


@dataclass(frozen=True)
class AugmentParameters:
    """One draw: the arguments of ``ops.augment_warp`` after the three arrays."""

    coarse: np.ndarray       # float32 [2, g, g] node displacements in px
    quarter_turns: int       # 0..3 counter-clockwise
    flip_rows: bool
    flip_columns: bool
    gamma: float
    contrast: float
    brightness: float

    def as_dict(self) -> dict:
        """JSON-serialisable."""
        return {"coarse": self.coarse.tolist(), "quarter_turns": self.quarter_turns,
                "flip_rows": self.flip_rows, "flip_columns": self.flip_columns, "gamma": self.gamma,
                "contrast": self.contrast, "brightness": self.brightness}


# The options of draw_parameters, which an Augmenter keeps as attributes of the same names.
_DRAW_OPTIONS = ("elastic", "flips", "rot90", "gray", "grid", "sigma", "max_gamma", "max_contrast_change",
                 "max_brightness_change")


def draw_parameters(
    rng: np.random.Generator,
    *,
    elastic: bool = True,
    flips: bool = True,
    rot90: bool = True,
    gray: bool = True,
    grid: int = 3,
    sigma: float = 10.0,
    max_gamma: float = 1.25,
    max_contrast_change: float = 0.15,
    max_brightness_change: float = 0.08,
) -> AugmentParameters:
    """One augmentation drawn from ``rng`` in the fixed order of the module docstring."""
    if elastic:
        if grid < 2:
            raise ValueError(f"draw_parameters: grid must be >= 2, got {grid}")
        coarse = rng.normal(0.0, sigma, size=(2, grid, grid)).astype(np.float32)
    else:
        coarse = np.zeros((2, 1, 1), dtype=np.float32)
    flip_rows = flip_columns = False
    if flips:
        flip_rows, flip_columns = (bool(f) for f in rng.random(2) < 0.5)
    quarter_turns = int(rng.integers(4)) if rot90 else 0
    gamma, contrast, brightness = 1.0, 1.0, 0.0
    if gray:
        gamma = float(np.exp(rng.uniform(-np.log(max_gamma), np.log(max_gamma))))
        contrast = float(rng.uniform(1.0 - max_contrast_change, 1.0 + max_contrast_change))
        brightness = float(rng.uniform(-max_brightness_change, max_brightness_change))
    return AugmentParameters(coarse, quarter_turns, flip_rows, flip_columns, gamma, contrast, brightness)


class Augmenter:
    """Joint random augmentation of (image, labels, weights), reproducible from a seed.

    Each call applies, in this order and with the same random draws to all three arrays:

    1. ``elastic``: :func:`elastic_displacement` (``grid``, ``sigma``), warping the image with order
       3, the weights with order 1 and the labels with order 0; the image is clipped to [0, 1];
    2. ``flips``: up-down and left-right, each with probability 1/2;
    3. ``rot90``: ``k`` quarter turns, ``k`` uniform in {0, 1, 2, 3} (a non-square array's height
       and width swap for odd ``k``);
    4. ``gray``: gamma, contrast and brightness on the image only (module docstring).

    ``labels`` and ``weights`` may be ``None`` (they are then returned as ``None``).
    """

    def __init__(
        self,
        seed: int = 0,
        elastic: bool = True,
        flips: bool = True,
        rot90: bool = True,
        gray: bool = True,
        *,
        grid: int = 3,
        sigma: float = 10.0,
        max_gamma: float = 1.25,
        max_contrast_change: float = 0.15,
        max_brightness_change: float = 0.08,
    ):
        self.seed = seed
        self.elastic, self.flips, self.rot90, self.gray = bool(elastic), bool(flips), bool(rot90), bool(gray)
        self.grid, self.sigma = int(grid), float(sigma)
        self.max_gamma = float(max_gamma)
        self.max_contrast_change = float(max_contrast_change)
        self.max_brightness_change = float(max_brightness_change)
        self.rng = np.random.default_rng(seed)

    def get_state(self) -> dict:
        """The random generator's position, as a JSON-serialisable dict."""
        return copy.deepcopy(self.rng.bit_generator.state)

    def set_state(self, state: dict) -> None:
        """Continue exactly where :meth:`get_state` was taken."""
        self.rng.bit_generator.state = copy.deepcopy(state)

    def draw(self) -> AugmentParameters:
        """The next augmentation's random parameters (advances the generator); see :func:`draw_parameters`."""
        return draw_parameters(self.rng, **{name: getattr(self, name) for name in _DRAW_OPTIONS})

    def __call__(self, image: np.ndarray, labels: np.ndarray | None = None, weights: np.ndarray | None = None):
        image = np.asarray(image, dtype=np.float32)
        if image.ndim != 2:
            raise ValueError(f"Augmenter: expected a 2D image, got shape {image.shape}")
        for name, other in (("labels", labels), ("weights", weights)):
            if other is not None and np.shape(other) != image.shape:
                raise ValueError(f"Augmenter: {name} shape {np.shape(other)} differs from image shape {image.shape}")
        arrays = [image, labels, weights]
        p = self.draw()
        if self.elastic:
            displacement = upsample_grid(p.coarse, image.shape)
            orders = (3, 0, 1)
            arrays = [None if a is None else warp(a, displacement, order) for a, order in zip(arrays, orders)]
            arrays[0] = np.clip(arrays[0], 0.0, 1.0)
        if p.flip_rows:
            arrays = [None if a is None else a[::-1, :] for a in arrays]
        if p.flip_columns:
            arrays = [None if a is None else a[:, ::-1] for a in arrays]
        if p.quarter_turns:
            arrays = [None if a is None else np.rot90(a, p.quarter_turns) for a in arrays]
        if self.gray:
            adjusted = np.clip(arrays[0], 0.0, 1.0) ** p.gamma
            arrays[0] = np.clip((adjusted - 0.5) * p.contrast + 0.5 + p.brightness, 0.0, 1.0)
        image, labels, weights = (None if a is None else np.ascontiguousarray(a) for a in arrays)
        return image.astype(np.float32, copy=False), labels, weights
