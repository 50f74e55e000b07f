"""Train the global descriptor: softmax-contrastive loss on P x K batches, SGD with step decay.

The model starts from the untrained one (ImageNet backbone + projection fitted by PCA on the
training images), so training refines a good retrieval model rather than building one. Only
the last ``trainable_blocks`` backbone stages (plus its head and the global projection) learn;
everything before them runs under ``torch.no_grad()``, which skips their backward pass, the
part of fine-tuning a 2-core CPU cannot afford. The checkpoint kept is the best by validation
mAP on identities held out of the training split; the protocol's queries and gallery are never
read here.

The epochs, resume, checkpoints and log are waldo.train.loop's; ``best/`` and ``last/`` are
model folders (waldo.models.checkpoint.load_model) with the run's train_config.json.
"""

from __future__ import annotations

import json
import random
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from waldo.data.datasets import ImageRecord, ImageSet
from waldo.data.images import load_image
from waldo.data.protocols import get_protocol
from waldo.data.samplers import PKSampler
from waldo.data.transforms import get_transform, train_transform
from waldo.models.checkpoint import ModelConfig, build_model, load_model, save_model, without_match_cells
from waldo.models.descriptor import DescriptorModel, Descriptors
from waldo.models.extract import extract_pooled_features
from waldo.models.untrained import untrained_model
from waldo.train.common import (
    LooEvaluator,
    MeanLooEvaluator,
    TrainState,
    epoch_seed,
    seed_everything,
    split_backbone,
    split_identities,
)
from waldo.train.config import GlobalTrainConfig
from waldo.train.loop import StepResult, Trainer, fit, start_run, write_checkpoint
from waldo.train.losses import LOSSES, MetricLoss

__all__ = ["GlobalTrainer", "WeightAnchor", "set_trainable", "split_forward", "starting_model", "train_global",
           "train_step", "training_split"]

Forward = Callable[[torch.Tensor], Descriptors]


# ----------------------------------------------------------------------------- model pieces
def set_trainable(model: DescriptorModel, trainable: list[nn.Module]) -> list[tuple[str, nn.Parameter]]:
    """Freeze everything except ``trainable`` modules, the pooling (a learnable GeM's p) and the
    global projection; the local projection is untouched by the global loss, so it is frozen
    too. Returns the trainable (name, parameter) pairs in model order (the optimizer's order)."""
    model.requires_grad_(False)
    for module in [*trainable, model.pool, model.global_proj]:
        module.requires_grad_(True)
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def split_forward(model: DescriptorModel, frozen: list[nn.Module], tail: list[nn.Module]) -> Forward:
    """``images (B, 3, H, W) in [0, 1] -> Descriptors`` with the frozen prefix under no_grad.
    Equals ``model(images)``; only the autograd graph differs."""
    def forward(images: torch.Tensor) -> Descriptors:
        x = model.backbone.normalize(images)
        with torch.no_grad():
            for module in frozen:
                x = module(x)
        for module in tail:
            x = module(x)
        return model.project(x)

    return forward


def train_step(forward: Forward, loss_fn: nn.Module, optimizer: torch.optim.Optimizer,
               images: torch.Tensor, labels: torch.Tensor,
               penalty: Callable[[], torch.Tensor] | None = None) -> float:
    """One SGD step on a batch: images (B, 3, S, S) float32 in [0, 1], labels (B,) int64;
    ``penalty`` (e.g. :class:`WeightAnchor`) is added to the loss. Returns the batch's metric
    loss before the step (without the penalty, so runs with and without one compare)."""
    optimizer.zero_grad(set_to_none=True)
    loss = loss_fn(forward(images).global_desc, labels)
    (loss if penalty is None else loss + penalty()).backward()
    optimizer.step()
    return float(loss.detach())


