"""Why an untrained model fitted through ONNX Runtime is not the eager fit (docs/performance.md,
"Fitting an untrained index"): the untrained default's 1,024-d views-whiten keeps more directions
than its fit's 1,000 photos span (the total covariance has rank 999), so the last directions lie
in its null space, where any basis is as good and rounding picks one.

Fits the projection on 1,000 of grocery-open-cross's training photos with the backbone's maps
from eager PyTorch and from ONNX Runtime, prints the whitened total covariance's eigenvalues
around rank 999, and compares the two fits' descriptors of 300 test queries restricted to the
first 999 directions and over all 1,024.

    .venv/bin/python experiments/fit_null_space.py    # ~3 min on 2 cores; results/fit_null_space.json
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
OUT = ROOT / "results" / "fit_null_space.json"


def main() -> int:
    from waldo.data.protocols import get_protocol
    from waldo.data.transforms import get_transform
    from waldo.models.checkpoint import ModelConfig, build_model
    from waldo.models.extract import backbone_runner, extract_pooled_features
    from waldo.models.untrained import VIEW_SHRINK, _view_groups
    from waldo.models.whitening import WhiteningSetting, _FitStatistics

    proto = get_protocol("grocery-open-cross")
    paths = random.Random(0).sample(list(proto.train.paths), 1000)
    probe = list(proto.queries.paths)[:300]
    model = build_model(ModelConfig(backbone="efficientnet_lite0", dim=128), pretrained=True).eval()
    transform = get_transform("resize256-crop224", 224)
    fits, result = {}, {"fit_photos": len(paths), "probe_queries": len(probe), "eigenvalues": {}}
    for runtime in ("eager", "onnx"):
        maps = backbone_runner(model.backbone, None, 10 ** 6, runtime)
        pooled, _ = extract_pooled_features(model, paths, transform, progress=False, maps=maps)
        views, groups = _view_groups(model, paths, "resize256-crop224", 224, 0, False, maps)
        stats = _FitStatistics(views, groups, pooled)
        fits[runtime] = stats.projection(WhiteningSetting(1024, VIEW_SHRINK, 0.0))
        inverse_sqrt, _ = stats._cache[("lw", VIEW_SHRINK)]
        values = np.linalg.eigvalsh(inverse_sqrt @ stats.total @ inverse_sqrt)[::-1]
        result["eigenvalues"][runtime] = {str(i): float(values[i]) for i in (990, 998, 999, 1000, 1023)}
    features, _ = extract_pooled_features(model, probe, transform, progress=False)

    def describe(fit, k: int) -> np.ndarray:
        mean, projection = fit
        x = (features - mean) @ projection[:, :k]
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    for k in (999, 1024):
        cosine = (describe(fits["eager"], k) * describe(fits["onnx"], k)).sum(1)
        result[f"first {k} directions: cosine eager vs onnx fit"] = {"min": round(float(cosine.min()), 5),
                                                                       "mean": round(float(cosine.mean()), 5)}
    OUT.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
