"""Issue 17: a colour term for the untrained default, chosen for verification on validation (rule declared first).

The untrained default (`waldo index build` without `--model`: ImageNet EfficientNet-Lite0 with
its projection fitted on the collection, views-whiten) searches with a colourless global
descriptor, and its geometric verification has one query group on grocery-open-cross's test
whose first answers it breaks more often than it fixes (Vegetables 0 / 1, docs/results.md
"Geometric verification: the fusion rule"). make demo's model gained a colour term
(experiments/colour_weight.py) and with it verification broke no group. The diagnostic
(experiments/colour_diagnostic.py --model untrained) saw the colour term lift the untrained
default's global search on validation (map@100 0.7863 -> 0.8077 at w 1), but chose nothing, and
verification was not scored.

This study scores the untrained default with the colour term at weight w
(``ModelConfig.colour_weight``, appended as ``DescriptorModel.with_colour`` appends it) on the
validation experiments/gv_fusion.py chose the verification rule on (never test queries): each
protocol's training identities in two folds, each fold searched with the test's query / gallery
rule by a model whose projection is fitted on the other fold (grocery 1,288 queries in three
groups, coil 200). Two rankings per weight: global search (the untrained index's default) and
``gv`` (the product's GVConfig(): ORB + TEBLID, 500 keypoints, its fused rule) over each query's
top-100. w = 0 is the untrained default as it serves today.

Rule, fixed before the run (this file is committed first): the chosen w (of WEIGHTS, not 0) is
the one whose ``gv`` has the highest mean map over the four cells (ties: the smaller w). It
becomes the untrained default's colour weight iff all of: (a) its gv ``earns_default`` over
w = 0's gv (mean map higher by more than 0.005, no cell lower); (b) its gv mean R@1 is not below
w = 0's; (c) in every query group of every cell its gv fixes at least as many first answers as it
breaks against its own global ranking (issue 17's bar); (d) its global search's mean map is not
below w = 0's (global search is what an untrained index serves when asked for no reranker). The
test protocols are run only once the choice is made (``--test``), and are reported only.

    .venv/bin/python experiments/colour_untrained.py          # ~9 min on 2 cores (keypoints cached)
    .venv/bin/python experiments/colour_untrained.py --test   # adopted only: the test protocols, chosen w vs 0
    .venv/bin/python experiments/colour_untrained.py --doc    # docs/results.md block from the JSON
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # GV runs its own threads

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gv_compact import pair_stats, rank1_changes, reordered  # noqa: E402
from gv_fusion import FEATURES, OPEN, PROTOCOLS, apply_rule, fold_protocol, log, product_orders  # noqa: E402
from gv_results import group_of, short  # noqa: E402

from waldo.data.protocols import Protocol, get_protocol  # noqa: E402
from waldo.data.transforms import get_transform  # noqa: E402
from waldo.eval.evaluate import EvalRun, evaluate_descriptors, evaluate_protocol  # noqa: E402
from waldo.eval.gv_eval import run_keypoints  # noqa: E402
from waldo.eval.runner import prepare_model  # noqa: E402
from waldo.models.colour import SIGNATURE_DIM  # noqa: E402
from waldo.rerank.gv import GeometricReranker, GVConfig  # noqa: E402
from waldo_experiments.doc_blocks import write_block  # noqa: E402
from waldo_experiments.gv_study import ranking_metrics  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results" / "colour_untrained.json"
DOC = ROOT / "docs" / "results.md"
START, END = "<!-- colour-untrained:start -->", "<!-- colour-untrained:end -->"
HEADING = "### A colour term for the untrained default, chosen for verification (issue 17)"
WEIGHTS = (0.25, 0.5, 0.75, 1.0, 1.5)
TRANSFORM = "resize256-crop224"


def product_rule() -> dict:
    """The product's verification rule (GVConfig's defaults) in gv_fusion.apply_rule's terms."""
    config = GVConfig()
    if config.ratio not in (None, OPEN.ratio):
        raise RuntimeError(f"GVConfig's ratio {config.ratio} is not the one the pair stats are verified with")
    return {"min_inliers": config.min_inliers, "min_spread": config.min_spread,
            "max_anisotropy": config.max_anisotropy if config.max_anisotropy is not None else 1e9,
            "fusion_weight": config.fusion_weight, "fusion_scale": config.fusion_scale}


