"""Issue 16: a second grid of single-source global runs, its choice rule declared before any of
its runs existed (commit of 2026-12-05, session 5).

Why: in experiments/global_refit.py the held-out validation did not predict transfer. After the
tests were known, ``global_refit.py --transfer-check coil`` found that the other collection's
*whole* training split (identities a single-source run never saw, none of them a test identity)
ranks coil-trained runs in the grocery-open-cross test's order; on COIL the same check is
saturated. A rule found after the tests cannot be scored on the runs that suggested it, so it is
declared here for new runs (training seed 1: new held-out identities, new initial order, new
augmentations) and scored only on them.

The rule (fixed here before any run of this grid was trained):

- Sources: grocery (grocery-open's training split, configs/global-cpu.json) and coil
  (coil100-open's objects 1-50, configs/global-cpu-coil.json); the six variants of
  experiments/global_refit.py (``VARIANT_SET``), each with ``seed`` 1.
- Each run's backbone under the untrained default's projection refitted on the photos searched
  (``untrained_model(backbone_from=...)``), as global_refit.py scores it.
- Validation per run: the mean of two leave-one-out mAPs, each with the projection fitted on
  its photos without labels: (a) the run's own held-out training identities (``val_fraction``,
  seed 1), (b) the whole training split of the other collection.
- Per source, the run with the best validation mean is the choice. Ties are not broken by tests.
- Reported, never choosing: grocery-open-cross and coil100-open, R@1 and mAP, and whether each
  source's choice is at or above the untrained default (0.8221 / 0.5842, 0.9000 / 0.8786) on the
  protocol it was not trained on.

Shipping (declared 2026-12-05, session 6, after the runs were retrained from scratch and before any
trained row was scored): the grocery source's choice replaces waldo/pretrained/lite0-global if, and
only if, its validation mean is above the ImageNet row's of the same source (the same two sets).
Grocery because lite0-global is the backbone for the product's own kind of collection (shop
shelves, the demo's) and the earlier rule also shipped a grocery run; the two sources' means are
over different sets and are not compared with each other. The coil source's choice is reported
only. The tests decide nothing: they are measured from the shipped files and quoted, above or below.

    .venv/bin/python experiments/global_transfer_grid.py --train-only   # the 12 runs (~2 min each)
    .venv/bin/python experiments/global_transfer_grid.py                # score (~3.5 min a row);
                                                                        # results/global/transfer_grid.json
    .venv/bin/python experiments/global_transfer_grid.py --table
    .venv/bin/python experiments/global_transfer_grid.py --ship         # the rule above (~5 min)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from global_guard import SOURCES, VARIANTS, variant_config  # noqa: E402
from global_refit import SHIPPED_ABOUT, SHIPPED_NAME, VARIANT_SET, export_shipped, refit_loo, test_metrics  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "results" / "global" / "transfer_grid.json"
RUNS = ROOT / "runs" / "global-transfer-grid"
SEED = 1
# the training split each source trains on, and the other collection's (its whole transfer validation)
TRAIN_SPLIT = {"grocery": "grocery-open", "coil": "coil100-open"}
OTHER = {"grocery": "coil", "coil": "grocery"}


def config_of(source: str, name: str, seed: int = SEED):
    return variant_config(SOURCES[source], {**VARIANTS[name], "seed": seed})


def grocery_card(config, run: str, reproduce: list[str], chosen_on_validation: dict) -> dict:
    """lite0-global's card for a grocery-trained run with ``config``: what every grid's card says,
    and the held-out set (``check``) tests/models/test_shipped.py searches again from the files."""
    split = TRAIN_SPLIT["grocery"]
    return {
        "name": SHIPPED_NAME, **SHIPPED_ABOUT,
        "trained_on": [f"{split}:train-split (training split minus {config.val_fraction:.0%} of its identities, "
                       f"held out, seed {config.seed})"],
        "run": run,
        "train_config": {**config.model_dump(), "protocols": [split]},
        "reproduce": reproduce,
        "chosen_on_validation": {**chosen_on_validation,
                                 "check": {"protocol": split, "held_out_fraction": config.val_fraction,
                                           "seed": config.seed, "validation_key": "own held-out"}},
    }


def train_missing(config, split: str, folder: Path) -> Path:
    """``folder``'s best checkpoint, trained on ``split`` with ``config`` first if runs/ lacks it."""
    from waldo.train.global_model import train_global

    if not (folder / "best" / "config.json").is_file():
        train_global(config, None, [split], folder, progress=False)
    return folder / "best"


def trained_run(source: str, name: str) -> Path:
    return train_missing(config_of(source, name), TRAIN_SPLIT[source], RUNS / source / name)


