"""Issue 15: should `waldo index adapt` stop once its held-out figure stops improving?

On grocery-open-cross's 2,640 photos adapt took 84 min (results/adapt_lr.json), and its
held-out figure peaked after the first of 8 epochs: the other 7 epochs (each ~2 min training,
~6 min validating 200 held-out photos' top-100) bought a checkpoint that was never installed.
Adapt always installs its best epoch by that held-out figure, so stopping after ``patience``
epochs without a better one changes what is installed only when a later epoch would have
improved again.

The candidate is patience 2. Rule fixed before the run: adapt's default becomes patience 2 if,
on the validation collection, the reranker it installs has rrt R@1 at least that of the
every-epoch run's and mAP no lower than the every-epoch run's - 0.002; otherwise adapt keeps
training every epoch. The validation collection is adapt_lr.py's (fold 0 of coil100-open's
training objects, labels unused, indexed with make demo's model whose global head is refitted
without that fold); both runs fine-tune at adapt's lr (FINETUNE_LR). Test collections choose
nothing; ``--test NAME`` then adapts a test protocol's collection (labels unused) with the chosen
setting and reports it beside the every-epoch run of experiments/adapt_lr.py on the same collection.

    .venv/bin/python experiments/adapt_patience.py          # both runs, ~45 min on 2 cores
    .venv/bin/python experiments/adapt_patience.py --test grocery-open-cross   # reported, ~50 min
    .venv/bin/python experiments/adapt_patience.py --test coil100-open         # reported, ~20 min
    .venv/bin/python experiments/adapt_patience.py --doc    # docs/results.md block from the JSON
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # GV runs its own threads

import argparse  # noqa: E402
import json  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

from adapt_lr import MODEL, produced_by, refitted_model  # noqa: E402
from adapt_verified import PROTOCOL, cell, study  # noqa: E402
from gv_fusion import fold_protocol, log  # noqa: E402

from waldo.data.protocols import get_protocol  # noqa: E402
from waldo.train.adapt import FINETUNE_LR  # noqa: E402
from waldo_experiments.doc_blocks import write_block  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results" / "adapt_patience.json"
ADAPT_LR = ROOT / "results" / "adapt_lr.json"
DOC = ROOT / "docs" / "results.md"
START, END = "<!-- adapt-patience:start -->", "<!-- adapt-patience:end -->"
HEADING = "### Index adapt: stop once the held-out figure stops improving?"
CANDIDATE = 2
MAP_TOLERANCE = 0.002
EVERY_EPOCH, PATIENT = "every epoch", f"patience {CANDIDATE}"


def chosen_patience(validation: dict) -> int | None:
    """The module doc's rule: CANDIDATE when its installed rrt is no worse (R@1, then mAP within
    MAP_TOLERANCE) than the every-epoch run's on the validation collection, else None (every epoch)."""
    entry = lambda name: validation["runs"][name]["protocols"][validation["protocol"]]["rrt"]  # noqa: E731
    full, patient = entry(EVERY_EPOCH), entry(PATIENT)
    keep = patient["recall@1"] >= full["recall@1"] and patient["map"] >= full["map"] - MAP_TOLERANCE
    return CANDIDATE if keep else None


def would_stop(epochs: list[dict], patience: int) -> tuple[int, int]:
    """(epoch it stops after, epoch it installs) for ``patience`` on an every-epoch run's log:
    the run is the same up to the stop (batches depend only on seed and epoch), so this is what a
    run with that patience does. The held-out score is the log's ``score`` (adapt's select metric)."""
    best_epoch, best = None, None
    for record in epochs:
        if "score" not in record:
            continue
        if best is None or record["score"] > best:
            best_epoch, best = record["epoch"], record["score"]
        if record["epoch"] - best_epoch >= patience:
            return record["epoch"], best_epoch
    return epochs[-1]["epoch"], best_epoch


def with_scores(run: dict, metric: str) -> list[dict]:
    """The run's epochs with ``score``: the held-out rrt ``metric`` adapt selects by."""
    return [{**r, "score": r["val"]["rrt"][metric]} if "val" in r else dict(r) for r in run["epochs"]]


