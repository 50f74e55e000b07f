"""Geometric verification (spatial reranking) of a query's global top-k.

For each candidate: descriptor matches (TEBLID by Hamming distance, or RootSIFT for indexes
built before TEBLID; mutual NN + ratio test, :mod:`waldo.rerank.matching`), then a robust fit
with OpenCV's USAC MAGSAC++: a homography when there are enough matches, an affine model
otherwise (a homography from a handful of matches is a free-form warp that "explains" noise;
an affine has fewer degrees of freedom). A fitted model that no rigid object could produce
(mirrored, collapsed, scaled by more than ``max_scale_change``, stretched more in one direction
than ``max_anisotropy`` times the other) is refitted as an affine and, if that fails too,
rejected; so is a fit whose inliers cover less than ``min_spread`` of the query's keypoint
extent (and, when set, less than ``min_candidate_spread`` of the candidate's, or whose inliers' box
misses either photo's centre by more than ``max_centre_offset``: both off by default, validation
did not choose them, experiments/gv_object.py). The evidence is the inlier count: ``min_inliers`` or more is what the ranking uses;
calling a match *verified* is a stricter claim (:meth:`GVConfig.verifies`).

Reranking rule, chosen on validation identities of both shipped kinds of model
(experiments/gv_fusion.py; the features by experiments/gv_compact.py; docs/results.md): by
default *fused*: global similarity + ``fusion_weight`` x the range of the candidates' global
similarities x (1 + ln(inliers / min_inliers)) for candidates with at least 15 inliers, so a few
inliers on a shared logo cannot lift a poor global match above a strong one, while a well matched
one still rises, whatever the spread of the model's similarities. With ``fusion_weight=None``, or on
another reranker's order (``rrt+gv``), DELG's rule: candidates with evidence first, by inlier
count, the others behind them in their prior order (the fused rule on the prior reranker's
score scored lower on the RRT's validation: experiments/gv_after_rrt.py).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

# OpenCV and waldo.models.keypoints (which loads OpenCV and the index package) are imported by
# the functions that fit or match: importing this module registers "gv", which `waldo --help`
# lists, and must stay cheap.
from waldo.rerank.base import (
    RERANKERS,
    SCORE_GV_FUSED,
    SCORE_INLIERS,
    SCORE_SIMILARITY,
    Need,
    RerankCandidates,
    RerankerSetup,
    RerankQuery,
    RerankResult,
)
from waldo.rerank.matching import mutual_ratio_matches

if TYPE_CHECKING:
    from waldo.models.keypoints import LocalFeatures

MODEL_NONE, MODEL_AFFINE, MODEL_HOMOGRAPHY = "none", "affine", "homography"


class GVConfig(BaseModel):
    """Matching, fitting and reranking parameters (chosen on training data; see docs/results.md).

    ratio: Lowe's ratio threshold (None: the descriptor's own, :data:`DEFAULT_RATIO`).
    threshold_px: MAGSAC++ reprojection threshold, in pixels of the candidate image.
    homography_min_matches: fewer tentative matches -> affine model.  min_inliers: inliers
    that count as geometric evidence.  max_scale_change: largest plausible linear scale between query
    and candidate.  max_anisotropy: largest plausible ratio between how much the model stretches
    the query's box along one side and along another.  min_spread: least area of the inliers'
    bounding box in the query, as a fraction of the query keypoints' bounding box.
    min_candidate_spread: the same in the candidate.  max_centre_offset: None (off) or the
    largest :func:`centre_offset` of the inliers in either image (0: their box holds the centre of
    both photos).
    fusion_weight: None orders candidates with evidence first (:func:`verified_first_order`); a
    weight w orders by global similarity + w * (1 + ln(inliers / min_inliers)) for candidates
    with evidence (:func:`fused_scores`), so strong global evidence can outrank weak geometry.
    fusion_scale: the unit of w, "absolute" (global similarity) or the spread of the candidates'
    global similarities ("std", "range"; :data:`FUSION_SCALES`).
    top_k: candidates verified per query.

    Two bars, on purpose: ``min_inliers`` inliers are geometric *evidence*, which the ranking
    uses; calling a match **verified** (the page, the API's ``verified``, ``waldo explain``) is a
    claim that it shows the same object, so it also needs the inliers to cover at least
    ``claim_min_spread`` of the query's keypoint extent and the model to stretch the inliers'
    box at most ``claim_max_anisotropy`` times more one way than another: a shared logo or a strip
    of shelf gathers inliers without being the product. The claim's bar was chosen on grocery's
    training packages: wrong for at most 10% of pairs of different products of one brand or
    shelf, then as many same-product pairs as possible (docs/results.md: on the test packages,
    19 of 52 pairs of one brand's different products pass the evidence bar, 11 are called
    verified; 29 had the old SIFT verifier's).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    ratio: float | None = Field(None, gt=0, le=1)
    threshold_px: float = Field(4.0, gt=0)
    homography_min_matches: int = Field(15, ge=4)
    # The ratio and features: chosen by experiments/gv_compact.py; min_inliers, max_anisotropy
    # (off), min_spread (off), fusion_weight and fusion_scale: by experiments/gv_fusion.py on two
    # folds of both protocols' training identities with both the untrained default and the
    # shipped lite0-rrt model (docs/results.md); what is *called* verified has its own, stricter
    # bar on top of min_inliers (claim_*).
    min_inliers: int = Field(15, ge=3)
    max_scale_change: float = Field(8.0, ge=1)
    max_anisotropy: float = Field(float("inf"), ge=1)
    min_spread: float = Field(0.0, ge=0, le=1)
    # Is the match on what both photos show, not on a scene they share? Off: on the same
    # validation neither check raised the mean mAP (experiments/gv_object.py, docs/results.md).
    min_candidate_spread: float = Field(0.0, ge=0, le=1)
    max_centre_offset: float | None = Field(None, ge=0)
    claim_min_spread: float = Field(0.05, ge=0, le=1)
    claim_max_anisotropy: float = Field(2.0, ge=1)
    fusion_weight: float | None = Field(0.2, gt=0)
    fusion_scale: str = Field("range", pattern="^(absolute|std|range)$")
    confidence: float = 0.999
    max_iters: int = 2000
    top_k: int = Field(100, ge=1)

    def verifies(self, verification: Verification) -> bool:
        """Whether ``verification`` is called verified (the claim's bar, class doc)."""
        return (verification.inliers >= self.min_inliers and verification.spread >= self.claim_min_spread
                and verification.anisotropy <= self.claim_max_anisotropy)

    def ratio_for(self, descriptor_bytes: int) -> float:
        return self.ratio if self.ratio is not None else DEFAULT_RATIO.get(descriptor_bytes, 0.8)


#: Lowe's ratio per stored descriptor width, chosen on validation identities (docs/results.md):
#: RootSIFT (128 bytes) the classic 0.8; TEBLID (32 bytes) on sqrt(Hamming) distances.
DEFAULT_RATIO = {128: 0.8, 32: 0.95}


@dataclass(frozen=True)
class Verification:
    """One (query, candidate) verification.

    matches: (P, 2) int32 (query keypoint, candidate keypoint) tentative matches.
    inlier_mask: (P,) bool.  transform: (3, 3) float64 mapping query pixels to candidate
    pixels (affine models have last row [0, 0, 1]), None when no model was accepted.
    :meth:`GVConfig.verifies` says whether it is called verified.
    """

    inliers: int
    model: str
    transform: np.ndarray | None = None
    matches: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.int32))
    inlier_mask: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))
    #: :func:`inlier_spread` of the inliers over the query, and the model's
    #: :func:`box_distortion` anisotropy on the inliers' box (inf without a model).
    spread: float = 0.0
    anisotropy: float = float("inf")

    @property
    def n_matches(self) -> int:
        return int(len(self.matches))

    @property
    def inlier_ratio(self) -> float:  # 0 without matches
        return self.inliers / self.n_matches if self.n_matches else 0.0


