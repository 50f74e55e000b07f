"""Training configs as dataclasses with a strict JSON round-trip.

Every hyper-parameter of a training run lives in one config object, saved as JSON next to the
checkpoints, so a result can always be traced to the exact settings that produced it (the
reference system injected ~20 arguments through sacred and recorded none of them beside the
weights). Loading is strict: an unknown key is an error, because a misspelt ``"learning_rate"``
that is silently ignored costs a whole run. Keys starting with ``_`` are comments (JSON has no
comment syntax) and are skipped.
"""

from __future__ import annotations

import json
import types
import typing
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, TypeVar

__all__ = ["GlobalTrainConfig", "TrainConfig", "config_from_dict", "load_config", "save_config"]

C = TypeVar("C", bound="TrainConfig")


@dataclass
class TrainConfig:
    """Base of every training config: JSON round-trip and validation hooks."""

    def validate(self) -> None:
        """Raise ``ValueError`` on inconsistent settings (subclasses extend this)."""

    def to_dict(self) -> dict[str, Any]:
        # Tuples become lists so that the dict equals its JSON round-trip.
        return json.loads(json.dumps(asdict(self)))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def diff(self, other: TrainConfig) -> dict[str, tuple[Any, Any]]:
        """``{key: (self value, other value)}`` for every differing field."""
        mine, theirs = self.to_dict(), other.to_dict()
        return {k: (mine.get(k), theirs.get(k)) for k in sorted(set(mine) | set(theirs))
                if mine.get(k) != theirs.get(k)}


