"""Issue 15: does the fair validation see what the tests saw when make demo's model gained its colour term?

On grocery-open-cross's test queries (reported, results/rrt_views/shipped-colour-which-reranker.json)
the colour term lifted global search, and the RRT then broke first answers on loose produce that
colour had fixed (rrt against coloured global search: Fruit 6 fixed / 31 broken). The validation
that chose the weight (experiments/colour_weight.py) counted no groups and sampled 150 queries
per set. This diagnostic, which chooses nothing, counts on the same fair validation (held-out
training identities, make demo's global head refitted without them) each ranking's top-1 changes
against the global ranking of the same descriptors, per query group (grocery: Fruit / Packages /
Vegetables, from the photo's folder; the other sets as one group), at colour weight 0 and the
shipped 0.75, with every held-out query (``--max-queries 0``) or the choice's 150.

    .venv/bin/python experiments/colour_groups.py --max-queries 0   # ~5 min; results/colour_groups.json
    .venv/bin/python experiments/colour_groups.py --doc             # docs/results.md block from the JSON

``--gallery held-out`` (results/colour_groups_held-out.json, its own block): the same queries
searching only the held-out identities' gallery photos. The validation's gallery otherwise holds
every training identity's photos, and all but the held-out ones trained the RRT and the refitted
global head: the distractors are ones both have learned to reject, where a test's distractors are
as new to them as its queries. Searching the held-out identities alone makes every distractor
unseen, at the cost of a smaller gallery (fewer distractors). Still a diagnostic: chooses nothing.

    .venv/bin/python experiments/colour_groups.py --max-queries 0 --gallery held-out
    .venv/bin/python experiments/colour_groups.py --doc --gallery held-out

``--split-seed K`` (results/colour_groups_split{K}.json): other held-out identities. make demo's
RRT trained on every identity but split 0's, so on another split only an RRT trained without
that split's identities is fair: make demo's recipe with ``split_seed`` K
(configs/rrt-views-s4-match-split{K}-cpu.json, ~16 min each), given make demo's model (global
head refitted without split K's identities, as for split 0) in a stand-in folder under runs/.
``--doc-splits`` writes one block over split 0 (results/colour_groups.json) and every split run,
beside the test's figures (reported runs; they chose nothing here either).

    waldo train rrt --config configs/rrt-views-s4-match-split1-cpu.json --init runs/base-lite0-s4 \
        --out runs/rrt-views-s4-match-split1 --data grocery-open-cross --data coil100-open \
        --data ../shared/data/abo_sample                       # and split2
    .venv/bin/python experiments/colour_groups.py --max-queries 0 --split-seed 1   # and 2, ~5 min each
    .venv/bin/python experiments/colour_groups.py --doc-splits
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from waldo_experiments.doc_blocks import write_block  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results" / "colour_groups.json"
DOC = ROOT / "docs" / "results.md"
START, END = "<!-- colour-groups:start -->", "<!-- colour-groups:end -->"
HEADING = "### Does the validation see the colour term's loss on produce? (issue 15)"
#: ``--gallery held-out``: the results file and docs block of the unseen-distractor variant
HELD_OUT_RESULTS = ROOT / "results" / "colour_groups_held-out.json"
HELD_OUT_BLOCK = ("<!-- colour-groups-held-out:start -->", "<!-- colour-groups-held-out:end -->",
                  "### The same with unseen distractors only (issue 15)")


SPLITS_BLOCK = ("<!-- colour-groups-splits:start -->", "<!-- colour-groups-splits:end -->",
                "### The same on three splits of held-out identities (issue 15)")
#: the test runs of make demo's model without and with its colour term (reported; README "Which reranker when")
TEST_RUNS = {"0": "shipped-match-which-reranker.json", "0.75": "shipped-colour-which-reranker.json"}


def split_results(split_seed: int) -> Path:
    return RESULTS if split_seed == 0 else ROOT / "results" / f"colour_groups_split{split_seed}.json"


def split_model(split_seed: int) -> str:
    """make demo's model (split 0), or a stand-in folder holding it with the RRT of make demo's
    recipe trained without split ``split_seed``'s held-out identities."""
    from colour_weight import MODEL

    if split_seed == 0:
        return MODEL
    return stand_in_model(ROOT / "runs" / f"rrt-views-s4-match-split{split_seed}", f"split{split_seed}",
                          {"split_seed": split_seed})


