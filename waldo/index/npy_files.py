"""The index's ``.npy`` files: written with ordinary ``write()`` calls, read into RAM when small.

Writing: never through a memory mapping. A page written through a mapping of a file whose
blocks are not allocated yet (``np.lib.format.open_memmap(mode="w+")`` makes a sparse file)
is allocated when the page is first touched; on a full filesystem that allocation fails and
the kernel kills the process with SIGBUS, with no exception to catch and no message. A
``write()`` that finds no space fails with ENOSPC instead, which the store turns into
:class:`~waldo.index.errors.StorageFullError` after undoing the write. :class:`NpyWriter`
streams rows in order (``compact`` copies huge segments chunk by chunk) and hashes the bytes
as they go, so nothing has to be read back to fill the catalogue's sha256.

Reading: a memory-mapped array keeps a file descriptor open for as long as it lives (Python's
``mmap`` duplicates the descriptor), so an index of thousands of small segments would need
thousands of descriptors. Files under :data:`MMAP_MIN_BYTES` are read into RAM (and closed);
bigger ones stay memory-mapped, so a large local array never has to fit in RAM and its pages
are shared through the page cache. Both are read-only, and both stay readable after the file
is deleted (a mapping keeps the deleted file's data alive), which is what lets a snapshot
outlive a ``compact`` or a merge that dropped its segments.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from types import TracebackType

import numpy as np

from waldo.index.errors import IndexCorruptError, is_resource_error, resource_error

# Files smaller than this are read into RAM instead of mapped (see the module docstring). The
# merge policy keeps small segments few, so what they cost in RAM stays bounded.
MMAP_MIN_BYTES = 4 << 20


def load_npy(path: Path) -> np.ndarray:
    """A read-only array from ``path``: read into RAM below :data:`MMAP_MIN_BYTES`, else
    memory-mapped. Raises what ``os.stat``/``np.load`` raise (FileNotFoundError, OSError,
    ValueError or EOFError for a damaged file)."""
    if os.stat(path).st_size < MMAP_MIN_BYTES:
        array = np.load(path, allow_pickle=False)
        array.flags.writeable = False
        return array
    return np.load(path, mmap_mode="r", allow_pickle=False)


def read_index_array(path: Path) -> np.ndarray:
    """A committed index file (a segment's array or keypoints) via :func:`load_npy`, with the
    index's error contract.

    Raises:
        FileNotFoundError: it is missing (the caller knows whether that is a race or damage).
        IndexResourceError: the process ran out of file descriptors or memory: not damage.
        IndexCorruptError: it exists but cannot be read as an array.
    """
    try:
        return load_npy(path)
    except FileNotFoundError:
        raise
    except OSError as e:
        if is_resource_error(e):
            raise resource_error(e, str(path)) from None
        raise IndexCorruptError(f"segment file {path} is unreadable: {e}") from None
    except (ValueError, EOFError) as e:
        raise IndexCorruptError(f"segment file {path} is unreadable: {e}") from None


class NpyWriter:
    """Write one new ``.npy`` file of a known ``shape`` and ``dtype`` by appending rows.

    Use as a context manager: :meth:`append` consecutive rows, then :meth:`finish` (checks
    that every row arrived, flushes, fsyncs and returns the sha256 and size). Leaving the
    block without ``finish`` closes the file unfinished: the caller deletes it. Every error,
    ENOSPC included, is an ordinary exception.
    """

    def __init__(self, path: Path, dtype: np.dtype | type, shape: tuple[int, ...]) -> None:
        self.path = path
        self.dtype = np.dtype(dtype)
        self.shape = tuple(int(s) for s in shape)
        self._rows = 0
        self._digest = hashlib.sha256()
        self._bytes = 0
        self._file = open(path, "xb")  # noqa: SIM115 - closed by finish() or __exit__
        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(
            header, {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": self.shape})
        self._write(header.getvalue())

    def __enter__(self) -> NpyWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        if not self._file.closed:
            try:
                self._file.close()
            except OSError:
                if kind is None:  # a failed flush is the error when nothing else failed
                    raise

    def _write(self, data: bytes | memoryview) -> None:
        self._file.write(data)
        self._digest.update(data)
        self._bytes += len(data)

    def append(self, rows: np.ndarray) -> None:
        """Write the next ``len(rows)`` rows (cast to the file's dtype like an array assignment)."""
        rows = np.ascontiguousarray(np.asarray(rows).astype(self.dtype, casting="same_kind", copy=False))
        if rows.shape[1:] != self.shape[1:] or self._rows + len(rows) > self.shape[0]:
            raise ValueError(f"{self.path.name}: rows of shape {rows.shape} do not fit the declared "
                             f"{self.shape} after {self._rows} rows")
        if rows.size:  # (memoryview cannot cast an empty array; there is nothing to write anyway)
            self._write(memoryview(rows).cast("B"))
        self._rows += len(rows)

    def finish(self) -> tuple[str, int]:
        """Flush, fsync and close; returns ``(sha256 hex, size in bytes)`` of the whole file."""
        if self._rows != self.shape[0]:
            raise ValueError(f"{self.path.name}: {self._rows} rows written, {self.shape[0]} declared")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        return self._digest.hexdigest(), self._bytes


def save_npy(path: Path, array: np.ndarray) -> tuple[str, int]:
    """Write a whole array as a new ``.npy`` file (fsynced); returns its sha256 and size."""
    with NpyWriter(path, array.dtype, array.shape) as writer:
        writer.append(array)
        return writer.finish()
