"""Geometric verification against ground truth (issue 4): Oxford affine homographies and the
OpenCV box-in-scene samples.

For every Oxford pair img1 -> img2..img6 (graf: viewpoint, boat: zoom + rotation, bikes: blur,
leuven: light) the homography estimated from SIFT matches is compared with the true one at the
image corners (the hardest place: extrapolated past most keypoints). The box is verified against
its scene and against unrelated images. Writes ``results/gv_ground_truth.json`` and the
``gv-truth`` block of ``docs/results.md``. The test suite asserts the same on img2..img4
(tests/rerank/test_gv.py); this script reports all five steps, including the extreme ones.

    .venv/bin/python experiments/gv_ground_truth.py     # about a minute
"""

from __future__ import annotations

import csv
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from waldo.paths import dataset_dir
from waldo.rerank.gv import GVConfig, corner_errors, verify_pair
from waldo.models.keypoints import SiftConfig, extract_sift_file
from waldo_experiments.doc_blocks import write_block

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results" / "gv_ground_truth.json"
DOC = ROOT / "docs" / "results.md"
START, END = "<!-- gv-truth:start -->", "<!-- gv-truth:end -->"
# Oxford images are 800-1000 px: keep them at native size (no downscale) for accuracy.
OXFORD_SIFT = SiftConfig(max_keypoints=1000, max_side=1024)
UNRELATED = [("box.png", "aero1.jpg"), ("box.png", "aloeL.jpg"), ("box.png", "leuvenA.jpg"),
             ("graf1.png", "box_in_scene.png"), ("aero1.jpg", "box_in_scene.png")]


def extract_all(root: Path, names: list[str], config: SiftConfig | None = None) -> dict:
    with ThreadPoolExecutor(2) as pool:  # OpenCV releases the GIL: use both cores
        return dict(zip(names, pool.map(lambda n: extract_sift_file(root / n, config) if config else
                                        extract_sift_file(root / n), names)))


def oxford_rows(config: GVConfig) -> list[dict]:
    root = dataset_dir("oxford_affine")
    pairs = list(csv.DictReader(open(root / "pairs.csv")))
    features = extract_all(root, sorted({p["img_a"] for p in pairs} | {p["img_b"] for p in pairs}), OXFORD_SIFT)
    rows = []
    for pair in pairs:
        v = verify_pair(features[pair["img_a"]], features[pair["img_b"]], config)
        width, height = Image.open(root / pair["img_a"]).size
        row = {"pair": f"{pair['img_a']} -> {pair['img_b']}", "change": pair["change"], "matches": v.n_matches,
               "inliers": v.inliers, "model": v.model}
        if v.transform is not None:
            errors = corner_errors(np.loadtxt(root / pair["homography_a_to_b"]), v.transform, width, height)
            row.update({"mean_corner_error_px": round(float(errors.mean()), 2),
                        "max_corner_error_px": round(float(errors.max()), 2)})
        rows.append(row)
    return rows


def sample_rows(config: GVConfig) -> list[dict]:
    root = dataset_dir("opencv_samples")
    pairs = [("box.png", "box_in_scene.png"), *UNRELATED]
    features = extract_all(root, sorted({n for pair in pairs for n in pair}))
    rows = []
    for a, b in pairs:
        v = verify_pair(features[a], features[b], config)
        rows.append({"pair": f"{a} -> {b}", "same_object": (a, b) == ("box.png", "box_in_scene.png"),
                     "matches": v.n_matches, "inliers": v.inliers, "inlier_ratio": round(v.inlier_ratio, 3),
                     "model": v.model, "verified": v.inliers >= config.min_inliers})
    return rows


def markdown(result: dict) -> str:
    lines = [START, "", f"Oxford affine sequences, default GV settings (min_inliers {result['min_inliers']}); "
             "corner error: distance between where the estimated and the true homography send img1's four corners.",
             "", "| pair | change | matches | inliers | model | mean corner err px | max corner err px |",
             "|---|---|---|---|---|---|---|"]
    for r in result["oxford"]:
        lines.append(f"| {r['pair']} | {r['change']} | {r['matches']} | {r['inliers']} | {r['model']} | "
                     f"{r.get('mean_corner_error_px', '-')} | {r.get('max_corner_error_px', '-')} |")
    failed = [r["pair"] for r in result["oxford"] if r.get("max_corner_error_px", float("inf")) > 10]
    if failed:
        lines += ["", f"Over 10 px off or no model: {', '.join(failed)}. SIFT is invariant to scale, rotation and "
                  "light but not to strong viewpoint change (graf's last steps are about 50-60 degrees), where too "
                  "few correct matches survive the ratio test; the extreme zoom of boat img6 keeps few, and the "
                  "fit extrapolates poorly to the corners. The test suite asserts img2..img4 only."]
    lines += ["", "OpenCV samples: the box against its scene and against unrelated images.", "",
              "| pair | same object | matches | inliers | inlier ratio | verified |", "|---|---|---|---|---|---|"]
    for r in result["samples"]:
        lines.append(f"| {r['pair']} | {'yes' if r['same_object'] else 'no'} | {r['matches']} | {r['inliers']} | "
                     f"{r['inlier_ratio']:.2f} | {'yes' if r['verified'] else 'no'} |")
    lines += ["", "Produced by `.venv/bin/python experiments/gv_ground_truth.py` (numbers in "
              "`results/gv_ground_truth.json`).", "", END]
    return "\n".join(lines)


def write_doc(block: str) -> None:
    write_block(DOC, block, START, END, heading="### Geometric verification against ground truth")


def main() -> int:
    config = GVConfig()
    result = {"min_inliers": config.min_inliers, "oxford": oxford_rows(config), "samples": sample_rows(config)}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    block = markdown(result)
    write_doc(block)
    print(block)
    return 0


if __name__ == "__main__":
    sys.exit(main())
