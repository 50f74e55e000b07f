"""Issue 15 (a diagnostic, validation only): would the photos' colours fix what the RRT misses?

The fair-validation queries make demo's RRT gets wrong on grocery's held-out shelves are
products told apart mostly by colour (red apple varieties, an orange against a grapefruit, milk
cartons of one brand). This asks, before anything is built, whether a plain colour signature adds
what the CNN descriptors lack: each photo's colour signature (waldo.models.colour: a hue-saturation
histogram of the photo's central 80%), compared by the Bhattacharyya coefficient, added to the global
similarity (``global + w x colour``) and to make demo's RRT logit (``rrt + a w x colour``, ``a``
its global-residual scale, so ``w`` is in cosine units in both), over a grid of ``w``.

On the fair validation make demo's default was chosen on (experiments/local_matching.py's
``validation_setup``: held-out training identities, the global head refitted without them). Test
queries are not touched. It chooses nothing: it says whether a colour term in the RRT (stored
per image, learned beside the RRT's residuals) is worth building.

    .venv/bin/python experiments/colour_diagnostic.py        # ~3 min (results/colour_diagnostic.json)
    .venv/bin/python experiments/colour_diagnostic.py --doc  # docs/results.md block from the JSON
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
        "untouched; this chooses nothing.", "", *table(rows), "",
        f"Produced by {' then '.join(f'`{c}`' for c in dict.fromkeys(results['commands']))} "
        "(results/colour_diagnostic.json).", "", END])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--doc", action="store_true", help="rewrite the docs/results.md block from the saved JSON")
    args = parser.parse_args()
    if args.doc:
        write_block(DOC, markdown(json.loads(RESULTS.read_text())), START, END, heading=HEADING)
        return 0
    from local_matching import validation_setup

    from waldo.data.images import load_image
    from waldo.models.colour import SIGNATURE_DIM, colour_signature, colour_similarity
    from waldo.rerank.rrt_rerankers import consensus_setting, neighbour_consensus

    started = time.perf_counter()
    setup = validation_setup(MODEL, refit=True)
    validator = setup.validator
    logits = validator.logits(setup.rrt)
    scale = float(setup.rrt.global_skip_scale.detach())
    signatures = np.zeros((len(setup.pool), SIGNATURE_DIM), np.float32)
    for row in setup.needed:
        signatures[row] = colour_signature(load_image(setup.pool.paths[row]))
    # each set's (queries, top_k) colour similarities over its candidates
    colour = [colour_similarity(signatures[vset.queries], signatures[data["candidates"]])
              for vset, data in zip(setup.sets, validator.prepared)]
    k, k_weight = consensus_setting(setup.train_config)  # make demo's rrt-consensus at its stored setting

    def with_consensus(set_logits: list[np.ndarray]) -> list[np.ndarray]:
        return [lg + k_weight * scale * neighbour_consensus(lg, validator.global_desc[d["candidates"]].astype(np.float32),
                                                            k) for lg, d in zip(set_logits, validator.prepared)]

    rows = {"global": validator.ranking([d["scores"] for d in validator.prepared]), "rrt": validator.ranking(logits),
            "rrt + consensus": validator.ranking(with_consensus(logits))}
    for w in WEIGHTS:
        rows[f"global + {w:g} colour"] = validator.ranking([d["scores"] + w * c
                                                            for d, c in zip(validator.prepared, colour)])
        with_colour = [lg + scale * w * c for lg, c in zip(logits, colour)]
        rows[f"rrt + {w:g} colour"] = validator.ranking(with_colour)
        rows[f"rrt + {w:g} colour + consensus"] = validator.ranking(with_consensus(with_colour))
    command = " ".join([".venv/bin/python", "experiments/colour_diagnostic.py", *(shlex.quote(a) for a in sys.argv[1:])])
    RESULTS.write_text(json.dumps({"commands": [command], "rows": rows, "scale": scale,
                                   "seconds": round(time.perf_counter() - started, 1)}, indent=1) + "\n")
    print("\n".join(table(rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
