"""Issue 15: how geometric verification should follow the RRT (``rrt+gv``), chosen on validation.

``gv`` on the global order fuses geometry with the global similarity (experiments/gv_fusion.py
chose it: similarity + 0.2 x the candidates' similarity range x (1 + ln(inliers / 15)) for a
candidate with at least 15 inliers). After another reranker (``rrt+gv``, ``rrt-fusion+gv``) GV
used DELG's rule instead: candidates with evidence first, by inlier count, the rest in the
reranker's order. On make demo's model that composition ranks below ``gv`` alone and below
global search on grocery-open-cross: verified-first throws away the order the RRT (and the
global residual inside it) gives the verified images, and a handful of inliers on a shared logo
outranks everything unverified.

The alternative measured here needs no new parameter: GV's own fused rule with the *prior
reranker's score* in place of the global similarity (the RRT's logit, which is a scaled global
cosine plus what the transformer adds; the fused score of ``rrt-fusion``). The choice, per
composition, between the two rules: the mean map@100 over the validation sets (the RRT's own
selection metric), today's rule kept unless the fused one is higher.

Validation: the shipped RRT run's held-out training identities (grocery-open-cross:train,
coil100-open:train, abo_sample), every held-out query, searched like each protocol's test with
the serving top-100 (experiments/local_matching.validation_setup), the global head refitted
without those identities so that global search is as blind to them as to a test's. Keypoints
and verification: the product's (ORB + TEBLID, 500 per image; GVConfig()). Test queries are
reported by `waldo eval`-equivalent runs of the product's rerankers (experiments/rrt_views.py
eval), never used here.

    .venv/bin/python experiments/gv_after_rrt.py     # ~5 min; results/rrt_views/gv-after-rrt.json
    .venv/bin/python experiments/gv_after_rrt.py --table
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

OUT = ROOT / "results" / "rrt_views" / "gv-after-rrt.json"
CACHE = ROOT / "runs" / "gv-after-rrt"
MODEL = "lite0-lw-rrt"
#: Bonus weights shown beside the product's (information only: the choice uses GVConfig's).
WEIGHT_GRID = (0.05, 0.1, 0.2, 0.4, 0.8)


def set_inliers(setup, index: int, reranker, progress: bool) -> np.ndarray:
    """(Q, K) inliers of every query's top-K candidates in one validation set (cached)."""
    from tqdm.auto import tqdm

    from waldo.eval.gv_eval import extract_features
    from waldo.models.keypoints import LocalFeatures

    vset, data = setup.sets[index], setup.validator.prepared[index]
    candidates = data["candidates"]
    key = hashlib.sha256(json.dumps([reranker.config.model_dump(), vset.queries.tolist(),
                                     candidates.tolist()]).encode()).hexdigest()[:16]
    path = CACHE / f"{vset.name.replace(':', '-')}-{key}.npy"
    if path.is_file():
        return np.load(path)
    rows = np.unique(np.concatenate([vset.queries, candidates.reshape(-1)]))
    ragged = extract_features([setup.pool.paths[r] for r in rows], reranker_features(), progress=progress)
    position = {int(r): i for i, r in enumerate(rows)}
    inliers = np.zeros(candidates.shape, np.int32)
    for q, (query, cands) in enumerate(tqdm(list(zip(vset.queries, candidates)), desc=f"gv {vset.name}",
                                            disable=not progress)):
        verifications = reranker.verify_many(LocalFeatures(*ragged[position[int(query)]]),
                                             [LocalFeatures(*ragged[position[int(c)]]) for c in cands])
        inliers[q] = [v.inliers for v in verifications]
    CACHE.mkdir(parents=True, exist_ok=True)
    np.save(path, inliers)
    return inliers


def reranker_features():
    from waldo.models.keypoints import LocalFeatureConfig

    return LocalFeatureConfig()  # what an index stores by default (ORB + TEBLID, 500)


def verified_first_scores(inliers: np.ndarray, prior: np.ndarray, need: int) -> np.ndarray:
    """Scores whose descending stable sort is DELG's rule on the order of ``prior``."""
    from waldo.rerank.gv import verified_first_order

    out = np.empty(prior.shape, np.float64)
    for q in range(len(prior)):
        order = np.argsort(-prior[q], kind="stable")
        ranked = order[verified_first_order(inliers[q, order], need)]
        out[q, ranked] = -np.arange(len(ranked))
    return out


def fused(inliers: np.ndarray, prior: np.ndarray, need: int, weight: float, scale: str) -> np.ndarray:
    from waldo.rerank.gv import fused_scores

    return np.stack([fused_scores(i, p, need, weight, scale).astype(np.float64) for i, p in zip(inliers, prior)])


