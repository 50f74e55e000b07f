"""Search latency: faiss IndexFlatIP (waldo.index.exact_knn) vs a plain numpy baseline.

Random unit vectors stand in for descriptors (exact search cost does not depend on the
values). Three timings, each the median over ``--repeats`` runs after one warm-up run:

* ``exact_knn``: the public function end to end, including building the IndexFlatIP (a copy
  of the gallery), which is what a one-off evaluation pays;
* ``faiss_prebuilt``: search only, on an index built once, which is what a persistent
  index's snapshot pays per query batch;
* ``numpy_knn``: matmul + argpartition, the baseline.

Prints one JSON object (and writes it to ``--out`` if given). ``agreement`` is the recall of
the numpy top-k against faiss' top-k (1.0 = identical neighbour sets).

    .venv/bin/python benchmarks/search_latency.py --n 100000 --queries 100 --dim 128 --k 100
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import faiss
import numpy as np


from waldo.index.knn import exact_knn, numpy_knn, search_flat_index


def unit_vectors(n: int, d: int, rng: np.random.Generator) -> np.ndarray:
    """(n, d) float32 rows with unit L2 norm."""
    x = rng.standard_normal((n, d), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


Result = tuple[np.ndarray, np.ndarray]


def time_it(fn: Callable[[], Result], repeats: int) -> tuple[list[float], Result]:
    """Wall times in ms of ``repeats`` calls after one untimed warm-up (BLAS/OpenMP spin-up)."""
    result = fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return times, result


def summary(times_ms: list[float], n_queries: int) -> dict[str, float | list[float]]:
    med = statistics.median(times_ms)
    return {
        "median_total_ms": round(med, 3),
        "median_ms_per_query": round(med / n_queries, 4),
        "min_total_ms": round(min(times_ms), 3),
        "runs_ms": [round(t, 3) for t in times_ms],
    }


def recall(found: np.ndarray, reference: np.ndarray) -> float:
    """Mean over queries of |found ∩ reference| / k, ignoring -1 padding."""
    hits = [len(set(f[f >= 0]) & set(r[r >= 0])) / max((r >= 0).sum(), 1) for f, r in zip(found, reference)]
    return float(np.mean(hits))


def main(argv: list[str] | None = None) -> dict[str, object]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=100_000, help="gallery size")
    ap.add_argument("--queries", type=int, default=100, help="number of queries")
    ap.add_argument("--dim", type=int, default=128, help="descriptor dimension")
    ap.add_argument("--k", type=int, default=100, help="neighbours per query")
    ap.add_argument("--repeats", type=int, default=7, help="timed runs per method (median reported); >= 5")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = ap.parse_args(argv)
    if args.repeats < 5:
        ap.error("--repeats must be >= 5 for a meaningful median")

    rng = np.random.default_rng(args.seed)
    gallery = unit_vectors(args.n, args.dim, rng)
    queries = unit_vectors(args.queries, args.dim, rng)
    index = faiss.IndexFlatIP(args.dim)
    index.add(gallery)

    t_exact, (f_scores, f_idx) = time_it(lambda: exact_knn(queries, gallery, args.k), args.repeats)
    t_pre, (p_scores, p_idx) = time_it(lambda: search_flat_index(index, queries, args.k), args.repeats)
    t_np, (n_scores, n_idx) = time_it(lambda: numpy_knn(queries, gallery, args.k), args.repeats)

    exact_med, np_med, pre_med = (statistics.median(t) for t in (t_exact, t_np, t_pre))
    report: dict[str, object] = {
        "config": {"n": args.n, "queries": args.queries, "dim": args.dim, "k": args.k,
                   "repeats": args.repeats, "seed": args.seed},
        "environment": {
            "python": platform.python_version(),
            "numpy": np.__version__,
            "faiss": faiss.__version__,
            "faiss_omp_threads": faiss.omp_get_max_threads(),
            "cpu_count": os.cpu_count(),
            "machine": platform.machine(),
        },
        "exact_knn": summary(t_exact, args.queries),
        "faiss_prebuilt": summary(t_pre, args.queries),
        "numpy_knn": summary(t_np, args.queries),
        "speedup_exact_knn_vs_numpy": round(np_med / exact_med, 2),
        "speedup_prebuilt_vs_numpy": round(np_med / pre_med, 2),
        "agreement": {
            "recall_numpy_vs_faiss": recall(n_idx, f_idx),
            "identical_order": bool(np.array_equal(n_idx, f_idx)),
            "max_abs_score_diff": float(np.max(np.abs(n_scores - f_scores))),
            "prebuilt_equals_exact_knn": bool(np.array_equal(p_idx, f_idx)),
        },
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n", encoding="utf-8")
    return report


if __name__ == "__main__":
    main()
