"""Cost of reranking one query's global top-100 with the Reranking Transformer on this CPU.

Times ``RRTReranker.rerank`` (the path ``waldo search --rerank rrt`` and ``waldo eval --rerank``
take): one forward pass over the 100 (query, candidate) pairs, fp32, eager mode, float16
locals as stored in an index. Random locals stand in for real ones (the cost does not depend
on the values). Reports the median over ``--repeats`` queries after one warm-up, for each
thread count asked, with the parameter count, analytic FLOPs per pair and the GFLOP/s
achieved. The machine may be shared: ``load_average`` is recorded beside the numbers.

    .venv/bin/python benchmarks/rerank_cost.py --repeats 7 --threads 1 2 --out results/rerank_cost.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from waldo.rerank import RerankCandidates, RerankQuery, RRTReranker
from waldo.rerank.rrt import RerankingTransformer, RRTConfig, flops_per_pair


def time_rerank(reranker: RRTReranker, query: RerankQuery, candidates: RerankCandidates,
                repeats: int) -> list[float]:
    """Wall times (ms) of ``repeats`` reranks after one untimed warm-up (allocator, OpenMP spin-up)."""
    reranker.rerank(query, candidates)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        reranker.rerank(query, candidates)
        times.append((time.perf_counter() - start) * 1e3)
    return times


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--candidates", type=int, default=100, help="top-k reranked per query")
    parser.add_argument("--locals", type=int, default=49, help="local descriptors per image (7 x 7)")
    parser.add_argument("--repeats", type=int, default=7, help="timed queries per thread count; >= 3")
    parser.add_argument("--threads", type=int, nargs="+", default=[torch.get_num_threads()])
    parser.add_argument("--config", type=Path, default=None,
                        help="RRTConfig JSON or a configs/rrt-*.json training config (default: the reference RRT)")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    if args.repeats < 3:
        parser.error("--repeats must be >= 3")

    data = json.loads(args.config.read_text()) if args.config else {}
    config = RRTConfig.model_validate(data.get("rrt", data))  # an RRTConfig, or a training config's "rrt"
    torch.manual_seed(0)
    rrt = RerankingTransformer(config).eval()
    side = round(args.locals ** 0.5)
    if side * side != args.locals:
        parser.error("--locals must be a square number (an h x w grid)")
    reranker = RRTReranker(rrt, grid=(side, side), batch_size=args.candidates)  # one pass scores them all
    rng = np.random.default_rng(0)
    query = RerankQuery(rng.standard_normal((args.locals, config.d_model)).astype(np.float16))
    candidates = RerankCandidates(rng.standard_normal((args.candidates, args.locals, config.d_model)).astype(np.float16),
                                  np.linspace(1, 0, args.candidates, dtype=np.float32))
    flops = flops_per_pair(config, args.locals)
    per_threads = {}
    for threads in args.threads:
        torch.set_num_threads(threads)
        times = time_rerank(reranker, query, candidates, args.repeats)
        median = statistics.median(times)
        per_threads[str(threads)] = {
            "median_ms_per_query": round(median, 1), "min_ms_per_query": round(min(times), 1),
            "runs_ms": [round(t, 1) for t in times],
            "achieved_gflop_s": round(flops * args.candidates / (median / 1e3) / 1e9, 1),
        }
    best = min(per_threads.values(), key=lambda r: r["median_ms_per_query"])
    report = {
        "what": f"rerank one query's top-{args.candidates} with the RRT (fp32, eager, one forward pass)",
        "median_ms_per_query": best["median_ms_per_query"],
        "parameters": sum(p.numel() for p in rrt.parameters()),
        "flops_per_pair": flops,
        "gflop_per_query": round(flops * args.candidates / 1e9, 2),
        "rrt_config": config.model_dump(),
        "by_threads": per_threads,
        "environment": {"torch": torch.__version__, "python": platform.python_version(),
                        "cpu_count": os.cpu_count(), "machine": platform.machine(),
                        "load_average": [round(x, 2) for x in os.getloadavg()]},
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n", encoding="utf-8")
    return report


if __name__ == "__main__":
    main()
