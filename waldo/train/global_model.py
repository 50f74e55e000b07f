"""Train the global descriptor: softmax-contrastive loss on P x K batches, SGD with step decay.

The model starts from the untrained one (ImageNet backbone + projection fitted by PCA on the
training images), so training refines a good retrieval model rather than building one. Only
the last ``trainable_blocks`` backbone stages (plus its head and the global projection) learn;
everything before them runs under ``torch.no_grad()``, which skips their backward pass, the
part of fine-tuning a 2-core CPU cannot afford. The checkpoint kept is the best by validation
mAP on identities held out of the training split; the protocol's queries and gallery are never
read here.

Output folder::

    train_config.json   the GlobalTrainConfig of the run (a rerun must match it)
    best/               model folder (waldo.models.checkpoint.load_model) + metrics.json + train_config.json
    last/               model folder of the last completed epoch
    state/              resume state: weights, optimizer buffers, counters (waldo.train.common)
    log.jsonl           one JSON line per epoch (0 = the initial model): loss, lr, val metrics, images/s
"""

from __future__ import annotations

import json
import math
import random
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

from waldo.data.images import load_image
from waldo.data.protocols import get_protocol
from waldo.data.samplers import PKSampler
from waldo.data.transforms import get_transform, train_transform
from waldo.models.backbones import Backbone
from waldo.models.checkpoint import ModelConfig, build_model, load_model, save_model
from waldo.models.descriptor import DescriptorModel, Descriptors
from waldo.models.extract import extract_pooled_features
from waldo.models.untrained import untrained_model
from waldo.train.common import (
    LooEvaluator,
    TrainState,
    atomic_write_json,
    atomic_write_text,
    epoch_seed,
    load_resume_state,
    read_train_state,
    save_resume_state,
    seed_everything,
    split_identities,
    train_mode,
    write_dir_atomically,
)
from waldo.train.config import GlobalTrainConfig
from waldo.train.losses import LOSSES

__all__ = ["build_loss", "set_trainable", "split_backbone", "train_global", "train_step"]

Forward = Callable[[torch.Tensor], Descriptors]


# ----------------------------------------------------------------------------- model pieces
def split_backbone(backbone: Backbone, trainable_blocks: int) -> tuple[list[nn.Module], list[nn.Module]]:
    """The backbone's modules in forward order, cut into (frozen prefix, trainable tail).

    Stages are timm's ``blocks[i]`` for EfficientNet-Lite (7) and ``layer1..4`` for ResNet-50;
    the tail is the last ``trainable_blocks`` stages plus the head (Lite's conv_head + bn2);
    -1 makes everything trainable, 0 only the head.
    """
    body = backbone.body
    if hasattr(body, "blocks") and hasattr(body, "conv_head"):  # timm EfficientNet(-Lite)
        stem, stages, head = [body.conv_stem, body.bn1], list(body.blocks), [body.conv_head, body.bn2]
    elif hasattr(body, "layer4"):  # torchvision ResNet
        stem, stages, head = [body.conv1, body.bn1, body.relu, body.maxpool], \
            [body.layer1, body.layer2, body.layer3, body.layer4], []
    else:
        raise ValueError(f"backbone {backbone.name!r}: unknown layout, cannot split it into stages")
    if trainable_blocks == -1:
        return [], stem + stages + head
    if trainable_blocks > len(stages):
        raise ValueError(f"trainable_blocks={trainable_blocks} but {backbone.name} has {len(stages)} "
                         f"stages; use -1 to train everything")
    cut = len(stages) - trainable_blocks
    return stem + stages[:cut], stages[cut:] + head


def set_trainable(model: DescriptorModel, trainable: list[nn.Module]) -> list[tuple[str, nn.Parameter]]:
    """Freeze everything except ``trainable`` modules and the global projection; the local
    projection is untouched by the global loss, so it is frozen too. Returns the trainable
    (name, parameter) pairs in model order (the optimizer's order)."""
    model.requires_grad_(False)
    for module in [*trainable, model.global_proj]:
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


def build_loss(config: GlobalTrainConfig) -> nn.Module:
    if config.loss == "softmax-contrastive":
        return LOSSES.create(config.loss, temperature=config.temperature)
    if config.loss == "margin-contrastive":
        return LOSSES.create(config.loss, pos_margin=config.pos_margin, neg_margin=config.neg_margin)
    return LOSSES.create(config.loss)


