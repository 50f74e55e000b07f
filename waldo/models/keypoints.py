"""Local features for geometric verification: keypoints and their descriptors.

Three kinds (``LocalFeatureConfig.kind``, stored in the index manifest as ``gv_features``):

- ``orb-teblid`` (default for new indexes): ORB's FAST detector (oriented, over an 8-level
  pyramid; several times quicker than SIFT's) with OpenCV contrib's TEBLID binary descriptor
  (Suarez et al. 2021; its learned parameters are compiled into OpenCV), 256 bits = 32 bytes per
  keypoint, a quarter of SIFT's, matched by Hamming distance. Chosen on validation identities:
  within 0.002 validation mAP of SIFT's detector with TEBLID, and index builds about twice as
  fast (experiments/gv_compact.py, docs/results.md).
- ``teblid``: SIFT's detector (scale-space extrema) with TEBLID.
- ``sift``: SIFT with RootSIFT matching, 128 bytes per keypoint; what indexes built before
  TEBLID hold (they keep working unchanged).

Storage vs. matching form. Descriptors are stored as ``uint8`` rows: OpenCV's SIFT descriptor is
already integers in 0..255 (stored losslessly), TEBLID's is 32 packed bytes.
:func:`matching_vectors` turns either into unit float32 rows whose Euclidean distance ranks like
the descriptor's own distance (RootSIFT: Arandjelovic & Zisserman 2012, the Hellinger distance
of the SIFT histograms; TEBLID: bits as +-1/16, squared distance = Hamming / 64), so one matrix
product matches both (waldo.rerank.matching). Keypoint positions are ``float32`` (x, y) in the
pixel frame of the *original* image (as :func:`load_image` returns it), whatever resizing was
done for detection: homographies then relate the real images, and the match picture can draw on
them directly.

Small images (COIL-100 is 128x128) give few keypoints; ``min_side`` upscales them before
detection. Large photos are downscaled to ``max_side`` to bound the cost.
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
#: Bytes per stored descriptor of each kind.
DESCRIPTOR_BYTES = {"sift": SIFT_DIM, "teblid": 32, "orb-teblid": 32}
_WIDTHS = sorted(set(DESCRIPTOR_BYTES.values()))
#: TEBLID's sampling window per detector (OpenCV's documentation: 6.75 for SIFT keypoints, 1.00
#: for ORB's).
_TEBLID_SCALE = {"teblid": 6.75, "orb-teblid": 1.0}


class LocalFeatureConfig(BaseModel):
    """How keypoints are detected and described. Stored in the index manifest
    (``gv_features``), so an index's features are reproducible and a query is described the same
    way as the gallery.

    kind: the local feature (module doc). The defaults (kind and cap) were chosen on validation
        identities: experiments/gv_results.py, docs/results.md.
    max_keypoints: cap per image (the strongest by detector response are kept).
    min_side: upscale an image whose shorter side is below this, before detection (0: never).
        Defaults chosen on validation splits (see docs/results.md).
    max_side: downscale an image whose longer side is above this (bounds time and keypoints).
    contrast_threshold, edge_threshold: OpenCV's SIFT detector thresholds (Lowe's 0.04 / 10;
        OpenCV divides contrast by the number of octave layers, as Lowe's code does); unused by
        ``orb-teblid``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["sift", "teblid", "orb-teblid"] = "orb-teblid"
    max_keypoints: int = Field(500, ge=1)
    min_side: int = Field(256, ge=0)  # COIL-100's 128 px: upscaling was (marginally) preferred on validation
    max_side: int = Field(1024, ge=16)
    contrast_threshold: float = Field(0.04, gt=0)
    edge_threshold: float = Field(10.0, gt=0)

    @model_validator(mode="after")
    def _sides_in_order(self) -> LocalFeatureConfig:
        if self.min_side > self.max_side:
            raise ValueError(f"need min_side <= max_side, got {self.min_side} > {self.max_side}")
        return self

    @property
    def descriptor_bytes(self) -> int:
        return DESCRIPTOR_BYTES[self.kind]


#: The name the config had when SIFT was the only kind (old code and scripts import it).
SiftConfig = LocalFeatureConfig
#: What indexes built before TEBLID store (``gv_features`` of their manifests).
LEGACY_SIFT = LocalFeatureConfig(kind="sift", max_keypoints=1000)
#: ``waldo index build --local-features`` choices ("none": no keypoints, no ``--rerank gv``).
LOCAL_FEATURE_KINDS = ("orb-teblid", "teblid", "sift", "none")


