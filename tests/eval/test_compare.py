"""Paired comparison of two rankings on the same queries (waldo.eval.compare)."""

from __future__ import annotations

from math import comb
from types import SimpleNamespace

import numpy as np
import pytest

from waldo.eval.compare import mcnemar_exact, paired_comparison
from waldo.eval.metrics import retrieval_metrics


def _run(rows, top1_hits, n_positives=2, length=5, seed=0):
    """A ranking per query whose first slot is a hit where ``top1_hits`` says so, a second hit
    somewhere later."""
    rng = np.random.default_rng(seed)
    matches = np.zeros((len(rows), length), bool)
    for i, hit in enumerate(top1_hits):
        matches[i, 0] = hit
        matches[i, rng.integers(1, length)] = True
    return SimpleNamespace(query_rows=np.asarray(rows), matches=matches,
                           n_positives=np.full(len(rows), n_positives))


def test_the_exact_mcnemar_test_is_the_two_sided_binomial_tail():
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(3, 3) == 1.0
    assert mcnemar_exact(0, 5) == pytest.approx(2 / 2 ** 5)
    assert mcnemar_exact(2, 8) == pytest.approx(2 * sum(comb(10, k) for k in range(3)) / 2 ** 10)
    assert mcnemar_exact(8, 2) == mcnemar_exact(2, 8)
    assert mcnemar_exact(0, 30) < 1e-8


def test_a_run_against_itself_differs_by_nothing():
    run = _run(range(50), np.arange(50) % 3 == 0)
    out = paired_comparison(run, run, n_resamples=500)
    assert out["queries"] == 50 and out["top1_only_a"] == out["top1_only_b"] == 0 and out["mcnemar_p"] == 1.0
    assert out["recall@1"]["difference"] == 0 and out["recall@1"]["ci95"] == [0.0, 0.0]
    assert out["map"]["ci95"] == [0.0, 0.0]


def test_the_figures_are_the_reported_metrics_and_only_shared_queries_count():
    a = _run(range(100), np.arange(100) % 2 == 0, seed=1)
    b = _run(range(100), np.arange(100) % 4 != 3, seed=2)  # right on 25 queries a misses, wrong on none it gets
    out = paired_comparison(a, b, n_resamples=2000)
    for name, run in (("a", a), ("b", b)):
        reported = retrieval_metrics(run.matches, run.n_positives)
        assert out["recall@1"][name] == pytest.approx(reported["recall@1"])
        assert out["map"][name] == pytest.approx(reported["map"])
    assert (out["top1_only_a"], out["top1_only_b"]) == (0, 25)
    assert out["recall@1"]["difference"] == pytest.approx(0.25)
    low, high = out["recall@1"]["ci95"]
    assert 0 < low < 0.25 < high and out["mcnemar_p"] < 1e-6
    # queries only one side answered are left out, and rows are matched by id, not position
    shifted = _run(range(50, 150), np.arange(50, 150) % 4 != 3, seed=2)
    assert paired_comparison(a, shifted, n_resamples=100)["queries"] == 50
    with pytest.raises(ValueError, match="share no query"):
        paired_comparison(a, _run(range(200, 210), [True] * 10), n_resamples=10)


def test_a_difference_of_one_query_in_two_hundred_is_not_significant():
    hits = np.arange(200) < 180
    a, b = _run(range(200), hits), _run(range(200), hits.copy())
    b.matches[180, 0] = True  # b gets one more query right
    out = paired_comparison(a, b, n_resamples=2000)
    assert (out["top1_only_a"], out["top1_only_b"]) == (0, 1) and out["mcnemar_p"] == 1.0
    assert out["recall@1"]["ci95"][0] <= 0 <= out["recall@1"]["ci95"][1]
