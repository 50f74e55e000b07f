"""Issue 17: geometric verification smaller, faster and right — choose on validation, report on test.

1. **Validation** (never test queries): each protocol's training identities split in two folds
   (experiments/gv_results.validation_protocol: the untrained model fitted on fold A, fold B
   searched with the test's query/gallery rule), up to 300 queries. For every local-feature
   option (kind, keypoint cap, Lowe ratio) the top-100 of each query is verified once with the
   checks off, keeping per pair the inliers, the inliers' spread over the query and the fitted
   model's box distortion; every rule (min_inliers x max_anisotropy x min_spread x verified-first
   or fused with the global similarity) is then applied without verifying again. The option and
   rule win by :func:`choose`: among options that store at most 24 KB per image and rules that
   fix at least as many validation top-1 results as they break in every query group (packages,
   fruit, vegetables; coil's objects), the quickest to extract within 0.005 of the best mean
   validation mAP over both protocols (the issue asks for index builds >= 60 images/s too).
2. **Test**: the protocols' test queries reranked by the product's GeometricReranker with the
   chosen setting, and with the setting of before this issue (SIFT 1000 keypoints, verified
   first, min_inliers 8) on the same global ranking: R@1 / mAP, fixed / broken top-1 per query
   group, bytes per image, and verification time per query (p50 / p95, 2 threads).
3. **False verifications** (grocery, all images): pairs of photos of *different* products of one
   brand (Tropicana, Arla, Alpro, Bravo, Oatly, ...) and of different brands of one shelf (same
   coarse class: juice, milk, yoghurt ...), and as the control pairs of one product: how many
   are called verified, before and after.

    .venv/bin/python experiments/gv_compact.py            # ~40 min on 2 cores; results/gv_compact.json
    .venv/bin/python experiments/gv_compact.py --doc      # docs/results.md block from the JSON
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # GV runs its own threads

import argparse  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gv_results import changes_by_group, group_of, short, subsample, validation_protocol  # noqa: E402

from waldo.data.protocols import get_protocol  # noqa: E402
from waldo.data.transforms import get_transform  # noqa: E402
from waldo.eval.evaluate import evaluate_protocol  # noqa: E402
from waldo.eval.gv_eval import run_keypoints  # noqa: E402
from waldo.eval.runner import prepare_model, run_eval_full  # noqa: E402
from waldo.models.keypoints import LEGACY_SIFT, LocalFeatureConfig, LocalFeatures, extract_many  # noqa: E402
from waldo.rerank.gv import (  # noqa: E402
    GeometricReranker,
    GVConfig,
    box_distortion,
    fused_scores,
    verified_first_order,
    verify_pair,
)
from waldo_experiments.doc_blocks import write_block  # noqa: E402
from waldo_experiments.gv_study import ranking_metrics  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results" / "gv_compact.json"
DOC = ROOT / "docs" / "results.md"
START, END = "<!-- gv-compact:start -->", "<!-- gv-compact:end -->"
PROTOCOLS = ("grocery-open-cross", "coil100-open")
VAL_QUERIES = 300
MAX_BYTES = 24 * 1024
#: Validation mAP the choice may give up for quicker extraction (choose()).
MAP_TOLERANCE = 0.005
#: (name, features, Lowe ratios tried); "before" is what indexes stored before this issue.
OPTIONS = [("sift 1000 (before)", LEGACY_SIFT, (0.8,)),
           ("teblid 300", LocalFeatureConfig(kind="teblid", max_keypoints=300), (0.9, 0.95)),
           ("teblid 500", LocalFeatureConfig(kind="teblid", max_keypoints=500), (0.9, 0.95)),
           ("orb-teblid 500", LocalFeatureConfig(kind="orb-teblid", max_keypoints=500), (0.9, 0.95))]
BEFORE = ("sift 1000 (before)", GVConfig(min_inliers=8, ratio=0.8, max_anisotropy=1e9, fusion_weight=None))
MIN_INLIERS = (6, 8, 10, 12, 15, 20)
ANISOTROPY = (1e9, 4.0, 2.5)
SPREAD = (0.0, 0.05, 0.1, 0.2, 0.3)
FUSION = (None, 0.05, 0.1, 0.2, 0.4, 0.8)
OPEN = dict(min_inliers=3, max_anisotropy=1e9, min_spread=0.0)  # checks off: applied offline


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def pair_stats(query: LocalFeatures, candidates: list[LocalFeatures], config: GVConfig,
               reranker: GeometricReranker) -> np.ndarray:
    """(K, 3): inliers, spread, anisotropy (inf without a model) of each candidate."""
    out = np.zeros((len(candidates), 3))
    for i, v in enumerate(reranker.verify_many(query, candidates)):
        if v.transform is None or v.inliers == 0:
            out[i] = (0, 0.0, np.inf)
            continue
        # The ranking's max_anisotropy check measures the query's whole keypoint box (as
        # estimate_transform does), not the inliers' box that Verification.anisotropy holds.
        distortion = box_distortion(v.transform, query.keypoints)
        out[i] = (v.inliers, v.spread, np.inf if distortion is None else distortion[1])
    return out


def apply_rule(stats: np.ndarray, global_scores: np.ndarray, min_inliers: int, anisotropy: float, spread: float,
               fusion: float | None) -> np.ndarray:
    """(Q, K) order positions under one rule, from (Q, K, 3) stats."""
    inliers = np.where((stats[..., 2] <= anisotropy) & (stats[..., 1] >= spread), stats[..., 0], 0)
    if fusion is None:
        return np.stack([verified_first_order(row, min_inliers) for row in inliers])
    return np.stack([np.argsort(-fused_scores(row, g, min_inliers, fusion), kind="stable")
                     for row, g in zip(inliers, global_scores)])


def reordered(indices: np.ndarray, order: np.ndarray) -> np.ndarray:
    out = indices.copy()
    out[:, : order.shape[1]] = np.take_along_axis(indices[:, : order.shape[1]], order, axis=1)
    return out


def rank1_changes(before: np.ndarray, after: np.ndarray, groups: list[str]) -> dict[str, list[int]]:
    """group -> [fixed, broken] top-1 results."""
    out: dict[str, list[int]] = {}
    for group, b, a in zip(groups, before[:, 0], after[:, 0]):
        cell = out.setdefault(group, [0, 0])
        cell[0] += int(a and not b)
        cell[1] += int(b and not a)
    return out


def validate(name: str) -> dict:
    test = get_protocol(name)
    val = validation_protocol(test)
    model, config = prepare_model(val, progress=False)
    run = subsample(evaluate_protocol(model, val, get_transform("resize256-crop224", config.image_size, seed=0),
                                      progress=False), VAL_QUERIES)
    k = min(100, run.knn_indices.shape[1])
    groups = [group_of(val.queries.paths[row]) for row in run.query_rows]
    out = {"protocol": val.name, "n_queries": len(run.query_rows), "global": short(ranking_metrics(val, run, run.knn_indices)),
           "options": {}}
    log(f"{name} validation: {out['n_queries']} queries, global {out['global']}")
    for option, features, ratios in OPTIONS:
        keypoints = run_keypoints(val, features)
        bytes_per_image = float(keypoints.gallery.counts().mean() * (8 + features.descriptor_bytes) + 8)
        sample = val.gallery.paths[:: max(1, len(val.gallery) // 100)][:100]
        start = time.perf_counter()
        extract_many(sample, features, workers=1)  # uncached: what indexing pays per image, one thread
        extract_ms = 1000 * (time.perf_counter() - start) / len(sample)
        for ratio in ratios:
            with GeometricReranker(GVConfig(ratio=ratio, **OPEN)) as reranker:
                stats = np.stack([pair_stats(keypoints.query(int(run.query_rows[q])),
                                             [keypoints.candidate(int(run.gallery_rows[i])) for i in run.knn_indices[q, :k]],
                                             reranker.config, reranker) for q in range(len(run.query_rows))])
            rules = {}
            for m, a, s, w in itertools.product(MIN_INLIERS, ANISOTROPY, SPREAD, FUSION):
                order = apply_rule(stats, run.knn_scores[:, :k], m, a, s, w)
                rules[json.dumps([m, a, s, w])] = {
                    **short(ranking_metrics(val, run, reordered(run.knn_indices, order))),
                    "changes": rank1_changes(run.matches, np.take_along_axis(run.matches[:, :k], order, axis=1), groups)}
            out["options"][f"{option} r{ratio}"] = {"bytes_per_image": bytes_per_image, "extract_ms": extract_ms,
                                                     "rules": rules}
            best = max(rules.items(), key=lambda kv: kv[1]["map"])
            log(f"  {option} r{ratio}: {bytes_per_image / 1024:.1f} KB/image, best {best}")
    return out


def choose(validation: dict[str, dict]) -> tuple[str, dict]:
    """The (option, rule) to ship. Allowed: options storing at most MAX_BYTES per image, rules
    that in every query group of every protocol's validation fix at least as many top-1 results
    as they break (the issue's bar, held on validation so that the test only reports it). Among
    those within MAP_TOLERANCE of the best mean validation mAP, the option quickest to extract
    (the issue also asks for index builds >= 60 images/s), then the best mAP, then R@1."""
    names = list(validation)
    allowed = []
    for option in validation[names[0]]["options"]:
        if validation[names[0]]["options"][option]["bytes_per_image"] > MAX_BYTES:
            continue
        extract_ms = float(np.mean([validation[n]["options"][option]["extract_ms"] for n in names]))
        for rule in validation[names[0]]["options"][option]["rules"]:
            cells = [validation[n]["options"][option]["rules"][rule] for n in names]
            if any(fixed < broken for c in cells for fixed, broken in c["changes"].values()):
                continue
            allowed.append((float(np.mean([c["map"] for c in cells])), float(np.mean([c["recall@1"] for c in cells])),
                            extract_ms, option, rule))
    best_map = max(a[0] for a in allowed)
    _, _, _, option, rule = min((a for a in allowed if a[0] >= best_map - MAP_TOLERANCE),
                                key=lambda a: (a[2], -a[0], -a[1]))
    m, a, s, w = json.loads(rule)
    return option, {"min_inliers": m, "max_anisotropy": a, "min_spread": s, "fusion_weight": w,
                    "ratio": float(option.rsplit(" r", 1)[1])}


def test_rows(name: str, settings: list[tuple[str, LocalFeatureConfig, GVConfig]]) -> dict:
    run, metrics = run_eval_full(name, progress=False)
    test = get_protocol(name)
    out = {"protocol": name, "n_queries": int(metrics["n_queries"]), "global": short(metrics), "rows": []}
    for label, features, config in settings:
        keypoints = run_keypoints(test, features, progress=True)
        k = min(config.top_k, run.knn_indices.shape[1])
        orders, times = [], []
        with GeometricReranker(config) as reranker:
            for q in range(len(run.query_rows)):
                query = keypoints.query(int(run.query_rows[q]))
                candidates = [keypoints.candidate(int(run.gallery_rows[i])) for i in run.knn_indices[q, :k]]
                start = time.perf_counter()
                orders.append(reranker.rerank_features(query, candidates, run.knn_scores[q, :k]).order)
                times.append(time.perf_counter() - start)
        indices = reordered(run.knn_indices, np.stack(orders))
        matches = np.take_along_axis(run.matches[:, :k], np.stack(orders), axis=1)
        changes, _ = changes_by_group(test, run, run.matches, matches, indices, np.zeros(len(indices), np.int32))
        counts = keypoints.gallery.counts()
        out["rows"].append({"row": label, **short(ranking_metrics(test, run, indices)), "changes_at_rank1": changes,
                            "verify_ms_p50": round(1000 * float(np.median(times)), 1),
                            "verify_ms_p95": round(1000 * float(np.percentile(times, 95)), 1),
                            "keypoints_per_image": round(float(counts.mean()), 1),
                            "bytes_per_image": round(float(counts.mean() * (8 + features.descriptor_bytes) + 8), 1),
                            "features": features.model_dump(), "gv": config.model_dump()})
        log(f"{name} {label}: {out['rows'][-1]}")
    return out


SAME = "same product (control)"


def product_pairs(records: list, per_pair: int = 4, seed: int = 0) -> dict[str, list[tuple[str, str, str]]]:
    """Photo pairs of packaged products: different products of one brand (the label's first word),
    different brands of one shelf (same coarse class) and, as the control, one product."""
    by_class: dict[str, list] = {}
    for r in records:
        if "/Packages/" in str(r.path):
            by_class.setdefault(r.attrs["class_name"], []).append(r)
    rng = np.random.default_rng(seed)
    kinds: dict[str, list] = {"same brand, different product": [], "same shelf, different brand": [], SAME: []}
    classes = sorted(by_class)
    for a, b in itertools.combinations(classes, 2):
        shelf_a, shelf_b = by_class[a][0].attrs["coarse_name"], by_class[b][0].attrs["coarse_name"]
        kind = ("same brand, different product" if a.split("-")[0] == b.split("-")[0] else
                "same shelf, different brand" if shelf_a == shelf_b else None)
        if kind:
            for _ in range(per_pair):
                kinds[kind].append((str(rng.choice(by_class[a]).path), str(rng.choice(by_class[b]).path), f"{a} / {b}"))
    for c in classes:
        for _ in range(per_pair):
            x, y = rng.choice(len(by_class[c]), 2, replace=False)
            kinds[SAME].append((str(by_class[c][x].path), str(by_class[c][y].path), c))
    return kinds


def describe_pairs(kinds: dict, features: LocalFeatureConfig) -> dict:
    """path -> LocalFeatures of every photo in ``kinds``' pairs, each described once."""
    paths = sorted({path for pairs in kinds.values() for pair in pairs for path in pair[:2]})
    return dict(zip(paths, extract_many(paths, features)))


def verify_pairs(kinds: dict, features: LocalFeatureConfig, config: GVConfig) -> dict[str, list]:
    described = describe_pairs(kinds, features)
    return {kind: [verify_pair(described[q], described[c], config) for q, c, _ in pairs] for kind, pairs in kinds.items()}


CLAIM_SPREAD = (0.0, 0.05, 0.1, 0.15, 0.2, 0.3)
CLAIM_ANISOTROPY = (2.0, 2.5, 4.0, 1e9)
MAX_FALSE_CLAIMS = 0.10


def choose_claim(features: LocalFeatureConfig, config: GVConfig) -> dict:
    """The bar for calling a match verified, on grocery's *training* identities' package pairs:
    a claim of "same product" may be wrong for at most MAX_FALSE_CLAIMS of the hardest
    different-product pairs (one brand, one shelf); among the (claim_min_spread,
    claim_max_anisotropy) that keep to it, the one calling the most same-product pairs verified
    (then the stricter)."""
    kinds = product_pairs(get_protocol("grocery-open-cross").train.records)
    found = verify_pairs(kinds, features, config)
    different = [v for kind, vs in found.items() if kind != SAME for v in vs]
    grid = []
    for spread, anisotropy in itertools.product(CLAIM_SPREAD, CLAIM_ANISOTROPY):
        rule = config.model_copy(update={"claim_min_spread": spread, "claim_max_anisotropy": anisotropy})
        same = float(np.mean([rule.verifies(v) for v in found[SAME]]))
        false = float(np.mean([rule.verifies(v) for v in different]))
        grid.append({"claim_min_spread": spread, "claim_max_anisotropy": anisotropy, "same_verified": same,
                     "different_verified": false})
    allowed = [g for g in grid if g["different_verified"] <= MAX_FALSE_CLAIMS] or grid
    best = max(allowed, key=lambda g: (g["same_verified"], g["claim_min_spread"], -g["claim_max_anisotropy"]))
    log(f"claim bar on training pairs ({ {k: len(v) for k, v in kinds.items()} }): {best}")
    return {"chosen": best, "pairs": {k: len(v) for k, v in kinds.items()}, "grid": grid}


def false_verifications(settings: list[tuple[str, LocalFeatureConfig, GVConfig, bool]]) -> dict:
    """Verified pairs among different products of one brand / of one shelf, and of one product,
    on grocery's test identities. Each setting's last item: judge by the claim's bar
    (GVConfig.verifies) or by the evidence's alone (inliers >= min_inliers, the only bar before
    this issue)."""
    kinds = product_pairs(get_protocol("grocery-open").gallery.records)
    out: dict = {"pairs": {k: len(v) for k, v in kinds.items()}, "rows": []}
    for label, features, config, by_claim in settings:
        found = verify_pairs(kinds, features, config)
        row = {"row": label}
        for kind, pairs in kinds.items():
            verified = [config.verifies(v) if by_claim else v.inliers >= config.min_inliers for v in found[kind]]
            row[kind] = int(sum(verified))
            if kind != SAME:
                row[f"{kind}: examples"] = sorted({name for (_, _, name), v in zip(pairs, verified) if v})[:6]
        out["rows"].append(row)
        log(f"false verifications {row}")
    return out


def fv_table(settings: list[tuple[str, LocalFeatureConfig, GVConfig]]) -> dict:
    """Choose the claim's bar on training pairs, then count on test pairs: before (its only bar,
    inliers), after at the evidence bar, and after as the product calls a match verified."""
    (before, before_features, before_config), (after, features, config) = settings
    claim = choose_claim(features, config)
    config = config.model_copy(update={k: claim["chosen"][k] for k in ("claim_min_spread", "claim_max_anisotropy")})
    return {"claim": claim, **false_verifications([(before, before_features, before_config, False),
                                                   (after + ", evidence bar (ranking)", features, config, False),
                                                   (after + ", called verified", features, config, True)])}


def _off(value: float, off: float) -> str:
    """A check's threshold, or "off" at the value that disables it."""
    return "off" if (value >= off if off else value <= off) else f"{value:g}"


def markdown(results: dict) -> str:
    chosen = results["chosen"]
    lines = [START, "", f"Chosen on validation: **{chosen['option']}**, rule "
             f"min_inliers {chosen['rule']['min_inliers']}, max_anisotropy {_off(chosen['rule']['max_anisotropy'], 1e8)}, "
             f"min_spread {_off(chosen['rule']['min_spread'], 0)}, "
             + ("verified first" if chosen["rule"]["fusion_weight"] is None else
                f"fused with the global similarity (weight {chosen['rule']['fusion_weight']:g})")
             + f" (validation mAP {chosen['validation_map']:.4f} mean over both protocols; the setting of before: "
             f"{chosen['before_validation_map']:.4f}).", "",
             "| protocol | ranking | R@1 | mAP | verify top-100 p50 / p95 ms | keypoints / image | bytes / image |",
             "|---|---|---|---|---|---|---|"]
    for t in results["test"]:
        lines.append(f"| {t['protocol']} | global | {t['global']['recall@1']:.4f} | {t['global']['map']:.4f} | | | |")
        for row in t["rows"]:
            lines.append(f"| {t['protocol']} | +GV, {row['row']} | {row['recall@1']:.4f} | {row['map']:.4f} | "
                         f"{row['verify_ms_p50']:.0f} / {row['verify_ms_p95']:.0f} | {row['keypoints_per_image']:.0f} | "
                         f"{row['bytes_per_image'] / 1024:.1f} KB |")
    lines += ["", "Top-1 changes per query group (fixed / broken):", "",
              "| protocol | group | queries | " + " | ".join(r["row"] for r in results["test"][0]["rows"]) + " |",
              "|---|---|---|" + "---|" * len(results["test"][0]["rows"])]
    for t in results["test"]:
        for group in sorted(t["rows"][0]["changes_at_rank1"]):
            cells = [f"{r['changes_at_rank1'][group]['fixed']} / {r['changes_at_rank1'][group]['broken']}" for r in t["rows"]]
            lines.append(f"| {t['protocol']} | {group} | {t['rows'][0]['changes_at_rank1'][group]['queries']} | "
                         + " | ".join(cells) + " |")
    fv = results["false_verifications"]
    kinds = list(fv["pairs"])
    claim = fv.get("claim", {}).get("chosen")
    lines += ["", "Pairs with geometric evidence and pairs called verified (grocery's test packages, photos drawn at "
              "random per pair of classes)"
              + (f"; the bar for *called verified* (inliers spread over >= {claim['claim_min_spread']:.0%} of the "
                 f"query's extent, the model's stretch <= {claim['claim_max_anisotropy']:g}) was chosen on the "
                 f"training packages' pairs: wrong for {claim['different_verified']:.0%} of different-product pairs "
                 f"there (at most 10% allowed), {claim['same_verified']:.0%} of same-product pairs verified"
                 if claim else "") + ":", "",
              "| setting | " + " | ".join(f"{k} ({fv['pairs'][k]} pairs)" for k in kinds) + " |",
              "|---|" + "---|" * len(kinds)]
    for row in fv["rows"]:
        lines.append(f"| {row['row']} | " + " | ".join(str(row[k]) for k in kinds) + " |")
    lines += ["", "Produced by `.venv/bin/python experiments/gv_compact.py` (results/gv_compact.json); verification "
              "times are the reranker alone (features precomputed) with 2 threads on this 2-core machine.", "", END]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--doc", action="store_true", help="rewrite the docs block from the saved JSON")
    parser.add_argument("--false-verifications", action="store_true",
                        help="recompute only the false-verification table of the saved JSON (its chosen setting)")
    args = parser.parse_args()
    if args.false_verifications:
        results = json.loads(RESULTS.read_text())
        chosen = results["chosen"]
        features = dict((o, f) for o, f, _ in OPTIONS)[chosen["option"].rsplit(" r", 1)[0]]
        results["false_verifications"] = fv_table([(BEFORE[0], LEGACY_SIFT, BEFORE[1]),
                                                   (chosen["option"].rsplit(" r", 1)[0] + " (after)", features,
                                                    GVConfig(**chosen["rule"]))])
        RESULTS.write_text(json.dumps(results, indent=1) + "\n")
        args.doc = True
    if args.doc:
        write_block(DOC, markdown(json.loads(RESULTS.read_text())), START, END,
                    heading="## Geometric verification, compact and checked (issue 17)")
        return 0
    validation = {name: validate(name) for name in PROTOCOLS}
    option, rule = choose(validation)
    first = validation[PROTOCOLS[0]]["options"]
    before_key = json.dumps([BEFORE[1].min_inliers, BEFORE[1].max_anisotropy, 0.0, None])

    def mean_map(opt: str, key: str) -> float:
        return float(np.mean([validation[n]["options"][opt]["rules"][key]["map"] for n in PROTOCOLS]))

    chosen_key = json.dumps([rule["min_inliers"], rule["max_anisotropy"], rule["min_spread"], rule["fusion_weight"]])
    chosen = {"option": option, "rule": rule, "validation_map": mean_map(option, chosen_key),
              "before_validation_map": mean_map(f"{BEFORE[0]} r0.8", before_key)}
    log(f"chose {chosen}")
    features = dict((o, f) for o, f, _ in OPTIONS)[option.rsplit(" r", 1)[0]]
    after = GVConfig(**rule)
    settings = [(BEFORE[0], LEGACY_SIFT, BEFORE[1]), (option.rsplit(" r", 1)[0] + " (after)", features, after)]
    results = {"validation": validation, "chosen": chosen, "options_considered": list(first),
               "test": [test_rows(name, settings) for name in PROTOCOLS],
               "false_verifications": fv_table(settings)}
    RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    write_block(DOC, markdown(results), START, END, heading="## Geometric verification, compact and checked (issue 17)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