def local_features_for(choice: bool | str | LocalFeatureConfig | None) -> LocalFeatureConfig | None:
    """An index's local features from a user's choice: a config as is; True: the default
    (``orb-teblid``); "teblid" / "orb-teblid": that kind with the default cap; "sift":
    :data:`LEGACY_SIFT`; False / None / "none": none."""
    if isinstance(choice, LocalFeatureConfig):
        return choice
    if choice in (False, None, "none"):
        return None
    if choice is True:
        return LocalFeatureConfig()
    if choice == "sift":
        return LEGACY_SIFT
    if choice in ("teblid", "orb-teblid"):
        return LocalFeatureConfig(kind=choice)
    raise ValueError(f"unknown local features {choice!r}; choose one of {', '.join(LOCAL_FEATURE_KINDS)}")


@dataclass(frozen=True)
class LocalFeatures:
    """One image's keypoints.

    keypoints: (K, 2) float32 (x, y) in original-image pixels (pixel centres at integers).
    descriptors: (K, D) uint8: raw SIFT (D = 128) or packed TEBLID bits (D = 32); use
    :func:`matching_vectors` to match.
    """

    keypoints: np.ndarray
    descriptors: np.ndarray

    def __post_init__(self) -> None:
        k = self.keypoints.shape[0] if self.keypoints.ndim == 2 else -1
        if (self.keypoints.shape != (k, 2) or self.descriptors.ndim != 2 or self.descriptors.shape[0] != k
                or self.descriptors.shape[1] not in _WIDTHS):
            raise ValueError(
                f"keypoints must be (K, 2) and descriptors (K, D) with the same K and D in {_WIDTHS}, got "
                f"{self.keypoints.shape} and {self.descriptors.shape}"
            )
        if self.descriptors.dtype != np.uint8:
            raise ValueError(f"descriptors must be uint8, got {self.descriptors.dtype}")

    def __len__(self) -> int:
        return int(self.keypoints.shape[0])

    @property
    def nbytes(self) -> int:
        """Bytes this image's features take in the index (offsets excluded)."""
        return int(self.keypoints.nbytes + self.descriptors.nbytes)

    @classmethod
    def empty(cls, width: int = SIFT_DIM) -> LocalFeatures:
        return cls(np.zeros((0, 2), np.float32), np.zeros((0, width), np.uint8))


def rootsift(descriptors: np.ndarray) -> np.ndarray:
    """(K, 128) raw SIFT (any dtype) -> (K, 128) float32 RootSIFT, unit L2 norm.

    sqrt of the L1-normalised vector has unit L2 norm by construction, so the Euclidean
    distance between RootSIFT vectors is the Hellinger distance between the SIFT histograms,
    which matches better than L2 on raw SIFT. All-zero rows stay zero (they match nothing).
    """
    d = np.asarray(descriptors, dtype=np.float32)
    l1 = d.sum(axis=1, keepdims=True)
    return np.sqrt(d / np.maximum(l1, 1e-12))


def matching_vectors(descriptors: np.ndarray) -> np.ndarray:
    """(K, D) stored descriptors -> unit float32 rows for :func:`waldo.rerank.matching.
    mutual_ratio_matches`: RootSIFT for SIFT's 128 bytes, bits as +-1/16 for TEBLID's 32
    (256 bits; squared Euclidean distance = Hamming distance / 64, so nearest neighbours and the
    ratio test rank as Hamming does, the ratio applying to sqrt(Hamming))."""
    d = np.asarray(descriptors)
    if d.ndim == 2 and d.shape[1] == DESCRIPTOR_BYTES["teblid"]:
        bits = np.unpackbits(np.ascontiguousarray(d, np.uint8), axis=1).astype(np.float32)
        return (bits * 2.0 - 1.0) * np.float32(1.0 / 16.0)
    return rootsift(d)


def _grey(image: Image.Image | np.ndarray) -> np.ndarray:
    """RGB PIL image or (H, W, 3) / (H, W) uint8 array -> (H, W) uint8 grey."""
    array = np.asarray(image)
    if array.ndim == 3:
        return cv2.cvtColor(np.ascontiguousarray(array[..., :3]), cv2.COLOR_RGB2GRAY)
    if array.ndim == 2 and array.dtype == np.uint8:
        return np.ascontiguousarray(array)
    raise ValueError(f"expected an RGB or grey uint8 image, got shape {array.shape} dtype {array.dtype}")


def detection_scale(height: int, width: int, config: LocalFeatureConfig) -> float:
    """The factor the image is resized by before detection (1.0: untouched)."""
    short, long = min(height, width), max(height, width)
    if long > config.max_side:
        return config.max_side / long
    if config.min_side and short < config.min_side:
        return min(config.min_side / short, config.max_side / long)
    return 1.0


