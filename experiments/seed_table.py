"""The founding table (issue 3) on grocery: untrained -> trained global -> +RRT frozen -> +RRT fine-tuned.

One rerunnable script: it trains what is missing (each stage resumes where it stopped), then
evaluates every row on ``grocery-open`` and ``grocery-open-cross`` (test queries only; all
choices -- learning rates, the epoch kept, the fusion weight -- were made on a validation split of
the training identities), writes every number to ``results/seed_table.json`` (one object per row:
protocol, row name, and the metrics as ``waldo eval --json`` writes them) and regenerates the
"seed table" block of ``docs/results.md``.

    .venv/bin/python experiments/seed_table.py             # trains (~1 h on 2 cores) and evaluates (~30 min)
    .venv/bin/python experiments/seed_table.py --eval-only # the runs exist: evaluate only
    .venv/bin/python experiments/seed_table.py --doc-only  # rewrite the docs block from the JSON

The three stages are the commands a user would type (see README):

    waldo train global --protocol grocery-open --config configs/global-cpu.json --out runs/seed/global-lite0
    waldo train rrt --protocol grocery-open --config configs/rrt-frozen-cpu.json \
        --init runs/seed/global-lite0/best --mode frozen --out runs/seed/rrt-frozen-lite0
    waldo train rrt --protocol grocery-open --config configs/rrt-finetune-cpu.json \
        --init runs/seed/rrt-frozen-lite0/best --mode finetune --out runs/seed/rrt-finetune-lite0
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from waldo.eval.rerank_eval import reranked_metrics, score_top_k
from waldo.eval.runner import run_eval_full
from waldo.rerank.rrt_rerankers import RRTReranker, fuse_scores
from waldo_experiments.doc_blocks import write_block

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results" / "seed_table.json"
DOC = ROOT / "docs" / "results.md"
START, END = "<!-- seed:start -->", "<!-- seed:end -->"
PROTOCOLS = ("grocery-open", "grocery-open-cross")
TRAIN_PROTOCOL = "grocery-open"  # both protocols share grocery's training images
METRIC_KEYS = ("recall@1", "recall@10", "recall@100", "map", "map@100", "n_queries", "n_gallery", "n_dropped_queries")


def stages(runs: Path) -> list[tuple[str, list[str], Path]]:
    """(name, `waldo train ...` arguments, best-model folder) in training order."""
    glob, frozen, tuned = runs / "global-lite0", runs / "rrt-frozen-lite0", runs / "rrt-finetune-lite0"
    return [
        ("global", ["global", "--protocol", TRAIN_PROTOCOL, "--config", "configs/global-cpu.json", "--out", str(glob)],
         glob / "best"),
        ("rrt-frozen", ["rrt", "--protocol", TRAIN_PROTOCOL, "--config", "configs/rrt-frozen-cpu.json",
                        "--init", str(glob / "best"), "--mode", "frozen", "--out", str(frozen)], frozen / "best"),
        ("rrt-finetune", ["rrt", "--protocol", TRAIN_PROTOCOL, "--config", "configs/rrt-finetune-cpu.json",
                          "--init", str(frozen / "best"), "--mode", "finetune", "--out", str(tuned)], tuned / "best"),
    ]


def train(runs: Path, quiet: bool) -> None:
    """Run each stage's training command; a finished run returns at once, a stopped one resumes."""
    waldo = Path(sys.executable).parent / "waldo"
    for name, arguments, _ in stages(runs):
        print(f"== train {name}: waldo train {' '.join(arguments)}", file=sys.stderr, flush=True)
        command = [str(waldo), "train", *arguments] + (["--quiet"] if quiet else [])
        subprocess.run(command, check=True, cwd=ROOT)


def _row(protocol: str, name: str, metrics: dict, **extra) -> dict:
    row = {"protocol": protocol, "row": name, **{k: metrics[k] for k in METRIC_KEYS if k in metrics}, **extra}
    print(json.dumps(row), flush=True)
    return row