class WeightAnchor:
    """L2-SP (Li, Grandvalet & Davoine 2018), the guard against forgetting: ``weight`` x the
    squared distance of the trained backbone weights from their starting (ImageNet) values.
    Plain weight decay pulls weights towards zero, i.e. away from what ImageNet taught; this
    pulls them back towards it, so a model trained on one catalogue keeps more of what
    generalises to the next. The start values are saved in the run folder
    (``anchor.safetensors``) so a resumed run anchors to the same point."""

    FILE = "anchor.safetensors"

    def __init__(self, model: DescriptorModel, weight: float, start: dict[str, torch.Tensor]) -> None:
        params = dict(model.named_parameters())
        missing = sorted(set(start) - set(params))
        if missing:
            raise ValueError(f"anchor weights name parameters the model lacks: {missing[:3]}")
        self.weight = weight
        self.pairs = [(params[name], tensor.to(params[name].dtype)) for name, tensor in start.items()]

    @classmethod
    def for_run(cls, model: DescriptorModel, weight: float, run: Path, resume: bool) -> WeightAnchor:
        """The run's anchor: the backbone's trainable weights now (a new run), or as saved (a resume)."""
        from safetensors.torch import load_file, save_file

        path = run / cls.FILE
        if resume:
            if not path.exists():
                raise FileNotFoundError(f"{path} is missing: this run cannot resume with anchor_weight > 0")
            return cls(model, weight, load_file(str(path)))
        start = {name: p.detach().clone().contiguous() for name, p in model.backbone.named_parameters(prefix="backbone")
                 if p.requires_grad}
        save_file(start, str(path))
        return cls(model, weight, start)

    def _squared_distance(self) -> torch.Tensor:
        return sum(((p - start) ** 2).sum() for p, start in self.pairs)

    def __call__(self) -> torch.Tensor:
        return self.weight * self._squared_distance()

    def distance(self) -> float:
        """Squared distance from the start (for the log)."""
        with torch.no_grad():
            return float(self._squared_distance())


# ----------------------------------------------------------------------------- data
class _TrainImages(Dataset):
    def __init__(self, paths: list[str], labels: list[int], transform: Callable) -> None:
        self.paths, self.labels, self.transform = paths, labels, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(load_image(self.paths[index])), self.labels[index]


class _Passes(Sampler[list[int]]):
    """``passes`` consecutive PK-sampler shuffles as one epoch (grocery has 33 training
    identities, so one pass is only 2 batches of 16 x 4)."""

    def __init__(self, sampler: PKSampler, passes: int) -> None:
        self.sampler, self.passes, self.epoch = sampler, passes, 0

    def __len__(self) -> int:
        return len(self.sampler) * self.passes

    def __iter__(self) -> Iterator[list[int]]:
        for index in range(self.passes):
            self.sampler.set_epoch(self.epoch * self.passes + index)
            yield from self.sampler


