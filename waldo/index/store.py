"""The persistent index: global + local descriptors and metadata in one directory.

Layout::

    <root>/manifest.json        static: format version + the caller's model information
    <root>/index.sqlite         catalogue (WAL mode): segments, images, generation counter
    <root>/segments/<name>/     immutable arrays, one folder per add/compact (see segments.py)
    <root>/write.lock           flock'ed by writers
    <root>/global_trained.npz   approximate global indexes only: the trained, empty faiss index
                                (a cache, rebuilt if missing or damaged; see global_index.py)

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
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from waldo.fsutil import file_lock
from waldo.index import db, maintenance
from waldo.index.db import IndexedImage
from waldo.index.errors import IndexCorruptError, IndexMismatchError, describe_keys
from waldo.index.global_index import (
    FLAT,
    TRAINED_FILE,
    GlobalIndexConfig,
    check_spec,
    plan,
    read_trained_meta,
    resolve_search_params,
)
from waldo.index.keypoints import KeypointSource, RaggedKeypoints, check_keypoint_batch
from waldo.index.maintenance import (
    DB_FILE,
    LOCK_FILE,
    MANIFEST_FILE,
    SEGMENTS_DIR,
    create_index_dir,
)
from waldo.index.manifest import (
    StorageOptions,
    build_manifest,
    check_expected,
    parse_sizes,
    read_manifest,
    storage_options,
)
from waldo.index.quantize import quantize_int8
from waldo.index.segments import (
    SegmentArrays,
    SegmentInfo,
    open_segment,
    remove_segment_dirs,
    write_segment,
)
from waldo.index.snapshot import SearchResult, Snapshot, load_snapshot
from waldo.index.validate import validate_add


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
        self._options = storage_options(manifest, root / MANIFEST_FILE)
        self._global_config = GlobalIndexConfig(
            spec=self._options.global_index,
            search_params=self._options.global_search_params,
            trained_path=root / TRAINED_FILE,
        )
        self._segments_dir = root / SEGMENTS_DIR
        self._lock_path = root / LOCK_FILE
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
        local_dtype: str = "float16",
        global_index: str = FLAT,
        global_search_params: Mapping[str, int] | None = None,
    ) -> IndexStore:
        """Create an empty index at ``path`` (a new or empty directory).

        The index is assembled in a hidden sibling folder and renamed into place, so ``path``
        either holds a complete index or nothing. With ``exist_ok`` an existing index is opened
        instead, provided its manifest matches ``manifest``, the sizes and the storage options
        below (else :class:`IndexMismatchError`). A non-empty directory that is not an index is
        refused.

        Storage options, fixed for the index's lifetime and recorded in the manifest:
            local_dtype: "float16" (default) or "int8": local descriptors quantised per
                descriptor with a float16 scale (see ``quantize.py``), about half the bytes;
                readers still get float16.
            global_index: faiss factory string of the global search: "Flat" (default, exact)
                or an approximate one such as "IVF4096,Flat" or "HNSW32" (see
                ``global_index.py`` for training, fallback and rebuild costs).
            global_search_params: default ``nprobe`` (IVF) / ``efSearch`` (HNSW); omitted keys
                get the defaults of ``global_index.py``.
        """
        dims = (global_dim, *local_shape)
        if len(local_shape) != 2 or not all(isinstance(d, (int, np.integer)) and d > 0 for d in dims):
            raise ValueError(
                f"global_dim and local_shape (L, D) must be positive ints, got {global_dim}, {local_shape}"
            )
        options = cls.check_options(int(global_dim), local_dtype, global_index, global_search_params)
        full = build_manifest(manifest, int(global_dim), (int(local_shape[0]), int(local_shape[1])), options)
        root = Path(path).expanduser().absolute()
        # Storage options are compared as resolved options, not manifest keys: an index written
        # before they existed has no such keys but is float16 / "Flat".
        user = {k: v for k, v in manifest.items() if k not in ("global_index", "global_search_params")}
        expected = {**user, "global_dim": full["global_dim"], "local_shape": full["local_shape"]}
        if root.exists() and not root.is_dir():
            raise FileExistsError(f"{root} exists and is not a directory")
        if (root / MANIFEST_FILE).exists():
            if not exist_ok:
                raise FileExistsError(f"{root} already holds an index; use IndexStore.open() or exist_ok=True")
            return cls._open_matching(root, expected, options)
        if root.is_dir() and any(root.iterdir()):
            raise FileExistsError(f"{root} is not empty and is not a Waldo index; refusing to create an index there")
        try:
            create_index_dir(root, full)
        except FileExistsError:
            if not exist_ok or not (root / MANIFEST_FILE).exists():
                raise
            return cls._open_matching(root, expected, options)  # a concurrent creator won the race
        return cls.open(root)

    @staticmethod
    def check_options(
        global_dim: int,
        local_dtype: str = "float16",
        global_index: str = FLAT,
        global_search_params: Mapping[str, int] | None = None,
    ) -> StorageOptions:
        """The validated storage options of :meth:`create` (ValueError naming what is wrong).

        Callers that do expensive work before creating an index (fitting a projection) call
        this first, so a typo in a faiss spec fails in a second, not after minutes.
        """
        spec = check_spec(global_index, global_dim)
        return StorageOptions(local_dtype=local_dtype, global_index=spec,
                              global_search_params=resolve_search_params(spec, global_dim, global_search_params))

    @classmethod
    def _open_matching(cls, root: Path, expected: Mapping[str, Any], options: StorageOptions) -> IndexStore:
        """``open`` for ``create(exist_ok=True)``: the existing index must also have ``options``."""
        store = cls.open(root, expected=expected)
        differences = {
            key: (getattr(store._options, key), getattr(options, key))
            for key in ("local_dtype", "global_index", "global_search_params")
            if getattr(store._options, key) != getattr(options, key)
        }
        if differences:
            store.close()
            parts = "; ".join(f"index has {k}={a!r}, asked for {b!r}" for k, (a, b) in differences.items())
            raise IndexMismatchError(f"the existing index at {root} was created with other storage options: "
                                     f"{parts}", differences)
        return store

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
        options = storage_options(manifest, root / MANIFEST_FILE)
        try:
            check_spec(options.global_index, parse_sizes(manifest, root / MANIFEST_FILE)[0])
        except ValueError as e:
            raise IndexCorruptError(f"{root / MANIFEST_FILE}: {e}") from None
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

    @property
    def local_dtype(self) -> str:
        """How local descriptors are stored: "float16" or "int8" (readers get float16 either way)."""
        return self._options.local_dtype

    @property
    def global_index(self) -> str:
        """The faiss factory string of the global search ("Flat" = exact)."""
        return self._options.global_index

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
                snap, self._arrays = load_snapshot(
                    conn, self._segment, self._global_dim, self._local_shape, self._global_config
                )
                self._snap = snap
            return snap

    def _segment(self, info: SegmentInfo) -> SegmentArrays:
        arrays = self._arrays.get(info.name)
        if arrays is None:
            arrays = open_segment(
                self._segments_dir, info.name, info.count, self._global_dim, self._local_shape, self._options.local_dtype
            )
        return arrays

    def search(self, queries: np.ndarray, k: int, **options: Any) -> SearchResult:
        """Top-``k`` by inner product over live images (exact unless the index was created with
        an approximate ``global_index``) in the current snapshot; ``options`` (exclude_ids,
        search_params overriding ``nprobe`` / ``efSearch`` for this call): see :meth:`Snapshot.search`."""
        return self.snapshot().search(queries, k, **options)

    def global_descriptors(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """(n, D) float32 global descriptors of live ``ids`` in the order given."""
        return self.snapshot().global_descriptors(ids)

    def local_descriptors(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """(n, L, Dl) float16 local descriptors of live ``ids``, read from memory-mapped files
        (dequantised when the index stores them as int8)."""
        return self.snapshot().local_descriptors(ids)

    def verification_features(self, ids: Sequence[int] | np.ndarray) -> RaggedKeypoints | None:
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
        verification: RaggedKeypoints | None = None,
    ) -> list[int]:
        """Add ``n`` images atomically and return their new ids (ascending, never reused).

        Args:
            paths: n unique image paths, none already live (check with :meth:`contains_paths`).
            identities: n identity labels (the instance each image shows).
            global_desc: (n, D) float32, L2-normalised rows.
            local_desc: (n, L, Dl) float16 or float32 (stored as float16, or as int8 with
                per-descriptor scales when the index was created with ``local_dtype="int8"``;
                values must fit float16 either way).
            attrs: optional n JSON-serialisable dicts stored with each image.
            verification: optional keypoints of the n images for geometric verification,
                written into the same segment (so committed atomically with it).

        Raises:
            ValueError: wrong shapes/dtypes, non-finite or unnormalised values, duplicate paths.
        """
        batch = validate_add(paths, identities, global_desc, local_desc, attrs, self._global_dim, self._local_shape)
        n = len(batch)
        check_keypoint_batch(verification, n)
        if n == 0:
            return []
        conn = self._conn()
        with file_lock(self._lock_path):
            self._clean_orphans(conn)
            taken = db.existing(conn, "path", batch.paths)
            if taken:
                raise ValueError(f"paths already in the index: {describe_keys(sorted(taken))}")

            def fill(g: np.ndarray, loc: np.ndarray, scale: np.ndarray | None) -> None:
                g[:] = batch.global_desc
                if scale is None:
                    loc[:] = batch.local_desc
                else:  # quantise what the caller gave (validated above), not its float16 rounding
                    loc[:], scale[:] = quantize_int8(np.asarray(local_desc, dtype=np.float32))

            gv = KeypointSource.of(verification) if verification is not None else None
            info = write_segment(self._segments_dir, n, self._global_dim, self._local_shape, fill, gv,
                                 local_dtype=self._options.local_dtype)
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
        with file_lock(self._lock_path):
            self._clean_orphans(conn)
            removed, dropped = db.remove_images(conn, column, keys)
            remove_segment_dirs(self._segments_dir, dropped)  # after the commit: readers may still map them
        return removed

    def compact(self) -> dict[str, int]:
        """Rewrite all live rows into one new segment and drop the old ones.

        Order matters for crash safety: write + fsync the new segment, commit the re-pointed
        rows, and only then delete the old folders. Ids, and hence exact search results, are
        unchanged (int8 local descriptors are copied as stored, not re-quantised). A compaction
        that changed anything also drops the cached trained global index, so the next snapshot
        of an IVF index retrains on the current rows. Returns ``{"segments_before",
        "segments_after", "rows_reclaimed"}``.
        """
        conn = self._conn()
        with file_lock(self._lock_path):
            self._clean_orphans(conn)
            try:
                stats, dropped = maintenance.compact(
                    conn, self._segments_dir, self._global_dim, self._local_shape, self._segment,
                    self._options.local_dtype,
                )
            except BaseException:
                self._clean_orphans(conn)  # the new segment, unless its commit happened
                raise
            remove_segment_dirs(self._segments_dir, dropped)  # only after the commit
            if dropped:
                (self._root / TRAINED_FILE).unlink(missing_ok=True)
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
        return maintenance.check(
            self._root, self._conn(), self._manifest, self._global_dim, self._local_shape, self._options.local_dtype
        )

    def info(self) -> dict[str, Any]:
        """``count``, ``identities`` (distinct), ``generation``, ``local_dtype``, ``segments``
        (rows/live), ``dead_rows``, ``orphan_segments``, ``bytes`` per part, ``bytes_per_image``
        per stored part, ``global_index`` and ``manifest``.

        ``global_index``: ``spec``, ``search_params``, ``built`` (what a snapshot of the current
        rows builds: the spec, or "Flat" with a ``reason`` when there are too few rows to train
        it), ``trained`` (the cached training's header, or None) and ``snapshot`` (what the
        snapshot in memory built, or None if none was built yet). Building nothing: cheap."""
        out = maintenance.info(self._root, self._conn(), self.manifest)
        built, reason = plan(self._options.global_index, self._global_dim, out["count"])
        snap = self._snap
        out["global_index"] = {
            "spec": self._options.global_index,
            "search_params": dict(self._options.global_search_params),
            "built": built,
            "reason": reason,
            "trained": read_trained_meta(self._root / TRAINED_FILE) if built != FLAT else None,
            "snapshot": asdict(snap.global_index_status) if snap is not None else None,
        }
        return out
