"""What a search costs with make demo's model as `waldo serve` runs it: each ranking the page
offers, the stored default (rrt-consensus+gv) and what it falls back to included.

grocery-open-cross's gallery is indexed with make demo's model (lite0-match-rrt, its colour term
and default keypoints included) by ``Waldo.create`` + ``add(runtime="onnx")``, as `waldo index
build` runs a build of 2000 images or more; the index is opened as the service opens it
(``rrt_compile=True``, RRT precision ``auto``: bf16 where the CPU has it); every reranker is
warmed by one query (torch.compile's first call), then ``--queries`` of the protocol's test
queries (every ``len // queries``-th) are searched with each. Reported per ranking: the p50 /
p95 of the whole search (decode, extract, search, rerank) and of the rerank stage. Wall times on
this machine (2 cores; the machine may be shared: the load average is recorded).

    .venv/bin/python benchmarks/default_latency.py         # ~12 min on 2 cores; results/default_latency.json
    .venv/bin/python benchmarks/write_performance_doc.py   # docs/performance.md from results/
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "results" / "default_latency.json"
MODEL = "lite0-match-rrt"
RANKINGS = ("none", "rrt", "rrt-consensus", "gv", "rrt-consensus+gv")


def _ms(values: list[float], q: float) -> float:
    return round(float(np.percentile(values, q)), 1)


def measure(protocol: str, n_queries: int, work: Path, rankings: tuple[str, ...]) -> dict:
    from waldo.api import Waldo
    from waldo.data.protocols import get_protocol
    from waldo.models.shipped import resolve_model_dir

    proto = get_protocol(protocol)
    queries = proto.queries.paths[:: max(1, len(proto.queries) // n_queries)][:n_queries]
    folder = work / "index"
    engine = Waldo.create(folder, model_dir=resolve_model_dir(MODEL), progress=False)
    start = time.perf_counter()
    report = engine.add(proto.gallery.paths, proto.gallery.identities, progress=False, runtime="onnx")
    build_seconds = time.perf_counter() - start
    engine = Waldo.open(folder, rrt_compile=True)  # as the service opens it
    out = {"protocol": protocol, "model": MODEL, "images": len(report.added),
           "build_seconds": round(build_seconds, 1), "default_reranker": engine.default_reranker,
           "queries": len(queries), "rankings": {}}
    for name in rankings:
        warm = time.perf_counter()
        engine.search(queries[0], k=10, rerank=name)  # torch.compile's first call, thread pools
        total, stages = [], {}
        for path in queries:
            outcome = engine.search(path, k=10, rerank=name)
            total.append(sum(outcome.timings_ms.values()))
            for stage, ms in outcome.timings_ms.items():
                stages.setdefault(stage, []).append(ms)
        rerank = stages.get("rerank", [0.0])
        out["rankings"][name] = {"search_ms_p50": _ms(total, 50), "search_ms_p95": _ms(total, 95),
                                 "rerank_ms_p50": _ms(rerank, 50), "rerank_ms_p95": _ms(rerank, 95),
                                 "stage_ms_p50": {stage: _ms(ms, 50) for stage, ms in stages.items()},
                                 "warm_up_seconds": round(time.perf_counter() - warm - sum(total) / 1e3, 1)}
        print(json.dumps({name: out["rankings"][name]}), flush=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--protocol", default="grocery-open-cross")
    parser.add_argument("--queries", type=int, default=60)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="waldo-default-latency-"))
    try:
        result = measure(args.protocol, args.queries, work, RANKINGS)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result.update({"machine": f"{os.cpu_count()} CPU cores", "load_average": [round(x, 2) for x in os.getloadavg()],
                   "command": "benchmarks/default_latency.py"})
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