# ----------------------------------------------------------------------------- the trainer
class GlobalTrainer(Trainer):
    """SGD on P x K batches of training images with a metric loss on the global descriptors;
    validation is leave-one-out mAP on the held-out identities."""

    unit = "images"
    metric = "map"

    def __init__(self, config: GlobalTrainConfig, model: DescriptorModel, model_config: ModelConfig,
                 trained_config: ModelConfig, train_set: ImageSet, evaluator: LooEvaluator | MeanLooEvaluator,
                 run: Path, resume: bool = False) -> None:
        self.config, self.module, self.evaluator = config, model, evaluator
        self.model_config, self.trained_config = model_config, trained_config
        self.train_paths = train_set.paths
        frozen, tail = split_backbone(model.backbone, config.trainable_blocks)
        self.optimizer = torch.optim.SGD([p for _, p in set_trainable(model, tail)], lr=config.lr,
                                         momentum=config.momentum, nesterov=config.nesterov,
                                         weight_decay=config.weight_decay)
        self.forward = split_forward(model, frozen, tail)
        self.anchor = (WeightAnchor.for_run(model, config.anchor_weight, run, resume)
                       if config.anchor_weight > 0 else None)
        self.loss_fn: MetricLoss = LOSSES.get(config.loss).from_config(config)
        labels = train_set.identity_codes().tolist()
        self.passes = _Passes(PKSampler(labels, config.p, config.k, seed=config.seed), config.sampler_passes)
        self.dataset = _TrainImages(train_set.paths, labels, train_transform(config.image_size))
        if config.refit_local_projection and config.projection_init != "random":
            self.finish_flag = "local_projection_refit"

    def batches(self, epoch: int) -> DataLoader:
        # The loader itself, not a generator over it: tqdm.auto starts an iterator at once and
        # each start draws a worker base seed from torch's RNG, so wrapping it would shift
        # every augmentation of the epoch.
        seed_everything(epoch_seed(self.config.seed, epoch))  # augmentations replayable after a resume
        self.passes.epoch = epoch
        return DataLoader(self.dataset, batch_sampler=self.passes, num_workers=self.config.num_workers)

    def batches_per_epoch(self) -> int:
        return len(self.passes)

    def step(self, epoch: int, index: int, batch: tuple[torch.Tensor, torch.Tensor]) -> StepResult:
        images, labels = batch
        loss = train_step(self.forward, self.loss_fn, self.optimizer,
                          images.contiguous(memory_format=torch.channels_last), labels, self.anchor)
        metrics = {"loss": loss}
        if self.anchor is not None:
            metrics["anchor_distance"] = self.anchor.distance()
        return StepResult(metrics, weight=1, count=len(images), images=len(images))

    def validate(self) -> dict:
        return self.evaluator(self.module)

    def save(self, target: Path, epoch: int, metrics: dict | None) -> None:
        config = self.model_config if epoch == 0 else self.trained_config
        write_checkpoint(target, self.config, metrics, lambda folder: save_model(self.module, config, folder))

    def finish(self, best: Path) -> None:
        _refit_local_projection(best, self.config, self.train_paths, self.evaluator.progress)


def _refit_local_projection(folder: Path, config: GlobalTrainConfig, paths: list[str], progress: bool) -> None:
    """Refit the local 1x1 projection of a saved model by PCA on its own (trained) features:
    the backbone changed, so the initial fit no longer matches. The global projection, and so
    every validation number, is unchanged."""
    model, model_config = without_match_cells(*load_model(folder))
    sample = random.Random(config.seed).sample(paths, min(len(paths), config.max_fit_images))
    pooled, cells = extract_pooled_features(model, sample, get_transform(config.transform, config.eval_image_size),
                                            local_per_image=8, seed=config.seed, progress=progress)
    trained_global = {k: v.clone() for k, v in model.global_proj.state_dict().items()}
    model.fit_pca(torch.cat([torch.from_numpy(pooled), torch.from_numpy(cells)]).numpy(),
                  whiten=config.projection_init in ("pca-whiten", "views-whiten"))  # views-whiten whitens its locals
    model.global_proj.load_state_dict(trained_global)
    model_config.extra["local_projection"] = f"{config.projection_init} refit on {len(sample)} training images"
    metrics = json.loads((folder / "metrics.json").read_text())
    write_checkpoint(folder, config, {**metrics, "local_projection_refit": True},
                     lambda staging: save_model(model, model_config, staging))


def starting_model(config: GlobalTrainConfig, train_paths: list[str], protocol_name: str,
                   progress: bool = True) -> tuple[DescriptorModel, ModelConfig]:
    """The model a run starts from (epoch 0): the ImageNet backbone with the config's pooling and
    its untrained projection (``projection_init``) fitted on the training split's photos."""
    return untrained_model(
        config.backbone, dim=config.dim, projection=config.projection_init, fit_paths=train_paths,
        fit_source=f"{protocol_name}:train-split", transform=config.transform,
        image_size=config.eval_image_size, max_fit_images=config.max_fit_images, seed=config.seed,
        progress=progress, pooling=config.pooling)


