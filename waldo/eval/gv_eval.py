"""Geometric verification of an evaluation run: features once, verify each query's top-k, score.

SIFT features of every query and gallery image are computed once (in threads; OpenCV releases
the GIL) and cached under ``cache_dir/<key>/`` as ``.npy`` files, where ``key`` hashes the
feature config and the exact image list (paths, sizes, modification times): a changed image or
config is a different key, so a stale cache can never be read. Verification results are kept
per (query, prior rank) as inlier counts, so the reranking rule can be re-applied for any
``min_inliers`` without verifying again (that is how thresholds are chosen on validation data).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from waldo.data.protocols import Protocol
from waldo.eval.evaluate import EvalRun
from waldo.eval.metrics import match_matrix, retrieval_metrics
from waldo.index.verification import RaggedFeatures
from waldo.paths import PROJECT_ROOT
from waldo.rerank.gv import GeometricReranker, GVConfig, verified_first_order
from waldo.rerank.local_features import LocalFeatures, SiftConfig, extract_many, pack_features

DEFAULT_CACHE_DIR = PROJECT_ROOT / "cache" / "gv"  # git-ignored
_FILES = ("keypoints.npy", "descriptors.npy", "offsets.npy")


def cache_key(paths: Sequence[str], config: SiftConfig) -> str:
    """sha256 of the config and every image's path, size and mtime (first 20 hex digits)."""
    digest = hashlib.sha256(json.dumps(config.to_dict(), sort_keys=True).encode())
    for p in paths:
        try:
            st = os.stat(p)
            digest.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            digest.update(f"{p}\0missing\n".encode())
    return digest.hexdigest()[:20]


def _load_cached(folder: Path, n: int) -> RaggedFeatures | None:
    if not all((folder / f).is_file() for f in _FILES):
        return None
    try:
        arrays = [np.load(folder / f, allow_pickle=False) for f in _FILES]
        ragged = RaggedFeatures(*arrays)
    except (OSError, ValueError):
        return None  # a damaged cache is recomputed, never trusted
    return ragged if len(ragged) == n else None


def _save_cached(folder: Path, ragged: RaggedFeatures, paths: Sequence[str], config: SiftConfig) -> None:
    """Write into a temporary sibling, then rename: a reader sees a complete cache or none."""
    tmp = folder.parent / f".{folder.name}.{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        for name, array in zip(_FILES, (ragged.keypoints, ragged.descriptors, ragged.offsets)):
            np.save(tmp / name, np.ascontiguousarray(array), allow_pickle=False)
        (tmp / "manifest.json").write_text(json.dumps({"config": config.to_dict(), "n_images": len(paths),
                                                       "paths": list(paths)}, indent=1))
        os.rename(tmp, folder)
    except OSError:
        pass  # another process wrote the same cache first: theirs is identical
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def extract_features(paths: Sequence[str], config: SiftConfig = SiftConfig(), *,
                     cache_dir: str | Path | None = DEFAULT_CACHE_DIR, workers: int | None = None,
                     progress: bool = False) -> RaggedFeatures:
    """SIFT features of ``paths`` (one ragged row per path, in order), cached when
    ``cache_dir`` is set. Unreadable images get zero keypoints (they can never verify)."""
    paths = [os.fspath(p) for p in paths]
    folder = Path(cache_dir) / cache_key(paths, config) if cache_dir is not None else None
    if folder is not None and (cached := _load_cached(folder, len(paths))) is not None:
        return cached

    start = time.perf_counter()
    features = extract_many(paths, config, workers=workers)
    if progress:
        print(f"gv: SIFT of {len(paths)} images in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    ragged = pack_features(features)
    if folder is not None:
        _save_cached(folder, ragged, paths, config)
    return ragged


def _local(ragged: RaggedFeatures, i: int) -> LocalFeatures:
    kp, desc = ragged[i]
    return LocalFeatures(kp, desc)


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
    gallery = extract_features(protocol.gallery.paths, sift, cache_dir=cache_dir, progress=progress)
    queries = gallery if protocol.queries is protocol.gallery else extract_features(
        protocol.queries.paths, sift, cache_dir=cache_dir, progress=progress)
    k = min(reranker.config.top_k, prior.shape[1])
    inliers = np.zeros((len(prior), k), np.int32)
    start = time.perf_counter()
    for q in range(len(prior)):
        query = _local(queries, int(run.query_rows[q]))
        ranked = [int(i) for i in prior[q, :k]]
        candidates = [_local(gallery, int(run.gallery_rows[i])) if i >= 0 else LocalFeatures.empty() for i in ranked]
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


def gv_rerank_run(protocol: Protocol, run: EvalRun, *, config: GVConfig = GVConfig(),
                  sift: SiftConfig = SiftConfig(), cache_dir: str | Path | None = DEFAULT_CACHE_DIR,
                  workers: int | None = None, progress: bool = False,
                  ks: tuple[int, ...] = (1, 10, 100)) -> EvalRun:
    """``run`` with each query's top ``config.top_k`` reranked by GV, in whatever order ``run``
    has (global, or an RRT's: that makes ``rrt+gv``). knn_indices, knn_scores and matches are
    permuted alike; metrics are recomputed, with the run's first (global) figures under
    ``"global"`` and the verification cost under ``"gv_ms_per_query"``."""
    with GeometricReranker(config, workers) as reranker:
        verified = verify_run(protocol, run, reranker, sift=sift, cache_dir=cache_dir, progress=progress)
    orders = gv_orders(verified.inliers, config.min_inliers)
    k = orders.shape[1]
    arrays = [run.knn_indices.copy(), run.knn_scores.copy(), run.matches.copy()]
    for array in arrays:
        array[:, :k] = np.take_along_axis(array[:, :k], orders, axis=1)
    metrics = retrieval_metrics(arrays[2], run.n_positives, ks)
    metrics.update({key: run.metrics[key] for key in ("n_gallery", "n_dropped_queries") if key in run.metrics})
    previous = run.metrics.get("reranker")
    metrics.update({"reranker": f"{previous}+gv" if previous else "gv", "rerank_top_k": k,
                    "global": dict(run.metrics.get("global", run.metrics)),
                    "gv_ms_per_query": round(verified.ms_per_query, 2), "gv_config": config.to_dict(),
                    "sift_config": sift.to_dict()})
    return replace(run, metrics=metrics, knn_indices=arrays[0], knn_scores=arrays[1], matches=arrays[2])


def ranking_metrics(protocol: Protocol, run: EvalRun, indices: np.ndarray,
                    ks: tuple[int, ...] = (1, 10, 100)) -> dict[str, float]:
    """Retrieval metrics of any (Q', R) ranking of ``run``'s first Q' queries."""
    identities = sorted(set(protocol.gallery.identities) | set(protocol.queries.identities))
    code = {identity: i for i, identity in enumerate(identities)}
    gallery_labels = np.array([code[protocol.gallery.identities[r]] for r in run.gallery_rows], np.int64)
    query_labels = np.array([code[protocol.queries.identities[r]] for r in run.query_rows[: len(indices)]], np.int64)
    return retrieval_metrics(match_matrix(indices, query_labels, gallery_labels), run.n_positives[: len(indices)], ks)
