"""Write a transform study to disk: JSON (everything), CSV (one line per number set), Markdown
tables, and the figures (waldo_experiments.plots).

Layout of ``out``::

    transforms.json          settings, every row (with per-group figures), summary, curves, examples
    transforms.csv           transform, seed, method, metrics (one line per run)
    transforms_summary.csv   seeds aggregated: mean, std, min, max, change against the baseline
    transforms_groups.csv    transform, seed, method, group, metrics
    report.md                the tables below, with the figures
    recall1_by_transform.png, recall_at_k.png, examples.png
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from waldo_experiments.transform_study import BASELINE, MULTISCALE, NORMALIZE_EXTRA, TransformStudy

__all__ = ["TRANSFORM_NOTES", "fmt", "fmt_delta", "group_table", "paired_changes", "paired_top1", "sign_test",
           "study_markdown", "summary_table", "write_csv", "write_study"]

# What each row changes, in the founding report's words where it had them.
TRANSFORM_NOTES = {
    "resize256-crop224": "baseline: square resize to 256, centre crop 224",
    "resize224": "no crop: square resize straight to 224",
    "flip": "horizontal flip",
    "grayscale": "grayscale (3 equal channels)",
    "contrast": "contrast x1.5",
    "blur": "Gaussian blur (5x5, sigma 1.5)",
    "perspective": "random perspective (seeded per image)",
    NORMALIZE_EXTRA: "ImageNet mean/std applied before the model's own normalisation",
    MULTISCALE: "mean of the baseline's global descriptors at several sizes",
}
CSV_KEYS = ("recall@1", "recall@10", "recall@100", "map", "map@100", "n_queries")


def fmt(value: float | None, digits: int = 4) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def fmt_delta(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:+.4f}"


def sign_test(fixed: int, broken: int) -> float:
    """Two-sided exact sign test: how likely a split at least this uneven is if a change fixes
    and breaks queries with equal probability (McNemar's exact test on the discordant pairs)."""
    n = fixed + broken
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(fixed, broken) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def paired_top1(base: str, other: str) -> dict:
    """Queries whose top-1 ``other`` fixed and broke relative to ``base`` (top1 strings of two
    rows over the same queries), with the sign test's p-value."""
    if len(base) != len(other):
        raise ValueError(f"rows cover different queries ({len(base)} vs {len(other)})")
    fixed = sum(1 for a, b in zip(base, other) if a == "0" and b == "1")
    broken = sum(1 for a, b in zip(base, other) if a == "1" and b == "0")
    return {"fixed": fixed, "broken": broken, "p_value": sign_test(fixed, broken)}


def paired_changes(rows: Sequence[dict]) -> dict[tuple[str, str], list[dict]]:
    """(transform, method) -> paired_top1 against the baseline row of the same method, per seed."""
    base = {r["method"]: r["top1"] for r in rows if r["transform"] == BASELINE and "top1" in r}
    out: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        if r["transform"] != BASELINE and r["method"] in base and "top1" in r:
            out.setdefault((r["transform"], r["method"]), []).append(paired_top1(base[r["method"]], r["top1"]))
    return out


def _paired_cell(changes: list[dict] | None) -> str:
    if not changes:
        return "-"
    if len(changes) == 1:
        c = changes[0]
        return f"{c['fixed']} / {c['broken']} (p {c['p_value']:.2g})"
    return ", ".join(f"{c['fixed']}/{c['broken']}" for c in changes) + " (per seed)"


def _with_spread(entry: dict, key: str) -> str:
    if entry["n_seeds"] <= 1:
        return fmt(entry[key])
    return (f"{fmt(entry[key])} ± {entry[f'{key}_std']:.4f} "
            f"({entry[f'{key}_min']:.4f}-{entry[f'{key}_max']:.4f})")


def _label(transform: str, settings: dict) -> str:
    if transform == MULTISCALE:
        return f"{MULTISCALE} ({'/'.join(str(s) for s in settings.get('scale_sizes', []))} px)"
    return transform


def summary_table(summary: Sequence[dict], settings: dict, methods: Sequence[str] | None = None,
                  rows: Sequence[dict] = ()) -> list[str]:
    """Markdown: one line per (method, transform); seeded rows show mean ± std (min-max). With
    ``rows``, a column counts the queries whose top-1 the transform fixed / broke."""
    methods = methods or list(dict.fromkeys(e["method"] for e in summary))
    changes = paired_changes(rows)
    lines = [("| method | transform | seeds | R@1 | change R@1 | top-1 fixed / broken | R@10 | R@100 | mAP | "
             "change mAP | mAP@100 |"),
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for method in methods:
        for e in (e for e in summary if e["method"] == method):
            name = _label(e["transform"], settings)
            if e["transform"] == BASELINE:
                name = f"**{name}** (baseline)"
            lines.append(f"| {method} | {name} | {e['n_seeds']} | {_with_spread(e, 'recall@1')} | "
                         f"{fmt_delta(e.get('recall@1_delta'))} | {_paired_cell(changes.get((e['transform'], method)))} | "
                         f"{fmt(e['recall@10'])} | {fmt(e['recall@100'])} | "
                         f"{_with_spread(e, 'map')} | {fmt_delta(e.get('map_delta'))} | {fmt(e['map@100'])} |")
    return lines


def group_table(rows: Sequence[dict], transform: str = BASELINE) -> list[str]:
    """Markdown: per-group R@1 and mAP of each method on ``transform`` (first seed), plus the
    overall line."""
    lines = ["| method | group | queries | R@1 | R@10 | mAP |", "|---|---|---|---|---|---|"]
    for row in rows:
        if row["transform"] != transform or row["seed"] not in (None, 0):
            continue
        for group, m in row["groups"].items():
            lines.append(f"| {row['method']} | {group} | {m['n_queries']} | {fmt(m['recall@1'])} | "
                         f"{fmt(m['recall@10'])} | {fmt(m['map'])} |")
        lines.append(f"| {row['method']} | **all** | {row['n_queries']} | {fmt(row['recall@1'])} | "
                     f"{fmt(row['recall@10'])} | {fmt(row['map'])} |")
    return lines


def _timing(rows: Sequence[dict]) -> list[str]:
    seen, lines = set(), ["| transform | seed | describe queries + gallery, s | rerank (all methods), s |",
                          "|---|---|---|---|"]
    for row in rows:
        key = (row["transform"], row["seed"])
        if key in seen:
            continue
        seen.add(key)
        lines.append(f"| {row['transform']} | {'-' if row['seed'] is None else row['seed']} | "
                     f"{row['seconds']['describe']} | {row['seconds']['rerank']} |")
    return lines


def study_markdown(study: TransformStudy, command: str = "", figures: dict[str, str] | None = None) -> str:
    """The report: settings, the transform table, per-group table, figures, timing."""
    s = study.settings
    n_queries = next((r["n_queries"] for r in study.rows), 0)
    lines = [f"# Test-time transform study: `{study.protocol}`", "",
             (f"Model `{study.model}` (image size {s['image_size']}); {n_queries} queries; methods: "
             f"{', '.join(s['methods'])} (reranking the global top {s['top_k']}). Random transforms run "
             f"with seeds {list(s['seeds'])}: mean ± population std (min-max). Changes are against "
             f"`{BASELINE}` with the same method. Whole study: {study.seconds:.0f} s."), ""]
    if command:
        lines += [f"Produced by `{command}`.", ""]
    lines += ["## Transforms", "", *summary_table(study.summary, s, rows=study.rows), "",
              ("Top-1 fixed / broken: queries whose first result the transform made right / wrong compared "
              "with the baseline (same method); p: two-sided exact sign test on those two counts (a small p "
              "means the change is unlikely to be noise in which queries happen to flip)."), "",
              "What each transform does: " + "; ".join(f"`{t}`: {TRANSFORM_NOTES.get(t, t)}"
                                                      for t in s["transforms"]) + ".", "",
              "## Per group (baseline transform)", "", *group_table(study.rows), ""]
    if figures:
        lines += ["## Figures", ""] + [f"![{name}]({target})" for name, target in figures.items()] + [""]
    lines += ["## Time", "", *_timing(study.rows), ""]
    return "\n".join(lines)


def write_csv(path: Path, header: Sequence[str], lines: Sequence[Sequence]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(lines)


def write_study(study: TransformStudy, out: str | Path, *, command: str = "", plots: bool = True) -> dict[str, Path]:
    """Write every file of the module docstring into ``out``; returns name -> path."""
    from waldo_experiments import plots as figures  # matplotlib loads only when a report is written

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = {"json": out / "transforms.json"}
    written["json"].write_text(json.dumps({**asdict(study), "command": command}, indent=1) + "\n")
    written["csv"] = out / "transforms.csv"
    write_csv(written["csv"], ["transform", "seed", "method", *CSV_KEYS, "rerank_ms_per_query"],
               [[r["transform"], r["seed"], r["method"], *(r.get(k) for k in CSV_KEYS), r.get("rerank_ms_per_query")]
                for r in study.rows])
    written["summary_csv"] = out / "transforms_summary.csv"
    keys = [k for k in study.summary[0] if k not in ("transform", "method", "seeds")] if study.summary else []
    write_csv(written["summary_csv"], ["transform", "method", *keys],
               [[e["transform"], e["method"], *(e.get(k) for k in keys)] for e in study.summary])
    written["groups_csv"] = out / "transforms_groups.csv"
    write_csv(written["groups_csv"], ["transform", "seed", "method", "group", *CSV_KEYS],
               [[r["transform"], r["seed"], r["method"], g, *(m.get(k) for k in CSV_KEYS)]
                for r in study.rows for g, m in r["groups"].items()])
    links: dict[str, str] = {}
    if plots and study.summary:
        written["bars"] = figures.plot_recall_by_transform(
            study.summary, out / "recall1_by_transform.png",
            title=f"{study.protocol}: Recall@1 per test-time transform (error bars: min-max over seeds)")
        written["curves"] = figures.plot_recall_curves(
            study.curves, out / "recall_at_k.png", title=f"{study.protocol}: Recall@k, {BASELINE}")
        links = {"Recall@1 per transform": "recall1_by_transform.png", "Recall@k per method": "recall_at_k.png"}
        if study.examples:
            written["examples"] = figures.plot_examples(study.examples, study.data_root, out / "examples.png")
            links["examples"] = "examples.png"
    written["markdown"] = out / "report.md"
    written["markdown"].write_text(study_markdown(study, command, links))
    return written
