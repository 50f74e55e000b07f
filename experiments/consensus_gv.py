"""Issue 15/17: geometric verification after make demo's default (``rrt-consensus+gv``), on validation.

Every RRT reranker the page lists has a ``+gv`` form (``rrt+gv``: the RRT's order, then images
with a geometric match first, by inliers: DELG's rule, kept after the RRT by
experiments/gv_after_rrt.py) except make demo's default, ``rrt-consensus``. The registry already
composes it (``waldo search --rerank rrt-consensus+gv`` runs), but it was never measured nor
listed. This study scores it on the fair validation make demo's default was chosen on
(experiments/local_matching.py's ``validation_setup``: held-out training identities of
grocery-open-cross, coil100-open and abo_sample, make demo's global head refitted without them,
150 queries per set), with the product's keypoints (ORB + TEBLID, 500 per image) and
verification (GVConfig()), beside global, gv, rrt, rrt+gv and rrt-consensus.

Rule, fixed before the run (this file is committed first): ``rrt-consensus+gv`` is **listed**
(offered on the page, in `waldo rerankers` and the API's list) iff its mean map@100 is at least
both of its parts' compositions' (``rrt-consensus`` and ``rrt+gv``), i.e. it is a menu item that
does not rank below what a user would otherwise pick; otherwise it stays callable by name and
unlisted. Whether it should be make demo's *default* is not decided here: it needs keypoints, so
an index built without them would fall back from it to global search, not to ``rrt-consensus``.
Test protocols are run only once it is listed, and are reported only.

The default (added once the product could store a chain of defaults, ``training["default_fallbacks"]``:
an index that cannot offer the first choice gets the next, not global search): the rule every
default of Waldo's has passed, on the validation rows above (measured before the test run; the
test rows choose nothing): ``rrt-consensus+gv`` becomes make demo's first choice, with
``rrt-consensus`` after it for an index without keypoints, iff it is listed, it
``earns_default`` over ``rrt-consensus`` (mean map@100 higher by more than 0.005, no set lower) and
its mean R@1 is not below ``rrt-consensus``'s (the rule experiments/rrt_seeds.py declared).

    .venv/bin/python experiments/consensus_gv.py          # ~5 min (keypoints cached under runs/)
    .venv/bin/python experiments/consensus_gv.py --store  # the default rule on the saved JSON; an adopted chain into the shipped model
    .venv/bin/python experiments/consensus_gv.py --doc    # docs/results.md block from the JSON
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

from gv_after_rrt import fused, set_inliers, verified_first_scores  # noqa: E402
from rrt_consensus import record_in_shipped  # noqa: E402

from waldo_experiments.doc_blocks import write_block  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results" / "consensus_gv.json"
DOC = ROOT / "docs" / "results.md"
START, END = "<!-- consensus-gv:start -->", "<!-- consensus-gv:end -->"
HEADING = "### Verification after make demo's default (`rrt-consensus+gv`)"
MODEL = "lite0-match-rrt"
METRIC = "map@100"
CANDIDATE = "rrt-consensus+gv"
PARTS = ("rrt-consensus", "rrt+gv")
#: make demo's default before this study, and its choice for an index without keypoints after
FALLBACK = "rrt-consensus"
STORE_COMMAND = ".venv/bin/python experiments/consensus_gv.py --store"
#: the test protocols, run after it was listed (reported only); the other rows are the earlier runs'
TEST_RESULTS = ROOT / "results" / "rrt_views" / "shipped-match-consensus-gv.json"
TEST_COMMAND = (".venv/bin/python experiments/rrt_views.py eval --model lite0-match-rrt --name shipped-match-consensus-gv "
                "--rerank none,gv,rrt-consensus,rrt-consensus+gv --quiet")
EARLIER = (("shipped-match-which-reranker.json", ("gv", "rrt+gv")), ("shipped-match-consensus.json", ("rrt-consensus",)))


def validation(progress: bool) -> dict:
    from local_matching import validation_setup

    from waldo.rerank.gv import GeometricReranker
    from waldo.rerank.rrt_rerankers import consensus_setting, neighbour_consensus

    started = time.perf_counter()
    setup = validation_setup(MODEL, refit=True)
    validator = setup.validator
    logits = validator.logits(setup.rrt)
    scale = float(setup.rrt.global_skip_scale.detach())
    k, weight = consensus_setting(setup.train_config)
    scores: dict[str, list[np.ndarray]] = {}  # each ranking's per-set (queries, top_k) scores
    with GeometricReranker() as reranker:
        config = reranker.config
        need = config.min_inliers
        for index, (vset, data, logit) in enumerate(zip(setup.sets, validator.prepared, logits)):
            inliers = set_inliers(setup, index, reranker, progress)
            glob = data["scores"].astype(np.float64)
            descriptors = validator.global_desc[data["candidates"]].astype(np.float32)
            consensus = logit + weight * scale * neighbour_consensus(logit, descriptors, k)
            rankings = {
                "global (none)": glob,
                "gv": fused(inliers, glob, need, config.fusion_weight, config.fusion_scale),
                "rrt": logit.astype(np.float64),
                "rrt+gv": verified_first_scores(inliers, logit.astype(np.float64), need),
                "rrt-consensus": consensus.astype(np.float64),
                CANDIDATE: verified_first_scores(inliers, consensus.astype(np.float64), need),
            }
            for name, set_scores in rankings.items():
                scores.setdefault(name, []).append(set_scores)
    rows = {name: validator.ranking(set_scores) for name, set_scores in scores.items()}
    listed = all(rows[CANDIDATE]["macro"][METRIC] >= rows[part]["macro"][METRIC] - 1e-12 for part in PARTS)
    return {"rows": rows, "listed": listed, "consensus": {"k": k, "weight": weight, "scale": scale},
            "gv_config": config.model_dump(), "metric": METRIC, "refit_check_min_cosine": setup.refit_check,
            "sets": [{"name": s.name, "queries": len(s.queries), "gallery": len(s.gallery)} for s in setup.sets],
            "seconds": round(time.perf_counter() - started, 1)}


def default_choice(v: dict) -> dict:
    """The default rule (this file's docstring) on the validation rows ``v``."""
    from waldo.train.rrt_online import DEFAULT_MARGIN, earns_default

    per_set = lambda name: [entry[METRIC] for entry in v["rows"][name]["sets"].values()]  # noqa: E731
    rule = {"listed": bool(v["listed"]),
            "earns_default": earns_default(per_set(CANDIDATE), per_set(FALLBACK), DEFAULT_MARGIN),
            "recall1_not_lower": v["rows"][CANDIDATE]["macro"]["recall@1"]
            >= v["rows"][FALLBACK]["macro"]["recall@1"] - 1e-9}
    adopted = all(rule.values())
    return {"rule": rule, "adopted": adopted, "chain": [CANDIDATE, FALLBACK] if adopted else [FALLBACK],
            "margin": DEFAULT_MARGIN, "metric": METRIC}


def store(results: dict) -> dict:
    """Apply the default rule to the saved validation and, when it adopts the chain, record it in
    the shipped model: rrt.json's ``training`` (``default_reranker``, ``default_fallbacks``: what
    serving reads) and the card (``chosen_on_validation``, ``reproduce``, the test run's figures,
    reported only). Rerunning it writes the same files."""
    from waldo.models.shipped import resolve_model_dir

    v = results["validation"]
    choice = default_choice(v)
    results["default"] = choice
    if not choice["adopted"]:
        print(f"{CANDIDATE} is not adopted as the default ({choice['rule']}): nothing stored")
        return results
    folder = resolve_model_dir(MODEL)
    entry = {"chain": choice["chain"], "rule": choice["rule"], "metric": METRIC, "margin": choice["margin"],
             "validation": {name: v["rows"][name]["macro"] for name in choice["chain"]},
             "command": results["commands"][0],
             "note": "the first choice needs keypoints; an index built without them gets the next (docs/results.md, "
                     "'Verification after make demo's default')"}
    stored = json.loads((folder / "rrt.json").read_text())["training"].get("default_reranker")
    if stored not in choice["chain"]:
        raise SystemExit(f"{MODEL}'s stored default is {stored!r}, not {FALLBACK!r}: "
                         "the validation above compared against another default")
    chain = {"default_reranker": choice["chain"][0], "default_fallbacks": choice["chain"][1:], "default_chain": entry}
    # the card's "default" test figures: what make demo now serves
    record_in_shipped(folder, chain, (results["commands"][0], STORE_COMMAND), TEST_RESULTS,
                      {CANDIDATE: CANDIDATE, "default": CANDIDATE}, choice=chain)
    print(f"stored {' then '.join(choice['chain'])} as {MODEL}'s default")
    return results


def markdown(results: dict) -> str:
    v = results["validation"]
    names = [s["name"] for s in v["sets"]]
    sets = ", ".join(f"{s['name']} ({s['queries']} queries, gallery {s['gallery']})" for s in v["sets"])
    lines = [START, "", f"Fair validation: {sets}; make demo's global head refitted without the held-out identities; "
             f"rrt-consensus at its stored setting (k={v['consensus']['k']}, weight {v['consensus']['weight']:g}); "
             "GV after another reranker: verified first (DELG's rule), on the global order: fused (GVConfig()).", "",
             f"| ranking | R@1 | R@10 | {v['metric']} | {v['metric']} per set ({' / '.join(names)}) |",
             "|---|---|---|---|---|"]
    for name, entry in v["rows"].items():
        per_set = " / ".join(f"{entry['sets'][n][v['metric']]:.4f}" for n in names)
        label = f"**{name}**" if name == CANDIDATE else name
        lines.append(f"| {label} | {entry['macro']['recall@1']:.4f} | {entry['macro']['recall@10']:.4f} "
                     f"| {entry['macro'][v['metric']]:.4f} | {per_set} |")
    verdict = ("**listed**: its mean map@100 is at least rrt-consensus's and rrt+gv's" if v["listed"] else
               "**not listed**: it ranks below one of rrt-consensus and rrt+gv on mean map@100 (still callable by name)")
    lines += ["", f"Rule fixed before the run (experiments/consensus_gv.py's docstring): {verdict}."]
    if "default" in results:
        d = results["default"]
        rule = d["rule"]
        lines += ["", f"The default rule (the docstring's second paragraph; the same validation rows): earns its place "
                      f"over {FALLBACK} by the default rule: {rule['earns_default']}; R@1 not lower: "
                      f"{rule['recall1_not_lower']}; listed: {rule['listed']}. "
                  + (f"**Adopted: make demo's default is {CANDIDATE}, then {FALLBACK} for an index without keypoints**"
                     if d["adopted"] else f"**Not adopted: make demo's default stays {FALLBACK}**")
                  + f" (`{STORE_COMMAND}`)."]
    if TEST_RESULTS.is_file():
        lines += ["", *test_table()]
    lines += ["",
              f"Produced by {' then '.join(f'`{c}`' for c in dict.fromkeys(results['commands']))} "
              "(results/consensus_gv.json).", "", END]
    return "\n".join(lines)


def test_table() -> list[str]:
    """The test protocols (reported only): this study's run beside the earlier runs' rows of the
    same model, which must agree on global search and on every ranking both measured; then the
    top-1 changes per query group of the rankings this run measured."""
    test = json.loads(TEST_RESULTS.read_text())["protocols"]
    earlier = [(name, json.loads((TEST_RESULTS.parent / name).read_text())["protocols"], rankings)
               for name, rankings in EARLIER]
    columns = ("global", "gv", "rrt+gv", "rrt-consensus", CANDIDATE)
    lines = [f"Test (reported, never chosen on): `{TEST_COMMAND}` (results/rrt_views/{TEST_RESULTS.name}; rrt+gv "
             f"from results/rrt_views/{EARLIER[0][0]}; the earlier runs ("
             + ", ".join(f"results/rrt_views/{name}" for name, _, _ in earlier) + ") agree with it on every ranking "
             "both measured)", "",
             "| protocol | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for protocol, entry in test.items():
        figures = {name: entry[name] for name in columns if name in entry}
        for name, other, rankings in earlier:
            for ranking in ("global", *rankings):
                mine, theirs = figures.get(ranking), other[protocol][ranking]
                if mine is None:
                    figures[ranking] = theirs
                elif any(abs(mine[m] - theirs[m]) > 1e-6 for m in ("recall@1", "map")):
                    raise SystemExit(f"{name} ranks {protocol} {ranking} otherwise than {TEST_RESULTS.name}: rerun both")
        cells = " | ".join(f"{figures[n]['recall@1']:.4f} / {figures[n]['map']:.4f}" for n in columns)
        lines.append(f"| {protocol} R@1 / mAP | {cells} |")
    changed = [name for name in columns if all("top1_changes" in test[p].get(name, {}) for p in test)]
    lines += ["", "Top-1 changes against global search per query group (fixed / broken; issue 17's table):", "",
              "| protocol | group | queries | " + " | ".join(changed) + " |", "|---|---|---|" + "---|" * len(changed)]
    for protocol, entry in test.items():
        for group, counts in entry[changed[0]]["top1_changes"].items():
            cells = " | ".join(f"{entry[n]['top1_changes'][group]['fixed']} / {entry[n]['top1_changes'][group]['broken']}"
                               for n in changed)
            lines.append(f"| {protocol} | {group} | {counts['queries']} | {cells} |")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--doc", action="store_true", help="rewrite the docs/results.md block from the saved JSON")
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--store", action="store_true",
                        help="apply the default rule to the saved JSON and record an adopted chain in the shipped model")
    args = parser.parse_args()
    if args.store:
        results = store(json.loads(RESULTS.read_text()))
        if STORE_COMMAND not in results["commands"]:
            results["commands"].append(STORE_COMMAND)
        RESULTS.write_text(json.dumps(results, indent=1) + "\n")
        return 0
    if args.doc:
        write_block(DOC, markdown(json.loads(RESULTS.read_text())), START, END, heading=HEADING)
        return 0
    command = " ".join([".venv/bin/python", "experiments/consensus_gv.py", *(shlex.quote(a) for a in sys.argv[1:])])
    results = {"commands": [command], "validation": validation(progress=not args.quiet)}
    v = results["validation"]
    print(json.dumps({name: round(row["macro"][METRIC], 4) for name, row in v["rows"].items()}), flush=True)
    print(f"{CANDIDATE}: listed {v['listed']}", flush=True)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
