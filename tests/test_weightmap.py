"""Tests of the loss weight map on cases with known distances, against a brute-force reference, and of its cache."""

import time
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from unet_cuda.synthetic import make_em_like
from unet_cuda.weightmap import (
    WeightMapCache,
    border_distances,
    class_weight_map,
    negligible_distance,
    weight_map,
)

ISBI_DIR = Path(__file__).resolve().parents[1].parent / "shared/data/isbi2012"


def two_rectangles(gap: int, height: int = 20, width: int = 10, margin: int = 3) -> np.ndarray:
    """Cells 1 and 2, side by side, separated by ``gap`` background columns, inside a background margin."""
    labels = np.zeros((height + 2 * margin, 2 * width + gap + 2 * margin), dtype=np.int32)
    labels[margin: margin + height, margin: margin + width] = 1
    labels[margin: margin + height, margin + width + gap: margin + 2 * width + gap] = 2
    return labels


def brute_force_weight_map(labels: np.ndarray, w0=10.0, sigma=5.0) -> np.ndarray:
    """The formula with full-image distance transforms for every cell (no truncation)."""
    cells = [c for c in np.unique(labels) if c != 0]
    distances = [ndimage.distance_transform_edt(labels != c) - 0.5 for c in cells]
    distances += [np.full(labels.shape, np.inf)] * max(0, 2 - len(cells))
    ordered = np.sort(np.stack(distances), axis=0)
    d1, d2 = ordered[0], ordered[1]
    background = labels == 0
    n, n_fg = labels.size, np.count_nonzero(~background)
    if 0 < n_fg < n:
        w_c = np.where(background, n / (2.0 * (n - n_fg)), n / (2.0 * n_fg))
    else:
        w_c = np.ones(labels.shape)
    return w_c + np.where(background, w0 * np.exp(-((d1 + d2) ** 2) / (2 * sigma**2)), 0.0)


