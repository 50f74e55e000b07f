"""Durable files: atomic writes, fsyncs, exclusive locks and file hashes, for every package.

A reader (or a process that crashed mid-write and restarts) must see the old file or the new
one, never half of one: write a temporary sibling, fsync it, rename it over the target, fsync
the folder so the rename itself survives a power loss. The index relies on the same order for
its segments: contents and directory entries reach the disk *before* the SQLite commit that
makes them live.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

__all__ = ["LockTimeout", "atomic_write_bytes", "atomic_write_json", "atomic_write_text", "file_lock", "fsync_dir",
           "fsync_file", "lock_holders", "lock_is_held", "recover_dir", "sha256_file", "write_dir_atomically"]

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


def atomic_write_bytes(path: str | Path, payload: bytes) -> Path:
    """Write ``payload`` to ``path`` so readers see the old file or the new, never half.

    Written to a temporary sibling ``.<name>.<random>.tmp`` (the pattern the uploads cleaner
    deletes), fsynced, ``os.replace``-d over ``path`` (atomic on POSIX), and the folder fsynced.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(payload)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, data: Any) -> Path:
    """``data`` as indented, key-sorted JSON; NaN and infinities are refused (not valid JSON)."""
    return atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True, allow_nan=False) + "\n")


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in chunks (local descriptor files can be gigabytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


class LockTimeout(TimeoutError):
    """:func:`file_lock` gave up: another holder kept the lock for ``waited`` seconds.
    ``holders``: their pids when the kernel says (Linux ``/proc/locks``), else empty."""

    def __init__(self, path: Path, waited: float, holders: list[int]) -> None:
        who = f"pid {', '.join(map(str, holders))}" if holders else "pid unknown"
        super().__init__(f"{path} is locked by another holder ({who}); retried for {waited:.1f} s")
        self.path, self.waited, self.holders = path, waited, holders


_POLL_FIRST, _POLL_MAX = 0.002, 0.05  # seconds between non-blocking attempts: quick at first, then gentle


@contextlib.contextmanager
def file_lock(path: Path, timeout: float | None = None, on_wait: Callable[[], None] | None = None,
              notice_after: float = 1.0) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if missing).

    ``timeout``: None waits until the lock is free; a number of seconds polls with
    ``LOCK_NB`` until then and raises :class:`LockTimeout` (0: one attempt). ``on_wait``: called
    once if the lock is still taken after ``notice_after`` seconds (say "waiting for ..." to a
    person), then the wait goes on.

    flock locks belong to the open file description and every call opens its own, so two
    holders in one process (threads, or two ``IndexStore`` objects) exclude each other exactly
    as two processes do; and the kernel drops the lock when its holder dies, so a SIGKILLed
    writer never wedges the next one.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        _acquire(fd, path, timeout, on_wait, notice_after)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _try_lock(fd: int, mode: int = fcntl.LOCK_EX) -> bool:
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _acquire(fd: int, path: Path, timeout: float | None, on_wait: Callable[[], None] | None,
             notice_after: float) -> None:
    if timeout is None and on_wait is None:
        fcntl.flock(fd, fcntl.LOCK_EX)
        return
    if _try_lock(fd):
        return
    start = time.monotonic()
    delay = _POLL_FIRST
    noticed = on_wait is None
    while True:
        waited = time.monotonic() - start
        if not noticed and waited >= notice_after:
            on_wait()  # type: ignore[misc]  # noticed is False only when on_wait is set
            noticed = True
        if timeout is None and noticed:
            fcntl.flock(fd, fcntl.LOCK_EX)  # told the person; now simply wait
            return
        if timeout is not None and waited >= timeout:
            raise LockTimeout(path, waited, lock_holders(path))
        deadlines = [d for d in (timeout, None if noticed else notice_after) if d is not None]
        time.sleep(max(0.0, min(delay, min(deadlines) - waited)))
        if _try_lock(fd):
            return
        delay = min(2 * delay, _POLL_MAX)


def lock_is_held(path: Path) -> bool:
    """Whether someone holds ``path``'s :func:`file_lock` right now (a non-blocking probe
    that takes a shared lock for an instant, so probes never exclude each other)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False  # never locked: file_lock creates the file
    try:
        return not _try_lock(fd, fcntl.LOCK_SH)
    finally:
        os.close(fd)


def lock_holders(path: Path) -> list[int]:
    """Pids holding a flock on ``path`` according to Linux ``/proc/locks`` (best effort: empty
    elsewhere, or when the holder is in another pid namespace)."""
    try:
        st = os.stat(path)
        key = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
        with open("/proc/locks", encoding="ascii", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    pids = []
    for line in lines:
        fields = line.split()
        # "1: FLOCK  ADVISORY  WRITE 1234 fd:01:5678 0 EOF"; waiters read "1: -> FLOCK ...".
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == key and fields[4].isdigit():
            pids.append(int(fields[4]))
    return sorted(set(pids))


# Folders: a checkpoint or resume state is several files that must change together.
def _side_paths(target: Path) -> tuple[Path, Path]:
    return target.parent / f".{target.name}.tmp", target.parent / f".{target.name}.old"


def recover_dir(target: str | Path) -> Path:
    """Finish or undo an interrupted :func:`write_dir_atomically`: if ``target`` is missing but
    its previous version was parked, put it back; drop a half-written staging folder."""
    target = Path(target)
    staging, old = _side_paths(target)
    if not target.exists() and old.exists():
        os.replace(old, target)
    shutil.rmtree(staging, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)
    return target


def write_dir_atomically(target: str | Path, writer: Callable[[Path], None]) -> Path:
    """Fill a staging folder with ``writer(folder)``, then swap it in for ``target``.

    POSIX cannot rename over a non-empty folder, so the old one is parked first; the window in
    which ``target`` is missing is two renames wide, and :func:`recover_dir` repairs it.
    """
    target = Path(target)
    recover_dir(target)
    staging, old = _side_paths(target)
    staging.mkdir(parents=True)
    writer(staging)
    if target.exists():
        os.replace(target, old)
    os.replace(staging, target)
    shutil.rmtree(old, ignore_errors=True)
    return target
