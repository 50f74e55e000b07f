"""Issue 15 (a diagnostic, validation only): would the photos' colours fix what the RRT misses?

The fair-validation queries make demo's RRT gets wrong on grocery's held-out shelves are
products told apart mostly by colour (red apple varieties, an orange against a grapefruit, milk
cartons of one brand). This asks, before anything is built, whether a plain colour signature adds
what the CNN descriptors lack: each photo's colour signature (waldo.models.colour: a hue-saturation
histogram of the photo's central 80%), compared by the Bhattacharyya coefficient, added to the global
similarity (``global + w x colour``) and to make demo's RRT logit (``rrt + a w x colour``, ``a``
its global-residual scale, so ``w`` is in cosine units in both), over a grid of ``w``; and the
RRT as it would read a unit-norm global descriptor that carries the colour term (the signature's
square roots, scaled by sqrt(w), appended to the global descriptor and the whole renormalised:
its residual then reads (global + w colour) / (1 + w)).

On the fair validation make demo's default was chosen on (experiments/local_matching.py's
``validation_setup``: held-out training identities, the global head refitted without them). Test
queries are not touched. It chooses nothing: it says whether a colour term in the RRT (stored
per image, learned beside the RRT's residuals) is worth building.

    .venv/bin/python experiments/colour_diagnostic.py        # ~3 min (results/colour_diagnostic.json)
    .venv/bin/python experiments/colour_diagnostic.py --split-seed 1   # other held-out identities (global rows)
    .venv/bin/python experiments/colour_diagnostic.py --split-seed 2
    .venv/bin/python experiments/colour_diagnostic.py --model untrained
    .venv/bin/python experiments/colour_diagnostic.py --view model-input  # from the tensor the model reads
    .venv/bin/python experiments/colour_diagnostic.py --doc  # docs/results.md block from the JSONs
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
RESULTS = ROOT / "results" / "colour_diagnostic.json"
MODEL = "lite0-match-rrt"
WEIGHTS = (0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0)
START, END = "<!-- colour-diagnostic:start -->", "<!-- colour-diagnostic:end -->"
HEADING = "### Would the photos' colours help? (a diagnostic, issue 15)"
DOC = ROOT / "docs" / "results.md"
#: (model, split seed) of the other validations robustness() reads
OTHER_VALIDATIONS = ((MODEL, 1), (MODEL, 2), ("untrained", 0))


def table(rows: dict) -> list[str]:
    names = list(rows["global"]["sets"])
    lines = [f"| ranking | R@1 | map@100 | R@1 per set ({' / '.join(names)}) | map@100 per set |", "|---|---|---|---|---|"]
    for name, entry in rows.items():
        lines.append(f"| {name} | {entry['macro']['recall@1']:.4f} | {entry['macro']['map@100']:.4f} | "
                     + " / ".join(f"{entry['sets'][n]['recall@1']:.4f}" for n in names) + " | "
                     + " / ".join(f"{entry['sets'][n]['map@100']:.4f}" for n in names) + " |")
    return lines


def markdown(results: dict) -> str:
    rows = results["rows"]
    return "\n".join([
        START, "",
        "Fair validation (held-out training identities of grocery-open-cross, coil100-open and abo_sample, make "
        "demo's global head refitted without them); `w` in cosine units (the RRT's term is scaled by its "
        f"global-residual scale a = {results['scale']:.3f}); consensus at make demo's stored setting. Test queries "
        "untouched; this chooses nothing.", "", *table(rows), *robustness(), *view_table(), "",
        f"Produced by {' then '.join(f'`{c}`' for c in dict.fromkeys(results['commands']))} "
        "(results/colour_diagnostic.json).", "", END])


#: where the signatures come from: the photo (waldo.models.colour.colour_signature) or the tensor
#: the model reads (its test transform's crop and size; colour_signatures): what a model that
#: appends the term to its global descriptor would see
VIEWS = ("photo", "model-input")
MODEL_INPUT = ROOT / "results" / "colour_diagnostic_model-input.json"


def other_results(model: str, split_seed: int) -> Path:
    return ROOT / "results" / f"colour_diagnostic_{Path(model).name}_split{split_seed}.json"


def view_table() -> list[str]:
    """make demo's RRT with the term from the photo against from the model's input tensor."""
    if not MODEL_INPUT.is_file():
        return []
    photo, tensor = json.loads(RESULTS.read_text())["rows"], json.loads(MODEL_INPUT.read_text())
    lines = ["", "The signature computed from the tensor the model reads (its test transform's crop at its input size) "
             f"instead of the photo (`{tensor['commands'][0]}`; map@100 / R@1):", "",
             "| ranking | from the photo | from the model's input |", "|---|---|---|"]
    for name in photo:
        if name in ("global", "rrt") or "unit-norm" in name or name.startswith("global + "):
            lines.append(f"| {name} | {photo[name]['macro']['map@100']:.4f} / {photo[name]['macro']['recall@1']:.4f} | "
                         f"{tensor['rows'][name]['macro']['map@100']:.4f} / {tensor['rows'][name]['macro']['recall@1']:.4f} |")
    return lines


def robustness(log=print) -> list[str]:
    """The same colour term with global search on other validations: other held-out identities
    (split seeds 1 and 2, make demo's global head refitted without them) and the untrained default
    (split 0). Only global rows: make demo's RRT trained on those seeds' held-out identities."""
    lines = []
    runs = [(model, seed, json.loads(other_results(model, seed).read_text())) for model, seed in OTHER_VALIDATIONS
            if other_results(model, seed).is_file()]
    if not runs:
        return lines
    names = [f"{'untrained default' if model == 'untrained' else model} split {seed}" for model, seed, _ in runs]
    commands = ", ".join(f"`{saved['commands'][0]}`" for _, _, saved in runs)
    lines += ["", "The colour term on global search with other held-out identities and the untrained default "
              f"(map@100 / grocery's held-out R@1; {commands}):", "",
              "| ranking | " + " | ".join(names) + " |", "|---|" + "---|" * len(runs)]
    grocery = "grocery-open-cross:train"
    for name in (name for name in runs[0][2]["rows"] if name.startswith("global")):
        cells = [f"{r[2]['rows'][name]['macro']['map@100']:.4f} / {r[2]['rows'][name]['sets'][grocery]['recall@1']:.4f}"
                 for r in runs]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--doc", action="store_true", help="rewrite the docs/results.md block from the saved JSON")
    parser.add_argument("--model", default=MODEL, help="another model (or 'untrained') for the global rows alone")
    parser.add_argument("--view", choices=VIEWS, default="photo", help="where the signatures come from")
    parser.add_argument("--split-seed", type=int, default=0,
                        help="other held-out identities (global rows alone: make demo's RRT trained on them)")
    args = parser.parse_args()
    if args.doc:
        write_block(DOC, markdown(json.loads(RESULTS.read_text())), START, END, heading=HEADING)
        return 0
    from local_matching import UNTRAINED, validation_setup

    from waldo.data.images import load_image
    from waldo.data.transforms import get_transform
    from waldo.models.colour import SIGNATURE_DIM, colour_signature, colour_signatures, colour_similarity
    from waldo.rerank.rrt_rerankers import consensus_setting, neighbour_consensus

    started = time.perf_counter()
    main_run = args.model == MODEL and args.split_seed == 0  # the RRT's rows are fair on its own split only
    setup = validation_setup(args.model, refit=args.model != UNTRAINED, split_seed=args.split_seed)
    validator = setup.validator
    signatures = np.zeros((len(setup.pool), SIGNATURE_DIM), np.float32)
    transform = get_transform(setup.model_config.transform, setup.model_config.image_size)
    for row in setup.needed:
        image = load_image(setup.pool.paths[row])
        signatures[row] = (colour_signature(image) if args.view == "photo"
                           else colour_signatures(transform(image, int(row))[None].float())[0].numpy())
    # each set's (queries, top_k) colour similarities over its candidates
    colour = [colour_similarity(signatures[vset.queries], signatures[data["candidates"]])
              for vset, data in zip(setup.sets, validator.prepared)]
    rows = {"global": validator.ranking([d["scores"] for d in validator.prepared])}
    scale = None
    if main_run:
        logits = validator.logits(setup.rrt)
        scale = float(setup.rrt.global_skip_scale.detach())
        k, k_weight = consensus_setting(setup.train_config)  # make demo's rrt-consensus at its stored setting

        def with_consensus(set_logits: list[np.ndarray]) -> list[np.ndarray]:
            return [lg + k_weight * scale * neighbour_consensus(
                lg, validator.global_desc[d["candidates"]].astype(np.float32), k)
                for lg, d in zip(set_logits, validator.prepared)]

        rows.update({"rrt": validator.ranking(logits), "rrt + consensus": validator.ranking(with_consensus(logits))})
    for w in WEIGHTS:
        rows[f"global + {w:g} colour"] = validator.ranking([d["scores"] + w * c
                                                            for d, c in zip(validator.prepared, colour)])
        if main_run:
            with_colour = [lg + scale * w * c for lg, c in zip(logits, colour)]
            rows[f"rrt + {w:g} colour"] = validator.ranking(with_colour)
            rows[f"rrt + {w:g} colour + consensus"] = validator.ranking(with_consensus(with_colour))
            # the same colour term carried by a unit-norm global descriptor [g; sqrt(w) sqrt(colour)] / sqrt(1 + w):
            # the RRT's residual then reads (g.g' + w colour) / (1 + w) instead of g.g' + w colour
            unit = [lg - scale * d["scores"] + scale * (d["scores"] + w * c) / (1 + w)
                    for lg, d, c in zip(logits, validator.prepared, colour)]
            rows[f"rrt on the unit-norm global + {w:g} colour descriptor"] = validator.ranking(unit)
    command = " ".join([".venv/bin/python", "experiments/colour_diagnostic.py", *(shlex.quote(a) for a in sys.argv[1:])])
    if args.view != "photo" and not main_run:
        raise SystemExit("--view model-input is measured on make demo's own split (the RRT's rows)")
    out = (RESULTS if args.view == "photo" else MODEL_INPUT) if main_run else other_results(args.model, args.split_seed)
    out.write_text(json.dumps({"commands": [command], "rows": rows, "scale": scale, "model": args.model,
                               "split_seed": args.split_seed, "view": args.view, "seconds": round(time.perf_counter() - started, 1)},
                              indent=1) + "\n")
    print("\n".join(table(rows)))
    return 0

if __name__ == "__main__":
    sys.exit(main())
