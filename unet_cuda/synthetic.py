"""A built-in, download-free stand-in for serial-section EM: touching cells separated by thin membranes.

The ISBI 2012 data (see ``shared/data/isbi2012/README.md``) shows neuronal cross sections packed
edge to edge, separated by dark membranes 2-4 px wide, with textured interiors and dark organelles
that are *not* boundaries. :func:`make_em_like` draws images with the same structure so the whole
pipeline (weight maps, augmentation, training, overlap-tile inference, metrics) can run without any
download.

How one image is drawn
----------------------
1. **Cells = Voronoi regions.** Seeds are placed on a jittered square grid with spacing
   ``cell_diameter`` (each seed moved uniformly by up to 45 % of the spacing), so cell sizes vary but
   no cell is vanishingly small. Every pixel belongs to its nearest seed.
2. **Irregular outlines.** Before the nearest seed is looked up, each pixel position ``x`` is moved
   by a smooth random displacement ``u(x)`` (amplitude about ``cell_diameter / 8``). Straight
   Voronoi edges become gently curved, as in tissue.
3. **Membranes.** For a (displaced) position ``p`` with nearest seed ``s1`` and second-nearest seed
   ``s2`` (distances ``r1 <= r2``), the distance from ``p`` to the bisector between the two seeds is

       dist(p) = (r2^2 - r1^2) / (2 |s2 - s1|).

   A pixel is membrane when ``dist < h(x)``, with the half-width ``h`` a smooth field between 1 and
   2 px, so membranes are 2-4 px wide. Because every membrane is at least 2 px wide, no two
   4-neighbouring interior pixels can lie on different sides of a bisector, and the connected
   components of the interior are exactly the cells. Interior pieces under 16 px (slivers where
   three membranes meet) are made membrane.
4. **Gray values.** Each cell gets a base gray value, a fine smooth texture, small dark vesicles
   and a few larger dark organelles; membranes are dark with an anti-aliased edge. A mild
   illumination gradient, a Gaussian blur (sigma 0.8 px) and Gaussian noise (sigma 0.04) follow, and
   the result is clipped to [0, 1].

Labels follow the project's convention: instance label 0 = membrane/background, 1..M = cells, and
the binary label (:func:`binary_from_instances`) is 1 on cell interiors.

Image ``i`` of a call depends only on ``(seed, i)`` (one child seed per image from
``numpy.random.SeedSequence(seed).spawn``), so ``make_em_like(3, seed=s)[0][0]`` equals
``make_em_like(10, seed=s)[0][0]``.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

__all__ = ["make_em_like", "binary_from_instances"]

_MIN_CELL_AREA = 16  # px; smaller interior pieces (slivers at membrane junctions) become membrane


def _smooth_field(shape: tuple[int, int], rng: np.random.Generator, scale: float) -> np.ndarray:
    """A smooth random field of zero mean and unit standard deviation, correlated over ``scale`` px.

    White noise is drawn on a coarse grid with one node every ``scale`` px and upsampled by cubic
    spline interpolation, which is much cheaper than blurring full-resolution noise.
    """
    height, width = shape
    coarse_shape = (int(np.ceil(height / scale)) + 4, int(np.ceil(width / scale)) + 4)
    coarse = rng.standard_normal(coarse_shape)
    ys = (np.arange(height) + 0.5) / scale + 1.5
    xs = (np.arange(width) + 0.5) / scale + 1.5
    coords = np.meshgrid(ys, xs, indexing="ij")
    field = ndimage.map_coordinates(coarse, coords, order=3, mode="mirror")
    field -= field.mean()
    std = field.std()
    return field / std if std > 0 else field


def _jittered_seeds(shape: tuple[int, int], rng: np.random.Generator, spacing: float) -> np.ndarray:
    """Seed points ``[M, 2]`` (y, x) on a jittered square grid that extends one cell past the image."""
    height, width = shape
    ny = int(np.ceil(height / spacing)) + 2
    nx = int(np.ceil(width / spacing)) + 2
    grid_y, grid_x = np.meshgrid(np.arange(ny) - 1.0, np.arange(nx) - 1.0, indexing="ij")
    centres = np.stack([grid_y.ravel(), grid_x.ravel()], axis=1) * spacing + spacing / 2
    jitter = rng.uniform(-0.45, 0.45, size=centres.shape) * spacing
    return centres + jitter


def _dark_spots(shape: tuple[int, int], rng: np.random.Generator, count: int, radius: float) -> np.ndarray:
    """Sum of ``count`` Gaussian spots of the given radius at random places, each peaking near 1."""
    impulses = np.zeros(shape, dtype=np.float64)
    ys = rng.integers(0, shape[0], size=count)
    xs = rng.integers(0, shape[1], size=count)
    np.add.at(impulses, (ys, xs), rng.uniform(0.6, 1.0, size=count))
    spots = ndimage.gaussian_filter(impulses, sigma=radius, mode="constant")
    return spots * (2.0 * np.pi * radius**2)  # a unit impulse blurred this way peaks at 1


def _one_image(
    shape: tuple[int, int], rng: np.random.Generator, cell_diameter: float
) -> tuple[np.ndarray, np.ndarray]:
    height, width = shape

    # 1-2: Voronoi cells of jittered seeds, looked up at smoothly displaced positions.
    seeds = _jittered_seeds(shape, rng, cell_diameter)
    amplitude = cell_diameter / 8.0
    displacement_y = amplitude * _smooth_field(shape, rng, scale=cell_diameter)
    displacement_x = amplitude * _smooth_field(shape, rng, scale=cell_diameter)
    grid_y, grid_x = np.meshgrid(np.arange(height, dtype=np.float64), np.arange(width, dtype=np.float64), indexing="ij")
    positions = np.stack([(grid_y + displacement_y).ravel(), (grid_x + displacement_x).ravel()], axis=1)
    distances, nearest = cKDTree(seeds).query(positions, k=2)
    r1, r2 = distances[:, 0], distances[:, 1]
    seed_gap = np.linalg.norm(seeds[nearest[:, 1]] - seeds[nearest[:, 0]], axis=1)
    bisector_distance = ((r2**2 - r1**2) / (2.0 * seed_gap)).reshape(shape)
    cell_index = nearest[:, 0].reshape(shape)

    # 3: membranes 2-4 px wide.
    half_width = 1.5 + 0.5 * np.tanh(_smooth_field(shape, rng, scale=2 * cell_diameter))
    interior = bisector_distance >= half_width
    instances, count = ndimage.label(interior)
    # Slivers where three membranes meet are not cells: make them membrane and renumber the rest.
    sizes = np.bincount(instances.ravel(), minlength=count + 1)
    keep = sizes >= _MIN_CELL_AREA
    keep[0] = False
    new_ids = np.zeros(count + 1, dtype=np.int32)
    new_ids[keep] = np.arange(1, int(keep.sum()) + 1, dtype=np.int32)
    instances = new_ids[instances]
    sliver = (instances == 0) & interior

    # 4: gray values.
    cell_gray = rng.uniform(0.6, 0.85, size=len(seeds))[cell_index]
    texture = 0.05 * _smooth_field(shape, rng, scale=2.5)
    area = height * width
    vesicles = _dark_spots(shape, rng, count=max(1, area // 700), radius=1.2)
    organelles = _dark_spots(shape, rng, count=max(1, area // 3000), radius=rng.uniform(3.0, 5.0))
    gray = cell_gray + texture - 0.3 * np.clip(vesicles, 0, 1) - 0.5 * np.clip(organelles, 0, 1)
    membrane_gray = 0.12 + 0.05 * _smooth_field(shape, rng, scale=8.0)
    # Anti-aliased membrane: fully dark inside, a 1 px linear ramp at its edge.
    membrane_weight = np.clip(half_width + 0.5 - bisector_distance, 0.0, 1.0)
    membrane_weight[sliver] = 1.0
    image = gray * (1.0 - membrane_weight) + membrane_gray * membrane_weight
    image += 0.05 * _smooth_field(shape, rng, scale=max(height, width) / 2.0)
    image = ndimage.gaussian_filter(image, sigma=0.8, mode="mirror")
    image += rng.normal(0.0, 0.04, size=shape)
    return np.clip(image, 0.0, 1.0).astype(np.float32), instances.astype(np.int32)


def make_em_like(
    n_images: int, size: int | tuple[int, int] = 512, seed: int = 0, *, cell_diameter: float = 32.0
) -> tuple[np.ndarray, np.ndarray]:
    """Draw ``n_images`` EM-like images with their instance labels.

    Args:
        n_images: number of images (>= 1).
        size: image side in px, or ``(height, width)``; each side >= 8.
        seed: the seed; image ``i`` depends only on ``(seed, i)``.
        cell_diameter: spacing of the seed grid, the typical cell diameter in px (>= 8).

    Returns:
        ``(images, instance_labels)``: float32 ``[n, H, W]`` in [0, 1], and int32 ``[n, H, W]`` with
        0 = membrane/background and 1..M = cells (numbered per image).
    """
    if int(n_images) != n_images or n_images < 1:
        raise ValueError(f"n_images must be a positive integer, got {n_images!r}")
    shape = (int(size), int(size)) if np.isscalar(size) else tuple(int(s) for s in size)
    if len(shape) != 2 or min(shape) < 8:
        raise ValueError(f"size must be an int or (height, width) with sides >= 8, got {size!r}")
    if not cell_diameter >= 8:
        raise ValueError(f"cell_diameter must be >= 8 px, got {cell_diameter!r}")
    children = np.random.SeedSequence(seed).spawn(int(n_images))
    images = np.empty((int(n_images), *shape), dtype=np.float32)
    instances = np.empty((int(n_images), *shape), dtype=np.int32)
    for i, child in enumerate(children):
        images[i], instances[i] = _one_image(shape, np.random.default_rng(child), float(cell_diameter))
    return images, instances


def binary_from_instances(instance_labels: np.ndarray) -> np.ndarray:
    """The binary label (uint8, 1 = cell interior, 0 = membrane/background) of instance labels of any shape."""
    return (np.asarray(instance_labels) > 0).astype(np.uint8)
