"""Cost of geometric verification: SIFT time per image, verification time per query (top-100),
bytes stored per image, for a few keypoint caps and thread counts.

Real images: a query from the protocol's query set is verified against 100 gallery images (the
gallery is what the index stores). Wall and CPU (all threads of this process) times are both
reported: on a shared machine wall time depends on what else runs, CPU time much less so.

    .venv/bin/python benchmarks/gv_cost.py                 # ~5 minutes on 2 cores
    .venv/bin/python benchmarks/gv_cost.py --queries 3 --protocol coil100-open
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # GV threads itself; see experiments/gv_results.py

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from waldo.data.protocols import get_protocol  # noqa: E402
from waldo.rerank.gv import GeometricReranker, GVConfig  # noqa: E402
from waldo.models.keypoints import SiftConfig, extract_many  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "results" / "gv_cost.json"


def timed(fn):
    """(result, wall seconds, CPU seconds of the whole process)."""
    t, c = time.perf_counter(), time.process_time()
    result = fn()
    return result, time.perf_counter() - t, time.process_time() - c


def measure(protocol: str, sift: SiftConfig, workers: int, n_queries: int, top_k: int = 100) -> dict:
    proto = get_protocol(protocol)
    gallery_paths = proto.gallery.paths[:: max(1, len(proto.gallery) // top_k)][:top_k]
    query_paths = proto.queries.paths[:: max(1, len(proto.queries) // n_queries)][:n_queries]
    gallery, wall, cpu = timed(lambda: extract_many(gallery_paths, sift, workers=workers))
    queries = extract_many(query_paths, sift, workers=workers)
    counts = np.array([len(f) for f in gallery])
    with GeometricReranker(GVConfig(top_k=top_k), workers=workers) as reranker:
        reranker.verify_many(queries[0], gallery[:4])  # warm the thread pool
        _, v_wall, v_cpu = timed(lambda: [reranker.verify_many(q, gallery) for q in queries])
    return {"protocol": protocol, "sift": sift.model_dump(), "workers": workers, "top_k": len(gallery),
            "queries": len(queries), "sift_ms_per_image_wall": round(1000 * wall / len(gallery), 1),
            "sift_ms_per_image_cpu": round(1000 * cpu / len(gallery), 1),
            "verify_ms_per_query_wall": round(1000 * v_wall / len(queries), 1),
            "verify_ms_per_query_cpu": round(1000 * v_cpu / len(queries), 1),
            "keypoints_per_image": round(float(counts.mean()), 1),
            "bytes_per_image": round(float(counts.mean()) * (2 * 4 + 128) + 8, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--protocol", nargs="+", default=["grocery-open-cross", "coil100-open"])
    parser.add_argument("--queries", type=int, default=5)
    args = parser.parse_args()
    settings = [(SiftConfig(max_keypoints=n), w) for n in (250, 500, 1000) for w in (1, 2)]
    rows = []
    for protocol in args.protocol:
        for sift, workers in settings:
            if protocol.startswith("coil") and sift.max_keypoints != 1000:
                continue  # 128-px images never reach even 250 keypoints
            rows.append(measure(protocol, sift, workers, args.queries))
            print(json.dumps(rows[-1]), flush=True)
        if protocol.startswith("coil"):
            rows.append(measure(protocol, SiftConfig(min_side=256), 2, args.queries))
            print(json.dumps(rows[-1]), flush=True)
    print(f"\n{'protocol':<20} {'kp cap':>6} {'min_side':>8} {'thr':>3} {'kp/img':>7} {'bytes/img':>9} "
          f"{'SIFT ms':>8} {'verify ms/q wall':>16} {'cpu':>7}")
    for r in rows:
        print(f"{r['protocol']:<20} {r['sift']['max_keypoints']:>6} {r['sift']['min_side']:>8} {r['workers']:>3} "
              f"{r['keypoints_per_image']:>7} {r['bytes_per_image']:>9.0f} {r['sift_ms_per_image_wall']:>8} "
              f"{r['verify_ms_per_query_wall']:>16} {r['verify_ms_per_query_cpu']:>7}")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"machine": f"{os.cpu_count()} CPU cores (shared)", "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
