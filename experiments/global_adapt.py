"""Issue 16: does a trained learned whitening transfer once it adapts to the collection it indexes?

A trained whitening (waldo train whiten) learns from labelled source photos which directions of
the pooled feature are nuisance (its within-identity scatter S_src) and takes the collection
statistics (mean, total covariance) from its training images. The untrained default
(views-whiten) learns the nuisance from strong views of the indexed collection's own photos
(S_views) and its statistics from that collection. "Adapted" mixes the two at index time:

    S_w = a * S_src / tr(S_src) + (1 - a) * S_views / tr(S_views),   total from the collection

a = 0 is the untrained default, a = 1 the trained nuisance with the collection's statistics.
Scored on cached ImageNet maps (experiments/global_sweep.py maps) for both sources (grocery's
and coil's training identities), in domain and across; validation rows (identity folds of the
training splits; the source never holds the searched fold's identities) choose, tests are only
reported.

    .venv/bin/python experiments/global_adapt.py --out results/global/adapt.json   # ~5 min
    .venv/bin/python experiments/global_adapt.py --table   # the docs/results.md table from it
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from global_sweep import ROOT, load_maps, pool, score, splits, view_features  # noqa: E402

from waldo.data.protocols import get_protocol  # noqa: E402
from waldo.models.whitening import _top_eigen, describe, within_scatter  # noqa: E402

SOURCES = {"grocery": "grocery-open-cross", "coil": "coil100-open"}
MIXES = (0.0, 0.25, 0.5, 0.75, 1.0)
SHRINKS = (0.3, 1.0, 3.0)
DIMS = (512, 1024)


def projection(within: np.ndarray, collection: np.ndarray, shrink: float, dim: int) -> tuple:
    x = np.asarray(collection, np.float64)
    mean = x.mean(0)
    total = np.cov((x - mean).T)
    channels = within.shape[0]
    shrunk = within + shrink * np.trace(within) / channels * np.eye(channels)
    values, vectors = _top_eigen(shrunk, channels)
    inverse_sqrt = (vectors * values.clip(1e-12) ** -0.5) @ vectors.T
    directions = _top_eigen(inverse_sqrt @ total @ inverse_sqrt, dim)[1]
    return mean, inverse_sqrt @ directions


def searched_samples(sets: dict) -> dict[str, np.ndarray]:
    """Per set, the seeded sample of its searched images whose views fit the untrained default:
    the same draws as global_sweep.selfsup (its "own" samples are drawn in turn), so the cached
    views are reused."""
    rng = np.random.default_rng(0)
    sample_of = {}
    for name, s in sets.items():
        for regime in ("own", "searched"):
            fit = s["fit"] if regime == "own" else np.unique(np.concatenate([s["q"], s["g"]]))
            sample = np.sort(rng.choice(fit, min(600, len(fit)), replace=False))
            if regime == "searched":
                sample_of[name] = sample
    return sample_of


def source_rows(index: dict[str, int]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per source, (map rows, identities) of its protocol's training split."""
    train = {}
    for key, protocol in SOURCES.items():
        records = get_protocol(protocol).train.records
        train[key] = (np.array([index[str(r.path)] for r in records]), np.array([r.identity for r in records]))
    return train


def table(rows: list[dict]) -> str:
    """Per source and mix: the (shrink, dim) with the best mean validation mAP (both collections'
    identity folds), its validation mAP and the test protocols' R@1 / mAP."""
    cells: dict = {}
    for row in rows:
        cells.setdefault((row["source"], row["mix"], row["shrink"], row["dim"]), {})[row["set"]] = row
    tests = ("grocery-open-cross", "coil100-open")
    lines = ["| trained on | mix a | shrink, dim (validation) | validation mAP | grocery-open-cross | coil100-open |",
             "|---|---|---|---|---|---|"]
    for source in SOURCES:
        for mix in MIXES:
            options = [(key, sets) for key, sets in cells.items() if key[:2] == (source, mix)]
            def val(sets: dict) -> float:
                return float(np.mean([r["map"] for name, r in sets.items() if name.startswith("val")]))
            (_, _, shrink, dim), sets = max(options, key=lambda item: (val(item[1]), -item[0][3]))
            label = "untrained default (views only)" if mix == 0 else f"{source}"
            lines.append(f"| {label} | {mix:g} | {shrink:g}, {dim} | {val(sets):.4f} | "
                         + " | ".join(f"{sets[t]['r1']:.4f} / {sets[t]['map']:.4f}" for t in tests) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "global" / "adapt.json")
    parser.add_argument("--table", action="store_true", help="print the Markdown table of --out and stop")
    args = parser.parse_args()
    if args.table:
        print(table(json.loads(args.out.read_text())["rows"]))
        return 0
    maps, index = load_maps(args.size)
    sets = splits(index)
    paths = {row: path for path, row in index.items()}
    pooled = pool(maps, "avg").astype(np.float64)
    sample_of = searched_samples(sets)
    view_scatter = {}
    for name, sample in sample_of.items():
        viewed = view_features(sample, paths, args.size)
        x = np.concatenate([pooled[sample], *viewed])
        w = within_scatter(x, np.tile(np.arange(len(sample)), 1 + len(viewed)))
        view_scatter[name] = w / np.trace(w)
    train = source_rows(index)

    def source_scatter(key: str, held: set) -> np.ndarray:
        rows, ids = train[key]
        keep = ~np.isin(ids, list(held))
        w = within_scatter(pooled[rows[keep]], ids[keep])
        return w / np.trace(w)

    rows = []
    for name, s in sets.items():
        if name == "grocery-open":
            continue
        target = "coil" if "coil" in name else "grocery"
        held: set = set()
        if name.startswith("val"):
            held = {r for r in set(s["qid"]) | set(s["gid"])}
        searched = pooled[np.unique(np.concatenate([s["q"], s["g"]]))]
        for key in SOURCES:
            s_src = source_scatter(key, held if key == target else set())
            for mix in MIXES:
                within = mix * s_src + (1 - mix) * view_scatter[name]
                for shrink in SHRINKS:
                    for dim in DIMS:
                        mean, proj = projection(within, searched, shrink, dim)
                        q = describe(pooled[s["q"]], mean, proj)
                        g = q if s["loo"] else describe(pooled[s["g"]], mean, proj)
                        row = {"set": name, "source": key, "transfer": key != target, "mix": mix,
                               "shrink": shrink, "dim": dim, **score(q, g, s["qid"], s["gid"], s["loo"])}
                        rows.append(row)
                        print(json.dumps(row), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"size": args.size, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
