"""Issue 16: the transfer grid's grocery choice averaged over three training seeds, the rule
declared before any run of seeds 2 and 3 existed (commit of 2026-12-06, session 7).

Why: experiments/global_transfer_grid.py chose among six grocery-trained variants on one seed, so
on one draw of held-out identities (20% of grocery-open's training products) and one training run
each. Its validation means lie within 0.01 of each other (0.8597 to 0.8694 for five of the six),
about what one run's noise can move them; one seed cannot tell a better variant from a lucky run.
The test figures of seed 1 are known (docs/results.md), so this rule was written knowing them and
is scored only on new runs: seeds 2 and 3 (new held-out identities, new initial order, new
augmentations). The validation of each run is exactly the grid's; the one change is that a
variant is judged by its mean over the three seeds, as cross-validation would judge it.

The rule (fixed here before any run of seeds 2 and 3 was trained):

- Source: grocery (grocery-open's training split, configs/global-cpu.json), the source whose choice
  ships as lite0-global. Variants: global_refit.py's ``VARIANT_SET`` (six). Seeds 1, 2, 3: seed 1
  is the transfer grid's run, reused (same config, same folder); seeds 2 and 3 are trained here.
- Each run's validation is the transfer grid's: with the ImageNet default's recipe refitted on the
  run's backbone (projection fitted on the photos searched, no labels), the mean of two
  leave-one-out mAPs: (a) the held-out training identities of that run's seed, (b) coil100-open's
  whole training split. The ImageNet backbone is scored on the same sets for each seed.
- A variant's score is the mean of its three runs' validation means; the ImageNet score is the mean
  of its three. The variant with the best score is the choice; within it, the run (seed) with the
  best validation mean is the one shipped (amended below: the largest margin over ImageNet). Ties
  are not broken by tests.
- Shipping: that run replaces waldo/pretrained/lite0-global if, and only if, the chosen variant's
  score is above the ImageNet score. Otherwise lite0-global stays as it is (the grid's choice).
- Reported, never choosing: every run's grocery-open-cross and coil100-open R@1 and mAP, and the
  shipped files' own figures (``waldo eval --backbone-from lite0-global``).

Amended (commit of 2026-12-06, session 7) after every run's validation was scored and before any
test of seeds 2 and 3 was: the pick of a seed *within* the chosen variant compared raw validation
means, but each seed's held-out products are another set, and seed 3's are far easier for every
backbone (the ImageNet backbone's mean: 0.8428 / 0.8471 / 0.9212 for seeds 1 / 2 / 3), so it
picked the easiest set, not the best run. The run shipped is instead the chosen variant's seed
with the largest *margin*, its validation mean minus the ImageNet backbone's on that seed's sets.
The variant choice is unchanged by this (a variant's mean margin is its score minus the ImageNet
score, the same for every variant); the validation figures alone prompted the amendment.

    .venv/bin/python experiments/global_seed_grid.py --train-only   # the 12 new runs (~2 min each)
    .venv/bin/python experiments/global_seed_grid.py                # validation of every run, then
                                                                    # tests; results/global/seed_grid.json
    .venv/bin/python experiments/global_seed_grid.py --table
    .venv/bin/python experiments/global_seed_grid.py --ship         # the rule above (~5 min)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from global_refit import VARIANT_SET, export_shipped, test_metrics  # noqa: E402
from global_transfer_grid import OUT as GRID_OUT  # noqa: E402
from global_transfer_grid import RUNS as GRID_RUNS  # noqa: E402
from global_transfer_grid import TRAIN_SPLIT as GRID_SPLITS  # noqa: E402
from global_transfer_grid import config_of as grid_config  # noqa: E402
from global_transfer_grid import grocery_card, train_missing, validate  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "results" / "global" / "seed_grid.json"
RUNS = ROOT / "runs" / "global-seed-grid"
SEEDS = (1, 2, 3)
GRID_SEED = 1  # the transfer grid's seed: its runs and rows are reused, not retrained
TRAIN_SPLIT = GRID_SPLITS["grocery"]


def config_of(name: str, seed: int):
    return grid_config("grocery", name, seed)


def run_folder(name: str, seed: int) -> Path:
    return (GRID_RUNS / "grocery" / name) if seed == GRID_SEED else (RUNS / f"seed-{seed}" / name)


def trained_run(name: str, seed: int) -> Path:
    return train_missing(config_of(name, seed), TRAIN_SPLIT, run_folder(name, seed))


def validation(seed: int, trained_dir: Path | None) -> dict:
    """The transfer grid's validation of one backbone (None: ImageNet's) on ``seed``'s sets."""
    out = validate("grocery", seed, trained_dir)
    print(json.dumps({"seed": seed, "run": None if trained_dir is None else str(trained_dir), **out}), flush=True)
    return out


def scores(rows: list[dict]) -> dict:
    """Each backbone's score: the mean of its validation means over the seeds (None: ImageNet)."""
    out = {}
    for name in (None, *VARIANT_SET):
        means = [r["validation_mean"] for r in rows if r["run"] == name]
        if len(means) == len(SEEDS):
            out[name] = sum(means) / len(means)
    return out


def choice(rows: list[dict]) -> dict | None:
    """The declared rule: the best-scoring variant and, within it, its best-validated run."""
    score = scores(rows)
    if len(score) < 1 + len(VARIANT_SET):
        return None
    name = max(VARIANT_SET, key=lambda n: score[n])
    row = max((r for r in rows if r["run"] == name), key=lambda r: margin(rows, r))
    return {"run": name, "seed": row["seed"], "margin": margin(rows, row), "score": score[name],
            "untrained_score": score[None], "ships": score[name] > score[None]}