def stand_in_model(run: Path, name: str, expect: dict) -> str:
    """A folder under runs/split-models/ holding make demo's model with ``run``'s best RRT, once
    ``run`` is finished and its train_config.json has every ``expect`` entry."""
    import shutil

    from colour_weight import MODEL

    from waldo.models.shipped import resolve_model_dir

    trained = json.loads((run / "train_config.json").read_text()) if (run / "train_config.json").is_file() else {}
    if any(trained.get(key) != value for key, value in expect.items()) or not (run / "best" / "rrt.json").is_file():
        raise SystemExit(f"{run} is not a finished run with {expect}: train it first (module doc)")
    out = ROOT / "runs" / "split-models" / name
    out.mkdir(parents=True, exist_ok=True)
    for file in ("config.json", "model.safetensors"):
        shutil.copyfile(resolve_model_dir(MODEL) / file, out / file)
    for file in ("rrt.safetensors", "rrt.json"):
        shutil.copyfile(run / "best" / file, out / file)
    return str(out)


def held_out_gallery(setup):
    """``setup`` whose validation sets search only the held-out identities' gallery photos."""
    import dataclasses

    sets = [dataclasses.replace(s, gallery=s.gallery[setup.held_out[s.gallery]]) for s in setup.sets]
    return dataclasses.replace(setup, sets=[s for s in sets if len(s.gallery) > 1])
WEIGHTS = (0.0, 0.75)
RANKINGS = ("global", "rrt", "rrt-consensus")
GROUPS = ("Fruit", "Packages", "Vegetables")


def query_group(path: str) -> str:
    """A grocery photo's group from its folder (…/Fruit/…), else "object"."""
    parts = Path(path).parts
    return next((group for group in GROUPS if group in parts), "object")


def top1_right(data: dict, scores: np.ndarray) -> np.ndarray:
    """Per query: is the first candidate by ``scores`` (ties in global order) a match?"""
    first = np.argsort(-scores, axis=1, kind="stable")[:, 0]
    return data["matches"][np.arange(len(first)), first]


def changes(setup, validator, scores: dict, rankings: tuple[str, ...] = RANKINGS[1:]) -> dict:
    """{set: {group: {ranking: {"queries", "fixed", "broken"}}}} against the global ranking, for
    each of ``rankings``."""
    out = {}
    for vset, data, index in zip(setup.sets, validator.prepared, range(len(setup.sets))):
        groups = np.array([query_group(setup.pool.paths[q]) for q in vset.queries])
        base = top1_right(data, scores["global"][index])
        entry = {}
        for group in sorted(set(groups)):
            mask = groups == group
            entry[group] = {"queries": int(mask.sum())}
            for name in rankings:
                after = top1_right(data, scores[name][index])
                entry[group][name] = {"fixed": int(np.sum(mask & after & ~base)),
                                      "broken": int(np.sum(mask & base & ~after))}
        out[vset.name] = entry
    return out


def run(max_queries: int, progress: bool, gallery: str = "all", split_seed: int = 0, val_fraction: float = 0.2,
        model: str | None = None, scores_out: Path | None = None) -> dict:
    """Every ranking's figures and per-group top-1 changes at each of :data:`WEIGHTS`; ``model``
    (default: :func:`split_model`) and ``val_fraction`` for other validations
    (experiments/rrt_half.py); ``scores_out``: a folder that keeps each weight's per-set scores
    (``w{weight}.npz``: candidates, matches, positives and every ranking's scores) for later readings."""
    from colour_weight import ranking_scores, validation_signatures
    from local_matching import validation_setup

    started = time.perf_counter()
    setup = validation_setup(model or split_model(split_seed), refit=True, max_queries=max_queries,
                             split_seed=split_seed, val_fraction=val_fraction)
    if gallery == "held-out":
        setup = held_out_gallery(setup)
    signatures = validation_signatures(setup)
    rows = {}
    for weight in WEIGHTS:
        validator, scores = ranking_scores(setup, signatures, weight, None, progress, rankings=RANKINGS)
        if scores_out is not None:
            scores_out.mkdir(parents=True, exist_ok=True)
            np.savez(scores_out / f"w{weight:g}.npz", **{
                f"{vset.name}|{key}": value for index, (vset, data) in enumerate(zip(setup.sets, validator.prepared))
                for key, value in [("candidates", data["candidates"]), ("matches", data["matches"]),
                                   ("n_positives", data["n_positives"]), ("queries", vset.queries),
                                   *((name, scores[name][index]) for name in RANKINGS)]})
        rows[f"{weight:g}"] = {"changes": changes(setup, validator, scores),
                               "figures": {name: validator.ranking(s)["sets"] for name, s in scores.items()}}
        print(json.dumps({f"w {weight:g}": rows[f"{weight:g}"]["changes"]}), flush=True)
    return {"max_queries": max_queries, "gallery": gallery, "split_seed": split_seed, "val_fraction": val_fraction,
            "sets": {s.name: len(s.queries) for s in setup.sets},
            "gallery_sizes": {s.name: len(s.gallery) for s in setup.sets}, "rows": rows,
            "refit_check_min_cosine": setup.refit_check, "seconds": round(time.perf_counter() - started, 1)}


