"""The persistent index: global + local descriptors and metadata in one directory.

Layout::

    <root>/manifest.json        static: format version + the caller's model information
    <root>/index.sqlite         catalogue (WAL mode): segments, images, generation counter
    <root>/segments/<name>/     immutable arrays, one folder per add/compact/merge (see segments.py)
    <root>/write.lock           flock'ed by writers
    <root>/global_trained.npz   approximate global indexes only: the trained, empty faiss index
                                (a cache, rebuilt if missing or damaged; see global_index.py)

Commit protocol: a writer writes and fsyncs a new segment folder, then inserts its rows in
one SQLite transaction. The commit is the only point at which anything becomes visible, so
a crash at any moment leaves the previous state intact; a folder with no committed row is
an orphan that readers never open and the next writer deletes. Readers work on immutable
:class:`~waldo.index.snapshot.Snapshot` objects rebuilt only when the generation changes.

Every add commits one segment, so small segments are merged by a tiered policy
(:class:`~waldo.index.maintenance.MergePolicy`, :meth:`IndexStore.merge_small_segments`) with
the same protocol, keeping the number of segments logarithmic in the number of images.
Writes never go through a memory mapping, so a full disk is an exception
(:class:`~waldo.index.errors.StorageFullError`, the write undone), not a SIGBUS.
"""

from __future__ import annotations

