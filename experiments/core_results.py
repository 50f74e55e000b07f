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

# (protocol, row name, eval kwargs). The first row of each protocol is Waldo's default (issue 16:
# average pooling, 128-d PCA-whitened locals, 1024-d global whitened against each photo's
# augmented views, no labels).
DEFAULT = {"backbone": "efficientnet_lite0"}
SHRINK = {**DEFAULT, "projection": "pca-shrink"}
PREVIOUS = {**DEFAULT, "projection": "pca-whiten", "dim": 128}
PLAIN = {**DEFAULT, "projection": "identity", "dim": 1280}
ROWS = [
    ("grocery-open", "lite0, avg, 1024-d views-whiten (default)", DEFAULT),
    ("grocery-open", "lite0, avg, 1024-d gently whitened PCA (pca-shrink)", SHRINK),
    ("grocery-open", "lite0, 1280-d plain average pooling (reference)", PLAIN),
    ("grocery-open-cross", "lite0, avg, 1024-d views-whiten (default)", DEFAULT),
    ("grocery-open-cross", "lite0, avg, 1024-d gently whitened PCA (pca-shrink)", SHRINK),
    ("grocery-open-cross", "lite0, avg, 128-d PCA-whitened (default before issue 16)", PREVIOUS),
    ("grocery-open-cross", "lite0, 1280-d plain average pooling (reference)", PLAIN),
    ("grocery-iconic", "lite0, avg, 1024-d views-whiten (default)", DEFAULT),
    ("coil100-open", "lite0, avg, 1024-d views-whiten (default)", DEFAULT),
    ("coil100-open", "lite0, avg, 1024-d gently whitened PCA (pca-shrink)", SHRINK),
    ("coil100-open", "lite0, avg, 128-d PCA-whitened (default before issue 16)", PREVIOUS),
    ("coil100-open", "lite0, 1280-d plain average pooling (reference)", PLAIN),
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
              "`results/core_eval.json`). Transform `resize256-crop224`; projections fitted without "
              "labels on each protocol's training images only (up to 1000 sampled). The default "
              "was chosen on validation identities (`experiments/global_sweep.py`, section "
              "\"Global descriptors\").", "", END]
    return "\n".join(lines)


def write_doc(block: str) -> None:
    write_block(DOC, block, START, END, heading="## Retrieval core: untrained descriptors (issue 2)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="only the default row of each protocol")
    parser.add_argument("--only", action="append", default=[], metavar="PROTOCOL",
                        help="run only this protocol's rows (repeatable); the other rows keep their "
                             "numbers from results/core_eval.json")
    parser.add_argument("--match", default="", metavar="TEXT", help="run only rows whose name contains TEXT")
    args = parser.parse_args()
    rows = [r for r in ROWS if (not args.quick or r[2] is DEFAULT) and (not args.only or r[0] in args.only)
            and args.match in r[1]]
    # Rows not rerun keep their last measured numbers (same row name = same settings).
    kept = {(r["protocol"], r["row"]): r for r in json.loads(RESULTS.read_text())} if RESULTS.exists() else {}
    for protocol, name, kwargs in rows:
        print(f"== {protocol}: {name}", file=sys.stderr, flush=True)
        metrics = run_eval(protocol, **kwargs)
        kept[(protocol, name)] = {"protocol": protocol, "row": name, **metrics}
        print(json.dumps(kept[(protocol, name)]), flush=True)
    results = [kept[(protocol, name)] for protocol, name, _ in ROWS if (protocol, name) in kept]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    write_doc(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
