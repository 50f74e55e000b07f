"""Cross-dataset transfer: train the global model on one dataset, evaluate it on every dataset.

Each training protocol gets a global model trained on its training identities only, with the
existing trainer (waldo.train.global_model.train_global, resumable: a finished run is reused).
Every model -- plus the untrained ImageNet reference, whose PCA projection is fitted without labels
on each evaluation protocol's own training images, as ``waldo eval`` does -- is then evaluated on
every evaluation protocol. The diagonal (trained and evaluated on one dataset) is the in-domain
figure; the off-diagonal cells show how much of what was learnt carries over.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from waldo.data.protocols import get_protocol
from waldo.eval.metrics import recall_curve
from waldo.eval.runner import run_eval_full
from waldo.paths import PROJECT_ROOT
from waldo_experiments.groups import group_metrics, query_groups
from waldo_experiments.study_report import fmt, fmt_delta, write_csv
from waldo_experiments.transform_study import METRIC_KEYS, subset_protocol

__all__ = ["DEFAULT_CONFIGS", "UNTRAINED", "TransferStudy", "dataset_of", "run_transfer", "train_models",
           "transfer_markdown"]

UNTRAINED = "untrained ImageNet (PCA-whitened)"
# CPU-sized training configs per training protocol (configs/); override with --config.
DEFAULT_CONFIGS = {"grocery-open": "configs/global-cpu.json", "coil100-open": "configs/global-cpu-coil.json"}


def dataset_of(protocol: str) -> str:
    """The dataset family a protocol reads (grocery-open and grocery-open-cross share one)."""
    return protocol.split("-")[0]


@dataclass
class TransferStudy:
    """rows: one per (model, evaluation protocol) with metrics, per-group figures and Recall@k;
    models: model name -> folder (None for the untrained reference) and training seconds."""

    rows: list[dict]
    models: dict[str, dict]
    seconds: float


def train_models(train_protocols: Sequence[str], runs: str | Path, configs: dict[str, str] | None = None,
                 progress: bool = True, log: Callable[[str], None] = print) -> dict[str, dict]:
    """Train (or resume, or reuse) one global model per training protocol under ``runs``."""
    from waldo.train.config import GlobalTrainConfig, load_config
    from waldo.train.global_model import train_global

    configs = {**DEFAULT_CONFIGS, **(configs or {})}
    models = {}
    for protocol in train_protocols:
        if protocol not in configs:
            raise ValueError(f"no training config for {protocol!r}; pass --config {protocol}=FILE")
        config_path = Path(configs[protocol])
        if not config_path.is_absolute() and not config_path.exists():
            config_path = PROJECT_ROOT / config_path
        out = Path(runs) / f"global-{protocol}"
        start = time.perf_counter()
        best = train_global(load_config(config_path, GlobalTrainConfig), None, protocol, out, progress=progress)
        seconds = round(time.perf_counter() - start, 1)
        log(f"trained on {protocol}: {best} ({seconds} s in this call)")
        models[f"trained on {protocol}"] = {"folder": str(best), "train_protocol": protocol,
                                            "config": str(configs[protocol]), "train_seconds": seconds}
    return models


def _evaluate(model_name: str, info: dict, eval_protocol: str, *, subset: dict, progress: bool,
              curve_k: int) -> dict:
    protocol = subset_protocol(get_protocol(eval_protocol), **subset) if subset else None
    start = time.perf_counter()
    if protocol is None:
        run, metrics = run_eval_full(eval_protocol, model_dir=info.get("folder"), progress=progress)
        protocol = get_protocol(eval_protocol)
    else:  # a subset (tests, quick looks): the same steps on the smaller protocol
        from waldo.data.transforms import get_transform
        from waldo.eval.evaluate import evaluate_protocol
        from waldo.eval.runner import prepare_model

        model, config = prepare_model(protocol, model_dir=info.get("folder"), progress=progress)
        run = evaluate_protocol(model, protocol, get_transform(config.transform, config.image_size), progress=progress)
        metrics = dict(run.metrics)
    train = info.get("train_protocol")
    groups = group_metrics(run.matches, run.n_positives, query_groups(protocol, run.query_rows))
    return {"model_name": model_name, "model": info.get("folder"), "train_protocol": train,
            "eval_protocol": eval_protocol,
            "in_domain": None if train is None else dataset_of(train) == dataset_of(eval_protocol),
            **{k: metrics[k] for k in METRIC_KEYS}, "groups": groups,
            "curve": recall_curve(run.matches, curve_k), "seconds": round(time.perf_counter() - start, 1)}


def run_transfer(train_protocols: Sequence[str], eval_protocols: Sequence[str], runs: str | Path, *,
                 configs: dict[str, str] | None = None, subset: dict | None = None, progress: bool = True,
                 curve_k: int = 100, log: Callable[[str], None] = print) -> TransferStudy:
    """Train one model per training protocol, then evaluate it and the untrained reference on
    every evaluation protocol. ``subset``: ``subset_protocol`` arguments for the evaluations."""
    start = time.perf_counter()
    models = {UNTRAINED: {"folder": None, "train_protocol": None}}
    models.update(train_models(train_protocols, runs, configs, progress=progress, log=log))
    rows = []
    for eval_protocol in eval_protocols:
        for name, info in models.items():
            row = _evaluate(name, info, eval_protocol, subset=subset or {}, progress=progress, curve_k=curve_k)
            log(f"{name} -> {eval_protocol}: R@1 {row['recall@1']:.4f} mAP {row['map']:.4f} ({row['seconds']} s)")
            rows.append(row)
    return TransferStudy(rows, models, round(time.perf_counter() - start, 1))


def transfer_markdown(study: TransferStudy, command: str = "", figures: dict[str, str] | None = None) -> str:
    """Tables: per evaluation protocol, each model with its change against the untrained
    reference; then per-group figures."""
    lines = ["# Cross-dataset transfer", "",
             ("Each global model is trained on one protocol's training identities only (CPU configs); "
             f"`{UNTRAINED}` fits its projection without labels on each evaluation protocol's training "
             f"images. Changes are against that reference. Whole study: {study.seconds:.0f} s."), ""]
    if command:
        lines += [f"Produced by `{command}`.", ""]
    lines += ["| evaluated on | model | in-domain | queries | R@1 | change R@1 | R@10 | R@100 | mAP | change mAP |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    reference = {r["eval_protocol"]: r for r in study.rows if r["model_name"] == UNTRAINED}
    for row in study.rows:
        base = reference.get(row["eval_protocol"])
        same = "-" if row["in_domain"] is None else ("yes" if row["in_domain"] else "**no** (transfer)")
        lines.append(f"| {row['eval_protocol']} | {row['model_name']} | {same} | {row['n_queries']} | "
                     f"{fmt(row['recall@1'])} | {fmt_delta(row['recall@1'] - base['recall@1']) if base else '-'} | "
                     f"{fmt(row['recall@10'])} | {fmt(row['recall@100'])} | {fmt(row['map'])} | "
                     f"{fmt_delta(row['map'] - base['map']) if base else '-'} |")
    lines += ["", "Per group:", "", "| evaluated on | model | group | queries | R@1 | mAP |", "|---|---|---|---|---|---|"]
    for row in study.rows:
        for group, m in row["groups"].items():
            lines.append(f"| {row['eval_protocol']} | {row['model_name']} | {group} | {m['n_queries']} | "
                         f"{fmt(m['recall@1'])} | {fmt(m['map'])} |")
    lines += ["", "Models:", ""]
    for name, info in study.models.items():
        if info.get("folder"):
            lines.append(f"- {name}: `{info['folder']}` (config `{info['config']}`, {info['train_seconds']} s "
                         f"in the training call of this run)")
        else:
            lines.append(f"- {name}: no training; ImageNet weights, projection fitted per evaluation protocol")
    if figures:
        lines += ["", "## Figures", ""] + [f"![{name}]({target})" for name, target in figures.items()]
    return "\n".join(lines) + "\n"


def write_transfer(study: TransferStudy, out: str | Path, *, command: str = "", plots: bool = True) -> dict[str, Path]:
    """transfer.json, transfer.csv, transfer_groups.csv, report.md and two figures in ``out``."""
    from waldo_experiments import plots as figures  # matplotlib loads only when a report is written

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = {"json": out / "transfer.json", "csv": out / "transfer.csv", "groups_csv": out / "transfer_groups.csv"}
    written["json"].write_text(json.dumps({**asdict(study), "command": command}, indent=1) + "\n")
    write_csv(written["csv"], ["eval_protocol", "model_name", "train_protocol", "in_domain", *METRIC_KEYS],
              [[r["eval_protocol"], r["model_name"], r["train_protocol"], r["in_domain"], *(r[k] for k in METRIC_KEYS)]
               for r in study.rows])
    write_csv(written["groups_csv"], ["eval_protocol", "model_name", "group", *METRIC_KEYS],
              [[r["eval_protocol"], r["model_name"], g, *(m[k] for k in METRIC_KEYS)]
               for r in study.rows for g, m in r["groups"].items()])
    links = {}
    if plots and study.rows:
        written["bars"] = figures.plot_transfer(study.rows, out / "transfer_recall1.png")
        links["Recall@1 per model and dataset"] = "transfer_recall1.png"
        for protocol in dict.fromkeys(r["eval_protocol"] for r in study.rows):
            curves = {r["model_name"]: r["curve"] for r in study.rows if r["eval_protocol"] == protocol}
            name = f"transfer_recall_at_k_{protocol}.png"
            written[f"curves_{protocol}"] = figures.plot_recall_curves(curves, out / name,
                                                                       title=f"{protocol}: Recall@k per model")
            links[f"Recall@k on {protocol}"] = name
    written["markdown"] = out / "report.md"
    written["markdown"].write_text(transfer_markdown(study, command, links))
    return written
