"""Rerank an evaluation's global top-k and score the new rankings.

Takes an :class:`~waldo.eval.evaluate.EvalRun` (global search already done, with the extracted
queries and gallery attached), lets a reranker re-sort each query's first ``top_k`` results
from their local descriptors, and recomputes matches and metrics. Results past ``top_k`` keep
their global order, so with ``top_k = 100`` Recall@100 cannot change: if it does, the
neighbour lists differ (this module asserts it).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
from tqdm.auto import tqdm

from waldo.eval.evaluate import EvalRun
from waldo.eval.gv_eval import RunKeypoints
from waldo.eval.metrics import retrieval_metrics
from waldo.rerank.base import RerankCandidates, Reranker, RerankQuery

__all__ = ["RerankedRun", "query_positions", "rerank_run", "reranked_metrics", "score_top_k"]


@dataclass
class RerankedRun:
    """A reranked evaluation.

    metrics: the reranked figures (same keys as EvalRun.metrics) plus ``global`` (the run's own
    metrics), ``rerank_top_k``, ``rerank_ms_per_query``.
    run: the EvalRun with knn_indices / knn_scores / matches reordered (knn_scores stay the
    global inner products of the reordered results, so they are no longer descending).
    rerank_scores: (Q, top_k) float32 reranker scores of the reordered top_k (NaN padding).
    """

    metrics: dict
    run: EvalRun
    rerank_scores: np.ndarray


def query_positions(run: EvalRun) -> np.ndarray:
    """(Q,) rows of ``run.queries.local_desc`` / ``global_desc`` for each evaluated query
    (Extracted keeps only readable images, in input order)."""
    if run.queries is None or run.gallery is None:
        raise ValueError("this EvalRun has no extracted descriptors attached (queries/gallery are None)")
    readable = np.flatnonzero(run.queries.ok)
    positions = np.searchsorted(readable, run.query_rows)
    if not np.array_equal(readable[np.minimum(positions, len(readable) - 1)], run.query_rows):
        raise ValueError("run.query_rows are not readable rows of run.queries")
    return positions


def _query_and_candidates(run: EvalRun, positions: np.ndarray, q: int, top_k: int,
                          keypoints: RunKeypoints | None = None) -> tuple[RerankQuery, RerankCandidates] | None:
    """Query ``q``'s descriptors (and keypoints, when given) and its first ``top_k`` results
    (-1 padding only trails)."""
    ids = run.knn_indices[q, :top_k]
    ids = ids[ids >= 0]
    if len(ids) == 0:
        return None
    query = RerankQuery(run.queries.local_desc[positions[q]], run.queries.global_desc[positions[q]],
                        None if keypoints is None else keypoints.query(int(run.query_rows[q])))
    return query, RerankCandidates(run.gallery.local_desc[ids], run.knn_scores[q, : len(ids)],
                                   run.gallery.global_desc[ids],
                                   None if keypoints is None else [keypoints.candidate(int(run.gallery_rows[i]))
                                                                   for i in ids])


def score_top_k(run: EvalRun, score: Callable[[RerankQuery, RerankCandidates], np.ndarray], top_k: int, *,
                queries: np.ndarray | None = None, progress: bool = False) -> np.ndarray:
    """Call ``score(query, candidates) -> (n,) scores`` on each query's first ``top_k`` results.

    queries: which of the run's Q queries (default all). Returns (len(queries), top_k) float32
    scores aligned with ``run.knn_indices[queries, :top_k]``, NaN where there is no candidate.
    """
    chosen = np.arange(len(run.query_rows)) if queries is None else np.asarray(queries, np.int64)
    top_k = min(top_k, run.knn_indices.shape[1])
    positions = query_positions(run)
    out = np.full((len(chosen), top_k), np.nan, np.float32)
    for i, q in enumerate(tqdm(chosen, desc="rerank", unit="query", disable=not progress, leave=False)):
        item = _query_and_candidates(run, positions, int(q), top_k)
        if item is not None:
            out[i, : len(item[1].global_scores)] = score(*item)
    return out


def _orders(scores: np.ndarray) -> np.ndarray:
    """Stable descending order of each row, NaN (no candidate) last."""
    filled = np.where(np.isnan(scores), -np.inf, scores)
    return np.argsort(-filled, axis=1, kind="stable")


def reranked_metrics(run: EvalRun, scores: np.ndarray, *, queries: np.ndarray | None = None,
                     ks: tuple[int, ...] = (1, 10, 100)) -> tuple[dict, np.ndarray]:
    """Metrics after sorting each query's first ``scores.shape[1]`` results by ``scores``.

    scores: (len(queries), top_k) from :func:`score_top_k` (or any per-candidate score, e.g.
    fused). Returns (metrics, order (len(queries), top_k) int64). Pure: no model involved, so
    trying many fusion weights costs no forward passes.
    """
    chosen = np.arange(len(run.query_rows)) if queries is None else np.asarray(queries, np.int64)
    order = _orders(scores)
    top_k = scores.shape[1]
    matches = run.matches[chosen].copy()
    matches[:, :top_k] = np.take_along_axis(matches[:, :top_k], order, axis=1)
    return retrieval_metrics(matches, run.n_positives[chosen], ks), order


def rerank_run(run: EvalRun, reranker: Reranker, top_k: int = 100, *, keypoints: RunKeypoints | None = None,
               progress: bool = True, ks: tuple[int, ...] = (1, 10, 100)) -> RerankedRun:
    """Rerank every query's global top-``top_k`` with ``reranker`` and recompute the metrics.
    The reranker's own order is used as is (not re-derived from its scores). ``keypoints``: for
    rerankers that verify geometry (see waldo.eval.gv_eval.run_keypoints)."""
    if top_k < 1:
        raise ValueError(f"top_k must be positive, got {top_k}")
    top_k = min(top_k, run.knn_indices.shape[1])
    positions = query_positions(run)
    n_queries = len(run.query_rows)
    order = np.tile(np.arange(top_k, dtype=np.int64), (n_queries, 1))
    rerank_scores = np.full((n_queries, top_k), np.nan, np.float32)
    start = time.perf_counter()
    for q in tqdm(range(n_queries), desc=f"rerank ({reranker.name})", unit="query", disable=not progress, leave=False):
        item = _query_and_candidates(run, positions, q, top_k, keypoints)
        if item is None:
            continue
        result = reranker.rerank(*item)
        n = len(item[1].global_scores)
        if sorted(np.asarray(result.order).tolist()) != list(range(n)):
            raise ValueError(f"reranker {reranker.name!r} returned an order that is not a permutation of {n} candidates")
        order[q, :n] = result.order
        rerank_scores[q, :n] = result.scores
    seconds = time.perf_counter() - start
    knn_indices, knn_scores, matches = run.knn_indices.copy(), run.knn_scores.copy(), run.matches.copy()
    for array in (knn_indices, knn_scores, matches):
        array[:, :top_k] = np.take_along_axis(array[:, :top_k], order, axis=1)
    metrics = retrieval_metrics(matches, run.n_positives, ks)
    for k in ks:  # only the first top_k results moved, and only among themselves
        before = run.metrics.get(f"recall@{k}")
        if k >= top_k and before is not None and not np.isnan(before):
            assert abs(metrics[f"recall@{k}"] - before) < 1e-12, "reranking changed the candidate set"
    metrics.update({key: run.metrics[key] for key in ("n_gallery", "n_dropped_queries") if key in run.metrics})
    metrics.update({"reranker": reranker.name, "rerank_top_k": top_k, "global": dict(run.metrics),
                    "rerank_ms_per_query": round(1000 * seconds / max(1, n_queries), 2)})
    new_run = replace(run, metrics=metrics, knn_indices=knn_indices, knn_scores=knn_scores, matches=matches)
    return RerankedRun(metrics, new_run, rerank_scores)
