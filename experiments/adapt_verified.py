"""Issue 15: `waldo index adapt` with geometrically verified neighbours as positives.

`index adapt` trains the reranker on an index's own photos without labels; its positives are
augmented views of the same photo. experiments/gv_positives.py found (validation identities)
that verified neighbours are other photos of the same object far more often than neighbours by
global similarity. This run compares, on two collections (labels unused) — a validation one
(fold 0 of coil100-open's training objects, which decides) and the one the issue names (the
coil100-open test images, gallery + queries, reported) — starting from the shipped lite0-rrt
model and RRT:

* **plain**: `adapt_index` as shipped (every photo its own identity);
* **grouped** (`waldo index adapt --group-verified`): photos joined into groups by verified
  pairs (each photo's global top-10 verified with the index's keypoints and the product's "same
  object" claim; connected sets), each group one identity for training.

Each is evaluated on its collection's protocol (R@1 / mAP of global, rrt, rrt-fusion); the
groups' purity against the true identities is reported (never used).

    .venv/bin/python experiments/adapt_verified.py         # ~20 min on 2 cores; results/adapt_verified.json
    .venv/bin/python experiments/adapt_verified.py --doc   # docs/results.md block from the JSON

`--model lite0-lw-rrt --variants plain --out results/adapt_lw.json` measures plain adapt on
make demo's model (its own block, `--doc --out results/adapt_lw.json`).
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # GV runs its own threads

import argparse  # noqa: E402
import json  # noqa: E402
import shlex  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gv_fusion import fold_protocol, log  # noqa: E402
from rrt_views import evaluate  # noqa: E402

from waldo.api import MODEL_FOLDER, Waldo  # noqa: E402
from waldo.data.protocols import get_protocol  # noqa: E402
from waldo.models.shipped import resolve_model_dir  # noqa: E402
from waldo.train.adapt import GROUP_NEIGHBOURS, adapt_index, verified_groups  # noqa: E402
from waldo_experiments.doc_blocks import write_block  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results" / "adapt_verified.json"
DOC = ROOT / "docs" / "results.md"
START, END = "<!-- adapt-verified:start -->", "<!-- adapt-verified:end -->"
HEADING = "## Index adapt with verified neighbours as positives (issue 15)"
PROTOCOL = "coil100-open"


def purity(groups: dict[str, str], truth: dict[str, str]) -> dict:
    """How often two photos of one group show the same true identity (pairs within groups)."""
    members: dict[str, list[str]] = {}
    for path, group in groups.items():
        members.setdefault(group, []).append(truth[path])
    same = total = 0
    for labels in members.values():
        for a in range(len(labels)):
            for b in range(a + 1, len(labels)):
                total += 1
                same += labels[a] == labels[b]
    return {"pairs_in_groups": total, "same_identity": round(same / total, 4) if total else None}


def epoch_log(index_dir: Path) -> list[dict]:
    """An adapt run's log.jsonl, per epoch: its times, held-out macro figures and best epoch so far
    (0 = the starting reranker, validated before training)."""
    keep = ("epoch", "lr", "loss", "seconds", "eval_seconds", "best_epoch", "stopped_early")
    lines = (index_dir / "adapt" / "run" / "log.jsonl").read_text().splitlines()
    return [{**{k: r[k] for k in keep if k in r}, **({"val": r["val"]["macro"]} if "val" in r else {})}
            for r in map(json.loads, lines)]


def study(protocol, rerankers: list[str], model: str = "lite0-rrt",
          variants: tuple[str, ...] = ("plain", "grouped"), adapt_kwargs: dict[str, dict] | None = None,
          unadapted: bool = True) -> dict:
    """Index the protocol's query and gallery photos (labels unused) with the shipped ``model`` (a
    name or a folder); evaluate its reranker and each of ``variants`` (plain / grouped adapt, or
    any name with its ``adapt_index`` arguments in ``adapt_kwargs``) on the protocol; ``unadapted=False``
    skips evaluating the model as it is (measured elsewhere)."""
    records = {r.path: r.identity for part in (protocol.queries, protocol.gallery) for r in part.records}
    paths = sorted(records)
    with tempfile.TemporaryDirectory(prefix="adapt-verified-") as tmp:
        work = Path(tmp)
        log(f"{protocol.name}: indexing {len(paths)} photos with {model}")
        engine = Waldo.create(work / "base", model_dir=resolve_model_dir(model), progress=False)
        engine.add(paths, None, num_workers=0, progress=False)
        engine.store.close()
        groups, summary = verified_groups(work / "base", progress=False) if "grouped" in variants else ({}, None)
        log(f"groups: {summary}")
        runs = {}
        if unadapted:
            label = "the model's RRT (no adapt)" if "/" in model else "shipped (no adapt)"
            runs[label] = evaluate(work / "base" / MODEL_FOLDER, [protocol], rerankers, precision_study=False,
                                  progress=False)
        for name in variants:
            kwargs = {**(adapt_kwargs or {}).get(name, {}), **({"groups": groups} if name == "grouped" else {})}
            shutil.copytree(work / "base", work / name)
            started = time.perf_counter()
            adapted = adapt_index(work / name, progress=False, **kwargs)
            log(f"{name}: adapted in {time.perf_counter() - started:.0f} s: {adapted.get('default_reranker')}")
            runs[name] = evaluate(work / name / MODEL_FOLDER, [protocol], rerankers, precision_study=False,
                                  progress=False)
            runs[name]["adapt_seconds"] = round(time.perf_counter() - started, 1)
            runs[name]["epochs"] = epoch_log(work / name)
    return {"protocol": protocol.name, "groups": summary, "purity": purity(groups, records) if summary else None,
            "runs": runs}


def _display(path: Path) -> str:
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def _block_names(out: Path) -> tuple[str, str, str]:
    """(start marker, end marker, heading) of the docs block a results file renders into: the
    original study's, or one of its own for any other --out (e.g. another model's run)."""
    if out.resolve() == RESULTS.resolve():
        return START, END, HEADING
    name = out.stem.replace("_", "-")
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->", f"### Index adapt: {out.stem}"


def _model_words(results: dict) -> str:
    """"the shipped NAME model", or "the model trained in FOLDER" for a run folder."""
    model = results.get("model", "lite0-rrt")
    return f"the model trained in `{model}`" if "/" in model else f"the shipped {model} model"


def cell(entry: dict, key: str) -> str:
    """"R@1 / mAP" of one ranking in a protocol's figures, "-" where it was not measured."""
    m = entry.get(key)
    return "-" if m is None else f"{m['recall@1']:.4f} / {m['map']:.4f}"