def split_colour(extracted, width: int):
    """(global (N, G), colour signatures (N, S)) of descriptors extracted at colour weight 1, whose
    rows are [g, sqrt(signature)] / sqrt(2) (waldo.models.colour.append_colour)."""
    if extracted.global_desc.shape[1] != width + SIGNATURE_DIM:
        raise RuntimeError(f"expected {width} + {SIGNATURE_DIM} columns, got {extracted.global_desc.shape[1]}")
    both = extracted.global_desc.astype(np.float64) * np.sqrt(2.0)
    return both[:, :width].astype(np.float32), np.square(both[:, width:]).astype(np.float32)


def at_weight(parts, weight: float) -> np.ndarray:
    """The product's rows at ``weight`` (colour_weight.coloured, i.e. append_colour) from
    :func:`split_colour`'s parts."""
    from colour_weight import coloured

    plain, signatures = parts
    return coloured(plain, signatures, weight).astype(np.float32)


class PairStats:
    """Verification stats of (query row, gallery row) pairs, each verified once over every weight."""

    def __init__(self, protocol: Protocol, reranker: GeometricReranker) -> None:
        self.keypoints = run_keypoints(protocol, FEATURES, progress=True)
        self.reranker = reranker
        self.cache: dict[tuple[int, int], np.ndarray] = {}

    def run_stats(self, run: EvalRun, k: int = 100) -> np.ndarray:
        k = min(k, run.knn_indices.shape[1])
        out = np.zeros((len(run.query_rows), k, 3))
        for q, query_row in enumerate(run.query_rows):
            rows = [int(run.gallery_rows[i]) for i in run.knn_indices[q, :k]]
            missing = [r for r in rows if (int(query_row), r) not in self.cache]
            if missing:
                stats = pair_stats(self.keypoints.query(int(query_row)),
                                   [self.keypoints.candidate(r) for r in missing], self.reranker.config, self.reranker)
                self.cache.update({(int(query_row), r): s for r, s in zip(missing, stats)})
            out[q] = [self.cache[(int(query_row), r)] for r in rows]
        return out


def score(protocol: Protocol, run: EvalRun, stats: np.ndarray, rule: dict) -> dict:
    """global and gv (``rule``) figures of one run, with gv's top-1 changes per query group."""
    k = stats.shape[1]
    groups = [group_of(protocol.queries.paths[row]) for row in run.query_rows]
    order = apply_rule(stats, run.knn_scores[:, :k], rule)
    return {"global": short(ranking_metrics(protocol, run, run.knn_indices)),
            "gv": {**short(ranking_metrics(protocol, run, reordered(run.knn_indices, order))),
                   "changes": rank1_changes(run.matches, np.take_along_axis(run.matches[:, :k], order, axis=1), groups)}}


def weighted_runs(protocol: Protocol, model, config):
    """(weight -> EvalRun) for 0 and WEIGHTS from one extraction at colour weight 1."""
    model.colour_weight = 1.0
    try:
        run = evaluate_protocol(model, protocol, get_transform(TRANSFORM, config.image_size, seed=0), progress=False)
    finally:
        model.colour_weight = 0.0
    width = run.gallery.global_desc.shape[1] - SIGNATURE_DIM
    gallery_parts = split_colour(run.gallery, width)
    query_parts = gallery_parts if run.queries is run.gallery else split_colour(run.queries, width)
    out = {}
    for weight in (0.0, *WEIGHTS):
        gallery = dataclasses.replace(run.gallery, global_desc=at_weight(gallery_parts, weight))
        queries = gallery if run.queries is run.gallery else dataclasses.replace(
            run.queries, global_desc=at_weight(query_parts, weight))
        out[weight] = evaluate_descriptors(protocol, queries, gallery)
    return out


def validation() -> dict:
    rule = product_rule()
    cells = {}
    with GeometricReranker(OPEN) as reranker:
        for name, fold in itertools.product(PROTOCOLS, (0, 1)):
            val = fold_protocol(get_protocol(name), fold)
            model, config = prepare_model(val, progress=False, colour_weight=0.0)
            pairs = PairStats(val, reranker)
            cell = f"{name} fold {fold}"
            cells[cell] = {"protocol": val.name, "rows": {}}
            for weight, run in weighted_runs(val, model, config).items():
                row = score(val, run, pairs.run_stats(run), rule)
                cells[cell]["rows"][f"{weight:g}"] = row
                cells[cell]["n_queries"] = len(run.query_rows)
                log(f"{cell} w {weight:g}: global {row['global']['map']:.4f}, gv {row['gv']['map']:.4f} "
                    f"{row['gv']['changes']}")
    return {"rule_gv": rule, "cells": cells, **judge(cells)}


