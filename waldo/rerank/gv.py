"""Geometric verification (spatial reranking) of a query's global top-k.

For each candidate: RootSIFT matches (mutual NN + ratio test, :mod:`waldo.rerank.matching`),
then a robust fit with OpenCV's USAC MAGSAC++: a homography when there are enough matches,
an affine model otherwise (a homography from a handful of matches is a free-form warp that
"explains" noise; an affine has fewer degrees of freedom). A fitted model that no rigid object
could produce (mirrored, collapsed, scaled by more than ``max_scale_change``) is refitted as an
affine and, if that fails too, rejected. The score is the inlier count.

Reranking rule (as DELG's): candidates with at least ``min_inliers`` inliers are "verified"
and move to the front, sorted by inlier count (ties keep their prior order); all others keep
their prior (global, or another reranker's) order behind them. So GV can only promote images
it has geometric evidence for; it never demotes below an unverified image on a whim.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import cv2
import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from waldo.models.keypoints import LocalFeatures, rootsift
from waldo.rerank.base import RERANKERS, Need, RerankCandidates, RerankerSetup, RerankQuery, RerankResult
from waldo.rerank.matching import mutual_ratio_matches

MODEL_NONE, MODEL_AFFINE, MODEL_HOMOGRAPHY = "none", "affine", "homography"


class GVConfig(BaseModel):
    """Matching, fitting and reranking parameters (chosen on training data; see docs/results.md).

    ratio: Lowe's ratio threshold.  threshold_px: MAGSAC++ reprojection threshold, in pixels
    of the candidate image.  homography_min_matches: fewer tentative matches -> affine model.
    min_inliers: inliers needed to count as verified.  max_scale_change: largest plausible
    linear scale between query and candidate.  top_k: candidates verified per query.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    ratio: float = Field(0.8, gt=0, le=1)
    threshold_px: float = Field(4.0, gt=0)
    homography_min_matches: int = Field(15, ge=4)
    min_inliers: int = Field(8, ge=3)  # chosen on grocery-open-cross validation (docs/results.md)
    max_scale_change: float = Field(8.0, ge=1)
    confidence: float = 0.999
    max_iters: int = 2000
    top_k: int = Field(100, ge=1)


@dataclass(frozen=True)
class Verification:
    """One (query, candidate) verification.

    matches: (P, 2) int32 (query keypoint, candidate keypoint) tentative matches.
    inlier_mask: (P,) bool.  transform: (3, 3) float64 mapping query pixels to candidate
    pixels (affine models have last row [0, 0, 1]), None when no model was accepted.
    """

    inliers: int
    model: str
    transform: np.ndarray | None = None
    matches: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.int32))
    inlier_mask: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))

    @property
    def n_matches(self) -> int:
        return int(len(self.matches))

    @property
    def inlier_ratio(self) -> float:  # 0 without matches
        return self.inliers / self.n_matches if self.n_matches else 0.0


def _plausible(transform: np.ndarray, query_xy: np.ndarray, max_scale: float) -> bool:
    """Could a real object seen from two viewpoints give this query->candidate map?

    Maps the bounding box of the query's keypoints: every corner must stay in front
    (w > 0, else the box wraps through infinity), the quadrilateral must stay convex with the
    same orientation (no mirror image, no bow-tie) and its area may change by at most
    ``max_scale**2``. Catches the degenerate fits that random matches produce most often.
    """
    lo, hi = query_xy.min(axis=0), query_xy.max(axis=0)
    area = float(np.prod(hi - lo))
    if area <= 1.0:
        return False
    corners = np.array([[lo[0], lo[1], 1], [hi[0], lo[1], 1], [hi[0], hi[1], 1], [lo[0], hi[1], 1]], np.float64)
    mapped = corners @ transform.T
    if np.any(mapped[:, 2] <= 1e-9):
        return False
    quad = mapped[:, :2] / mapped[:, 2:3]
    edges = np.roll(quad, -1, axis=0) - quad
    turns = edges[:, 0] * np.roll(edges, -1, axis=0)[:, 1] - edges[:, 1] * np.roll(edges, -1, axis=0)[:, 0]
    if not np.all(turns > 0):  # image axes: x right, y down; the box is traversed with turns > 0
        return False
    mapped_area = 0.5 * float(np.sum(quad[:, 0] * np.roll(quad[:, 1], -1) - np.roll(quad[:, 0], -1) * quad[:, 1]))
    return 1.0 / max_scale**2 <= mapped_area / area <= max_scale**2


