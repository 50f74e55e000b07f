"""Issue 17: would a "centre share" tell a product held up before another's display from a real match? (diagnostic)

Two first answers verification breaks are photos of one product held up in front of another
product's display: on grocery-open-cross's test, Ginger_004 -> Kiwi_034 (a kiwi held before the
ginger baskets), and on the validation of experiments/colour_untrained.py (with the colour term),
Banana_024 -> Red-Grapefruit_012 (a grapefruit held before a banana box). The inliers lie on
the display behind; the photo's subject, in its middle, is not matched. The subject checks of
`waldo.rerank.gv.subject_figures` (candidate spread, centre offset) do not separate the second at
the bars experiments/gv_object.py allowed.

This diagnostic measures one more figure on validation only: the **centre share**, for each photo
of a verified pair the share of its keypoints inside the middle of its keypoint extent (the central
half of each side) that are inliers, the smaller of the two photos'. A match on the thing a photo is
framed on covers its middle; one on a background display behind a held-up product leaves the
middle unmatched. Every verified pair (at least GVConfig().min_inliers inliers, the product's
features and ratio) in the top-100 of experiments/gv_fusion.py's grocery validation folds, the
untrained default with the colour term at 0 and 0.75, split into same-product and different-product
pairs. It chooses nothing: a check on it would be chosen by a rule declared before its own study.

    .venv/bin/python experiments/gv_centre_share.py          # ~8 min on 2 cores (keypoints cached)
    .venv/bin/python experiments/gv_centre_share.py --doc    # docs/results.md block from the JSON
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # GV runs its own threads

import argparse  # noqa: E402
import json  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

from colour_untrained import weighted_runs  # noqa: E402
from gv_fusion import FEATURES, OPEN, fold_protocol, log  # noqa: E402

from waldo.data.protocols import get_protocol  # noqa: E402
from waldo.eval.gv_eval import run_keypoints  # noqa: E402
from waldo.eval.runner import prepare_model  # noqa: E402
from waldo.rerank.gv import GeometricReranker, GVConfig  # noqa: E402
from waldo_experiments.doc_blocks import write_block  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results" / "gv_centre_share.json"
DOC = ROOT / "docs" / "results.md"
START, END = "<!-- gv-centre-share:start -->", "<!-- gv-centre-share:end -->"
HEADING = "### A centre share for held-up products? (issue 17, a diagnostic)"
WEIGHTS = (0.0, 0.75)
KNOWN = ("Banana_024.jpg", "Red-Grapefruit_012.jpg")  # the validation's held-up pair (module doc)
BARS = (0.02, 0.05, 0.1, 0.15, 0.2)


def centre_share(all_xy: np.ndarray, inlier_rows: np.ndarray) -> float:
    """Share of the keypoints in the middle of ``all_xy``'s extent (the central half of each side)
    that are inliers (``inlier_rows``: their rows in ``all_xy``); 0 with none there."""
    if len(all_xy) == 0:
        return 0.0
    lo, hi = all_xy.min(axis=0), all_xy.max(axis=0)
    middle = np.all((all_xy >= lo + (hi - lo) / 4) & (all_xy <= hi - (hi - lo) / 4), axis=1)
    if not middle.any():
        return 0.0
    return float(np.isin(np.flatnonzero(middle), inlier_rows).sum() / middle.sum())


def pair_share(query, candidate, verification) -> float:
    inliers = verification.matches[verification.inlier_mask]
    return min(centre_share(query.keypoints, inliers[:, 0]), centre_share(candidate.keypoints, inliers[:, 1]))


def verify_top100(reranker, keypoints, query_row: int, rows: list[int]) -> tuple:
    """The query's and ``rows``' stored features and the verification of each of ``rows``
    against the query (gv_centre_crop.py gathers its pairs the same way)."""
    query = keypoints.query(int(query_row))
    candidates = [keypoints.candidate(r) for r in rows]
    return query, candidates, reranker.verify_many(query, candidates)


def summary_cells(entry: dict) -> str:
    """One summary entry's table cells: count | quantiles | counts below each bar."""
    q = " / ".join("-" if v is None else f"{v:.3f}" for v in entry["quantiles"].values())
    return f"{entry['pairs']} | {q} | " + " / ".join(str(v) for v in entry["below"].values())


