"""Less frequent index operations: creating the directory, compaction and tiered merges,
integrity check, info.

Kept out of ``store.py`` so the class there reads as the public API. Functions here take the
pieces they need explicitly; the caller (``IndexStore``) is responsible for locking.
"""

from __future__ import annotations

import errno
import os
import shutil
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from waldo.fsutil import atomic_write_json, fsync_dir
from waldo.index import db
from waldo.index.errors import IndexCorruptError
from waldo.index.global_index import TRAINED_FILE
from waldo.index.keypoints import KeypointSource, gather_keypoints, keypoint_bytes
from waldo.index.manifest import read_manifest
from waldo.index.segments import (
    SegmentArrays,
    SegmentChunk,
    SegmentInfo,
    dir_bytes,
    gather_rows,
    list_segment_dirs,
    remove_segment_dirs,
    verify_segment,
    write_segment,
)

MANIFEST_FILE = "manifest.json"
DB_FILE = "index.sqlite"
SEGMENTS_DIR = "segments"
LOCK_FILE = "write.lock"
_COMPACT_CHUNK = 4096  # rows copied per step by compact() and merges: bounds their RAM use


def create_index_dir(root: Path, manifest: dict[str, Any]) -> None:
    """Build an empty index in a hidden sibling folder, then rename it to ``root``.

    ``rename`` is atomic and replaces only an *empty* directory, so ``root`` ends up holding
    a complete index or stays as it was. Raises ``FileExistsError`` if ``root`` became
    non-empty meanwhile (e.g. a concurrent creator won). A crash may leave the hidden
    ``.<name>.creating-*`` folder behind; it is never mistaken for an index.
    """
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".{root.name}.creating-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        (tmp / SEGMENTS_DIR).mkdir()
        conn = db.connect(tmp / DB_FILE)
        try:
            db.init_schema(conn)
        finally:
            conn.close()
        atomic_write_json(tmp / MANIFEST_FILE, manifest)  # fsyncs tmp too: rename a complete folder
        try:
            os.rename(tmp, root)
        except OSError as e:
            if e.errno in (errno.ENOTEMPTY, errno.EEXIST):
                raise FileExistsError(f"{root} was populated concurrently; not overwriting it") from None
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    fsync_dir(root.parent)


def clean_orphans(conn: sqlite3.Connection, segments_dir: Path) -> list[str]:
    """Delete segment folders no committed row names (left by a crashed or failed write).

    Only safe under the writer lock: otherwise another writer's written-but-not-yet-committed
    segment would look like an orphan. Returns the names deleted.
    """
    committed = {info.name for info in db.segment_infos(conn)}
    orphans = [name for name in list_segment_dirs(segments_dir) if name not in committed]
    remove_segment_dirs(segments_dir, orphans)
    return orphans


def compact(
    conn: sqlite3.Connection,
    segments_dir: Path,
    global_dim: int,
    local_shape: tuple[int, int],
    open_seg: Callable[[SegmentInfo], SegmentArrays],
    local_dtype: str = "float16",
) -> tuple[dict[str, int], list[str]]:
    """Rewrite all live rows (id order) into one new segment and commit; caller holds the lock.

    Returns ``({"segments_before", "segments_after", "rows_reclaimed"}, dropped segment
    names)``: see :func:`rewrite_segments`, which does the work.
    """
    live = db.live_rows(conn)
    before = len(live.segment_infos)
    dead = sum(i.count for i in live.segment_infos) - len(live.ids)
    stats = {"segments_before": before, "segments_after": before, "rows_reclaimed": 0}
    if before <= 1 and dead == 0:
        return stats, []
    stats.update(segments_after=0 if len(live.ids) == 0 else 1, rows_reclaimed=dead)
    return stats, rewrite_segments(conn, segments_dir, global_dim, local_shape, open_seg, live, local_dtype)


