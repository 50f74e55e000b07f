"""The match picture: query and candidate side by side, inlier correspondences drawn as lines.

It answers "why did GV put this image first?" at a glance: many parallel-ish green lines and
a sensible outline of the query on the candidate mean a real geometric match; a few crossing
lines mean a coincidence. Used by ``waldo explain`` and (later) the web page.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import IO

import cv2
import numpy as np
from PIL import Image

from waldo.data.images import load_image
from waldo.models.keypoints import LocalFeatures, SiftConfig, extract_sift
from waldo.rerank.gv import GVConfig, Verification, subject_figures, verify_pair

INLIER_RGB = (40, 220, 60)
OUTLIER_RGB = (230, 60, 40)
OUTLINE_RGB = (255, 210, 0)
_GAP = 8  # pixels between the two images
_BANNER = 28  # height of the caption band


@dataclass(frozen=True)
class Explanation:
    """A drawn match: ``picture`` (RGB PIL image), the ``verification`` it shows and how much of
    the candidate's keypoint extent its inliers cover (:func:`~waldo.rerank.gv.subject_figures`)."""

    picture: Image.Image
    verification: Verification
    candidate_spread: float = 0.0


def _fit(image: np.ndarray, height: int) -> tuple[np.ndarray, float]:
    """Resize (H, W, 3) uint8 to ``height`` rows; returns the image and the scale used."""
    scale = height / image.shape[0]
    width = max(1, round(image.shape[1] * scale))
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC
    return cv2.resize(image, (width, height), interpolation=interp), scale


def match_picture(query_image: Image.Image | np.ndarray, candidate_image: Image.Image | np.ndarray,
                  query: LocalFeatures, candidate: LocalFeatures, verification: Verification, *,
                  height: int = 480, max_lines: int = 300, show_outliers: bool = False) -> Image.Image:
    """Draw ``verification`` between two RGB images; returns an RGB PIL image.

    Both images are scaled to ``height`` rows (small COIL-100 images get enlarged so lines
    are visible). At most ``max_lines`` inliers are drawn (evenly subsampled) so a strong
    match stays readable. With a model, the query's keypoint extent is outlined on the
    candidate as the model maps it.
    """
    q_img, q_scale = _fit(np.asarray(query_image, np.uint8)[..., :3], height)
    c_img, c_scale = _fit(np.asarray(candidate_image, np.uint8)[..., :3], height)
    offset_x = q_img.shape[1] + _GAP
    canvas = np.full((height + _BANNER, offset_x + c_img.shape[1], 3), 255, np.uint8)
    canvas[_BANNER:, : q_img.shape[1]] = q_img
    canvas[_BANNER:, offset_x:] = c_img

    def to_canvas(xy: np.ndarray, scale: float, dx: int) -> np.ndarray:
        # +0.5 / -0.5: keypoints use pixel-centre coordinates, as cv2.resize does.
        return np.rint((xy + 0.5) * scale - 0.5 + [dx, _BANNER]).astype(np.int32)

    matches, mask = verification.matches, verification.inlier_mask
    if show_outliers:
        for qi, ci in matches[~mask]:
            a, b = to_canvas(query.keypoints[qi], q_scale, 0), to_canvas(candidate.keypoints[ci], c_scale, offset_x)
            cv2.line(canvas, tuple(map(int, a)), tuple(map(int, b)), OUTLIER_RGB, 1, cv2.LINE_AA)
    inliers = matches[mask]
    if len(inliers) > max_lines:
        inliers = inliers[np.linspace(0, len(inliers) - 1, max_lines).round().astype(int)]
    for qi, ci in inliers:
        a, b = to_canvas(query.keypoints[qi], q_scale, 0), to_canvas(candidate.keypoints[ci], c_scale, offset_x)
        cv2.line(canvas, tuple(map(int, a)), tuple(map(int, b)), INLIER_RGB, 1, cv2.LINE_AA)
        cv2.circle(canvas, tuple(map(int, a)), 3, INLIER_RGB, 1, cv2.LINE_AA)
        cv2.circle(canvas, tuple(map(int, b)), 3, INLIER_RGB, 1, cv2.LINE_AA)
    if verification.transform is not None and len(query):
        lo, hi = query.keypoints.min(axis=0), query.keypoints.max(axis=0)
        box = np.array([[lo[0], lo[1]], [hi[0], lo[1]], [hi[0], hi[1]], [lo[0], hi[1]]], np.float64)
        mapped = cv2.perspectiveTransform(box[None], verification.transform)[0]
        cv2.polylines(canvas, [to_canvas(mapped, c_scale, offset_x)], True, OUTLINE_RGB, 2, cv2.LINE_AA)
        cv2.polylines(canvas, [to_canvas(box, q_scale, 0)], True, OUTLINE_RGB, 1, cv2.LINE_AA)
    caption = (f"{verification.inliers} inliers / {verification.n_matches} matches "
               f"({verification.inlier_ratio:.0%}), model: {verification.model}")
    cv2.putText(canvas, caption, (6, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.55, (0, 0, 0), 1, cv2.LINE_AA)
    return Image.fromarray(canvas)


def explain_pair(query_source: str | Path | bytes | IO[bytes], candidate_source: str | Path | bytes | IO[bytes],
                 *, sift: SiftConfig = SiftConfig(), gv: GVConfig = GVConfig(),
                 height: int = 480, show_outliers: bool = False) -> Explanation:
    """Load two images (safe loader), verify them and draw the match picture."""
    q_img, c_img = load_image(query_source), load_image(candidate_source)
    query, candidate = extract_sift(q_img, sift), extract_sift(c_img, sift)
    verification = verify_pair(query, candidate, gv)
    picture = match_picture(q_img, c_img, query, candidate, verification, height=height, show_outliers=show_outliers)
    return Explanation(picture, verification, subject_figures(query, candidate, verification)[0])


def save_png(picture: Image.Image, path: str | Path) -> Path:
    """Write ``picture`` as PNG (creating parent folders); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    picture.save(path, format="PNG")
    return path
