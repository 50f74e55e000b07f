"""Immutable on-disk segments: one folder of ``.npy`` arrays per ``add`` (or ``compact``).

A segment is written completely and fsynced *before* the SQLite transaction that names it
commits; until then it is an orphan that readers never look at (they only open segments
listed in SQLite) and that the next writer deletes. Segments are never modified after the
commit, which is what lets readers memory-map them without locks.

Layout of ``segments/<name>/``:
    global.npy       (n, D) float32        global descriptors, one row per image
    local.npy        (n, L, Dl) float16    local descriptors, read through np.memmap
                  or (n, L, Dl) int8       with ``local_dtype="int8"`` (see quantize.py), plus
    local_scale.npy  (n, L) float16        one scale per local descriptor (int8 only)
    gv_*.npy, gv.json                      optional keypoints for geometric verification (keypoints.py)

The local dtype is a property of the whole index (manifest ``local_dtype``), never mixed
between segments; readers always get float16, whatever is stored.

Files are written with ordinary writes and read into RAM when small, memory-mapped when big
(see npy_files.py for why: a full disk must be an exception, not a SIGBUS, and thousands of
small segments must not hold thousands of file descriptors).
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from collections.abc import Iterable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from waldo.fsutil import fsync_dir, sha256_file
from waldo.index.errors import IndexCorruptError
from waldo.index.keypoints import (
    KeypointSource,
    RaggedKeypoints,
    check_keypoint_files,
    open_keypoints,
    write_keypoints,
)
from waldo.index.npy_files import NpyWriter, read_index_array
from waldo.index.quantize import SCALE_DTYPE, dequantize_int8

GLOBAL_FILE = "global.npy"
LOCAL_FILE = "local.npy"
LOCAL_SCALE_FILE = "local_scale.npy"
_LOCAL_NP_DTYPES = {"float16": np.dtype(np.float16), "int8": np.dtype(np.int8)}
# What gather_rows can read: globals, locals as float16 (dequantised if stored as int8), and the
# stored local arrays as they are (compact copies those, so int8 rows are never re-quantised).
PARTS = ("global_", "local", "local_stored", "local_scale")


def local_np_dtype(local_dtype: str) -> np.dtype:
    """The numpy dtype of ``local.npy`` for a manifest ``local_dtype``."""
    try:
        return _LOCAL_NP_DTYPES[local_dtype]
    except KeyError:
        raise ValueError(f"local_dtype must be one of {tuple(_LOCAL_NP_DTYPES)}, got {local_dtype!r}") from None


@dataclass(frozen=True)
class SegmentInfo:
    """What SQLite records about a segment so that ``check()`` can verify it later."""

    name: str
    count: int
    global_sha256: str
    local_sha256: str
    global_bytes: int
    local_bytes: int
    local_scale_sha256: str | None = None  # int8 segments only
    local_scale_bytes: int = 0


@dataclass(frozen=True)
class SegmentArrays:
    """A committed segment opened read-only: ``global_`` (n, D) float32 and ``local`` (n, L, Dl)
    as stored: float16, or int8 with ``local_scale`` (n, L) float16 (None for float16).

    All are read-only: ``np.memmap`` for big files (pages come from the OS page cache, so many
    snapshots and processes share one copy, and a large local array never has to fit in RAM),
    plain arrays for files under ``npy_files.MMAP_MIN_BYTES`` (read once, no file descriptor
    kept). ``gv`` holds the optional keypoints (loaded the same way), None if stored without them.
    Read locals through :func:`gather_rows` (part ``"local"``) to get float16 either way.
    """

    global_: np.ndarray
    local: np.ndarray
    gv: RaggedKeypoints | None = None
    local_scale: np.ndarray | None = None

    def local_rows(self, rows: np.ndarray | int) -> np.ndarray:
        """Local descriptors of ``rows`` as float16, dequantised if stored as int8."""
        if self.local_scale is None:
            return np.asarray(self.local[rows])
        return dequantize_int8(np.asarray(self.local[rows]), np.asarray(self.local_scale[rows]))


def _part(arrays: SegmentArrays, part: str, rows: np.ndarray) -> np.ndarray:
    if part == "global_":
        return arrays.global_[rows]
    if part == "local":
        return arrays.local_rows(rows)
    if part == "local_stored":
        return arrays.local[rows]
    if arrays.local_scale is None:
        raise ValueError("local_scale requested from a segment that stores float16 local descriptors")
    return arrays.local_scale[rows]


def _part_layout(arrays: SegmentArrays, part: str) -> tuple[tuple[int, ...], np.dtype]:
    """Row shape and dtype of what :func:`gather_rows` returns for ``part``."""
    if part == "global_":
        return arrays.global_.shape[1:], arrays.global_.dtype
    if part == "local":
        return arrays.local.shape[1:], np.dtype(np.float16)
    if part == "local_stored":
        return arrays.local.shape[1:], arrays.local.dtype
    return arrays.local.shape[1:-1], SCALE_DTYPE


def gather_rows(arrays: list[SegmentArrays], segments: np.ndarray, rows: np.ndarray, part: str) -> np.ndarray:
    """Rows ``(segments[i], rows[i])`` of one part as one new array.

    ``part``: ``"global_"`` -> (n, D) float32; ``"local"`` -> (n, L, Dl) float16 whatever the
    storage (int8 rows are dequantised); ``"local_stored"`` -> the local rows as stored
    (float16 or int8); ``"local_scale"`` -> (n, L) float16 scales of int8 segments.
    Grouped per segment so each memmap is read with a single fancy-index (rows sorted within
    a segment give mostly sequential I/O).
    """
    if part not in PARTS:
        raise ValueError(f"unknown segment part {part!r} (known: {PARTS})")
    if not arrays:
        raise ValueError("no segments to read from")
    shape, dtype = _part_layout(arrays[0], part)
    out = np.empty((len(rows), *shape), dtype=dtype)
    if len(rows) == 0:
        return out
    order = np.argsort(segments, kind="stable")
    bounds = np.flatnonzero(np.diff(segments[order])) + 1
    for group in np.split(order, bounds):
        out[group] = _part(arrays[segments[group[0]]], part, rows[group])
    return out


def new_segment_name() -> str:
    """A unique, time-sortable folder name (sorting by name = order of creation)."""
    return f"{time.time_ns():020d}-{uuid.uuid4().hex[:12]}"


# What write_segment streams: consecutive rows as (global (m, D) float32, local (m, L, Dl) as
# stored, local scales (m, L) float16 for int8 storage, else None).
SegmentChunk = tuple[np.ndarray, np.ndarray, np.ndarray | None]


def write_segment(
    segments_dir: Path,
    count: int,
    global_dim: int,
    local_shape: tuple[int, int],
    chunks: Iterable[SegmentChunk],
    gv: KeypointSource | None = None,
    local_dtype: str = "float16",
) -> SegmentInfo:
    """Create a new segment of ``count`` rows, durably, and return its :class:`SegmentInfo`.

    ``chunks`` yields consecutive rows (see :data:`SegmentChunk`; scales only for
    ``local_dtype="int8"``), so ``compact`` can stream arbitrarily large segments. Files are
    written with ordinary writes (never through a mapping: see npy_files.py), hashed as they
    are written, and fsynced. ``gv``, if given, streams the rows' keypoints into the same
    folder (fsynced with it, so before the commit). On any error, a full disk included, the
    folder is removed and the error re-raised.
    """
    if count < 1:
        raise ValueError("a segment must hold at least one row")
    l_dtype = local_np_dtype(local_dtype)
    scaled = local_dtype == "int8"
    name = new_segment_name()
    folder = segments_dir / name
    folder.mkdir()
    try:
        with ExitStack() as files:
            g_w = files.enter_context(NpyWriter(folder / GLOBAL_FILE, np.float32, (count, global_dim)))
            l_w = files.enter_context(NpyWriter(folder / LOCAL_FILE, l_dtype, (count, *local_shape)))
            s_w = (files.enter_context(NpyWriter(folder / LOCAL_SCALE_FILE, SCALE_DTYPE, (count, local_shape[0])))
                   if scaled else None)
            for g, loc, scale in chunks:
                g_w.append(g)
                l_w.append(loc)
                if s_w is not None:
                    if scale is None:
                        raise ValueError("an int8 segment needs the scales of its local descriptors")
                    s_w.append(scale)
            (g_sha, g_bytes), (l_sha, l_bytes) = g_w.finish(), l_w.finish()
            s_sha, s_bytes = s_w.finish() if s_w is not None else (None, 0)
        if gv is not None:
            write_keypoints(folder, count, gv)
        fsync_dir(folder)
        fsync_dir(segments_dir)  # the new folder's entry must be durable before SQLite names it
        return SegmentInfo(name=name, count=count, global_sha256=g_sha, local_sha256=l_sha, global_bytes=g_bytes,
                           local_bytes=l_bytes, local_scale_sha256=s_sha, local_scale_bytes=s_bytes)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise


def open_segment(
    segments_dir: Path,
    name: str,
    count: int,
    global_dim: int,
    local_shape: tuple[int, int],
    local_dtype: str = "float16",
) -> SegmentArrays:
    """Open a committed segment read-only (small files read into RAM, big ones memory-mapped),
    checking shapes and dtypes against SQLite's record and the index's ``local_dtype`` (int8
    segments must also hold ``local_scale.npy``).

    Raises:
        FileNotFoundError: the folder vanished (a concurrent ``compact``/merge/``remove``
            dropped it after our SQLite read); callers retry with a fresh state.
        IndexResourceError: out of file descriptors or memory (the segment is fine).
        IndexCorruptError: the files exist but do not match what SQLite recorded.
    """
    folder = segments_dir / name
    arrays = []
    expected = [
        (GLOBAL_FILE, (count, global_dim), np.dtype(np.float32)),
        (LOCAL_FILE, (count, *local_shape), local_np_dtype(local_dtype)),
    ]
    if local_dtype == "int8":
        expected.append((LOCAL_SCALE_FILE, (count, local_shape[0]), SCALE_DTYPE))
    for fname, shape, dtype in expected:
        path = folder / fname
        arr = read_index_array(path)
        if arr.shape != shape or arr.dtype != dtype:
            raise IndexCorruptError(
                f"segment file {path} holds {arr.dtype}{arr.shape}, expected {np.dtype(dtype)}{shape}"
            )
        arrays.append(arr)
    return SegmentArrays(global_=arrays[0], local=arrays[1], gv=open_keypoints(folder, count),
                         local_scale=arrays[2] if len(arrays) > 2 else None)


def verify_segment(
    segments_dir: Path,
    info: SegmentInfo,
    global_dim: int,
    local_shape: tuple[int, int],
    local_dtype: str = "float16",
) -> list[str]:
    """Integrity problems of one committed segment (missing files, wrong shape, wrong hash)."""
    problems: list[str] = []
    folder = segments_dir / info.name
    if not folder.is_dir():
        return [f"segment {info.name}: folder {folder} is missing"]
    try:
        open_segment(segments_dir, info.name, info.count, global_dim, local_shape, local_dtype)
    except FileNotFoundError as e:
        problems.append(f"segment {info.name}: file missing ({e.filename})")
    except IndexCorruptError as e:
        problems.append(f"segment {info.name}: {e}")
    hashed = [(GLOBAL_FILE, info.global_sha256), (LOCAL_FILE, info.local_sha256)]
    if local_dtype == "int8":
        if info.local_scale_sha256 is None:
            problems.append(f"segment {info.name}: the catalogue records no sha256 for {LOCAL_SCALE_FILE}")
        else:
            hashed.append((LOCAL_SCALE_FILE, info.local_scale_sha256))
    for fname, want in hashed:
        try:
            if sha256_file(folder / fname) != want:
                problems.append(f"segment {info.name}: {fname} sha256 differs from the recorded one (file damaged)")
        except FileNotFoundError:
            pass  # reported by open_segment above (or deleted meanwhile: check() then repeats itself)
    # check_keypoint_files re-reports a failed open_segment on the gv files: keep each message once.
    problems += [p for p in check_keypoint_files(folder, info.count) if not any(p in q for q in problems)]
    return problems


def list_segment_dirs(segments_dir: Path) -> list[str]:
    """Names of all folders under ``segments/`` (committed or not)."""
    try:
        return sorted(e.name for e in os.scandir(segments_dir) if e.is_dir(follow_symlinks=False))
    except FileNotFoundError:
        return []


def remove_segment_dirs(segments_dir: Path, names: Iterable[str]) -> None:
    """Delete segment folders. Only called for folders no committed SQLite row names."""
    removed = False
    for name in names:
        shutil.rmtree(segments_dir / name, ignore_errors=True)
        removed = True
    if removed:
        fsync_dir(segments_dir)


def dir_bytes(path: Path) -> int:
    """Total size of the files directly inside ``path`` (0 if it does not exist)."""
    try:
        return sum(e.stat().st_size for e in os.scandir(path) if e.is_file(follow_symlinks=False))
    except FileNotFoundError:
        return 0