def rewrite_segments(
    conn: sqlite3.Connection,
    segments_dir: Path,
    global_dim: int,
    local_shape: tuple[int, int],
    open_seg: Callable[[SegmentInfo], SegmentArrays],
    live: db.LiveRows,
    local_dtype: str = "float16",
) -> list[str]:
    """Rewrite the live rows of ``live`` (all segments, or the subset a merge chose: see
    ``db.live_rows``) into one new segment, in id order, and commit; caller holds the lock.

    Order matters for crash safety: the new segment is written and fsynced, then one
    transaction re-points its rows and drops the segments left empty. Local descriptors are
    copied as stored (int8 rows with their scales), never dequantised and re-quantised, so
    rewriting any number of times changes no value; keypoints are carried along; ids are
    unchanged. Returns the names of the dropped segments, whose folders the caller deletes
    *after* this commit. If the commit does not happen the new folder is an orphan.
    """
    if len(live.ids) == 0:
        with db.write_txn(conn):
            return db.drop_empty_segments(conn)
    arrays = [open_seg(info) for info in live.segment_infos]

    def chunks() -> Iterator[SegmentChunk]:
        for s in range(0, len(live.ids), _COMPACT_CHUNK):
            seg, rows = live.segments[s : s + _COMPACT_CHUNK], live.rows[s : s + _COMPACT_CHUNK]
            scale = gather_rows(arrays, seg, rows, "local_scale") if local_dtype == "int8" else None
            yield gather_rows(arrays, seg, rows, "global_"), gather_rows(arrays, seg, rows, "local_stored"), scale

    info = write_segment(segments_dir, len(live.ids), global_dim, local_shape, chunks(), _gv_source(arrays, live),
                         local_dtype=local_dtype)
    with db.write_txn(conn):
        db.insert_segment(conn, info, time.time())
        conn.executemany(
            "UPDATE images SET segment = ?, row = ? WHERE id = ?",
            ((info.name, r, int(i)) for r, i in enumerate(live.ids)),
        )
        return db.drop_empty_segments(conn)


@dataclass(frozen=True)
class MergePolicy:
    """When small segments are merged: a tiered (log-structured) policy, as in Lucene's
    LogMergePolicy or RocksDB's universal compaction.

    Every ``add`` commits one segment, so an index grown one photo at a time would otherwise
    hold one segment per photo (each costs file descriptors, catalogue rows and time on every
    snapshot). A segment of ``r`` stored rows is in tier ``floor(log_factor(r))``: with the
    default factor 10, tier 0 holds 1-9 rows, tier 1 10-99, and so on. When a tier holds
    ``factor`` segments or more, they are merged into one segment of a higher tier. Each row
    is therefore rewritten about once per tier, ``O(log n)`` times in all (total merge work
    ``O(n log n)``), and a tier never keeps more than ``factor - 1`` segments, so an index of
    ``n`` rows holds at most about ``(factor - 1) * (log_factor(n) + 1)`` segments.

    ``max_segment_bytes``: segments at least this big (descriptor bytes, keypoints not
    counted) are left alone, and a merge stops adding segments before its output would pass
    it, so the background work of one merge stays bounded; ``compact()`` still rewrites
    everything. Tiers count stored rows (removed rows included: the catalogue knows them
    without scanning the images), so deciding is cheap.
    """

    factor: int = 10
    max_segment_bytes: int = 4 << 30

    def __post_init__(self) -> None:
        if not isinstance(self.factor, int) or self.factor < 2:
            raise ValueError(f"merge factor must be an integer >= 2, got {self.factor!r}")
        if self.max_segment_bytes < 1:
            raise ValueError(f"max_segment_bytes must be positive, got {self.max_segment_bytes!r}")

    def tier(self, rows: int) -> int:
        """``floor(log_factor(rows))`` in integers (no float rounding at exact powers)."""
        tier, size = 0, self.factor
        while rows >= size:
            tier, size = tier + 1, size * self.factor
        return tier

    def plan(self, infos: Sequence[SegmentInfo]) -> list[str]:
        """Names of the segments to merge next (oldest first), or [] when the policy is met.

        The lowest tier holding ``factor`` or more mergeable segments goes first; its
        segments are taken oldest first, each one that keeps the output under
        ``max_segment_bytes``, and a merge needs at least two of them.
        """
        tiers: dict[int, list[SegmentInfo]] = {}
        for info in sorted(infos, key=lambda i: i.name):  # names sort by creation time
            if _segment_bytes(info) < self.max_segment_bytes:
                tiers.setdefault(self.tier(info.count), []).append(info)
        for tier in sorted(tiers):
            members = tiers[tier]
            if len(members) < self.factor:
                continue
            chosen, size = [], 0
            for info in members:
                if size + _segment_bytes(info) > self.max_segment_bytes:
                    continue  # too big to join this merge; a smaller, younger one may still fit
                chosen.append(info.name)
                size += _segment_bytes(info)
            if len(chosen) >= 2:
                return chosen
        return []

    def bound(self, rows: int) -> int:
        """The most segments the policy leaves behind for ``rows`` rows, all under the size cap:
        ``factor - 1`` per tier up to the tier of ``rows``."""
        return (self.factor - 1) * (self.tier(max(rows, 1)) + 1)


def _segment_bytes(info: SegmentInfo) -> int:
    return info.global_bytes + info.local_bytes + info.local_scale_bytes


def _gv_source(arrays: list[SegmentArrays], live: db.LiveRows) -> KeypointSource | None:
    """Stream the live rows' keypoints (if any segment has them) in chunks."""
    parts = [a.gv for a in arrays]
    known = [p for p in parts if p is not None]
    if not known:
        return None
    counts = np.array([0 if p is None else int(p.offsets[r + 1] - p.offsets[r])
                       for p, r in ((parts[s], r) for s, r in zip(live.segments.tolist(), live.rows.tolist()))])
    chunks = (gather_keypoints(parts, live.segments[s : s + _COMPACT_CHUNK], live.rows[s : s + _COMPACT_CHUNK])
              for s in range(0, len(live.ids), _COMPACT_CHUNK))
    return KeypointSource(int(counts.sum()), known[0].dim, known[0].descriptors.dtype, chunks)