def run(progress: bool) -> dict:
    from local_matching import validation_setup
    from waldo.rerank.gv import GeometricReranker
    from waldo.rerank.rrt_rerankers import fuse_scores, probabilities

    setup = validation_setup(MODEL, refit=True, max_queries=0)
    weight = setup.train_config["fusion_weight"]
    logits = setup.validator.logits(setup.rrt)
    rows: dict[str, list[dict]] = {}
    with GeometricReranker() as reranker:
        config = reranker.config
        need, w, scale = config.min_inliers, config.fusion_weight, config.fusion_scale
        for index, (vset, data, logit) in enumerate(zip(setup.sets, setup.validator.prepared, logits)):
            inliers = set_inliers(setup, index, reranker, progress)
            glob = data["scores"].astype(np.float64)
            fusion = np.stack([fuse_scores(g, lg, weight) for g, lg in zip(glob, logit)]).astype(np.float64)
            rankings = {
                "global": glob,
                "gv": fused(inliers, glob, need, w, scale),
                "gv, verified first (GV's rule before experiments/gv_fusion.py)": verified_first_scores(inliers, glob,
                                                                                                      need),
                "rrt": logit.astype(np.float64),
                "rrt-fusion": fusion,
                "rrt+gv, verified first (before)": verified_first_scores(inliers, logit, need),
                "rrt+gv, fused on the RRT's logit": fused(inliers, logit, need, w, scale),
                "rrt+gv, fused on the RRT's probability": fused(
                    inliers, np.stack([probabilities(lg) for lg in logit]).astype(np.float64), need, w, scale),
                "rrt-fusion+gv, verified first (before)": verified_first_scores(inliers, fusion, need),
                "rrt-fusion+gv, fused": fused(inliers, fusion, need, w, scale),
            }
            for grid_weight in WEIGHT_GRID:
                rankings[f"rrt+gv, fused on the logit, weight {grid_weight:g}"] = fused(inliers, logit, need,
                                                                                       grid_weight, scale)
            for name, scores in rankings.items():
                metrics = setup.validator._metrics(data, scores)
                rows.setdefault(name, []).append({"set": vset.name, "queries": len(vset.queries),
                                                  **{m: float(metrics[m]) for m in ("recall@1", "map@100")}})
            print(json.dumps({vset.name: {n: round(r[-1]["map@100"], 4) for n, r in rows.items()}}), flush=True)
    macro = {name: {m: float(np.mean([r[m] for r in per_set])) for m in ("recall@1", "map@100")}
             for name, per_set in rows.items()}
    choice = {}
    for composition, before, after in (("rrt+gv", "rrt+gv, verified first (before)", "rrt+gv, fused on the RRT's logit"),
                                       ("rrt-fusion+gv", "rrt-fusion+gv, verified first (before)",
                                        "rrt-fusion+gv, fused")):
        better = macro[after]["map@100"] > macro[before]["map@100"] + 1e-12
        choice[composition] = {"chosen": "fused" if better else "verified first", "before": macro[before],
                               "fused": macro[after]}
    return {"model": MODEL, "gv_config": config.model_dump(), "rrt_fusion_weight": weight,
            "refit_check_min_cosine": setup.refit_check,
            "sets": [{"name": s.name, "queries": len(s.queries), "gallery": len(s.gallery)} for s in setup.sets],
            "per_set": rows, "macro": macro, "choice": choice,
            "command": ".venv/bin/python experiments/gv_after_rrt.py"}


def table(result: dict) -> str:
    sets = ", ".join(f"{s['name']} ({s['queries']} queries, gallery {s['gallery']})" for s in result["sets"])
    lines = [f"Validation: the shipped RRT run's held-out identities, {sets}; global head refitted without them. "
             "map@100 per set; the mean chooses.", "",
             "| ranking | " + " | ".join(s["name"] for s in result["sets"]) + " | mean R@1 | mean map@100 |",
             "|---|" + "---|" * (len(result["sets"]) + 2)]
    for name, per_set in result["per_set"].items():
        cells = " | ".join(f"{r['map@100']:.4f}" for r in per_set)
        m = result["macro"][name]
        lines.append(f"| {name} | {cells} | {m['recall@1']:.4f} | {m['map@100']:.4f} |")
    lines.append("")
    for composition, c in result["choice"].items():
        lines.append(f"- `{composition}`: **{c['chosen']}** (mean map@100 verified first {c['before']['map@100']:.4f}, "
                     f"fused {c['fused']['map@100']:.4f})")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--table", action="store_true", help="print the table of the last run")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    if args.table:
        print(table(json.loads(OUT.read_text())))
        return 0
    result = run(progress=not args.quiet)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