def rrt_rows(protocol: str, model_dir: Path, label: str, global_label: str, progress: bool) -> list[dict]:
    """The model's own global ranking, then its top-100 re-sorted by the RRT logit and by the
    fused score (the weight stored with the checkpoint, chosen on validation). One forward pass
    per query scores its 100 candidates; both orders reuse those logits."""
    run, metrics = run_eval_full(protocol, model_dir=model_dir, progress=progress)
    rows = [_row(protocol, global_label, metrics, model=str(model_dir))]
    reranker = RRTReranker.from_folder(model_dir)
    start = time.perf_counter()
    logits = score_top_k(run, reranker.logits, 100, progress=progress)
    ms_per_query = 1000 * (time.perf_counter() - start) / max(1, len(logits))
    rrt_metrics, _ = reranked_metrics(run, logits)
    rows.append(_row(protocol, f"{label}", rrt_metrics, model=str(model_dir), rerank="rrt",
                     rerank_top_k=logits.shape[1], rerank_ms_per_query=round(ms_per_query, 1)))
    weight = reranker.fusion_weight
    if weight is not None:
        global_scores = run.knn_scores[:, : logits.shape[1]]
        fused = np.where(np.isnan(logits), np.nan, fuse_scores(global_scores, np.nan_to_num(logits), weight))
        fused_metrics, _ = reranked_metrics(run, fused)
        rows.append(_row(protocol, f"{label}, fusion (lambda {weight:g})", fused_metrics, model=str(model_dir),
                         rerank="rrt-fusion", fusion_weight=weight, rerank_top_k=logits.shape[1]))
    return rows


def evaluate(runs: Path, progress: bool) -> list[dict]:
    (_, _, glob), (_, _, frozen), (_, _, tuned) = stages(runs)
    rows = []
    for protocol in PROTOCOLS:
        print(f"== {protocol}", file=sys.stderr, flush=True)
        _, metrics = run_eval_full(protocol, backbone="efficientnet_lite0", progress=progress)
        rows.append(_row(protocol, "untrained descriptors (lite0, 128-d PCA-whitened)", metrics))
        _, metrics = run_eval_full(protocol, model_dir=glob, progress=progress)
        rows.append(_row(protocol, "trained global model", metrics, model=str(glob)))
        # Frozen mode leaves the backbone and the global head untouched: its global ranking is the
        # trained global model's (checked here, not assumed), and the RRT reranks exactly that.
        frozen_rows = rrt_rows(protocol, frozen, "+RRT frozen", "global of the frozen-RRT checkpoint", progress)
        if abs(frozen_rows[0]["map"] - rows[-1]["map"]) > 1e-6:
            raise AssertionError(f"{protocol}: the frozen checkpoint's global ranking differs from the trained "
                                 f"global model's ({frozen_rows[0]['map']} vs {rows[-1]['map']})")
        rows += frozen_rows[1:]
        # Fine-tuning trains the backbone's last stage and the global head too (BCE + the global
        # loss), so the fine-tuned checkpoint has a global ranking of its own: shown first.
        rows += rrt_rows(protocol, tuned, "+RRT fine-tuned", "global of the fine-tuned checkpoint", progress)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [START, "",
             "| protocol | row | R@1 | R@10 | R@100 | mAP | mAP@100 |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['protocol']} | {r['row']} | {r['recall@1']:.4f} | {r['recall@10']:.4f} | "
                     f"{r['recall@100']:.4f} | {r['map']:.4f} | {r['map@100']:.4f} |")
    cost = [r for r in rows if r.get("rerank") == "rrt"]
    if cost:
        timings = ", ".join(f"{r['protocol']} {r['row']} {r['rerank_ms_per_query']}" for r in cost)
        lines += ["", "RRT time to rerank a query's top-100 inside this evaluation (ms/query, includes moving "
                  "float16 locals to float32; wall time, so it counts whatever else the machine was doing): "
                  f"{timings}."]
    lines += ["", "Produced by `.venv/bin/python experiments/seed_table.py` (numbers in `results/seed_table.json`). "
              "Training on `grocery-open`'s training images only; test queries never choose anything.", "", END]
    return "\n".join(lines)


def write_doc(block: str) -> None:
    write_block(DOC, block, START, END, heading="## Training and reranking (issue 3)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "seed", help="where the three runs live")
    parser.add_argument("--eval-only", action="store_true", help="do not train; the runs must exist")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--doc-only", action="store_true", help="rewrite the docs block from the saved JSON")
    args = parser.parse_args()
    if args.doc_only:
        write_doc(markdown(json.loads(RESULTS.read_text())))
        return 0
    if not args.eval_only:
        train(args.runs, args.quiet)
    missing = [str(best) for _, _, best in stages(args.runs) if not (best / "config.json").is_file()]
    if missing:
        parser.error(f"missing trained models: {', '.join(missing)} (run without --eval-only)")
    rows = evaluate(args.runs, progress=not args.quiet)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(rows, indent=2) + "\n")
    write_doc(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
