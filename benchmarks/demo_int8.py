"""Does make demo's index lose anything with int8 locals (`--local-dtype int8`)?

Builds make demo's index twice (its command, float16 locals and int8 locals; or reuses the
folders given), then searches the same grocery-open-cross test queries (evenly sampled; never in
the demo's index, which holds the train / val / gallery photos) through the Python API with every
reranker that reads the locals (the RRT's tokens, local-match's cells) and compares: top-1 agreement,
top-10 overlap, R@1 by the dataset's labels, and the index's size on disk.

    .venv/bin/python benchmarks/demo_int8.py     # ~8 min on 2 cores; results/demo_int8.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results" / "demo_int8.json"
RERANKERS = ("local-match", "rrt", "rrt-fusion")


def build(out: Path, extra: list[str]) -> None:
    if (out / "manifest.json").is_file():
        return
    from waldo.paths import data_root

    subprocess.run([str(ROOT / ".venv" / "bin" / "waldo"), "index", "build", "--data", str(data_root() / "grocery_store"),
                    "--where", "split=train,val,gallery", "--model", "lite0-lw-rrt", "--local-stage", "4", "--dim", "64",
                    *extra, "--out", str(out), "--quiet"], check=True)


def size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--float16", type=Path, default=ROOT / "runs" / "demo-int8" / "float16")
    parser.add_argument("--int8", type=Path, default=ROOT / "runs" / "demo-int8" / "int8")
    parser.add_argument("--queries", type=int, default=300)
    args = parser.parse_args()
    from waldo.api import Waldo
    from waldo.data.protocols import get_protocol

    build(args.float16, [])
    build(args.int8, ["--local-dtype", "int8"])
    queries = get_protocol("grocery-open-cross").queries
    picked = np.linspace(0, len(queries.paths) - 1, min(args.queries, len(queries.paths))).round().astype(int)
    engines = {"float16": Waldo.open(args.float16), "int8": Waldo.open(args.int8)}
    hits: dict = {dtype: {name: [] for name in ("none", *RERANKERS)} for dtype in engines}
    for row in tqdm(picked, desc="queries", unit="query"):
        for dtype, engine in engines.items():
            for name in RERANKERS:
                outcome = engine.search(queries.paths[row], k=10, rerank=name)
                hits[dtype][name].append([(h.id, h.identity) for h in outcome.hits])
                if name == RERANKERS[0]:
                    hits[dtype]["none"].append([(h.id, h.identity) for h in outcome.global_hits[:10]])
    truth = [str(queries.identities[row]) for row in picked]
    out = {"queries": len(picked), "bytes": {dtype: size(folder) for dtype, folder in
                                            (("float16", args.float16), ("int8", args.int8))}, "rerankers": {}}
    for name in ("none", *RERANKERS):
        a, b = hits["float16"][name], hits["int8"][name]
        out["rerankers"][name] = {
            "same top-1": float(np.mean([x[0][0] == y[0][0] for x, y in zip(a, b)])),
            "top-10 overlap": float(np.mean([len({h[0] for h in x} & {h[0] for h in y}) / len(x) for x, y in zip(a, b)])),
            "R@1 float16": float(np.mean([x[0][1] == t for x, t in zip(a, truth)])),
            "R@1 int8": float(np.mean([y[0][1] == t for y, t in zip(b, truth)]))}
        print(name, out["rerankers"][name], flush=True)
    RESULTS.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
