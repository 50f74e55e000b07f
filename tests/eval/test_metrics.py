"""Metrics on hand-computed cases."""

import math

import numpy as np
import pytest

from waldo.eval.metrics import (average_precision, match_matrix, mean_average_precision,
                                recall_at_k, recall_curve, retrieval_metrics)


def test_match_matrix_ignores_padding():
    knn = np.array([[2, 0, -1], [1, 2, 0]])
    matches = match_matrix(knn, np.array([7, 5]), np.array([7, 5, 7]))
    assert matches.tolist() == [[True, True, False], [True, False, False]]


def test_recall_at_k():
    matches = np.array([[0, 1, 0], [1, 0, 0], [0, 0, 0]], dtype=bool)
    assert recall_at_k(matches, 1) == pytest.approx(1 / 3)
    assert recall_at_k(matches, 2) == pytest.approx(2 / 3)
    assert recall_at_k(matches, 3) == pytest.approx(2 / 3)


def test_recall_curve_by_hand_and_against_recall_at_k():
    matches = np.array([[0, 1, 0], [1, 0, 0], [0, 0, 0]], dtype=bool)
    assert recall_curve(matches, 3) == pytest.approx([1 / 3, 2 / 3, 2 / 3])
    assert all(math.isnan(v) for v in recall_curve(np.zeros((0, 3), bool), 2))
    random = np.random.default_rng(0).random((50, 30)) < 0.1
    curve = recall_curve(random, 30)
    assert [round(curve[k - 1], 12) for k in (1, 5, 30)] == [round(recall_at_k(random, k), 12) for k in (1, 5, 30)]


def test_average_precision_by_hand():
    # hits at ranks 1 and 3 of 2 positives: (1/1 + 2/3) / 2
    assert average_precision(np.array([1, 0, 1, 0], bool), 2) == pytest.approx((1 + 2 / 3) / 2)
    # one of three positives never retrieved counts as zero
    assert average_precision(np.array([0, 1], bool), 3) == pytest.approx((1 / 2) / 3)
    assert math.isnan(average_precision(np.array([0, 0], bool), 0))


def test_map_with_cutoff():
    matches = np.array([[0, 1, 1], [1, 1, 0]], dtype=bool)
    n_pos = np.array([2, 5])
    full = ((1 / 2 + 2 / 3) / 2 + (1 + 1) / 5) / 2
    assert mean_average_precision(matches, n_pos) == pytest.approx(full)
    # mAP@2: query 0 -> (1/2)/2; query 1 -> (1 + 1)/min(5, 2)
    assert mean_average_precision(matches, n_pos, cutoff=2) == pytest.approx(((1 / 2) / 2 + 1) / 2)


def test_retrieval_metrics_keys():
    matches = np.eye(3, 100, dtype=bool)
    out = retrieval_metrics(matches, np.ones(3, int))
    assert out["recall@1"] == pytest.approx(1 / 3) and out["recall@100"] == 1.0
    assert out["map"] == pytest.approx((1 + 1 / 2 + 1 / 3) / 3)
    assert out["n_queries"] == 3
