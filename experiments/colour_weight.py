"""Issue 15: the colour term's weight for make demo's model, on the fair validation (rule declared first).

experiments/colour_diagnostic.py found that a photo's colour signature adds what make demo's
RRT misses, but it only reranked the colourless global top-100. This study scores make demo's
model (lite0-match-rrt) as it would serve with ``ModelConfig.colour_weight`` w: on the fair
validation every default of Waldo's was chosen on (experiments/local_matching.py's
``validation_setup``: held-out training identities of grocery-open-cross, coil100-open and
abo_sample, the global head refitted without them), each image's global descriptor is the
refitted one with the colour term appended as ``DescriptorModel.with_colour`` appends it
(signatures of the tensors the model reads), the top-100 is searched again on those
descriptors, and the RRT (its global residual reads them), rrt-consensus (its stored setting;
consensus reads them) and rrt-consensus+gv (GVConfig(), verified first) rerank it. w = 0 is make
demo's model as it serves today, scored the same way.

Rule, fixed before the run (this file is committed first): the chosen w (of WEIGHTS, not 0) is the
one whose ``rrt-consensus+gv`` (make demo's default) has the highest mean map@100. A coloured make
demo model is adopted iff all of: (a) its rrt-consensus+gv ``earns_default`` over w = 0's (mean
map@100 higher by more than 0.005, no set lower); (b) its mean R@1 is not below w = 0's; (c) its
rrt-consensus (the default for an index without keypoints) is not below w = 0's on mean map@100.
Test protocols are run only once a choice is stored, and are reported only.

    .venv/bin/python experiments/colour_weight.py          # ~20 min (keypoints cached under runs/)
    .venv/bin/python experiments/colour_weight.py --doc    # docs/results.md block from the JSON
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from waldo_experiments.doc_blocks import write_block  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results" / "colour_weight.json"
DOC = ROOT / "docs" / "results.md"
START, END = "<!-- colour-weight:start -->", "<!-- colour-weight:end -->"
HEADING = "### The colour term's weight for make demo's model (issue 15)"
MODEL = "lite0-match-rrt"
METRIC = "map@100"
WEIGHTS = (0.25, 0.5, 0.75, 1.0, 1.5)
RANKINGS = ("global", "rrt", "rrt-consensus", "rrt-consensus+gv")


def coloured(global_desc: np.ndarray, signatures: np.ndarray, weight: float) -> np.ndarray:
    """DescriptorModel.with_colour on stored rows (waldo.models.colour.append_colour)."""
    import torch

    if not weight:
        return global_desc

    from waldo.models.colour import append_colour

    return append_colour(torch.from_numpy(global_desc.astype(np.float32)), torch.from_numpy(signatures),
                         weight).numpy()


def score(setup, signatures: np.ndarray, weight: float, reranker, progress: bool) -> dict:
    """The four rankings of make demo's model at colour weight ``weight`` (module doc)."""
    from gv_after_rrt import set_inliers, verified_first_scores

    from waldo.rerank.rrt_rerankers import consensus_setting, neighbour_consensus
    from waldo.train.rrt_online import ViewAugment, ViewMaker, ViewValidator

    global_desc = coloured(setup.global_desc, signatures, weight)
    views = ViewMaker(setup.descriptor_model, setup.pool.paths, setup.model_config.image_size, ViewAugment())
    validator = ViewValidator(setup.sets, setup.pool, global_desc, setup.local_desc, views, top_k=100, seed=0,
                              grid=setup.grid)
    at_weight = dataclasses.replace(setup, validator=validator, global_desc=global_desc)
    logits = validator.logits(setup.rrt)
    scale = float(setup.rrt.global_skip_scale.detach())
    k, k_weight = consensus_setting(setup.train_config)
    scores: dict[str, list[np.ndarray]] = {name: [] for name in RANKINGS}
    need = reranker.config.min_inliers
    for index, (data, logit) in enumerate(zip(validator.prepared, logits)):
        consensus = logit + k_weight * scale * neighbour_consensus(
            logit, global_desc[data["candidates"]].astype(np.float32), k)
        inliers = set_inliers(at_weight, index, reranker, progress)
        scores["global"].append(data["scores"])
        scores["rrt"].append(logit)
        scores["rrt-consensus"].append(consensus)
        scores["rrt-consensus+gv"].append(verified_first_scores(inliers, consensus.astype(np.float64), need))
    return {name: validator.ranking(set_scores) for name, set_scores in scores.items()}


def model_check(setup, signatures: np.ndarray, n: int = 4, weight: float = 0.75) -> float:
    """That :func:`coloured` is what the product computes: the smallest cosine, over ``n``
    validation photos, between make demo's model run with ``colour_weight`` and its own
    colourless descriptors with the stored signatures appended here."""
    import torch

    from waldo.data.images import load_image
    from waldo.data.transforms import get_transform

    model = setup.descriptor_model
    transform = get_transform(setup.model_config.transform, setup.model_config.image_size)
    rows = setup.needed[:n]
    images = torch.stack([transform(load_image(setup.pool.paths[r]), int(r)) for r in rows])
    try:
        with torch.inference_mode():
            plain = model(images).global_desc.numpy()
            model.colour_weight = weight
            served = model(images).global_desc.numpy()
    finally:
        model.colour_weight = 0.0
    here = coloured(plain, signatures[rows], weight)
    return float(np.min(np.sum(here * served, axis=1) / np.linalg.norm(here, axis=1) / np.linalg.norm(served, axis=1)))


