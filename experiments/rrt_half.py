"""Issue 15, point 7: a validation that sees what the test sees? Half the identities held out,
searched among unseen distractors only (a diagnostic, rule declared before the run).

On grocery-open-cross's test, make demo's RRT falls below the global ranking it reranks once the
model carries its colour term (R@1 0.8889 against 0.9098; Fruit first answers 6 fixed / 31
broken), where it was above the colourless ranking (0.8972 against 0.8906). No validation measured
so far shows that (experiments/colour_groups.py): the fair validation (a fifth of the identities
held out) searches among every training identity's photos, distractors the RRT and the refitted
global head have learned; searching the held-out fifth's photos only (``--gallery held-out``)
makes every distractor unseen, as in a test, but leaves grocery a 350-photo gallery where global
search is nearly right every time. The test searches 40 unseen classes' photos.

This validation holds out **half** of each source's identities (make demo's recipe with
``val_fraction`` 0.5, configs/rrt-views-s4-match-half-cpu.json; the RRT learns from the other
half only) and lets their test-split photos search only their own gallery photos, so every
distractor is unseen by the RRT and by make demo's global head (refitted without the held-out
half), in a gallery of about the test's size. make demo's model with this RRT (a stand-in folder
under runs/split-models/), at colour weight 0 and 0.75 (make demo's), global search, the RRT
alone and rrt-consensus (make demo's stored setting), top-1 fixed / broken per query group
(experiments/colour_groups.py's reading):

    waldo train rrt --config configs/rrt-views-s4-match-half-cpu.json --init runs/base-lite0-s4 \\
        --out runs/rrt-views-s4-match-half --data grocery-open-cross --data coil100-open \\
        --data ../shared/data/abo_sample                                     # ~16 min on 2 cores
    .venv/bin/python experiments/rrt_half.py          # ~10 min; results/rrt_half.json
    .venv/bin/python experiments/rrt_half.py --doc    # docs/results.md block from the JSON

(runs/base-lite0-s4: ``python experiments/rrt_views.py base --out runs/base-lite0-s4
--projection views-whiten --dim 64 --local-stage 4``.)

**Rule, declared before the run** (:func:`verdict`): this validation *reproduces the test's
signature* when, on grocery's held-out half, all three hold:

(i) at w 0.75 the RRT alone has a lower R@1 than global search;
(ii) at w 0.75 the RRT breaks more Fruit first answers than it fixes;
(iii) the RRT's R@1 gain over global search is smaller at w 0.75 than at w 0.

It chooses nothing. If it reproduces the signature, it is the validation on which a later,
separately declared study may choose what make demo's RRT does with the colour term; if not, it
is recorded as one more validation that does not predict the test. Each run's per-set scores are
kept under runs/rrt-half-scores/ (``w{weight}.npz``) for such a study.

**The follow-up, declared here with the rule above and before any figure of this validation was
read** (``--fusion``; :func:`choose_fusion`): only where the verdict reproduces the test's
signature. make demo's ``rrt-fusion`` ranks by lambda * global + (1 - lambda) * sigmoid(logit)
(waldo.rerank.rrt_rerankers.fuse_scores) with the lambda its run chose on the colourless
validation (0.0: the RRT alone). On this validation at w 0.75, over the training's grid (lambda
1, 0.95, ..., 0), among the weights whose R@1 is not below global search's on any set, the best
mean map@100 over the sets (ties: the larger lambda). If that lambda is below 1 and differs from
the stored one, ``--fusion --store`` writes it into make demo's rrt.json (``fusion_weight``, with
this study named in ``fusion_choice``); the test protocols are then run for rrt-fusion and
reported only. A lambda of 1 (no mix keeps the RRT from falling below global search) stores
nothing. The half RRT is not make demo's: the weight is carried over between two RRTs of one
recipe, which the fair validation's figures of make demo's RRT at the chosen weight (reported,
not a condition) show the cost of.

    .venv/bin/python experiments/rrt_half.py --fusion            # seconds; results/rrt_half_fusion.json
    .venv/bin/python experiments/rrt_half.py --fusion --store     # writes the weight, if chosen

**The default chain on this validation** (``--chain``, a diagnostic: chooses nothing; declared
after the diagnostic's global / rrt / rrt-consensus figures and the follow-up were read, before
any figure with verification): the product's keypoints and GVConfig() verify every held-out
query's top-100 at w 0.75, and the rules that built make demo's default are applied in the
product's order (:func:`default_chain`): from global search, ``rrt`` and then ``rrt-consensus``
(make demo's stored k 3, weight 1; rrt-fusion is global search here, lambda 1) each replace the
default so far iff it ``earns_default`` (mean map@100 higher by more than 0.005, no set lower);
then the default's ``+gv`` form (after global search: ``gv``, the product's fused rule; after an
RRT ranking: verified first) replaces it iff it earns it and its mean R@1 is not lower (the rule
experiments/consensus_gv.py declared). The result says which default this validation would give
make demo's recipe; whether defaults should be chosen on it is left to a later decision that
would re-make every choice on it.

    .venv/bin/python experiments/rrt_half.py --chain    # ~5 min; results/rrt_half_chain.json

**A second sample** (``--split-seed 1``, declared before its run): another random half held out
(configs/rrt-views-s4-match-half-split1-cpu.json), the same diagnostic rule and the same chain
diagnostic, its own results and docs block; reported, chooses nothing. With split 0 it is the
validation a later decision on make demo's default chain could be declared on. A third sample,
``--split-seed 2`` (configs/rrt-views-s4-match-half-split2-cpu.json), declared after split 1's
figures were read and before its own run: the same rule, the same chain diagnostic, reported.

    waldo train rrt --config configs/rrt-views-s4-match-half-split1-cpu.json --init runs/base-lite0-s4 \\
        --out runs/rrt-views-s4-match-half-split1 --data grocery-open-cross --data coil100-open \\
        --data ../shared/data/abo_sample
    .venv/bin/python experiments/rrt_half.py --split-seed 1
    .venv/bin/python experiments/rrt_half.py --split-seed 1 --chain      # and 2
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from waldo_experiments.doc_blocks import write_block  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RUN = ROOT / "runs" / "rrt-views-s4-match-half"
SCORES = ROOT / "runs" / "rrt-half-scores"
RESULTS = ROOT / "results" / "rrt_half.json"
DOC = ROOT / "docs" / "results.md"
START, END = "<!-- rrt-half:start -->", "<!-- rrt-half:end -->"
HEADING = "### Half the identities held out, unseen distractors only (issue 15, a diagnostic)"
GROCERY = "grocery-open-cross:train"
VAL_FRACTION = 0.5


def split_paths(split_seed: int, swap: bool = False) -> dict:
    """Where split ``split_seed``'s run, kept scores, results and docs block live (split 0: the
    first sample, configs/rrt-views-s4-match-half-cpu.json; K: ...-half-splitK-cpu.json; split 0
    with ``swap``: ...-half-swap-cpu.json, experiments/rrt_swap.py's diagnostic)."""
    if swap:
        if split_seed:
            raise SystemExit("the swapped-pairs diagnostic was declared on split 0 only (experiments/rrt_swap.py)")
        return {"run": ROOT / "runs" / "rrt-views-s4-match-half-swap", "scores": ROOT / "runs" / "rrt-half-scores-swap",
                "results": ROOT / "results" / "rrt_half_swap.json",
                "chain": ROOT / "results" / "rrt_half_chain_swap.json",
                "block": ("<!-- rrt-half-swap:start -->", "<!-- rrt-half-swap:end -->",
                          "### The same half with swapped pairs (issue 15, a diagnostic)"),
                "stand_in": "half-swap", "expect": {"swap_prob": 0.5}}
    if split_seed == 0:
        return {"run": RUN, "scores": SCORES, "results": RESULTS, "chain": ROOT / "results" / "rrt_half_chain.json",
                "block": (START, END, HEADING), "stand_in": "half"}
    suffix = f"split{split_seed}"
    return {"run": ROOT / "runs" / f"rrt-views-s4-match-half-{suffix}", "scores": ROOT / "runs" / f"rrt-half-scores-{suffix}",
            "results": ROOT / "results" / f"rrt_half_{suffix}.json",
            "chain": ROOT / "results" / f"rrt_half_chain_{suffix}.json",
            "block": (f"<!-- rrt-half-{suffix}:start -->", f"<!-- rrt-half-{suffix}:end -->",
                      f"### The same on another random half, split {split_seed} (issue 15, a diagnostic)"),
            "stand_in": f"half-{suffix}"}


