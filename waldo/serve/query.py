"""One query through the engine, stage by stage, with the time each stage took.

This is the only module that knows how the Python API splits a query (describe, global
search, rerank), so when the API grows the routes stay as they are.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from waldo import api
from waldo.api import SearchHit, Waldo
from waldo.data.images import load_image
from waldo.serve.errors import ClientError

__all__ = ["NO_RERANK", "QueryRun", "available_rerankers", "hit_fields", "match_pair", "run_query"]

#: The rerank mode that keeps the global ranking.
NO_RERANK = "none"
#: Global candidates a reranker re-sorts (the engine's own constant where it has one).
RERANK_POOL = int(getattr(api, "RERANK_TOP_K", 100))


@dataclass
class QueryRun:
    """Results of one query as JSON-ready dicts (see :func:`hit_fields`), best first, and
    per-stage wall time in milliseconds."""

    results: list[dict[str, Any]]
    timings_ms: dict[str, float] = field(default_factory=dict)


def available_rerankers(engine: Waldo) -> list[str]:
    """``["none", ...]``: what this engine can rerank with, asked of the engine at run time so
    the service offers exactly what the loaded index and model support."""
    offered = getattr(engine, "available_rerankers", None)
    names = list(offered()) if callable(offered) else []
    return [NO_RERANK] + [name for name in names if name != NO_RERANK]


def _ms(start: float) -> float:
    return round((time.perf_counter() - start) * 1000, 2)


def run_query(engine: Waldo, data: bytes, k: int, rerank: str) -> QueryRun:
    """Search with the query photo's bytes ``data`` and time each stage.

    Stages: ``extract`` (the query's descriptors), ``search`` (exact kNN over the global
    descriptors: the top ``k``, or the reranker's candidate pool) and ``rerank`` (0 for
    ``"none"``). Reranked hits carry their global score and rank from the candidate pool.
    """
    timings: dict[str, float] = {}
    start = time.perf_counter()
    query_global, query_local = engine.describe(data)
    timings["extract"] = _ms(start)
    start = time.perf_counter()
    pool = engine.search_descriptor(query_global, k if rerank == NO_RERANK else max(k, RERANK_POOL))
    timings["search"] = _ms(start)
    if rerank == NO_RERANK:
        timings["rerank"] = 0.0
        return QueryRun([hit_fields(hit) for hit in pool], timings)
    start = time.perf_counter()
    # The engine's staged entry point reuses the descriptors computed above; without it the
    # public search() extracts them again (and that time counts as rerank time).
    staged = getattr(engine, "_search_reranked", None)
    try:
        hits = (staged(query_global, query_local, k, rerank, data) if callable(staged)
                else engine.search(data, k=k, rerank=rerank))
    except ValueError as error:  # e.g. the index lacks what this reranker needs
        raise ClientError(422, f"cannot rerank with {rerank!r}: {error}") from None
    timings["rerank"] = _ms(start)
    before = {hit.id: hit for hit in pool}
    return QueryRun([hit_fields(hit, before.get(hit.id)) for hit in hits], timings)


def match_pair(query: Image.Image, image_id: int, path: Path, *, max_pixels: int,
               max_lines: int = 300) -> dict[str, Any]:
    """Geometric verification of ``query`` against indexed image ``image_id`` (file ``path``),
    as ``MatchResponse`` fields: inlier lines ``[xq, yq, xc, yc]`` in each image's pixels and
    the outline of the query's keypoints as the fitted model maps it onto the candidate.
    ``available`` is false when the verifier (OpenCV) is not installed."""
    # Decoded (EXIF rotation applied), as the browser shows it and as keypoints are measured.
    candidate = load_image(path, max_pixels=max_pixels)
    base = {"id": image_id, "query_size": list(query.size), "image_size": list(candidate.size)}
    try:
        from waldo.rerank.gv import GVConfig, verify_pair
        from waldo.rerank.local_features import extract_sift
    except ImportError as error:  # no OpenCV: the page still shows the pair, without lines
        return {**base, "available": False, "method": "none", "message": f"geometric verification unavailable ({error})"}
    query_features = extract_sift(query)
    # Both sides are described the same way, from pixels, so the lines show what GV sees.
    candidate_features = extract_sift(candidate)
    config = GVConfig()
    verification = verify_pair(query_features, candidate_features, config)
    verified = verification.inliers >= config.min_inliers  # the reranker's own bar
    inliers = verification.matches[verification.inlier_mask]
    if len(inliers) > max_lines:  # evenly thinned: a strong match stays readable
        inliers = inliers[np.linspace(0, len(inliers) - 1, max_lines).round().astype(int)]
    lines = [[*map(float, query_features.keypoints[q]), *map(float, candidate_features.keypoints[c])]
             for q, c in inliers]
    outline: list[list[float]] = []
    if verified and verification.transform is not None and len(query_features):
        lo, hi = query_features.keypoints.min(axis=0), query_features.keypoints.max(axis=0)
        corners = np.array([[lo[0], lo[1], 1], [hi[0], lo[1], 1], [hi[0], hi[1], 1], [lo[0], hi[1], 1]])
        mapped = corners @ verification.transform.T
        outline = (mapped[:, :2] / mapped[:, 2:3]).round(1).tolist()
    counts = f"{verification.inliers} inliers of {verification.n_matches} tentative matches"
    message = (f"verified, {counts} ({verification.model})" if verified else
               f"not verified, {counts} ({config.min_inliers} inliers needed)")
    return {**base, "available": True, "verified": verified, "method": f"sift+{verification.model}",
            "inliers": verification.inliers, "matches": verification.n_matches, "lines": lines,
            "outline": outline, "message": message}


def hit_fields(hit: SearchHit, global_hit: SearchHit | None = None) -> dict[str, Any]:
    """The JSON fields of one hit. ``global_score`` and ``rank_before_rerank`` come from the
    hit's place in the global list (``global_hit``); without a reranker they equal ``score``
    and ``rank``."""
    attrs = dict(hit.attrs)
    label = attrs.get("class_name") or attrs.get("label") or hit.identity or attrs.get("original_name", "")
    origin = global_hit or hit
    return {
        "id": hit.id,
        "rank": hit.rank,
        "path": hit.path,
        "identity": hit.identity,
        "label": str(label),
        "score": float(hit.score),
        "global_score": float(_first_set(getattr(hit, "global_score", None), origin.score)),
        "rank_before_rerank": int(_first_set(getattr(hit, "rank_before_rerank", None), origin.rank)),
        "attrs": attrs,
    }


def _first_set(value: Any, default: Any) -> Any:
    return default if value is None else value
