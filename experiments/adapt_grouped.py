"""Issue 15: should `waldo index adapt` group photos by verified neighbours on make demo's model?

`index adapt` trains the reranker on an index's own photos without labels, each photo its own
identity (its positives are augmented views of itself). `--group-verified` joins photos that
geometric verification says show the same object (`waldo.train.adapt.verified_groups`) so that
other *photos* of an object become positives too. experiments/adapt_verified.py measured it on
coil100 with the earlier lite0-rrt model only (grouping lost there by one validation query);
experiments/gv_positives.py found verified pairs on grocery's packages precise (93% at top-100)
and reaching half their same-identity neighbours, which augmented views of one photo never show.
Make demo's model (lite0-match-rrt) and grocery-like photos were never tried.

Rule, fixed before the run: `--group-verified` becomes adapt's default (for indexes that store
keypoints) iff on **each** validation collection the grouped run's adapted rrt R@1 is at least the
plain run's and its mAP at least the plain run's - 0.002, and on at least one of them it is
better (R@1 higher, or mAP higher by more than 0.002). Otherwise plain stays the default. The
collections are checked in order and the study stops at the first that rejects grouping:

1. grocery-open-cross:val0 (fold 0 of grocery's training classes searched like its test: 661
   test-split queries against 768 train/val photos, labels unused), indexed with make demo's
   model whose global head is refitted without that fold (experiments/adapt_lr.py's stand-in);
2. coil100-open:val0 (adapt_lr.py's validation collection, the same stand-in).

Both runs use adapt's defaults (fine-tuning lr, patience 2). Test collections choose nothing:
``--test NAME`` adapts a test protocol's queries + gallery (labels unused) with the chosen setting
and reports it beside the plain run of experiments/adapt_patience.py on that collection.

    .venv/bin/python experiments/adapt_grouped.py           # validation, ~35-60 min on 2 cores
    .venv/bin/python experiments/adapt_grouped.py --test grocery-open-cross   # reported, ~25 min
    .venv/bin/python experiments/adapt_grouped.py --doc     # docs/results.md block from the JSON
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
from adapt_verified import cell, groups_cell, study  # noqa: E402
from gv_fusion import fold_protocol, log  # noqa: E402

from waldo.data.protocols import get_protocol  # noqa: E402
from waldo_experiments.doc_blocks import write_block  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results" / "adapt_grouped.json"
ADAPT_PATIENCE = ROOT / "results" / "adapt_patience.json"
DOC = ROOT / "docs" / "results.md"
START, END = "<!-- adapt-grouped:start -->", "<!-- adapt-grouped:end -->"
HEADING = "### Index adapt: verified neighbours as positives on make demo's model"
#: Validation collections, in the order the rule checks them.
VALIDATION = ("grocery-open-cross", "coil100-open")
MAP_TOLERANCE = 0.002
PLAIN, GROUPED = "plain", "grouped"


def verdict(collection: dict) -> str:
    """"better", "no worse" or "worse": the grouped run against the plain one on one collection
    (the module doc's rule: adapted rrt R@1, then mAP within MAP_TOLERANCE)."""
    name = collection["protocol"]
    plain, grouped = (collection["runs"][v]["protocols"][name]["rrt"] for v in (PLAIN, GROUPED))
    if grouped["recall@1"] < plain["recall@1"] or grouped["map"] < plain["map"] - MAP_TOLERANCE:
        return "worse"
    if grouped["recall@1"] > plain["recall@1"] or grouped["map"] > plain["map"] + MAP_TOLERANCE:
        return "better"
    return "no worse"


def chosen(collections: dict) -> str | None:
    """GROUPED or PLAIN once the rule can decide from the validation collections measured so far,
    None while it cannot."""
    verdicts = []
    for name in VALIDATION:
        role = f"validation {name}"
        if role not in collections:
            return None
        verdicts.append(verdict(collections[role]))
        if verdicts[-1] == "worse":
            return PLAIN
    return GROUPED if "better" in verdicts else PLAIN


def markdown(results: dict) -> str:
    lines = [START, "",
             "Whether `waldo index adapt` joins photos by verified neighbours (`--group-verified`) on make demo's "
             f"model (experiments/adapt_grouped.py; rule fixed before the run: grouping becomes the default iff on each "
             f"validation collection its adapted rrt R@1 is at least plain's and its mAP at least plain's - "
             f"{MAP_TOLERANCE}, and better on one; checked in order, stopping at the first that rejects it). "
             "Validation: fold 0 of each protocol's training identities (labels unused), indexed with "
             f"{MODEL} whose global head is refitted without that fold; adapt's defaults otherwise. \"Same object\": "
             "the share of photo pairs within a group that show one identity (labels only measure).", "",
             "| collection | groups (photos, largest; same object) | reranker | global R@1 / mAP | rrt R@1 / mAP "
             "| rrt-fusion R@1 / mAP | default (adapt's own validation) | epochs trained / installed "
             "| seconds (adapt + evaluation) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for role, collection in results["collections"].items():
        groups = groups_cell(collection)
        for name, run in collection["runs"].items():
            entry = run["protocols"][collection["protocol"]]
            seconds, epochs = run.get("adapt_seconds"), run.get("epochs")
            trained = "-" if not epochs else f"{epochs[-1]['epoch']} / {epochs[-1]['best_epoch']}"
            lines.append(f"| {role.split()[0]}: {collection['protocol']} | {groups if name == GROUPED else '-'} "
                         f"| {name} | {cell(entry, 'global')} | {cell(entry, 'rrt')} | {cell(entry, 'rrt-fusion')} "
                         f"| {run.get('default_reranker') or '-'} | {trained} | {'-' if seconds is None else f'{seconds:.0f}'} |")
    verdicts = ", ".join(f"{role.split(' ', 1)[1]}: {verdict(c)}" for role, c in results["collections"].items()
                         if role.startswith("validation"))
    lines += ["", f"Grouped against plain on validation: {verdicts}. Chosen: **{results['chosen']}**.", "",
              f"Produced by {produced_by(results)} (results/adapt_grouped.json).", "", END]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--doc", action="store_true", help="rewrite the docs/results.md block from the saved JSON")
    parser.add_argument("--test", default=None, metavar="PROTOCOL",
                        help="adapt this test protocol's collection with the chosen setting (reported)")
    args = parser.parse_args()
    if args.doc:
        write_block(DOC, markdown(json.loads(RESULTS.read_text())), START, END, heading=HEADING)
        return 0
    rerankers = ["none", "rrt", "rrt-fusion"]
    command = " ".join([".venv/bin/python", "experiments/adapt_grouped.py", *(shlex.quote(a) for a in sys.argv[1:])])
    saved = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    collections, commands = saved.get("collections", {}), saved.get("commands", {})

    def save() -> None:
        results = {"commands": commands, "model": MODEL, "chosen": chosen(collections), "collections": collections}
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(results, indent=1) + "\n")
        log(f"wrote {RESULTS}")

    for name in VALIDATION:
        if chosen(collections) is not None:
            break
        role = f"validation {name}"
        if role in collections:
            continue
        validation = fold_protocol(get_protocol(name), 0)
        collections[role] = study(validation, rerankers, str(refitted_model(validation)), (PLAIN, GROUPED))
        commands[role] = command
        save()
        log(f"{role}: grouped is {verdict(collections[role])} than plain")
    decision = chosen(collections)
    log(f"chosen on validation: {decision}")
    if args.test:
        collections[f"test {args.test}"] = study(get_protocol(args.test), rerankers, MODEL, (decision,),
                                                 unadapted=False)
        commands[f"test {args.test}"] = command
        save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