def verdict(results: dict) -> dict:
    """The rule of the module doc on a run's results."""
    rows = results["rows"]

    def gain(weight: str) -> float:
        figures = rows[weight]["figures"]
        return figures["rrt"][GROCERY]["recall@1"] - figures["global"][GROCERY]["recall@1"]

    fruit = rows["0.75"]["changes"][GROCERY].get("Fruit", {}).get("rrt", {"fixed": 0, "broken": 0})
    checks = {"rrt_below_global_coloured": gain("0.75") < 0,
              "fruit_broken_over_fixed_coloured": fruit["broken"] > fruit["fixed"],
              "colour_shrinks_rrt_gain": gain("0.75") < gain("0")}
    return {**checks, "gain_w0": round(gain("0"), 4), "gain_w0.75": round(gain("0.75"), 4),
            "fruit_w0.75": fruit, "reproduces": all(checks.values())}


def half_model(where: dict, split_seed: int) -> str:
    """make demo's model with the half run's RRT, once that run is the one ``where`` names."""
    from colour_groups import stand_in_model

    return stand_in_model(where["run"], where["stand_in"],
                          {"val_fraction": VAL_FRACTION, "split_seed": split_seed, **where.get("expect", {})})


def run(progress: bool, split_seed: int = 0, swap: bool = False) -> dict:
    from colour_groups import run as groups_run

    where = split_paths(split_seed, swap)
    model = half_model(where, split_seed)
    results = groups_run(0, progress, gallery="held-out", split_seed=split_seed, val_fraction=VAL_FRACTION, model=model,
                         scores_out=where["scores"])
    results["verdict"] = verdict(results)
    results["swap"] = swap
    return results


