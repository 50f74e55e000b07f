"""The one training loop: resume, epochs, lr schedule, finite-loss check, validation, best/last
checkpoints and the JSON log, written once for every trainer.

A trainer (:class:`Trainer`) brings only what is its own: its batches, its optimizer step, its
validation and how it saves a checkpoint; :func:`fit` runs the epochs around them.

Run folder::

    train_config.json   the run's config (a rerun must match it)
    best/               the best checkpoint by validation (+ metrics.json, train_config.json)
    last/               the checkpoint of the last completed epoch
    state/              resume state: weights, optimizer buffers, counters (waldo.train.common)
    log.jsonl           one JSON line per epoch (0 = the starting model, when it is validated)
"""

from __future__ import annotations

import json
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from waldo.fsutil import atomic_write_json, atomic_write_text, write_dir_atomically
from waldo.models.cpu_memory import reuse_large_buffers
from waldo.train.common import (
    TrainState,
    load_resume_state,
    read_train_state,
    save_resume_state,
    seed_everything,
    train_mode,
)
from waldo.train.config import TrainConfig, load_config

#: The state key of a run that ``config.patience`` stopped: the epoch it stopped after.
STOPPED_EARLY = "stopped_early"

__all__ = ["StepResult", "Trainer", "fit", "run_finished", "run_summary", "start_run", "write_checkpoint"]


@dataclass
class StepResult:
    """One optimizer step: loss terms (``"loss"`` is the one optimised), the batch's weight in
    the epoch's mean, its ``Trainer.unit`` count, its images, counters summed over the epoch."""

    losses: dict[str, float]
    weight: int
    count: int
    images: int
    counters: dict[str, int] = field(default_factory=dict)


class Trainer(ABC):
    """What a trainer plugs into :func:`fit`.

    ``module`` holds every weight the resume state keeps and ``optimizer`` its trainable ones;
    ``unit`` names what ``StepResult.count`` counts ("images", "pairs"); ``metric`` names the
    validation metric that selects ``best/`` (higher is better); ``validate_start``: the
    starting model is the first candidate for ``best/`` (epoch 0); ``finish_flag``: the state
    key that marks :meth:`finish` done (None = nothing to finish).
    """

    config: TrainConfig
    module: nn.Module
    optimizer: torch.optim.Optimizer
    unit: str
    metric: str
    validate_start: bool = True
    finish_flag: str | None = None

    @abstractmethod
    def batches(self, epoch: int) -> Iterable[Any]:
        """The batches of 0-based ``epoch``; they depend only on (seed, epoch), so a resumed run
        replays what an uninterrupted one would."""

    @abstractmethod
    def batches_per_epoch(self) -> int:
        """For the progress bar."""

    @abstractmethod
    def step(self, epoch: int, index: int, batch: Any) -> StepResult:
        """One optimizer step on the ``index``-th batch of ``epoch``."""

    @abstractmethod
    def validate(self) -> dict:
        """Validation metrics of the current weights (may leave the model in eval mode)."""

    def score(self, metrics: dict) -> float:
        return metrics[self.metric]

    @abstractmethod
    def save(self, target: Path, epoch: int, metrics: dict | None) -> None:
        """Write the checkpoint of ``epoch`` (0 = the starting model) into ``target``, atomically."""

    def finish(self, best: Path) -> None:
        """Post-process ``best/`` once the last epoch is done (see ``finish_flag``)."""
        raise NotImplementedError


