"""The SQLite catalogue: which segments are live and which image lives in which row.

SQLite is the index's commit point. A write is visible (and durable) exactly when its
transaction commits; WAL mode gives readers a consistent view while a writer works, and
``synchronous=FULL`` makes the commit itself survive power loss. Every write transaction
bumps ``meta.generation`` so readers can tell "anything changed?" with one cheap query.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Collection, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from waldo.index.errors import IndexCorruptError, UnknownIdError, describe_keys, is_resource_error, resource_error
from waldo.index.segments import SegmentInfo

# Columns added later without a version bump are optional and nullable (``local_scale_*``,
# for int8 local descriptors): older Waldo versions name their columns explicitly, so they
# read and write a newer float16 catalogue unchanged, and this version reads an older
# catalogue as if those columns were NULL/0. An int8 index is kept away from older versions
# by its manifest's format_version instead.
SCHEMA_VERSION = 1
# Stay well below SQLite's limit on bound parameters per statement.
_CHUNK = 500

_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE segments (
    name TEXT PRIMARY KEY,
    count INTEGER NOT NULL CHECK (count > 0),
    global_sha256 TEXT NOT NULL,
    local_sha256 TEXT NOT NULL,
    global_bytes INTEGER NOT NULL,
    local_bytes INTEGER NOT NULL,
    created_at REAL NOT NULL,
    local_scale_sha256 TEXT,                        -- int8 local descriptors only
    local_scale_bytes INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE images (
    id INTEGER PRIMARY KEY AUTOINCREMENT,  -- AUTOINCREMENT: ids of removed images are never reused
    segment TEXT NOT NULL REFERENCES segments(name),
    row INTEGER NOT NULL CHECK (row >= 0),
    path TEXT NOT NULL UNIQUE,             -- rows are deleted on remove, so unique among live images
    identity TEXT NOT NULL,
    added_at REAL NOT NULL,
    attrs TEXT NOT NULL DEFAULT '{}',
    UNIQUE (segment, row)
);
CREATE INDEX images_identity ON images(identity);
"""

T = TypeVar("T")


@dataclass(frozen=True)
class IndexedImage:
    """One live image's metadata. ``added_at`` is Unix time in seconds."""

    id: int
    path: str
    identity: str
    added_at: float
    attrs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class LiveRows:
    """All live images in id order: ``ids`` (n,) int64, ``segments`` (n,) int32 positions in
    ``segment_infos``, ``rows`` (n,) int64 row inside that segment, plus paths/identities."""

    generation: int
    segment_infos: list[SegmentInfo]
    ids: np.ndarray
    segments: np.ndarray
    rows: np.ndarray
    paths: list[str]
    identities: list[str]