def mean(cells: dict, weight: str, ranking: str, metric: str) -> float:
    return float(np.mean([c["rows"][weight][ranking][metric] for c in cells.values()]))


def judge(cells: dict) -> dict:
    from waldo.train.rrt_online import DEFAULT_MARGIN, earns_default

    chosen = max((f"{w:g}" for w in WEIGHTS), key=lambda w: (mean(cells, w, "gv", "map"), -float(w)))
    per_cell = lambda weight: [c["rows"][weight]["gv"]["map"] for c in cells.values()]  # noqa: E731
    rule = {"a_earns_default": earns_default(per_cell(chosen), per_cell("0"), DEFAULT_MARGIN),
            "b_recall1_not_lower": mean(cells, chosen, "gv", "recall@1") >= mean(cells, "0", "gv", "recall@1") - 1e-9,
            "c_fixed_not_below_broken": all(f >= b for c in cells.values()
                                            for f, b in c["rows"][chosen]["gv"]["changes"].values()),
            "d_global_not_lower": mean(cells, chosen, "global", "map") >= mean(cells, "0", "global", "map") - 1e-9}
    return {"chosen_weight": float(chosen), "rule": rule, "adopted": all(rule.values()), "margin": DEFAULT_MARGIN}


def test(weight: float) -> list[dict]:
    """Both test protocols with the untrained default at colour weight 0 and ``weight`` (reported only)."""
    rule = product_rule()
    out = []
    with GeometricReranker(OPEN) as reranker:
        for name in PROTOCOLS:
            protocol = get_protocol(name)
            model, config = prepare_model(protocol, progress=False, colour_weight=0.0)
            pairs = PairStats(protocol, reranker)
            runs = weighted_runs(protocol, model, config)
            groups = sorted({group_of(protocol.queries.paths[row]) for row in runs[0.0].query_rows})
            row = {"protocol": name, "n_queries": len(runs[0.0].query_rows),
                   "group_sizes": {g: sum(group_of(protocol.queries.paths[r]) == g for r in runs[0.0].query_rows)
                                   for g in groups}}
            for w in (0.0, weight):
                run = runs[w]
                stats = pairs.run_stats(run)
                row[f"{w:g}"] = score(protocol, run, stats, rule)
                sample = np.linspace(0, len(run.query_rows) - 1, min(100, len(run.query_rows))).round().astype(int)
                offline = apply_rule(stats[sample], run.knn_scores[sample, : stats.shape[1]], rule)
                row[f"{w:g}"]["product_check"] = {"queries": len(sample), "same_order": float(np.mean(np.all(
                    offline == product_orders(protocol, run, rule, sample), axis=1)))}
                log(f"test {name} w {w:g}: {row[f'{w:g}']}")
            out.append(row)
    return out


def product_check(weight: float) -> float:
    """The smallest cosine, over 4 grocery photos, between the untrained default run with
    ``colour_weight`` and its colourless descriptors with the colour term appended by
    :func:`at_weight` from a weight-1 run: the study's descriptors are the product's."""
    import torch

    from waldo.data.images import load_image

    val = fold_protocol(get_protocol(PROTOCOLS[0]), 0)
    model, config = prepare_model(val, progress=False, colour_weight=0.0)
    transform = get_transform(TRANSFORM, config.image_size, seed=0)
    images = torch.stack([transform(load_image(p), i) for i, p in enumerate(val.gallery.paths[:4])])
    with torch.inference_mode():
        model.colour_weight = 1.0
        both = model(images).global_desc.numpy()
        model.colour_weight = weight
        served = model(images).global_desc.numpy()
        model.colour_weight = 0.0
    width = both.shape[1] - SIGNATURE_DIM
    here = at_weight(((both[:, :width] * np.sqrt(2.0)).astype(np.float32),
                      np.square(both[:, width:] * np.sqrt(2.0)).astype(np.float32)), weight)
    return float(np.min(np.sum(here * served, axis=1) / np.linalg.norm(here, axis=1) / np.linalg.norm(served, axis=1)))


def changes_text(changes: dict) -> str:
    return ", ".join(f"{g} {f}/{b}" for g, (f, b) in changes.items())


