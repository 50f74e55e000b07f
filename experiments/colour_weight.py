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
    .venv/bin/python experiments/colour_weight.py --store  # an adopted weight into make demo's model

Shipping (``--store``, after adoption): the chosen weight goes into lite0-match-rrt's config.json
(``colour_weight``; its model hash changes, so indexes built before keep the colourless copy they
hold), the validation rows and rule into its card, and the default chain is re-checked on the
coloured rows (the default rule of experiments/consensus_gv.py: rrt-consensus+gv over
rrt-consensus); the store is refused if the chain no longer holds. The test protocols are then
run once on the coloured model (``TEST_COMMAND``, reported only) and, rerunning ``--store``,
replace the card's test figures, which were measured on the colourless model.
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
STORE_COMMAND = ".venv/bin/python experiments/colour_weight.py --store"
#: the coloured model's test run (every ranking the page offers, README "Which reranker when")
TEST_NAME = "shipped-colour-which-reranker"
TEST_RESULTS = ROOT / "results" / "rrt_views" / f"{TEST_NAME}.json"
TEST_COMMAND = (f"python experiments/rrt_views.py eval --model {MODEL} --name {TEST_NAME} --rerank "
                "none,rrt,rrt-fusion,gv,rrt+gv,rrt-consensus,rrt-consensus+gv,local-match --local-match 0.7,0.5 "
                "--precision --quiet")


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
    validator, scores = ranking_scores(setup, signatures, weight, reranker, progress)
    return {name: validator.ranking(set_scores) for name, set_scores in scores.items()}


def ranking_scores(setup, signatures: np.ndarray, weight: float, reranker, progress: bool,
                   rankings: tuple[str, ...] = RANKINGS) -> tuple:
    """:func:`score`'s validator at weight ``weight`` and each ranking's per-set (queries, top_k)
    scores over its candidates; ``reranker`` (GV) is read only for the ``+gv`` ranking."""
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
    scores: dict[str, list[np.ndarray]] = {name: [] for name in rankings}
    for index, (data, logit) in enumerate(zip(validator.prepared, logits)):
        consensus = logit + k_weight * scale * neighbour_consensus(
            logit, global_desc[data["candidates"]].astype(np.float32), k)
        scores["global"].append(data["scores"])
        scores["rrt"].append(logit)
        scores["rrt-consensus"].append(consensus)
        if "rrt-consensus+gv" in rankings:
            inliers = set_inliers(at_weight, index, reranker, progress)
            scores["rrt-consensus+gv"].append(verified_first_scores(inliers, consensus.astype(np.float64),
                                                                    reranker.config.min_inliers))
    return validator, scores


def validation_signatures(setup) -> np.ndarray:
    """(pool, SIGNATURE_DIM) colour signatures of the validation's photos (zeros for rows it does
    not read): what DescriptorModel.with_colour reads, the tensor the model sees."""
    from waldo.data.images import load_image
    from waldo.data.transforms import get_transform
    from waldo.models.colour import SIGNATURE_DIM, colour_signatures

    transform = get_transform(setup.model_config.transform, setup.model_config.image_size)
    signatures = np.zeros((len(setup.pool), SIGNATURE_DIM), np.float32)
    for row in setup.needed:
        signatures[row] = colour_signatures(transform(load_image(setup.pool.paths[row]), int(row))[None])[0].numpy()
    return signatures


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

    from waldo.rerank.gv import GeometricReranker

    started = time.perf_counter()
    setup = validation_setup(MODEL, refit=True)
    signatures = validation_signatures(setup)
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
                  "(results/colour_weight.json).", *test_lines(), "", END]
    return "\n".join(lines)