def chunks(items: Sequence[T], size: int = _CHUNK) -> Iterator[Sequence[T]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def connect(path: Path) -> sqlite3.Connection:
    """A connection in autocommit mode (transactions are explicit) with durable settings."""
    conn = sqlite3.connect(str(path), timeout=60.0, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA busy_timeout = 60000")
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("PRAGMA foreign_keys = ON")
    return conn


class ThreadConnections:
    """One connection per thread (and per process: a connection must not cross a fork).

    sqlite3 connections must not be used by two threads at once; keeping one per thread
    lets readers in many threads query concurrently, and ``close_all`` can still close them.
    A server's worker threads come and go (anyio retires idle ones), so the connections of
    threads that have ended are closed when the next connection is opened: otherwise each
    retired thread would leave its connection's files open for the life of the process.
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        self._local = threading.local()
        self._all: list[tuple[int, threading.Thread, sqlite3.Connection]] = []
        self._lock = threading.Lock()

    def get(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        pid = os.getpid()
        if conn is None or self._local.pid != pid:
            conn = connect(self._path)
            self._local.conn, self._local.pid = conn, pid
            with self._lock:
                # A parent's connections are forgotten, never closed here: closing SQLite state
                # inherited across a fork could checkpoint or unlink the parent's WAL.
                ended = [c for p, t, c in self._all if p == pid and not t.is_alive()]
                self._all = [(p, t, c) for p, t, c in self._all if p == pid and t.is_alive()]
                self._all.append((pid, threading.current_thread(), conn))
            for old in ended:  # no thread can use them any more (their thread-locals died with it)
                old.close()
        return conn

    def open_count(self) -> int:
        """Connections held (for tests and diagnostics)."""
        with self._lock:
            return len(self._all)

    def close_all(self) -> None:
        with self._lock:
            conns, self._all = self._all, []
            self._local = threading.local()
        for pid, _, c in conns:
            if pid == os.getpid():
                c.close()


def init_schema(conn: sqlite3.Connection) -> None:
    """Create the tables in a fresh database and switch it (persistently) to WAL mode."""
    mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    if str(mode).lower() != "wal":
        raise OSError(f"SQLite refused WAL mode (got {mode!r}); is the index on a network filesystem?")
    # One script, one transaction: a crash here leaves no half-created schema. (executescript
    # would COMMIT any open transaction first, so it cannot run inside write_txn.)
    conn.executescript(
        "BEGIN IMMEDIATE;" + _SCHEMA
        + f"INSERT INTO meta(key, value) VALUES ('generation', 0), ('schema_version', {SCHEMA_VERSION}); COMMIT;"
    )


@contextmanager
def write_txn(conn: sqlite3.Connection) -> Iterator[None]:
    """``BEGIN IMMEDIATE`` ... bump generation ... ``COMMIT``; rolled back on any error."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        conn.execute("UPDATE meta SET value = value + 1 WHERE key = 'generation'")
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


@contextmanager
def read_txn(conn: sqlite3.Connection) -> Iterator[None]:
    """A read transaction: every SELECT inside sees the same committed state (WAL snapshot)."""
    conn.execute("BEGIN")
    try:
        yield
    finally:
        if conn.in_transaction:
            conn.execute("COMMIT")


def check_catalogue(conns: ThreadConnections, where: Path) -> None:
    """Raise :class:`IndexCorruptError` unless ``where`` is a readable catalogue we understand
    (:class:`IndexResourceError` when it could not even be opened for lack of file descriptors
    or memory: SQLite says only "unable to open database file" then)."""
    try:
        conn = conns.get()  # connecting already fails on a file that is not SQLite
        generation(conn)
        row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    except sqlite3.DatabaseError as e:
        if isinstance(e, sqlite3.OperationalError):
            raise_if_out_of_resources(where)
        raise IndexCorruptError(f"{where} is not a readable index catalogue: {e}") from None
    if row is None or not 1 <= int(row[0]) <= SCHEMA_VERSION:
        raise IndexCorruptError(f"{where}: unsupported catalogue schema version {row[0] if row else None}")


def raise_if_out_of_resources(where: Path) -> None:
    """SQLite reports a failed open(2) without its errno: repeat its opens ourselves (the
    database, its -wal and its -shm: three descriptors, plus one to spare), and raise
    :class:`IndexResourceError` if the process is out of descriptors or memory."""
    fds: list[int] = []
    try:
        for _ in range(4):
            fds.append(os.open(where, os.O_RDONLY))
    except OSError as e:
        if is_resource_error(e):
            raise resource_error(e, str(where)) from None
    finally:
        for fd in fds:
            os.close(fd)


def generation(conn: sqlite3.Connection) -> int:
    row = conn.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()
    if row is None:
        raise sqlite3.DatabaseError("meta.generation is missing")
    return int(row[0])


def has_scale_columns(conn: sqlite3.Connection) -> bool:
    """Whether the catalogue has the ``local_scale_*`` columns (created by this version or later)."""
    return any(r[1] == "local_scale_sha256" for r in conn.execute("PRAGMA table_info(segments)"))


def segment_infos(conn: sqlite3.Connection) -> list[SegmentInfo]:
    extra = ", local_scale_sha256, local_scale_bytes" if has_scale_columns(conn) else ""
    cur = conn.execute(
        f"SELECT name, count, global_sha256, local_sha256, global_bytes, local_bytes{extra} FROM segments ORDER BY name"
    )
    return [SegmentInfo(*r) for r in cur]


def insert_segment(conn: sqlite3.Connection, info: SegmentInfo, created_at: float) -> None:
    values = [info.name, info.count, info.global_sha256, info.local_sha256, info.global_bytes, info.local_bytes,
              created_at]
    columns = "name, count, global_sha256, local_sha256, global_bytes, local_bytes, created_at"
    if info.local_scale_sha256 is not None:
        if not has_scale_columns(conn):
            raise IndexCorruptError("this index's catalogue predates int8 local descriptors; it cannot record "
                                    "local_scale.npy (the manifest and catalogue disagree)")
        columns += ", local_scale_sha256, local_scale_bytes"
        values += [info.local_scale_sha256, info.local_scale_bytes]
    conn.execute(f"INSERT INTO segments({columns}) VALUES ({', '.join('?' * len(values))})", values)


def next_ids(conn: sqlite3.Connection, n: int) -> list[int]:
    """The next ``n`` ids AUTOINCREMENT would hand out (call inside a write transaction).

    Explicit ids let one ``executemany`` insert a whole batch and still return every id;
    AUTOINCREMENT then advances its counter past them, so removed ids are never reused.
    """
    row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'images'").fetchone()
    top = conn.execute("SELECT COALESCE(MAX(id), 0) FROM images").fetchone()[0]
    start = max(int(row[0]) if row else 0, int(top)) + 1
    return list(range(start, start + n))


def live_rows(conn: sqlite3.Connection, segments: Collection[str] | None = None) -> LiveRows:
    """Generation, segments and every live image, read in one consistent transaction; with
    ``segments``, only those segments and the images they hold (what a merge rewrites)."""
    with read_txn(conn):
        gen = generation(conn)
        infos = segment_infos(conn)
        if segments is None:
            data = conn.execute("SELECT id, segment, row, path, identity FROM images ORDER BY id").fetchall()
        else:
            wanted = set(segments)
            infos = [info for info in infos if info.name in wanted]
            data = []
            for part in chunks(sorted(wanted)):
                data += conn.execute("SELECT id, segment, row, path, identity FROM images WHERE segment IN "
                                     f"({','.join('?' * len(part))})", part).fetchall()
            data.sort(key=lambda r: r[0])
    pos = {info.name: i for i, info in enumerate(infos)}
    n = len(data)
    ids = np.fromiter((r[0] for r in data), dtype=np.int64, count=n)
    segs = np.fromiter((pos[r[1]] for r in data), dtype=np.int32, count=n)
    rows = np.fromiter((r[2] for r in data), dtype=np.int64, count=n)
    return LiveRows(gen, infos, ids, segs, rows, [r[3] for r in data], [r[4] for r in data])


def existing(conn: sqlite3.Connection, column: str, values: Sequence[Any]) -> set[Any]:
    """The subset of ``values`` present in ``images.<column>`` (``id`` or ``path``)."""
    if column not in ("id", "path"):
        raise ValueError(f"unsupported column {column!r}")
    found: set[Any] = set()
    for part in chunks(list(values)):
        marks = ",".join("?" * len(part))
        found.update(r[0] for r in conn.execute(f"SELECT {column} FROM images WHERE {column} IN ({marks})", part))
    return found


def ids_for_paths(conn: sqlite3.Connection, paths: Sequence[str]) -> list[int]:
    """Ids of the live images with these paths (unknown paths are skipped)."""
    out: list[int] = []
    for part in chunks(list(paths)):
        out += [r[0] for r in conn.execute(f"SELECT id FROM images WHERE path IN ({','.join('?' * len(part))})", part)]
    return out


def fetch_records(conn: sqlite3.Connection, ids: Iterable[int] | None) -> dict[int, IndexedImage]:
    """Records by id (all live images when ``ids`` is None); unknown ids are simply absent."""
    sql = "SELECT id, path, identity, added_at, attrs FROM images"
    if ids is None:
        rows = conn.execute(sql + " ORDER BY id").fetchall()
    else:
        rows = []
        with read_txn(conn):
            for part in chunks(sorted(set(ids))):
                rows += conn.execute(sql + f" WHERE id IN ({','.join('?' * len(part))})", part).fetchall()
    return {r[0]: IndexedImage(r[0], r[1], r[2], float(r[3]), json.loads(r[4])) for r in rows}


def insert_images(
    conn: sqlite3.Connection,
    info: SegmentInfo,
    paths: Sequence[str],
    identities: Sequence[str],
    attrs_json: Sequence[str],
) -> list[int]:
    """Commit a written segment and its images (row i = image i) in one transaction; new ids."""
    n, now = len(paths), time.time()
    with write_txn(conn):
        insert_segment(conn, info, now)
        ids = next_ids(conn, n)
        conn.executemany(
            "INSERT INTO images(id, segment, row, path, identity, added_at, attrs) VALUES (?,?,?,?,?,?,?)",
            zip(ids, [info.name] * n, range(n), paths, identities, [now] * n, attrs_json),
        )
    return ids


def remove_images(conn: sqlite3.Connection, column: str, keys: Sequence[Any]) -> tuple[int, list[str]]:
    """Delete images by ``id`` or ``path`` in one transaction, all or nothing.

    Returns (number removed, names of segments left without live rows, whose folders the
    caller deletes after this commit). Raises :class:`UnknownIdError` if any key is not live.
    """
    with write_txn(conn):
        present = existing(conn, column, keys)
        missing = [k for k in keys if k not in present]
        if missing:
            raise UnknownIdError(f"{column}s not in the index: {describe_keys(missing)}", missing)
        ids = ids_for_paths(conn, keys) if column == "path" else list(keys)
        removed = delete_ids(conn, ids)
        return removed, drop_empty_segments(conn)


def records(conn: sqlite3.Connection, ids: list[int] | None, skip_missing: bool = False) -> list[IndexedImage]:
    """Records of ``ids`` in that order (all, by id, when None). Unknown ids raise
    :class:`UnknownIdError`, or are left out when ``skip_missing``."""
    if ids is None:
        return list(fetch_records(conn, None).values())
    found = fetch_records(conn, ids)
    missing = [i for i in ids if i not in found]
    if missing and skip_missing:
        return [found[i] for i in ids if i in found]
    if missing:
        raise UnknownIdError(f"ids not in the index: {describe_keys(missing)}", missing)
    return [found[i] for i in ids]


def delete_ids(conn: sqlite3.Connection, ids: Sequence[int]) -> int:
    """Delete image rows (inside a write transaction); returns the number deleted."""
    removed = 0
    for part in chunks(list(ids)):
        removed += conn.execute(f"DELETE FROM images WHERE id IN ({','.join('?' * len(part))})", part).rowcount
    return removed


def drop_empty_segments(conn: sqlite3.Connection) -> list[str]:
    """Delete segment rows no live image refers to; returns their names (folders to delete)."""
    names = [
        r[0]
        for r in conn.execute("SELECT name FROM segments WHERE name NOT IN (SELECT DISTINCT segment FROM images)")
    ]
    for part in chunks(names):
        conn.execute(f"DELETE FROM segments WHERE name IN ({','.join('?' * len(part))})", part)
    return names


def dangling_images(conn: sqlite3.Connection) -> int:
    """Images whose (segment, row) points outside a recorded segment (should be 0)."""
    return int(
        conn.execute(
            "SELECT COUNT(*) FROM images i LEFT JOIN segments s ON s.name = i.segment"
            " WHERE s.name IS NULL OR i.row >= s.count"
        ).fetchone()[0]
    )