import copy
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from waldo.fsutil import LockTimeout, file_lock, lock_is_held
from waldo.index import db, maintenance
from waldo.index.db import IndexedImage
from waldo.index.errors import (
    IndexBusyError,
    IndexCorruptError,
    IndexMismatchError,
    IndexResourceError,
    describe_keys,
    is_resource_error,
    resource_error,
    storage_guard,
)
from waldo.index.global_index import (
    FLAT,
    TRAINED_FILE,
    GlobalIndexConfig,
    check_spec,
    plan,
    read_trained_meta,
    resolve_search_params,
)
from waldo.index.keypoints import KeypointSource, RaggedKeypoints, check_keypoint_batch, gather_keypoints
from waldo.index.maintenance import (
    DB_FILE,
    LOCK_FILE,
    MANIFEST_FILE,
    SEGMENTS_DIR,
    MergePolicy,
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


@dataclass(frozen=True)
class AddResult:
    """What :meth:`IndexStore.add_new` did: ``ids`` of the images added (in input order, among
    the new paths) and ``skipped_paths``, those already live when the write lock was taken."""

    ids: list[int]
    skipped_paths: list[str]


class IndexStore:
    """A persistent, crash-safe image index. Thread-safe; several processes may share it.

    Obtain one with :meth:`create` or :meth:`open`. Writers (``add``, ``remove``, ``compact``,
    ``merge_small_segments``) are serialised by a file lock; readers (``search``, descriptors,
    ``records``) never block on them.

    Settable attributes:
        lock_timeout: seconds a writer waits for the write lock before raising
            :class:`IndexBusyError` (None, the default: wait as long as it takes).
        on_lock_wait: called once when a writer has waited a second for the lock (a CLI
            prints "waiting for the index's write lock..."); None: silent.
        merge_policy: the :class:`~waldo.index.maintenance.MergePolicy` of
            :meth:`needs_merge` / :meth:`merge_small_segments`.

    Failures of the machine are ``OSError`` subclasses, never :class:`IndexCorruptError`:
    :class:`StorageFullError` (a write found the disk full; it was undone),
    :class:`IndexResourceError` (out of file descriptors or memory) and :class:`IndexBusyError`.
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
        self.lock_timeout: float | None = None
        self.on_lock_wait: Callable[[], None] | None = None
        self.merge_policy = MergePolicy()

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
            with storage_guard(root, "no index was created"):
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
    def open(cls, path: str | os.PathLike[str], *, expected: Mapping[str, Any] | None = None,
             lock_timeout: float | None = None) -> IndexStore:
        """Open an existing index. ``lock_timeout``: see the class docstring (None: writers wait
        for the write lock as long as it takes).

        Raises:
            IndexCorruptError: ``path`` is missing, not an index, or its catalogue is unreadable.
            IndexMismatchError: a key of ``expected`` (e.g. ``{"model_hash": h}``) differs from
                the manifest; the message names each key with both values.
            IndexResourceError: the process is out of file descriptors or memory (the index
                may be fine).
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
        store.lock_timeout = lock_timeout
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

    def records_for_paths(self, paths: Sequence[str]) -> list[IndexedImage]:
        """The live images with these paths (unknown paths are skipped); reads the catalogue
        only, so a writer can ask right after its commit without rebuilding a snapshot."""
        return self.records(db.ids_for_paths(self._conn(), [os.fspath(p) for p in paths]), skip_missing=True)

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
        *,
        skip_existing: bool = False,
    ) -> list[int]:
        """Add ``n`` images atomically and return their new ids (ascending, never reused).

        Args:
            paths: n unique image paths, none already live (check with :meth:`contains_paths`)
                unless ``skip_existing``.
            identities: n identity labels (the instance each image shows).
            global_desc: (n, D) float32, L2-normalised rows.
            local_desc: (n, L, Dl) float16 or float32 (stored as float16, or as int8 with
                per-descriptor scales when the index was created with ``local_dtype="int8"``;
                values must fit float16 either way).
            attrs: optional n JSON-serialisable dicts stored with each image.
            verification: optional keypoints of the n images for geometric verification,
                written into the same segment (so committed atomically with it).
            skip_existing: leave out the images whose path is already live, checked under
                the write lock (so a concurrent writer adding some of the same paths cannot
                make this call fail); the ids returned are then those of the others only.
                :meth:`add_new` also says which paths were left out.

        Raises:
            ValueError: wrong shapes/dtypes, non-finite or unnormalised values, duplicate
                paths, or (without ``skip_existing``) paths already in the index.
            StorageFullError: the disk filled up while writing; nothing was added.
            IndexBusyError: another writer held the lock longer than :attr:`lock_timeout`.
        """
        return self._add(paths, identities, global_desc, local_desc, attrs, verification, skip_existing).ids

    def add_new(
        self,
        paths: Sequence[str],
        identities: Sequence[str],
        global_desc: np.ndarray,
        local_desc: np.ndarray,
        attrs: Sequence[Mapping[str, Any]] | None = None,
        verification: RaggedKeypoints | None = None,
    ) -> AddResult:
        """:meth:`add` with ``skip_existing=True``: the ids of the images added, and the paths
        left out because they were already live when the write lock was taken."""
        return self._add(paths, identities, global_desc, local_desc, attrs, verification, True)

    def _add(
        self,
        paths: Sequence[str],
        identities: Sequence[str],
        global_desc: np.ndarray,
        local_desc: np.ndarray,
        attrs: Sequence[Mapping[str, Any]] | None,
        verification: RaggedKeypoints | None,
        skip_existing: bool,
    ) -> AddResult:
        batch = validate_add(paths, identities, global_desc, local_desc, attrs, self._global_dim, self._local_shape)
        check_keypoint_batch(verification, len(batch))
        if len(batch) == 0:
            return AddResult([], [])
        with self._writing("nothing was added") as conn:
            self._clean_orphans(conn)
            taken = db.existing(conn, "path", batch.paths)
            skipped = [p for p in batch.paths if p in taken]
            if taken:
                if not skip_existing:
                    raise ValueError(f"paths already in the index: {describe_keys(sorted(taken))}")
                keep = [i for i, p in enumerate(batch.paths) if p not in taken]
                if not keep:
                    return AddResult([], skipped)
                batch = batch.subset(keep)
                local_desc = np.asarray(local_desc)[keep]
                if verification is not None:
                    verification = gather_keypoints([verification], np.zeros(len(keep), np.int64),
                                                    np.asarray(keep, np.int64))
            scale = None
            stored_local = batch.local_desc
            if self._options.local_dtype == "int8":  # quantise what the caller gave, not its float16 rounding
                stored_local, scale = quantize_int8(np.asarray(local_desc, dtype=np.float32))
            gv = KeypointSource.of(verification) if verification is not None else None
            info = write_segment(self._segments_dir, len(batch), self._global_dim, self._local_shape,
                                 [(batch.global_desc, stored_local, scale)], gv, local_dtype=self._options.local_dtype)
            try:
                ids = db.insert_images(conn, info, batch.paths, batch.identities, batch.attrs_json)
            except BaseException:
                self._clean_orphans(conn)  # deletes the new folder only if the commit did not happen
                raise
        return AddResult(ids, skipped)

    def remove(self, ids: Sequence[int] | np.ndarray) -> int:
        """Remove live images by id in one transaction; returns how many were removed.

        Raises :class:`UnknownIdError` (nothing removed) if any id is not live. Their
        descriptor rows stay on disk until :meth:`compact` or a merge (whole dead segments
        are freed now). :class:`StorageFullError` / :class:`IndexBusyError`: as :meth:`add`.
        """
        wanted = sorted({int(i) for i in np.asarray(ids, dtype=np.int64).reshape(-1)})
        return self._remove("id", wanted)

    def remove_paths(self, paths: Sequence[str]) -> int:
        """Like :meth:`remove`, by path; unknown paths raise :class:`UnknownIdError`."""
        return self._remove("path", sorted({os.fspath(p) for p in paths}))

    def _remove(self, column: str, keys: list[Any]) -> int:
        if not keys:
            return 0
        with self._writing("nothing was removed") as conn:
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
        "segments_after", "rows_reclaimed"}``. Snapshots taken before keep reading the old
        segments (see ``npy_files.py``). Needs free space for a copy of the live rows
        (:class:`StorageFullError` otherwise, the index unchanged).
        """
        with self._writing("the index is unchanged") as conn:
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

    def needs_merge(self) -> bool:
        """Whether :meth:`merge_small_segments` has work to do under :attr:`merge_policy`.
        Cheap (reads the catalogue's segment list, no lock, no image rows): call it after every add."""
        return bool(self.merge_policy.plan(db.segment_infos(self._conn())))

    def merge_small_segments(self, *, max_rounds: int | None = None) -> dict[str, Any]:
        """Merge small segments as :attr:`merge_policy` says, until it is met (or after
        ``max_rounds`` merges), and return what was done.

        Each merge is one round of :meth:`compact`'s protocol on a few segments: under the
        write lock (taken per round, so adds from other threads and processes interleave),
        write + fsync the new segment, re-point its rows in one transaction, then delete the
        merged folders. Ids and search results are unchanged; int8 locals are copied as
        stored; keypoints are carried; snapshots taken before keep reading the old segments.
        Safe to call from a background thread while other threads add and search.

        Returns ``{"merges", "segments_before", "segments_after", "segments_merged",
        "rows_rewritten", "rows_reclaimed", "seconds"}``. Raises :class:`StorageFullError`
        (that round undone, earlier rounds kept) and :class:`IndexBusyError` like :meth:`add`.
        """
        start = time.perf_counter()
        stats: dict[str, Any] = {"merges": 0, "segments_before": None, "segments_after": None,
                                 "segments_merged": 0, "rows_rewritten": 0, "rows_reclaimed": 0}
        while max_rounds is None or stats["merges"] < max_rounds:
            with self._writing("the index is unchanged") as conn:
                self._clean_orphans(conn)
                infos = db.segment_infos(conn)
                if stats["segments_before"] is None:
                    stats["segments_before"] = len(infos)
                chosen = self.merge_policy.plan(infos)
                if not chosen:
                    break
                live = db.live_rows(conn, chosen)
                try:
                    dropped = maintenance.rewrite_segments(conn, self._segments_dir, self._global_dim,
                                                           self._local_shape, self._segment, live,
                                                           self._options.local_dtype)
                except BaseException:
                    self._clean_orphans(conn)  # the new segment, unless its commit happened
                    raise
                remove_segment_dirs(self._segments_dir, dropped)  # only after the commit
            stats["merges"] += 1
            stats["segments_merged"] += len(chosen)
            stats["rows_rewritten"] += len(live.ids)
            stats["rows_reclaimed"] += sum(i.count for i in live.segment_infos) - len(live.ids)
        stats["segments_after"] = len(db.segment_infos(self._conn()))
        stats["seconds"] = round(time.perf_counter() - start, 4)
        return stats

    def writer_busy(self) -> bool:
        """Whether a writer (another process, thread or store object) holds the write lock now.
        A non-blocking probe: the answer may be stale a moment later."""
        return lock_is_held(self._lock_path)

    @contextmanager
    def _writing(self, outcome: str) -> Iterator[sqlite3.Connection]:
        """Hold the write lock (waiting up to :attr:`lock_timeout`, else
        :class:`IndexBusyError`) around a write, whose failures for lack of space become
        :class:`StorageFullError` saying ``outcome`` (the caller undoes the write before
        re-raising), and whose failures for lack of descriptors or memory become
        :class:`IndexResourceError`. Yields this thread's connection."""
        conn = self._conn()
        with storage_guard(self._root, outcome):
            try:
                with ExitStack() as held:
                    try:
                        held.enter_context(file_lock(self._lock_path, timeout=self.lock_timeout,
                                                     on_wait=self.on_lock_wait))
                    except LockTimeout as e:
                        raise IndexBusyError(self._busy_message(e)) from None
                    yield conn
            except OSError as e:
                if is_resource_error(e) and not isinstance(e, IndexResourceError):
                    raise resource_error(e, str(self._root), "writing") from e
                raise

    def _busy_message(self, timeout: LockTimeout) -> str:
        others = [pid for pid in timeout.holders if pid != os.getpid()]
        if timeout.holders and not others:
            who = f"another thread or store object of this process (pid {os.getpid()})"
        else:
            who = f"another process (pid {', '.join(map(str, others)) if others else 'unknown'})"
        return f"the index at {self._root} is being written by {who}; retried for {timeout.waited:.1f} s"

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
