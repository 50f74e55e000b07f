"""Large CPU buffers reused between batches instead of mapped afresh (glibc only).

glibc serves an allocation above its mmap threshold (which adapts by itself up to 32 MiB) with a
fresh ``mmap`` and gives it back with ``munmap`` on free. An eager forward pass at batch 32 and
288 px allocates activations of tens of MiB, so every batch faulted its buffers in again page by
page: on 2 cores an eager extraction spent as much time in the kernel as in the model, and ran
1.9x faster inside :func:`reuse_large_buffers` with the same descriptors (benchmarks/eager_memory.py,
docs/performance.md "Eager passes on CPU"). Inside it, large blocks come from the heap and
stay there from one batch to the next; on leaving, the thresholds go to the ceiling glibc's own
adaptation reaches (mmap 32 MiB, trim 64 MiB) and the heap is trimmed, so the memory goes back.

Only eager PyTorch passes use it: ONNX Runtime keeps its own arena and runs *slower* with the
raised thresholds in force from before its session exists, and as fast as untouched after an
eager pass left them at the ceiling (the same benchmark). Elsewhere than glibc (macOS, musl) it
does nothing; ``WALDO_MALLOC_TUNING=0`` turns it off.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import threading
from collections.abc import Iterator

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
#: Inside the context: no allocation is mapped on its own, nothing is trimmed.
RAISED = 1 << 30
#: On leaving: where glibc's adaptive thresholds end up after large frees (DEFAULT_MMAP_THRESHOLD_MAX
#: on 64-bit systems; trim twice that), so a process leaves as it would have adapted anyway.
CEILING_MMAP, CEILING_TRIM = 32 << 20, 64 << 20

_lock = threading.Lock()
_depth = 0
_libc: ctypes.CDLL | None | bool = False  # False: not looked up yet


def _glibc() -> ctypes.CDLL | None:
    global _libc
    if _libc is False:
        _libc = None
        if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
            try:
                _libc = ctypes.CDLL("libc.so.6")
            except OSError:
                _libc = None
    return _libc


def tuning_available() -> bool:
    """Whether :func:`reuse_large_buffers` changes anything here (glibc, not turned off)."""
    return os.environ.get("WALDO_MALLOC_TUNING", "1") != "0" and _glibc() is not None


@contextlib.contextmanager
def reuse_large_buffers() -> Iterator[bool]:
    """Keep large allocations in the heap while inside (module doc); yields whether it is in
    effect. Nested and concurrent uses share one setting: the last to leave restores it."""
    global _depth
    libc = _glibc() if tuning_available() else None
    if libc is None:
        yield False
        return
    with _lock:
        _depth += 1
        if _depth == 1:
            libc.mallopt(_M_MMAP_THRESHOLD, RAISED)
            libc.mallopt(_M_TRIM_THRESHOLD, RAISED)
    try:
        yield True
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                libc.mallopt(_M_MMAP_THRESHOLD, CEILING_MMAP)
                libc.mallopt(_M_TRIM_THRESHOLD, CEILING_TRIM)
                libc.malloc_trim(0)


def runs_eager(runner: object, model: object) -> bool:
    """Whether ``runner`` (what an extraction loop calls) runs eager PyTorch from now on: the
    model itself, or an ONNX wrapper that fell back to eager (no cached export, a failure)."""
    return runner is model or runner is None or bool(getattr(runner, "fell_back", False))


class BuffersWhileEager(contextlib.ExitStack):
    """A batch loop's :func:`reuse_large_buffers`: call :meth:`before_batch` before each batch; from
    the first batch ``runner`` runs eager (:func:`runs_eager`; a cached-only ONNX wrapper says so
    after its first batch) until the ``with`` block ends, large buffers stay in the heap."""

    def __init__(self, runner: object, model: object = None) -> None:
        super().__init__()
        self.runner, self.model, self.active = runner, model, False

    def before_batch(self) -> None:
        if not self.active and runs_eager(self.runner, self.model):
            self.enter_context(reuse_large_buffers())
            self.active = True