FUSION_RESULTS = ROOT / "results" / "rrt_half_fusion.json"
FUSION_GRID = 20  #: the training's grid (configs' fusion_grid): lambda = i / 20


def fusion_cells(scores_file: Path) -> tuple[dict, list[dict]]:
    """Global search's per-set figures and each grid lambda's rrt-fusion figures from a run's kept
    scores (``w{weight}.npz``)."""
    from waldo.eval.metrics import retrieval_metrics
    from waldo.rerank.rrt_rerankers import fuse_scores

    kept = np.load(scores_file)
    sets = sorted({key.split("|")[0] for key in kept.files})

    def figures(name: str, scores) -> dict:
        matches = kept[f"{name}|matches"]
        if scores is not None:
            matches = np.take_along_axis(matches, np.argsort(-scores, axis=1, kind="stable"), 1)
        metrics = retrieval_metrics(matches, kept[f"{name}|n_positives"], ks=(1, 10))
        return {metric: float(metrics[metric]) for metric in ("recall@1", "recall@10", "map@100")}

    base = {name: figures(name, None) for name in sets}
    cells = []
    for i in range(FUSION_GRID, -1, -1):
        weight = i / FUSION_GRID
        per_set = {name: figures(name, fuse_scores(kept[f"{name}|global"], kept[f"{name}|rrt"], weight)) for name in sets}
        cells.append({"weight": weight, "sets": per_set,
                      "macro": {m: float(np.mean([e[m] for e in per_set.values()])) for m in ("recall@1", "map@100")}})
    return base, cells


def choose_fusion(base: dict, cells: list[dict]) -> dict:
    """The follow-up's rule (module doc): among cells with R@1 not below global search's on any
    set, the best mean map@100, ties to the larger lambda (the cells run from lambda 1 down)."""
    allowed = [c for c in cells if all(c["sets"][s]["recall@1"] >= base[s]["recall@1"] - 1e-12 for s in base)]
    best = max(allowed, key=lambda c: (c["macro"]["map@100"], c["weight"]))
    return {"weight": best["weight"], "allowed": [c["weight"] for c in allowed], "best": best}