def estimate_transform(src: np.ndarray, dst: np.ndarray, config: GVConfig,
                       query_xy: np.ndarray | None = None) -> tuple[str, np.ndarray | None, np.ndarray]:
    """Robustly fit query->candidate: returns (model name, (3, 3) float64 or None, (P,) bool mask).

    src, dst: (P, 2) float32 matched positions in the query and candidate. ``query_xy``
    (default: src) spans the query object for the plausibility test.
    """
    n = len(src)
    none = (MODEL_NONE, None, np.zeros(n, bool))
    if n < 3:
        return none
    extent = src if query_xy is None or len(query_xy) == 0 else query_xy
    src32, dst32 = np.ascontiguousarray(src, np.float32), np.ascontiguousarray(dst, np.float32)
    if n >= config.homography_min_matches:
        h, mask = cv2.findHomography(src32, dst32, cv2.USAC_MAGSAC, config.threshold_px,
                                     maxIters=config.max_iters, confidence=config.confidence)
        if h is not None and h.shape == (3, 3) and mask is not None and _plausible(h, extent, config.max_scale_change):
            return MODEL_HOMOGRAPHY, h.astype(np.float64), mask.ravel().astype(bool)
    a, mask = cv2.estimateAffine2D(src32, dst32, method=cv2.USAC_MAGSAC,
                                   ransacReprojThreshold=config.threshold_px,
                                   maxIters=config.max_iters, confidence=config.confidence)
    if a is None or mask is None:
        return none
    affine = np.vstack([a, [0.0, 0.0, 1.0]]).astype(np.float64)
    if not _plausible(affine, extent, config.max_scale_change):
        return none
    return MODEL_AFFINE, affine, mask.ravel().astype(bool)


def verify_pair(query: LocalFeatures, candidate: LocalFeatures, config: GVConfig = GVConfig(), *,
                query_rootsift: np.ndarray | None = None) -> Verification:
    """Match and fit one pair. ``query_rootsift`` ((Kq, 128) float32) saves recomputing it
    for each of a query's candidates."""
    q_desc = rootsift(query.descriptors) if query_rootsift is None else query_rootsift
    matches = mutual_ratio_matches(q_desc, rootsift(candidate.descriptors), config.ratio)
    if len(matches) < config.min_inliers:  # cannot verify whatever the fit: skip the fit
        return Verification(0, MODEL_NONE, None, matches, np.zeros(len(matches), bool))
    src, dst = query.keypoints[matches[:, 0]], candidate.keypoints[matches[:, 1]]
    model, transform, mask = estimate_transform(src, dst, config, query.keypoints)
    return Verification(int(mask.sum()), model, transform, matches, mask)


def corner_errors(h_true: np.ndarray, h_est: np.ndarray, width: int, height: int) -> np.ndarray:
    """(4,) pixel distances between where two homographies send a width x height image's corners:
    how far an estimated transform is from the true one where it extrapolates most."""
    corners = np.array([[0, 0, 1], [width - 1, 0, 1], [width - 1, height - 1, 1], [0, height - 1, 1]], float)
    a, b = corners @ np.asarray(h_true, float).T, corners @ np.asarray(h_est, float).T
    return np.linalg.norm(a[:, :2] / a[:, 2:] - b[:, :2] / b[:, 2:], axis=1)


def verified_first_order(inliers: np.ndarray, min_inliers: int) -> np.ndarray:
    """(K,) permutation of candidate positions 0..K-1 (given in prior order, best first).

    Verified candidates (``inliers >= min_inliers``) first, by inliers descending, ties in
    prior order; then the unverified ones in prior order.
    """
    inliers = np.asarray(inliers)
    verified = np.flatnonzero(inliers >= min_inliers)
    verified = verified[np.lexsort((verified, -inliers[verified]))]
    return np.concatenate([verified, np.flatnonzero(inliers < min_inliers)]).astype(np.int64)


