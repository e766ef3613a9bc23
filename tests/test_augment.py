"""Tests of the elastic displacement field, the warp and the joint augmenter."""

import json

import numpy as np
import pytest

from unet_cuda.augment import Augmenter, elastic_displacement, upsample_grid, warp
from unet_cuda.synthetic import make_em_like


@pytest.fixture(scope="module")
def sample():
    images, instances = make_em_like(1, size=(64, 80), seed=0)
    labels = (instances[0] > 0).astype(np.int32)
    return images[0], labels, instances[0]


@pytest.mark.parametrize("order", [0, 1, 3])
def test_zero_displacement_is_the_identity(sample, order):
    image, labels, _ = sample
    zero = np.zeros((2, *image.shape), dtype=np.float32)
    np.testing.assert_allclose(warp(image, zero, order), image, atol=1e-6)
    np.testing.assert_array_equal(warp(labels, zero, 0), labels)


def test_constant_integer_displacement_is_a_shift(sample):
    image, labels, _ = sample
    displacement = np.zeros((2, *image.shape))
    displacement[0], displacement[1] = 3.0, -2.0  # out[y, x] = in[y + 3, x - 2]
    for order in (0, 1, 3):
        moved = warp(image, displacement, order)
        np.testing.assert_allclose(moved[:-3, 2:], image[3:, :-2], atol=1e-6)
    # outside the array: mirrored without repeating the edge (row H reads row H-2, row H+1 row H-3)
    moved = warp(labels, displacement, 0)
    np.testing.assert_array_equal(moved[-4, 2:], labels[-1, :-2])
    np.testing.assert_array_equal(moved[-3, 2:], labels[-2, :-2])
    np.testing.assert_array_equal(moved[-2, 2:], labels[-3, :-2])


def test_labels_keep_their_values_under_any_warp(sample):
    _, _, instances = sample
    rng = np.random.default_rng(0)
    for _ in range(3):
        moved = warp(instances, elastic_displacement(instances.shape, rng, sigma=10.0), order=0)
        assert moved.dtype == instances.dtype
        assert set(np.unique(moved)) <= set(np.unique(instances))


def test_displacement_passes_through_the_grid_nodes():
    shape = (101, 61)  # odd sides put the middle nodes on pixels
    field = elastic_displacement(shape, np.random.default_rng(5), grid=3, sigma=10.0)
    coarse = np.random.default_rng(5).normal(0.0, 10.0, size=(2, 3, 3))
    nodes_y, nodes_x = [0, 50, 100], [0, 30, 60]
    np.testing.assert_allclose(field[:, nodes_y][:, :, nodes_x], coarse, atol=1e-4)
    assert field.shape == (2, *shape) and field.dtype == np.float32


def test_displacement_is_smooth():
    field = elastic_displacement((201, 201), np.random.default_rng(1), sigma=10.0).astype(np.float64)
    # A cubic spline through 3 nodes spread over 200 px bends slowly: tiny second differences,
    # and no jumps in the first differences.
    for axis in (1, 2):
        first = np.diff(field, axis=axis)
        second = np.diff(field, n=2, axis=axis)
        assert np.abs(second).max() < 0.01 * np.abs(field).max() + 1e-3
        assert np.abs(first).max() < 0.2 * np.abs(field).max() + 1e-3


def test_displacement_scale_is_sigma():
    rng = np.random.default_rng(2)
    node_values, pixel_values = [], []
    for _ in range(300):
        field = elastic_displacement((41, 41), rng, sigma=10.0)
        node_values.append(field[:, ::20, ::20].ravel())
        pixel_values.append(field.ravel())
    node_std = np.std(np.concatenate(node_values))
    pixel_std = np.std(np.concatenate(pixel_values))
    assert node_std == pytest.approx(10.0, rel=0.05)  # 5400 draws from N(0, 10^2)
    assert 6.0 < pixel_std < 10.5  # between nodes the interpolant averages neighbouring draws


def test_upsample_grid_of_constant_nodes_is_constant():
    field = upsample_grid(np.full((2, 3, 3), 4.5), (17, 9))
    np.testing.assert_allclose(field, 4.5, atol=1e-5)


def test_warp_rejects_mismatched_shapes(sample):
    image, _, _ = sample
    with pytest.raises(ValueError, match="displacement"):
        warp(image, np.zeros((2, 3, 3)), 3)
    with pytest.raises(ValueError, match="order"):
        warp(image, np.zeros((2, *image.shape)), 2)


def test_augmenter_keeps_correspondence_exactly_without_elastic(sample):
    _, labels, _ = sample
    augment = Augmenter(seed=3, elastic=False, gray=False)
    image = labels.astype(np.float32)
    weights = labels.astype(np.float32) * 2
    for _ in range(8):
        out_image, out_labels, out_weights = augment(image, labels, weights)
        np.testing.assert_array_equal(out_image, out_labels)
        np.testing.assert_array_equal(out_weights, 2 * out_labels)
        assert out_labels.shape in (labels.shape, labels.shape[::-1])  # odd quarter turns swap H and W


def test_augmenter_elastic_moves_image_labels_and_weights_together(sample):
    _, labels, _ = sample
    augment = Augmenter(seed=4, elastic=True, flips=True, rot90=True, gray=False)
    image = labels.astype(np.float32)
    for _ in range(4):
        out_image, out_labels, out_weights = augment(image, labels, image.copy())
        if out_labels.shape == labels.shape:
            assert not np.array_equal(out_labels, labels)
        # bicubic, linear and nearest interpolation of the same warp disagree only on edges
        assert np.mean((out_image > 0.5) == (out_labels == 1)) > 0.97
        assert np.mean((out_weights > 0.5) == (out_labels == 1)) > 0.97
        assert set(np.unique(out_labels)) <= {0, 1}
        assert out_image.min() >= 0.0 and out_image.max() <= 1.0


def test_augmenter_gray_changes_touch_the_image_only(sample):
    image, labels, _ = sample
    augment = Augmenter(seed=0, elastic=False, flips=False, rot90=False, gray=True)
    weights = np.random.default_rng(0).random(image.shape).astype(np.float32)
    out_image, out_labels, out_weights = augment(image, labels, weights)
    np.testing.assert_array_equal(out_labels, labels)
    np.testing.assert_array_equal(out_weights, weights)
    assert out_image.dtype == np.float32 and 0.0 <= out_image.min() and out_image.max() <= 1.0
    assert not np.allclose(out_image, image)
    # a monotone change: the order of gray values is kept (up to clipping)
    inside = (out_image > 0.01) & (out_image < 0.99)
    assert np.corrcoef(out_image[inside], image[inside])[0, 1] > 0.99


def test_augmenter_is_reproducible_and_resumable(sample):
    image, labels, _ = sample
    first, second = Augmenter(seed=11), Augmenter(seed=11)
    for _ in range(2):
        a, b = first(image, labels), second(image, labels)
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])
        assert a[2] is None and b[2] is None
    assert not np.array_equal(Augmenter(seed=12)(image, labels)[0], Augmenter(seed=11)(image, labels)[0])

    state = json.loads(json.dumps(first.get_state()))  # survives JSON
    expected = first(image, labels)
    resumed = Augmenter(seed=999)
    resumed.set_state(state)
    again = resumed(image, labels)
    np.testing.assert_array_equal(again[0], expected[0])
    np.testing.assert_array_equal(again[1], expected[1])


def test_augmenter_rejects_mismatched_shapes(sample):
    image, labels, _ = sample
    with pytest.raises(ValueError, match="labels shape"):
        Augmenter()(image, labels[:10])