def fusion(store: bool) -> dict:
    from waldo.models.shipped import resolve_model_dir
    from waldo.rerank.rrt_checkpoint import read_rrt_info, update_rrt_training

    from colour_weight import MODEL

    half = json.loads(RESULTS.read_text())
    if not half["verdict"]["reproduces"]:
        raise SystemExit("the half validation does not reproduce the test's signature (results/rrt_half.json): "
                         "nothing is chosen on it (module doc)")
    base, cells = fusion_cells(SCORES / "w0.75.npz")
    chosen = choose_fusion(base, cells)
    folder = resolve_model_dir(MODEL)
    stored = read_rrt_info(folder).get("training", {}).get("fusion_weight")
    adopted = chosen["weight"] < 1 and chosen["weight"] != stored
    results = {"global": base, "cells": cells, "chosen": chosen["weight"], "allowed": chosen["allowed"],
               "stored_before": stored, "adopted": adopted}
    FUSION_RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    if store and adopted:
        update_rrt_training(folder, fusion_weight=chosen["weight"], fusion_choice={
            "study": "experiments/rrt_half.py --fusion", "validation": "half the identities held out, unseen "
            "distractors only, colour weight 0.75 (results/rrt_half.json)", "before": stored,
            "figures": chosen["best"]["macro"]})
    return results


CHAIN_RANKINGS = ("global", "gv", "rrt", "rrt+gv", "rrt-consensus", "rrt-consensus+gv")


def chain_run(progress: bool, split_seed: int = 0, swap: bool = False) -> dict:
    """Every ranking of :data:`CHAIN_RANKINGS` on this validation at w 0.75, and per-group top-1
    changes against global search (module doc, ``--chain``)."""
    import dataclasses
    import time

    from colour_groups import changes, held_out_gallery
    from colour_weight import ranking_scores, validation_signatures
    from gv_after_rrt import fused, set_inliers, verified_first_scores
    from local_matching import validation_setup

    from waldo.rerank.gv import GeometricReranker

    started = time.perf_counter()
    where = split_paths(split_seed, swap)
    model = half_model(where, split_seed)
    setup = held_out_gallery(validation_setup(model, refit=True, max_queries=0, split_seed=split_seed,
                                              val_fraction=VAL_FRACTION))
    signatures = validation_signatures(setup)
    with GeometricReranker() as reranker:
        config = reranker.config
        validator, scores = ranking_scores(setup, signatures, 0.75, reranker, progress,
                                           rankings=("global", "rrt", "rrt-consensus", "rrt-consensus+gv"))
        at_weight = dataclasses.replace(setup, validator=validator)
        scores["gv"], scores["rrt+gv"] = [], []
        for index in range(len(setup.sets)):
            inliers = set_inliers(at_weight, index, reranker, progress)
            glob = scores["global"][index].astype(np.float64)
            scores["gv"].append(fused(inliers, glob, config.min_inliers, config.fusion_weight, config.fusion_scale))
            scores["rrt+gv"].append(verified_first_scores(inliers, scores["rrt"][index].astype(np.float64),
                                                          config.min_inliers))
    rows = {name: validator.ranking(scores[name]) for name in CHAIN_RANKINGS}
    moved = changes(setup, validator, scores, rankings=CHAIN_RANKINGS[1:])
    return {"split_seed": split_seed, "swap": swap, "rows": rows, "changes": moved, "gv_config": config.model_dump(),
            "sets": {s.name: len(s.queries) for s in setup.sets}, "gallery_sizes": {s.name: len(s.gallery) for s in setup.sets},
            "seconds": round(time.perf_counter() - started, 1)}