def check(
    root: Path,
    conn: sqlite3.Connection,
    manifest: dict[str, Any],
    global_dim: int,
    local_shape: tuple[int, int],
    local_dtype: str = "float16",
) -> list[str]:
    """Integrity problems of the index at ``root``; an empty list means healthy.

    Verifies: the manifest parses and is unchanged since open; SQLite's own quick_check; every
    image row points inside a recorded segment; every live segment's files exist with the
    recorded shapes and sha256 (with int8 locals, ``local_scale.npy`` too). Lock-free: if a
    concurrent writer changed the catalogue while files were being hashed (a compact deletes
    folders), the check is repeated on the new state.
    Orphan folders are not problems: readers ignore them and the next writer deletes them.
    Running out of file descriptors or memory is not a problem of the index either: it raises
    :class:`IndexResourceError` instead of being reported.
    """
    problems: list[str] = []
    try:
        if read_manifest(root / MANIFEST_FILE) != manifest:
            problems.append(f"{MANIFEST_FILE} changed since the index was opened")
    except IndexCorruptError as e:
        problems.append(str(e))
    found: list[str] = []
    for _attempt in range(5):
        found = []
        try:
            with db.read_txn(conn):
                gen = db.generation(conn)
                quick = [r[0] for r in conn.execute("PRAGMA quick_check")]
                dangling = db.dangling_images(conn)
                infos = db.segment_infos(conn)
        except sqlite3.DatabaseError as e:
            if isinstance(e, sqlite3.OperationalError):  # out of descriptors is not damage: raise instead
                db.raise_if_out_of_resources(root / DB_FILE)
            return problems + [f"{DB_FILE} is unreadable: {e}"]
        if quick != ["ok"]:
            found += [f"SQLite quick_check: {q}" for q in quick]
        if dangling:
            found.append(f"{dangling} image rows point outside their segment")
        for info in infos:
            found += verify_segment(root / SEGMENTS_DIR, info, global_dim, local_shape, local_dtype)
        if not found or db.generation(conn) == gen:
            break
    return problems + found


def info(root: Path, conn: sqlite3.Connection, manifest: dict[str, Any]) -> dict[str, Any]:
    """A JSON-serialisable summary: counts, segments (rows, live rows), bytes on disk per part,
    and ``bytes_per_image`` per stored part (bytes over stored rows, dead rows included: the
    cost of the storage format; ``dead_rows`` says how many ``compact()`` would reclaim)."""
    with db.read_txn(conn):
        gen = db.generation(conn)
        count, identities = conn.execute("SELECT COUNT(*), COUNT(DISTINCT identity) FROM images").fetchone()
        infos = db.segment_infos(conn)
        live = dict(conn.execute("SELECT segment, COUNT(*) FROM images GROUP BY segment").fetchall())
    committed = {s.name for s in infos}
    orphans = [n for n in list_segment_dirs(root / SEGMENTS_DIR) if n not in committed]
    sqlite_bytes = sum(
        (root / f).stat().st_size for f in (DB_FILE, DB_FILE + "-wal", DB_FILE + "-shm") if (root / f).exists()
    )
    stored = {
        "global": sum(s.global_bytes for s in infos),
        "local": sum(s.local_bytes for s in infos),
        "local_scale": sum(s.local_scale_bytes for s in infos),
        "verification": sum(keypoint_bytes(root / SEGMENTS_DIR / s.name) for s in infos),
    }
    rows = sum(s.count for s in infos)
    per_image = {part: round(b / rows, 1) if rows else 0.0 for part, b in stored.items()}
    per_image["total"] = round(sum(per_image.values()), 1)
    return {
        "path": str(root),
        "generation": gen,
        "count": count,
        "identities": identities,
        "local_dtype": manifest.get("local_dtype", "float16"),
        "segments": [{"name": s.name, "rows": s.count, "live": live.get(s.name, 0)} for s in infos],
        "dead_rows": sum(s.count - live.get(s.name, 0) for s in infos),
        "orphan_segments": len(orphans),
        "bytes": {
            **stored,
            "sqlite": sqlite_bytes,
            "manifest": (root / MANIFEST_FILE).stat().st_size,
            "orphans": sum(dir_bytes(root / SEGMENTS_DIR / n) for n in orphans),
            "global_trained": (root / TRAINED_FILE).stat().st_size if (root / TRAINED_FILE).is_file() else 0,
        },
        "bytes_per_image": per_image,
        "manifest": manifest,
    }
