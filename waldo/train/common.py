"""Pieces shared by Waldo's training loops (global model now, reranker next).

- reproducibility: :func:`seed_everything`, :func:`epoch_seed`;
- what trains: :func:`train_mode` (BatchNorm stays in eval mode, as in the reference) and
  :func:`split_backbone` (frozen prefix, trainable tail);
- resumable runs: :class:`TrainState` plus :func:`save_resume_state` / :func:`load_resume_state`,
  which keep weights, optimizer buffers (safetensors, keyed by parameter name) and the loop's
  counters (JSON) in one folder that is swapped in atomically, so an interruption at any moment
  leaves either the previous epoch's state or the new one, never a mix;
- model selection: :func:`split_identities` and :class:`LooEvaluator`, a leave-one-out
  evaluation on held-out *training* identities (the reference selected on the test set).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from waldo.data.datasets import ImageSet
from waldo.data.protocols import Protocol
from waldo.fsutil import (atomic_write_bytes, atomic_write_json, atomic_write_text, recover_dir,
                          write_dir_atomically)
from waldo.models.backbones import Backbone

__all__ = [
    "LooEvaluator", "MeanLooEvaluator", "TrainState", "epoch_seed", "load_optimizer_state", "load_resume_state",
    "read_train_state", "restore_autograd_tensors", "save_optimizer_state", "save_resume_state", "seed_everything",
    "set_bn_eval", "split_backbone", "split_identities", "train_mode",
]


# ----------------------------------------------------------------------------- reproducibility
def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (DataLoader workers derive theirs
    from torch's, so their augmentations follow too)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int) -> int:
    """A seed for one epoch, so that each epoch's randomness depends only on (seed, epoch): a
    resumed run replays exactly what an uninterrupted one would, with no RNG state to save."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


# ----------------------------------------------------------------------------- what trains
def set_bn_eval(model: nn.Module) -> int:
    """Put every BatchNorm layer in eval mode (running statistics used and not updated), as the
    reference does: metric-learning batches of P x K images are too small and too correlated for
    good batch statistics. Returns how many layers were switched."""
    count = 0
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()
            count += 1
    return count


def train_mode(model: nn.Module) -> nn.Module:
    """``model.train()`` then :func:`set_bn_eval`; call at every epoch start (evaluation in
    between switches the whole model to eval mode)."""
    model.train()
    set_bn_eval(model)
    return model


def split_backbone(backbone: Backbone, trainable_blocks: int) -> tuple[list[nn.Module], list[nn.Module]]:
    """The backbone's modules in forward order (:meth:`Backbone.stages`), cut into (frozen
    prefix, trainable tail): the tail is the last ``trainable_blocks`` stages plus the head;
    -1 makes everything trainable, 0 only the head."""
    stem, stages, head = backbone.stages()
    if trainable_blocks == -1:
        return [], stem + stages + head
    if trainable_blocks > len(stages):
        raise ValueError(f"trainable_blocks={trainable_blocks} but {backbone.name} has {len(stages)} "
                         f"stages; use -1 to train everything")
    cut = len(stages) - trainable_blocks
    return stem + stages[:cut], stages[cut:] + head


# ----------------------------------------------------------------------------- optimizer state
def _param_names(model: nn.Module) -> dict[int, str]:
    return {id(p): name for name, p in model.named_parameters()}


def save_optimizer_state(optimizer: torch.optim.Optimizer, model: nn.Module, folder: str | Path) -> None:
    """Write ``optimizer.safetensors`` (tensor state such as momentum buffers, keyed
    ``"<parameter name>/<state key>"``) and ``optimizer.json`` (param groups by parameter name,
    non-tensor state). Keying by name rather than position means a resumed run refuses state
    that belongs to other parameters instead of silently mixing them up."""
    from safetensors.torch import save

    folder = Path(folder)
    names = _param_names(model)
    state = optimizer.state_dict()
    ordered = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, entries in state["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{ordered[index]}/{key}"] = value.detach().cpu().contiguous()
            else:  # e.g. a None momentum buffer; must be JSON-serialisable
                scalars.setdefault(ordered[index], {})[key] = value
    groups = [{**{k: v for k, v in group.items() if k != "params"},
               "params": [ordered[i] for i in group["params"]]} for group in state["param_groups"]]
    atomic_write_bytes(folder / "optimizer.safetensors", save(tensors, metadata={"format": "pt"}))
    atomic_write_json(folder / "optimizer.json", {"type": type(optimizer).__name__,
                                                  "param_groups": groups, "scalars": scalars})


