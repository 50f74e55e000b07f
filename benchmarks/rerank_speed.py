"""Issue 7, RRT reranking: one query's top-100, fast scorer against the reference path.

For the reference-sized RRT (6 layers, feed-forward 1024, ~0.42 GFLOP per pair) and the CPU
config the grocery models use (``--config``), times ``RRTReranker.rerank`` over 100 candidates
with float16 locals as the index stores them, in interleaved rounds (median):

* ``reference-fp32`` (the baseline): the training module in eval mode, fp32, every token of
  every layer (PyTorch's fused encoder fast path);
* ``fast-fp32``: waldo.rerank.rrt_fast, fp32, the last layer for CLS alone (same logits);
* ``fast-bf16``: the same with bf16 matmuls and attention (fp32 residuals and norms);
* ``fast-fp32-compiled`` / ``fast-bf16-compiled``: those two through torch.compile with freezing
  (``compile=True``; compiled in the warm-up call, whose time is reported as ``compile_seconds``).

Also reported: the largest logit difference to the baseline, and what embedding the 100
candidates (the candidate-only work a cache could skip) costs per query. Random locals: the cost
does not depend on the values (accuracy is measured by experiments/performance_accuracy.py).

    .venv/bin/python benchmarks/rerank_speed.py --out results/rerank_speed.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from _report import emit_json, machine_info  # benchmarks/_report.py (run as scripts)

from waldo.rerank import RerankCandidates, RerankQuery, RRTReranker
from waldo.rerank.rrt import RerankingTransformer, RRTConfig, flops_per_pair

ROOT = Path(__file__).resolve().parents[1]
#: variant -> (precision, compile)
VARIANTS = {"reference-fp32": ("reference", False), "fast-fp32": ("fp32", False), "fast-bf16": ("bf16", False),
            "fast-fp32-compiled": ("fp32", True), "fast-bf16-compiled": ("bf16", True)}
BASELINE = "reference-fp32"


def measure(config: RRTConfig, n_candidates: int, rounds: int, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    rrt = RerankingTransformer(config).eval()
    rng = np.random.default_rng(seed)
    query = RerankQuery(rng.standard_normal((49, config.d_model)).astype(np.float16),
                        rng.standard_normal(config.d_model).astype(np.float32))
    candidates = RerankCandidates(rng.standard_normal((n_candidates, 49, config.d_model)).astype(np.float16),
                                  np.linspace(1, 0, n_candidates, dtype=np.float32),
                                  rng.standard_normal((n_candidates, config.d_model)).astype(np.float32))
    rerankers = {name: RRTReranker(rrt, batch_size=n_candidates, precision=p, compile=c)
                 for name, (p, c) in VARIANTS.items()}
    logits, compile_seconds = {}, {}
    for name, reranker in rerankers.items():  # also the warm-up (and the compilation)
        start = time.perf_counter()
        logits[name] = reranker.logits(query, candidates)
        if VARIANTS[name][1]:
            compile_seconds[name] = round(time.perf_counter() - start, 1)
            assert reranker._scorer.compiled, f"{name}: compilation failed (see the warning)"
    times: dict[str, list[float]] = {name: [] for name in rerankers}
    for _ in range(rounds):
        for name, reranker in rerankers.items():
            start = time.perf_counter()
            reranker.rerank(query, candidates)
            times[name].append((time.perf_counter() - start) * 1e3)
    scorer = rerankers["fast-bf16"]._scorer
    embed_ms = []
    for _ in range(rounds):
        start = time.perf_counter()
        scorer.embed_candidates(torch.as_tensor(candidates.local_desc))
        embed_ms.append((time.perf_counter() - start) * 1e3)
    base = statistics.median(times[BASELINE])
    gflop = flops_per_pair(config) * n_candidates / 1e9
    return {
        "config": config.model_dump(), "candidates": n_candidates, "gflop_per_query": round(gflop, 2),
        "embed_candidates_ms": round(statistics.median(embed_ms), 2), "compile_seconds": compile_seconds,
        "variants": {name: {"ms_per_query": round(statistics.median(t), 1),
                            "speedup_vs_baseline": round(base / statistics.median(t), 2),
                            "max_abs_logit_diff": round(float(np.abs(logits[name] - logits[BASELINE]).max()), 5),
                            "same_order": bool(np.array_equal(np.argsort(-logits[name]), np.argsort(-logits[BASELINE])))}
                     for name, t in times.items()},
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--candidates", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "rrt-frozen-cpu.json",
                        help="the CPU model's training config (its 'rrt' section), measured after the reference")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    data = json.loads(args.config.read_text())
    cpu_config = RRTConfig.model_validate(data.get("rrt", data))
    result = {
        "machine": machine_info(),
        "baseline": BASELINE,
        "reference_rrt": measure(RRTConfig(), args.candidates, args.rounds),
        "cpu_rrt": measure(cpu_config, args.candidates, args.rounds),
    }
    return emit_json(result, args.out)


if __name__ == "__main__":
    main()