def groups_cell(collection: dict) -> str:
    """"groups (grouped photos of photos, largest; same object)" of a collection's grouping, "-" without one."""
    g = collection["groups"]
    return "-" if g is None else (f"{g['groups']} ({g['grouped_photos']} of {g['photos']}, "
                                  f"{g['largest_group']}; {collection['purity']['same_identity']:.1%})")


def markdown(results: dict, start: str = START, end: str = END) -> str:
    variants = results.get("variants", ["plain", "grouped"])
    own = "model's" if "/" in results.get("model", "lite0-rrt") else "shipped"
    runs = ("run twice: every photo its own identity (plain), and with `--group-verified` (photos joined by "
            f"verified pairs among each photo's global top-{results['neighbours']}: "
            "`waldo.train.adapt.verified_groups`)" if "grouped" in variants
            else "every photo its own identity (plain)")
    lines = [start, "",
             f"A collection's photos (a protocol's queries + gallery) indexed with {_model_words(results)}, labels "
             f"unused; `adapt_index` (its default CPU recipe, starting from the {own} RRT), {runs}. The labels only "
             "measure" + (": \"same object\" is the share of photo pairs within a group that show one identity. "
                           if "grouped" in variants else ". ") +
             "The validation collection (fold 0 of coil100-open's training objects, searched like its test) "
             "decides; the test is reported.", "",
             "| collection | groups (photos, largest; same object) | adapted reranker | global R@1 / mAP | rrt R@1 / mAP "
             "| rrt-fusion R@1 / mAP | default (adapt's own validation) |",
             "|---|---|---|---|---|---|---|"]
    for role, collection in results["collections"].items():
        groups = groups_cell(collection)
        for name, run in collection["runs"].items():
            entry = run["protocols"][collection["protocol"]]
            lines.append(f"| {role}: {collection['protocol']} | {groups} | {name} | {cell(entry, 'global')} "
                         f"| {cell(entry, 'rrt')} | {cell(entry, 'rrt-fusion')} | {run.get('default_reranker') or '-'} |")
    lines += ["", f"Produced by `{results['command']}` ({results.get('out', 'results/adapt_verified.json')}).", "", end]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--doc", action="store_true", help="rewrite the docs/results.md block from the saved JSON")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where the JSON goes (and --doc reads it)")
    parser.add_argument("--model", default="lite0-rrt", help="the shipped model the collections are indexed with")
    parser.add_argument("--variants", default="plain,grouped", help="which adapt runs: plain, grouped or both")
    args = parser.parse_args()
    start, end, heading = _block_names(args.out)
    if args.doc:
        write_block(DOC, markdown(json.loads(args.out.read_text()), start, end), start, end, heading=heading)
        return 0
    variants = tuple(v for v in args.variants.split(",") if v)
    if not variants or set(variants) - {"plain", "grouped"}:
        raise SystemExit(f"--variants: plain and/or grouped, got {args.variants!r}")
    rerankers = ["none", "rrt", "rrt-fusion"]
    command = " ".join([".venv/bin/python", "experiments/adapt_verified.py", *(shlex.quote(a) for a in sys.argv[1:])])
    collections = {}
    # Validation first (fold 0 of the training objects, searched like the test): what decides; then the test.
    for role, protocol in (("validation", fold_protocol(get_protocol(PROTOCOL), 0)), ("test", get_protocol(PROTOCOL))):
        collections[role] = study(protocol, rerankers, args.model, variants)
    results = {"command": command, "neighbours": GROUP_NEIGHBOURS, "collections": collections, "model": args.model,
               "variants": list(variants), "out": _display(args.out)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