def start_run(out_dir: str | Path, config: TrainConfig) -> tuple[Path, TrainState | None]:
    """Create the run folder (or check it holds a run of this very config), set threads and
    seed. Returns (folder, saved counters or None)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    saved_path = out / "train_config.json"
    if saved_path.is_file():
        saved, wanted = load_config(saved_path, type(config)).model_dump(), config.model_dump()
        differences = {key: (saved[key], wanted[key]) for key in sorted(saved) if saved[key] != wanted[key]}
        if differences:
            raise ValueError(f"{out} holds a run with another config ({differences}); resume with the "
                             f"same config or choose a new --out")
    else:
        atomic_write_text(saved_path, config.to_json() + "\n")
    if config.threads:
        torch.set_num_threads(config.threads)
    seed_everything(config.seed)
    return out, read_train_state(out / "state")


def fit(trainer: Trainer, out: Path, state: TrainState, *, resume: bool, progress: bool = True,
        stop_after: int | None = None) -> Path:
    """Train from ``state`` (the saved counters with ``resume``: weights and optimizer state
    are loaded from ``out / "state"``) to ``config.epochs``; ``stop_after`` ends this call
    after that many epochs (resumable later). Returns ``out / "best"``."""
    config = trainer.config

    def save_state() -> None:
        save_resume_state(out / "state", trainer.module, trainer.optimizer, state, config.to_json())

    if resume:
        load_resume_state(out / "state", trainer.module, trainer.optimizer)
    elif trainer.validate_start:  # the starting model is the first candidate: training must beat it
        metrics = trainer.validate()
        state.best_metric, state.best_epoch = trainer.score(metrics), 0
        trainer.save(out / "best", 0, {"epoch": 0, "val": metrics})
        save_state()
        _log(out, {"epoch": 0, "val": metrics}, keep_below=0)
    first_epoch = state.epoch
    for epoch in range(first_epoch, config.epochs):
        if state.extra.get(STOPPED_EARLY) or (stop_after is not None and epoch - first_epoch >= stop_after):
            break
        lr = config.lr_at(epoch)
        for group in trainer.optimizer.param_groups:
            group["lr"] = lr
        train_mode(trainer.module)
        with reuse_large_buffers():  # eager steps keep their large buffers (waldo.models.cpu_memory)
            record = {"epoch": epoch + 1, "lr": lr, **_train_epoch(trainer, epoch, progress)}
        if not math.isfinite(record["loss"]):
            raise RuntimeError(f"epoch {epoch + 1}: loss is {record['loss']}; lower the lr")
        images = record.pop("_images")
        state.epoch, state.seconds, state.images = epoch + 1, state.seconds + record["seconds"], state.images + images
        state.scheduler = {"kind": "multistep", "milestone_epochs": config.milestone_epochs(),
                           "gamma": config.gamma, "lr": lr}
        if (epoch + 1) % config.eval_every == 0 or epoch + 1 == config.epochs:
            eval_start = time.perf_counter()
            record["val"] = trainer.validate()
            record["eval_seconds"] = time.perf_counter() - eval_start
            score = trainer.score(record["val"])
            if state.best_metric is None or score > state.best_metric:
                state.best_metric, state.best_epoch = score, epoch + 1
                trainer.save(out / "best", epoch + 1, {"epoch": epoch + 1, "val": record["val"]})
            if config.patience is not None and state.epoch - state.best_epoch >= config.patience:
                state.extra[STOPPED_EARLY] = state.epoch
                record["stopped_early"] = True
        record["best_epoch"] = state.best_epoch
        save_state()
        trainer.save(out / "last", epoch + 1, None)
        _log(out, record, keep_below=epoch + 1)
        if progress:
            val = f", val {trainer.metric} {score:.4f}" if "val" in record else ""
            tqdm.write(f"epoch {epoch + 1}/{config.epochs}: loss {record['loss']:.4f}, "
                       f"{record[f'{trainer.unit}_per_s']:.1f} {trainer.unit}/s{val}")
            if record.get("stopped_early"):
                tqdm.write(f"stopping early: no better validation {trainer.metric} in {config.patience} "
                           f"epochs; the best is epoch {state.best_epoch}")
    flag = trainer.finish_flag
    if run_finished(state, config) and flag is not None and not state.extra.get(flag):
        trainer.finish(out / "best")
        state.extra[flag] = True
        save_state()
    return out / "best"


def run_finished(state: TrainState | None, config: TrainConfig) -> bool:
    """Whether a run's training is over: every epoch done, or stopped early by ``config.patience``."""
    return state is not None and (state.epoch == config.epochs or bool(state.extra.get(STOPPED_EARLY)))


def write_checkpoint(target: Path, config: TrainConfig, metrics: dict | None,
                     write_weights: Callable[[Path], None]) -> None:
    """Replace ``target`` atomically by a folder of ``write_weights(folder)``, the run's
    train_config.json and (given) metrics.json."""
    def write(staging: Path) -> None:
        write_weights(staging)
        atomic_write_text(staging / "train_config.json", config.to_json() + "\n")
        if metrics is not None:
            atomic_write_json(staging / "metrics.json", metrics)

    write_dir_atomically(target, write)


def run_summary(out_dir: str | Path, config: TrainConfig, metric: str, seconds: float) -> str:
    """One line on a run folder's progress, for the CLI; ``seconds``: spent in this call."""
    state = read_train_state(Path(out_dir) / "state")
    if state is None or state.best_metric is None:
        return f"{out_dir}: no validated epoch yet"
    stopped = f" (stopped early: no gain in {config.patience} epochs)" if state.extra.get(STOPPED_EARLY) else ""
    return (f"{state.epoch}/{config.epochs} epochs done{stopped} ({seconds:.0f} s in this call, "
            f"{state.images / max(state.seconds, 1e-9):.1f} training images/s); best validation {metric} "
            f"{state.best_metric:.4f} at epoch {state.best_epoch}: {Path(out_dir) / 'best'}")


def _train_epoch(trainer: Trainer, epoch: int, progress: bool) -> dict[str, Any]:
    """Run one epoch's steps; returns the log fields: mean losses (weighted by
    ``StepResult.weight``), the count and rate of ``trainer.unit``, seconds, summed counters,
    and ``_images`` (the images seen, for the run's totals)."""
    totals: dict[str, float] = {}
    counters: dict[str, int] = {}
    weight = count = images = 0
    start = time.perf_counter()
    bar = tqdm(trainer.batches(epoch), total=trainer.batches_per_epoch(), unit="batch",
               desc=f"epoch {epoch + 1}/{trainer.config.epochs}", disable=not progress, leave=False)
    for index, batch in enumerate(bar):
        result = trainer.step(epoch, index, batch)
        for key, value in result.losses.items():
            totals[key] = totals.get(key, 0.0) + value * result.weight
        for key, value in result.counters.items():
            counters[key] = counters.get(key, 0) + value
        weight, count, images = weight + result.weight, count + result.count, images + result.images
        bar.set_postfix({"loss": f"{totals['loss'] / weight:.4f}",
                         f"{trainer.unit}_s": f"{count / (time.perf_counter() - start):.1f}"})
    bar.close()
    seconds = time.perf_counter() - start
    means = {key: value / max(1, weight) for key, value in totals.items()} or {"loss": 0.0}
    return {**means, trainer.unit: count, f"{trainer.unit}_per_s": count / seconds, "seconds": seconds,
            **counters, "_images": images}


def _log(out: Path, record: dict, keep_below: int) -> None:
    """Append to log.jsonl, first dropping lines of epochs >= ``keep_below`` (an interrupted run's)."""
    path = out / "log.jsonl"
    lines = [line for line in (path.read_text().splitlines() if path.is_file() else [])
             if line.strip() and json.loads(line)["epoch"] < keep_below]
    atomic_write_text(path, "".join(f"{line}\n" for line in [*lines, json.dumps(record)]))
