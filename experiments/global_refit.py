"""Issue 16: keep a trained backbone, refit the label-free projection on the indexed collection.

A trained global model carries a projection fitted on its source, and that is where much of its
transfer loss begins: the untrained default's own recipe (views-whiten) fitted on coil's photos
scores 0.7836 / 0.5284 on grocery-open-cross, against 0.8221 / 0.5842 fitted on grocery's
(experiments/global_guard.py's start rows). Here only the *backbone* of an SGD run of
experiments/global_guard.py is kept, and the global and local projections are the untrained
default's, fitted without labels on the photos of the collection being searched, as
`waldo index build` fits an untrained model. The untrained default (ImageNet backbone, the same
fit) is the reference row.

Validation (chooses; never test queries): per collection, the held-out identities of its
training split (the guard runs' own split: no run saw them) searched leave-one-out, with the
projection fitted on those photos, labels unused; the mean of the two collections' mAPs chooses
one run per source. Tests (reported): grocery-open-cross and coil100-open, each fitted on its
protocol's training images as the untrained default is. Average-pooling runs only (a learnt GeM
exponent is not part of the backbone). Runs missing from runs/global-guard* are trained first
(``train_global``, the guard's config; ~4 min each).

    .venv/bin/python experiments/global_refit.py     # ~27 min on 2 cores (3 runs trained); results/global/refit.json
    .venv/bin/python experiments/global_refit.py --table
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from global_guard import SOURCES, variant_config, VARIANTS  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "results" / "global" / "refit.json"
TESTS = {"grocery": "grocery-open-cross", "coil": "coil100-open"}
CHECKS = {"grocery": "grocery-open", "coil": "coil100-open"}  # the training splits the guard runs split
RUNS = {"grocery": ("sgd", "sgd-anchor-0.1", "sgd-views-anchor-0.1"),
        "coil": ("sgd-anchor-0.01", "sgd-anchor-0.1", "sgd-views-anchor-0.1")}


def score(trained_dir: Path | None) -> dict:
    """Validation and tests of the untrained default's recipe on ``trained_dir``'s backbone."""
    from waldo.data.protocols import get_protocol
    from waldo.data.transforms import get_transform
    from waldo.eval.evaluate import evaluate_protocol
    from waldo.eval.runner import prepare_model
    from waldo.models.untrained import untrained_model
    from waldo.train.common import LooEvaluator, split_identities

    transform = get_transform("resize256-crop224", 224)
    out = {"validation": {}, "tests": {}}
    # the product's option (untrained_model / prepare_model ``backbone_from``), as an index would use it
    for collection, test in TESTS.items():
        # the held-out identities of the collection's training split (the guard runs' own split), for
        # every row alike: a run never saw them, whichever collection it was trained on
        config = variant_config(SOURCES[collection], {})
        _, check = split_identities(get_protocol(CHECKS[collection]).train, config.val_fraction, config.seed)
        model, _ = untrained_model("efficientnet_lite0", fit_paths=check.paths, fit_source=check.name,
                                   progress=False, backbone_from=trained_dir)
        out["validation"][collection] = float(LooEvaluator(check, transform)(model)["map"])
        model, _ = prepare_model(get_protocol(test), progress=False, backbone_from=trained_dir)
        run = evaluate_protocol(model, get_protocol(test), transform, progress=False)
        out["tests"][test] = {k: float(run.metrics[k]) for k in ("recall@1", "map")}
    out["validation_mean"] = sum(out["validation"].values()) / len(out["validation"])
    print(json.dumps(out), flush=True)
    return out


def trained_run(source: str, name: str) -> Path:
    from waldo.train.global_model import train_global

    src = SOURCES[source]
    best = src.runs / name / "best"
    if not (best / "config.json").is_file():
        train_global(variant_config(src, VARIANTS[name]), None, src.train, src.runs / name, progress=False)
    return best


def table(result: dict) -> str:
    lines = ["| backbone | validation mAP: grocery / coil (mean) | grocery-open-cross | coil100-open |",
             "|---|---|---|---|"]
    fmt = lambda m: f"{m['recall@1']:.4f} / {m['map']:.4f}"  # noqa: E731
    chosen = {source: max((r for r in result["rows"] if r["source"] == source), key=lambda r: r["validation_mean"])
              for source in RUNS if any(r["source"] == source for r in result["rows"])}
    for row in result["rows"]:
        v = row["validation"]
        label = row["label"] + (" **(chosen)**" if chosen.get(row["source"]) is row else "")
        lines.append(f"| {label} | {v['grocery']:.4f} / {v['coil']:.4f} ({row['validation_mean']:.4f}) | "
                     f"{fmt(row['tests']['grocery-open-cross'])} | {fmt(row['tests']['coil100-open'])} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table", action="store_true")
    args = parser.parse_args()
    if args.table:
        print(table(json.loads(OUT.read_text())))
        return 0
    rows = [{"label": "ImageNet (the untrained default)", "source": None, "run": None, **score(None)}]
    for source, names in RUNS.items():
        for name in names:
            best = trained_run(source, name)
            rows.append({"label": f"{source}-trained `{name}`, projection refitted", "source": source, "run": name,
                         **score(best)})
            OUT.write_text(json.dumps({"rows": rows, "command": ".venv/bin/python experiments/global_refit.py"},
                                      indent=2) + "\n")
    print(table({"rows": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