def measure() -> dict:
    min_inliers = GVConfig().min_inliers
    pairs: dict[str, list[dict]] = {f"{w:g}": [] for w in WEIGHTS}
    with GeometricReranker(OPEN) as reranker:
        for fold in (0, 1):
            val = fold_protocol(get_protocol("grocery-open-cross"), fold)
            model, config = prepare_model(val, progress=False, colour_weight=0.0)
            keypoints = run_keypoints(val, FEATURES, progress=False)
            runs = weighted_runs(val, model, config)
            done: dict[tuple[int, int], dict | None] = {}
            for weight in WEIGHTS:
                run = runs[weight]
                for q, query_row in enumerate(run.query_rows):
                    rows = [int(run.gallery_rows[i]) for i in run.knn_indices[q, :100]]
                    todo = [r for r in rows if (int(query_row), r) not in done]
                    if todo:
                        query, candidates, verifications = verify_top100(reranker, keypoints, query_row, todo)
                        for r, c, v in zip(todo, candidates, verifications):
                            done[(int(query_row), r)] = None if v.inliers < min_inliers else {
                                "query": Path(val.queries.paths[query_row]).name,
                                "candidate": Path(val.gallery.paths[r]).name,
                                "same": val.queries.identities[query_row] == val.gallery.identities[r],
                                "inliers": int(v.inliers), "share": pair_share(query, c, v)}
                    pairs[f"{weight:g}"] += [done[(int(query_row), r)] for r in rows if done[(int(query_row), r)]]
                log(f"fold {fold} w {weight:g}: {len(pairs[f'{weight:g}'])} verified pairs so far")
    return {"min_inliers": min_inliers, "pairs": pairs}


def summary(pairs: list[dict], figure: str = "share", bars: tuple[float, ...] = BARS) -> dict:
    """Quantiles of ``figure`` over same- and different-product pairs, how many fall below each of
    ``bars``, and the held-up pair's entry (:data:`KNOWN`; gv_centre_crop.py reads this too)."""
    out = {}
    for label, same in (("same product", True), ("different products", False)):
        values = np.array([p[figure] for p in pairs if p["same"] == same])
        out[label] = {"pairs": int(len(values)),
                      "quantiles": {q: float(np.quantile(values, q / 100)) if len(values) else None
                                    for q in (5, 25, 50, 75)},
                      "below": {f"{bar:g}": int(np.sum(values < bar)) for bar in bars}}
    known = [p for p in pairs if (p["query"], p["candidate"]) == KNOWN]
    out["known"] = known[0] if known else None
    return out


def markdown(results: dict) -> str:
    lines = [START, "", "Verified pairs (at least "
             f"{results['min_inliers']} inliers) in the top-100 of grocery's two validation folds (experiments/gv_fusion.py's; "
             "the untrained default, colour term at w), counted once per query and candidate within a weight. Centre "
             "share: of a photo's keypoints in the central half of its keypoint extent, the share that are inliers; "
             "the smaller of the two photos'. A diagnostic: chooses nothing.", "",
             "| w | pairs | count | centre share 5% / 25% / 50% / 75% | below " + " / ".join(f"{b:g}" for b in BARS) + " |",
             "|---|---|---|---|---|"]
    for weight, s in results["summary"].items():
        for label in ("same product", "different products"):
            lines.append(f"| {weight} | {label} | {summary_cells(s[label])} |")
    known = next((s["known"] for s in results["summary"].values() if s["known"]), None)
    if known:
        lines += ["", f"The held-up pair ({known['query']} -> {known['candidate']}): {known['inliers']} inliers, centre "
                      f"share {known['share']:.3f}."]
    lines += ["", f"Produced by `{results['command']}` (results/gv_centre_share.json).", "", END]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--doc", action="store_true", help="rewrite the docs/results.md block from the saved JSON")
    args = parser.parse_args()
    if args.doc:
        write_block(DOC, markdown(json.loads(RESULTS.read_text())), START, END, heading=HEADING)
        return 0
    started = time.perf_counter()
    measured = measure()
    results = {"command": " ".join([".venv/bin/python", "experiments/gv_centre_share.py",
                                    *(shlex.quote(a) for a in sys.argv[1:])]),
               "min_inliers": measured["min_inliers"],
               "summary": {w: summary(p) for w, p in measured["pairs"].items()},
               "seconds": round(time.perf_counter() - started, 1)}
    RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    log(json.dumps(results["summary"])[:2000])
    return 0


if __name__ == "__main__":
    sys.exit(main())
