"""Tests of the synthetic generator, the file readers, label interpretation, the loaders and the split."""

import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image
from scipy import ndimage

from unet_cuda.data import (
    DataError,
    Dataset,
    SYNTHETIC_COUNT,
    SYNTHETIC_SIZE,
    interpret_labels,
    load_dataset,
    load_image_folder,
    load_isbi,
    read_image,
    read_labels,
    split,
)
from unet_cuda.synthetic import binary_from_instances, make_em_like

ISBI_DIR = Path(__file__).resolve().parents[1].parent / "shared/data/isbi2012"


def require_isbi() -> Path:
    if not (ISBI_DIR / "train-volume.tif").is_file():
        pytest.skip(f"ISBI 2012 data not found at {ISBI_DIR}")
    return ISBI_DIR


# --------------------------------------------------------------------------------------------------
# synthetic
# --------------------------------------------------------------------------------------------------


def test_synthetic_shapes_types_and_ranges():
    images, instances = make_em_like(2, size=96, seed=3)
    assert images.shape == instances.shape == (2, 96, 96)
    assert images.dtype == np.float32 and instances.dtype == np.int32
    assert images.min() >= 0.0 and images.max() <= 1.0
    assert instances.min() == 0
    foreground_fraction = (instances > 0).mean()
    assert 0.6 < foreground_fraction < 0.95


def test_synthetic_cells_are_connected_components_of_the_foreground():
    _, instances = make_em_like(2, size=128, seed=1)
    for plane in instances:
        ids = np.unique(plane[plane > 0])
        assert np.array_equal(ids, np.arange(1, len(ids) + 1))  # numbered 1..M without gaps
        components, count = ndimage.label(plane > 0)
        assert count == len(ids)  # membranes separate every pair of cells (4-connectivity)
        for cell in ids[:20]:
            assert len(np.unique(components[plane == cell])) == 1


def test_synthetic_cell_count_matches_the_cell_diameter():
    _, instances = make_em_like(1, size=256, seed=0, cell_diameter=32.0)
    expected = (256 / 32) ** 2
    assert 0.6 * expected < instances.max() < 1.8 * expected


def test_synthetic_membranes_are_a_few_pixels_wide():
    _, instances = make_em_like(1, size=256, seed=5)
    membrane = instances[0] == 0
    # Membranes are thin: eroding them twice with a 3x3 square leaves almost nothing ...
    assert ndimage.binary_erosion(membrane, np.ones((3, 3)), iterations=2).mean() < 0.01 * membrane.mean()
    # ... but they are not one-pixel lines: most membrane pixels survive one erosion with a cross.
    assert ndimage.binary_erosion(membrane).sum() > 0.2 * membrane.sum()


def test_synthetic_is_reproducible_and_per_image_seeded():
    images_a, instances_a = make_em_like(3, size=64, seed=7)
    images_b, instances_b = make_em_like(3, size=64, seed=7)
    np.testing.assert_array_equal(images_a, images_b)
    np.testing.assert_array_equal(instances_a, instances_b)
    images_c, _ = make_em_like(1, size=64, seed=7)
    np.testing.assert_array_equal(images_a[0], images_c[0])
    images_d, _ = make_em_like(1, size=64, seed=8)
    assert not np.array_equal(images_a[0], images_d[0])
    assert not np.array_equal(images_a[0], images_a[1])


def test_synthetic_non_square_and_fast():
    images, _ = make_em_like(1, size=(40, 72), seed=0)
    assert images.shape == (1, 40, 72)
    start = time.perf_counter()
    make_em_like(1, size=512, seed=0)
    assert time.perf_counter() - start < 2.0  # about 0.2 s on one core


@pytest.mark.parametrize("bad", [dict(n_images=0), dict(n_images=1, size=4), dict(n_images=1, cell_diameter=2)])
def test_synthetic_rejects_bad_arguments(bad):
    with pytest.raises(ValueError):
        make_em_like(**bad)