def validate(source: str, seed: int, trained_dir: Path | None) -> dict:
    """The declared validation of one backbone (None: ImageNet's): the mean of the leave-one-out
    mAPs on the held-out training identities of ``seed`` and on the other collection's whole split."""
    from waldo.data.protocols import get_protocol
    from waldo.train.common import split_identities

    config = variant_config(SOURCES[source], {"seed": seed})
    _, held_out = split_identities(get_protocol(TRAIN_SPLIT[source]).train, config.val_fraction, config.seed)
    sets = {"own held-out": held_out, "other whole": get_protocol(TRAIN_SPLIT[OTHER[source]]).train}
    out = {"validation": {key: float(refit_loo(images, trained_dir)[1]["map"]) for key, images in sets.items()}}
    out["validation_mean"] = sum(out["validation"].values()) / len(out["validation"])
    return out


def score(source: str, trained_dir: Path | None) -> dict:
    """Validation (the declared rule) and tests of one backbone (None: ImageNet's)."""
    out = validate(source, SEED, trained_dir)
    out["tests"] = test_metrics(trained_dir)
    print(json.dumps(out), flush=True)
    return out


def chosen_row(rows: list[dict]) -> dict | None:
    """A source's choice: its trained row with the best validation mean (None before any is scored)."""
    trained = [r for r in rows if r["run"] is not None]
    return max(trained, key=lambda r: r["validation_mean"]) if trained else None


def ship(result: dict) -> int:
    """The declared shipping rule: the grocery source's choice replaces lite0-global iff its
    validation mean is above the ImageNet row's; the shipped files' tests are then measured."""
    rows = result["sources"]["grocery"]
    assert len(rows) == 1 + len(VARIANT_SET), "score the whole grid first"
    row, untrained = chosen_row(rows), next(r for r in rows if r["run"] is None)
    decision = {"source": "grocery", "run": row["run"], "validation_mean": row["validation_mean"],
                "untrained_validation_mean": untrained["validation_mean"],
                "ships": row["validation_mean"] > untrained["validation_mean"]}
    if decision["ships"]:
        config = config_of("grocery", row["run"])
        card = grocery_card(
            config, f"grocery `{row['run']}` (experiments/global_transfer_grid.py, seed {SEED})",
            [".venv/bin/python experiments/global_transfer_grid.py --train-only",
             ".venv/bin/python experiments/global_transfer_grid.py",
             ".venv/bin/python experiments/global_transfer_grid.py --ship"],
            {"rule": "experiments/global_transfer_grid.py: among the grocery-trained runs, the best mean of two "
                     "leave-one-out mAPs with the projection fitted on their photos without labels (grocery-open's "
                     "held-out training identities; coil100-open's whole training split), shipped because above "
                     "the ImageNet backbone's mean on the same sets; test queries unused",
             "validation_map": row["validation"], "validation_mean": row["validation_mean"],
             "untrained_default_validation_map": untrained["validation"],
             "untrained_default_validation_mean": untrained["validation_mean"]})
        decision["shipped"] = export_shipped(trained_run("grocery", row["run"]), card, row["tests"],
                                             untrained["tests"])
    result["ship"] = {**decision, "command": ".venv/bin/python experiments/global_transfer_grid.py --ship"}
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["ship"], indent=2))
    return 0


def table(result: dict) -> str:
    fmt = lambda m: f"{m['recall@1']:.4f} / {m['map']:.4f}"  # noqa: E731
    lines = ["| source | backbone | validation mAP: own held-out / other collection (mean) | grocery-open-cross | "
             "coil100-open |", "|---|---|---|---|---|"]
    for source, rows in result["sources"].items():
        chosen = chosen_row(rows)
        for row in rows:
            v = row["validation"]
            label = "ImageNet (the untrained default)" if row["run"] is None else f"`{row['run']}`"
            lines.append(f"| {source} | {label}{' **(chosen)**' if row is chosen else ''} | "
                         f"{v['own held-out']:.4f} / {v['other whole']:.4f} ({row['validation_mean']:.4f}) | "
                         f"{fmt(row['tests']['grocery-open-cross'])} | {fmt(row['tests']['coil100-open'])} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-only", action="store_true", help="train the missing runs, score nothing")
    parser.add_argument("--table", action="store_true")
    parser.add_argument("--ship", action="store_true", help="apply the declared shipping rule to the scored grid")
    args = parser.parse_args()
    if args.table:
        print(table(json.loads(OUT.read_text())))
        return 0
    if args.ship:
        return ship(json.loads(OUT.read_text()))
    if args.train_only:
        for source in TRAIN_SPLIT:
            for name in VARIANT_SET:
                print(f"== {source} {name}", flush=True)
                trained_run(source, name)
        return 0
    result = json.loads(OUT.read_text()) if OUT.exists() else {"sources": {}}
    for source in TRAIN_SPLIT:
        saved = {r["run"]: r for r in result["sources"].get(source, [])}
        rows = []
        for name in (None, *VARIANT_SET):
            rows.append(saved.get(name) or {"run": name, **score(source, None if name is None
                                                                  else trained_run(source, name))})
            result["sources"][source] = rows
            result["command"] = ".venv/bin/python experiments/global_transfer_grid.py"
            OUT.parent.mkdir(parents=True, exist_ok=True)
            OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
