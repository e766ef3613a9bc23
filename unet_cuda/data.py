"""Datasets: images with binary and instance labels, loaded from ISBI stacks, image folders or the built-in generator.

Conventions (ours)
------------------
* ``images``: float32 ``[n, H, W]`` in [0, 1]. Integer images are divided by their dtype's range
  (uint8 by 255, uint16 by 65535); float images are scaled by ``(x - min) / (max - min)`` over the
  whole file (a constant image becomes 0). Other integer dtypes (int16, int32, uint32, ...) are
  treated like floats (min/max), because their range says nothing about the data.
* ``labels``: uint8 ``[n, H, W]``, 1 = foreground (cell interior), 0 = background (membrane).
* ``instances``: int32 ``[n, H, W]``, 0 = background, 1..M = objects (cells), numbered per image.

How label files are interpreted (:func:`interpret_labels`), over all label images of a dataset:

* **binary**: at most two distinct values. The larger one is foreground; a single value is
  background when it is 0 and foreground otherwise. Instances are then the connected components of
  the foreground with 4-connectivity (``scipy.ndimage.label``'s default in 2D), so that a diagonal
  gap of one membrane pixel still separates two cells.
* **instance**: more than two distinct values, all non-negative integers; 0 = background and every
  other value is one object.
* anything else (negative values, non-integer floats, NaN/Inf) raises :class:`DataError`.

:func:`load_dataset` picks the source: ``None`` -> the built-in synthetic set
(:data:`SYNTHETIC_COUNT` images of :data:`SYNTHETIC_SIZE` x :data:`SYNTHETIC_SIZE` px, small enough
for a quick CPU training run), a folder with ``train-volume.tif`` -> :func:`load_isbi`, a folder with
``images/`` and ``labels/`` -> :func:`load_image_folder`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from .synthetic import make_em_like

__all__ = [
    "DataError",
    "Dataset",
    "SYNTHETIC_COUNT",
    "SYNTHETIC_SIZE",
    "SYNTHETIC_SEED",
    "IMAGE_SUFFIXES",
    "read_image",
    "read_labels",
    "interpret_labels",
    "instances_from_binary",
    "load_isbi",
    "load_image_folder",
    "load_synthetic",
    "load_dataset",
    "split",
]

SYNTHETIC_COUNT = 12
SYNTHETIC_SIZE = 256
SYNTHETIC_SEED = 0
IMAGE_SUFFIXES = (".tif", ".tiff", ".png")


class DataError(ValueError):
    """Input data that cannot be used: a missing or unreadable file, or contents of the wrong kind."""


# --------------------------------------------------------------------------------------------------
# The dataset container
# --------------------------------------------------------------------------------------------------


@dataclass
class Dataset:
    """Images and their labels, all ``[n, H, W]`` (see the module docstring for dtypes and values).

    ``indices`` records, for a subset made by :func:`split` or :meth:`subset`, which images of the
    parent dataset it holds; for a loaded dataset it is ``0..n-1``.
    """

    images: np.ndarray
    labels: np.ndarray
    instances: np.ndarray
    name: str
    indices: tuple[int, ...] = field(default=())

    def __post_init__(self) -> None:
        self.images = np.ascontiguousarray(self.images, dtype=np.float32)
        self.labels = np.ascontiguousarray(self.labels, dtype=np.uint8)
        self.instances = np.ascontiguousarray(self.instances, dtype=np.int32)
        shapes = {"images": self.images.shape, "labels": self.labels.shape, "instances": self.instances.shape}
        if self.images.ndim != 3 or len(set(shapes.values())) != 1:
            raise DataError(f"dataset {self.name!r}: expected three [n, H, W] arrays of one shape, got {shapes}")
        if len(self.images) == 0:
            raise DataError(f"dataset {self.name!r} has no images")
        if not np.isfinite(self.images).all():
            raise DataError(f"dataset {self.name!r}: images contain NaN or Inf")
        if self.images.min() < 0 or self.images.max() > 1:
            raise DataError(f"dataset {self.name!r}: images must lie in [0, 1]")
        if not np.array_equal(self.labels > 0, self.instances > 0):
            raise DataError(f"dataset {self.name!r}: labels and instances disagree on the foreground")
        if not self.indices:
            self.indices = tuple(range(len(self.images)))
        if len(self.indices) != len(self.images):
            raise DataError(f"dataset {self.name!r}: {len(self.indices)} indices for {len(self.images)} images")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def image_shape(self) -> tuple[int, int]:
        """``(H, W)`` of every image."""
        return self.images.shape[1], self.images.shape[2]

    def subset(self, indices, name: str | None = None) -> "Dataset":
        """The images at ``indices`` (positions in this dataset), as a new dataset (copies)."""
        positions = [int(i) for i in indices]
        if not positions:
            raise DataError(f"dataset {self.name!r}: a subset needs at least one image")
        return Dataset(
            self.images[positions],
            self.labels[positions],
            self.instances[positions],
            name if name is not None else self.name,
            tuple(self.indices[i] for i in positions),
        )


# --------------------------------------------------------------------------------------------------
# Reading files
# --------------------------------------------------------------------------------------------------


def _require_file(path: Path, what: str) -> None:
    if not path.exists():
        raise DataError(f"{what} not found: {path}")
    if not path.is_file():
        raise DataError(f"{what} is not a file: {path}")


def _drop_gray_samples(array: np.ndarray, path: Path, has_samples: bool) -> np.ndarray:
    """Reduce an array whose last axis holds color samples (RGB, RGBA, gray+alpha) to one gray channel.

    Accepted only when the color channels are equal (gray saved as RGB); real color is refused.
    """
    if not has_samples:
        return array
    color = array[..., :3] if array.shape[-1] >= 3 else array[..., :1]
    if not (color == color[..., :1]).all():
        raise DataError(
            f"{path}: a color image with {array.shape[-1]} channels that differ (shape {array.shape}); "
            "expected grayscale. (A stack of 3 or 4 gray images tagged as RGB reads this way: "
            "write it with photometric='minisblack'.)"
        )
    return np.ascontiguousarray(color[..., 0])


def _read_tiff(path: Path) -> np.ndarray:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            axes = series.axes
            array = series.asarray()
    except Exception as error:  # tifffile raises several types for damaged files
        raise DataError(f"cannot read {path} as a TIFF file ({type(error).__name__}: {error})") from error
    if "S" in axes and array.ndim == len(axes):
        array = np.moveaxis(array, axes.index("S"), -1)  # color samples last, planar or not
        return _drop_gray_samples(array, path, has_samples=True)
    return array


def _read_png(path: Path, palette_as_indices: bool) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
            if image.mode == "P" and not palette_as_indices:  # gray values from the palette
                image = image.convert("RGBA" if "transparency" in image.info else "RGB")
            array = np.array(image)
            mode = image.mode
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise DataError(f"cannot read {path} as an image ({type(error).__name__}: {error})") from error
    if mode == "1":
        array = array.astype(np.uint8)
    return _drop_gray_samples(array, path, has_samples=mode in ("RGB", "RGBA", "LA"))


def _read_raw(path: str | Path, ndim: int | None, what: str, is_label: bool = False) -> np.ndarray:
    """The array stored in a TIFF or PNG file, squeezed to 2D or 3D, with ``ndim`` enforced.

    A palette PNG gives its palette indices for labels (``is_label``), its gray values for images.
    """
    path = Path(path)
    _require_file(path, what)
    suffix = path.suffix.lower()
    if suffix in (".tif", ".tiff"):
        array = _read_tiff(path)
    elif suffix == ".png":
        array = _read_png(path, palette_as_indices=is_label)
    else:
        raise DataError(f"{what} {path}: unsupported file type {suffix!r}; expected one of {IMAGE_SUFFIXES}")
    if array.ndim > 3:
        squeezed = array.reshape([s for s in array.shape if s != 1] or [1])
        array = squeezed if squeezed.ndim in (2, 3) else array
    if array.ndim not in (2, 3):
        raise DataError(f"{what} {path}: array of shape {array.shape}; expected a 2D image or a [n, H, W] stack")
    if ndim == 2 and array.ndim != 2:
        raise DataError(f"{what} {path}: a stack of shape {array.shape}; expected a single 2D image")
    if ndim == 3 and array.ndim != 3:
        raise DataError(f"{what} {path}: a single 2D image of shape {array.shape}; expected a [n, H, W] stack")
    if array.dtype.kind not in "biuf":
        raise DataError(f"{what} {path}: unsupported pixel type {array.dtype}")
    return array


def _normalise_image(array: np.ndarray, source: str) -> np.ndarray:
    """Map pixel values to [0, 1] as float32 (dtype range for uint8/uint16, min/max otherwise)."""
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise DataError(f"{source}: image contains NaN or Inf values")
    if array.dtype == np.bool_:
        return array.astype(np.float32)
    if array.dtype == np.uint8:
        return (array / np.float32(255)).astype(np.float32)
    if array.dtype == np.uint16:
        return (array / np.float32(65535)).astype(np.float32)
    values = array.astype(np.float64)
    low, high = values.min(), values.max()
    if high == low:
        return np.zeros(array.shape, dtype=np.float32)
    return ((values - low) / (high - low)).astype(np.float32)


def read_image(path: str | Path, ndim: int | None = None) -> np.ndarray:
    """Read a 2D image or an ``[n, H, W]`` stack (multi-page TIFF or PNG) as float32 in [0, 1].

    ``ndim`` (2 or 3) insists on a single image or on a stack; ``None`` accepts either.
    Raises :class:`DataError` for a missing or unreadable file, color data, a wrong number of
    dimensions, or NaN/Inf values.
    """
    if ndim not in (None, 2, 3):
        raise ValueError(f"ndim must be None, 2 or 3, got {ndim!r}")
    return _normalise_image(_read_raw(path, ndim, "image file"), str(path))


def read_labels(path: str | Path, ndim: int | None = None) -> np.ndarray:
    """Read a label image or stack without any scaling (its raw values); see :func:`interpret_labels`."""
    return _read_raw(path, ndim, "label file", is_label=True)


# --------------------------------------------------------------------------------------------------
# Labels
# --------------------------------------------------------------------------------------------------


def instances_from_binary(foreground: np.ndarray) -> np.ndarray:
    """Instance labels int32 of one 2D foreground mask or of each slice of a stack (4-connected components)."""
    foreground = np.asarray(foreground) > 0
    if foreground.ndim == 2:
        return ndimage.label(foreground)[0].astype(np.int32)
    out = np.empty(foreground.shape, dtype=np.int32)
    for i, plane in enumerate(foreground):
        out[i] = ndimage.label(plane)[0]
    return out


def interpret_labels(raw: np.ndarray, source: str = "labels") -> tuple[np.ndarray, np.ndarray, str]:
    """Turn raw label values into ``(binary uint8, instances int32, kind)`` with kind 'binary' or 'instance'.

    See the module docstring for the rules. ``source`` names the data in error messages.
    """
    raw = np.asarray(raw)
    if raw.dtype.kind not in "biuf":
        raise DataError(f"{source}: unsupported label type {raw.dtype}")
    if raw.dtype.kind == "f":
        if not np.isfinite(raw).all():
            raise DataError(f"{source}: labels contain NaN or Inf")
        if (raw != np.round(raw)).any():
            raise DataError(f"{source}: labels contain non-integer values; expected binary or instance labels")
    values = np.unique(raw)
    if len(values) > 0 and values[0] < 0:
        raise DataError(f"{source}: labels contain negative values (minimum {values[0]}); "
                        "expected binary or instance labels >= 0")
    if len(values) <= 2:
        foreground = raw == values[-1] if (len(values) == 2 or values[-1] != 0) else np.zeros(raw.shape, bool)
        binary = foreground.astype(np.uint8)
        return binary, instances_from_binary(binary), "binary"
    if values[-1] > np.iinfo(np.int32).max:
        raise DataError(f"{source}: instance label {values[-1]} does not fit in int32")
    instances = raw.astype(np.int32)
    return (instances > 0).astype(np.uint8), instances, "instance"


def _check_pair(images: np.ndarray, labels: np.ndarray, image_source: str, label_source: str) -> None:
    if images.shape != labels.shape:
        what = "counts" if images.shape[1:] == labels.shape[1:] else "sizes"
        raise DataError(
            f"image and label {what} differ: {image_source} has shape {images.shape}, "
            f"{label_source} has shape {labels.shape}"
        )


# --------------------------------------------------------------------------------------------------
# Loaders
# --------------------------------------------------------------------------------------------------


def load_isbi(folder: str | Path, name: str = "isbi2012") -> Dataset:
    """Load ``train-volume.tif`` and ``train-labels.tif`` (ISBI 2012 layout) from ``folder``.

    The volume is an ``[n, 512, 512]`` uint8 stack; the labels use 255 = cell interior (foreground)
    and 0 = membrane, which the binary rule of :func:`interpret_labels` maps to 1 and 0.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"ISBI folder not found: {folder} (expected a folder holding train-volume.tif and train-labels.tif)")
    volume_path, labels_path = folder / "train-volume.tif", folder / "train-labels.tif"
    _require_file(volume_path, "ISBI training volume (train-volume.tif)")
    _require_file(labels_path, "ISBI training labels (train-labels.tif)")
    images = read_image(volume_path, ndim=3)
    raw_labels = read_labels(labels_path, ndim=3)
    _check_pair(images, raw_labels, str(volume_path), str(labels_path))
    binary, instances, _ = interpret_labels(raw_labels, str(labels_path))
    return Dataset(images, binary, instances, name)


