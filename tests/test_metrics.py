"""Tests of the segmentation metrics on tiny cases with values worked out by hand."""

import numpy as np
import pytest
from scipy import ndimage

from unet_cuda.metrics import dice, evaluate, foreground, iou, pixel_error, rand_error


def two_cells() -> np.ndarray:
    """A 4 x 5 binary truth: two 2 x 2 cells (4 px each) separated by a membrane column; 12 background px."""
    truth = np.zeros((4, 5), dtype=np.uint8)
    truth[1:3, 0:2] = 1
    truth[1:3, 3:5] = 1
    return truth


def pair_count_rand_error(truth_instances: np.ndarray, predicted_segments: np.ndarray) -> float:
    """1 - F from the pair counts of the module docstring, written out with a dense contingency table."""
    scored = truth_instances > 0
    t_ids, t = np.unique(truth_instances[scored], return_inverse=True)
    s_ids, s = np.unique(predicted_segments[scored], return_inverse=True)
    table = np.zeros((len(t_ids), len(s_ids)))
    np.add.at(table, (t, s), 1)
    pairs = lambda counts: float(np.sum(counts * (counts - 1)))  # noqa: E731
    return 1.0 - 2 * pairs(table) / (pairs(table.sum(1)) + pairs(table.sum(0)))


def test_perfect_prediction():
    truth = two_cells()
    probabilities = np.where(truth > 0, 0.9, 0.1)
    result = evaluate(probabilities, truth)
    assert result == {"pixel_error": 0.0, "rand_error": 0.0, "iou": 1.0, "dice": 1.0}
    assert evaluate(truth.astype(bool), truth) == result
    assert evaluate(truth * 255, truth * 255) == result  # 0/255 masks and ISBI-style labels


def test_all_foreground_prediction_on_a_known_mask():
    truth = two_cells()  # 8 foreground of 20 pixels
    everything = np.ones(truth.shape)
    assert pixel_error(everything, truth) == pytest.approx(12 / 20)
    assert iou(everything, truth) == pytest.approx(8 / 20)
    assert dice(everything, truth) == pytest.approx(2 * 8 / (8 + 20))
    # One predicted segment holds both 4-px cells: pairs in it 2*(4*3) = 24 of 8*7 = 56 predicted,
    # 24 true; F = 2*24 / (24 + 56) = 0.6.
    assert rand_error(everything, truth) == pytest.approx(0.4)


def test_splitting_a_cell_counts_the_cut_as_one_more_segment():
    truth = np.zeros((4, 5), dtype=np.uint8)
    truth[1:3, :] = 1  # one cell of 10 px
    prediction = truth.copy()
    prediction[:, 2] = 0  # cut: two 4-px pieces, and 2 px of predicted membrane inside the cell
    # Within the cell the prediction has segments of 4, 4 and 2 (the cut, test label 0):
    # shared pairs 12 + 12 + 2 = 26, true pairs 10 * 9 = 90, predicted pairs 26 -> F = 52 / 116.
    assert rand_error(prediction, truth) == pytest.approx(1 - 52 / 116)
    assert rand_error(prediction, truth) == pytest.approx(
        pair_count_rand_error(ndimage.label(truth)[0], ndimage.label(prediction)[0])
    )


def test_rand_error_matches_the_pair_count_formula_on_random_cases():
    rng = np.random.default_rng(0)
    for _ in range(20):
        truth = (rng.random((12, 14)) > 0.35).astype(np.uint8)
        prediction = rng.random((12, 14))
        expected = pair_count_rand_error(ndimage.label(truth)[0], ndimage.label(prediction > 0.5)[0])
        assert rand_error(prediction, truth) == pytest.approx(expected)


def test_instance_truth_is_used_as_given():
    truth = np.array([[1, 1, 2, 2]])  # two touching cells, not separable by components of the mask
    prediction = np.ones((1, 4))
    # predicted: one segment of 4; true pairs 2+2 = 4, predicted 12, shared 4 -> F = 8/16
    assert rand_error(prediction, truth) == pytest.approx(0.5)
    assert rand_error(prediction, truth > 0) == pytest.approx(0.0)  # binary truth: one component


def test_rand_error_edge_cases():
    empty = np.zeros((3, 3), dtype=np.uint8)
    assert rand_error(np.ones((3, 3)), empty) == 0.0  # nothing to score
    single = empty.copy()
    single[1, 1] = 1
    assert rand_error(single, single) == 0.0  # one pixel: no pair at all


def test_dice_is_a_function_of_iou():
    rng = np.random.default_rng(1)
    for _ in range(10):
        truth = rng.random((9, 9)) > 0.5
        prediction = rng.random((9, 9))
        j = iou(prediction, truth)
        assert dice(prediction, truth) == pytest.approx(2 * j / (1 + j))


def test_empty_prediction_and_truth():
    empty = np.zeros((4, 4))
    assert iou(empty, empty) == 1.0 and dice(empty, empty) == 1.0 and pixel_error(empty, empty) == 0.0
    truth = two_cells()
    nothing = np.zeros(truth.shape)
    assert iou(nothing, truth) == 0.0 and dice(nothing, truth) == 0.0
    assert pixel_error(nothing, truth) == pytest.approx(8 / 20)


def test_threshold():
    probabilities = np.array([[0.2, 0.5, 0.7]])
    np.testing.assert_array_equal(foreground(probabilities), [[False, False, True]])
    np.testing.assert_array_equal(foreground(probabilities, threshold=0.1), [[True, True, True]])
    assert pixel_error(probabilities, np.array([[0, 1, 1]]), threshold=0.3) == 0.0


def test_input_checks():
    with pytest.raises(ValueError, match="2D"):
        pixel_error(np.zeros((2, 3, 3)), np.zeros((2, 3, 3)))
    with pytest.raises(ValueError, match="differs"):
        iou(np.zeros((3, 3)), np.zeros((3, 4)))
    with pytest.raises(ValueError, match="NaN"):
        dice(np.full((2, 2), np.nan), np.zeros((2, 2)))
