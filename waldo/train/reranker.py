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

The epochs, resume, checkpoints and log are waldo.train.loop's; ``best/`` and ``last/`` are
reranker folders (model + rrt.json/rrt.safetensors).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from waldo.data.datasets import ImageSet
from waldo.data.transforms import get_transform
from waldo.models.checkpoint import ModelConfig, load_model, model_hash, without_match_cells
from waldo.models.descriptor import DescriptorModel
from waldo.paths import default_cache_root
from waldo.rerank.rrt import RerankingTransformer
from waldo.rerank.rrt_checkpoint import has_rrt, load_rrt, save_reranker
from waldo.train.common import TrainState, epoch_seed, split_backbone, split_identities
from waldo.train.config import RRTTrainConfig
from waldo.train.loop import StepResult, Trainer, fit, start_run, write_checkpoint
from waldo.train.losses import SoftmaxContrastiveLoss
from waldo.train.mining import TopKMiner
from waldo.train.rrt_features import FeatureSource, OnlineImages, cache_features
from waldo.train.rrt_validation import RRTValidator, describe_rows, record_fusion_weight, tail_project
from waldo.train.triplets import Triplets, TripletSampler

__all__ = ["RerankerBundle", "RerankerTrainer", "train_reranker", "train_step"]


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


class RerankerTrainer(Trainer):
    """AdamW on batches of mined triplets read from a feature source; validation reranks the
    held-out identities' global top-k (see :class:`RRTValidator`)."""

    unit = "pairs"
    finish_flag = "fusion_weight_chosen"

    def __init__(self, config: RRTTrainConfig, bundle: RerankerBundle, tail: list[nn.Module], source: FeatureSource,
                 labels: np.ndarray, sampler: TripletSampler, validator: RRTValidator, checkpoint: dict) -> None:
        self.config, self.module, self.tail, self.source = config, bundle, tail, source
        self.labels, self.sampler, self.validator, self.checkpoint = labels, sampler, validator, checkpoint
        self.metric = config.select_metric
        self.optimizer = torch.optim.AdamW(_trainable(bundle, tail, config.mode), lr=config.lr,
                                           weight_decay=config.weight_decay)
        self.global_loss = SoftmaxContrastiveLoss(config.temperature) if config.mode == "finetune" else None

    def batches(self, epoch: int) -> Iterator[Triplets]:
        return self.sampler.epoch(epoch, self.config.batch_triplets)

    def batches_per_epoch(self) -> int:
        return -(-len(self.sampler.anchors) // self.config.batch_triplets)

    def step(self, epoch: int, index: int, batch: Triplets) -> StepResult:
        config = self.config
        for group in self.optimizer.param_groups:  # pure function of (epoch, step): nothing to resume
            group["lr"] = config.lr_at(epoch, epoch * self.batches_per_epoch() + index)
        anchors, positives, negatives, fallbacks = batch
        rows = np.concatenate([anchors, positives, negatives])
        views = np.random.default_rng([config.seed, epoch, index]).integers(self.source.n_views, size=len(rows))
        features = self.source.get(rows, views, seed=epoch_seed(config.seed, epoch) + index)
        losses = train_step(self.module, self.tail, self.optimizer, features, torch.from_numpy(self.labels[rows]),
                            global_loss=self.global_loss, global_weight=config.global_loss_weight,
                            grad_clip=config.grad_clip)
        n = len(anchors)
        return StepResult(losses, weight=n, count=2 * n, images=3 * n, counters={"negative_fallbacks": fallbacks})

    def validate(self) -> dict:
        return self.validator(self.module.descriptor, self.tail, self.module.rrt, self.source,
                              self.config.val_top_k).metrics

    def score(self, metrics: dict) -> float:
        return metrics["rrt"][self.config.select_metric]

    def save(self, target: Path, epoch: int, metrics: dict | None) -> None:
        checkpoint = self.checkpoint
        write_checkpoint(target, self.config, metrics, lambda folder: save_reranker(
            folder, self.module.descriptor, checkpoint["model_config"], self.module.rrt, grid=checkpoint["grid"],
            training={**checkpoint["training"], "epoch": epoch}))

    def finish(self, best: Path) -> None:
        record_fusion_weight(best, bool(self.tail), self.source, self.validator, self.config)


def train_reranker(config: RRTTrainConfig, images: ImageSet, init_dir: str | Path, out_dir: str | Path, *,
                   cache_root: str | Path | None = None, progress: bool = True, stop_after: int | None = None,
                   source_name: str = "") -> Path:
    """Train (or resume) a reranker on ``images`` (a protocol's *training* images), starting
    from the model folder ``init_dir`` (a frozen reranker folder for ``finetune``: its RRT is
    loaded too). Rerunning with the same ``out_dir`` resumes after the last completed epoch.
    Returns ``out_dir / "best"``, whose rrt.json holds the fusion weight chosen on validation."""
    out, state = start_run(out_dir, config)
    cache_root = Path(cache_root or default_cache_root())
    model, init_config = without_match_cells(*load_model(init_dir))
    init_hash = model_hash(model)
    rrt_config = config.rrt_config()
    if rrt_config.d_model != model.dim:
        raise ValueError(f"the RRT's d_model ({rrt_config.d_model}) must equal the model's descriptor dim ({model.dim})")
    if model.global_dim != model.dim and rrt_config.use_global_tokens:
        raise ValueError(f"this RRT reads global tokens, which training takes from the model's global descriptor: "
                         f"it must be {model.dim}-d like the locals, not {model.global_dim}-d (use a model with "
                         f"global_dim = dim, or an RRT without global tokens)")
    starts_from_rrt = config.mode == "finetune" and has_rrt(init_dir)
    if starts_from_rrt:
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
    miner = TopKMiner(transform.name, transform.image_size, config.negatives_top_k, cache_root)
    mined = miner(model, paths, global_desc=lambda: describe_rows(model, tail, source, np.arange(len(paths)))[0])
    sampler = TripletSampler(labels, usable & ~is_val, mined.indices, seed=config.seed)
    val_rows = np.flatnonzero(usable & is_val)
    validator = RRTValidator(images.subset(val_rows, f"{images.name}:val-split"), val_rows,
                             max_queries=config.val_max_queries, seed=config.seed)

    trained_on = source_name or images.name
    training = {"mode": config.mode, "init_model_hash": init_hash, "trained_on": trained_on}
    saved_config = ModelConfig(**init_config.model_dump())
    saved_config.extra = {**init_config.extra, "rrt": dict(training)}
    if config.mode == "finetune":
        saved_config.projection = f"trained:rrt-finetune:{trained_on}"
    checkpoint = {"model_config": saved_config, "grid": (init_config.image_size // model.local_stride,) * 2,
                  "training": training}
    trainer = RerankerTrainer(config, bundle, tail, source, labels, sampler, validator, checkpoint)
    trainer.validate_start = starts_from_rrt  # the frozen start is the first candidate
    resume = state is not None
    if state is None:
        state = TrainState(seed=config.seed, extra={
            "init_model_hash": init_hash, "mined": mined.folder.name if mined.folder else "",
            "n_train_anchors": len(sampler.anchors), "n_val": len(val_rows), "val_identities": sorted(val_ids)})
    elif state.extra.get("init_model_hash") != init_hash:
        raise ValueError(f"{out} was started from another init model; pass the same --init")
    return fit(trainer, out, state, resume=resume, progress=progress, stop_after=stop_after)