def _image_files(folder: Path) -> dict[str, Path]:
    files: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith("."):
            if path.stem in files:
                raise DataError(f"two files named {path.stem!r} in {folder}: {files[path.stem].name} and {path.name}")
            files[path.stem] = path
    return files


def load_image_folder(images_dir: str | Path, labels_dir: str | Path, name: str | None = None) -> Dataset:
    """Load 2D images (TIFF/PNG) from ``images_dir`` and the label file of the same name (stem) from ``labels_dir``.

    Files are taken in sorted order of their names; a label may have a different extension than its
    image (``a.tif`` with ``a.png``). All images must share one size. Labels are interpreted over
    the whole folder (:func:`interpret_labels`), so a binary folder must use the same two values
    throughout.
    """
    images_dir, labels_dir = Path(images_dir), Path(labels_dir)
    for folder, what in ((images_dir, "images"), (labels_dir, "labels")):
        if not folder.is_dir():
            raise DataError(f"{what} folder not found: {folder} (expected a folder of .tif/.tiff/.png files)")
    image_files, label_files = _image_files(images_dir), _image_files(labels_dir)
    if not image_files:
        raise DataError(f"no .tif/.tiff/.png images in {images_dir}")
    unlabelled = sorted(set(image_files) - set(label_files))
    if unlabelled:
        raise DataError(f"{len(unlabelled)} image(s) in {images_dir} have no label file of the same name in "
                        f"{labels_dir}: {', '.join(unlabelled[:5])}{' ...' if len(unlabelled) > 5 else ''}")
    images, raw_labels = [], []
    for stem, image_path in image_files.items():
        image = read_image(image_path, ndim=2)
        label = read_labels(label_files[stem], ndim=2)
        if image.shape != label.shape:
            raise DataError(f"image and label sizes differ: {image_path} has shape {image.shape}, "
                            f"{label_files[stem]} has shape {label.shape}")
        if images and image.shape != images[0].shape:
            first = next(iter(image_files.values()))
            raise DataError(f"images in {images_dir} differ in size: {first.name} has shape {images[0].shape}, "
                            f"{image_path.name} has shape {image.shape}; all images must share one size")
        images.append(image)
        raw_labels.append(label)
    binary, instances, _ = interpret_labels(np.stack(raw_labels), str(labels_dir))
    return Dataset(np.stack(images), binary, instances, name if name is not None else images_dir.parent.name or "folder")


