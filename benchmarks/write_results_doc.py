"""Regenerate the benchmark blocks of ``docs/results.md`` from the JSON the benchmarks wrote.

    .venv/bin/python benchmarks/extraction_throughput.py --end-to-end 256 --out results/extraction_throughput.json
    .venv/bin/python benchmarks/search_latency.py --out results/search_latency.json
    .venv/bin/python benchmarks/rerank_cost.py --threads 1 2 --out results/rerank_cost_reference.json
    .venv/bin/python benchmarks/rerank_cost.py --threads 1 2 --config configs/rrt-frozen-cpu.json \\
        --out results/rerank_cost_cpu.json
    .venv/bin/python benchmarks/write_results_doc.py

A block whose JSON is missing is left as it is. Nothing here measures anything: every figure is
copied from a file a benchmark wrote.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from waldo.eval.doc_blocks import markers
from waldo.eval.doc_blocks import replace_block as replace_doc_block

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results"
DOC = ROOT / "docs" / "results.md"


def replace_block(text: str, name: str, body: str) -> str:
    start, end = markers(name)
    return replace_doc_block(text, f"{start}\n\n{body.strip()}\n\n{end}", start, end)


def throughput(report: dict) -> str:
    machine = report["machine"]
    lines = [f"Batch {report['batch']}, {report['image_size']} px, fp32, `torch.inference_mode`, channels_last, "
             f"{machine['torch_threads']} threads; the model part is timed on a synthetic batch (median of "
             f"{report['repeats']}). Measured fp32 matmul peak of this machine: **{machine['matmul_fp32_gflops']} "
             f"GFLOP/s** (2048x2048 matmul).", "",
             "| backbone | GFLOPs/image | images/s (model) | achieved GFLOP/s | fraction of matmul peak |"
             + (" images/s end to end (decode + resize + model) |" if any(
                 "end_to_end_images_per_s" in row for row in report["backbones"].values()) else ""),
             "|---|---|---|---|---|" + ("---|" if any(
                 "end_to_end_images_per_s" in row for row in report["backbones"].values()) else "")]
    for name, row in report["backbones"].items():
        line = (f"| {name} | {row['gflops_per_image']} | {row['images_per_s']} | {row['achieved_gflops']} | "
                f"{row['fraction_of_matmul_peak']:.0%} |")
        if "end_to_end_images_per_s" in row:
            line += f" {row['end_to_end_images_per_s']} |"
        lines.append(line)
    lines += ["", "Depthwise convolutions (EfficientNet-Lite) reach a small fraction of the matmul peak; "
              "ResNet-50's dense 3x3 convolutions come much closer. Produced by "
              "`.venv/bin/python benchmarks/extraction_throughput.py --end-to-end 256 --out "
              "results/extraction_throughput.json`."]
    return "\n".join(lines)


def latency(report: dict) -> str:
    config = report["config"]
    rows = [("faiss `IndexFlatIP` built per call (`exact_knn`)", report["exact_knn"]),
            ("faiss `IndexFlatIP` prebuilt (an open index)", report["faiss_prebuilt"]),
            ("numpy matmul + `argpartition` (`numpy_knn`)", report["numpy_knn"])]
    lines = [f"{config['queries']} queries over {config['n']:,} random unit {config['dim']}-d vectors, top-{config['k']}, "
             f"one batched call, median of {config['repeats']} runs; faiss {report['environment']['faiss']} with "
             f"{report['environment']['faiss_omp_threads']} OpenMP threads.", "",
             "| method | ms per batch of queries | ms per query |", "|---|---|---|"]
    for name, summary in rows:
        lines.append(f"| {name} | {summary['median_total_ms']:.1f} | {summary['median_ms_per_query']:.2f} |")
    agreement = report["agreement"]
    lines += ["", f"numpy and faiss agree: recall of numpy's top-{config['k']} against faiss's "
              f"{agreement['recall_numpy_vs_faiss']:.4f}, largest score difference "
              f"{agreement['max_abs_score_diff']:.2e}. Produced by `.venv/bin/python benchmarks/search_latency.py "
              f"--out results/search_latency.json`."]
    return "\n".join(lines)


def rerank_cost(report: dict) -> str:
    rrt = report["rrt_config"]
    lines = [f"{report['what']}; RRT with {rrt.get('n_layers')} layers, feed-forward {rrt.get('ff_dim')}, "
             f"d_model {rrt.get('d_model')}: **{report['parameters']:,} parameters**, "
             f"**{report['flops_per_pair'] / 1e6:.0f} MFLOP per (query, candidate) pair** "
             f"({report['gflop_per_query']} GFLOP per query). Random float16 locals stand in for real ones.", "",
             "| threads | ms per query (median) | achieved GFLOP/s |", "|---|---|---|"]
    for threads, row in report["by_threads"].items():
        lines.append(f"| {threads} | {row['median_ms_per_query']:.1f} | {row['achieved_gflop_s']:.1f} |")
    lines.append(f"\nLoad average while measuring: {report['environment']['load_average']}.")
    return "\n".join(lines)


BLOCKS = {"throughput": ("extraction_throughput.json", throughput),
          "latency": ("search_latency.json", latency),
          "rerank-cost-reference": ("rerank_cost_reference.json", rerank_cost),
          "rerank-cost-cpu": ("rerank_cost_cpu.json", rerank_cost)}


def main() -> int:
    text = DOC.read_text()
    for name, (filename, render) in BLOCKS.items():
        path = RESULTS / filename
        if path.is_file():
            text = replace_block(text, name, render(json.loads(path.read_text())))
            print(f"{name}: from {path.relative_to(ROOT)}")
        else:
            print(f"{name}: {path.relative_to(ROOT)} missing, block left as it is", file=sys.stderr)
    DOC.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
