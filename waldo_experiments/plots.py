"""Figures for the experiment reports (matplotlib).

Figures are built as ``matplotlib.figure.Figure`` objects, never through pyplot, so no backend
is chosen, no display is needed and no global figure state is left behind; ``savefig`` renders
PNGs with Agg.

Each function takes plain numbers (the rows and curves the studies return, also what their JSON
holds), writes one PNG and returns its path. Sizes and DPI keep each file well under 1 MB so the
figures can live in the repository beside the report.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from PIL import Image

from waldo.data.images import load_image

__all__ = ["plot_examples", "plot_recall_by_transform", "plot_recall_curves", "plot_transfer"]

DPI = 110
EXAMPLES_DPI = 80
CORRECT, WRONG = "#1a9641", "#d7191c"


def _save(figure: Figure, path: str | Path, dpi: int = DPI) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=dpi, bbox_inches="tight")
    return path


def plot_recall_by_transform(summary: Sequence[dict], path: str | Path, *, key: str = "recall@1",
                             title: str = "") -> Path:
    """Grouped bars: ``key`` per transform (x) and method (colour). Transforms run with several
    seeds get error bars spanning their min..max; a dashed line marks each method's baseline."""
    transforms = list(dict.fromkeys(e["transform"] for e in summary))
    methods = list(dict.fromkeys(e["method"] for e in summary))
    lookup = {(e["transform"], e["method"]): e for e in summary}
    width = 0.8 / max(1, len(methods))
    figure = Figure(figsize=(max(6.0, 1.1 * len(transforms) + 2), 4.2))
    axes = figure.subplots()
    x = np.arange(len(transforms))
    for i, method in enumerate(methods):
        entries = [lookup.get((t, method)) for t in transforms]
        values = np.array([e[key] if e else np.nan for e in entries])
        positions = x + (i - (len(methods) - 1) / 2) * width
        bars = axes.bar(positions, values, width, label=method)
        seeded = [j for j, e in enumerate(entries) if e and e["n_seeds"] > 1]
        if seeded:  # only where there is a spread to show
            low = [entries[j][key] - entries[j][f"{key}_min"] for j in seeded]
            high = [entries[j][f"{key}_max"] - entries[j][key] for j in seeded]
            axes.errorbar(positions[seeded], values[seeded], yerr=[low, high], fmt="none", ecolor="black",
                          capsize=3, linewidth=1)
        base = lookup.get((transforms[0], method))
        if base is not None:
            axes.axhline(base[key], color=bars.patches[0].get_facecolor(), linestyle="--", linewidth=0.8)
    axes.set_xticks(x, transforms, rotation=30, ha="right")
    axes.set_ylabel(key.replace("recall", "Recall"))
    axes.set_ylim(0, 1.0)
    axes.set_title(title or f"{key} per test-time transform (error bars: min-max over seeds)")
    axes.legend(loc="lower left", fontsize=8)
    axes.grid(axis="y", alpha=0.3)
    return _save(figure, path)


def plot_recall_curves(curves: dict[str, Sequence[float]], path: str | Path, *, title: str = "") -> Path:
    """Recall@k against k (log scale) for each method."""
    figure = Figure(figsize=(6.0, 4.2))
    axes = figure.subplots()
    styles = ("-", "--", ":", "-.")  # curves often coincide: dashes keep each one visible
    for i, (method, values) in enumerate(curves.items()):
        ks = np.arange(1, len(values) + 1)
        axes.plot(ks, values, label=method, linewidth=1.8, linestyle=styles[i % len(styles)])
    axes.set_xscale("log")
    axes.set_xlabel("k")
    axes.set_ylabel("Recall@k")
    axes.set_title(title or "Recall@k per method")
    axes.grid(alpha=0.3, which="both")
    axes.legend(loc="lower right", fontsize=8)
    return _save(figure, path)


def plot_transfer(rows: Sequence[dict], path: str | Path, *, key: str = "recall@1", title: str = "") -> Path:
    """Bars of ``key`` per evaluation protocol (x) and model (colour)."""
    protocols = list(dict.fromkeys(r["eval_protocol"] for r in rows))
    models = list(dict.fromkeys(r["model_name"] for r in rows))
    lookup = {(r["eval_protocol"], r["model_name"]): r[key] for r in rows}
    width = 0.8 / max(1, len(models))
    figure = Figure(figsize=(max(5.0, 2.2 * len(protocols) + 2), 4.0))
    axes = figure.subplots()
    x = np.arange(len(protocols))
    for i, model in enumerate(models):
        values = [lookup.get((p, model), np.nan) for p in protocols]
        axes.bar(x + (i - (len(models) - 1) / 2) * width, values, width, label=model)
    axes.set_xticks(x, protocols)
    axes.set_ylim(0, 1.0)
    axes.set_ylabel(key.replace("recall", "Recall"))
    axes.set_title(title or f"{key}: trained on one dataset, evaluated on each")
    axes.legend(fontsize=8, loc="lower left")
    axes.grid(axis="y", alpha=0.3)
    return _save(figure, path)


def _thumbnail(path: Path, side: int) -> np.ndarray:
    """A square RGB thumbnail (grey if the image cannot be read: a figure must not fail)."""
    try:
        image = load_image(path)
    except Exception:  # noqa: BLE001 - any unreadable file becomes a grey tile
        image = Image.new("RGB", (side, side), (128, 128, 128))
    return np.asarray(image.resize((side, side), Image.Resampling.BILINEAR))


def _tile(axes: Axes, picture: np.ndarray, border: str | None, label: str) -> None:
    axes.imshow(picture)
    axes.set_xticks([])
    axes.set_yticks([])
    for spine in axes.spines.values():
        spine.set_visible(False)
    if border is not None:
        side = picture.shape[0]
        axes.add_patch(Rectangle((1.5, 1.5), side - 4, side - 4, fill=False, edgecolor=border, linewidth=4))
    axes.set_title(label, fontsize=7)


def plot_examples(examples: Sequence[dict], root: str | Path, path: str | Path, *, side: int = 96,
                  title: str = "") -> Path:
    """Two rows per example query: its top-5 by global search, then after reranking. Green
    border: same identity as the query; red: another one."""
    root = Path(root)
    n_rows = max(1, 2 * len(examples))
    n_cols = 1 + max([len(e["before"]) for e in examples] + [1])
    figure = Figure(figsize=(1.25 * n_cols, 1.35 * n_rows))
    grid = figure.subplots(n_rows, n_cols, squeeze=False)
    for axes in grid.flat:
        axes.axis("off")
    for i, example in enumerate(examples):
        for line, stage in enumerate(("before", "after")):
            row = grid[2 * i + line]
            if line == 0:
                row[0].axis("on")
                _tile(row[0], _thumbnail(root / example["query"], side), None,
                      f"query ({example['kind']})\n{example.get('label') or example['identity']}")
            label = "global" if stage == "before" else example["method"]
            for j, hit in enumerate(example[stage]):
                row[j + 1].axis("on")
                _tile(row[j + 1], _thumbnail(root / hit["path"], side), CORRECT if hit["correct"] else WRONG,
                      f"{label} #{j + 1}")
    figure.suptitle(title or "Top-5 before (global) and after reranking; green = correct, red = wrong", fontsize=9)
    figure.tight_layout()
    return _save(figure, path, dpi=EXAMPLES_DPI)  # photos compress poorly in PNG: keep it < 1 MB