def test_lines() -> list[str]:
    """Once shipped (``--store``) and its test run exists: make demo's model with and without the
    colour term on both test protocols, every ranking, and the top-1 changes per query group of
    the default against the global ranking (reported; chose nothing)."""
    if not TEST_RESULTS.is_file():
        return []
    import rrt_views

    after = json.loads(TEST_RESULTS.read_text())
    before, _ = rrt_views.merged_runs(json.loads((rrt_views.RESULTS / rrt_views.WHICH_RERANKER).read_text()),
                                      [json.loads((rrt_views.RESULTS / name).read_text())
                                       for name in rrt_views.WHICH_RERANKER_LATER])
    protocols = list(after["protocols"])
    lines = ["", f"Shipped by `{STORE_COMMAND}` (lite0-match-rrt's config.json `colour_weight`); then the test protocols "
                 f"(reported, chose nothing): `{TEST_COMMAND}` (results/rrt_views/{TEST_RESULTS.name}) against the "
                 "colourless model's runs (README \"Which reranker when\" lists both).", "",
             "| ranking | " + " | ".join(f"{p} R@1 / mAP: without colour -> with" for p in protocols) + " |",
             "|---|" + "---|" * len(protocols)]
    for name in rrt_views.WHICH_ORDER:
        cells = []
        for protocol in protocols:
            old, new = before["protocols"][protocol].get(name), after["protocols"][protocol].get(name)
            cells.append("-" if old is None or new is None else
                         f"{old['recall@1']:.4f} / {old['map']:.4f} -> {new['recall@1']:.4f} / {new['map']:.4f}")
        lines.append(f"| {'global (none)' if name == 'global' else name} | " + " | ".join(cells) + " |")
    lines += ["", "Top-1 changes against the global ranking of the same model, per query group (fixed / broken; "
                  "issue 17's table), with colour:", "",
              "| ranking | " + " | ".join(protocols) + " |", "|---|" + "---|" * len(protocols)]
    for name in rrt_views.WHICH_ORDER[1:]:
        cells = []
        for protocol in protocols:
            changes = after["protocols"][protocol].get(name, {}).get("top1_changes")
            cells.append("-" if not changes else ", ".join(f"{group} {c['fixed']}/{c['broken']}"
                                                          for group, c in changes.items()))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def chain_on_colour(v: dict) -> dict:
    """The default chain's rule (experiments/consensus_gv.py) re-applied to the chosen weight's
    validation rows: does rrt-consensus+gv still earn its place over rrt-consensus?"""
    from consensus_gv import default_choice

    return default_choice({"listed": True, "rows": v["rows"][f"{v['chosen_weight']:g}"]})


def store(results: dict) -> None:
    """Write the adopted weight into make demo's model (this file's docstring); rerunning it
    writes the same files."""
    from waldo.models.shipped import resolve_model_dir

    v = results["validation"]
    if not v["adopted"]:
        raise SystemExit(f"w {v['chosen_weight']:g} was not adopted on validation: nothing to store")
    chain = chain_on_colour(v)
    folder = resolve_model_dir(MODEL)
    training = json.loads((folder / "rrt.json").read_text())["training"]
    stored_chain = [training.get("default_reranker"), *training.get("default_fallbacks", [])]
    if not chain["adopted"] or chain["chain"] != stored_chain:
        raise SystemExit(f"on the coloured rows the default chain would be {chain['chain']}, not the stored "
                         f"{stored_chain}: choose the default again before shipping colour")
    weight = v["chosen_weight"]
    from waldo.models.checkpoint import ModelConfig, config_json

    config_file = folder / "config.json"  # written as save_model writes it
    config = ModelConfig.model_validate_json(config_file.read_text()).model_copy(update={"colour_weight": weight})
    config_file.write_text(config_json(ModelConfig.model_validate(config.model_dump())))
    card_file = folder / "card.json"
    card = json.loads(card_file.read_text())
    rows = v["rows"]
    card["chosen_on_validation"]["colour"] = {
        "weight": weight, "rule": v["rule"], "metric": v["metric"], "margin": v["margin"],
        "validation": {f"w={w}": {name: rows[w][name]["macro"] for name in RANKINGS} for w in ("0", f"{weight:g}")},
        "default_chain_on_colour": {"chain": chain["chain"], "rule": chain["rule"]},
        "command": results["commands"][0],
        "note": "the colour term (waldo.models.colour) appended to the global descriptor, chosen on the fair validation "
                "(docs/results.md, 'The colour term's weight for make demo's model'); the RRT, consensus and "
                "verification settings above were chosen without it and kept"}
    for command in (results["commands"][0], STORE_COMMAND, TEST_COMMAND):
        if command not in card["reproduce"]:
            card["reproduce"].append(command)
    sentence = (f" Its global descriptor carries a colour term (colour_weight {weight:g}, chosen on the fair "
                "validation after the rest; the test figures are the coloured model's).")
    if sentence not in card["note"]:
        card["note"] += sentence
    if TEST_RESULTS.is_file():  # the coloured model's test run replaces the colourless figures
        test = json.loads(TEST_RESULTS.read_text())
        card["test"] = {"note": "reported, never used to choose anything",
                        "sources": [f"results/rrt_views/{TEST_RESULTS.name}"], "protocols": test["protocols"]}
    card_file.write_text(json.dumps(card, indent=2) + "\n")
    print(f"stored colour_weight {weight:g} in {MODEL}" + ("" if TEST_RESULTS.is_file() else
                                                          f"; next, the test run: {TEST_COMMAND}"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--doc", action="store_true", help="rewrite the docs/results.md block from the saved JSON")
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--store", action="store_true", help="write the adopted weight into make demo's model")
    args = parser.parse_args()
    if args.store:
        store(json.loads(RESULTS.read_text()))
        return 0
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