def test_binary_from_instances():
    instances = np.array([[0, 3, 3], [7, 0, 1]])
    binary = binary_from_instances(instances)
    assert binary.dtype == np.uint8
    np.testing.assert_array_equal(binary, [[0, 1, 1], [1, 0, 1]])


# --------------------------------------------------------------------------------------------------
# read_image / read_labels
# --------------------------------------------------------------------------------------------------


def test_read_uint8_png_and_uint16_tiff_by_dtype_range(tmp_path):
    Image.fromarray(np.array([[0, 51], [255, 102]], dtype=np.uint8)).save(tmp_path / "a.png")
    np.testing.assert_allclose(read_image(tmp_path / "a.png"), [[0, 0.2], [1, 0.4]], atol=1e-7)
    tifffile.imwrite(tmp_path / "b.tif", np.array([[0, 65535], [13107, 0]], dtype=np.uint16))
    image = read_image(tmp_path / "b.tif", ndim=2)
    assert image.dtype == np.float32
    np.testing.assert_allclose(image, [[0, 1], [0.2, 0]], atol=1e-7)


def test_read_float_tiff_by_min_max_and_constant_image(tmp_path):
    tifffile.imwrite(tmp_path / "f.tif", np.array([[-2.0, 0.0], [2.0, 1.0]], dtype=np.float32))
    np.testing.assert_allclose(read_image(tmp_path / "f.tif"), [[0, 0.5], [1, 0.75]])
    tifffile.imwrite(tmp_path / "c.tif", np.full((3, 3), 5.0, dtype=np.float32))
    np.testing.assert_array_equal(read_image(tmp_path / "c.tif"), np.zeros((3, 3)))


def test_read_multipage_tiff_stack_and_ndim_checks(tmp_path):
    stack = np.arange(3 * 4 * 5, dtype=np.uint8).reshape(3, 4, 5)
    tifffile.imwrite(tmp_path / "stack.tif", stack, photometric="minisblack")
    np.testing.assert_allclose(read_image(tmp_path / "stack.tif", ndim=3), stack / 255.0, atol=1e-7)
    with pytest.raises(DataError, match=r"stack of shape \(3, 4, 5\); expected a single 2D image"):
        read_image(tmp_path / "stack.tif", ndim=2)
    tifffile.imwrite(tmp_path / "single.tif", stack[0])
    with pytest.raises(DataError, match=r"single 2D image of shape \(4, 5\); expected a \[n, H, W\] stack"):
        read_image(tmp_path / "single.tif", ndim=3)


def test_read_errors_name_the_path(tmp_path):
    with pytest.raises(DataError, match="not found.*nothing.tif"):
        read_image(tmp_path / "nothing.tif")
    (tmp_path / "broken.tif").write_bytes(b"II*\x00 this is not a tiff")
    with pytest.raises(DataError, match="cannot read .*broken.tif"):
        read_image(tmp_path / "broken.tif")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG nonsense")
    with pytest.raises(DataError, match="cannot read .*broken.png"):
        read_image(tmp_path / "broken.png")
    (tmp_path / "x.jpg").write_bytes(b"")
    with pytest.raises(DataError, match="unsupported file type"):
        read_image(tmp_path / "x.jpg")


def test_read_rejects_nan_and_inf(tmp_path):
    for value in (np.nan, np.inf):
        tifffile.imwrite(tmp_path / "bad.tif", np.array([[0.0, value]], dtype=np.float32))
        with pytest.raises(DataError, match="NaN or Inf"):
            read_image(tmp_path / "bad.tif")


