"""Issue 7: do the fast paths keep the ranking? Recall@1 on grocery-open-cross, fast vs exact.

For each trained reranker checkpoint (the seed table's frozen and fine-tuned RRTs, each with its
own global model), on grocery-open-cross:

1. **Extraction runtime.** The gallery and queries are extracted with each runtime: eager fp32,
   ONNX Runtime (waldo.models.onnx_runtime) and torch.compile (waldo.models.compiled); reported
   for each fast runtime: the smallest cosine to eager for global and for local descriptors, and
   global Recall@1/mAP.
2. **RRT precision.** The global top-100 of every query is reranked with ``rrt`` and
   ``rrt-fusion`` in each precision (reference module fp32, inference scorer fp32, inference
   scorer bf16, the bf16 scorer compiled); Recall@1 and mAP of each, and the differences to fp32.
3. **Stored precision of locals.** The same reranking on locals stored as int8 with a scale per
   descriptor (waldo.index.quantize round trip) against float16 (how the index stores them by
   default), both scored with the inference scorer in fp32 and in bf16.

Writes results/performance_accuracy.json. About 25 minutes per model on 2 cores.

    .venv/bin/python experiments/performance_accuracy.py
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from waldo.data.protocols import get_protocol
from waldo.data.transforms import get_transform
from waldo.eval.evaluate import evaluate_descriptors
from waldo.eval.rerank_eval import rerank_run
from waldo.eval.runner import default_data_dir
from waldo.index.quantize import dequantize_int8, quantize_int8
from waldo.models.checkpoint import load_model
from waldo.models.extract import Extracted, extract_descriptors
from waldo.rerank.rrt_rerankers import FusionReranker, RRTReranker

ROOT = Path(__file__).resolve().parents[1]
PROTOCOL = "grocery-open-cross"
RUNTIMES = ("eager", "onnx", "compile")  # the first is the reference
MODELS = {"frozen": ROOT / "runs/seed/rrt-frozen-lite0/best", "fine-tuned": ROOT / "runs/seed/rrt-finetune-lite0/best"}


def _min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = a.astype(np.float64).reshape(-1, a.shape[-1])
    b = b.astype(np.float64).reshape(-1, b.shape[-1])
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    keep = norms > 0
    return float(np.min(np.sum(a * b, axis=1)[keep] / norms[keep]))


def _int8_round_trip(extracted: Extracted) -> Extracted:
    q, scale = quantize_int8(extracted.local_desc)
    return replace(extracted, local_desc=dequantize_int8(q, scale, np.float16))


def _metrics(metrics: dict) -> dict:
    return {k: round(float(metrics[k]), 4) for k in ("recall@1", "recall@10", "map") if k in metrics}


def study_model(name: str, model_dir: Path, *, progress: bool) -> dict:
    protocol = get_protocol(PROTOCOL, default_data_dir(PROTOCOL))
    model, config = load_model(model_dir)
    transform = get_transform(config.transform, config.image_size)
    out: dict = {"model": str(model_dir.relative_to(ROOT)), "extraction": {}, "rerank": {}}
    runs = {}
    for runtime in RUNTIMES:
        start = time.perf_counter()
        gallery = extract_descriptors(model, protocol.gallery.paths, transform, runtime=runtime, progress=progress,
                                      description=f"{name} gallery ({runtime})")
        queries = extract_descriptors(model, protocol.queries.paths, transform, runtime=runtime, progress=progress,
                                      description=f"{name} queries ({runtime})")
        seconds = time.perf_counter() - start
        runs[runtime] = evaluate_descriptors(protocol, queries, gallery)
        out["extraction"][runtime] = {**_metrics(runs[runtime].metrics), "seconds": round(seconds, 1),
                                      "images": len(protocol.gallery.paths) + len(protocol.queries.paths)}
    eager = runs["eager"]
    for runtime in RUNTIMES[1:]:
        fast = runs[runtime]
        out["extraction"][runtime].update({
            "min_cosine_global": min(_min_cosine(eager.gallery.global_desc, fast.gallery.global_desc),
                                     _min_cosine(eager.queries.global_desc, fast.queries.global_desc)),
            "min_cosine_local": min(_min_cosine(eager.gallery.local_desc, fast.gallery.local_desc),
                                    _min_cosine(eager.queries.local_desc, fast.queries.local_desc)),
            "recall@1_change": round(fast.metrics["recall@1"] - eager.metrics["recall@1"], 6)})

    # Reranking on the eager run's descriptors; int8 = the same run with round-tripped locals.
    int8_run = replace(eager, gallery=_int8_round_trip(eager.gallery), queries=_int8_round_trip(eager.queries))
    out["global"] = _metrics(eager.metrics)
    q8, scale = quantize_int8(eager.gallery.local_desc)
    out["int8_bytes_per_image"] = {"local_int8": int(q8[0].nbytes), "scale": int(scale[0].nbytes),
                                   "float16": int(eager.gallery.local_desc[0].nbytes)}
    out["int8_min_cosine_local"] = _min_cosine(eager.gallery.local_desc, int8_run.gallery.local_desc)
    variants = [("float16", "reference", eager), ("float16", "fp32", eager), ("float16", "bf16", eager),
                ("float16", "bf16-compiled", eager), ("int8", "fp32", int8_run), ("int8", "bf16", int8_run)]
    for storage, precision, run in variants:
        rrt = RRTReranker.from_folder(model_dir, precision=precision.removesuffix("-compiled"),
                                      compile=precision.endswith("-compiled"))
        rerankers = [rrt] + ([FusionReranker(rrt, rrt.fusion_weight)] if rrt.fusion_weight is not None else [])
        for reranker in rerankers:
            reranked = rerank_run(run, reranker, 100, progress=progress).run
            key = f"{reranker.name}|{storage}|{precision}"
            out["rerank"][key] = {**_metrics(reranked.metrics),
                                  "ms_per_query": reranked.metrics["rerank_ms_per_query"]}
            print(name, key, out["rerank"][key], flush=True)
    return out


def summarise(results: dict) -> dict:
    """The differences the issue's targets are about, in Recall@1 points (x100)."""
    summary = {}
    for name, res in results["models"].items():
        r = res["rerank"]
        for method in ("rrt", "rrt-fusion"):
            base = r.get(f"{method}|float16|fp32")
            if base is None:
                continue
            summary[f"{name} {method}"] = {
                "bf16_vs_fp32_points": round(100 * (r[f"{method}|float16|bf16"]["recall@1"] - base["recall@1"]), 2),
                "bf16_compiled_vs_fp32_points": round(
                    100 * (r[f"{method}|float16|bf16-compiled"]["recall@1"] - base["recall@1"]), 2),
                "int8_vs_float16_points (fp32)": round(100 * (r[f"{method}|int8|fp32"]["recall@1"] - base["recall@1"]), 2),
                "int8_vs_float16_points (bf16)": round(
                    100 * (r[f"{method}|int8|bf16"]["recall@1"] - r[f"{method}|float16|bf16"]["recall@1"]), 2),
                "fast_fp32_vs_reference_points": round(
                    100 * (base["recall@1"] - r[f"{method}|float16|reference"]["recall@1"]), 2),
            }
        for runtime in RUNTIMES[1:]:
            e = res["extraction"][runtime]
            summary[f"{name} extraction {runtime}"] = {
                "recall@1_vs_eager_points": round(100 * e["recall@1_change"], 2),
                "min_cosine_global": round(e["min_cosine_global"], 6),
                "min_cosine_local": round(e["min_cosine_local"], 6)}
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "performance_accuracy.json")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    results = {"protocol": PROTOCOL, "torch_threads": torch.get_num_threads(), "models": {}}
    for name in args.models:
        results["models"][name] = study_model(name, MODELS[name], progress=not args.quiet)
    results["summary"] = summarise(results)
    results["seconds"] = round(time.perf_counter() - start, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results["summary"], indent=2))


if __name__ == "__main__":
    main()
