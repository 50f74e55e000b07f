"""Cost of geometric verification through the product: index build speed with keypoints, bytes per
image each part takes, and the time `rerank=gv` adds to a search (p50 / p95), per local-feature
kind (waldo.models.keypoints: the default TEBLID, ORB+TEBLID, and the SIFT of indexes built
before TEBLID).

One index per kind of grocery-open-cross's gallery (the same model in each: the first index's),
built with `Waldo.create` + `add(runtime="onnx")` as `waldo index build` does for 2000 images or
more; then the protocol's test queries
(every ``len // queries``-th) searched with ``rerank="gv"``: the "rerank" stage is the query's
keypoints + reading the candidates' + verifying the top-100. Wall times on this machine (2 cores).

    .venv/bin/python benchmarks/gv_cost.py                 # ~10 min on 2 cores; results/gv_cost.json
    .venv/bin/python benchmarks/write_performance_doc.py   # docs/performance.md from results/
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # GV threads itself

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from waldo.api import Waldo  # noqa: E402
from waldo.data.protocols import get_protocol  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "results" / "gv_cost.json"
KINDS = ("teblid", "orb-teblid", "sift")


def measure(protocol: str, n_queries: int, work: Path) -> list[dict]:
    proto = get_protocol(protocol)
    queries = proto.queries.paths[:: max(1, len(proto.queries) // n_queries)][:n_queries]
    # One model for every kind, fitted once; its ONNX export made (and cached) before any timing.
    warm = Waldo.create(work / "warm", fit_paths=proto.gallery.paths, gv_features=False, progress=False)
    warm.add(proto.gallery.paths[:2], proto.gallery.identities[:2], progress=False, runtime="onnx")
    rows, model_dir = [], work / "warm" / "model"
    for kind in KINDS:
        folder = work / kind
        engine = Waldo.create(folder, model_dir=model_dir, gv_features=kind, progress=False)
        start = time.perf_counter()
        # ONNX Runtime: what `--runtime auto` picks for builds of 2000 images and more (make demo's).
        report = engine.add(proto.gallery.paths, proto.gallery.identities, progress=False, runtime="onnx")
        build_seconds = time.perf_counter() - start
        info = engine.info()
        engine.search(queries[0], k=10, rerank="gv")  # warm: thread pools, caches
        rerank_ms, total_ms = [], []
        for path in queries:
            outcome = engine.search(path, k=10, rerank="gv")
            rerank_ms.append(outcome.timings_ms["rerank"])
            total_ms.append(sum(outcome.timings_ms.values()))
        rows.append({"protocol": protocol, "kind": kind, "features": engine.gv_sift.model_dump(),
                     "images": len(report.added), "build_images_per_s": round(len(report.added) / build_seconds, 1),
                     "bytes_per_image": info["bytes_per_image"], "queries": len(queries),
                     "rerank_ms_p50": round(float(np.median(rerank_ms)), 1),
                     "rerank_ms_p95": round(float(np.percentile(rerank_ms, 95)), 1),
                     "search_ms_p50": round(float(np.median(total_ms)), 1)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--protocol", default="grocery-open-cross")
    parser.add_argument("--queries", type=int, default=60)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="waldo-gv-cost-"))
    try:
        rows = measure(args.protocol, args.queries, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    OUT.write_text(json.dumps({"machine": f"{os.cpu_count()} CPU cores", "command": "benchmarks/gv_cost.py",
                               "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