def test_read_gray_stored_as_rgb_is_accepted_and_color_is_refused(tmp_path):
    gray = np.array([[0, 255], [51, 0]], dtype=np.uint8)
    Image.fromarray(np.stack([gray] * 3, axis=-1)).save(tmp_path / "gray_rgb.png")
    np.testing.assert_allclose(read_image(tmp_path / "gray_rgb.png"), gray / 255.0, atol=1e-7)
    color = np.stack([gray, gray[::-1], gray], axis=-1)
    Image.fromarray(color).save(tmp_path / "color.png")
    with pytest.raises(DataError, match="color"):
        read_image(tmp_path / "color.png")
    tifffile.imwrite(tmp_path / "color.tif", color, photometric="rgb")
    with pytest.raises(DataError, match="color"):
        read_image(tmp_path / "color.tif")
    planar = np.stack([gray, gray[::-1], gray])  # three planes tagged as RGB (tifffile's default for [3, H, W])
    tifffile.imwrite(tmp_path / "planar.tif", planar, photometric="rgb", planarconfig="separate")
    with pytest.raises(DataError, match="minisblack"):
        read_image(tmp_path / "planar.tif")
    tifffile.imwrite(tmp_path / "gray_planar.tif", np.stack([gray] * 3), photometric="rgb", planarconfig="separate")
    np.testing.assert_allclose(read_image(tmp_path / "gray_planar.tif", ndim=2), gray / 255.0, atol=1e-7)


def test_read_labels_keeps_raw_values(tmp_path):
    labels = np.array([[0, 300], [7, 0]], dtype=np.uint16)
    tifffile.imwrite(tmp_path / "l.tif", labels)
    np.testing.assert_array_equal(read_labels(tmp_path / "l.tif"), labels)
    # palette PNG (a common format for instance labels): the indices are the labels
    indexed = Image.fromarray(np.array([[0, 1], [2, 0]], dtype=np.uint8), mode="P")
    indexed.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * 759)
    indexed.save(tmp_path / "p.png")
    np.testing.assert_array_equal(read_labels(tmp_path / "p.png"), [[0, 1], [2, 0]])
    with pytest.raises(DataError, match="color"):
        read_image(tmp_path / "p.png")  # as an image its palette colors are not gray


# --------------------------------------------------------------------------------------------------
# interpret_labels
# --------------------------------------------------------------------------------------------------


def test_binary_labels_any_two_values_larger_is_foreground():
    raw = np.array([[[1, 2, 1], [1, 1, 1], [2, 1, 2]]], dtype=np.uint8)
    binary, instances, kind = interpret_labels(raw)
    assert kind == "binary"
    np.testing.assert_array_equal(binary, raw == 2)
    # three 4-connected components (diagonal neighbours stay separate)
    assert instances.max() == 3
    assert binary.dtype == np.uint8 and instances.dtype == np.int32


def test_isbi_style_255_is_foreground_and_components_become_instances():
    raw = np.zeros((1, 5, 7), dtype=np.uint8)
    raw[0, :, :3] = 255
    raw[0, :, 4:] = 255
    binary, instances, kind = interpret_labels(raw)
    assert kind == "binary"
    assert binary.sum() == 30
    assert set(np.unique(instances)) == {0, 1, 2}


def test_single_valued_labels():
    _, instances, _ = interpret_labels(np.zeros((2, 3, 3), dtype=np.uint8))
    assert instances.max() == 0
    binary, _, _ = interpret_labels(np.full((1, 3, 3), 9, dtype=np.uint8))
    assert binary.all()


def test_instance_labels_are_kept():
    raw = np.array([[0, 4, 4], [0, 9, 0], [12, 0, 0]], dtype=np.uint16)
    binary, instances, kind = interpret_labels(raw)
    assert kind == "instance"
    np.testing.assert_array_equal(instances, raw)
    np.testing.assert_array_equal(binary, raw > 0)


@pytest.mark.parametrize(
    "raw, message",
    [
        (np.array([[0, -1, 2]]), "negative"),
        (np.array([[0.0, 0.5, 1.0]]), "non-integer"),
        (np.array([[0.0, np.nan, 1.0]]), "NaN"),
    ],
)
def test_labels_that_are_neither_binary_nor_instances_are_refused(raw, message):
    with pytest.raises(DataError, match=message):
        interpret_labels(raw, "my labels")


