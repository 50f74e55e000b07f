"""Issue 16: trained global descriptors (learned whitening) against the untrained default, on the
protocol each was trained for and on the one it never saw.

    .venv/bin/python experiments/global_trained.py run     # ~40 min on 2 cores (skips trained models present)
    .venv/bin/python experiments/global_trained.py doc     # docs/results.md block from the JSON

Models (waldo train whiten; settings chosen on validation identities and a check collection):
runs/lw-grocery (grocery-open-cross's training split; checked on coil100-open's), runs/lw-coil
(the reverse), runs/lw-mixed (both training splits + abo_sample). Each is evaluated with
``waldo eval`` on grocery-open-cross, coil100-open and grocery-open; the untrained default rows
come from results/core_eval.json (same evaluation path).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from waldo.eval.runner import run_eval
from waldo.train.sources import parse_source, pool_sources
from waldo.train.whitening import validation_searches
from waldo_experiments.doc_blocks import write_block

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results" / "global" / "trained.json"
DOC = ROOT / "docs" / "results.md"
START, END = "<!-- global-trained:start -->", "<!-- global-trained:end -->"
DATA = ROOT.parent / "shared" / "data"
MODELS = {  # name: (--data sources, --check sources, other arguments)
    "lw-grocery": (["grocery-open-cross"], ["coil100-open"], []),
    "lw-coil": (["coil100-open"], ["grocery-open-cross"], []),
    "lw-mixed": (["grocery-open-cross", "coil100-open", str(DATA / "abo_sample")], [], []),
    "lw-grocery-288": (["grocery-open-cross"], ["coil100-open"], ["--image-size", "288"]),
    "lw-mixed-288": (["grocery-open-cross", "coil100-open", str(DATA / "abo_sample")], [], ["--image-size", "288"]),
}
PROTOCOLS = ("grocery-open-cross", "coil100-open", "grocery-open")
UNTRAINED_ROW = "lite0, avg, 1024-d views-whiten (default)"


def train(name: str) -> Path:
    out = ROOT / "runs" / name
    if (out / "whitening.json").exists():
        print(f"{out} exists: not retrained", file=sys.stderr)
        return out
    data, checks, extra = MODELS[name]
    command = [sys.executable, "-m", "waldo.cli", "train", "whiten", "--out", str(out), *extra]
    command += [arg for spec in data for arg in ("--data", spec)] + [arg for spec in checks for arg in ("--check", spec)]
    subprocess.run(command, check=True, cwd=ROOT)
    return out


def query_weighted(name: str, entry: dict) -> float:
    """The chosen setting's validation mAP averaged over queries rather than over searches: the
    mean over searches that ``train whiten`` ranks by gives abo_sample's 6-photo folds the weight
    of grocery's ~1,400-photo ones. Query counts come from the sources' listings (no images read)."""
    data, checks, _ = MODELS[name]
    fit, check = [parse_source(spec) for spec in data], [parse_source(spec) for spec in checks]
    counts = {search[0]: len(search[2]) for search in validation_searches(pool_sources(fit + check), len(fit))}
    maps = entry["validation"]["validation_map"]
    return sum(counts[search] * value for search, value in maps.items()) / sum(counts[search] for search in maps)


def run(only: list[str]) -> None:
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    for name in only or MODELS:
        model = train(name)
        report = json.loads((model / "whitening.json").read_text())
        entry = {"setting": report["setting"], "validation": report["validation"][0],
                 "train_seconds": report["seconds"], "sources": [s["name"] for s in report["sources"]],
                 "checks": [s["name"] for s in report["check_sources"]], "eval": {},
                 "image_size": json.loads((model / "config.json").read_text())["image_size"]}
        for protocol in PROTOCOLS:
            print(f"== {name} on {protocol}", file=sys.stderr, flush=True)
            entry["eval"][protocol] = run_eval(protocol, model_dir=model)
        results[name] = entry
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(results, indent=2) + "\n")


def block() -> str:
    results = json.loads(RESULTS.read_text())
    core = {(r["protocol"], r["row"]): r for r in json.loads((ROOT / "results" / "core_eval.json").read_text())}
    fmt = lambda m: f"{m['recall@1']:.4f} / {m['map']:.4f}"  # noqa: E731
    lines = [START, "", "R@1 / mAP. *Untrained default*: the retrieval-core table's default row (projection fitted "
             "without labels on the protocol's training images). Trained rows: `waldo train whiten` on the "
             "named training splits (labels used), frozen ImageNet backbone; setting chosen on validation.", "",
             "| global model | trained on | setting (validation) | val mAP, query-weighted | grocery-open-cross | "
             "coil100-open | grocery-open (LOO) |",
             "|---|---|---|---|---|---|---|",
             f"| untrained default | - | - | - | {fmt(core[('grocery-open-cross', UNTRAINED_ROW)])} | "
             f"{fmt(core[('coil100-open', UNTRAINED_ROW)])} | {fmt(core[('grocery-open', UNTRAINED_ROW)])} |"]
    for name, entry in results.items():
        setting = entry["setting"]
        checked = f"; checked on {', '.join(entry['checks'])}" if entry["checks"] else ""
        if entry.get("image_size", 224) != 224:
            checked += f"; {entry['image_size']} px input"
        lines.append(f"| `{name}` | {', '.join(Path(s).name for s in entry['sources'])}{checked} | dim {setting['dim']}, "
                     f"shrink {setting['shrink']:g}, mix {setting['mix']:g} (val mAP {entry['validation']['mean_map']:.4f}) | "
                     f"{query_weighted(name, entry):.4f} | "
                     + " | ".join(fmt(entry["eval"][p]) for p in PROTOCOLS) + " |")
    lines += ["", "Produced by `.venv/bin/python experiments/global_trained.py run` then `doc` "
              "(results/global/trained.json); each model trains in about 8 minutes on 2 cores "
              "(feature extraction of the training images is most of it).", "", END]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("run", "doc"))
    parser.add_argument("--only", action="append", default=[], choices=sorted(MODELS),
                        help="train/evaluate only this model (repeatable); the others keep their results")
    args = parser.parse_args()
    if args.command == "run":
        run(args.only)
    write_block(DOC, block(), START, END, heading="## Trained global descriptors: learned whitening (issue 16)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