def box_distortion(transform: np.ndarray, query_xy: np.ndarray) -> tuple[float, float] | None:
    """How ``transform`` distorts the bounding box of the query's keypoints: (area ratio,
    anisotropy = longest over shortest stretch of its sides), or None when no real object seen
    from two viewpoints could give it: a corner goes behind the camera (w <= 0, the box wraps
    through infinity) or the mapped quadrilateral is not convex with the same orientation (a
    mirror image, a bow-tie)."""
    lo, hi = query_xy.min(axis=0), query_xy.max(axis=0)
    area = float(np.prod(hi - lo))
    if area <= 1.0:
        return None
    corners = np.array([[lo[0], lo[1], 1], [hi[0], lo[1], 1], [hi[0], hi[1], 1], [lo[0], hi[1], 1]], np.float64)
    mapped = corners @ transform.T
    if np.any(mapped[:, 2] <= 1e-9):
        return None
    quad = mapped[:, :2] / mapped[:, 2:3]
    edges = np.roll(quad, -1, axis=0) - quad
    turns = edges[:, 0] * np.roll(edges, -1, axis=0)[:, 1] - edges[:, 1] * np.roll(edges, -1, axis=0)[:, 0]
    if not np.all(turns > 0):  # image axes: x right, y down; the box is traversed with turns > 0
        return None
    mapped_area = 0.5 * float(np.sum(quad[:, 0] * np.roll(quad[:, 1], -1) - np.roll(quad[:, 0], -1) * quad[:, 1]))
    stretch = np.linalg.norm(edges, axis=1) / np.array([hi[0] - lo[0], hi[1] - lo[1]] * 2, np.float64)
    return mapped_area / area, float(stretch.max() / max(stretch.min(), 1e-12))