def markdown(results: dict) -> str:
    validation = results["collections"]["validation"]
    metric = results["select_metric"]
    lines = [START, "",
             f"Whether `waldo index adapt` stops once its held-out figure ({metric} of the rrt on adapt's own "
             f"held-out photos) has not improved for {CANDIDATE} epochs (experiments/adapt_patience.py; rule fixed "
             f"before the run: patience {CANDIDATE} becomes the default if the reranker it installs has rrt R@1 "
             f"at least the every-epoch run's and mAP within {MAP_TOLERANCE} of it). Validation collection: fold 0 "
             "of coil100-open's training objects (labels unused), indexed with make demo's model whose global head "
             "is refitted without that fold; both runs fine-tune at adapt's lr.", "",
             "| run | epochs trained | installed epoch | held-out " + metric + " by epoch (0 = start) | global R@1 / mAP "
             "| rrt R@1 / mAP | default (adapt's own validation) | adapt + evaluation seconds |",
             "|---|---|---|---|---|---|---|---|"]
    for name, run in validation["runs"].items():
        entry = run["protocols"][validation["protocol"]]
        if "epochs" not in run:
            lines.append(f"| {name} | - | - | - | {cell(entry, 'global')} | {cell(entry, 'rrt')} | - | - |")
            continue
        epochs = with_scores(run, metric)
        curve = ", ".join(f"{r['score']:.4f}" for r in epochs if "score" in r)
        trained = epochs[-1]["epoch"]
        lines.append(f"| {name} | {trained} | {epochs[-1]['best_epoch']} | {curve} | {cell(entry, 'global')} "
                     f"| {cell(entry, 'rrt')} "
                     f"| {run.get('default_reranker') or '-'} | {run['adapt_seconds']:.0f} |")
    full = with_scores(validation["runs"][EVERY_EPOCH], metric)
    derived = "; ".join(f"patience {p}: stops after epoch {stop}, installs epoch {installed}"
                        for p, (stop, installed) in ((p, would_stop(full, p)) for p in (1, 2, 3)))
    chosen = results["chosen_patience"]
    lines += ["", f"What other patiences would do, read off the every-epoch run's curve: {derived}.", "",
              "Chosen on validation: " + (f"patience {chosen} (adapt's default)." if chosen
                                            else "every epoch (adapt keeps training to the end).")]
    tests = {role: c for role, c in results["collections"].items() if role != "validation"}
    if tests:
        lines += ["", "Test collections, reported (labels unused by adapt), beside adapt_lr.py's every-epoch run "
                  "of the same collection (results/adapt_lr.json):", "",
                  "| collection | run | epochs trained | installed epoch | global R@1 / mAP | rrt R@1 / mAP "
                  "| adapt + evaluation seconds |", "|---|---|---|---|---|---|---|"]
        for collection in tests.values():
            for name, run in collection["runs"].items():
                entry = run["protocols"][collection["protocol"]]
                last = (run.get("epochs") or [{}])[-1]  # adapt_lr.py's runs predate the per-epoch log
                seconds = f"{run['adapt_seconds']:.0f}" if "adapt_seconds" in run else "-"
                lines.append(f"| {collection['protocol']} | {name} | {last.get('epoch', '-')} "
                             f"| {last.get('best_epoch', '-')} | {cell(entry, 'global')} | {cell(entry, 'rrt')} "
                             f"| {seconds} |")
    lines += ["", f"Produced by {produced_by(results)} (results/adapt_patience.json).", "", END]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--doc", action="store_true", help="rewrite the docs/results.md block from the saved JSON")
    parser.add_argument("--test", default=None, metavar="PROTOCOL",
                        help="adapt this test protocol's queries + gallery with the setting validation chose "
                             "(reported; needs the validation runs in the JSON)")
    args = parser.parse_args()
    if args.doc:
        write_block(DOC, markdown(json.loads(RESULTS.read_text())), START, END, heading=HEADING)
        return 0
    from waldo.train.config import RRTTrainConfig

    command = " ".join([".venv/bin/python", "experiments/adapt_patience.py", *(shlex.quote(a) for a in sys.argv[1:])])
    rerankers = ["none", "rrt", "rrt-fusion"]
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {
        "commands": {}, "model": MODEL, "candidate": CANDIDATE, "map_tolerance": MAP_TOLERANCE,
        "select_metric": RRTTrainConfig.model_fields["select_metric"].default, "collections": {}}
    collections = results["collections"]
    if "validation" not in collections:
        validation = fold_protocol(get_protocol(PROTOCOL), 0)
        model = refitted_model(validation)
        kwargs = {EVERY_EPOCH: {"lr": FINETUNE_LR, "patience": 0},
                  PATIENT: {"lr": FINETUNE_LR, "patience": CANDIDATE}}
        collections["validation"] = study(validation, rerankers, str(model), tuple(kwargs), kwargs)
        results["commands"]["validation"] = command
    results["chosen_patience"] = chosen_patience(collections["validation"])
    log(f"chosen on validation: {results['chosen_patience']}")
    if args.test:
        chosen = results["chosen_patience"] or 0
        name = f"patience {chosen}" if chosen else EVERY_EPOCH
        collection = study(get_protocol(args.test), rerankers, MODEL, (name,),
                           {name: {"lr": FINETUNE_LR, "patience": chosen}}, unadapted=False)
        # adapt_lr.py's every-epoch run of the same collection, for comparison (not rerun)
        earlier = json.loads(ADAPT_LR.read_text())["collections"]
        for role, other in earlier.items():
            if role != "validation" and other["protocol"] == args.test:
                collection["runs"] = {f"{k} (adapt_lr.py)": v for k, v in other["runs"].items()} | collection["runs"]
        collections[f"test {args.test}"] = collection
        results["commands"][f"test {args.test}"] = command
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    log(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
