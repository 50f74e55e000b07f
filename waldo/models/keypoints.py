"""Local features for geometric verification: SIFT keypoints with RootSIFT matching.

Storage vs. matching form. OpenCV's SIFT descriptor is already quantised to integers in
0..255 (it scales by 512 and saturates to uchar), so the raw descriptor is stored *losslessly*
as ``uint8`` (128 bytes per keypoint). RootSIFT (Arandjelovic & Zisserman, 2012: L1-normalise,
then element-wise square root) is applied only when matching, by :func:`rootsift`; it is a
pure function of the stored bytes, so nothing is lost by deferring it. Keypoint positions are
``float32`` (x, y) in the pixel frame of the *original* image (as :func:`load_image` returns
it), whatever resizing was done for detection: homographies then relate the real images, and
the match picture can draw on them directly.

Small images (COIL-100 is 128x128) give few keypoints; ``SiftConfig.min_side`` upscales them
before detection. Large photos are downscaled to ``max_side`` to bound the cost.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal

import cv2
import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, model_validator

from waldo.data.images import load_image
from waldo.index.keypoints import RaggedKeypoints

SIFT_DIM = 128


class SiftConfig(BaseModel):
    """How keypoints are detected. Stored in the index manifest (``gv_features``), so an index's
    features are reproducible and a query is described the same way as the gallery.

    kind: the local feature ("sift", the only one so far).
    max_keypoints: cap per image (the strongest by detector response are kept).
    min_side: upscale an image whose shorter side is below this, before detection (0: never).
        Defaults chosen on validation splits (see docs/results.md).
    max_side: downscale an image whose longer side is above this (bounds time and keypoints).
    contrast_threshold, edge_threshold: OpenCV's SIFT detector thresholds (Lowe's 0.04 / 10;
        OpenCV divides contrast by the number of octave layers, as Lowe's code does).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["sift"] = "sift"
    max_keypoints: int = Field(1000, ge=1)
    min_side: int = Field(256, ge=0)  # COIL-100's 128 px: upscaling was (marginally) preferred on validation
    max_side: int = Field(1024, ge=16)
    contrast_threshold: float = Field(0.04, gt=0)
    edge_threshold: float = Field(10.0, gt=0)

    @model_validator(mode="after")
    def _sides_in_order(self) -> SiftConfig:
        if self.min_side > self.max_side:
            raise ValueError(f"need min_side <= max_side, got {self.min_side} > {self.max_side}")
        return self


@dataclass(frozen=True)
class LocalFeatures:
    """One image's keypoints.

    keypoints: (K, 2) float32 (x, y) in original-image pixels (pixel centres at integers).
    descriptors: (K, 128) uint8 raw SIFT; use :func:`rootsift` to match.
    """

    keypoints: np.ndarray
    descriptors: np.ndarray

    def __post_init__(self) -> None:
        k = self.keypoints.shape[0] if self.keypoints.ndim == 2 else -1
        if self.keypoints.shape != (k, 2) or self.descriptors.shape != (k, SIFT_DIM):
            raise ValueError(
                f"keypoints must be (K, 2) and descriptors (K, {SIFT_DIM}) with the same K, got "
                f"{self.keypoints.shape} and {self.descriptors.shape}"
            )
        if self.descriptors.dtype != np.uint8:
            raise ValueError(f"descriptors must be uint8 raw SIFT, got {self.descriptors.dtype}")

    def __len__(self) -> int:
        return int(self.keypoints.shape[0])

    @property
    def nbytes(self) -> int:
        """Bytes this image's features take in the index (offsets excluded)."""
        return int(self.keypoints.nbytes + self.descriptors.nbytes)

    @classmethod
    def empty(cls) -> LocalFeatures:
        return cls(np.zeros((0, 2), np.float32), np.zeros((0, SIFT_DIM), np.uint8))


def rootsift(descriptors: np.ndarray) -> np.ndarray:
    """(K, 128) raw SIFT (any dtype) -> (K, 128) float32 RootSIFT, unit L2 norm.

    sqrt of the L1-normalised vector has unit L2 norm by construction, so the Euclidean
    distance between RootSIFT vectors is the Hellinger distance between the SIFT histograms,
    which matches better than L2 on raw SIFT. All-zero rows stay zero (they match nothing).
    """
    d = np.asarray(descriptors, dtype=np.float32)
    l1 = d.sum(axis=1, keepdims=True)
    return np.sqrt(d / np.maximum(l1, 1e-12))


