"""The one training loop with a toy trainer (a linear model, no images): resume replays the
uninterrupted run, best/ follows the validation score, patience stops a run that stopped
improving, a non-finite loss stops the run."""

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from waldo.fsutil import atomic_write_json
from waldo.train.common import TrainState
from waldo.train.config import TrainConfig
from waldo.train.loop import StepResult, Trainer, fit, run_finished, run_summary, start_run


class ToyTrainer(Trainer):
    unit = "images"
    metric = "neg_loss"
    finish_flag = "finished"

    def __init__(self, config: TrainConfig, scale: float = 1.0) -> None:
        self.config, self.scale, self.finished = config, scale, 0
        torch.manual_seed(0)
        self.module = nn.Linear(4, 1)
        self.optimizer = torch.optim.SGD(self.module.parameters(), lr=config.lr)
        generator = torch.Generator().manual_seed(1)
        self.x, self.y = torch.randn(32, 4, generator=generator), torch.randn(32, 1, generator=generator)

    def batches(self, epoch: int):
        order = torch.randperm(32, generator=torch.Generator().manual_seed(epoch))
        return [order[i:i + 8] for i in range(0, 32, 8)]

    def batches_per_epoch(self) -> int:
        return 4

    def step(self, epoch: int, index: int, batch) -> StepResult:
        self.optimizer.zero_grad()
        loss = self.scale * ((self.module(self.x[batch]) - self.y[batch]) ** 2).mean()
        loss.backward()
        self.optimizer.step()
        return StepResult({"loss": float(loss.detach())}, weight=1, count=len(batch), images=len(batch))

    def validate(self) -> dict:
        with torch.no_grad():
            return {"neg_loss": -float(((self.module(self.x) - self.y) ** 2).mean())}

    def save(self, target: Path, epoch: int, metrics: dict | None) -> None:
        atomic_write_json(target / "weights.json", {"epoch": epoch, "weight": self.module.weight.tolist(),
                                                    "metrics": metrics})

    def finish(self, best: Path) -> None:
        self.finished += 1


def _run(out: Path, config: TrainConfig, stop_after: int | None = None, scale: float = 1.0) -> ToyTrainer:
    out, state = start_run(out, config)
    trainer = ToyTrainer(config, scale)
    fit(trainer, out, state or TrainState(seed=config.seed), resume=state is not None, progress=False,
        stop_after=stop_after)
    return trainer


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_resume_replays_and_best_follows_validation(tmp_path: Path) -> None:
    config = TrainConfig(epochs=4, lr=0.05, milestones=(0.5,), eval_every=2)
    straight = _run(tmp_path / "straight", config)
    assert straight.finished == 1
    _run(tmp_path / "resumed", config, stop_after=1)
    assert [r["epoch"] for r in _log(tmp_path / "resumed")] == [0, 1]
    resumed = _run(tmp_path / "resumed", config)
    assert resumed.finished == 1  # finish runs once, at the end, and is recorded in the state
    assert _run(tmp_path / "resumed", config).finished == 0

    def comparable(run: str) -> list[dict]:
        return [{k: v for k, v in r.items() if "seconds" not in k and "per_s" not in k} for r in _log(tmp_path / run)]

    assert comparable("resumed") == comparable("straight")
    assert torch.equal(straight.module.weight, resumed.module.weight)
    log = _log(tmp_path / "straight")
    assert [r["lr"] for r in log[1:]] == pytest.approx([0.05, 0.05, 0.005, 0.005])
    assert [("val" in r) for r in log] == [True, False, True, False, True]  # epoch 0, every 2nd, the last
    assert log[1]["images"] == 32 and log[1]["loss"] > log[-1]["loss"]
    scores = {r["epoch"]: r["val"]["neg_loss"] for r in log if "val" in r}
    best = json.loads((tmp_path / "straight" / "best" / "weights.json").read_text())
    assert best["epoch"] == max(scores, key=scores.get) == log[-1]["best_epoch"]
    state = json.loads((tmp_path / "straight" / "state" / "train_state.json").read_text())
    assert state["epoch"] == 4 and state["images"] == 128 and state["scheduler"]["milestone_epochs"] == [2]

    with pytest.raises(ValueError, match="another config"):
        _run(tmp_path / "straight", TrainConfig(epochs=4, lr=0.1, milestones=(0.5,), eval_every=2))


def test_a_non_finite_loss_stops_the_run(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="epoch 1: loss is (nan|inf)"):
        _run(tmp_path / "run", TrainConfig(epochs=2, lr=0.05), scale=float("nan"))


class ScriptedTrainer(ToyTrainer):
    """The toy model, with the validation score of each epoch scripted (0 = the starting model)."""

    SCORES = [0.1, 0.5, 0.4, 0.45, 0.3, 0.9, 0.2, 0.2]

    def __init__(self, config: TrainConfig) -> None:
        super().__init__(config)
        self.epochs_done = 0

    def step(self, epoch: int, index: int, batch) -> StepResult:
        self.epochs_done = epoch + 1
        return super().step(epoch, index, batch)

    def validate(self) -> dict:
        return {"neg_loss": self.SCORES[self.epochs_done]}


def _scripted(out: Path, config: TrainConfig, stop_after: int | None = None) -> tuple[ScriptedTrainer, TrainState]:
    out, saved = start_run(out, config)
    trainer = ScriptedTrainer(config)
    state = saved or TrainState(seed=config.seed)
    trainer.epochs_done = state.epoch  # a resumed trainer has done the saved epochs
    fit(trainer, out, state, resume=saved is not None, progress=False, stop_after=stop_after)
    return trainer, state


def test_patience_stops_after_epochs_without_a_better_score(tmp_path: Path) -> None:
    config = TrainConfig(epochs=7, lr=0.05, patience=2)
    trainer, state = _scripted(tmp_path / "run", config)
    log = _log(tmp_path / "run")
    # best after epoch 1 (0.5); epochs 2 and 3 do not beat it: stop after 3, never seeing epoch 5's 0.9
    assert [r["epoch"] for r in log] == [0, 1, 2, 3] and log[-1]["stopped_early"] and log[-1]["best_epoch"] == 1
    assert trainer.finished == 1 and run_finished(state, config) and state.epoch == 3
    assert json.loads((tmp_path / "run" / "best" / "weights.json").read_text())["epoch"] == 1
    assert "stopped early" in run_summary(tmp_path / "run", config, "neg_loss", 0.0)
    again, _ = _scripted(tmp_path / "run", config)  # rerunning a stopped run trains and finishes nothing
    assert again.finished == 0 and len(_log(tmp_path / "run")) == 4

    for _ in range(3):  # one epoch per call stops at the same epoch
        _scripted(tmp_path / "resumed", config, stop_after=1)
    last = _log(tmp_path / "resumed")[-1]
    assert last["epoch"] == 3 and last["stopped_early"]

    full = TrainConfig(epochs=7, lr=0.05)  # without patience every epoch runs and epoch 5 is the best
    trainer, state = _scripted(tmp_path / "full", full)
    assert state.epoch == 7 and state.best_epoch == 5 and trainer.finished == 1
    assert not any("stopped_early" in r for r in _log(tmp_path / "full"))
