"""Issue 16: a multi-scale global descriptor as a model option, chosen on validation identities.

``ModelConfig.global_scales`` (``waldo index build --global-scales 0.75,1.25``) averages the
L2-normalised global descriptors of the input and of the input tensor resized by each factor
(DescriptorModel.multiscale_global); the locals stay the input size's. Here each factor's global
descriptor is extracted once (the base transform's tensor resized, exactly as the model does it)
and every combination is scored offline, for the untrained default (views-whiten, fitted as
evaluation fits it: on the other fold's images for a validation fold, on the training split for
a test protocol).

Validation (chooses): both protocols' training identities in two folds (experiments/gv_fusion.py
``fold_protocol``), searched like the test. Test protocols: reported only. Cost is reported as
the sum of squared factors (the backbone's work relative to single scale).

    .venv/bin/python experiments/global_multiscale.py            # ~25 min; results/global/multiscale.json
    .venv/bin/python experiments/global_multiscale.py --table    # the docs/results.md table
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from global_sweep import ROOT, score  # noqa: E402
from gv_fusion import fold_protocol  # noqa: E402

from waldo.data.protocols import get_protocol  # noqa: E402
from waldo.data.transforms import get_transform  # noqa: E402
from waldo.eval.runner import prepare_model  # noqa: E402
from waldo.models.extract import extract_descriptors  # noqa: E402

FACTORS = (0.5, 0.75, 1.25, 1.5)
COMBOS = ((), (0.75,), (1.25,), (0.5,), (1.5,), (0.75, 1.25), (0.5, 1.5), (0.75, 1.5), (0.5, 0.75, 1.25),
          (0.75, 1.25, 1.5), (0.5, 0.75, 1.25, 1.5))
PROTOCOLS = ("grocery-open-cross", "coil100-open")


class Resized:
    """The base transform's tensor resized by ``factor``: what DescriptorModel.multiscale_global
    feeds the backbone for that scale."""

    def __init__(self, base, factor: float) -> None:
        self.base, self.factor = base, factor

    def __call__(self, image, key):
        x = self.base(image, key)
        if self.factor == 1:
            return x
        size = tuple(max(32, round(s * self.factor)) for s in x.shape[-2:])
        return F.interpolate(x[None], size=size, mode="bilinear", align_corners=False)[0]


def globals_by_factor(model, config, paths: list[str]) -> dict[float, np.ndarray]:
    base = get_transform(config.transform, config.image_size)
    out = {}
    for factor in (1.0, *FACTORS):
        extracted = extract_descriptors(model, paths, Resized(base, factor), progress=False, runtime="eager",
                                        description=f"x{factor:g}")
        if not np.asarray(extracted.ok).all():
            raise RuntimeError("unreadable images")
        out[factor] = np.asarray(extracted.global_desc, np.float64)
    return out


def combine(by_factor: dict[float, np.ndarray], combo: tuple[float, ...]) -> np.ndarray:
    total = sum(by_factor[f] for f in (1.0, *combo))
    return total / np.linalg.norm(total, axis=1, keepdims=True)


def run(out: Path) -> None:
    rows = []
    for name in PROTOCOLS:
        test = get_protocol(name)
        for label, protocol in (("val0", fold_protocol(test, 0)), ("val1", fold_protocol(test, 1)), ("test", test)):
            model, config = prepare_model(protocol, progress=False)
            paths = list(dict.fromkeys(protocol.queries.paths + protocol.gallery.paths))
            row_of = {p: i for i, p in enumerate(paths)}
            by_factor = globals_by_factor(model, config, paths)
            q_rows = np.array([row_of[p] for p in protocol.queries.paths])
            g_rows = np.array([row_of[p] for p in protocol.gallery.paths])
            q_ids = np.array([r.identity for r in protocol.queries.records])
            g_ids = np.array([r.identity for r in protocol.gallery.records])
            for combo in COMBOS:
                desc = combine(by_factor, combo)
                row = {"protocol": name, "set": label, "scales": list(combo),
                       "cost": round(1 + sum(f * f for f in combo), 3),
                       **score(desc[q_rows], desc[g_rows], q_ids, g_ids, protocol.leave_one_out)}
                rows.append(row)
                print(json.dumps(row), flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": "untrained default (views-whiten)", "rows": rows}, indent=1))


def validation_map(rows: list[dict], combo: list[float]) -> float:
    return float(np.mean([r["map"] for r in rows if r["scales"] == combo and r["set"] != "test"]))


def best_on_validation(rows: list[dict]) -> list[float]:
    """Best mean validation mAP; a costlier combination must beat a cheaper one by 0.005."""
    combos = sorted({tuple(r["scales"]) for r in rows}, key=lambda c: 1 + sum(f * f for f in c))
    best = list(combos[0])
    for combo in combos[1:]:
        if validation_map(rows, list(combo)) > validation_map(rows, best) + 0.005:
            best = list(combo)
    return best


def table(rows: list[dict]) -> str:
    pick = best_on_validation(rows)
    lines = ["| extra scales | backbone cost | validation mAP (4 folds) | grocery-open-cross | coil100-open |",
             "|---|---|---|---|---|"]
    for combo in COMBOS:
        combo = list(combo)
        cells = []
        for name in PROTOCOLS:
            r = next(r for r in rows if r["protocol"] == name and r["set"] == "test" and r["scales"] == combo)
            cells.append(f"{r['r1']:.4f} / {r['map']:.4f}")
        cost = next(r["cost"] for r in rows if r["scales"] == combo)
        label = ", ".join(f"{f:g}" for f in combo) or "none (single scale)"
        mark = " (best on validation)" if combo == pick else " (default)" if not combo else ""
        lines.append(f"| {label}{mark} | {cost:g}x | {validation_map(rows, combo):.4f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "global" / "multiscale.json")
    parser.add_argument("--table", action="store_true", help="print the Markdown table of --out and stop")
    args = parser.parse_args()
    if args.table:
        print(table(json.loads(args.out.read_text())["rows"]))
        return 0
    torch.set_num_threads(2)
    run(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