def _plausible(transform: np.ndarray, query_xy: np.ndarray, max_scale: float, max_anisotropy: float = np.inf) -> bool:
    """Could a real object seen from two viewpoints give this query->candidate map? Its
    :func:`box_distortion` must exist, change the box's area by at most ``max_scale**2`` and
    stretch its sides by factors at most ``max_anisotropy`` apart (a box squeezed into a
    sliver). Catches the degenerate fits that random matches produce most often."""
    distortion = box_distortion(transform, query_xy)
    if distortion is None:
        return False
    area_ratio, anisotropy = distortion
    return 1.0 / max_scale**2 <= area_ratio <= max_scale**2 and anisotropy <= max_anisotropy


def inlier_spread(query_xy: np.ndarray, inliers_xy: np.ndarray) -> float:
    """Area of the inliers' bounding box over that of all the query's keypoints (0..1): how much
    of what the query shows the geometric evidence covers."""
    if len(inliers_xy) < 2 or len(query_xy) < 2:
        return 0.0
    extent = np.prod(query_xy.max(axis=0) - query_xy.min(axis=0))
    return float(np.prod(inliers_xy.max(axis=0) - inliers_xy.min(axis=0)) / max(extent, 1e-9))


def centre_offset(all_xy: np.ndarray, inliers_xy: np.ndarray) -> float:
    """How far the centre of an image's keypoint extent lies outside the inliers' bounding box,
    over half the extent's diagonal: 0 when the box holds the centre, about 1 when the inliers sit
    in a far corner; inf without inliers. A photo of a thing is framed on it, so a match on the
    thing itself covers the centre of both photos; one on a shared background need not."""
    if len(inliers_xy) == 0 or len(all_xy) == 0:
        return float("inf")
    lo, hi = all_xy.min(axis=0), all_xy.max(axis=0)
    centre = (lo + hi) / 2.0
    outside = np.maximum(inliers_xy.min(axis=0) - centre, 0.0) + np.maximum(centre - inliers_xy.max(axis=0), 0.0)
    return float(np.linalg.norm(outside) / max(0.5 * float(np.linalg.norm(hi - lo)), 1e-9))


def subject_figures(query: LocalFeatures, candidate: LocalFeatures, verification: Verification) -> tuple[float, float]:
    """(candidate spread, centre offset) of a verification's inliers: :func:`inlier_spread` over the
    candidate's keypoints, and the larger :func:`centre_offset` of the two photos (inf without
    inliers). Computed on demand, not for every pair: about 0.1 ms, a tenth of a top-100's
    verification time were it paid for all of them."""
    inliers = verification.matches[verification.inlier_mask]
    if len(inliers) == 0:
        return 0.0, float("inf")
    q_xy, c_xy = query.keypoints[inliers[:, 0]], candidate.keypoints[inliers[:, 1]]
    return (inlier_spread(candidate.keypoints, c_xy),
            max(centre_offset(query.keypoints, q_xy), centre_offset(candidate.keypoints, c_xy)))