def load_optimizer_state(optimizer: torch.optim.Optimizer, model: nn.Module, folder: str | Path) -> None:
    """Restore what :func:`save_optimizer_state` wrote into an optimizer built over the same
    parameters (same names, same group order)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    meta = json.loads((folder / "optimizer.json").read_text())
    if meta["type"] != type(optimizer).__name__:
        raise ValueError(f"{folder}: optimizer state is for {meta['type']}, not {type(optimizer).__name__}")
    names = _param_names(model)
    current = [[names[id(p)] for p in group["params"]] for group in optimizer.param_groups]
    saved = [group["params"] for group in meta["param_groups"]]
    if current != saved:
        raise ValueError(f"{folder}: optimizer state is for other parameters (e.g. a different "
                         f"trainable_blocks); saved {sum(map(len, saved))}, now {sum(map(len, current))}")
    index_of = {name: i for i, name in enumerate(n for group in current for n in group)}
    state: dict[int, dict[str, Any]] = {}
    for key, tensor in load_file(str(folder / "optimizer.safetensors")).items():
        name, _, entry = key.rpartition("/")
        state.setdefault(index_of[name], {})[entry] = tensor
    for name, entries in meta["scalars"].items():
        state.setdefault(index_of[name], {}).update(entries)
    groups = [{**group, "params": [index_of[n] for n in group["params"]]} for group in meta["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


# ----------------------------------------------------------------------------- resumable state
@dataclass
class TrainState:
    """The loop's counters, saved as ``train_state.json`` after every epoch.

    epoch: completed epochs (the next one to run is ``epoch``, 0-based).
    best_metric / best_epoch: the best validation score so far and its epoch (0 = the initial
    model, before any training), None / -1 before the first validation.
    scheduler: the lr schedule's description and current lr (the lr itself is a pure function
    of the epoch, see GlobalTrainConfig.lr_at). seconds / images: training totals across resumptions.
    """

    epoch: int = 0
    seed: int = 0
    best_metric: float | None = None
    best_epoch: int = -1
    scheduler: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    images: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def save_resume_state(folder: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                      state: TrainState, config_json: str) -> Path:
    """Atomically replace ``folder`` with the weights, optimizer state, counters and config."""
    from safetensors.torch import save

    weights = {name: t.detach().cpu().contiguous() for name, t in model.state_dict().items()}

    def write(staging: Path) -> None:
        atomic_write_bytes(staging / "model.safetensors", save(weights, metadata={"format": "pt"}))
        save_optimizer_state(optimizer, model, staging)
        atomic_write_json(staging / "train_state.json", asdict(state))
        atomic_write_text(staging / "train_config.json", config_json + "\n")

    return write_dir_atomically(folder, write)


def read_train_state(folder: str | Path) -> TrainState | None:
    """The counters of a resume folder, or None if there is none (after repairing a swap that
    an interruption cut short)."""
    folder = recover_dir(folder)
    path = folder / "train_state.json"
    return TrainState(**json.loads(path.read_text())) if path.is_file() else None


def load_resume_state(folder: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> TrainState:
    """Load weights and optimizer state from a resume folder into ``model`` and ``optimizer``."""
    from safetensors.torch import load_file

    folder = Path(folder)
    state = read_train_state(folder)
    if state is None:
        raise FileNotFoundError(f"no resumable state in {folder}")
    model.load_state_dict(load_file(str(folder / "model.safetensors")), strict=True)
    load_optimizer_state(optimizer, model, folder)
    return state


# ----------------------------------------------------------------------------- validation
def split_identities(image_set: ImageSet, val_fraction: float, seed: int) -> tuple[ImageSet, ImageSet]:
    """Hold out ``val_fraction`` of the identities (all their images) for model selection.

    Deterministic: identities are sorted, then permuted by ``seed``. At least one identity goes
    to each side; record order is kept within each side. Returns (train, val).
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    identities = sorted({i for i in image_set.identities if i != ""})
    if len(identities) < 2:
        raise ValueError(f"{image_set.name}: need at least 2 identities to hold some out, got {len(identities)}")
    n_val = min(len(identities) - 1, max(1, round(val_fraction * len(identities))))
    order = np.random.default_rng(seed).permutation(len(identities))
    val_ids = {identities[i] for i in order[:n_val]}
    train = image_set.filter(lambda r: r.identity != "" and r.identity not in val_ids, f"{image_set.name}:train-split")
    val = image_set.filter(lambda r: r.identity in val_ids, f"{image_set.name}:val-split")
    return train, val


