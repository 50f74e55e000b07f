"""Optional per-segment keypoints: ragged keypoints + descriptors per image.

Geometric verification (a reranker) needs each indexed image's keypoints, and their number varies per
image, so they are stored as ragged arrays: image ``i`` of a segment owns rows
``offsets[i]:offsets[i + 1]`` of the keypoint and descriptor arrays. The files live in the
segment folder and are written and fsynced with it, *before* the SQLite commit, so the
index's crash safety is unchanged: they become visible exactly when the segment does.

Layout added to ``segments/<name>/`` (all optional, all or none):
    gv_keypoints.npy    (M, 2) float32      (x, y) in the original image's pixels
    gv_descriptors.npy  (M, D) uint8|float16 e.g. packed TEBLID bits or raw SIFT bytes
    gv_offsets.npy      (n + 1,) int64      offsets[0] = 0, offsets[n] = M, non-decreasing
    gv.json             sha256 and size of the three files, for ``check()``

The index does not interpret the descriptors (the caller's manifest says what they are).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from waldo.fsutil import sha256_file
from waldo.index.errors import IndexCorruptError, is_resource_error
from waldo.index.npy_files import NpyWriter, read_index_array, save_npy

GV_KEYPOINTS = "gv_keypoints.npy"
GV_DESCRIPTORS = "gv_descriptors.npy"
GV_OFFSETS = "gv_offsets.npy"
GV_META = "gv.json"
GV_FILES = (GV_KEYPOINTS, GV_DESCRIPTORS, GV_OFFSETS)
DESCRIPTOR_DTYPES = (np.dtype(np.uint8), np.dtype(np.float16))


@dataclass(frozen=True)
class RaggedKeypoints:
    """Keypoints of ``n`` images in one ragged layout.

    keypoints: (M, 2) float32.  descriptors: (M, D) uint8 or float16.
    offsets: (n + 1,) int64; image i owns rows offsets[i]:offsets[i + 1].
    """

    keypoints: np.ndarray
    descriptors: np.ndarray
    offsets: np.ndarray

    def __post_init__(self) -> None:
        kp, desc, off = self.keypoints, self.descriptors, self.offsets
        m = kp.shape[0] if kp.ndim == 2 else -1
        if kp.shape != (m, 2) or kp.dtype != np.float32:
            raise ValueError(f"keypoints must be (M, 2) float32, got {kp.dtype}{kp.shape}")
        if desc.ndim != 2 or desc.shape[0] != m or desc.dtype not in DESCRIPTOR_DTYPES:
            raise ValueError(f"descriptors must be ({m}, D) uint8 or float16, got {desc.dtype}{desc.shape}")
        if off.ndim != 1 or len(off) < 1 or off.dtype != np.int64:
            raise ValueError(f"offsets must be (n + 1,) int64, got {off.dtype}{off.shape}")
        if off[0] != 0 or off[-1] != m or (len(off) > 1 and np.any(np.diff(off) < 0)):
            raise ValueError(f"offsets must start at 0, never decrease and end at M={m}")

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Image ``i``'s ((K, 2) keypoints, (K, D) descriptors), views into the arrays."""
        if not -len(self) <= i < len(self):
            raise IndexError(f"image {i} out of range for {len(self)} images")
        i %= len(self)
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return self.keypoints[a:b], self.descriptors[a:b]

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        return (self[i] for i in range(len(self)))

    @property
    def dim(self) -> int:
        return int(self.descriptors.shape[1])

    def counts(self) -> np.ndarray:
        """(n,) int64 keypoints per image."""
        return np.diff(self.offsets)

    @classmethod
    def empty(cls, n: int, dim: int, dtype: np.dtype) -> RaggedKeypoints:
        """``n`` images with no keypoints (e.g. rows of a segment stored without features)."""
        return cls(np.zeros((0, 2), np.float32), np.zeros((0, dim), dtype), np.zeros(n + 1, np.int64))


def gather_keypoints(parts: list[RaggedKeypoints | None], segments: np.ndarray, rows: np.ndarray) -> RaggedKeypoints:
    """Images ``(segments[i], rows[i])`` as one new :class:`RaggedKeypoints`, in that order.

    ``parts[s]`` is segment s's features, or None for a segment stored without them: its
    images get zero keypoints (they cannot be verified and keep their global rank).
    """
    known = [p for p in parts if p is not None]
    if not known:
        raise ValueError("no segment holds keypoints")
    # A segment whose images all lack keypoints has nothing to disagree with.
    filled = [p for p in known if len(p.descriptors)] or known
    dim, dtype = filled[0].dim, filled[0].descriptors.dtype
    if any(p.dim != dim or p.descriptors.dtype != dtype for p in filled):
        raise IndexCorruptError("segments hold keypoint descriptors of different sizes or dtypes")
    spans = []
    for s, r in zip(segments.tolist(), rows.tolist()):
        part = parts[s]
        spans.append((part, int(part.offsets[r]), int(part.offsets[r + 1])) if part is not None else (None, 0, 0))
    offsets = np.zeros(len(spans) + 1, np.int64)
    np.cumsum([b - a for _, a, b in spans], out=offsets[1:])
    keypoints = np.empty((int(offsets[-1]), 2), np.float32)
    descriptors = np.empty((int(offsets[-1]), dim), dtype)
    for (part, a, b), start in zip(spans, offsets[:-1].tolist()):
        if part is not None and b > a:
            keypoints[start : start + b - a] = part.keypoints[a:b]
            descriptors[start : start + b - a] = part.descriptors[a:b]
    return RaggedKeypoints(keypoints, descriptors, offsets)


