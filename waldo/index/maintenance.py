"""Less frequent index operations: creating the directory, compaction, integrity check, info.

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
from collections.abc import Callable
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
_COMPACT_CHUNK = 4096  # rows copied per step by compact(): bounds its RAM use


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
    """Rewrite live rows (id order) into one new segment and commit; caller holds the lock.

    Local descriptors are copied as stored (int8 rows with their scales), never dequantised
    and re-quantised, so compacting any number of times changes no value.
    Returns the stats and the names of the dropped segments, whose folders the caller deletes
    *after* this commit. If the commit does not happen the new folder is an orphan.
    """
    live = db.live_rows(conn)
    before = len(live.segment_infos)
    dead = sum(i.count for i in live.segment_infos) - len(live.ids)
    stats = {"segments_before": before, "segments_after": before, "rows_reclaimed": 0}
    if before <= 1 and dead == 0:
        return stats, []
    stats.update(segments_after=0 if len(live.ids) == 0 else 1, rows_reclaimed=dead)
    if len(live.ids) == 0:
        with db.write_txn(conn):
            dropped = db.drop_empty_segments(conn)
        return stats, dropped
    arrays = [open_seg(info) for info in live.segment_infos]

    def fill(g: np.ndarray, loc: np.ndarray, scale: np.ndarray | None) -> None:
        for s in range(0, len(live.ids), _COMPACT_CHUNK):
            seg, rows = live.segments[s : s + _COMPACT_CHUNK], live.rows[s : s + _COMPACT_CHUNK]
            g[s : s + len(rows)] = gather_rows(arrays, seg, rows, "global_")
            loc[s : s + len(rows)] = gather_rows(arrays, seg, rows, "local_stored")
            if scale is not None:
                scale[s : s + len(rows)] = gather_rows(arrays, seg, rows, "local_scale")

    info = write_segment(segments_dir, len(live.ids), global_dim, local_shape, fill, _gv_source(arrays, live),
                         local_dtype=local_dtype)
    with db.write_txn(conn):
        db.insert_segment(conn, info, time.time())
        conn.executemany(
            "UPDATE images SET segment = ?, row = ? WHERE id = ?",
            ((info.name, r, int(i)) for r, i in enumerate(live.ids)),
        )
        dropped = db.drop_empty_segments(conn)
    return stats, dropped


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
