"""Issue 15: are geometrically verified neighbours good label-free positives for the reranker?

`waldo index adapt` trains the RRT on an index's own photos without labels: its positives are
augmented views of the same photo, so it never sees *another photo of the same object*, which
is what a search must find (the issue-15 note: its label-free validation even counts other views
of the same object as wrong). Geometric verification is label-free evidence of exactly that kind.
This study measures, on validation identities only (each protocol's training identities, fold 0
of experiments/gv_fusion.py: the held-out half searched with the test's query/gallery rule, the
untrained default model fitted on the other half), how good a label "verified" would be:

* every query's global top-``K`` (K = 10 and 100) is verified with the product's local features
  and the product's "same object" claim (GVConfig: at least ``min_inliers`` inliers, spread at
  least ``claim_min_spread`` of the query's keypoint box, anisotropy at most
  ``claim_max_anisotropy``);
* **precision**: the share of verified pairs that show the same identity; **recall**: the share
  of the same-identity candidates in the top-K that are verified; **coverage**: the queries with
  at least one verified positive;
* against the label-free alternative at the same number of pairs: the pairs with the highest
  global similarity (one threshold over all queries' top-K).

    .venv/bin/python experiments/gv_positives.py         # ~10 min on 2 cores; results/gv_positives.json
    .venv/bin/python experiments/gv_positives.py --doc   # docs/results.md block from the JSON
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # GV runs its own threads

import argparse  # noqa: E402
import json  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gv_fusion import FEATURES, fold_protocol, log, model_for, verify_run  # noqa: E402
from gv_results import group_of  # noqa: E402

from waldo.data.protocols import get_protocol  # noqa: E402
from waldo.data.transforms import get_transform  # noqa: E402
from waldo.eval.evaluate import evaluate_protocol  # noqa: E402
from waldo.rerank.gv import GVConfig  # noqa: E402
from waldo_experiments.doc_blocks import write_block  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results" / "gv_positives.json"
DOC = ROOT / "docs" / "results.md"
START, END = "<!-- gv-positives:start -->", "<!-- gv-positives:end -->"
HEADING = "## Verified neighbours as label-free positives? (issue 15, validation only)"
PROTOCOLS = ("grocery-open-cross", "coil100-open")
DEPTHS = (10, 100)


def claimed(stats: np.ndarray, config: GVConfig) -> np.ndarray:
    """(Q, K) bool: the product's "verified" claim from pair stats (inliers, spread, anisotropy)."""
    return ((stats[..., 0] >= config.min_inliers) & (stats[..., 1] >= config.claim_min_spread)
            & (stats[..., 2] <= config.claim_max_anisotropy))


def label_quality(chosen: np.ndarray, same: np.ndarray) -> dict:
    """Precision, recall and coverage of ``chosen`` (Q, K) pairs as positives, ``same`` the truth."""
    n = int(chosen.sum())
    return {"pairs": n, "precision": round(float(same[chosen].mean()), 4) if n else None,
            "recall": round(float(chosen[same].mean()), 4) if same.any() else None,
            "coverage": round(float(chosen.any(axis=1).mean()), 4),
            "queries_with_a_wrong_positive": int((chosen & ~same).any(axis=1).sum())}


def by_global_similarity(scores: np.ndarray, n: int) -> np.ndarray:
    """(Q, K) bool: the ``n`` pairs of highest global similarity over all queries' top-K."""
    chosen = np.zeros(scores.shape, bool)
    if n:
        flat = np.argsort(-scores, axis=None, kind="stable")[:n]
        chosen.flat[flat] = True
    return chosen