def default_chain(rows: dict) -> dict:
    """The product's default rules in its order on ``rows`` (module doc, ``--chain``)."""
    from waldo.train.rrt_online import DEFAULT_MARGIN, earns_default

    per_set = lambda name: [entry["map@100"] for entry in rows[name]["sets"].values()]  # noqa: E731
    steps, default = [], "global"
    for name in ("rrt", "rrt-consensus"):
        earned = earns_default(per_set(name), per_set(default), DEFAULT_MARGIN)
        steps.append({"candidate": name, "against": default, "earns_default": earned})
        default = name if earned else default
    with_gv = "gv" if default == "global" else f"{default}+gv"
    earned = earns_default(per_set(with_gv), per_set(default), DEFAULT_MARGIN)
    r1 = rows[with_gv]["macro"]["recall@1"] >= rows[default]["macro"]["recall@1"] - 1e-9
    steps.append({"candidate": with_gv, "against": default, "earns_default": earned, "recall1_not_lower": r1})
    chain = [with_gv, default] if earned and r1 else [default]
    return {"steps": steps, "chain": chain, "margin": DEFAULT_MARGIN}


def chain_lines(chained: dict) -> list[str]:
    """The ``--chain`` diagnostic's tables, for the docs block."""
    from colour_groups import GROUPS

    split_seed, swap = chained.get("split_seed", 0), chained.get("swap", False)
    split_flag = (f" --split-seed {split_seed}" if split_seed else "") + (" --swap" if swap else "")
    chain_file = split_paths(split_seed, swap)["chain"].name

    sets = list(chained["rows"]["global"]["sets"])
    lines = ["The default chain on this validation (`--chain`, w 0.75, the product's keypoints and GVConfig(); a "
             "diagnostic: chooses nothing). R@1 / map@100:", "",
             "| ranking | mean | " + " | ".join(sets) + " | grocery fixed / broken: " + " | ".join(GROUPS) + " |",
             "|---|---|" + "---|" * len(sets) + "---|" * len(GROUPS)]
    grocery = chained["changes"][GROCERY]
    for name in CHAIN_RANKINGS:
        row = chained["rows"][name]
        cells = " | ".join(f"{row['sets'][s]['recall@1']:.4f} / {row['sets'][s]['map@100']:.4f}" for s in sets)
        moved = " | ".join("-" if name == "global" else
                           "{fixed} / {broken}".format(**grocery.get(g, {}).get(name, {"fixed": 0, "broken": 0}))
                           for g in GROUPS)
        lines.append(f"| {name} | {row['macro']['recall@1']:.4f} / {row['macro']['map@100']:.4f} | {cells} | {moved} |")
    chain = default_chain(chained["rows"])
    steps = "; ".join(f"{s['candidate']} over {s['against']}: earns_default {s['earns_default']}"
                      + (f", R@1 not lower {s['recall1_not_lower']}" if "recall1_not_lower" in s else "")
                      for s in chain["steps"])
    return lines + ["", f"The product's default rules in its order: {steps}. **This validation's chain: "
                        f"{' -> '.join(chain['chain'])}** (make demo's stored chain: rrt-consensus+gv -> rrt-consensus). "
                        f"Produced by `.venv/bin/python experiments/rrt_half.py --chain{split_flag}` (results/{chain_file}; "
                        f"{chained['seconds']:.0f} s).", ""]