def test_integral_float_labels_are_accepted():
    _, instances, kind = interpret_labels(np.array([[0.0, 1.0, 2.0], [3.0, 0.0, 0.0]]))
    assert kind == "instance" and instances.max() == 3


# --------------------------------------------------------------------------------------------------
# loaders
# --------------------------------------------------------------------------------------------------


def write_isbi_like(folder: Path, n_images=3, n_labels=3, size=(32, 32), label_size=None) -> None:
    images, instances = make_em_like(max(n_images, n_labels), size=size, seed=0)
    label_size = label_size or size
    folder.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(folder / "train-volume.tif", (images[:n_images] * 255).astype(np.uint8), photometric="minisblack")
    labels = np.where(instances[:n_labels] > 0, 255, 0).astype(np.uint8)[:, : label_size[0], : label_size[1]]
    tifffile.imwrite(folder / "train-labels.tif", labels, photometric="minisblack")


def test_load_isbi_layout(tmp_path):
    write_isbi_like(tmp_path)
    dataset = load_isbi(tmp_path)
    assert len(dataset) == 3 and dataset.image_shape == (32, 32)
    assert dataset.images.dtype == np.float32 and dataset.labels.dtype == np.uint8
    assert dataset.instances.dtype == np.int32
    np.testing.assert_array_equal(dataset.labels, dataset.instances > 0)
    assert dataset.indices == (0, 1, 2)


def test_load_isbi_errors(tmp_path):
    with pytest.raises(DataError, match="ISBI folder not found"):
        load_isbi(tmp_path / "absent")
    with pytest.raises(DataError, match="train-volume.tif.*not found"):
        load_isbi(tmp_path)
    write_isbi_like(tmp_path / "counts", n_images=3, n_labels=2)
    with pytest.raises(DataError, match=r"counts differ.*\(3, 32, 32\).*\(2, 32, 32\)"):
        load_isbi(tmp_path / "counts")
    write_isbi_like(tmp_path / "sizes", label_size=(32, 30))
    with pytest.raises(DataError, match=r"sizes differ.*\(3, 32, 32\).*\(3, 32, 30\)"):
        load_isbi(tmp_path / "sizes")


def write_folder_pairs(root: Path, n=3, size=(24, 40), instance_labels=False, label_suffix=".png") -> None:
    images, instances = make_em_like(n, size=size, seed=2)
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir(parents=True)
    for i in range(n):
        Image.fromarray((images[i] * 255).astype(np.uint8)).save(root / "images" / f"img{i:02d}.png")
        labels = instances[i].astype(np.uint16) if instance_labels else np.where(instances[i] > 0, 1, 0).astype(np.uint8)
        if label_suffix == ".png":
            Image.fromarray(labels).save(root / "labels" / f"img{i:02d}.png")
        else:
            tifffile.imwrite(root / "labels" / f"img{i:02d}{label_suffix}", labels)


def test_load_image_folder_binary_and_instance(tmp_path):
    write_folder_pairs(tmp_path / "bin")
    dataset = load_image_folder(tmp_path / "bin" / "images", tmp_path / "bin" / "labels")
    assert dataset.images.shape == (3, 24, 40)
    write_folder_pairs(tmp_path / "inst", instance_labels=True, label_suffix=".tif")
    instance_set = load_image_folder(tmp_path / "inst" / "images", tmp_path / "inst" / "labels")
    _, expected = make_em_like(3, size=(24, 40), seed=2)
    np.testing.assert_array_equal(instance_set.instances, expected)
    np.testing.assert_array_equal(dataset.labels, instance_set.labels)


