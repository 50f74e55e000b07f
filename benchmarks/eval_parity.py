"""Does a refactor leave `waldo eval` unchanged? Runs the CLI for global, gv and rrt-fusion on
grocery-open-cross and coil100-open and writes every metric to one JSON; `--compare A B` diffs two
such files to the 4th decimal.

    python benchmarks/eval_parity.py --checkpoint runs/parity-ckpt --make-checkpoint
    python benchmarks/eval_parity.py --checkpoint runs/parity-ckpt --out results/eval_parity_after.json
    python benchmarks/eval_parity.py --compare results/eval_parity_before.json results/eval_parity_after.json

rrt-fusion needs a reranker folder; ``--make-checkpoint`` writes a fixed one without training
(the untrained lite0 model fitted on grocery-open's training images, plus a seeded random
2-layer RRT and a fusion weight of 0.5), so the comparison does not depend on a training run.
Its Recall is meaningless as a quality figure; it exercises every stage of rrt-fusion.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROTOCOLS = ("grocery-open-cross", "coil100-open")


def make_checkpoint(folder: Path) -> None:
    import torch

    from waldo.data.protocols import get_protocol
    from waldo.eval.runner import default_data_dir, prepare_model
    from waldo.rerank.rrt import RerankingTransformer, RRTConfig
    from waldo.rerank.rrt_checkpoint import save_reranker

    protocol = get_protocol("grocery-open-cross", default_data_dir("grocery-open-cross"))
    model, config = prepare_model(protocol)
    torch.manual_seed(0)
    rrt = RerankingTransformer(RRTConfig(n_layers=2, ff_dim=256)).eval()
    save_reranker(folder, model, config, rrt, training={"fusion_weight": 0.5, "note": "parity fixture"})


def run_eval(protocol: str, rerank: str, model: Path | None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "metrics.json"
        command = [sys.executable, "-m", "waldo.cli", "eval", "--protocol", protocol, "--rerank", rerank,
                   "--json", str(out), "--quiet"]
        if model is not None:
            command += ["--model", str(model)]
        start = time.perf_counter()
        subprocess.run(command, check=True)
        metrics = json.loads(out.read_text())
        metrics["wall_seconds"] = round(time.perf_counter() - start, 1)
        return metrics


def flatten(metrics: dict, prefix: str = "") -> dict[str, float]:
    out = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        elif isinstance(value, float) and key.startswith(("recall@", "map")):  # not timings
            out[prefix + key] = value
    return out


def compare(a_path: Path, b_path: Path) -> int:
    a, b = json.loads(a_path.read_text()), json.loads(b_path.read_text())
    worst = 0
    for run in sorted(set(a["runs"]) | set(b["runs"])):
        fa, fb = flatten(a["runs"].get(run, {})), flatten(b["runs"].get(run, {}))
        for key in sorted(set(fa) | set(fb)):
            same = key in fa and key in fb and round(fa[key], 4) == round(fb[key], 4)
            worst += not same
            print(f"{'same' if same else 'DIFF'}  {run:32s} {key:28s} {fa.get(key)} {fb.get(key)}")
    print(f"{worst} figure(s) differ at the 4th decimal")
    return int(worst > 0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, help="reranker folder for rrt-fusion")
    parser.add_argument("--make-checkpoint", action="store_true")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--compare", nargs=2, type=Path)
    args = parser.parse_args()
    if args.compare:
        return compare(*args.compare)
    if args.make_checkpoint:
        make_checkpoint(args.checkpoint)
        return 0
    runs = {}
    for protocol in PROTOCOLS:
        runs[f"{protocol}/gv"] = run_eval(protocol, "gv", None)  # holds the global figures too
        runs[f"{protocol}/rrt-fusion"] = run_eval(protocol, "rrt-fusion", args.checkpoint)
        print(json.dumps({k: flatten(v) for k, v in runs.items()}, indent=1), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"command": " ".join(sys.argv), "runs": runs}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