def extract_local_features(image: Image.Image | np.ndarray,
                           config: LocalFeatureConfig = LocalFeatureConfig()) -> LocalFeatures:
    """Keypoints and descriptors of one image, at most ``config.max_keypoints``, of
    ``config.kind`` (module doc).

    New detector objects per call: they are cheap to build, and this keeps the function safe to
    call from many threads at once.
    """
    grey = _grey(image)
    scale = detection_scale(*grey.shape, config)
    if scale != 1.0:
        size = (max(1, round(grey.shape[1] * scale)), max(1, round(grey.shape[0] * scale)))
        # INTER_AREA when shrinking (no aliasing), cubic when enlarging (smoother gradients).
        grey = cv2.resize(grey, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC)
    if config.kind == "orb-teblid":
        detector = cv2.ORB_create(nfeatures=config.max_keypoints)
    else:
        detector = cv2.SIFT_create(nfeatures=config.max_keypoints, contrastThreshold=config.contrast_threshold,
                                   edgeThreshold=config.edge_threshold)
    if config.kind == "sift":
        keypoints, descriptors = detector.detectAndCompute(grey, None)
    else:
        keypoints = detector.detect(grey, None)
        # nfeatures keeps ties at the cut: cap before describing (TEBLID drops keypoints whose
        # window leaves the image, so its output may be shorter than its input).
        keypoints = sorted(keypoints, key=lambda kp: -kp.response)[: config.max_keypoints] if keypoints else []
        keypoints, descriptors = _teblid(config.kind).compute(grey, keypoints) if keypoints else ((), None)
    if descriptors is None or not keypoints:
        return LocalFeatures.empty(config.descriptor_bytes)
    # nfeatures keeps ties at the cut, so OpenCV can return a few more than asked.
    keypoints, descriptors = keypoints[: config.max_keypoints], descriptors[: config.max_keypoints]
    xy = np.array([kp.pt for kp in keypoints], dtype=np.float32).reshape(-1, 2)
    if scale != 1.0:
        # cv2.resize maps pixel centres: x_resized + 0.5 = (x + 0.5) * scale.
        xy = (xy + 0.5) / np.float32(scale) - 0.5
    raw = np.clip(np.rint(descriptors), 0, 255).astype(np.uint8) if config.kind == "sift" else \
        np.ascontiguousarray(descriptors, np.uint8)
    return LocalFeatures(np.ascontiguousarray(xy, dtype=np.float32), raw)


def _teblid(kind: str):
    if not hasattr(cv2, "xfeatures2d"):  # opencv-python instead of opencv-contrib-python
        raise RuntimeError("TEBLID needs OpenCV's contrib build: pip install opencv-contrib-python-headless "
                           "(and uninstall opencv-python-headless)")
    return cv2.xfeatures2d.TEBLID_create(_TEBLID_SCALE[kind], cv2.xfeatures2d.TEBLID_SIZE_256_BITS)


#: The name extraction had when SIFT was the only kind.
extract_sift = extract_local_features


def extract_sift_file(source: str | Path | bytes | IO[bytes],
                      config: LocalFeatureConfig = LocalFeatureConfig()) -> LocalFeatures:
    """:func:`extract_local_features` of an image file (path, bytes or file object) via the safe loader."""
    return extract_sift(load_image(source), config)


def pack_features(features: Sequence[LocalFeatures], width: int | None = None) -> RaggedKeypoints:
    """Concatenate per-image features into the index's ragged layout (see :class:`RaggedKeypoints`).
    ``width``: descriptor bytes (default: the first image with keypoints', else SIFT's); images
    without keypoints may have any width."""
    counts = np.array([len(f) for f in features], dtype=np.int64)
    offsets = np.zeros(len(features) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    filled = [f for f in features if len(f)]
    width = width or (filled[0].descriptors.shape[1] if filled else SIFT_DIM)
    if any(f.descriptors.shape[1] != width for f in filled):
        raise ValueError("images described by different local features cannot share one index")
    keypoints = np.zeros((0, 2), np.float32)
    descriptors = np.zeros((0, width), np.uint8)
    if filled:
        keypoints = np.concatenate([f.keypoints for f in filled]).astype(np.float32, copy=False)
        descriptors = np.concatenate([f.descriptors for f in filled])
    return RaggedKeypoints(keypoints, descriptors, offsets)


def unpack_features(ragged: RaggedKeypoints) -> list[LocalFeatures]:
    """Split ragged arrays back into per-image :class:`LocalFeatures` (views, no copy)."""
    return [LocalFeatures(kp, desc) for kp, desc in ragged]


def extract_many(sources: Sequence[str | Path | bytes], config: LocalFeatureConfig = LocalFeatureConfig(), *,
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
            return LocalFeatures.empty(config.descriptor_bytes)

    show = progress and len(sources) > 1
    if len(sources) <= 1 or workers == 1:
        return [one(s) for s in tqdm(sources, desc=description, unit="img", disable=not show, leave=False)]
    with ThreadPoolExecutor(max(1, workers or os.cpu_count() or 1), thread_name_prefix="waldo-sift") as pool:
        return list(tqdm(pool.map(one, sources), total=len(sources), desc=description, unit="img",
                         disable=not show, leave=False))