@dataclass(frozen=True)
class GVRerank:
    """``order`` (K,) int64 input positions, best first; ``inliers`` (K,) int32 and
    ``verifications`` in *input* order."""

    order: np.ndarray
    inliers: np.ndarray
    verifications: list[Verification]


class GeometricReranker:
    """Reranks a query's candidates by verified inliers, verifying candidates in parallel.

    Threads, not processes: matching is one BLAS product and the fit is OpenCV, both of which
    release the GIL, and threads share the (large) candidate features without copying.
    """

    name = "gv"

    def __init__(self, config: GVConfig = GVConfig(), workers: int | None = None) -> None:
        self.config = config
        self.workers = max(1, workers if workers is not None else (os.cpu_count() or 1))
        self._pool: ThreadPoolExecutor | None = None

    def verify_many(self, query: LocalFeatures, candidates: Sequence[LocalFeatures]) -> list[Verification]:
        """One :class:`Verification` per candidate, in input order."""
        q_root = rootsift(query.descriptors)
        if self.workers == 1 or len(candidates) < 2:
            return [verify_pair(query, c, self.config, query_rootsift=q_root) for c in candidates]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="waldo-gv")
        # Interleaved chunks, one per worker: few tasks (low overhead) with balanced work.
        chunks = [list(range(w, len(candidates), self.workers)) for w in range(self.workers)]

        def run(chunk: list[int]) -> list[Verification]:
            return [verify_pair(query, candidates[i], self.config, query_rootsift=q_root) for i in chunk]

        out: list[Verification | None] = [None] * len(candidates)
        for chunk, results in zip(chunks, self._pool.map(run, chunks)):
            for i, result in zip(chunk, results):
                out[i] = result
        return out  # type: ignore[return-value]

    def rerank_features(self, query: LocalFeatures, candidates: Sequence[LocalFeatures]) -> GVRerank:
        """Verify ``candidates`` (given best first) and return the verified-first order."""
        verifications = self.verify_many(query, candidates)
        inliers = np.array([v.inliers for v in verifications], np.int32)
        return GVRerank(verified_first_order(inliers, self.config.min_inliers), inliers, verifications)

    def rerank(self, query: RerankQuery, candidates: RerankCandidates) -> RerankResult:
        """The :class:`~waldo.rerank.base.Reranker` interface: verifies the keypoints of the
        query and of every candidate. Scores: see :func:`gv_scores`."""
        if query.keypoints is None or candidates.keypoints is None:
            raise ValueError("geometric verification needs the keypoints of the query and of every candidate")
        result = self.rerank_features(query.keypoints, candidates.keypoints)
        return RerankResult(result.order, gv_scores(result.inliers[result.order], self.config.min_inliers))

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def __enter__(self) -> GeometricReranker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def gv_scores(inliers_in_order: np.ndarray, min_inliers: int) -> np.ndarray:
    """Descending (N,) float32 scores for a verified-first order: verified candidates score
    their inlier count (>= min_inliers); the unverified, kept in prior order behind them, score
    -(position + 1) / (N + 1), in (-1, 0): negative means "not verified"."""
    inliers = np.asarray(inliers_in_order, np.float32)
    n = len(inliers)
    prior = -(np.arange(1, n + 1, dtype=np.float32)) / (n + 1)
    return np.where(inliers >= min_inliers, inliers, prior).astype(np.float32)


@RERANKERS.register("gv", description="geometric verification (SIFT + MAGSAC++): verified images first, by inliers",
                    needs=(Need.KEYPOINTS,), score="inliers")
def _gv(setup: RerankerSetup) -> GeometricReranker:
    return GeometricReranker()


# DELG's verified-first rule on the RRT's order: the RRT decides among candidates GV has no
# geometric evidence for (textureless produce), geometry overrides it where it has.
RERANKERS.offer("rrt+gv", "the RRT's order, then geometrically verified images first")
