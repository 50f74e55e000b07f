"""Is one ranking really better than another on the same queries?

Two models evaluated on one protocol answer the same queries, so their difference is judged
query by query (paired), not by comparing two means as if they were independent samples:

- top-1: the queries one model gets right and the other wrong (the discordant pairs) decide;
  the exact McNemar test asks whether a split as uneven as the observed one is likely when each
  discordant query is a coin toss (two-sided binomial, p = 1/2).
- R@1 and mAP differences: a 95% interval from a paired bootstrap over queries (the same queries
  resampled for both models), so a reader sees how far a figure could move with other queries of
  the same kind.

Differences of one or two queries in 200 are common in the tables of docs/results.md; this is
what says whether such a difference means anything.
"""

from __future__ import annotations

from math import comb

import numpy as np

from waldo.eval.metrics import average_precision


def per_query(matches: np.ndarray, n_positives: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(top-1 hit, average precision) of every query of one ranking."""
    matches = np.asarray(matches, dtype=bool)
    top1 = matches[:, 0] if matches.shape[1] else np.zeros(len(matches), bool)
    ap = np.array([average_precision(row, n) for row, n in zip(matches, n_positives)], np.float64)
    return top1, ap


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts (1.0 when there are none)."""
    n = only_a + only_b
    if n == 0:
        return 1.0
    tail = sum(comb(n, k) for k in range(min(only_a, only_b) + 1)) / 2 ** n
    return float(min(1.0, 2 * tail))


def paired_comparison(a, b, *, n_resamples: int = 10_000, seed: int = 0) -> dict:
    """Compare two evaluations (waldo.eval.evaluate.EvalRun, or anything with ``query_rows``,
    ``matches``, ``n_positives``) on the queries both answered: b minus a."""
    common, in_a, in_b = np.intersect1d(a.query_rows, b.query_rows, return_indices=True)
    if len(common) == 0:
        raise ValueError("the two evaluations share no query")
    top1_a, ap_a = per_query(a.matches[in_a], a.n_positives[in_a])
    top1_b, ap_b = per_query(b.matches[in_b], b.n_positives[in_b])
    only_a, only_b = int((top1_a & ~top1_b).sum()), int((top1_b & ~top1_a).sum())
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(common), size=(n_resamples, len(common)))
    d_top1 = top1_b.astype(np.float64) - top1_a
    d_ap = ap_b - ap_a
    r1_boot, map_boot = d_top1[picks].mean(axis=1), d_ap[picks].mean(axis=1)
    return {
        "queries": int(len(common)),
        "recall@1": {"a": float(top1_a.mean()), "b": float(top1_b.mean()), "difference": float(d_top1.mean()),
                     "ci95": [float(np.quantile(r1_boot, 0.025)), float(np.quantile(r1_boot, 0.975))]},
        "map": {"a": float(ap_a.mean()), "b": float(ap_b.mean()), "difference": float(d_ap.mean()),
                "ci95": [float(np.quantile(map_boot, 0.025)), float(np.quantile(map_boot, 0.975))]},
        "top1_only_a": only_a, "top1_only_b": only_b,
        "mcnemar_p": mcnemar_exact(only_a, only_b),
        "bootstrap": {"resamples": n_resamples, "seed": seed},
    }
