"""Give freed memory back to the operating system after big requests.

glibc's malloc keeps freed memory for reuse: after the first large free it raises its mmap
threshold (up to 32 MB on 64-bit), so later image-sized buffers come from the heap and stay
there once freed. A server that decoded one 40-megapixel upload would keep that memory for
good (an outside test saw 1.16 GB grow to 3.9 GB and stay). Pinning the threshold makes every
buffer above it a private mapping that ``free`` unmaps at once; ``malloc_trim`` returns what
the heap still holds at its top. Both are no-ops where glibc is not the allocator.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

__all__ = ["limit_heap_hoarding", "trim_heap"]

log = logging.getLogger("waldo.serve")

_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter numbers (malloc.h)
#: Allocations above this many bytes are mapped and unmapped on their own.
MMAP_THRESHOLD = 256 * 1024


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


_LIBC = _libc()


def limit_heap_hoarding() -> bool:
    """Pin glibc's mmap threshold (no dynamic growth); True when it took effect."""
    if _LIBC is None:
        return False
    done = bool(_LIBC.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    if not done:
        log.warning("could not pin malloc's mmap threshold; freed image memory may stay with the process")
    return done


def trim_heap() -> None:
    """Return free memory at the top of malloc's heaps to the system (cheap when none)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