@dataclass(frozen=True)
class KeypointSource:
    """What :func:`write_keypoints` streams into a new segment: ``total`` keypoints of ``dim``
    descriptors of ``dtype``, yielded by ``chunks`` as consecutive images' features."""

    total: int
    dim: int
    dtype: np.dtype
    chunks: Iterable[RaggedKeypoints]

    @classmethod
    def of(cls, features: RaggedKeypoints) -> KeypointSource:
        """A source that writes one in-memory batch."""
        return cls(len(features.keypoints), features.dim, features.descriptors.dtype, [features])


def check_keypoint_batch(features: RaggedKeypoints | None, n: int) -> None:
    """Refuse a batch whose features do not cover exactly the ``n`` images being added."""
    if features is None:
        return
    if not isinstance(features, RaggedKeypoints):
        raise ValueError(f"keypoints must be RaggedKeypoints, got {type(features).__name__}")
    if len(features) != n:
        raise ValueError(f"keypoints cover {len(features)} images, but {n} are being added")
    if not np.isfinite(features.keypoints).all():
        raise ValueError("keypoints hold NaN/inf coordinates")


def write_keypoints(folder: Path, count: int, source: KeypointSource) -> None:
    """Write ``count`` images' features into ``folder``, streaming from ``source``.

    ``source.chunks`` yields consecutive images' features (e.g. 4096 images at a time, so
    that ``compact`` never holds all of an index's keypoints in RAM). Written with ordinary
    writes (a full disk is an OSError, never a SIGBUS: see npy_files.py) and fsynced; the
    caller fsyncs the folder. ``gv.json`` is written last with the hashes.
    """
    total, dim, dtype = source.total, source.dim, np.dtype(source.dtype)
    offsets = np.zeros(count + 1, np.int64)
    image, row = 0, 0
    with (NpyWriter(folder / GV_KEYPOINTS, np.float32, (total, 2)) as kp_w,
          NpyWriter(folder / GV_DESCRIPTORS, dtype, (total, dim)) as desc_w):
        for chunk in source.chunks:
            m = len(chunk.keypoints)
            if row + m > total or image + len(chunk) > count or chunk.dim != dim:
                raise ValueError("keypoint chunks do not add up to the declared sizes")
            kp_w.append(chunk.keypoints)
            desc_w.append(chunk.descriptors)
            offsets[image + 1 : image + len(chunk) + 1] = row + chunk.offsets[1:]
            image, row = image + len(chunk), row + m
        if image != count or row != total:
            raise ValueError(f"keypoints: got {image} images / {row} keypoints, "
                             f"expected {count} / {total}")
        written = {GV_KEYPOINTS: kp_w.finish(), GV_DESCRIPTORS: desc_w.finish()}
    written[GV_OFFSETS] = save_npy(folder / GV_OFFSETS, offsets)
    meta = {name: {"sha256": sha, "bytes": size} for name, (sha, size) in written.items()}
    with open(folder / GV_META, "x", encoding="utf-8") as f:
        f.write(json.dumps(meta, indent=1, sort_keys=True))
        f.flush()
        os.fsync(f.fileno())


def open_keypoints(folder: Path, count: int) -> RaggedKeypoints | None:
    """Open a segment's keypoints read-only (read into RAM when small, memory-mapped when big:
    see npy_files.py); None if it was stored without them.

    Raises IndexCorruptError if only some files exist or they disagree with each other, and
    IndexResourceError (not corruption) when the process is out of file descriptors or memory.
    """
    present = [(folder / name).is_file() for name in GV_FILES]
    if not any(present):
        return None
    if not all(present):
        missing = [n for n, p in zip(GV_FILES, present) if not p]
        raise IndexCorruptError(f"segment {folder.name}: keypoint files {missing} are missing")
    try:
        kp = read_index_array(folder / GV_KEYPOINTS)
        desc = read_index_array(folder / GV_DESCRIPTORS)
        offsets = read_index_array(folder / GV_OFFSETS)
    except FileNotFoundError as e:  # vanished since the check above: a concurrent compact/merge
        raise FileNotFoundError(e.errno, f"segment {folder.name}: keypoint file vanished", e.filename) from None
    except IndexCorruptError as e:
        raise IndexCorruptError(f"segment {folder.name}: keypoint files unreadable: {e}") from None
    if offsets.shape != (count + 1,):
        raise IndexCorruptError(f"segment {folder.name}: {GV_OFFSETS} has shape {offsets.shape}, "
                                f"expected ({count + 1},)")
    try:
        return RaggedKeypoints(kp, desc, offsets)
    except ValueError as e:
        raise IndexCorruptError(f"segment {folder.name}: inconsistent keypoint files: {e}") from None


def check_keypoint_files(folder: Path, count: int) -> list[str]:
    """Integrity problems of a segment's keypoint files (none if it has none)."""
    try:
        if open_keypoints(folder, count) is None:
            return []
    except (IndexCorruptError, FileNotFoundError) as e:
        return [str(e)]
    try:
        meta = json.loads((folder / GV_META).read_text())
    except (OSError, ValueError) as e:
        if is_resource_error(e):
            raise
        return [f"segment {folder.name}: {GV_META} unreadable ({e})"]
    problems = []
    for name in GV_FILES:
        try:
            if sha256_file(folder / name) != meta.get(name, {}).get("sha256"):
                problems.append(f"segment {folder.name}: {name} sha256 differs from {GV_META} (file damaged)")
        except FileNotFoundError:  # deleted meanwhile: check() repeats itself if a writer dropped it
            problems.append(f"segment {folder.name}: {name} is missing")
    return problems


def keypoint_bytes(folder: Path) -> int:
    """Bytes of a segment's keypoint files (0 without them)."""
    return sum((folder / n).stat().st_size for n in (*GV_FILES, GV_META) if (folder / n).is_file())