def study(name: str, config: GVConfig) -> dict:
    val = fold_protocol(get_protocol(name), 0)
    model, model_config = model_for(val, None)
    run = evaluate_protocol(model, val, get_transform("resize256-crop224", model_config.image_size, seed=0),
                            progress=False)
    log(f"{name}: {len(run.query_rows)} validation queries; verifying their top-{max(DEPTHS)}")
    stats = verify_run(val, run)
    k_max = stats.shape[1]
    same = np.asarray(run.matches[:, :k_max], bool)
    verified = claimed(stats, config)
    groups = [group_of(val.queries.paths[row]) for row in run.query_rows] if name.startswith("grocery") else None
    rows = []
    for k in DEPTHS:
        k = min(k, k_max)
        gv = label_quality(verified[:, :k], same[:, :k])
        glob = label_quality(by_global_similarity(run.knn_scores[:, :k], gv["pairs"]), same[:, :k])
        row = {"top_k": k, "same_identity_pairs": int(same[:, :k].sum()), "verified": gv,
               "global_similarity_same_count": glob}
        if groups is not None:
            row["verified_by_group"] = {group: label_quality(verified[[g == group for g in groups], :k],
                                                             same[[g == group for g in groups], :k])
                                        for group in sorted(set(groups))}
        rows.append(row)
        log(f"  top-{k}: verified {gv}; global at the same count {glob}")
    return {"protocol": val.name, "queries": len(run.query_rows), "gallery": len(run.gallery_rows), "rows": rows}


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def markdown(results: dict) -> str:
    config = results["claim"]
    lines = [START, "",
             f"Validation identities only (fold 0 of each protocol's training identities, searched with the test's "
             f"query / gallery rule; untrained default model fitted on the other fold). Each query's global top-K "
             f"verified with the product's local features ({results['features']['kind']}, "
             f"{results['features']['max_keypoints']} keypoints) and its \"same object\" claim (at least "
             f"{config['min_inliers']} inliers, spread >= {config['claim_min_spread']}, anisotropy <= "
             f"{config['claim_max_anisotropy']}). Precision: verified pairs showing the same identity; recall: "
             f"same-identity candidates verified; coverage: queries with a verified neighbour. \"Global, same "
             f"count\": as many pairs, taken by the highest global similarity instead.", "",
             "| protocol (queries) | top-K | same-identity pairs | verified pairs | precision | recall | coverage "
             "| global, same count: precision | recall |",
             "|---|---|---|---|---|---|---|---|---|"]
    for protocol in results["protocols"]:
        for row in protocol["rows"]:
            v, g = row["verified"], row["global_similarity_same_count"]
            lines.append(f"| {protocol['protocol']} ({protocol['queries']}) | {row['top_k']} | "
                         f"{row['same_identity_pairs']} | {v['pairs']} | {_pct(v['precision'])} | {_pct(v['recall'])} "
                         f"| {_pct(v['coverage'])} | {_pct(g['precision'])} | {_pct(g['recall'])} |")
    groups = [(p["protocol"], row) for p in results["protocols"] for row in p["rows"] if "verified_by_group" in row]
    if groups:
        protocol, row = groups[-1]
        parts = "; ".join(f"{group}: {q['pairs']} pairs, precision {_pct(q['precision'])}, recall "
                          f"{_pct(q['recall'])}" for group, q in row["verified_by_group"].items())
        lines += ["", f"By query group ({protocol}, top-{row['top_k']}): {parts}."]
    lines += ["", f"Produced by `{results['command']}` (results/gv_positives.json).", "", END]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--doc", action="store_true", help="rewrite the docs/results.md block from the saved JSON")
    parser.add_argument("--protocols", default=",".join(PROTOCOLS), help="comma-separated protocol names")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where the JSON goes (and --doc reads it)")
    args = parser.parse_args()
    if args.doc:
        write_block(DOC, markdown(json.loads(args.out.read_text())), START, END, heading=HEADING)
        return 0
    config = GVConfig()
    command = " ".join([".venv/bin/python", "experiments/gv_positives.py", *(shlex.quote(a) for a in sys.argv[1:])])
    results = {"command": command, "features": FEATURES.model_dump(),
               "claim": {"min_inliers": config.min_inliers, "claim_min_spread": config.claim_min_spread,
                         "claim_max_anisotropy": config.claim_max_anisotropy},
               "protocols": [study(name, config) for name in args.protocols.split(",")]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