def markdown(results: dict) -> str:
    start, end = (HELD_OUT_BLOCK[:2] if results.get("gallery") == "held-out" else (START, END))
    searched = ("; every query searches only the held-out identities' gallery photos ("
                + ", ".join(f"{name} {n}" for name, n in results["gallery_sizes"].items()) + ")"
                if results.get("gallery") == "held-out" else "")
    lines = [start, "", f"Fair validation with {'every held-out query' if not results['max_queries'] else str(results['max_queries']) + ' queries per set'} "
             f"({', '.join(f'{name} {n}' for name, n in results['sets'].items())}){searched}; top-1 fixed / broken against the "
             "global ranking of the same descriptors, per query group (a diagnostic: chooses nothing).", "",
             "| w | set | group (queries) | the set's global R@1 | " + " | ".join(f"{name}: fixed / broken" for name in RANKINGS[1:])
             + " |", "|---|---|---|---|" + "---|" * len(RANKINGS[1:])]
    for weight, row in results["rows"].items():
        for set_name, groups in row["changes"].items():
            r1 = row["figures"]["global"][set_name]["recall@1"]
            for group, entry in groups.items():
                cells = " | ".join(f"{entry[name]['fixed']} / {entry[name]['broken']}" for name in RANKINGS[1:])
                lines.append(f"| {weight} | {set_name} | {group} ({entry['queries']}) | {r1:.4f} | {cells} |")
    if results.get("gallery") == "held-out":
        lines += ["", "R@1 / mAP per set, global search and the RRT alone:", "",
                  "| w | set | global | rrt |", "|---|---|---|---|"]
        for weight, row in results["rows"].items():
            for set_name, entry in row["figures"]["global"].items():
                rrt = row["figures"]["rrt"][set_name]
                lines.append(f"| {weight} | {set_name} | {entry['recall@1']:.4f} / {entry['map']:.4f} | "
                             f"{rrt['recall@1']:.4f} / {rrt['map']:.4f} |")
    name = HELD_OUT_RESULTS.name if results.get("gallery") == "held-out" else RESULTS.name
    lines += ["", f"Produced by `{results['command']}` (results/{name}).", "", end]
    return "\n".join(lines)


def test_rrt_runs() -> list[tuple[str, dict, dict]]:
    """(colour weight, grocery-open-cross figures, the RRT's top-1 changes per group) of each
    reported test run of make demo's model (:data:`TEST_RUNS`)."""
    import rrt_views

    out = []
    for weight, name in TEST_RUNS.items():
        test = json.loads((rrt_views.RESULTS / name).read_text())["protocols"]["grocery-open-cross"]
        out.append((weight, test, test["rrt"].get("top1_changes") or {}))
    return out