def _grey(image: Image.Image | np.ndarray) -> np.ndarray:
    """RGB PIL image or (H, W, 3) / (H, W) uint8 array -> (H, W) uint8 grey."""
    array = np.asarray(image)
    if array.ndim == 3:
        return cv2.cvtColor(np.ascontiguousarray(array[..., :3]), cv2.COLOR_RGB2GRAY)
    if array.ndim == 2 and array.dtype == np.uint8:
        return np.ascontiguousarray(array)
    raise ValueError(f"expected an RGB or grey uint8 image, got shape {array.shape} dtype {array.dtype}")


def detection_scale(height: int, width: int, config: SiftConfig) -> float:
    """The factor the image is resized by before detection (1.0: untouched)."""
    short, long = min(height, width), max(height, width)
    if long > config.max_side:
        return config.max_side / long
    if config.min_side and short < config.min_side:
        return min(config.min_side / short, config.max_side / long)
    return 1.0


def extract_sift(image: Image.Image | np.ndarray, config: SiftConfig = SiftConfig()) -> LocalFeatures:
    """SIFT keypoints and raw descriptors of one image, at most ``config.max_keypoints``.

    A new detector per call: ``cv2.SIFT`` objects are cheap to build, and this keeps the
    function safe to call from many threads at once.
    """
    grey = _grey(image)
    scale = detection_scale(*grey.shape, config)
    if scale != 1.0:
        size = (max(1, round(grey.shape[1] * scale)), max(1, round(grey.shape[0] * scale)))
        # INTER_AREA when shrinking (no aliasing), cubic when enlarging (smoother gradients).
        grey = cv2.resize(grey, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC)
    detector = cv2.SIFT_create(
        nfeatures=config.max_keypoints,
        contrastThreshold=config.contrast_threshold,
        edgeThreshold=config.edge_threshold,
    )
    keypoints, descriptors = detector.detectAndCompute(grey, None)
    if descriptors is None or not keypoints:
        return LocalFeatures.empty()
    # nfeatures keeps ties at the cut, so OpenCV can return a few more than asked.
    keypoints, descriptors = keypoints[: config.max_keypoints], descriptors[: config.max_keypoints]
    xy = np.array([kp.pt for kp in keypoints], dtype=np.float32).reshape(-1, 2)
    if scale != 1.0:
        # cv2.resize maps pixel centres: x_resized + 0.5 = (x + 0.5) * scale.
        xy = (xy + 0.5) / np.float32(scale) - 0.5
    raw = np.clip(np.rint(descriptors), 0, 255).astype(np.uint8)
    return LocalFeatures(np.ascontiguousarray(xy, dtype=np.float32), raw)


def extract_sift_file(source: str | Path | bytes | IO[bytes], config: SiftConfig = SiftConfig()) -> LocalFeatures:
    """:func:`extract_sift` of an image file (path, bytes or file object) via the safe loader."""
    return extract_sift(load_image(source), config)


def pack_features(features: Sequence[LocalFeatures]) -> RaggedKeypoints:
    """Concatenate per-image features into the index's ragged layout (see :class:`RaggedKeypoints`)."""
    counts = np.array([len(f) for f in features], dtype=np.int64)
    offsets = np.zeros(len(features) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    if features:
        keypoints = np.concatenate([f.keypoints for f in features]).astype(np.float32, copy=False)
        descriptors = np.concatenate([f.descriptors for f in features])
    else:
        keypoints, descriptors = np.zeros((0, 2), np.float32), np.zeros((0, SIFT_DIM), np.uint8)
    return RaggedKeypoints(keypoints, descriptors, offsets)


def unpack_features(ragged: RaggedKeypoints) -> list[LocalFeatures]:
    """Split ragged arrays back into per-image :class:`LocalFeatures` (views, no copy)."""
    return [LocalFeatures(kp, desc) for kp, desc in ragged]


def extract_many(sources: Sequence[str | Path | bytes], config: SiftConfig = SiftConfig(), *,
                 workers: int | None = None, progress: bool = False,
                 description: str = "keypoints") -> list[LocalFeatures]:
    """:func:`extract_sift_file` of many images in threads (OpenCV releases the GIL), in order.
    An image that cannot be loaded gets no keypoints (it can never be verified) rather than
    failing the whole batch: callers that must know check readability themselves."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm.auto import tqdm

    from waldo.data.images import ImageLoadError

    def one(source: str | Path | bytes) -> LocalFeatures:
        try:
            return extract_sift_file(source, config)
        except ImageLoadError:
            return LocalFeatures.empty()

    show = progress and len(sources) > 1
    if len(sources) <= 1 or workers == 1:
        return [one(s) for s in tqdm(sources, desc=description, unit="img", disable=not show, leave=False)]
    with ThreadPoolExecutor(max(1, workers or os.cpu_count() or 1), thread_name_prefix="waldo-sift") as pool:
        return list(tqdm(pool.map(one, sources), total=len(sources), desc=description, unit="img",
                         disable=not show, leave=False))
