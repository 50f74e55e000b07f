"""``POST /match/{id}``'s answer: the verifier's correspondences between the query and one image."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from waldo.data.images import load_image
from waldo.models.keypoints import extract_sift
from waldo.rerank.gv import GVConfig, verify_pair

__all__ = ["match_pair"]


def match_pair(query: Image.Image, image_id: int, path: Path, *, max_pixels: int,
               max_lines: int = 300) -> dict[str, Any]:
    """Geometric verification of ``query`` against indexed image ``image_id`` (file ``path``),
    as ``MatchResponse`` fields: inlier lines ``[xq, yq, xc, yc]`` in each image's pixels and
    the outline of the query's keypoints as the fitted model maps it onto the candidate."""
    # Decoded (EXIF rotation applied), as the browser shows it and as keypoints are measured.
    candidate = load_image(path, max_pixels=max_pixels)
    base = {"id": image_id, "query_size": list(query.size), "image_size": list(candidate.size)}
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