def margin(rows: list[dict], row: dict) -> float:
    """A run's validation mean above the ImageNet backbone's on the same seed's sets (the amendment)."""
    return row["validation_mean"] - find(rows, None, row["seed"])["validation_mean"]


def find(rows: list[dict], name: str | None, seed: int) -> dict | None:
    return next((r for r in rows if r["run"] == name and r["seed"] == seed), None)


def ship(result: dict) -> int:
    rows = result["rows"]
    decision = choice(rows)
    assert decision is not None, "score every run's validation first"
    row, untrained = find(rows, decision["run"], decision["seed"]), find(rows, None, GRID_SEED)
    assert "tests" in row and "tests" in untrained, "score the tests first"
    if decision["ships"]:
        config = config_of(decision["run"], decision["seed"])
        imagenet = find(rows, None, decision["seed"])
        card = grocery_card(
            config, f"grocery `{decision['run']}`, seed {decision['seed']} (experiments/global_seed_grid.py)",
            [".venv/bin/python experiments/global_transfer_grid.py --train-only",
             ".venv/bin/python experiments/global_seed_grid.py --train-only",
             ".venv/bin/python experiments/global_seed_grid.py",
             ".venv/bin/python experiments/global_seed_grid.py --ship"],
            {"rule": "experiments/global_seed_grid.py: among six grocery-trained variants, each trained with "
                     "seeds 1-3, the best mean over the seeds of the mean of two leave-one-out mAPs with the "
                     "projection fitted on their photos without labels (the seed's held-out grocery-open training "
                     "identities; coil100-open's whole training split); within it the seed furthest above the "
                     "ImageNet backbone on that seed's sets; "
                     "shipped because above the ImageNet backbone's mean on the same sets; test queries unused",
             "validation_map": row["validation"], "validation_mean": row["validation_mean"],
             "variant_score": decision["score"], "untrained_default_score": decision["untrained_score"],
             "untrained_default_validation_map": imagenet["validation"],
             "untrained_default_validation_mean": imagenet["validation_mean"]})
        decision["shipped"] = export_shipped(trained_run(decision["run"], decision["seed"]), card, row["tests"],
                                             untrained["tests"])
    result["ship"] = {**decision, "command": ".venv/bin/python experiments/global_seed_grid.py --ship"}
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["ship"], indent=2))
    return 0


def table(result: dict) -> str:
    fmt = lambda m: f"{m['recall@1']:.4f} / {m['map']:.4f}"  # noqa: E731
    rows, score = result["rows"], scores(result["rows"])
    chosen = choice(rows)
    lines = ["| backbone | validation mean, seed 1 / 2 / 3 (score) | grocery-open-cross R@1 / mAP, seed 1 / 2 / 3 "
             "(mean) | coil100-open R@1 / mAP, seed 1 / 2 / 3 (mean) |", "|---|---|---|---|"]
    for name in (None, *VARIANT_SET):
        found = [find(rows, name, s) for s in SEEDS]
        label = "ImageNet (the untrained default)" if name is None else f"`{name}`"
        if chosen and name == chosen["run"]:
            label += f" **(chosen; seed {chosen['seed']} shipped)**" if chosen["ships"] else " **(chosen)**"
        vals = " / ".join("-" if r is None else f"{r['validation_mean']:.4f}" for r in found)
        cells = [f"{label}", f"{vals} ({score[name]:.4f})" if name in score else vals]
        for test in ("grocery-open-cross", "coil100-open"):
            ms = [r["tests"][test] for r in found if r is not None and "tests" in r]
            if name is None and ms:
                cells.append(f"{fmt(ms[0])} (seed-independent)")
                continue
            each = " / ".join(f"{m['recall@1']:.4f}" for m in ms)
            mean = (f"{sum(m['recall@1'] for m in ms) / len(ms):.4f} / {sum(m['map'] for m in ms) / len(ms):.4f}"
                    if len(ms) == len(SEEDS) else "-")
            cells.append(f"{each} ({mean})" if ms else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def save(result: dict) -> None:
    result["command"] = ".venv/bin/python experiments/global_seed_grid.py"
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-only", action="store_true", help="train the missing runs, score nothing")
    parser.add_argument("--validation-only", action="store_true", help="score every run's validation, no tests")
    parser.add_argument("--table", action="store_true")
    parser.add_argument("--ship", action="store_true", help="apply the declared shipping rule to the scored runs")
    args = parser.parse_args()
    if args.table:
        print(table(json.loads(OUT.read_text())))
        return 0
    if args.ship:
        return ship(json.loads(OUT.read_text()))
    if args.train_only:
        for seed in SEEDS:
            for name in VARIANT_SET:
                print(f"== seed {seed} {name}", flush=True)
                trained_run(name, seed)
        return 0
    result = json.loads(OUT.read_text()) if OUT.exists() else {"rows": []}
    rows = result["rows"]
    # seed 1: the transfer grid's grocery rows (same runs, same validation sets), copied, not rescored
    for grid_row in json.loads(GRID_OUT.read_text())["sources"]["grocery"]:
        if find(rows, grid_row["run"], GRID_SEED) is None:
            rows.append({**grid_row, "seed": GRID_SEED})
    save(result)
    # validation of every run first (it alone chooses), then the tests (reported)
    for seed in SEEDS:
        for name in (None, *VARIANT_SET):
            if find(rows, name, seed) is None:
                rows.append({"run": name, "seed": seed,
                             **validation(seed, None if name is None else trained_run(name, seed))})
                save(result)
    if not args.validation_only:
        for seed in SEEDS:
            for name in VARIANT_SET:
                row = find(rows, name, seed)
                if "tests" not in row:
                    row["tests"] = test_metrics(trained_run(name, seed))
                    print(json.dumps({"seed": seed, "run": name, "tests": row["tests"]}), flush=True)
                    save(result)
    print(table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