def judge(rows: dict) -> dict:
    from waldo.train.rrt_online import DEFAULT_MARGIN, earns_default

    per_set = lambda weight, name: [e[METRIC] for e in rows[weight][name]["sets"].values()]  # noqa: E731
    mean = lambda weight, name: rows[weight][name]["macro"][METRIC]  # noqa: E731
    chosen = max((f"{w:g}" for w in WEIGHTS), key=lambda w: mean(w, "rrt-consensus+gv"))
    rule = {"a_earns_default": earns_default(per_set(chosen, "rrt-consensus+gv"), per_set("0", "rrt-consensus+gv"),
                                             DEFAULT_MARGIN),
            "b_recall1_not_lower": rows[chosen]["rrt-consensus+gv"]["macro"]["recall@1"]
            >= rows["0"]["rrt-consensus+gv"]["macro"]["recall@1"] - 1e-9,
            "c_consensus_not_lower": mean(chosen, "rrt-consensus") >= mean("0", "rrt-consensus") - 1e-9}
    return {"chosen_weight": float(chosen), "rule": rule, "adopted": all(rule.values()), "margin": DEFAULT_MARGIN}


def validation(progress: bool) -> dict:
    from local_matching import validation_setup

    from waldo.data.images import load_image
    from waldo.data.transforms import get_transform
    from waldo.models.colour import SIGNATURE_DIM, colour_signatures
    from waldo.rerank.gv import GeometricReranker

    started = time.perf_counter()
    setup = validation_setup(MODEL, refit=True)
    transform = get_transform(setup.model_config.transform, setup.model_config.image_size)
    signatures = np.zeros((len(setup.pool), SIGNATURE_DIM), np.float32)
    for row in setup.needed:  # what DescriptorModel.with_colour reads: the tensor the model sees
        signatures[row] = colour_signatures(transform(load_image(setup.pool.paths[row]), int(row))[None])[0].numpy()
    check = model_check(setup, signatures)
    rows = {}
    with GeometricReranker() as reranker:
        for weight in (0.0, *WEIGHTS):
            rows[f"{weight:g}"] = score(setup, signatures, weight, reranker, progress)
            print(f"w {weight:g}: " + ", ".join(f"{name} {rows[f'{weight:g}'][name]['macro'][METRIC]:.4f}"
                                                 for name in RANKINGS), flush=True)
    return {"rows": rows, **judge(rows), "metric": METRIC, "refit_check_min_cosine": setup.refit_check,
            "model_check_min_cosine": check,
            "seconds": round(time.perf_counter() - started, 1)}


def markdown(results: dict) -> str:
    v = results["validation"]
    names = list(v["rows"]["0"]["global"]["sets"])
    lines = [START, "", "Fair validation (held-out training identities, make demo's global head refitted without them); "
             "each row make demo's model with the colour term at weight w appended to its global descriptors, the "
             "top-100 searched on them; rule fixed before the run (experiments/colour_weight.py's docstring).", "",
             f"| w | ranking | R@1 | R@10 | {METRIC} | {METRIC} per set ({' / '.join(names)}) |", "|---|---|---|---|---|---|"]
    for weight, rankings in v["rows"].items():
        for name, entry in rankings.items():
            per_set = " / ".join(f"{entry['sets'][n][METRIC]:.4f}" for n in names)
            bold = float(weight) == v["chosen_weight"] and name == "rrt-consensus+gv"
            label = f"**{name}**" if bold else name
            lines.append(f"| {weight} | {label} | {entry['macro']['recall@1']:.4f} | {entry['macro']['recall@10']:.4f} "
                         f"| {entry['macro'][METRIC]:.4f} | {per_set} |")
    rule = v["rule"]
    lines += ["", f"Chosen weight: **{v['chosen_weight']:g}**. Against w = 0 (make demo today): (a) rrt-consensus+gv "
                  f"earns its place by the default rule: {rule['a_earns_default']}; (b) R@1 not lower: "
                  f"{rule['b_recall1_not_lower']}; (c) rrt-consensus not lower: {rule['c_consensus_not_lower']}. "
                  + ("**Adopted.**" if v["adopted"] else "**Not adopted.**"),
              "", f"The colour term appended here is the product's: make demo's model run with colour_weight 0.75 "
                  f"gives the same descriptors as its own with the stored signatures appended (smallest cosine over "
                  f"4 photos {v['model_check_min_cosine']:.6f}).",
              "", f"Produced by {' then '.join(f'`{c}`' for c in dict.fromkeys(results['commands']))} "
                  "(results/colour_weight.json).", "", END]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--doc", action="store_true", help="rewrite the docs/results.md block from the saved JSON")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    if args.doc:
        write_block(DOC, markdown(json.loads(RESULTS.read_text())), START, END, heading=HEADING)
        return 0
    command = " ".join([".venv/bin/python", "experiments/colour_weight.py", *(shlex.quote(a) for a in sys.argv[1:])])
    results = {"commands": [command], "validation": validation(progress=not args.quiet)}
    v = results["validation"]
    print(f"chosen w {v['chosen_weight']:g}: rule {v['rule']} -> adopted {v['adopted']}", flush=True)
    RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
