"""Issue 17: does the middle of each photo show the same thing? A centre-crop similarity for held-up products (diagnostic).

experiments/gv_centre_share.py found that whether a photo's middle *matched* does not tell a product
held up before another's display (Banana_024 -> Red-Grapefruit_012, a grapefruit before a banana box)
from a real match: loose produce gives few inliers anywhere. What differs there is *what* is in the
middle. This diagnostic measures, on the same verified validation pairs (at least
GVConfig().min_inliers inliers in the top-100 of grocery's two validation folds, the untrained
default without the colour term), the cosine between the two photos' global descriptors of their
central crops (the middle half of each side, described by the same model and test transform),
split into same-product and different-product pairs. It chooses nothing: a check on it would be
chosen by a rule declared before its own study.

    .venv/bin/python experiments/gv_centre_crop.py          # ~6 min on 2 cores (keypoints cached)
    .venv/bin/python experiments/gv_centre_crop.py --doc    # docs/results.md block from the JSON
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

from gv_centre_share import summary, summary_cells, verify_top100  # noqa: E402
from gv_fusion import FEATURES, OPEN, fold_protocol, log  # noqa: E402

from waldo.data.protocols import get_protocol  # noqa: E402
from waldo.data.transforms import get_transform  # noqa: E402
from waldo.eval.evaluate import evaluate_protocol  # noqa: E402
from waldo.eval.gv_eval import run_keypoints  # noqa: E402
from waldo.eval.runner import prepare_model  # noqa: E402
from waldo.rerank.gv import GeometricReranker, GVConfig  # noqa: E402
from waldo_experiments.doc_blocks import write_block  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results" / "gv_centre_crop.json"
DOC = ROOT / "docs" / "results.md"
START, END = "<!-- gv-centre-crop:start -->", "<!-- gv-centre-crop:end -->"
HEADING = "### What is in the middle? A centre-crop similarity for held-up products (issue 17, a diagnostic)"
TRANSFORM = "resize256-crop224"
BARS = (0.2, 0.3, 0.4, 0.5, 0.6)


def centre_crops(model, config, paths: list[str], batch: int = 32) -> np.ndarray:
    """(N, D) global descriptors of each photo's central crop (the middle half of each side)."""
    import torch

    from waldo.data.images import load_image

    transform = get_transform(TRANSFORM, config.image_size, seed=0)
    out = []
    for start in range(0, len(paths), batch):
        tensors = []
        for i, path in enumerate(paths[start:start + batch]):
            image = load_image(path)
            w, h = image.size
            tensors.append(transform(image.crop((w // 4, h // 4, w - w // 4, h - h // 4)), start + i))
        with torch.inference_mode():
            out.append(model(torch.stack(tensors)).global_desc.numpy())
    return np.concatenate(out).astype(np.float32)


def measure() -> dict:
    min_inliers = GVConfig().min_inliers
    pairs = []
    with GeometricReranker(OPEN) as reranker:
        for fold in (0, 1):
            val = fold_protocol(get_protocol("grocery-open-cross"), fold)
            model, config = prepare_model(val, progress=False, colour_weight=0.0)
            keypoints = run_keypoints(val, FEATURES, progress=False)
            run = evaluate_protocol(model, val, get_transform(TRANSFORM, config.image_size, seed=0), progress=False)
            verified = []
            for q, query_row in enumerate(run.query_rows):
                rows = [int(run.gallery_rows[i]) for i in run.knn_indices[q, :100]]
                _, _, verifications = verify_top100(reranker, keypoints, query_row, rows)
                for r, v in zip(rows, verifications):
                    if v.inliers >= min_inliers:
                        verified.append((int(query_row), r, int(v.inliers)))
            query_rows = sorted({q for q, _, _ in verified})
            gallery_rows = sorted({r for _, r, _ in verified})
            crops_q = dict(zip(query_rows, centre_crops(model, config, [val.queries.paths[q] for q in query_rows])))
            crops_g = dict(zip(gallery_rows, centre_crops(model, config, [val.gallery.paths[r] for r in gallery_rows])))
            for q, r, inliers in verified:
                pairs.append({"query": Path(val.queries.paths[q]).name, "candidate": Path(val.gallery.paths[r]).name,
                              "same": val.queries.identities[q] == val.gallery.identities[r], "inliers": inliers,
                              "centre_cosine": float(crops_q[q] @ crops_g[r])})
            log(f"fold {fold}: {len(verified)} verified pairs, {len(query_rows) + len(gallery_rows)} centre crops")
    return {"min_inliers": min_inliers, "pairs": pairs}


def markdown(results: dict) -> str:
    s = results["summary"]
    lines = [START, "", f"Verified pairs (at least {results['min_inliers']} inliers) in the top-100 of grocery's two "
             "validation folds (experiments/gv_fusion.py's; the untrained default, no colour term). Centre cosine: "
             "the two photos' global descriptors of their central crops (the middle half of each side), same model "
             "and transform. A diagnostic: chooses nothing.", "",
             "| pairs | count | centre cosine 5% / 25% / 50% / 75% | below " + " / ".join(f"{b:g}" for b in BARS) + " |",
             "|---|---|---|---|"]
    for label in ("same product", "different products"):
        lines.append(f"| {label} | {summary_cells(s[label])} |")
    if s["known"]:
        k = s["known"]
        lines += ["", f"The held-up pair ({k['query']} -> {k['candidate']}): {k['inliers']} inliers, centre cosine "
                      f"{k['centre_cosine']:.3f}."]
    lines += ["", f"Produced by `{results['command']}` (results/gv_centre_crop.json).", "", END]
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
    results = {"command": " ".join([".venv/bin/python", "experiments/gv_centre_crop.py",
                                    *(shlex.quote(a) for a in sys.argv[1:])]),
               "min_inliers": measured["min_inliers"], "summary": summary(measured["pairs"], "centre_cosine", BARS),
               "seconds": round(time.perf_counter() - started, 1)}
    RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    log(json.dumps(results["summary"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
