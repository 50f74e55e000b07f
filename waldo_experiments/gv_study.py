"""Geometric-verification studies on an evaluation run (experiments/gv_results.py).

Verification results are kept per (query, prior rank) as inlier counts, so the reranking rule
can be re-applied for any ``min_inliers`` without verifying again (that is how thresholds are
chosen on validation data). The evaluation itself reranks through ``waldo.eval.rerank_eval``.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from waldo.data.protocols import Protocol
from waldo.eval.evaluate import EvalRun
from waldo.eval.gv_eval import DEFAULT_CACHE_DIR, run_keypoints
from waldo.eval.metrics import match_matrix, retrieval_metrics
from waldo.models.keypoints import LocalFeatures, SiftConfig
from waldo.rerank.gv import GeometricReranker, verified_first_order


@dataclass
class GVVerified:
    """Inliers of each query's top-k under a prior ranking.

    prior_indices: (Q, R) gallery positions (as EvalRun.knn_indices), the order verified.
    inliers: (Q, k) int32, inliers[q, r] for candidate prior_indices[q, r].
    seconds: wall time of verification only (features were precomputed).
    """

    prior_indices: np.ndarray
    inliers: np.ndarray
    seconds: float

    @property
    def ms_per_query(self) -> float:
        return 1000.0 * self.seconds / max(1, len(self.inliers))


def verify_run(protocol: Protocol, run: EvalRun, reranker: GeometricReranker, *,
               prior_indices: np.ndarray | None = None, sift: SiftConfig = SiftConfig(),
               cache_dir: str | Path | None = DEFAULT_CACHE_DIR, max_queries: int | None = None,
               progress: bool = False) -> GVVerified:
    """Verify the top ``reranker.config.top_k`` of every query of ``run``.

    ``prior_indices`` (Q, R) replaces ``run.knn_indices`` as the order to rerank (e.g. the
    order an RRT produced: that is how ``rrt+gv`` composes). ``max_queries`` keeps only the
    first queries (for quick validation sweeps).
    """
    prior = run.knn_indices if prior_indices is None else np.asarray(prior_indices)
    if max_queries is not None:
        prior = prior[:max_queries]
    keypoints = run_keypoints(protocol, sift, cache_dir=cache_dir, progress=progress)
    k = min(reranker.config.top_k, prior.shape[1])
    inliers = np.zeros((len(prior), k), np.int32)
    start = time.perf_counter()
    for q in range(len(prior)):
        query = keypoints.query(int(run.query_rows[q]))
        ranked = [int(i) for i in prior[q, :k]]
        candidates = [keypoints.candidate(int(run.gallery_rows[i])) if i >= 0 else LocalFeatures.empty() for i in ranked]
        inliers[q] = [v.inliers for v in reranker.verify_many(query, candidates)]
        if progress and (q + 1) % 200 == 0:
            print(f"gv: verified {q + 1}/{len(prior)} queries", file=sys.stderr)
    return GVVerified(prior, inliers, time.perf_counter() - start)


def gv_orders(inliers: np.ndarray, min_inliers: int) -> np.ndarray:
    """(Q, k) int64: each row's :func:`verified_first_order` of its (Q, k) ``inliers``."""
    return np.stack([verified_first_order(row, min_inliers) for row in inliers]) if len(inliers) else \
        np.zeros(inliers.shape, np.int64)


def apply_gv(prior_indices: np.ndarray, inliers: np.ndarray, min_inliers: int) -> np.ndarray:
    """(Q, R) reranked gallery positions: each row's first k (= inliers.shape[1]) reordered
    by :func:`verified_first_order`, the rest of the ranking unchanged."""
    out = np.array(prior_indices, copy=True)
    k = inliers.shape[1]
    out[:, :k] = np.take_along_axis(out[:, :k], gv_orders(inliers, min_inliers), axis=1)
    return out


def ranking_metrics(protocol: Protocol, run: EvalRun, indices: np.ndarray,
                    ks: tuple[int, ...] = (1, 10, 100)) -> dict[str, float]:
    """Retrieval metrics of any (Q', R) ranking of ``run``'s first Q' queries."""
    identities = sorted(set(protocol.gallery.identities) | set(protocol.queries.identities))
    code = {identity: i for i, identity in enumerate(identities)}
    gallery_labels = np.array([code[protocol.gallery.identities[r]] for r in run.gallery_rows], np.int64)
    query_labels = np.array([code[protocol.queries.identities[r]] for r in run.query_rows[: len(indices)]], np.int64)
    return retrieval_metrics(match_matrix(indices, query_labels, gallery_labels), run.n_positives[: len(indices)], ks)
