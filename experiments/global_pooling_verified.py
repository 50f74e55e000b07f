"""Issue 16: can geometric verification choose a collection's pooling without labels?

The label-free pooling choice tried first (experiments/global_sweep.py ``views``: an image's
strong augmented view finding the image) rewards near-duplicate matching and prefers GeM p=3 on
both collections, the wrong way round on grocery. Verified neighbours are *other photos* of the
same object found without labels (experiments/gv_positives.py: 93-100% precise on both
protocols' validation folds), so they measure what retrieval is for. Here, per collection (the
photos an index of it would hold, labels unused):

1. Each pooling's descriptors (avg, GeM p=2, p=3, max of the ImageNet lite0 maps, 224 px,
   cached by experiments/global_sweep.py maps), projected as an index of the collection projects
   with the untrained default (``views-whiten``: learned whitening without labels, 600 sampled
   photos and two strong views of each as groups, 1024-d, shrink 3, fitted on the collection
   itself; waldo.models.untrained), each pooling with its own fit.
2. Pseudo-positives: a seeded sample of the collection's photos; each one's top-10 under *every*
   pooling (the union, so no pooling chooses its own test) verified with the product's local
   features and its "same object" claim (GVConfig().verifies). A pair called verified is a
   pseudo-positive.
3. Each pooling scored by the mean average precision of the pseudo-positives in its ranking of the
   whole collection (photos with at least one), the pseudo-mAP.

The labelled figures of the same descriptors are printed beside it (two validation folds of each
protocol's training identities, each whole training split (``valall``), and the test protocols,
all searched as the tests are): the proxy would be worth building if its choice agrees with the
labelled one per collection, on validation.

    .venv/bin/python experiments/global_sweep.py maps          # once (~3 min)
    .venv/bin/python experiments/global_pooling_verified.py    # ~6 min; results/global/pooling_verified.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from global_sweep import ROOT, load_maps, pool, score, splits  # noqa: E402

from waldo.data.images import load_image  # noqa: E402
from waldo.data.protocols import VALIDATION_SPLITS, get_protocol  # noqa: E402
from waldo.data.views import strong_view  # noqa: E402
from waldo.eval.gv_eval import extract_features  # noqa: E402
from waldo.eval.metrics import mean_average_precision  # noqa: E402
from waldo.models.checkpoint import ModelConfig, build_model  # noqa: E402
from waldo.models.untrained import VIEW_IMAGES, VIEW_SHRINK, VIEWS  # noqa: E402
from waldo.models.whitening import WhiteningSetting, describe, learned_projection  # noqa: E402
from waldo.models.keypoints import LocalFeatureConfig, LocalFeatures  # noqa: E402
from waldo.rerank.gv import GeometricReranker, GVConfig  # noqa: E402

POOLINGS = ("avg", "gem2", "gem3", "max")
COLLECTIONS = ("val0:grocery-open-cross", "val1:grocery-open-cross", "val0:coil100-open", "val1:coil100-open",
               "valall:grocery-open-cross", "valall:coil100-open", "grocery-open-cross", "coil100-open")
FEATURES = LocalFeatureConfig(kind="orb-teblid", max_keypoints=500)  # the product's default
TOP = 10
VIEW_CACHE = ROOT / "cache" / "global-maps"


def pooled_views(collection: str, rows: np.ndarray, paths: dict[int, str], seed: int) -> tuple[np.ndarray, dict]:
    """(sampled rows, pooling -> (VIEWS, n, C) pooled features of strong views of each), cached."""
    import torch
    from tqdm import tqdm

    cache = VIEW_CACHE / f"pooling-views-{collection.replace(':', '-')}-{seed}.npz"
    if cache.is_file():
        data = np.load(cache)
        return data["rows"], {how: data[how] for how in POOLINGS}
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(rows, min(VIEW_IMAGES, len(rows)), replace=False))
    model = build_model(ModelConfig(), pretrained=True).eval()
    keys = [(int(r), k) for k in range(VIEWS) for r in sample]
    parts = {how: [] for how in POOLINGS}
    for start in tqdm(range(0, len(keys), 50), desc=f"views {collection}", unit="batch", leave=False):
        chunk = keys[start:start + 50]
        batch = torch.stack([strong_view(load_image(paths[r]), 224, np.random.default_rng([r, k, 7])) for r, k in chunk])
        with torch.inference_mode():
            maps = model.backbone.forward_features(batch).flatten(2).transpose(1, 2).numpy()
        for how in POOLINGS:
            parts[how].append(pool(maps, how))
    out = {how: np.concatenate(parts[how]).reshape(VIEWS, len(sample), -1) for how in POOLINGS}
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, rows=sample, **out)
    return sample, out


def pseudo_average_precision(sims: np.ndarray, positives: list[np.ndarray]) -> float:
    """mAP (waldo.eval.metrics) of the pseudo-positives in each row's ranking, over the rows that
    have any (the row's own position excluded by the caller setting it to -inf)."""
    kept = [i for i, pos in enumerate(positives) if len(pos)]
    if not kept:
        return float("nan")
    orders = np.argsort(-sims[kept], axis=1, kind="stable")
    matches = np.stack([np.isin(order, positives[i]) for order, i in zip(orders, kept)])
    return mean_average_precision(matches, np.array([len(positives[i]) for i in kept]))


def whole_training_splits(index: dict[str, int]) -> dict[str, dict]:
    """``valall:NAME``: every training identity of the protocol searched as its test searches
    (VALIDATION_SPLITS' query / gallery rule). Nothing here is fitted with labels, so validation
    needs no held-out fold, and the whole split is as large as the test (coil: 50 objects, where
    the two folds' 25 are near saturation)."""
    out = {}
    for name, (is_query, is_gallery) in VALIDATION_SPLITS.items():
        records = get_protocol(name).train.records
        queries, gallery = [r for r in records if is_query(r)], [r for r in records if is_gallery(r)]
        out[f"valall:{name}"] = {"q": np.array([index[str(r.path)] for r in queries]),
                                 "g": np.array([index[str(r.path)] for r in gallery]),
                                 "qid": np.array([r.identity for r in queries]),
                                 "gid": np.array([r.identity for r in gallery]), "loo": False}
    return out


def study(collection: str, sets: dict, maps: np.ndarray, paths: dict[int, str], sample: int, seed: int) -> dict:
    s = sets[collection]
    rows = np.unique(np.concatenate([s["q"], s["g"]]))  # the photos an index of this collection holds
    described = {}
    view_rows, views = pooled_views(collection, rows, paths, seed)
    for how in POOLINGS:
        pooled = pool(maps[rows], how).astype(np.float64)
        x = np.concatenate([pooled[np.searchsorted(rows, view_rows)], *views[how]])
        groups = np.tile(np.arange(len(view_rows)), 1 + VIEWS)
        mean, projection = learned_projection(x, groups, pooled, WhiteningSetting(1024, VIEW_SHRINK, 0.0))
        described[how] = describe(pooled, mean, projection).astype(np.float32)
    rng = np.random.default_rng(seed)
    picked = np.sort(rng.choice(len(rows), min(sample, len(rows)), replace=False))
    sims = {how: d[picked] @ d.T for how, d in described.items()}
    for how in POOLINGS:
        sims[how][np.arange(len(picked)), picked] = -np.inf
    candidates = [np.unique(np.concatenate([np.argsort(-sims[how][i])[:TOP] for how in POOLINGS]))
                  for i in range(len(picked))]
    keypoints = extract_features([paths[int(r)] for r in rows], FEATURES)
    config = GVConfig()
    positives, n_pairs = [], 0
    with GeometricReranker(config) as reranker:
        for i, cand in zip(picked, candidates):
            found = reranker.verify_many(LocalFeatures(*keypoints[int(i)]), [LocalFeatures(*keypoints[int(c)]) for c in cand])
            positives.append(np.array([c for c, v in zip(cand, found) if config.verifies(v)], np.int64))
            n_pairs += len(cand)
    # How right the pseudo-labels are (labels used only to report this, never to choose).
    ids = {int(r): i for r, i in zip(np.concatenate([s["q"], s["g"]]), np.concatenate([s["qid"], s["gid"]]))}
    row_ids = np.array([ids[int(r)] for r in rows])
    verified = sum(len(p) for p in positives)
    correct = sum(int((row_ids[p] == row_ids[i]).sum()) for i, p in zip(picked, positives))
    out = {"collection": collection, "photos": int(len(rows)), "sampled": int(len(picked)), "pairs_verified_from": n_pairs,
           "pseudo_positives": verified, "pseudo_precision": round(correct / verified, 4) if verified else None,
           "photos_with_pseudo_positive": int(sum(len(p) > 0 for p in positives)), "poolings": {}}
    for how in POOLINGS:
        labelled = score(described[how][np.searchsorted(rows, s["q"])], described[how][np.searchsorted(rows, s["g"])],
                         s["qid"], s["gid"], s["loo"])
        out["poolings"][how] = {"pseudo_map": round(pseudo_average_precision(sims[how], positives), 4),
                                "labelled_r1": round(labelled["r1"], 4), "labelled_map": round(labelled["map"], 4)}
    out["pseudo_choice"] = max(POOLINGS, key=lambda h: out["poolings"][h]["pseudo_map"])
    out["labelled_choice_map"] = max(POOLINGS, key=lambda h: out["poolings"][h]["labelled_map"])
    print(json.dumps(out), flush=True)
    return out


def table(results: dict) -> str:
    lines = ["| collection | photos (sampled; with a verified neighbour) | pseudo-positives (precision) | "
             + " | ".join(f"{h}: pseudo-mAP / labelled R@1 / mAP" for h in POOLINGS) + " | pseudo choice | labelled choice (mAP) |",
             "|---|---|---|" + "---|" * len(POOLINGS) + "---|---|"]
    for r in results["rows"]:
        cells = [f"{p['pseudo_map']:.4f} / {p['labelled_r1']:.4f} / {p['labelled_map']:.4f}" for p in r["poolings"].values()]
        lines.append(f"| {r['collection']} | {r['photos']} ({r['sampled']}; {r['photos_with_pseudo_positive']}) | "
                     f"{r['pseudo_positives']} ({100 * (r['pseudo_precision'] or 0):.1f}%) | " + " | ".join(cells)
                     + f" | {r['pseudo_choice']} | {r['labelled_choice_map']} |")
    lines += ["", "| rows | always avg (the default): mean labelled R@1 / mAP | pseudo choice: mean labelled R@1 / mAP |",
              "|---|---|---|"]
    kinds = (("validation folds", lambda c: c.startswith("val") and not c.startswith("valall")),
             ("whole training splits (validation)", lambda c: c.startswith("valall")),
             ("test protocols (reported)", lambda c: not c.startswith("val")))
    for label, keep in kinds:
        rows = [r for r in results["rows"] if keep(r["collection"])]
        fixed = [r["poolings"]["avg"] for r in rows]
        chosen = [r["poolings"][r["pseudo_choice"]] for r in rows]
        lines.append(f"| {label} | " + " | ".join(
            f"{np.mean([c['labelled_r1'] for c in cells]):.4f} / {np.mean([c['labelled_map'] for c in cells]):.4f}"
            for cells in (fixed, chosen)) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sample", type=int, default=600, help="photos per collection whose top-10 are verified")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "global" / "pooling_verified.json")
    parser.add_argument("--table", action="store_true", help="print the markdown table of the saved JSON")
    args = parser.parse_args()
    if args.table:
        print(table(json.loads(args.out.read_text())))
        return 0
    maps, index = load_maps(224)
    sets = {**splits(index), **whole_training_splits(index)}
    paths = {row: path for path, row in index.items()}
    results = {"features": FEATURES.model_dump(), "top": TOP, "sample": args.sample, "seed": args.seed,
               "rows": [study(c, sets, maps, paths, args.sample, args.seed) for c in COLLECTIONS]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