def estimate_transform(src: np.ndarray, dst: np.ndarray, config: GVConfig,
                       query_xy: np.ndarray | None = None) -> tuple[str, np.ndarray | None, np.ndarray]:
    """Robustly fit query->candidate: returns (model name, (3, 3) float64 or None, (P,) bool mask).

    src, dst: (P, 2) float32 matched positions in the query and candidate. ``query_xy``
    (default: src) spans the query object for the plausibility test.
    """
    import cv2

    n = len(src)
    none = (MODEL_NONE, None, np.zeros(n, bool))
    if n < 3:
        return none
    extent = src if query_xy is None or len(query_xy) == 0 else query_xy
    src32, dst32 = np.ascontiguousarray(src, np.float32), np.ascontiguousarray(dst, np.float32)
    if n >= config.homography_min_matches:
        h, mask = cv2.findHomography(src32, dst32, cv2.USAC_MAGSAC, config.threshold_px,
                                     maxIters=config.max_iters, confidence=config.confidence)
        if (h is not None and h.shape == (3, 3) and mask is not None
                and _plausible(h, extent, config.max_scale_change, config.max_anisotropy)):
            return MODEL_HOMOGRAPHY, h.astype(np.float64), mask.ravel().astype(bool)
    a, mask = cv2.estimateAffine2D(src32, dst32, method=cv2.USAC_MAGSAC,
                                   ransacReprojThreshold=config.threshold_px,
                                   maxIters=config.max_iters, confidence=config.confidence)
    if a is None or mask is None:
        return none
    affine = np.vstack([a, [0.0, 0.0, 1.0]]).astype(np.float64)
    if not _plausible(affine, extent, config.max_scale_change, config.max_anisotropy):
        return none
    return MODEL_AFFINE, affine, mask.ravel().astype(bool)


def _rejected(matches: np.ndarray) -> Verification:
    """A fitted model a check refused: the tentative matches, no inliers."""
    return Verification(0, MODEL_NONE, None, matches, np.zeros(len(matches), bool))


def verify_pair(query: LocalFeatures, candidate: LocalFeatures, config: GVConfig = GVConfig(), *,
                query_vectors: np.ndarray | None = None) -> Verification:
    """Match and fit one pair. ``query_vectors`` (the query's :func:`matching_vectors`) saves
    recomputing them for each of a query's candidates."""
    from waldo.models.keypoints import matching_vectors

    q_vectors = matching_vectors(query.descriptors) if query_vectors is None else query_vectors
    ratio = config.ratio_for(query.descriptors.shape[1])
    matches = mutual_ratio_matches(q_vectors, matching_vectors(candidate.descriptors), ratio)
    if len(matches) < config.min_inliers:  # cannot verify whatever the fit: skip the fit
        return Verification(0, MODEL_NONE, None, matches, np.zeros(len(matches), bool))
    src, dst = query.keypoints[matches[:, 0]], candidate.keypoints[matches[:, 1]]
    model, transform, mask = estimate_transform(src, dst, config, query.keypoints)
    if transform is None or not mask.any():
        return Verification(0, model, None, matches, mask)
    spread = inlier_spread(query.keypoints, src[mask])
    if spread < config.min_spread:
        return _rejected(matches)
    # Distortion where the evidence is (the inliers' box): extrapolated to background keypoints
    # far from the object, a correct perspective map can look wildly stretched.
    distortion = box_distortion(transform, src[mask])
    verification = Verification(int(mask.sum()), model, transform, matches, mask, spread,
                                float("inf") if distortion is None else distortion[1])
    if config.min_candidate_spread > 0 or config.max_centre_offset is not None:
        candidate_spread, offset = subject_figures(query, candidate, verification)
        if candidate_spread < config.min_candidate_spread or (config.max_centre_offset is not None
                                                              and offset > config.max_centre_offset):
            return _rejected(matches)
    return verification


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


#: How the geometry bonus of :func:`fused_scores` is sized: "absolute" adds ``weight`` in units
#: of the global similarity; "std" and "range" add ``weight`` times the standard deviation or the
#: range (max - min) of the candidates' own global similarities, so the same weight means the same
#: thing for a model whose similarities spread over 0.9-1.0 and one whose spread over 0.2-0.9.
FUSION_SCALES = ("absolute", "std", "range")


