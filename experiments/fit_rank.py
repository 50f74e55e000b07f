"""Does the untrained default's null space cost anything? (follows experiments/fit_null_space.py)

The default global descriptor (``views-whiten``, 1,024-d) is fitted on at most 1,000 photos of a
collection, so the whitened total covariance it ranks directions by has rank 999: the last 25 of
the 1,024 kept directions lie in its null space, any 25 of the 281 null directions being as good a
fit as any other; which ones come out is set by rounding (BLAS threads, ONNX against eager). This
measures, on cached ImageNet maps (experiments/global_sweep.py ``maps``) and the strong views that
experiments/global_pooling_verified.py cached, fitted as an index fits (on the searched photos,
1,000 sampled, the 600 with views among them):

- **as fitted**: width 1,024, the null directions eigh returns;
- **other null directions**: the same fit with those 25 replaced by random orthonormal
  combinations of the null space (``--draws`` times): how far the figures move on rounding alone;
- **capped at the rank**: width 999 (what a fix would do);
- **no null space**: width 1,024 fitted on every photo of the collection (more than 1,025).

Validation collections (both protocols' training identities, two folds each, and each whole training
split) are what a decision would be made on; the test protocols are reported.

    .venv/bin/python experiments/fit_rank.py     # ~5 min on 2 cores; results/fit_rank.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from global_pooling_verified import pooled_views, whole_training_splits  # noqa: E402
from global_sweep import ROOT, load_maps, pool, score, splits  # noqa: E402

from waldo.models.untrained import VIEW_SHRINK, VIEWS  # noqa: E402
from waldo.models.whitening import WhiteningSetting, _FitStatistics, describe  # noqa: E402

RESULTS = ROOT / "results" / "fit_rank.json"
FIT_PHOTOS = 1000  # waldo.models.untrained.untrained_model's max_fit_images
WIDTH = 1024  # waldo.models.untrained.DEFAULT_GLOBAL_DIM
VALIDATION = ("val0:grocery-open-cross", "val1:grocery-open-cross", "val0:coil100-open", "val1:coil100-open",
              "valall:grocery-open-cross", "valall:coil100-open")
TESTS = ("grocery-open-cross", "coil100-open")


def study(name: str, s: dict, pooled: np.ndarray, paths: dict[int, str], draws: int, seed: int = 0) -> dict:
    rows = np.unique(np.concatenate([s["q"], s["g"]]))
    view_rows, views = pooled_views(name, rows, paths, 0)
    rng = np.random.default_rng(seed)
    others = np.setdiff1d(rows, view_rows)
    extra = min(FIT_PHOTOS, len(rows)) - len(view_rows)
    sample = np.sort(np.concatenate([view_rows, rng.choice(others, extra, replace=False)]))
    x = np.concatenate([pooled[view_rows], *views["avg"][:VIEWS]])
    groups = np.tile(np.arange(len(view_rows)), 1 + VIEWS)

    def figures(mean: np.ndarray, projection: np.ndarray) -> dict:
        q = describe(pooled[s["q"]], mean, projection)
        g = q if s["loo"] else describe(pooled[s["g"]], mean, projection)
        found = score(q, g, s["qid"], s["gid"], s["loo"])
        return {"r1": round(found["r1"], 4), "map": round(found["map"], 4)}

    fit = _FitStatistics(x, groups, pooled[sample])
    setting = WhiteningSetting(WIDTH, VIEW_SHRINK, 0.0)
    mean, projection = fit.projection(setting)
    inverse_sqrt, directions = fit._cache[("lw", VIEW_SHRINK)]
    whitened_total = inverse_sqrt @ fit.total @ inverse_sqrt
    eigenvalues = np.sort(np.linalg.eigvalsh((whitened_total + whitened_total.T) / 2))[::-1]
    rank = int(np.sum(eigenvalues > eigenvalues[0] * 1e-10))
    out = {"photos": int(len(rows)), "fit_photos": int(len(sample)), "rank": rank,
           "as fitted": figures(mean, projection)}
    null = directions[:, rank:]  # every direction the fit photos do not vary along
    spread = []
    for draw in range(draws):
        mix, _ = np.linalg.qr(np.random.default_rng([seed, draw]).standard_normal((null.shape[1], WIDTH - rank)))
        spread.append(figures(mean, inverse_sqrt @ np.concatenate([directions[:, :rank], null @ mix], axis=1)))
    out["other null directions"] = {k: [min(d[k] for d in spread), max(d[k] for d in spread)] for k in ("r1", "map")}
    out["capped at the rank"] = figures(mean, inverse_sqrt @ directions[:, :rank])
    if len(rows) > WIDTH + 1:
        every = _FitStatistics(x, groups, pooled[rows])
        out["no null space (every photo)"] = figures(*every.projection(setting))
    print(name, json.dumps(out), flush=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--draws", type=int, default=8)
    args = parser.parse_args()
    maps, index = load_maps(224)
    sets = {**splits(index), **whole_training_splits(index)}
    paths = {row: path for path, row in index.items()}
    pooled = pool(maps, "avg").astype(np.float64)
    results = {"draws": args.draws, "validation": {n: study(n, sets[n], pooled, paths, args.draws) for n in VALIDATION},
               "test": {n: study(n, sets[n], pooled, paths, args.draws) for n in TESTS}}
    RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
