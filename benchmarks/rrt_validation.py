"""What a reranker's validation pass costs, scored by the training module or the serving scorer.

Training (`waldo train rrt`) and `waldo index adapt` validate after every epoch: each held-out
query's global top-100 reranked by the RRT being trained. That pass scores with the serving fp32
scorer (waldo.rerank.rrt_fast, ``ViewValidator(precision="fp32")``) instead of the training
module's forward (``precision="reference"``). This runs the same validation of a shipped model
both ways, after one untimed pass that fills the descriptor cache, and records each way's
seconds and figures: the figures must be the same (the logits differ by float rounding only).

    .venv/bin/python benchmarks/rrt_validation.py     # ~6 min on 2 cores; results/rrt_validation.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "results" / "rrt_validation.json"
MODEL = "lite0-match-rrt"
#: grocery's held-out shelves: the validation set whose figures are far from saturated
VALIDATION_SET = "grocery-open-cross:train"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queries", type=int, default=150, help="held-out queries (the shipped cards' 150)")
    args = parser.parse_args()
    from waldo.models.shipped import resolve_model_dir
    from waldo.train.rrt_online import validate_reranker
    from waldo.train.sources import parse_source, quoted_source

    model_dir = resolve_model_dir(MODEL)
    check = json.loads((model_dir / "card.json").read_text())["check"]  # the card's sources and split
    sources = [parse_source(quoted_source(spec)) for spec in check["sources"]]

    def validate(precision: str) -> dict:
        return validate_reranker(model_dir, sources, val_fraction=check["val_fraction"], seed=check["seed"],
                                 max_queries=args.queries, only=[VALIDATION_SET], precision=precision)

    validate("fp32")  # describes the images once (cached): the timed passes score only
    rows = {}
    for precision in ("reference", "fp32"):
        started = time.perf_counter()
        result = validate(precision)
        seconds = time.perf_counter() - started
        entry = result["sets"][VALIDATION_SET]
        rows[precision] = {"seconds": round(seconds, 1), "queries": entry["n_queries"], "top_k": result["top_k"],
                           "figures": {name: result["macro"][name] for name in ("none", "rrt", "rrt-fusion")
                                       if name in result["macro"]}}
        print(json.dumps({precision: rows[precision]}), flush=True)
    out = {"command": "benchmarks/rrt_validation.py" + (f" --queries {args.queries}" if args.queries != 150 else ""),
           "cpus": os.cpu_count(), "model": MODEL, "set": VALIDATION_SET, "rows": rows,
           "same_figures": rows["reference"]["figures"] == rows["fp32"]["figures"]}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