def markdown(results: dict) -> str:
    from colour_groups import GROUPS, test_rrt_runs

    rankings = ("global", "rrt", "rrt-consensus")
    split_seed, swap = results.get("split_seed", 0), results.get("swap", False)
    where = split_paths(split_seed, swap)
    start, end, _ = where["block"]
    config = f"rrt-views-s4-match-half{'-split' + str(split_seed) if split_seed else ''}{'-swap' if swap else ''}-cpu.json"
    lines = [start, "", "make demo's model with the RRT of its recipe trained on half of each source's identities "
             f"{'with swapped pairs ' if swap else ''}"
             f"(configs/{config}{'; the diagnostic experiments/rrt_swap.py declared' if swap else ''}); the other half's held-out queries ("
             + ", ".join(f"{name} {n}" for name, n in results["sets"].items()) + ") search only their own "
             "identities' photos (" + ", ".join(f"{name} {n}" for name, n in results["gallery_sizes"].items())
             + "): every distractor unseen by the RRT and by the global head (refitted without them). "
             "A diagnostic: chooses nothing.", "",
             "| w | set | " + " | ".join(f"{name} R@1 / mAP" for name in rankings) + " |",
             "|---|---|" + "---|" * len(rankings)]
    for weight, row in results["rows"].items():
        for set_name in row["figures"]["global"]:
            cells = " | ".join(f"{row['figures'][name][set_name]['recall@1']:.4f} / {row['figures'][name][set_name]['map']:.4f}"
                               for name in rankings)
            lines.append(f"| {weight} | {set_name} | {cells} |")
    lines += ["", "Top-1 fixed / broken against the global ranking of the same descriptors, grocery's held-out half, "
              "beside the test (grocery-open-cross, make demo's RRT; README \"Which reranker when\"):", "",
              "| w | where | queries (Fruit / Packages / Vegetables) | global R@1 | rrt R@1 | rrt: Fruit | Packages | "
              "Vegetables |", "|---|---|---|---|---|---|---|---|"]
    for weight, row in results["rows"].items():
        groups = row["changes"][GROCERY]
        sizes = " / ".join(str(groups.get(name, {}).get("queries", 0)) for name in GROUPS)
        cells = " | ".join("{fixed} / {broken}".format(**groups.get(name, {}).get("rrt", {"fixed": 0, "broken": 0}))
                           for name in GROUPS)
        lines.append(f"| {weight} | validation | {sizes} | {row['figures']['global'][GROCERY]['recall@1']:.4f} | "
                     f"{row['figures']['rrt'][GROCERY]['recall@1']:.4f} | {cells} |")
    for weight, test, changes in test_rrt_runs():
        lines.append(f"| {weight} | test | | {test['global']['recall@1']:.4f} | {test['rrt']['recall@1']:.4f} | "
                     + " | ".join(f"{changes[n]['fixed']} / {changes[n]['broken']}" if n in changes else "-"
                                  for n in GROUPS) + " |")
    v = results["verdict"]
    lines += ["", f"The rule (declared before the run, experiments/rrt_half.py): (i) at w 0.75 the RRT below global "
              f"search on grocery's R@1: {v['rrt_below_global_coloured']} (gain {v['gain_w0.75']:+.4f}); (ii) at w 0.75 "
              f"Fruit broken > fixed: {v['fruit_broken_over_fixed_coloured']} ({v['fruit_w0.75']['fixed']} / "
              f"{v['fruit_w0.75']['broken']}); (iii) the RRT's gain smaller with colour: {v['colour_shrinks_rrt_gain']} "
              f"({v['gain_w0']:+.4f} -> {v['gain_w0.75']:+.4f}). **"
              + ("Reproduces the test's signature." if v["reproduces"] else "Does not reproduce the test's signature.")
              + "**", "", f"Produced by `{results['command']}` (results/{where['results'].name}; {results['seconds']:.0f} s).", ""]
    if swap:
        lines += unswapped_lines(results)
    elif split_seed == 0 and FUSION_RESULTS.is_file():  # the follow-up was declared on split 0 only
        lines += fusion_lines(json.loads(FUSION_RESULTS.read_text()))
    if where["chain"].is_file():
        lines += chain_lines(json.loads(where["chain"].read_text()))
    lines.append(end)
    return "\n".join(lines)


def unswapped_lines(results: dict) -> list[str]:
    """Split 0 without swaps beside the swapped run (experiments/rrt_swap.py's diagnostic)."""
    plain = json.loads(RESULTS.read_text())
    lines = ["Grocery's held-out half at w 0.75, without and with swapped pairs (the same held-out identities and "
             "queries; RRT alone against the global ranking it reranks):", "",
             "| RRT trained | global R@1 | rrt R@1 | rrt mAP | rrt gain (w 0 -> w 0.75) | Fruit fixed / broken | signature |",
             "|---|---|---|---|---|---|---|"]
    for label, r in (("plain pairs (results/rrt_half.json)", plain), ("half swapped (this run)", results)):
        fig, v = r["rows"]["0.75"]["figures"], r["verdict"]
        lines.append(f"| {label} | {fig['global'][GROCERY]['recall@1']:.4f} | {fig['rrt'][GROCERY]['recall@1']:.4f} | "
                     f"{fig['rrt'][GROCERY]['map']:.4f} | {v['gain_w0']:+.4f} -> {v['gain_w0.75']:+.4f} | "
                     f"{v['fruit_w0.75']['fixed']} / {v['fruit_w0.75']['broken']} | "
                     f"{'reproduced' if v['reproduces'] else 'not reproduced'} |")
    return lines + [""]


