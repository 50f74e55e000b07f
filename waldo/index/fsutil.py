"""Small durability helpers: fsync, atomic JSON writes, hashing, and the writer lock.

The index promises that a crash (even SIGKILL or power loss) leaves the previous state
usable. That only holds if file contents and directory entries reach the disk *before* the
SQLite commit that makes them live, hence the explicit fsyncs here.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import threading
from pathlib import Path
from types import TracebackType
from typing import Any

_HASH_CHUNK = 1 << 22  # 4 MiB: large enough to be fast, small enough to not matter for RAM


def fsync_file(path: Path) -> None:
    """Flush a file's data and size to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Flush a directory's entries, so a newly created or renamed child survives a crash."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_json(path: Path, data: Any) -> None:
    """Write ``data`` as JSON to ``path`` so readers see the old file or the new, never half.

    Written to a temporary sibling, fsynced, then ``os.replace``-d over ``path`` (atomic on
    POSIX), and the directory fsynced so the rename itself is durable.
    """
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, sort_keys=True, allow_nan=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks (local descriptor files can be gigabytes)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


class WriterLock:
    """Serialises writers: a ``threading.Lock`` in-process and an ``flock`` across processes.

    ``flock`` (not ``fcntl``/``lockf`` record locks) because flock locks belong to the open
    file description: two ``IndexStore`` objects in one process still exclude each other, and
    the kernel drops the lock when a writer dies, so a SIGKILLed writer never wedges the index.
    The thread lock is still needed so that threads of one store do not race on ``_fd``.
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        self._thread_lock = threading.Lock()
        self._fd: int | None = None

    def __enter__(self) -> WriterLock:
        self._thread_lock.acquire()
        try:
            fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except BaseException:
                os.close(fd)
                raise
            self._fd = fd
        except BaseException:
            self._thread_lock.release()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        fd, self._fd = self._fd, None
        try:
            if fd is not None:
                fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)
        finally:
            self._thread_lock.release()
