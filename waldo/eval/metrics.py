"""Retrieval metrics as pure functions of arrays (tested on hand-computed cases).

Conventions: ``matches`` is a (Q, K) bool array, row q marking which of query q's ranked results
(best first) share its identity; ``n_positives`` is (Q,) int, how many gallery images share the
query's identity (the query itself excluded under leave-one-out). Padding (-1 results) counts as
not matching.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np


def match_matrix(knn_indices: np.ndarray, query_labels: np.ndarray, gallery_labels: np.ndarray) -> np.ndarray:
    """(Q, K) bool: does result k of query q have the query's label? -1 indices never match."""
    knn_indices = np.asarray(knn_indices)
    valid = knn_indices >= 0
    labels = np.asarray(gallery_labels)[np.where(valid, knn_indices, 0)]
    return valid & (labels == np.asarray(query_labels)[:, None])


def recall_at_k(matches: np.ndarray, k: int) -> float:
    """Fraction of queries with at least one match among their first k results (SOP's Recall@K)."""
    matches = np.asarray(matches, dtype=bool)
    if matches.shape[0] == 0:
        return float("nan")
    return float(matches[:, :k].any(axis=1).mean())


def average_precision(matches: np.ndarray, n_positives: int) -> float:
    """AP of one ranking: the mean, over the positives, of precision at each positive's rank.
    Positives never retrieved (beyond the ranking's length) contribute 0."""
    matches = np.asarray(matches, dtype=bool)
    if n_positives <= 0:
        return float("nan")
    ranks = np.flatnonzero(matches) + 1  # 1-based ranks of the hits
    hits_so_far = np.arange(1, len(ranks) + 1)
    return float((hits_so_far / ranks).sum() / n_positives)


def mean_average_precision(matches: np.ndarray, n_positives: np.ndarray, cutoff: int | None = None) -> float:
    """mAP over queries. With ``cutoff`` (mAP@k), the ranking is cut at k and each query's AP is
    divided by min(n_positives, k), so a perfect top-k scores 1."""
    matches = np.asarray(matches, dtype=bool)
    n_positives = np.asarray(n_positives)
    if matches.shape[0] == 0:
        return float("nan")
    if cutoff is not None:
        matches = matches[:, :cutoff]
        n_positives = np.minimum(n_positives, cutoff)
    return float(np.mean([average_precision(row, n) for row, n in zip(matches, n_positives)]))


def recall_curve(matches: np.ndarray, max_k: int) -> list[float]:
    """Recall@k for k = 1..max_k (fraction of queries with a match in their first k results)."""
    matches = np.asarray(matches, bool)
    if len(matches) == 0:
        return [float("nan")] * max_k
    hit = matches[:, :max_k].any(axis=1)
    first = np.where(hit, matches[:, :max_k].argmax(axis=1), max_k)  # 0-based rank of the first hit
    counts = np.bincount(first, minlength=max_k + 1)[:max_k]
    return (np.cumsum(counts) / len(matches)).tolist()


def retrieval_metrics(matches: np.ndarray, n_positives: np.ndarray,
                      ks: Iterable[int] = (1, 10, 100)) -> dict[str, float]:
    """The figures Waldo reports: recall@k for each k, mAP over the given ranking, mAP@100."""
    out = {f"recall@{k}": recall_at_k(matches, k) for k in ks}
    out["map"] = mean_average_precision(matches, n_positives)
    out["map@100"] = mean_average_precision(matches, n_positives, cutoff=100)
    out["n_queries"] = int(np.asarray(matches).shape[0])
    return out