def markdown(results: dict) -> str:
    v = results["validation"]
    cells = v["cells"]
    lines = [START, "", "Validation of experiments/gv_fusion.py (each protocol's training identities in two folds, each "
             "searched by the untrained default fitted on the other; never test queries); the colour term at weight w "
             "appended to every global descriptor, the top-100 searched on them and verified by the product's rule "
             "(GVConfig()); rule fixed before the run (experiments/colour_untrained.py's docstring).", "",
             "| w | global R@1 / mAP (mean) | gv R@1 / mAP (mean) | gv mAP per cell (" + " / ".join(cells) + ") | "
             "gv top-1 fixed / broken per group, summed over cells |", "|---|---|---|---|---|"]
    for weight in ["0", *(f"{w:g}" for w in WEIGHTS)]:
        summed: dict[str, list[int]] = {}
        for c in cells.values():
            for group, (f, b) in c["rows"][weight]["gv"]["changes"].items():
                summed.setdefault(group, [0, 0])
                summed[group][0] += f
                summed[group][1] += b
        label = f"**{weight}**" if float(weight) == v["chosen_weight"] else weight
        lines.append(f"| {label} | {mean(cells, weight, 'global', 'recall@1'):.4f} / {mean(cells, weight, 'global', 'map'):.4f} "
                     f"| {mean(cells, weight, 'gv', 'recall@1'):.4f} / {mean(cells, weight, 'gv', 'map'):.4f} | "
                     + " / ".join(f"{c['rows'][weight]['gv']['map']:.4f}" for c in cells.values())
                     + f" | {changes_text(summed)} |")
    rule = v["rule"]
    lines += ["", f"Chosen weight: **{v['chosen_weight']:g}**. Against w = 0: (a) gv earns its place by the default rule: "
                  f"{rule['a_earns_default']}; (b) gv R@1 not lower: {rule['b_recall1_not_lower']}; (c) gv fixes >= breaks "
                  f"in every group of every cell: {rule['c_fixed_not_below_broken']}; (d) global search not lower: "
                  f"{rule['d_global_not_lower']}. " + ("**Adopted.**" if v["adopted"] else "**Not adopted.**"),
              "", f"The appended term is the product's: the untrained default run with colour_weight "
                  f"{v['chosen_weight']:g} gives the study's descriptors (smallest cosine over 4 photos "
                  f"{v['product_check_min_cosine']:.6f})."]
    if results.get("test"):
        w = f"{v['chosen_weight']:g}"
        lines += ["", "Test protocols (reported, chose nothing), the untrained default without and with the chosen term:", "",
                  "| protocol | w | global R@1 / mAP | gv R@1 / mAP | gv top-1 fixed / broken per group | product's GeometricReranker, same order |",
                  "|---|---|---|---|---|---|"]
        for row in results["test"]:
            for weight in ("0", w):
                r = row[weight]
                lines.append(f"| {row['protocol']} | {weight} | {r['global']['recall@1']:.4f} / {r['global']['map']:.4f} | "
                             f"{r['gv']['recall@1']:.4f} / {r['gv']['map']:.4f} | {changes_text(r['gv']['changes'])} | "
                             f"{r['product_check']['same_order']:.2f} of {r['product_check']['queries']} |")
    lines += ["", f"Produced by {' then '.join(f'`{c}`' for c in dict.fromkeys(results['commands']))} "
                  "(results/colour_untrained.json).", "", END]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--doc", action="store_true", help="rewrite the docs/results.md block from the saved JSON")
    parser.add_argument("--test", action="store_true", help="the test protocols at the chosen weight (after validation)")
    args = parser.parse_args()
    command = " ".join([".venv/bin/python", "experiments/colour_untrained.py", *(shlex.quote(a) for a in sys.argv[1:])])
    if args.doc:
        write_block(DOC, markdown(json.loads(RESULTS.read_text())), START, END, heading=HEADING)
        return 0
    started = time.perf_counter()
    if args.test:
        results = json.loads(RESULTS.read_text())
        if not results["validation"]["adopted"]:
            raise SystemExit("the validation adopted no weight: the test protocols are run only for an adopted one")
        results["test"] = test(results["validation"]["chosen_weight"])
        results["test_seconds"] = round(time.perf_counter() - started, 1)
        results["commands"].append(command)
    else:
        v = validation()
        v["product_check_min_cosine"] = product_check(v["chosen_weight"])
        v["seconds"] = round(time.perf_counter() - started, 1)
        results = {"commands": [command], "validation": v}
        log(f"chosen w {v['chosen_weight']:g}: rule {v['rule']} -> adopted {v['adopted']}")
    RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