def train_step(forward: Forward, loss_fn: nn.Module, optimizer: torch.optim.Optimizer,
               images: torch.Tensor, labels: torch.Tensor) -> float:
    """One SGD step on a batch: images (B, 3, S, S) float32 in [0, 1], labels (B,) int64.
    Returns the batch loss before the step."""
    optimizer.zero_grad(set_to_none=True)
    loss = loss_fn(forward(images).global_desc, labels)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


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


# ----------------------------------------------------------------------------- checkpoints
def _save_model_folder(target: Path, model: DescriptorModel, model_config: ModelConfig,
                       config: GlobalTrainConfig, metrics: dict | None) -> None:
    def write(staging: Path) -> None:
        save_model(model, model_config, staging)
        atomic_write_text(staging / "train_config.json", config.to_json() + "\n")
        if metrics is not None:
            atomic_write_json(staging / "metrics.json", metrics)

    write_dir_atomically(target, write)


def _refit_local_projection(folder: Path, config: GlobalTrainConfig, paths: list[str], progress: bool) -> None:
    """Refit the local 1x1 projection of a saved model by PCA on its own (trained) features:
    the backbone changed, so the initial fit no longer matches. The global projection, and so
    every validation number, is unchanged."""
    model, model_config = load_model(folder)
    sample = random.Random(config.seed).sample(paths, min(len(paths), config.max_fit_images))
    pooled, cells = extract_pooled_features(model, sample, get_transform(config.transform, config.eval_image_size),
                                            local_per_image=8, seed=config.seed, progress=progress)
    trained_global = {k: v.clone() for k, v in model.global_proj.state_dict().items()}
    model.fit_pca(torch.cat([torch.from_numpy(pooled), torch.from_numpy(cells)]).numpy(),
                  whiten=config.projection_init == "pca-whiten")
    model.global_proj.load_state_dict(trained_global)
    model_config.extra["local_projection"] = f"{config.projection_init} refit on {len(sample)} training images"
    metrics = json.loads((folder / "metrics.json").read_text())
    _save_model_folder(folder, model, model_config, config, {**metrics, "local_projection_refit": True})


def _check_config(out: Path, config: GlobalTrainConfig) -> None:
    saved_path = out / "train_config.json"
    if saved_path.is_file():
        from waldo.train.config import load_config

        differences = load_config(saved_path, GlobalTrainConfig).diff(config)
        if differences:
            raise ValueError(f"{out} holds a run with another config ({differences}); resume with the "
                             f"same config or choose a new --out")
    else:
        atomic_write_text(saved_path, config.to_json() + "\n")


def _log(out: Path, record: dict, keep_below: int | None = None) -> None:
    """Append one line to log.jsonl; with ``keep_below``, first drop lines of epochs >= it
    (written by an interrupted run after its last saved state)."""
    path = out / "log.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    if keep_below is not None:
        lines = [line for line in lines if line.strip() and json.loads(line)["epoch"] < keep_below]
    atomic_write_text(path, "".join(f"{line}\n" for line in [*lines, json.dumps(record)]))


