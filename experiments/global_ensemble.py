"""Issue 16: a trained global descriptor that never loses on the next collection, by fusing it
with the untrained default fitted on that collection.

A trained learned whitening (``waldo train whiten``) knows its source's nuisance directions and
loses on another collection (docs/results.md "Trained global descriptors": grocery-trained on
coil100-open, coil-trained on grocery-open-cross). Mixing the nuisance scatters at index time
(experiments/global_adapt.py) narrowed the loss without removing it. Here the two descriptors stay
whole and their *similarities* are fused:

    s(q, g) = (1 - w) * s_untrained(q, g) + w * s_trained(q, g)

i.e. one descriptor, the concatenation [sqrt(1 - w) d_untrained, sqrt(w) d_trained]. d_untrained
is the product's untrained default as an index fits it (views-whiten on the indexed collection's
own photos and their strong views, no labels); d_trained is the source's learned whitening, its
collection statistics either from the source's training photos ("fixed", what ``train whiten``
saves) or from the indexed collection ("collection").

Choice (never test queries): per source, the (statistics, shrink, w) with the best mean
validation mAP over the identity folds of *both* collections' training splits (the source never
holds the searched fold's identities; the other collection's folds are its transfer check), and
a guarded choice: the best among those no worse than w = 0 on every fold. The
test protocols are only reported. Cached ImageNet maps (experiments/global_sweep.py maps) and the
seeded views of experiments/global_adapt.py.

    .venv/bin/python experiments/global_sweep.py maps                  # once, ~5 min
    .venv/bin/python experiments/global_ensemble.py                    # ~10 min; results/global/ensemble.json
    .venv/bin/python experiments/global_ensemble.py --table            # the docs/results.md table
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from global_adapt import SOURCES, projection, searched_samples, source_rows  # noqa: E402
from global_sweep import ROOT, load_maps, pool, score, splits, view_features  # noqa: E402

from waldo.models.whitening import describe, within_scatter  # noqa: E402

WEIGHTS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
SHRINKS = (0.3, 1.0, 3.0)
STATISTICS = ("fixed", "collection")
VIEW_SHRINK, WIDTH = 3.0, 1024  # the untrained default (waldo.models.untrained)
SETS = ("val0:grocery-open-cross", "val1:grocery-open-cross", "val0:coil100-open", "val1:coil100-open",
        "grocery-open-cross", "coil100-open")


def fused_score(parts: list[tuple[np.ndarray, np.ndarray]], weights: list[float], s: dict) -> dict:
    q = np.concatenate([np.sqrt(w) * dq for (dq, _), w in zip(parts, weights)], axis=1)
    g = np.concatenate([np.sqrt(w) * dg for (_, dg), w in zip(parts, weights)], axis=1)
    return score(q, g, s["qid"], s["gid"], s["loo"])


def run(size: int, out: Path) -> None:
    maps, index = load_maps(size)
    sets = splits(index)
    paths = {row: path for path, row in index.items()}
    pooled = pool(maps, "avg").astype(np.float64)
    sample_of = searched_samples(sets)  # global_adapt's, so cached views are reused
    train = source_rows(index)
    rows = []
    for name in SETS:
        s = sets[name]
        target = "coil" if "coil" in name else "grocery"
        held = set(s["qid"]) | set(s["gid"]) if name.startswith("val") else set()
        searched = pooled[np.unique(np.concatenate([s["q"], s["g"]]))]
        sample = sample_of[name]
        viewed = view_features(sample, paths, size)
        x = np.concatenate([pooled[sample], *viewed])
        views = within_scatter(x, np.tile(np.arange(len(sample)), 1 + len(viewed)))
        mean, proj = projection(views, searched, VIEW_SHRINK, WIDTH)
        untrained = (describe(pooled[s["q"]], mean, proj), describe(pooled[s["g"]], mean, proj))
        for key in SOURCES:
            rows_, ids = train[key]
            keep = ~np.isin(ids, list(held)) if key == target else np.ones(len(ids), bool)
            source_within = within_scatter(pooled[rows_[keep]], ids[keep])
            for statistics in STATISTICS:
                stats_from = pooled[rows_[keep]] if statistics == "fixed" else searched
                for shrink in SHRINKS:
                    mean, proj = projection(source_within, stats_from, shrink, WIDTH)
                    trained = (describe(pooled[s["q"]], mean, proj), describe(pooled[s["g"]], mean, proj))
                    for w in WEIGHTS:
                        row = {"set": name, "source": key, "transfer": key != target, "statistics": statistics,
                               "shrink": shrink, "w": w, **fused_score([untrained, trained], [1 - w, w], s)}
                        rows.append(row)
                        print(json.dumps(row), flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"size": size, "rows": rows}, indent=1))


def choose(rows: list[dict], source: str, guarded: bool = False) -> tuple:
    """The (statistics, shrink, w) with the best mean validation mAP; ``guarded``: only among
    those no worse than the untrained default (w = 0) on *every* validation fold."""
    cells: dict = {}
    for row in rows:
        if row["source"] == source and row["set"].startswith("val"):
            cells.setdefault((row["statistics"], row["shrink"], row["w"]), {})[row["set"]] = row["map"]
    if guarded:
        floor = next(v for k, v in cells.items() if k[2] == 0.0)
        cells = {k: v for k, v in cells.items() if all(v[name] >= floor[name] for name in floor)}
    return max(cells, key=lambda key: (np.mean(list(cells[key].values())), -key[2]))


def table(rows: list[dict]) -> str:
    def cell(source, statistics, shrink, w, name):
        row = next(r for r in rows if (r["source"], r["statistics"], r["shrink"], r["w"], r["set"])
                   == (source, statistics, shrink, w, name))
        return row

    def val(source, statistics, shrink, w):
        return np.mean([cell(source, statistics, shrink, w, n)["map"] for n in SETS if n.startswith("val")])

    lines = ["| trained on | fused with the untrained default | validation mAP (4 folds) | grocery-open-cross | coil100-open |",
             "|---|---|---|---|---|"]
    untrained = ("grocery", "fixed", SHRINKS[0], 0.0)
    lines.append(f"| - (untrained default, fitted on the collection) | w = 0 | {val(*untrained):.4f} | "
                 + " | ".join(f"{cell(*untrained, t)['r1']:.4f} / {cell(*untrained, t)['map']:.4f}"
                              for t in SETS[4:]) + " |")
    for source in SOURCES:
        chosen, guarded = choose(rows, source), choose(rows, source, guarded=True)
        statistics, shrink, _ = chosen
        for label, key in ((f"alone ({statistics} statistics, shrink {shrink:g})", (statistics, shrink, 1.0)),
                           (f"w = {chosen[2]:g} (best validation mAP)", chosen),
                           (f"w = {guarded[2]:g}, {guarded[0]} statistics, shrink {guarded[1]:g} (best validation "
                            f"mAP with no fold below w = 0)", guarded)):
            lines.append(f"| {source} | {label} | {val(source, *key):.4f} | "
                         + " | ".join(f"{cell(source, *key, t)['r1']:.4f} / {cell(source, *key, t)['map']:.4f}"
                                      for t in SETS[4:]) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "global" / "ensemble.json")
    parser.add_argument("--table", action="store_true", help="print the Markdown table of --out and stop")
    args = parser.parse_args()
    if args.table:
        print(table(json.loads(args.out.read_text())["rows"]))
        return 0
    run(args.size, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
