"""The persistent index: global + local descriptors and metadata in one directory.

Layout::

    <root>/manifest.json        static: format version + the caller's model information
    <root>/index.sqlite         catalogue (WAL mode): segments, images, generation counter
    <root>/segments/<name>/     immutable arrays, one folder per add/compact (see segments.py)
    <root>/write.lock           flock'ed by writers

Commit protocol: a writer writes and fsyncs a new segment folder, then inserts its rows in
one SQLite transaction. The commit is the only point at which anything becomes visible, so
a crash at any moment leaves the previous state intact; a folder with no committed row is
an orphan that readers never open and the next writer deletes. Readers work on immutable
:class:`~waldo.index.snapshot.Snapshot` objects rebuilt only when the generation changes.
"""

from __future__ import annotations

import copy
import os
import sqlite3
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from waldo.index import db, maintenance
from waldo.index.db import IndexedImage
from waldo.index.errors import IndexCorruptError, describe_keys
from waldo.index.fsutil import WriterLock
from waldo.index.maintenance import DB_FILE, LOCK_FILE, MANIFEST_FILE, SEGMENTS_DIR, create_index_dir
from waldo.index.manifest import build_manifest, check_expected, parse_sizes, read_manifest
from waldo.index.segments import (
    SegmentArrays,
    SegmentInfo,
    open_segment,
    remove_segment_dirs,
    write_segment,
)
from waldo.index.snapshot import SearchResult, Snapshot, load_snapshot
from waldo.index.validate import validate_add
from waldo.index.verification import RaggedFeatures, RaggedSource, check_batch