class LooEvaluator:
    """Leave-one-out global retrieval on a validation ImageSet: each image searches all the
    others. ``evaluator(model)`` returns the metrics dict of waldo.eval (recall@k, map, ...);
    it leaves the model in eval mode (call :func:`train_mode` before training again)."""

    def __init__(self, image_set: ImageSet, transform: Callable, *, batch_size: int = 32,
                 num_workers: int | None = None, progress: bool = False) -> None:
        if len(image_set) < 2:
            raise ValueError(f"validation set {image_set.name!r} needs at least 2 images")
        empty = ImageSet([], image_set.root, f"{image_set.name}:empty")
        self.protocol = Protocol("validation", empty, image_set, image_set, True,
                                 f"leave-one-out over {image_set.name}")
        self.transform = transform
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.progress = progress

    def __call__(self, model: nn.Module) -> dict[str, float]:
        from waldo.eval.evaluate import evaluate_descriptors
        from waldo.models.extract import extract_descriptors

        extracted = extract_descriptors(model, self.protocol.gallery.paths, self.transform,
                                        batch_size=self.batch_size, num_workers=self.num_workers,
                                        progress=self.progress, description="validation")
        restore_autograd_tensors(model)
        return dict(evaluate_descriptors(self.protocol, extracted, extracted).metrics)


class MeanLooEvaluator:
    """Leave-one-out validation on several sets at once (one per training collection), each searched
    on its own, so a big collection does not outvote a small one: every metric is the plain mean
    over the sets, and ``per_set_map`` keeps each set's mAP."""

    def __init__(self, evaluators: dict[str, LooEvaluator]) -> None:
        if not evaluators:
            raise ValueError("MeanLooEvaluator needs at least one validation set")
        self.evaluators = evaluators
        self.progress = any(evaluator.progress for evaluator in evaluators.values())

    def __call__(self, model: nn.Module) -> dict:
        runs = {name: evaluator(model) for name, evaluator in self.evaluators.items()}
        shared = set.intersection(*(set(k for k, v in run.items() if isinstance(v, (int, float)))
                                    for run in runs.values()))
        out: dict = {key: sum(float(run[key]) for run in runs.values()) / len(runs) for key in sorted(shared)}
        out["per_set_map"] = {name: float(run["map"]) for name, run in runs.items()}
        return out


def restore_autograd_tensors(model: nn.Module) -> int:
    """Replace parameters and buffers that became inference tensors by normal copies.

    extract_descriptors converts the model to channels_last inside ``torch.inference_mode()``;
    any tensor it re-lays out becomes an inference tensor, which autograd refuses to save
    for backward ("Inference tensors cannot be saved for backward") at the next training
    step. The Parameter objects are kept, so optimizer state stays attached. Returns how many
    tensors were replaced."""
    count = 0
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.is_inference():
                tensor.data = tensor.data.clone()
                count += 1
    return count
