"""Issue 15 (a diagnostic, validation only): would the photos' colours fix what the RRT misses?

The fair-validation queries make demo's RRT gets wrong on grocery's held-out shelves are
products told apart mostly by colour (red apple varieties, an orange against a grapefruit, milk
cartons of one brand). This asks, before anything is built, whether a plain colour signature adds
what the CNN descriptors lack: each photo's hue-saturation histogram (the central 80% of the
photo at 96 px, HSV: 18 hue x 3 saturation bins for coloured pixels, 3 value bins for the
near-grey ones, L1-normalised), compared by the Bhattacharyya coefficient, added to the global
similarity (``global + w x colour``) and to make demo's RRT logit (``rrt + a w x colour``, ``a``
its global-residual scale, so ``w`` is in cosine units in both), over a grid of ``w``.

On the fair validation make demo's default was chosen on (experiments/local_matching.py's
``validation_setup``: held-out training identities, the global head refitted without them). Test
queries are not touched. It chooses nothing: it says whether a colour term in the RRT (stored
per image, learned beside the RRT's residuals) is worth building.

    .venv/bin/python experiments/colour_diagnostic.py      # ~3 min (results/colour_diagnostic.json)
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

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results" / "colour_diagnostic.json"
MODEL = "lite0-match-rrt"
WEIGHTS = (0.02, 0.05, 0.1, 0.2, 0.3, 0.5)
HUE_BINS, SAT_BINS, GREY_BINS, GREY_SATURATION = 18, 3, 3, 0.15


def colour_signature(path: str, size: int = 96) -> np.ndarray:
    """The photo's hue-saturation histogram (module doc), L1-normalised."""
    from waldo.data.images import load_image

    image = load_image(path)
    width, height = image.size
    box = (round(0.1 * width), round(0.1 * height), round(0.9 * width), round(0.9 * height))
    hsv = np.asarray(image.crop(box).resize((size, size)).convert("HSV"), np.float32) / 255.0
    hue, sat, val = hsv[..., 0].ravel(), hsv[..., 1].ravel(), hsv[..., 2].ravel()
    coloured = sat >= GREY_SATURATION
    hist = np.zeros(HUE_BINS * SAT_BINS + GREY_BINS, np.float64)
    h = np.minimum((hue[coloured] * HUE_BINS).astype(int), HUE_BINS - 1)
    s = np.minimum(((sat[coloured] - GREY_SATURATION) / (1 - GREY_SATURATION) * SAT_BINS).astype(int), SAT_BINS - 1)
    np.add.at(hist, h * SAT_BINS + s, 1.0)
    g = np.minimum((val[~coloured] * GREY_BINS).astype(int), GREY_BINS - 1)
    np.add.at(hist, HUE_BINS * SAT_BINS + g, 1.0)
    return (hist / max(hist.sum(), 1.0)).astype(np.float32)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.parse_args()
    from local_matching import validation_setup

    started = time.perf_counter()
    setup = validation_setup(MODEL, refit=True)
    validator = setup.validator
    logits = validator.logits(setup.rrt)
    scale = float(setup.rrt.global_skip_scale.detach())
    signatures = np.zeros((len(setup.pool), HUE_BINS * SAT_BINS + GREY_BINS), np.float32)
    for row in setup.needed:
        signatures[row] = colour_signature(setup.pool.paths[row])
    roots = np.sqrt(signatures)
    colour = []  # each set's (queries, top_k) Bhattacharyya coefficients over its candidates
    for vset, data in zip(setup.sets, validator.prepared):
        colour.append(np.einsum("qd,qkd->qk", roots[vset.queries], roots[data["candidates"]]))
    rows = {"global": validator.ranking([d["scores"] for d in validator.prepared]), "rrt": validator.ranking(logits)}
    for w in WEIGHTS:
        rows[f"global + {w:g} colour"] = validator.ranking([d["scores"] + w * c
                                                            for d, c in zip(validator.prepared, colour)])
        rows[f"rrt + {w:g} colour"] = validator.ranking([lg + scale * w * c for lg, c in zip(logits, colour)])
    command = " ".join([".venv/bin/python", "experiments/colour_diagnostic.py", *(shlex.quote(a) for a in sys.argv[1:])])
    RESULTS.write_text(json.dumps({"commands": [command], "rows": rows, "scale": scale,
                                   "seconds": round(time.perf_counter() - started, 1)}, indent=1) + "\n")
    names = list(rows["global"]["sets"])
    print("ranking | R@1 | map@100 | per set R@1 (" + " / ".join(names) + ") | per set map@100")
    for name, entry in rows.items():
        print(f"{name} | {entry['macro']['recall@1']:.4f} | {entry['macro']['map@100']:.4f} | "
              + " / ".join(f"{entry['sets'][n]['recall@1']:.4f}" for n in names) + " | "
              + " / ".join(f"{entry['sets'][n]['map@100']:.4f}" for n in names))
    return 0


if __name__ == "__main__":
    sys.exit(main())
