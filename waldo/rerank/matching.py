"""Tentative correspondences between two images' descriptors: mutual nearest neighbours that
also pass Lowe's ratio test.

Both filters matter for what follows. The ratio test (Lowe, IJCV 2004) drops descriptors whose
nearest neighbour is barely closer than the second nearest: on repetitive texture (a shelf of
identical cans, a grid of tiles) those are coin flips. Mutual consistency drops the many-to-one
matches that a single distinctive candidate keypoint otherwise attracts. What survives is a
small, mostly-correct set, which is what lets a robust fit count inliers meaningfully.
"""

from __future__ import annotations

import numpy as np


def _unit_rows(x: np.ndarray, name: str) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"{name} must be (K, D), got shape {x.shape}")
    return x


def mutual_ratio_matches(query_desc: np.ndarray, candidate_desc: np.ndarray, ratio: float = 0.8) -> np.ndarray:
    """Index pairs ``(i, j)``: query descriptor i and candidate descriptor j are each other's
    nearest neighbour, and i's nearest is closer than ``ratio`` times its second nearest.

    Args:
        query_desc: (Kq, D) float32, unit L2 rows (RootSIFT, or TEBLID bits as +-1/16:
            waldo.models.keypoints.matching_vectors), so that the squared
            Euclidean distance is ``2 - 2 * dot``: one matrix product gives every distance.
        candidate_desc: (Kc, D) float32, unit L2 rows.
        ratio: Lowe's threshold on distances (not squared), in (0, 1]; 1 disables the test.

    Returns:
        (P, 2) int32, sorted by query index. Empty (0, 2) when either side has no descriptor.
        With a single candidate descriptor there is no second neighbour; the ratio test is
        then skipped (mutual consistency still applies).
    """
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"ratio must be in (0, 1], got {ratio}")
    q = _unit_rows(query_desc, "query_desc")
    c = _unit_rows(candidate_desc, "candidate_desc")
    if len(q) == 0 or len(c) == 0:  # nothing to match, whatever the (empty side's) width
        return np.zeros((0, 2), np.int32)
    if q.shape[1] != c.shape[1]:
        raise ValueError(f"descriptor sizes differ: query {q.shape[1]}, candidate {c.shape[1]}")
    similarity = q @ c.T  # (Kq, Kc); the only O(Kq * Kc * D) step
    rows = np.arange(len(q))
    # Row-wise argmax/max and column-wise max are contiguous reductions; much cheaper than
    # argpartition or a column-wise argmax on this (Kq, Kc) matrix.
    first = similarity.argmax(axis=1)
    s1 = similarity[rows, first]
    # Mutual: query i is (one of) the most similar rows of its match's column.
    mutual = s1 >= similarity.max(axis=0)[first]
    if len(c) >= 2:
        similarity[rows, first] = -np.inf  # our own array: the second best is the new max
        s2 = similarity.max(axis=1)
        # d1 < ratio * d2  <=>  (2 - 2 s1) < ratio^2 (2 - 2 s2)   (distances are >= 0)
        d1, d2 = np.maximum(2.0 - 2.0 * s1, 0.0), np.maximum(2.0 - 2.0 * s2, 0.0)
        passes = d1 < (ratio * ratio) * d2
    else:
        passes = np.ones(len(q), bool)
    keep = passes & mutual
    return np.stack([rows[keep], first[keep]], axis=1).astype(np.int32)
