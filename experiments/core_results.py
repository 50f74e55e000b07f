"""Retrieval-core figures (issue 2): untrained descriptors on every named protocol.

Runs ``waldo eval`` logic for each row, writes every number to ``results/core_eval.json`` and
regenerates the "retrieval core" block of ``docs/results.md``. Rerun:

    .venv/bin/python experiments/core_results.py            # about 20 minutes on 2 cores
    .venv/bin/python experiments/core_results.py --quick    # the default rows only
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from waldo.eval.runner import run_eval
from waldo_experiments.doc_blocks import write_block

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results" / "core_eval.json"
DOC = ROOT / "docs" / "results.md"
START, END = "<!-- core:start -->", "<!-- core:end -->"

# (protocol, row name, eval kwargs). The first row of each protocol is Waldo's default.
DEFAULT = {"backbone": "efficientnet_lite0", "projection": "pca-whiten", "dim": 128}
ROWS = [
    ("grocery-open", "lite0, 128-d PCA-whitened (default)", DEFAULT),
    ("grocery-open", "lite0, 128-d PCA", {**DEFAULT, "projection": "pca"}),
    ("grocery-open", "lite0, 128-d random orthogonal", {**DEFAULT, "projection": "random"}),
    ("grocery-open", "lite0, 1280-d plain average pooling (reference)", {**DEFAULT, "projection": "identity", "dim": 1280}),
    ("grocery-open-cross", "lite0, 128-d PCA-whitened (default)", DEFAULT),
    ("grocery-open-cross", "lite0, 1280-d plain average pooling (reference)", {**DEFAULT, "projection": "identity", "dim": 1280}),
    ("grocery-iconic", "lite0, 128-d PCA-whitened (default)", DEFAULT),
    ("coil100-open", "lite0, 128-d PCA-whitened (default)", DEFAULT),
    ("coil100-open", "lite0, 1280-d plain average pooling (reference)", {**DEFAULT, "projection": "identity", "dim": 1280}),
]


def markdown(rows: list[dict]) -> str:
    lines = [START, "",
             "| protocol | descriptors | queries | gallery | R@1 | R@10 | R@100 | mAP | mAP@100 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['protocol']} | {r['row']} | {r['n_queries']} | {r['n_gallery']} | "
                     f"{r['recall@1']:.4f} | {r['recall@10']:.4f} | {r['recall@100']:.4f} | "
                     f"{r['map']:.4f} | {r['map@100']:.4f} |")
    lines += ["", "Produced by `.venv/bin/python experiments/core_results.py` (numbers in "
              "`results/core_eval.json`). Transform `resize256-crop224`; PCA fitted on each "
              "protocol's training images only.", "", END]
    return "\n".join(lines)


def write_doc(block: str) -> None:
    write_block(DOC, block, START, END, heading="## Retrieval core: untrained descriptors (issue 2)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="only the default row of each protocol")
    args = parser.parse_args()
    rows = [r for r in ROWS if not args.quick or r[2] is DEFAULT]
    results = []
    for protocol, name, kwargs in rows:
        print(f"== {protocol}: {name}", file=sys.stderr, flush=True)
        metrics = run_eval(protocol, **kwargs)
        results.append({"protocol": protocol, "row": name, **metrics})
        print(json.dumps(results[-1]), flush=True)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    write_doc(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
