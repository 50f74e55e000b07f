"""Train the Reranking Transformer: BCE on (anchor, positive) = 1 and (anchor, negative) = 0.

Every training image is an anchor once per epoch; its positive is a random other image of its
identity, its negative a random different-identity image from its global top-k (mined with the
init model and cached, see waldo.train.mining; when the whole top-k shares the anchor's
identity, a random different-identity image is used and counted as ``negative_fallbacks``).

Modes (see RRTTrainConfig): ``frozen`` trains the local projection and the RRT on cached final
feature maps; ``finetune`` starts from a frozen checkpoint and also trains the backbone tail and
the global head, adding ``global_loss_weight`` x the softmax-contrastive loss on the batch's
global descriptors (anchors, positives and negatives with their identities), so the one model
keeps serving global search. Negatives keep coming from the mined (init model's) top-k.

Output folder (same layout as the global trainer's)::

    train_config.json  the run's RRTTrainConfig (a rerun must match it)
    best/              reranker folder (model + rrt.json/rrt.safetensors) + metrics.json
    last/              reranker folder of the last completed epoch
    state/             resume state (waldo.train.common): weights, AdamW buffers, counters
    log.jsonl          one JSON line per epoch: losses, lr, pairs/s, validation
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from waldo.data.datasets import ImageSet
from waldo.data.transforms import get_transform
from waldo.models.checkpoint import ModelConfig, load_model, model_hash
from waldo.models.descriptor import DescriptorModel
from waldo.rerank.rrt import RerankingTransformer
from waldo.rerank.rrt_checkpoint import has_rrt, load_rrt, save_reranker
from waldo.paths import default_cache_root
from waldo.train.common import (
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
from waldo.train.global_model import split_backbone
from waldo.train.losses import SoftmaxContrastiveLoss
from waldo.train.mining import mine_neighbours
from waldo.train.rrt_config import RRTTrainConfig
from waldo.train.rrt_features import FeatureSource, OnlineImages, cache_features
from waldo.train.rrt_validation import RRTValidator, describe_rows, record_fusion_weight, tail_project
from waldo.train.triplets import TripletSampler

__all__ = ["RerankerBundle", "train_reranker", "train_step"]


class RerankerBundle(nn.Module):
    """The descriptor model and its RRT as one module: one state dict and one set of parameter
    names for the optimizer state, so a resumed run restores both together."""

    def __init__(self, descriptor: DescriptorModel, rrt: RerankingTransformer) -> None:
        super().__init__()
        self.descriptor = descriptor
        self.rrt = rrt


def train_step(bundle: RerankerBundle, tail: Sequence[nn.Module], optimizer: torch.optim.Optimizer,
               features: torch.Tensor, labels: torch.Tensor, *, global_loss: nn.Module | None = None,
               global_weight: float = 0.0, grad_clip: float = 0.0) -> dict[str, float]:
    """One AdamW step on B triplets.

    features (3B, C, h, w) float32 tail inputs, ordered anchors, positives, negatives; labels
    (3B,) int64 identities (used by the global loss only). Pairs (a, p) are targets 1, (a, n) 0.
    Returns {"loss", "bce", "global"} before the step.
    """
    batch = features.shape[0] // 3
    if features.shape[0] != 3 * batch or batch == 0:
        raise ValueError(f"features must hold 3B tail inputs (anchors, positives, negatives), got {features.shape[0]}")
    optimizer.zero_grad(set_to_none=True)
    out = tail_project(bundle.descriptor, tail, features)
    anchors, positives, negatives = out.local_desc.split(batch)
    globals_ = {}
    if bundle.rrt.config.use_global_tokens:
        global_a, global_p, global_n = out.global_desc.split(batch)
        globals_ = {"query_global": torch.cat([global_a, global_a]), "cand_global": torch.cat([global_p, global_n])}
    logits = bundle.rrt(torch.cat([anchors, anchors]), torch.cat([positives, negatives]), grid=out.grid, **globals_)
    targets = torch.cat([torch.ones(batch), torch.zeros(batch)])
    bce = F.binary_cross_entropy_with_logits(logits, targets)
    loss, global_value = bce, 0.0
    if global_loss is not None and global_weight > 0:
        global_term = global_loss(out.global_desc, labels)
        loss = bce + global_weight * global_term
        global_value = float(global_term.detach())
    loss.backward()
    if grad_clip > 0:
        nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], grad_clip)
    optimizer.step()
    return {"loss": float(loss.detach()), "bce": float(bce.detach()), "global": global_value}


def _trainable(bundle: RerankerBundle, tail: Sequence[nn.Module], mode: str) -> list[nn.Parameter]:
    """Frozen: local projection + RRT. Finetune: + backbone tail + global projection."""
    bundle.requires_grad_(False)
    modules = [bundle.descriptor.local_proj, bundle.rrt]
    if mode == "finetune":
        modules += [*tail, bundle.descriptor.global_proj]
    for module in modules:
        module.requires_grad_(True)
    return [p for p in bundle.parameters() if p.requires_grad]


def _save(target: Path, bundle: RerankerBundle, model_config: ModelConfig, grid: tuple[int, int], training: dict,
          config: RRTTrainConfig, metrics: dict | None) -> None:
    def write(staging: Path) -> None:
        save_reranker(staging, bundle.descriptor, model_config, bundle.rrt, grid=grid, training=training)
        atomic_write_text(staging / "train_config.json", config.to_json() + "\n")
        if metrics is not None:
            atomic_write_json(staging / "metrics.json", metrics)

    write_dir_atomically(target, write)


def _log(out: Path, record: dict, keep_below: int) -> None:
    """Append to log.jsonl, first dropping lines of epochs >= keep_below (an interrupted run's)."""
    path = out / "log.jsonl"
    lines = [line for line in (path.read_text().splitlines() if path.is_file() else [])
             if line.strip() and json.loads(line)["epoch"] < keep_below]
    atomic_write_text(path, "".join(f"{line}\n" for line in [*lines, json.dumps(record)]))


def _check_config(out: Path, config: RRTTrainConfig) -> None:
    path = out / "train_config.json"
    if path.is_file():
        from waldo.train.config import load_config

        differences = load_config(path, RRTTrainConfig).diff(config)
        if differences:
            raise ValueError(f"{out} holds a run with another config ({differences}); resume with the same "
                             f"config or choose a new --out")
    else:
        atomic_write_text(path, config.to_json() + "\n")


def train_reranker(config: RRTTrainConfig, images: ImageSet, init_dir: str | Path, out_dir: str | Path, *,
                   cache_root: str | Path | None = None, progress: bool = True, stop_after: int | None = None,
                   source_name: str = "") -> Path:
    """Train (or resume) a reranker on ``images`` (a protocol's *training* images), starting
    from the model folder ``init_dir`` (a frozen reranker folder for ``finetune``: its RRT is
    loaded too). Rerunning with the same ``out_dir`` resumes after the last completed epoch.
    Returns ``out_dir / "best"``, whose rrt.json holds the fusion weight chosen on validation."""
    config.validate()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _check_config(out, config)
    if config.threads:
        torch.set_num_threads(config.threads)
    seed_everything(config.seed)
    cache_root = Path(cache_root or default_cache_root())
    model, init_config = load_model(init_dir)
    init_hash = model_hash(model)
    rrt_config = config.rrt_config()
    if rrt_config.d_model != model.dim:
        raise ValueError(f"the RRT's d_model ({rrt_config.d_model}) must equal the model's descriptor dim ({model.dim})")
    if config.mode == "finetune" and has_rrt(init_dir):
        rrt, _ = load_rrt(init_dir)
        if rrt.config != rrt_config:
            raise ValueError(f"{init_dir}/rrt.json differs from the config's rrt settings")
    else:
        if config.mode == "finetune":
            tqdm.write(f"warning: {init_dir} has no rrt.json; the RRT starts from scratch")
        torch.manual_seed(config.seed)
        rrt = RerankingTransformer(rrt_config)
    bundle = RerankerBundle(model, rrt)
    transform = get_transform(config.transform or init_config.transform, init_config.image_size)

    # Data: features once (frozen prefix), neighbours once (init model), the identity split.
    paths = images.paths
    labels = images.identity_codes()
    prefix, tail = (None, []) if config.mode == "frozen" else split_backbone(model.backbone, config.trainable_blocks)
    source: FeatureSource
    if prefix is not None and not prefix:  # the whole backbone trains: nothing to cache
        source = OnlineImages(model.backbone, paths, transform, n_views=config.views)
    else:
        source = cache_features(model.backbone, prefix, paths, transform, n_views=config.views, seed=config.seed,
                                cache_root=cache_root, batch_size=config.batch_size,
                                num_workers=config.num_workers, progress=progress)
    _, val_set = split_identities(images, config.val_fraction, config.seed)
    val_ids = set(val_set.identities)
    is_val = np.array([i in val_ids for i in images.identities])
    usable = source.ok & (labels >= 0)
    # Before any resume state is loaded, so the descriptors are the init model's (the cache key).
    mined = mine_neighbours(model, paths, transform=transform.name, image_size=transform.image_size,
                            k=config.negatives_top_k, cache_root=cache_root,
                            global_desc=lambda: describe_rows(model, tail, source, np.arange(len(paths)))[0])
    sampler = TripletSampler(labels, usable & ~is_val, mined.indices, seed=config.seed)
    val_rows = np.flatnonzero(usable & is_val)
    validator = RRTValidator(images.subset(val_rows, f"{images.name}:val-split"), val_rows,
                             max_queries=config.val_max_queries, seed=config.seed)

    params = _trainable(bundle, tail, config.mode)
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    global_loss = SoftmaxContrastiveLoss(config.temperature) if config.mode == "finetune" else None
    grid = (init_config.image_size // 32,) * 2
    saved_config = ModelConfig(**asdict(init_config))
    saved_config.extra = {**init_config.extra, "rrt": {"mode": config.mode, "init_model_hash": init_hash,
                                                        "trained_on": source_name or images.name}}
    if config.mode == "finetune":
        saved_config.projection = f"trained:rrt-finetune:{source_name or images.name}"
    training = {"mode": config.mode, "init_model_hash": init_hash, "trained_on": source_name or images.name}
    state = read_train_state(out / "state")
    if state is not None:
        if state.extra.get("init_model_hash") != init_hash:
            raise ValueError(f"{out} was started from another init model; pass the same --init")
        load_resume_state(out / "state", bundle, optimizer)
    else:
        state = TrainState(seed=config.seed, extra={
            "init_model_hash": init_hash, "mined": mined.folder.name if mined.folder else "",
            "n_train_anchors": len(sampler.anchors), "n_val": len(val_rows),
            "val_identities": sorted(val_ids)})
        if config.mode == "finetune" and has_rrt(init_dir):  # the frozen start is the first candidate
            val = validator(bundle.descriptor, tail, bundle.rrt, source, config.val_top_k).metrics
            state.best_metric, state.best_epoch = val["rrt"][config.select_metric], 0
            _save(out / "best", bundle, saved_config, grid, {**training, "epoch": 0}, config, {"epoch": 0, "val": val})
            save_resume_state(out / "state", bundle, optimizer, state, config.to_json())
            _log(out, {"epoch": 0, "val": val}, keep_below=0)
    first_epoch = state.epoch
    for epoch in range(first_epoch, config.epochs):
        if stop_after is not None and epoch - first_epoch >= stop_after:
            break
        lr = config.lr_at(epoch)
        train_mode(bundle)
        totals, pairs, fallbacks, start = {"loss": 0.0, "bce": 0.0, "global": 0.0}, 0, 0, time.perf_counter()
        n_batches = math.ceil(len(sampler.anchors) / config.batch_triplets)
        bar = tqdm(sampler.epoch(epoch, config.batch_triplets), total=n_batches, unit="batch",
                   desc=f"epoch {epoch + 1}/{config.epochs}", disable=not progress, leave=False)
        for step, (anchors, positives, negatives, fell_back) in enumerate(bar):
            for group in optimizer.param_groups:  # pure function of (epoch, step): nothing to resume
                group["lr"] = config.lr_at(epoch, epoch * n_batches + step)
            rows = np.concatenate([anchors, positives, negatives])
            views = np.random.default_rng([config.seed, epoch, step]).integers(source.n_views, size=len(rows))
            features = source.get(rows, views, seed=epoch_seed(config.seed, epoch) + step)
            parts = train_step(bundle, tail, optimizer, features, torch.from_numpy(labels[rows]),
                               global_loss=global_loss, global_weight=config.global_loss_weight,
                               grad_clip=config.grad_clip)
            for key in totals:
                totals[key] += parts[key] * len(anchors)
            pairs += 2 * len(anchors)
            fallbacks += fell_back
            bar.set_postfix(loss=f"{totals['loss'] / (pairs / 2):.4f}",
                            pairs_s=f"{pairs / (time.perf_counter() - start):.1f}")
        bar.close()
        seconds = time.perf_counter() - start
        means = {key: value / max(1, pairs / 2) for key, value in totals.items()}
        if not math.isfinite(means["loss"]):
            raise RuntimeError(f"epoch {epoch + 1}: loss is {means['loss']}; lower the lr")
        record = {"epoch": epoch + 1, "lr": lr, **means, "pairs": pairs, "pairs_per_s": pairs / seconds,
                  "seconds": seconds, "negative_fallbacks": fallbacks}
        state.epoch, state.seconds, state.images = epoch + 1, state.seconds + seconds, state.images + 3 * pairs // 2
        state.scheduler = {"kind": "multistep", "milestone_epochs": config.milestone_epochs(),
                           "gamma": config.gamma, "lr": lr}
        if (epoch + 1) % config.eval_every == 0 or epoch + 1 == config.epochs:
            eval_start = time.perf_counter()
            record["val"] = validator(bundle.descriptor, tail, bundle.rrt, source, config.val_top_k).metrics
            record["eval_seconds"] = time.perf_counter() - eval_start
            score = record["val"]["rrt"][config.select_metric]
            if state.best_metric is None or score > state.best_metric:
                state.best_metric, state.best_epoch = score, epoch + 1
                _save(out / "best", bundle, saved_config, grid, {**training, "epoch": epoch + 1}, config,
                      {"epoch": epoch + 1, "val": record["val"]})
        record["best_epoch"] = state.best_epoch
        save_resume_state(out / "state", bundle, optimizer, state, config.to_json())
        _save(out / "last", bundle, saved_config, grid, {**training, "epoch": epoch + 1}, config, None)
        _log(out, record, keep_below=epoch + 1)
        if progress:
            val = f", val {config.select_metric} {score:.4f}" if "val" in record else ""
            tqdm.write(f"epoch {epoch + 1}/{config.epochs}: loss {means['loss']:.4f}, "
                       f"{pairs / seconds:.1f} pairs/s{val}")
    if state.epoch == config.epochs and not state.extra.get("fusion_weight_chosen"):
        record_fusion_weight(out / "best", bool(tail), source, validator, config)
        state.extra["fusion_weight_chosen"] = True
        save_resume_state(out / "state", bundle, optimizer, state, config.to_json())
    return out / "best"