def test_load_image_folder_errors(tmp_path):
    with pytest.raises(DataError, match="images folder not found"):
        load_image_folder(tmp_path / "x", tmp_path)
    write_folder_pairs(tmp_path / "a")
    (tmp_path / "a" / "labels" / "img01.png").unlink()
    with pytest.raises(DataError, match="no label file.*img01"):
        load_image_folder(tmp_path / "a" / "images", tmp_path / "a" / "labels")
    write_folder_pairs(tmp_path / "b")
    Image.fromarray(np.zeros((24, 41), dtype=np.uint8)).save(tmp_path / "b" / "labels" / "img02.png")
    with pytest.raises(DataError, match=r"sizes differ.*\(24, 40\).*\(24, 41\)"):
        load_image_folder(tmp_path / "b" / "images", tmp_path / "b" / "labels")


def test_load_dataset_dispatch(tmp_path):
    default = load_dataset(None)
    assert default.images.shape == (SYNTHETIC_COUNT, SYNTHETIC_SIZE, SYNTHETIC_SIZE)
    assert default.name.startswith("synthetic")
    write_isbi_like(tmp_path / "isbi")
    assert len(load_dataset(tmp_path / "isbi")) == 3
    write_folder_pairs(tmp_path / "pairs", n=2)
    assert len(load_dataset(str(tmp_path / "pairs"))) == 2
    with pytest.raises(DataError, match="not found"):
        load_dataset(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="train-volume.tif.*images/ and labels/"):
        load_dataset(tmp_path / "empty")


def test_dataset_validates_its_arrays():
    images, instances = make_em_like(2, size=16, seed=0)
    with pytest.raises(DataError, match="one shape"):
        Dataset(images, instances[:1] > 0, instances, "x")
    bad = images.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(DataError, match="NaN"):
        Dataset(bad, instances > 0, instances, "x")


# --------------------------------------------------------------------------------------------------
# split
# --------------------------------------------------------------------------------------------------


def small_dataset(n=10) -> Dataset:
    images, instances = make_em_like(n, size=16, seed=0)
    return Dataset(images, instances > 0, instances, "small")


def test_split_is_a_reproducible_partition():
    dataset = small_dataset()
    train, val = split(dataset, val_fraction=0.3, seed=4)
    assert len(val) == 3 and len(train) == 7
    assert sorted(train.indices + val.indices) == list(range(10))
    for part in (train, val):
        for position, original in enumerate(part.indices):
            np.testing.assert_array_equal(part.images[position], dataset.images[original])
            np.testing.assert_array_equal(part.instances[position], dataset.instances[original])
    again_train, again_val = split(dataset, val_fraction=0.3, seed=4)
    assert again_val.indices == val.indices
    assert split(dataset, val_count=3, seed=4)[1].indices == val.indices  # same count, same draw
    assert val.name == "small/val" and train.name == "small/train"


def test_split_counts_and_errors():
    dataset = small_dataset(4)
    assert len(split(dataset, val_count=1)[1]) == 1
    assert len(split(dataset, val_fraction=0.01)[1]) == 1  # at least one
    assert len(split(dataset, val_fraction=0.99)[0]) == 1  # train keeps one
    with pytest.raises(ValueError):
        split(dataset)
    with pytest.raises(ValueError):
        split(dataset, val_fraction=0.5, val_count=2)
    with pytest.raises(ValueError):
        split(dataset, val_count=4)
    with pytest.raises(DataError, match="at least 2"):
        split(small_dataset(1), val_count=1)


# --------------------------------------------------------------------------------------------------
# the real ISBI data (skipped where it is not present)
# --------------------------------------------------------------------------------------------------


def test_real_isbi_training_set():
    dataset = load_dataset(require_isbi())
    assert dataset.images.shape == (25, 512, 512)
    assert 0.0 <= dataset.images.min() and dataset.images.max() <= 1.0
    assert set(np.unique(dataset.labels)) == {0, 1}
    assert 0.6 < dataset.labels.mean() < 0.9  # mostly cell interior
    assert all(dataset.instances[i].max() > 50 for i in range(3))  # about 130 cells per slice