# ----------------------------------------------------------------------------- the loop
def train_global(config: GlobalTrainConfig, data_dir: str | Path | None, protocol_name: str,
                 out_dir: str | Path, progress: bool = True, *, stop_after: int | None = None) -> Path:
    """Train (or resume training) a global model on ``protocol_name``'s training images.

    Re-running with the same ``out_dir`` continues from the last completed epoch. ``stop_after``
    ends this call after that many epochs (resumable later). Returns ``out_dir / "best"``.
    """
    config.validate()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _check_config(out, config)
    if config.threads:
        torch.set_num_threads(config.threads)
    seed_everything(config.seed)
    protocol = get_protocol(protocol_name, data_dir)
    train_set, val_set = split_identities(protocol.train, config.val_fraction, config.seed)
    evaluator = LooEvaluator(val_set, get_transform(config.transform, config.eval_image_size),
                             batch_size=config.eval_batch_size, num_workers=config.num_workers, progress=progress)
    state = read_train_state(out / "state")
    if state is None:
        model, model_config = untrained_model(
            config.backbone, dim=config.dim, projection=config.projection_init, fit_paths=train_set.paths,
            fit_source=f"{protocol_name}:train-split", transform=config.transform,
            image_size=config.eval_image_size, max_fit_images=config.max_fit_images, seed=config.seed,
            progress=progress)
    else:
        model_config = ModelConfig.from_dict(state.extra["model_config"])
        with warnings.catch_warnings():  # "random init" warnings: the saved weights load below
            warnings.simplefilter("ignore")
            model = build_model(model_config, pretrained=False)
    # NHWC convolutions are faster on CPU; converting here, outside inference mode, also keeps
    # validation (which converts under inference_mode) from touching the parameters.
    model.to(memory_format=torch.channels_last)
    frozen, tail = split_backbone(model.backbone, config.trainable_blocks)
    named = set_trainable(model, tail)
    optimizer = torch.optim.SGD([p for _, p in named], lr=config.lr, momentum=config.momentum,
                                nesterov=config.nesterov, weight_decay=config.weight_decay)
    if state is not None:
        load_resume_state(out / "state", model, optimizer)
    else:  # epoch 0: the initial model is the first candidate, so training can only improve on it
        metrics = evaluator(model)
        state = TrainState(seed=config.seed, best_metric=metrics["map"], best_epoch=0,
                           extra={"model_config": asdict(model_config), "n_train": len(train_set),
                                  "n_val": len(val_set), "val_identities": sorted(set(val_set.identities))})
        _save_model_folder(out / "best", model, model_config, config, {"epoch": 0, "val": metrics})
        save_resume_state(out / "state", model, optimizer, state, config.to_json())
        _log(out, {"epoch": 0, "val": metrics}, keep_below=0)
    trained_config = ModelConfig(**{**asdict(model_config), "projection": f"trained:{protocol_name}:train-split"})

    labels = train_set.identity_codes().tolist()
    passes = _Passes(PKSampler(labels, config.p, config.k, seed=config.seed), config.sampler_passes)
    dataset = _TrainImages(train_set.paths, labels, train_transform(config.image_size))
    loss_fn = build_loss(config)
    forward = split_forward(model, frozen, tail)
    first_epoch = state.epoch
    for epoch in range(first_epoch, config.epochs):
        if stop_after is not None and epoch - first_epoch >= stop_after:
            break
        seed_everything(epoch_seed(config.seed, epoch))  # replayable after a resume
        lr = config.lr_at(epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        passes.epoch = epoch
        loader = DataLoader(dataset, batch_sampler=passes, num_workers=config.num_workers)
        train_mode(model)
        losses, images, start = [], 0, time.perf_counter()
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{config.epochs}", unit="batch", disable=not progress, leave=False)
        for batch, batch_labels in bar:
            losses.append(train_step(forward, loss_fn, optimizer, batch.contiguous(memory_format=torch.channels_last),
                                     batch_labels))
            images += len(batch)
            bar.set_postfix(loss=f"{sum(losses) / len(losses):.4f}", img_s=f"{images / (time.perf_counter() - start):.1f}")
        bar.close()
        seconds = time.perf_counter() - start
        mean_loss = sum(losses) / max(1, len(losses))
        if not math.isfinite(mean_loss):
            raise RuntimeError(f"epoch {epoch + 1}: loss is {mean_loss}; lower the lr")
        record = {"epoch": epoch + 1, "lr": lr, "loss": mean_loss, "images": images,
                  "images_per_s": images / seconds, "seconds": seconds}
        state.epoch, state.seconds, state.images = epoch + 1, state.seconds + seconds, state.images + images
        state.scheduler = {"kind": "multistep", "milestone_epochs": config.milestone_epochs(),
                           "gamma": config.gamma, "lr": lr}
        if (epoch + 1) % config.eval_every == 0 or epoch + 1 == config.epochs:
            eval_start = time.perf_counter()
            record["val"] = evaluator(model)
            record["eval_seconds"] = time.perf_counter() - eval_start
            if state.best_metric is None or record["val"]["map"] > state.best_metric:
                state.best_metric, state.best_epoch = record["val"]["map"], epoch + 1
                _save_model_folder(out / "best", model, trained_config, config, {"epoch": epoch + 1, "val": record["val"]})
        record["best_epoch"] = state.best_epoch
        save_resume_state(out / "state", model, optimizer, state, config.to_json())
        _save_model_folder(out / "last", model, trained_config, config, None)
        _log(out, record, keep_below=epoch + 1)
        if progress:
            val = f", val mAP {record['val']['map']:.4f}" if "val" in record else ""
            tqdm.write(f"epoch {epoch + 1}/{config.epochs}: loss {mean_loss:.4f}, {images / seconds:.1f} img/s{val}")
    done = state.epoch == config.epochs
    if done and config.refit_local_projection and config.projection_init != "random" \
            and not state.extra.get("local_projection_refit"):
        _refit_local_projection(out / "best", config, train_set.paths, progress)
        state.extra["local_projection_refit"] = True
        save_resume_state(out / "state", model, optimizer, state, config.to_json())
    return out / "best"
