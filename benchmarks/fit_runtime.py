"""What an untrained index's fit costs, eager against ONNX Runtime, and what it changes.

`waldo index build` with an untrained model first fits its projections on the photos being
indexed: 1,000 photos' pooled features and local cells, then 600 photos and 2 strong augmented
views of each for the label-free learned whitening (waldo.models.untrained), 2,800 backbone
passes. Index builds run them on ONNX Runtime (``fit_runtime="auto"``; the export holds the
backbone alone, cached once for every index on the same weights); evaluations keep the eager
fits every documented figure was measured with. Per protocol this fits the untrained default on
the protocol's training images three times (eager; ONNX Runtime with an empty export cache, i.e.
export included; ONNX Runtime again, cached) and evaluates the eager and the cached ONNX fit on
the protocol's test queries, so the table says what the faster fit costs in retrieval quality.

    .venv/bin/python benchmarks/fit_runtime.py     # ~12 min on 2 cores; results/fit_runtime.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "results" / "fit_runtime.json"


def measure(protocol_name: str) -> dict:
    import numpy as np

    from waldo.data.protocols import get_protocol
    from waldo.data.transforms import get_transform
    from waldo.eval.evaluate import evaluate_protocol
    from waldo.eval.runner import prepare_model
    from waldo.models.checkpoint import model_hash

    proto = get_protocol(protocol_name)
    row: dict = {"protocol": protocol_name, "fit_images": min(1000, len(proto.train))}
    models = {}
    for name, runtime in (("eager", "eager"), ("onnx, export included", "auto"), ("onnx, export cached", "auto")):
        start = time.perf_counter()
        model, config = prepare_model(proto, progress=False, fit_runtime=runtime)
        row[f"fit_seconds ({name})"] = round(time.perf_counter() - start, 1)
        models[name] = (model, config)
    row["cached export gives the same model"] = (model_hash(models["onnx, export included"][0])
                                                 == model_hash(models["onnx, export cached"][0]))
    transform = get_transform("resize256-crop224", 224)
    runs = {}
    for name in ("eager", "onnx, export cached"):
        runs[name] = run = evaluate_protocol(models[name][0], proto, transform, progress=False)
        row[f"recall@1 ({name})"] = round(float(run.metrics["recall@1"]), 4)
        row[f"map ({name})"] = round(float(run.metrics["map"]), 4)
    eager, onnx = runs["eager"], runs["onnx, export cached"]
    same_rows = np.array_equal(eager.query_rows, onnx.query_rows) and np.array_equal(eager.gallery_rows, onnx.gallery_rows)
    row["same top-1 (share of queries)"] = (round(float(np.mean(eager.knn_indices[:, 0] == onnx.knn_indices[:, 0])), 4)
                                            if same_rows else None)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--protocols", default="grocery-open-cross,coil100-open")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as cache:
        for protocol in args.protocols.split(","):
            os.environ["WALDO_CACHE"] = str(Path(cache) / protocol)  # an empty export cache per protocol
            rows.append(measure(protocol))
            print(json.dumps(rows[-1]), flush=True)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"command": "benchmarks/fit_runtime.py", "cpus": os.cpu_count(), "rows": rows},
                              indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