def fusion_unit(global_scores: np.ndarray, scale: str) -> float:
    """The unit of the geometry bonus for one query's candidates (see :data:`FUSION_SCALES`)."""
    g = np.asarray(global_scores, np.float64)
    if scale == "absolute":
        return 1.0
    if scale not in FUSION_SCALES:
        raise ValueError(f"unknown fusion scale {scale!r}; one of {', '.join(FUSION_SCALES)}")
    if g.size < 2:
        return 1.0  # one candidate: nothing to reorder, any positive unit will do
    spread = float(g.std()) if scale == "std" else float(g.max() - g.min())
    # All candidates equally similar: the global order says nothing, so geometry alone decides.
    return spread if spread > 1e-9 else 1.0


def fused_scores(inliers: np.ndarray, global_scores: np.ndarray, min_inliers: int, weight: float,
                 scale: str = "absolute") -> np.ndarray:
    """(K,) float32: global similarity, plus ``weight`` * unit * (1 + ln(inliers / min_inliers))
    for candidates with evidence (``inliers >= min_inliers``): geometry adds at least
    ``weight`` units and more, slowly, the more inliers it found. The unit is 1 or the spread of
    these candidates' global similarities (:func:`fusion_unit`)."""
    inliers = np.asarray(inliers, np.float64)
    verified = inliers >= min_inliers
    bonus = np.where(verified, 1.0 + np.log(np.maximum(inliers, 1) / min_inliers), 0.0)
    unit = fusion_unit(global_scores, scale)
    return (np.asarray(global_scores, np.float64) + weight * unit * bonus).astype(np.float32)


@dataclass(frozen=True)
class GVRerank:
    """``order`` (K,) int64 input positions, best first; ``inliers`` (K,) int32 and
    ``verifications`` in *input* order; ``scores`` (K,) float32 in ``order`` (the rule's:
    :func:`gv_scores` or :func:`fused_scores`)."""

    order: np.ndarray
    inliers: np.ndarray
    verifications: list[Verification]
    scores: np.ndarray


