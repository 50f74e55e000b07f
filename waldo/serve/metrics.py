"""Service counters for ``GET /stats``: query latencies per reranker, counts, resident memory.

Kept apart from the routes so the numbers a load test reports from the client side can be
cross-checked against what the server itself measured.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from pathlib import Path

import numpy as np

__all__ = ["ServiceMetrics", "process_memory_bytes", "resident_memory_bytes"]


class ServiceMetrics:
    """Thread-safe counters; latencies keep the last ``window`` queries of each rerank mode."""

    def __init__(self, window: int = 2000) -> None:
        self._lock = threading.Lock()
        self._window = window
        self._latency_ms: dict[str, deque[float]] = {}
        self.started_at = time.time()
        self.queries = 0
        self.adds = 0
        self.removes = 0
        self.rejected = 0

    def record_query(self, rerank: str, total_ms: float) -> None:
        with self._lock:
            self.queries += 1
            self._latency_ms.setdefault(rerank, deque(maxlen=self._window)).append(total_ms)

    def record_add(self, count: int) -> None:
        with self._lock:
            self.adds += count

    def record_remove(self) -> None:
        with self._lock:
            self.removes += 1

    def record_rejected(self) -> None:
        """A client error (4xx) caused by the request's content, e.g. a corrupt upload."""
        with self._lock:
            self.rejected += 1

    def snapshot(self) -> dict:
        """Counts plus p50/p95 server-side query time (ms) per rerank mode."""
        with self._lock:
            latencies = {mode: list(values) for mode, values in self._latency_ms.items()}
            counts = {"queries": self.queries, "adds": self.adds, "removes": self.removes,
                      "rejected": self.rejected}
        summary = {}
        for mode, values in latencies.items():
            array = np.asarray(values, dtype=np.float64)
            summary[mode] = {"n": int(array.size), "p50_ms": round(float(np.percentile(array, 50)), 2),
                             "p95_ms": round(float(np.percentile(array, 95)), 2)}
        return {**counts, "uptime_s": round(time.time() - self.started_at, 1), "query_latency": summary}


def process_memory_bytes(field: str, pid: int | str = "self") -> int | None:
    """A memory figure of a process from Linux ``/proc/<pid>/status`` (``VmRSS``: resident now,
    ``VmHWM``: peak resident), or None where unknown."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text(encoding="ascii").splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def resident_memory_bytes() -> int:
    """This process's resident set size now (Linux ``VmRSS``), or its peak where that is unknown."""
    rss = process_memory_bytes("VmRSS")
    if rss is not None:
        return rss
    import resource  # not on Windows; only reached off Linux

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