def load_synthetic(count: int = SYNTHETIC_COUNT, size: int = SYNTHETIC_SIZE, seed: int = SYNTHETIC_SEED) -> Dataset:
    """The built-in EM-like dataset of :mod:`unet_cuda.synthetic` (binary labels from its instances)."""
    images, instances = make_em_like(count, size=size, seed=seed)
    return Dataset(images, (instances > 0).astype(np.uint8), instances, f"synthetic-em-{count}x{size}-seed{seed}")


def load_dataset(path: str | Path | None = None) -> Dataset:
    """Load a dataset by where it is: ``None`` (built-in synthetic), an ISBI folder, or a folder with images/ and labels/."""
    if path is None:
        return load_synthetic()
    folder = Path(path)
    if not folder.exists():
        raise DataError(f"dataset folder not found: {folder}")
    if not folder.is_dir():
        raise DataError(f"dataset path is not a folder: {folder} (expected a folder holding train-volume.tif "
                        "and train-labels.tif, or images/ and labels/ subfolders)")
    if (folder / "train-volume.tif").exists():
        return load_isbi(folder, name=folder.name)
    if (folder / "images").is_dir() and (folder / "labels").is_dir():
        return load_image_folder(folder / "images", folder / "labels", name=folder.name)
    raise DataError(f"{folder} is not a dataset folder: expected train-volume.tif and train-labels.tif "
                    "(ISBI 2012 layout), or images/ and labels/ subfolders")