def fusion_lines(fused: dict) -> list[str]:
    """The follow-up's grid and choice (``--fusion``), for the docs block."""
    g = fused["global"]
    lines = ["The follow-up (declared with the rule, `--fusion`): make demo's rrt-fusion weight on this validation at "
             "w 0.75, lambda * global + (1 - lambda) * sigmoid(logit) (mean over the sets; grocery's R@1 beside; "
             f"global search: R@1 {np.mean([e['recall@1'] for e in g.values()]):.4f}, map@100 "
             f"{np.mean([e['map@100'] for e in g.values()]):.4f}, grocery R@1 {g[GROCERY]['recall@1']:.4f}):", "",
             "| lambda | R@1 | map@100 | grocery R@1 | R@1 not below global on any set |", "|---|---|---|---|---|"]
    for cell in fused["cells"]:
        mark = "**" if cell["weight"] == fused["chosen"] else ""
        lines.append(f"| {mark}{cell['weight']:g}{mark} | {cell['macro']['recall@1']:.4f} | {cell['macro']['map@100']:.4f} | "
                     f"{cell['sets'][GROCERY]['recall@1']:.4f} | {'yes' if cell['weight'] in fused['allowed'] else 'no'} |")
    verdict = (f"lambda {fused['chosen']:g} replaces the stored {fused['stored_before']:g}." if fused["adopted"] else
               f"Chosen lambda {fused['chosen']:g}" + (": global search alone, so nothing is stored" if fused["chosen"] == 1
                                                      else ", the stored weight already") +
               f" (make demo's rrt-fusion keeps {fused['stored_before']:g}).")
    return lines + ["", f"**{verdict}** Produced by `.venv/bin/python experiments/rrt_half.py --fusion` "
                        f"(results/{FUSION_RESULTS.name}).", ""]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--doc", action="store_true", help="rewrite the docs/results.md block from the saved JSON")
    parser.add_argument("--fusion", action="store_true", help="the follow-up: rrt-fusion's weight on this validation")
    parser.add_argument("--store", action="store_true", help="with --fusion: write a chosen weight into make demo's rrt.json")
    parser.add_argument("--chain", action="store_true", help="the default chain's rules on this validation (a diagnostic)")
    parser.add_argument("--split-seed", type=int, default=0, help="which random half is held out (module doc)")
    parser.add_argument("--swap", action="store_true",
                        help="split 0's RRT trained with swapped pairs (experiments/rrt_swap.py's diagnostic)")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    where = split_paths(args.split_seed, args.swap)
    start, end, heading = where["block"]

    def write_doc() -> None:
        write_block(DOC, markdown(json.loads(where["results"].read_text())), start, end, heading=heading)

    if args.fusion and (args.split_seed or args.swap):
        raise SystemExit("the follow-up was declared on split 0 only (module doc)")
    if args.chain:
        chained = chain_run(progress=not args.quiet, split_seed=args.split_seed, swap=args.swap)
        where["chain"].write_text(json.dumps(chained, indent=1) + "\n")
        print(json.dumps(default_chain(chained["rows"])))
        write_doc()
        return 0
    if args.fusion:
        results = fusion(args.store)
        print(json.dumps({k: results[k] for k in ("chosen", "allowed", "stored_before", "adopted")}))
        write_doc()
        return 0
    if args.doc:
        write_doc()
        return 0
    results = run(progress=not args.quiet, split_seed=args.split_seed, swap=args.swap)
    results["command"] = " ".join([".venv/bin/python", "experiments/rrt_half.py", *(shlex.quote(a) for a in sys.argv[1:])])
    where["results"].write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(results["verdict"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