def splits_markdown() -> str:
    """Grocery's held-out shelves on every measured split, beside the test (module doc)."""
    start, end, _ = SPLITS_BLOCK
    splits = [(k, json.loads(split_results(k).read_text())) for k in range(10) if split_results(k).is_file()]
    grocery = "grocery-open-cross:train"
    lines = [start, "", "Grocery's held-out products on each split (every held-out query; the RRT of make demo's recipe "
             "trained without them, make demo's global head refitted without them), global search and the RRT alone; "
             "top-1 fixed / broken of the RRT against the global ranking of the same descriptors. A diagnostic: "
             "chooses nothing.", "",
             "| split | w | queries (Fruit / Packages / Vegetables) | global R@1 / mAP | rrt R@1 / mAP | rrt fixed / broken: "
             "Fruit | Packages | Vegetables |", "|---|---|---|---|---|---|---|---|"]
    totals: dict[str, dict[str, list[int]]] = {}
    for k, results in splits:
        for weight, row in results["rows"].items():
            groups = row["changes"][grocery]
            g, r = row["figures"]["global"][grocery], row["figures"]["rrt"][grocery]
            sizes = " / ".join(str(groups.get(name, {}).get("queries", 0)) for name in GROUPS)
            cells = []
            for name in GROUPS:
                entry = groups.get(name, {}).get("rrt", {"fixed": 0, "broken": 0})
                total = totals.setdefault(weight, {}).setdefault(name, [0, 0])
                total[0], total[1] = total[0] + entry["fixed"], total[1] + entry["broken"]
                cells.append(f"{entry['fixed']} / {entry['broken']}")
            lines.append(f"| {k} | {weight} | {sizes} | {g['recall@1']:.4f} / {g['map']:.4f} | "
                         f"{r['recall@1']:.4f} / {r['map']:.4f} | " + " | ".join(cells) + " |")
    for weight, groups in totals.items():
        lines.append(f"| all | {weight} | | | | " + " | ".join(f"{groups[n][0]} / {groups[n][1]}" for n in GROUPS) + " |")
    lines += ["", "The test (grocery-open-cross, reported runs of make demo's model; README \"Which reranker when\"):", "",
              "| w | global R@1 / mAP | rrt R@1 / mAP | rrt fixed / broken: Fruit | Packages | Vegetables |",
              "|---|---|---|---|---|---|"]
    for weight, test, changes in test_rrt_runs():
        lines.append(f"| {weight} | {test['global']['recall@1']:.4f} / {test['global']['map']:.4f} | "
                     f"{test['rrt']['recall@1']:.4f} / {test['rrt']['map']:.4f} | "
                     + " | ".join(f"{changes[n]['fixed']} / {changes[n]['broken']}" if n in changes else "-"
                                  for n in GROUPS) + " |")
    commands = [r["command"] for _, r in splits]
    lines += ["", "Produced by " + ", ".join(f"`{c}`" for c in commands) + " then `.venv/bin/python "
              "experiments/colour_groups.py --doc-splits` (results/colour_groups.json, colour_groups_split*.json).", "",
              end]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-queries", type=int, default=0, help="per set (0: every held-out query)")
    parser.add_argument("--doc", action="store_true", help="rewrite the docs/results.md block from the saved JSON")
    parser.add_argument("--gallery", choices=("all", "held-out"), default="all",
                        help="the gallery each query searches: every training identity's photos (the validation's) "
                             "or the held-out identities' only (unseen distractors)")
    parser.add_argument("--split-seed", type=int, default=0,
                        help="which identities are held out (0: make demo's RRT's; others need their RRT run)")
    parser.add_argument("--doc-splits", action="store_true", help="the docs block over every split's results")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    if args.doc_splits:
        start, end, heading = SPLITS_BLOCK
        write_block(DOC, splits_markdown(), start, end, heading=heading)
        return 0
    if args.split_seed and args.gallery != "all":
        raise SystemExit("--split-seed is measured with the validation's gallery (--gallery all)")
    path, (start, end, heading) = ((HELD_OUT_RESULTS, HELD_OUT_BLOCK) if args.gallery == "held-out"
                                   else (split_results(args.split_seed), (START, END, HEADING)))
    if args.doc:
        write_block(DOC, markdown(json.loads(path.read_text())), start, end, heading=heading)
        return 0
    results = run(args.max_queries, progress=not args.quiet, gallery=args.gallery, split_seed=args.split_seed)
    results["command"] = " ".join([".venv/bin/python", "experiments/colour_groups.py",
                                   *(shlex.quote(a) for a in sys.argv[1:])])
    path.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