def split(
    dataset: Dataset, val_fraction: float | None = None, val_count: int | None = None, seed: int = 0
) -> tuple[Dataset, Dataset]:
    """Split into ``(train, val)`` by a seeded random permutation; give exactly one of ``val_fraction``, ``val_count``.

    ``val_fraction`` is rounded to a count and clamped to ``[1, n - 1]``, so both parts hold at least
    one image; each part keeps the original order of its images.
    """
    n = len(dataset)
    if (val_fraction is None) == (val_count is None):
        raise ValueError("give exactly one of val_fraction and val_count")
    if n < 2:
        raise DataError(f"dataset {dataset.name!r} has {n} image; a split needs at least 2")
    if val_fraction is not None:
        if not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction must lie in (0, 1), got {val_fraction!r}")
        val_count = min(n - 1, max(1, int(round(val_fraction * n))))
    if int(val_count) != val_count or not 1 <= val_count <= n - 1:
        raise ValueError(f"val_count must be an integer in [1, {n - 1}] for {n} images, got {val_count!r}")
    order = np.random.default_rng(seed).permutation(n)
    val_positions = np.sort(order[: int(val_count)])
    train_positions = np.sort(order[int(val_count):])
    return (
        dataset.subset(train_positions, f"{dataset.name}/train"),
        dataset.subset(val_positions, f"{dataset.name}/val"),
    )