class IndexStore:
    """A persistent, crash-safe image index. Thread-safe; several processes may share it.

    Obtain one with :meth:`create` or :meth:`open`. Writers (``add``, ``remove``, ``compact``)
    are serialised; readers (``search``, descriptors, ``records``) never block on them.
    """

    def __init__(self, root: Path, manifest: dict[str, Any]) -> None:
        """Internal: use :meth:`create` or :meth:`open`."""
        self._root = root
        self._manifest = manifest
        self._global_dim, self._local_shape = parse_sizes(manifest, root / MANIFEST_FILE)
        self._segments_dir = root / SEGMENTS_DIR
        self._lock = WriterLock(root / LOCK_FILE)
        self._conns = db.ThreadConnections(root / DB_FILE)
        self._conn = self._conns.get  # this thread's connection
        self._snap_lock = threading.Lock()
        self._snap: Snapshot | None = None
        self._arrays: dict[str, SegmentArrays] = {}  # committed segments are immutable: cache forever

    # -- lifecycle -------------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        path: str | os.PathLike[str],
        *,
        manifest: Mapping[str, Any],
        global_dim: int,
        local_shape: tuple[int, int],
        exist_ok: bool = False,
    ) -> IndexStore:
        """Create an empty index at ``path`` (a new or empty directory).

        The index is assembled in a hidden sibling folder and renamed into place, so ``path``
        either holds a complete index or nothing. With ``exist_ok`` an existing index is opened
        instead, provided its manifest matches ``manifest`` and the sizes (else
        :class:`IndexMismatchError`). A non-empty directory that is not an index is refused.
        """
        dims = (global_dim, *local_shape)
        if len(local_shape) != 2 or not all(isinstance(d, (int, np.integer)) and d > 0 for d in dims):
            raise ValueError(
                f"global_dim and local_shape (L, D) must be positive ints, got {global_dim}, {local_shape}"
            )
        full = build_manifest(manifest, int(global_dim), (int(local_shape[0]), int(local_shape[1])))
        root = Path(path).expanduser().absolute()
        expected = {**manifest, "global_dim": full["global_dim"], "local_shape": full["local_shape"]}
        if root.exists() and not root.is_dir():
            raise FileExistsError(f"{root} exists and is not a directory")
        if (root / MANIFEST_FILE).exists():
            if not exist_ok:
                raise FileExistsError(f"{root} already holds an index; use IndexStore.open() or exist_ok=True")
            return cls.open(root, expected=expected)
        if root.is_dir() and any(root.iterdir()):
            raise FileExistsError(f"{root} is not empty and is not a Waldo index; refusing to create an index there")
        try:
            create_index_dir(root, full)
        except FileExistsError:
            if not exist_ok or not (root / MANIFEST_FILE).exists():
                raise
            return cls.open(root, expected=expected)  # a concurrent creator won the race
        return cls.open(root)

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, expected: Mapping[str, Any] | None = None) -> IndexStore:
        """Open an existing index.

        Raises:
            IndexCorruptError: ``path`` is missing, not an index, or its catalogue is unreadable.
            IndexMismatchError: a key of ``expected`` (e.g. ``{"model_hash": h}``) differs from
                the manifest; the message names each key with both values.
        """
        root = Path(path).expanduser().absolute()
        if not root.is_dir():
            raise IndexCorruptError(f"no index at {root}: the directory does not exist")
        manifest = read_manifest(root / MANIFEST_FILE)
        if not (root / DB_FILE).is_file():
            raise IndexCorruptError(f"{root} is not a usable index: {DB_FILE} is missing")
        check_expected(manifest, expected)
        store = cls(root, manifest)
        try:
            db.check_catalogue(store._conns, root / DB_FILE)
        except BaseException:
            store.close()
            raise
        return store

    def close(self) -> None:
        """Close every SQLite connection this object opened (any thread). Idempotent."""
        self._conns.close_all()

    def __enter__(self) -> IndexStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- properties --------------------------------------------------------------------------
    @property
    def path(self) -> Path:
        return self._root

    @property
    def manifest(self) -> dict[str, Any]:
        """A copy of the manifest (the caller's model info plus format and sizes)."""
        return copy.deepcopy(self._manifest)

    @property
    def global_dim(self) -> int:
        return self._global_dim

    @property
    def local_shape(self) -> tuple[int, int]:
        return self._local_shape

    def __len__(self) -> int:
        return int(self._conn().execute("SELECT COUNT(*) FROM images").fetchone()[0])

    def __repr__(self) -> str:
        return f"IndexStore({str(self._root)!r}, global_dim={self._global_dim}, local_shape={self._local_shape})"

    # -- reading -----------------------------------------------------------------------------
    def snapshot(self) -> Snapshot:
        """The current immutable snapshot; rebuilt only if a write committed since the last one."""
        conn = self._conn()
        snap = self._snap
        if snap is not None and db.generation(conn) == snap.generation:
            return snap
        with self._snap_lock:
            snap = self._snap
            if snap is None or db.generation(conn) != snap.generation:
                snap, self._arrays = load_snapshot(conn, self._segment, self._global_dim, self._local_shape)
                self._snap = snap
            return snap

    def _segment(self, info: SegmentInfo) -> SegmentArrays:
        arrays = self._arrays.get(info.name)
        if arrays is None:
            arrays = open_segment(self._segments_dir, info.name, info.count, self._global_dim, self._local_shape)
        return arrays

    def search(
        self, queries: np.ndarray, k: int, *, exclude_ids: Sequence[int] | np.ndarray | None = None
    ) -> SearchResult:
        """Exact top-``k`` by inner product over live images; see :meth:`Snapshot.search`."""
        return self.snapshot().search(queries, k, exclude_ids=exclude_ids)

    def global_descriptors(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """(n, D) float32 global descriptors of live ``ids`` in the order given."""
        return self.snapshot().global_descriptors(ids)

    def local_descriptors(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """(n, L, Dl) float16 local descriptors of live ``ids``, read from memory-mapped files."""
        return self.snapshot().local_descriptors(ids)

    def verification_features(self, ids: Sequence[int] | np.ndarray) -> RaggedFeatures | None:
        """Ragged verification keypoints of live ``ids`` in the order given (see
        :meth:`Snapshot.verification_features`); None if the index stores none."""
        return self.snapshot().verification_features(ids)

    def contains_paths(self, paths: Sequence[str]) -> list[bool]:
        """For each path, whether a live image has it (lets callers skip already-indexed files)."""
        found = db.existing(self._conn(), "path", [os.fspath(p) for p in paths])
        return [os.fspath(p) in found for p in paths]

    def records(
        self, ids: Sequence[int] | np.ndarray | None = None, *, skip_missing: bool = False
    ) -> list[IndexedImage]:
        """Metadata of ``ids`` in the order given (all live images by id when None).

        Reads the current catalogue, not a snapshot: an id from a search can have been removed
        since. Such ids raise :class:`UnknownIdError` (naming them), or are left out with
        ``skip_missing=True``.
        """
        wanted = None if ids is None else np.asarray(ids, dtype=np.int64).reshape(-1).tolist()
        return db.records(self._conn(), wanted, skip_missing=skip_missing)

    def get(self, image_id: int) -> IndexedImage:
        """One image's metadata; :class:`UnknownIdError` (a KeyError) if it is not live."""
        return self.records([image_id])[0]

    # -- writing -----------------------------------------------------------------------------
    def add(
        self,
        paths: Sequence[str],
        identities: Sequence[str],
        global_desc: np.ndarray,
        local_desc: np.ndarray,
        attrs: Sequence[Mapping[str, Any]] | None = None,
        verification: RaggedFeatures | None = None,
    ) -> list[int]:
        """Add ``n`` images atomically and return their new ids (ascending, never reused).

        Args:
            paths: n unique image paths, none already live (check with :meth:`contains_paths`).
            identities: n identity labels (the instance each image shows).
            global_desc: (n, D) float32, L2-normalised rows.
            local_desc: (n, L, Dl) float16 or float32 (stored as float16).
            attrs: optional n JSON-serialisable dicts stored with each image.
            verification: optional keypoints of the n images for geometric verification,
                written into the same segment (so committed atomically with it).

        Raises:
            ValueError: wrong shapes/dtypes, non-finite or unnormalised values, duplicate paths.
        """
        batch = validate_add(paths, identities, global_desc, local_desc, attrs, self._global_dim, self._local_shape)
        n = len(batch)
        check_batch(verification, n)
        if n == 0:
            return []
        conn = self._conn()
        with self._lock:
            self._clean_orphans(conn)
            taken = db.existing(conn, "path", batch.paths)
            if taken:
                raise ValueError(f"paths already in the index: {describe_keys(sorted(taken))}")

            def fill(g: np.ndarray, loc: np.ndarray) -> None:
                g[:] = batch.global_desc
                loc[:] = batch.local_desc

            gv = RaggedSource.of(verification) if verification is not None else None
            info = write_segment(self._segments_dir, n, self._global_dim, self._local_shape, fill, gv)
            try:
                ids = db.insert_images(conn, info, batch.paths, batch.identities, batch.attrs_json)
            except BaseException:
                self._clean_orphans(conn)  # deletes the new folder only if the commit did not happen
                raise
        return ids

    def remove(self, ids: Sequence[int] | np.ndarray) -> int:
        """Remove live images by id in one transaction; returns how many were removed.

        Raises :class:`UnknownIdError` (nothing removed) if any id is not live. Their
        descriptor rows stay on disk until :meth:`compact` (whole dead segments are freed now).
        """
        wanted = sorted({int(i) for i in np.asarray(ids, dtype=np.int64).reshape(-1)})
        return self._remove("id", wanted)

    def remove_paths(self, paths: Sequence[str]) -> int:
        """Like :meth:`remove`, by path; unknown paths raise :class:`UnknownIdError`."""
        return self._remove("path", sorted({os.fspath(p) for p in paths}))

    def _remove(self, column: str, keys: list[Any]) -> int:
        if not keys:
            return 0
        conn = self._conn()
        with self._lock:
            self._clean_orphans(conn)
            removed, dropped = db.remove_images(conn, column, keys)
            remove_segment_dirs(self._segments_dir, dropped)  # after the commit: readers may still map them
        return removed

    def compact(self) -> dict[str, int]:
        """Rewrite all live rows into one new segment and drop the old ones.

        Order matters for crash safety: write + fsync the new segment, commit the re-pointed
        rows, and only then delete the old folders. Ids, and hence search results, are
        unchanged. Returns ``{"segments_before", "segments_after", "rows_reclaimed"}``.
        """
        conn = self._conn()
        with self._lock:
            self._clean_orphans(conn)
            try:
                stats, dropped = maintenance.compact(
                    conn, self._segments_dir, self._global_dim, self._local_shape, self._segment
                )
            except BaseException:
                self._clean_orphans(conn)  # the new segment, unless its commit happened
                raise
            remove_segment_dirs(self._segments_dir, dropped)  # only after the commit
        return stats

    def _clean_orphans(self, conn: sqlite3.Connection) -> list[str]:
        """Delete segment folders no committed row names (left by a crashed or failed write).

        Only safe under the writer lock: otherwise another writer's not-yet-committed segment
        would look like an orphan.
        """
        return maintenance.clean_orphans(conn, self._segments_dir)

    # -- maintenance -------------------------------------------------------------------------
    def check(self) -> list[str]:
        """Integrity problems, empty when healthy: manifest, catalogue, every live segment's
        files, shapes and sha256 (reads every byte: slow on big indexes)."""
        return maintenance.check(self._root, self._conn(), self._manifest, self._global_dim, self._local_shape)

    def info(self) -> dict[str, Any]:
        """``count``, ``identities`` (distinct), ``generation``, ``segments`` (rows/live),
        ``dead_rows``, ``orphan_segments``, ``bytes`` per part, ``manifest``."""
        return maintenance.info(self._root, self._conn(), self.manifest)