@pytest.mark.parametrize("gap", [1, 2, 3, 5, 8])
def test_gap_between_two_rectangles_has_known_distances(gap):
    labels = two_rectangles(gap)
    margin, width = 3, 10
    row = margin + 10  # a row in the middle of both cells
    gap_columns = np.arange(margin + width, margin + width + gap)
    d1, d2 = border_distances(labels)
    # pixel j (1-based) of the gap is j - 1/2 from cell 1's border and gap - j + 1/2 from cell 2's
    j = np.arange(1, gap + 1)
    np.testing.assert_allclose(np.minimum(j - 0.5, gap - j + 0.5), d1[row, gap_columns])
    np.testing.assert_allclose(np.maximum(j - 0.5, gap - j + 0.5), d2[row, gap_columns])
    np.testing.assert_allclose(d1[row, gap_columns] + d2[row, gap_columns], gap)  # d1 + d2 = g all along

    weights = weight_map(labels)
    w_background = labels.size / (2.0 * np.count_nonzero(labels == 0))
    expected = w_background + 10.0 * np.exp(-(gap**2) / 50.0)
    np.testing.assert_allclose(weights[row, gap_columns], expected, rtol=1e-6)
    if gap % 2 == 0:  # a pixel pair straddles the centre
        assert d1[row, gap_columns[gap // 2 - 1]] == d2[row, gap_columns[gap // 2 - 1]] - 1
    else:  # the centre pixel: d1 = d2 = g / 2
        centre = gap_columns[gap // 2]
        assert d1[row, centre] == d2[row, centre] == gap / 2


def test_fixed_class_weights_isolate_the_border_term():
    labels = two_rectangles(4)
    weights = weight_map(labels, w0=10.0, sigma=5.0, class_weights=(1.0, 1.0))
    assert weights[13, 15] == pytest.approx(1.0 + 10.0 * np.exp(-16.0 / 50.0), rel=1e-6)
    np.testing.assert_array_equal(weights[labels > 0], 1.0)  # no border term inside cells
    weights = weight_map(labels, class_weights=(0.25, 3.0), w0=0.0)
    np.testing.assert_array_equal(np.unique(weights), [0.25, 3.0])


def test_class_weights_are_inverse_frequency_with_mean_one():
    _, instances = make_em_like(1, size=64, seed=2)
    w_c = class_weight_map(instances[0])
    assert w_c.mean() == pytest.approx(1.0, rel=1e-6)
    n, n_fg = instances[0].size, np.count_nonzero(instances[0])
    assert w_c[instances[0] > 0][0] == pytest.approx(n / (2 * n_fg))
    assert w_c[instances[0] == 0][0] == pytest.approx(n / (2 * (n - n_fg)))
    # with w0 = 0 the whole map is w_c
    np.testing.assert_array_equal(weight_map(instances[0], w0=0.0), w_c)


def test_single_cell_has_no_border_term():
    labels = np.zeros((30, 40), dtype=np.int32)
    labels[5:20, 8:30] = 7
    np.testing.assert_array_equal(weight_map(labels), class_weight_map(labels))
    d1, d2 = border_distances(labels)
    assert np.isinf(d2).all()
    assert d1[5:20, 8:30].max() == 0 and d1[0, 0] > 0


def test_empty_and_all_foreground_images_weigh_one():
    np.testing.assert_array_equal(weight_map(np.zeros((9, 11), dtype=np.uint8)), np.ones((9, 11)))
    np.testing.assert_array_equal(weight_map(np.ones((9, 11), dtype=np.uint8)), np.ones((9, 11)))
    assert weight_map(np.zeros((9, 11), dtype=np.uint8)).dtype == np.float32


def test_border_term_only_on_background():
    _, instances = make_em_like(1, size=64, seed=4)
    weights = weight_map(instances[0])
    w_c = class_weight_map(instances[0])
    np.testing.assert_array_equal(weights[instances[0] > 0], w_c[instances[0] > 0])
    assert (weights[instances[0] == 0] > w_c[instances[0] == 0]).mean() > 0.99  # membranes lie between cells


@pytest.mark.parametrize("seed", [0, 1])
def test_truncated_distances_match_the_brute_force_reference(seed):
    _, instances = make_em_like(1, size=96, seed=seed, cell_diameter=24)
    labels = instances[0]
    # sparse, shuffled cell ids must not matter
    permuted = np.where(labels > 0, labels * 1000 + 3, 0)
    for w0, sigma in ((10.0, 5.0), (10.0, 2.0), (3.0, 12.0)):
        expected = brute_force_weight_map(labels, w0, sigma)
        np.testing.assert_allclose(weight_map(permuted, w0, sigma), expected, rtol=1e-6, atol=w0 * 1.5e-6)


def test_negligible_distance():
    radius = negligible_distance(10.0, 5.0)
    assert 10.0 * np.exp(-radius**2 / 50.0) == pytest.approx(1e-6)
    assert negligible_distance(0.0, 5.0) == 0.0


def test_rejects_bad_input():
    with pytest.raises(ValueError, match="2D"):
        weight_map(np.zeros((2, 3, 3), dtype=np.int32))
    with pytest.raises(ValueError, match="integers"):
        weight_map(np.zeros((3, 3)))
    with pytest.raises(ValueError, match=">= 0"):
        weight_map(np.full((3, 3), -1))
    with pytest.raises(ValueError, match="sigma"):
        weight_map(two_rectangles(2), sigma=0.0)


def test_isbi_slice_is_fast():
    if not (ISBI_DIR / "train-labels.tif").is_file():
        pytest.skip(f"ISBI 2012 data not found at {ISBI_DIR}")
    import tifffile

    raw = tifffile.imread(ISBI_DIR / "train-labels.tif", key=0)
    instances = ndimage.label(raw > 0)[0]
    start = time.perf_counter()
    weights = weight_map(instances)
    assert time.perf_counter() - start < 1.0  # about 0.05 s
    assert weights.shape == (512, 512) and weights.max() > 5.0


# --------------------------------------------------------------------------------------------------
# cache
# --------------------------------------------------------------------------------------------------


def test_cache_in_memory():
    cache = WeightMapCache()
    labels = two_rectangles(3)
    first = cache.get(labels)
    second = cache(labels.astype(np.int64))  # same values, other dtype: same key
    assert second is first and cache.hits == 1 and cache.misses == 1 and len(cache) == 1
    assert not first.flags.writeable
    np.testing.assert_array_equal(first, weight_map(labels))
    other = labels.copy()
    other[0, 0] = 5
    cache.get(other)
    assert cache.misses == 2


def test_cache_key_depends_on_parameters():
    labels = two_rectangles(3)
    keys = {
        WeightMapCache().key(labels),
        WeightMapCache(w0=5.0).key(labels),
        WeightMapCache(sigma=4.0).key(labels),
        WeightMapCache(class_weights=(1, 1)).key(labels),
        WeightMapCache().key(labels.T),
    }
    assert len(keys) == 5
    np.testing.assert_array_equal(WeightMapCache(sigma=4.0).get(labels), weight_map(labels, sigma=4.0))


def test_cache_on_disk(tmp_path):
    labels = two_rectangles(2)
    writer = WeightMapCache(tmp_path / "cache")
    written = writer.get(labels)
    files = list((tmp_path / "cache").iterdir())
    assert len(files) == 1 and files[0].suffix == ".npy"  # no temporary file left behind
    reader = WeightMapCache(tmp_path / "cache")
    loaded = reader.get(labels)
    assert reader.misses == 0 and reader.hits == 1
    np.testing.assert_array_equal(loaded, written)
    # a damaged file is recomputed and replaced
    files[0].write_bytes(b"not an npy file")
    repaired = WeightMapCache(tmp_path / "cache")
    np.testing.assert_array_equal(repaired.get(labels), written)
    assert repaired.misses == 1
    assert np.array_equal(np.load(files[0]), written)
