"""``POST /match/{id}``'s answer: the verifier's correspondences between the query and one image."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from waldo.data.images import DecodeBudget, load_image
from waldo.models.keypoints import LocalFeatureConfig, extract_local_features
from waldo.rerank.gv import GVConfig, subject_figures, verify_pair

__all__ = ["match_cells", "match_pair"]


def _missing(verification, config: GVConfig) -> str:
    """Why a match is not called verified, in the user's words."""
    if verification.inliers < config.min_inliers:
        return f"{config.min_inliers} inliers needed"
    if verification.spread < config.claim_min_spread:
        return (f"the inliers cover {verification.spread:.0%} of the query's extent, "
                f"{config.claim_min_spread:.0%} needed: a shared logo or background, not the object")
    return "the fitted model distorts the object implausibly"


def match_pair(query: Image.Image, image_id: int, path: Path, *, max_pixels: int, max_lines: int = 300,
               features: LocalFeatureConfig | None = None, budget: DecodeBudget | None = None,
               budget_timeout: float | None = None) -> dict[str, Any]:
    """Geometric verification of ``query`` against indexed image ``image_id`` (file ``path``),
    as ``MatchResponse`` fields: inlier lines ``[xq, yq, xc, yc]`` in each image's pixels and
    the outline of the query's keypoints as the fitted model maps it onto the candidate.
    ``features``: the index's local features (its manifest's ``gv_features``; default: the
    default kind), so the picture shows what the index's verification sees. ``budget``: the
    process's decode budget, for the candidate's decode (see ``load_image``)."""
    features = features or LocalFeatureConfig()
    # Decoded (EXIF rotation applied), as the browser shows it and as keypoints are measured.
    candidate = load_image(path, max_pixels=max_pixels, budget=budget, budget_timeout=budget_timeout)
    base = {"id": image_id, "query_size": list(query.size), "image_size": list(candidate.size)}
    query_features = extract_local_features(query, features)
    # Both sides are described the same way, from pixels, so the lines show what GV sees.
    candidate_features = extract_local_features(candidate, features)
    config = GVConfig()
    verification = verify_pair(query_features, candidate_features, config)
    verified = config.verifies(verification)  # the reranker's own claim
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
    if verification.inliers:  # where the evidence lies: a match on a shared background covers little of one side
        counts += (f", covering {verification.spread:.0%} of the query's keypoints' extent and "
                   f"{subject_figures(query_features, candidate_features, verification)[0]:.0%} of this image's")
    message = (f"verified, {counts} ({verification.model})" if verified else
               f"not verified, {counts} ({_missing(verification, config)})")
    return {**base, "available": True, "verified": verified, "method": f"{features.kind}+{verification.model}",
            "inliers": verification.inliers, "matches": verification.n_matches, "lines": lines,
            "outline": outline, "message": message}


def match_cells(engine: Any, transform: Any, query: Image.Image, image_id: int, path: Path, *, max_pixels: int,
                max_lines: int = 300, budget: DecodeBudget | None = None,
                budget_timeout: float | None = None) -> dict[str, Any]:
    """The image cells the ``local-match`` reranker counted between ``query`` and indexed image
    ``image_id``, as ``MatchResponse`` fields: one line per mutually matched cell pair, from cell
    centre to cell centre in each image's pixels (``transform``: the index's test transform,
    whose resize and crop place the cells), strongest first. No claim of a verified match: the
    share of matched cells is evidence the reranker weighs, not a geometric check."""
    # Decoded (EXIF rotation applied), as the model saw it and as the browser shows it.
    candidate = load_image(path, max_pixels=max_pixels, budget=budget, budget_timeout=budget_timeout)
    cells = engine.matched_cells(query, image_id)
    query_centres = transform.cell_centres(cells["grid"], query.size)
    candidate_centres = transform.cell_centres(cells["grid"], candidate.size)
    pairs = cells["pairs"][:max_lines]
    lines = [[*map(float, query_centres[q].round(1)), *map(float, candidate_centres[c].round(1))] for q, c in pairs]
    setting = cells["setting"]
    message = (f"{len(cells['pairs'])} of the query's {cells['cells']} image cells ({cells['share']:.0%}) have a mutual "
               f"best match above cosine {setting.threshold:g} here; local match adds {setting.weight:g} x "
               f"{cells['share']:.2f} to the global similarity")
    return {"id": image_id, "query_size": list(query.size), "image_size": list(candidate.size), "available": True,
            "verified": False, "method": "cells", "inliers": len(cells["pairs"]), "matches": cells["cells"],
            "lines": lines, "outline": [], "message": message}