def _coerce(name: str, annotation: Any, value: Any) -> Any:
    """Check ``value`` against a field's type; JSON lists become tuples for tuple fields and
    JSON integers are accepted for float fields. Anything else mismatched is an error."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(annotation):
            if option is type(None) and value is None:
                return None
            try:
                return _coerce(name, option, value)
            except ValueError:
                continue
        raise ValueError(f"config key {name!r}: {value!r} does not match {annotation}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"config key {name!r}: expected a list, got {value!r}")
        item_type = typing.get_args(annotation)[0]
        return tuple(_coerce(name, item_type, v) for v in value)
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation in (int, float, str, bool):
        if type(value) is not annotation:
            raise ValueError(f"config key {name!r}: expected {annotation.__name__}, got {value!r}")
        return value
    return value


def config_from_dict(cls: type[C], data: dict[str, Any]) -> C:
    """Build ``cls`` from a dict, refusing unknown keys (``_``-prefixed keys are comments)."""
    if not isinstance(data, dict):
        # ValueError, not TypeError: the CLI reports ValueErrors as usage errors.
        raise ValueError(f"a {cls.__name__} must be a JSON object, got {type(data).__name__}")  # noqa: TRY004
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    settings = {k: v for k, v in data.items() if not k.startswith("_")}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys {unknown}; known keys: {sorted(known)}")
    config = cls(**{k: _coerce(k, hints[k], v) for k, v in settings.items()})
    config.validate()
    return config


def load_config(path: str | Path, cls: type[C]) -> C:
    """Read a JSON config file into ``cls`` (strict; see :func:`config_from_dict`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error
    try:
        return config_from_dict(cls, data)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from error


def save_config(config: TrainConfig, path: str | Path) -> Path:
    """Write ``config`` as sorted, indented JSON (atomically: see waldo.train.common)."""
    from waldo.train.common import atomic_write_text

    path = Path(path)
    atomic_write_text(path, config.to_json() + "\n")
    return path


@dataclass
class GlobalTrainConfig(TrainConfig):
    """Training of the global descriptor (backbone tail + global projection).

    Defaults are the reference's SOP recipe (see docs: ResNet-50 aside); the CPU preset in
    ``configs/global-cpu.json`` changes what a 2-core machine cannot afford.
    """

    # model
    backbone: str = "efficientnet_lite0"
    dim: int = 128
    projection_init: str = "pca-whiten"  # untrained projection to start from (pca | pca-whiten | random)
    max_fit_images: int = 1000  # training images used to fit that projection
    trainable_blocks: int = -1  # last N backbone stages (+ head) train; -1 = all, 0 = head only
    refit_local_projection: bool = True  # refit the (untrained) local 1x1 projection by PCA at the end
    # images
    image_size: int = 224  # RandomResizedCrop side during training
    eval_image_size: int = 224  # test-time size, for validation and the saved model
    transform: str = "resize256-crop224"  # test-time preset, for validation and the saved model
    # loss
    loss: str = "softmax-contrastive"  # or "margin-contrastive"
    temperature: float = 0.05
    pos_margin: float = 0.0
    neg_margin: float = 0.5
    # batches: P identities x K images; an epoch is `sampler_passes` passes of the PK sampler
    p: int = 400
    k: int = 2
    sampler_passes: int = 1
    # optimiser: SGD with step decay at fractions of the epochs
    epochs: int = 100
    lr: float = 1e-3
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 4e-4
    milestones: tuple[float, ...] = (0.6, 0.8)
    gamma: float = 0.1
    # model selection on held-out training identities (never the protocol's test images)
    val_fraction: float = 0.2
    eval_every: int = 1
    eval_batch_size: int = 32
    # runtime
    seed: int = 0
    num_workers: int = 2
    threads: int = 0  # torch intra-op threads; 0 = torch's default

    def validate(self) -> None:
        from waldo.models.untrained import PROJECTIONS
        from waldo.train.losses import LOSSES

        checks = [
            (self.dim >= 1, f"dim must be positive, got {self.dim}"),
            (self.projection_init in PROJECTIONS and self.projection_init != "identity",
             f"projection_init must be pca, pca-whiten or random, got {self.projection_init!r}"),
            (self.trainable_blocks >= -1, f"trainable_blocks must be >= -1, got {self.trainable_blocks}"),
            (self.image_size >= 32 and self.eval_image_size >= 32, "image sizes must be >= 32"),
            (self.loss in LOSSES, f"unknown loss {self.loss!r}; known: {LOSSES.names()}"),
            (self.temperature > 0, f"temperature must be positive, got {self.temperature}"),
            (self.p >= 1 and self.k >= 2, f"need p >= 1 and k >= 2, got p={self.p}, k={self.k}"),
            (self.sampler_passes >= 1, f"sampler_passes must be >= 1, got {self.sampler_passes}"),
            (self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (self.lr > 0 and 0 <= self.momentum < 1 and self.weight_decay >= 0,
             "need lr > 0, 0 <= momentum < 1, weight_decay >= 0"),
            (not self.nesterov or self.momentum > 0, "nesterov needs momentum > 0"),
            (all(0 < m <= 1 for m in self.milestones), f"milestones are fractions in (0, 1], got {self.milestones}"),
            (list(self.milestones) == sorted(self.milestones), "milestones must be increasing"),
            (0 < self.gamma <= 1, f"gamma must be in (0, 1], got {self.gamma}"),
            (0 < self.val_fraction < 1, f"val_fraction must be in (0, 1), got {self.val_fraction}"),
            (self.eval_every >= 1, f"eval_every must be >= 1, got {self.eval_every}"),
            (self.num_workers >= 0 and self.threads >= 0, "num_workers and threads must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def milestone_epochs(self) -> list[int]:
        """Epoch indices (0-based) from which the lr is multiplied by another ``gamma``:
        fractions (0.6, 0.8) of 100 epochs give [60, 80], as in the reference."""
        return [round(m * self.epochs) for m in self.milestones]

    def lr_at(self, epoch: int) -> float:
        """The learning rate of 0-based ``epoch`` (a pure function, so resuming needs no
        scheduler object: the lr of any epoch is recomputed from the config)."""
        passed = sum(1 for m in self.milestone_epochs() if epoch >= m)
        return self.lr * self.gamma ** passed

