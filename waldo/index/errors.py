"""Exceptions raised by the persistent index.

They subclass ``ValueError`` (and ``KeyError`` for unknown ids) so that callers that only
catch the built-in families still catch them, while callers that care can tell a damaged
index from one built by a different model. Failures of the machine rather than the index
(a full disk, too few file descriptors, a writer holding the lock) are ``OSError`` subclasses
instead, so that no caller mistakes them for damage.
"""

from __future__ import annotations

import errno
import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


class IndexCorruptError(ValueError):
    """The directory is missing, is not a Waldo index, or its files disagree with each other."""


class IndexMismatchError(ValueError):
    """The index was built with settings (model, transform, sizes) that differ from the caller's.

    ``differences`` maps each differing manifest key to ``(index_value, expected_value)``;
    ``index_value`` is ``None`` when the manifest lacks the key.
    """

    def __init__(self, message: str, differences: dict[str, tuple[Any, Any]]) -> None:
        super().__init__(message)
        self.differences = differences


class UnknownIdError(ValueError, KeyError):
    """One or more image ids (or paths) are not live in the index.

    A ``KeyError`` for ``store.get(id)``-style callers and a ``ValueError`` for bulk calls;
    ``missing`` lists every unknown key so the caller need not probe one by one.
    """

    def __init__(self, message: str, missing: list[Any]) -> None:
        super().__init__(message)
        self.missing = missing

    def __str__(self) -> str:
        # KeyError.__str__ would repr() the message and wrap it in quotes.
        return str(self.args[0]) if self.args else ""


def describe_keys(keys: list[Any], limit: int = 10) -> str:
    """A short, readable list for error messages: the first ``limit`` keys and a count."""
    shown = ", ".join(repr(k) for k in keys[:limit])
    more = len(keys) - limit
    return f"{shown} (and {more} more)" if more > 0 else shown


# Errnos of a write the filesystem could not hold: no space, over quota, file too large.
STORAGE_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
# Errnos of a process out of descriptors or memory: the index is fine, the process is not.
RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM})
_SQLITE_FULL = 13  # SQLite's primary result code behind "database or disk is full"


class StorageFullError(OSError):
    """A write to the index failed for lack of space (ENOSPC, EDQUOT or EFBIG; ``errno`` says
    which). The operation was undone: the index is exactly as it was before the call.

    ``path`` is the index folder. ``str()`` is the whole message (not ``[Errno 28] ...``).
    """

    def __init__(self, code: int, message: str, path: str | None = None) -> None:
        super().__init__(code, message)
        self.path = path

    def __str__(self) -> str:
        return str(self.strerror)


class IndexResourceError(OSError):
    """The process ran out of file descriptors (EMFILE, ENFILE) or memory (ENOMEM) while
    opening the index. Nothing is wrong with the index itself: never reported as corruption."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(code, message)

    def __str__(self) -> str:
        return str(self.strerror)


class IndexBusyError(TimeoutError):
    """Another writer held the index's write lock for longer than the caller's ``lock_timeout``;
    nothing was written. A ``TimeoutError`` (hence an ``OSError``): retrying later is the cure."""


def storage_full_errno(error: BaseException) -> int | None:
    """The errno if ``error`` means "the filesystem is full" (an OSError with one of
    :data:`STORAGE_FULL_ERRNOS`, or SQLite's "database or disk is full"), else None."""
    if isinstance(error, OSError) and error.errno in STORAGE_FULL_ERRNOS:
        return int(error.errno)
    if isinstance(error, sqlite3.OperationalError):
        code = getattr(error, "sqlite_errorcode", None)  # Python >= 3.11
        if (code is not None and code & 0xFF == _SQLITE_FULL) or "database or disk is full" in str(error):
            return errno.ENOSPC
    return None


def is_resource_error(error: BaseException) -> bool:
    """Whether ``error`` is the process running out of descriptors or memory (not damage)."""
    return isinstance(error, OSError) and error.errno in RESOURCE_ERRNOS


def resource_error(error: OSError, what: str, action: str = "opening") -> IndexResourceError:
    """The :class:`IndexResourceError` for a resource errno met while ``action`` (opening,
    writing) the index's file or folder ``what``."""
    if error.errno in (errno.EMFILE, errno.ENFILE):
        reason = ("the process ran out of file descriptors" if error.errno == errno.EMFILE
                  else "the system ran out of file descriptors")
        cure = "raise `ulimit -n` or compact with `waldo index compact`"
    else:
        reason, cure = "the process ran out of memory", "free memory or compact with `waldo index compact`"
    return IndexResourceError(int(error.errno or 0), f"{reason} while {action} the index ({what}: {error.strerror}): "
                                                     f"{cure}; the index itself is not damaged")


@contextmanager
def storage_guard(root: Any, outcome: str) -> Iterator[None]:
    """Turn "the filesystem is full" (see :func:`storage_full_errno`) raised inside the block
    into :class:`StorageFullError`. ``outcome`` says what the caller guarantees was undone,
    e.g. "nothing was added"; the caller is responsible for making that true."""
    try:
        yield
    except StorageFullError:
        raise
    except (OSError, sqlite3.OperationalError) as error:
        code = storage_full_errno(error)
        if code is None:
            raise
        raise StorageFullError(code, f"{os.strerror(code).lower()} while writing the index at {root}: {outcome}; "
                                     f"free space and retry", str(root)) from error