def single_blas_thread():
    """A context in which every loaded BLAS library (numpy's, OpenCV's, faiss's OpenBLAS) runs
    one thread (threadpoolctl; it looks the libraries up on entry, about 0.5 ms, so one loaded
    later is covered too)."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1, user_api="blas")


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
        from waldo.models.keypoints import matching_vectors

        q_vectors = matching_vectors(query.descriptors)
        if self.workers == 1 or len(candidates) < 2:
            return [verify_pair(query, c, self.config, query_vectors=q_vectors) for c in candidates]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="waldo-gv")
        # Interleaved chunks, one per worker: few tasks (low overhead) with balanced work.
        chunks = [list(range(w, len(candidates), self.workers)) for w in range(self.workers)]

        def run(chunk: list[int]) -> list[Verification]:
            return [verify_pair(query, candidates[i], self.config, query_vectors=q_vectors) for i in chunk]

        out: list[Verification | None] = [None] * len(candidates)
        # One BLAS thread per worker while they run: the workers already use every core, and
        # OpenBLAS's own threads would oversubscribe them and keep spinning after the call,
        # slowing the next query's extraction (docs/performance.md, "A search with make demo's default").
        with single_blas_thread():
            for chunk, results in zip(chunks, self._pool.map(run, chunks)):
                for i, result in zip(chunk, results):
                    out[i] = result
        return out  # type: ignore[return-value]

    def rerank_features(self, query: LocalFeatures, candidates: Sequence[LocalFeatures],
                        global_scores: np.ndarray | None = None) -> GVRerank:
        """Verify ``candidates`` (given best first) and order them by the configured rule
        (verified first, or fused with ``global_scores`` when ``fusion_weight`` is set and they
        are given)."""
        verifications = self.verify_many(query, candidates)
        inliers = np.array([v.inliers for v in verifications], np.int32)
        need = self.config.min_inliers
        if self.config.fusion_weight is None or global_scores is None:
            order = verified_first_order(inliers, need)
            scores = gv_scores(inliers[order], need)
        else:
            fused = fused_scores(inliers, global_scores, need, self.config.fusion_weight, self.config.fusion_scale)
            order = np.argsort(-fused, kind="stable").astype(np.int64)
            scores = fused[order]
        return GVRerank(order, inliers, verifications, scores)

    def rerank(self, query: RerankQuery, candidates: RerankCandidates) -> RerankResult:
        """The :class:`~waldo.rerank.base.Reranker` interface: verifies the keypoints of the
        query and of every candidate. Scores: see :func:`gv_scores` (verified first) or
        :func:`fused_scores`; ``inliers`` and ``verified`` say what verification found. Fusion
        applies to the global order; on another reranker's order (``rrt+gv``) verified
        candidates move first and the rest keep that order (DELG's rule). A query with fewer
        keypoints than ``min_inliers`` cannot verify anything: it keeps the prior order at
        once, with a note saying so."""
        if query.keypoints is None or candidates.keypoints is None:
            raise ValueError("geometric verification needs the keypoints of the query and of every candidate")
        n, need = len(candidates), self.config.min_inliers
        fusion = self.config.fusion_weight if candidates.ordered_by == "global" else None
        kept = "global order kept" if candidates.ordered_by == "global" else f"{candidates.ordered_by} order kept"
        if len(query.keypoints) < need:
            order = np.arange(n, dtype=np.int64)
            if fusion is not None:  # the global order, scored by what ordered it
                scores, kind = np.asarray(candidates.global_scores, np.float32), SCORE_SIMILARITY
            else:
                scores, kind = gv_scores(np.zeros(n), need), SCORE_INLIERS
            return RerankResult(order, scores, np.zeros(n, np.int32), np.zeros(n, bool),
                                f"not verified: the query has {len(query.keypoints)} keypoints and verifying "
                                f"needs {need} matching ones (a plain or blurred photo); {kept}",
                                score_kind=kind)
        result = self.rerank_features(query.keypoints, candidates.keypoints,
                                      candidates.global_scores if fusion is not None else None)
        inliers = result.inliers[result.order]
        verified = np.array([self.config.verifies(result.verifications[i]) for i in result.order], bool)
        note = "" if (inliers >= need).any() else f"no geometric match: {kept}"
        return RerankResult(result.order, result.scores, inliers, verified, note,
                            score_kind=SCORE_GV_FUSED if fusion is not None else SCORE_INLIERS)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def __enter__(self) -> GeometricReranker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def gv_scores(inliers_in_order: np.ndarray, min_inliers: int) -> np.ndarray:
    """(N,) float32 scores of a verified-first order: a candidate with a geometric match scores
    its inlier count (>= min_inliers), one without scores 0 and keeps its prior place behind
    them (the order is :func:`verified_first_order`'s; a stable sort by these scores gives it)."""
    inliers = np.asarray(inliers_in_order, np.float32)
    return np.where(inliers >= min_inliers, inliers, 0.0).astype(np.float32)


@RERANKERS.register("gv", description="matches keypoints between the photos and checks that they fit one view of "
                    "the same flat or rigid object (MAGSAC++); images with such a match move up, more with more "
                    "inliers. Strong on printed packaging and labels, no help on plain produce",
                    needs=(Need.KEYPOINTS,), title="Geometric",
                    score=SCORE_INLIERS if GVConfig().fusion_weight is None else SCORE_GV_FUSED,
                    score_after=SCORE_INLIERS)  # on another reranker's order: verified first, by inliers
def _gv(setup: RerankerSetup) -> GeometricReranker:
    return GeometricReranker()


# DELG's verified-first rule on the RRT's order: the RRT decides among candidates GV has no
# geometric evidence for (textureless produce), geometry overrides it where it has.
RERANKERS.offer("rrt+gv", "the RRT's order, then images with a geometric match first (by inliers)",
                title="RRT then Geometric")
# The same rule after make demo's default (rrt-consensus): listed because it ranks at least as well
# as rrt-consensus and rrt+gv on the fair validation (experiments/consensus_gv.py).
RERANKERS.offer("rrt-consensus+gv", "the RRT + neighbours order, then images with a geometric match first "
                "(by inliers)", title="RRT + neighbours then Geometric")