def training_split(protocol_names: Sequence[str], data_dir: str | Path | None, config: GlobalTrainConfig,
                   progress: bool = False) -> tuple[ImageSet, LooEvaluator | MeanLooEvaluator, ImageSet]:
    """The training images and the validation of a run on one or several protocols' training
    splits. Each split holds out ``val_fraction`` of its own identities (the same ones a
    one-protocol run holds out); with several, identities become ``protocol:identity`` so two
    collections never share one, and validation is each held-out set searched on its own, the
    mean of their metrics (MeanLooEvaluator). Returns (train, evaluator, every held-out image)."""
    if not protocol_names:
        raise ValueError("train_global needs at least one protocol")
    if len(set(protocol_names)) != len(protocol_names):
        raise ValueError(f"a protocol is named twice: {', '.join(protocol_names)}")
    if data_dir is not None and len(protocol_names) > 1:
        raise ValueError("a dataset folder (--data) goes with one protocol; several protocols use their shared data")
    transform = get_transform(config.transform, config.eval_image_size)
    trains, vals = [], {}
    for name in protocol_names:
        train, val = split_identities(get_protocol(name, data_dir).train, config.val_fraction, config.seed)
        trains.append(train)
        vals[name] = val
    evaluators = {name: LooEvaluator(val, transform, batch_size=config.eval_batch_size,
                                     num_workers=config.num_workers, progress=progress) for name, val in vals.items()}
    if len(protocol_names) == 1:
        return trains[0], evaluators[protocol_names[0]], vals[protocol_names[0]]
    label = "+".join(protocol_names)

    def pooled(sets: list[ImageSet], suffix: str) -> ImageSet:
        records = [ImageRecord(r.path, f"{name}:{r.identity}", r.attrs)
                   for name, image_set in zip(protocol_names, sets) for r in image_set.records]
        return ImageSet(records, sets[0].root, f"{label}:{suffix}")

    return pooled(trains, "train-split"), MeanLooEvaluator(evaluators), pooled(list(vals.values()), "val-split")


def train_global(config: GlobalTrainConfig, data_dir: str | Path | None, protocol_name: str | Sequence[str],
                 out_dir: str | Path, progress: bool = True, *, stop_after: int | None = None) -> Path:
    """Train (or resume training) a global model on ``protocol_name``'s training images (one
    protocol, or several: their training splits pooled, see :func:`training_split`).

    Re-running with the same ``out_dir`` continues from the last completed epoch. ``stop_after``
    ends this call after that many epochs (resumable later). Returns ``out_dir / "best"``.
    """
    names = [protocol_name] if isinstance(protocol_name, str) else list(protocol_name)
    label = "+".join(names)
    out, state = start_run(out_dir, config)
    train_set, evaluator, val_set = training_split(names, data_dir, config, progress)
    if state is None:
        model, model_config = starting_model(config, train_set.paths, label, progress)
    else:
        model_config = ModelConfig.model_validate(state.extra["model_config"])
        with warnings.catch_warnings():  # "random init" warnings: the saved weights load below
            warnings.simplefilter("ignore")
            model = build_model(model_config, pretrained=False)
    # NHWC convolutions are faster on CPU; converting here, outside inference mode, also keeps
    # validation (which converts under inference_mode) from touching the parameters.
    model.to(memory_format=torch.channels_last)
    trained_config = ModelConfig(**{**model_config.model_dump(), "projection": f"trained:{label}:train-split"})
    resume = state is not None
    trainer = GlobalTrainer(config, model, model_config, trained_config, train_set, evaluator, run=out, resume=resume)
    if state is None:
        state = TrainState(seed=config.seed, extra={
            "model_config": model_config.model_dump(), "n_train": len(train_set), "n_val": len(val_set),
            "val_identities": sorted(set(val_set.identities))})
    return fit(trainer, out, state, resume=resume, progress=progress, stop_after=stop_after)
