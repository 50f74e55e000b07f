"""Training configs as strict pydantic models, saved as JSON beside every run.

Every hyper-parameter of a training run lives in one config object, saved as JSON next to the
checkpoints, so a result can always be traced to the exact settings that produced it (the
reference system injected ~20 arguments through sacred and recorded none of them beside the
weights). Loading is strict: an unknown key or a value of the wrong type is an error, because a
misspelt ``"learning_rate"`` that is silently ignored costs a whole run. Keys starting with
``_`` are comments (JSON has no comment syntax) and are skipped.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, field_validator, model_validator

from waldo.rerank.rrt import RRTConfig

__all__ = ["GlobalTrainConfig", "RRTTrainConfig", "TrainConfig", "load_config"]

C = TypeVar("C", bound="TrainConfig")

# JSON has no tuples: the milestone list is accepted as a list, its items stay strict numbers.
Milestones = Annotated[tuple[StrictFloat, ...], Field(strict=False)]


class TrainConfig(BaseModel):
    """What both trainers share: the lr schedule, model selection and the runtime settings."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    # the backbone's last N stages (+ head) train; -1 = all of it, 0 = the head only
    trainable_blocks: int = Field(-1, ge=-1)
    temperature: float = Field(0.05, gt=0)  # of the softmax-contrastive global loss (the reference's value)
    transform: str = "resize256-crop224"  # test-time preset, for validation and the saved model
    # optimiser: step decay at fractions of the epochs
    epochs: int = Field(100, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(4e-4, ge=0)
    milestones: Milestones = (0.6, 0.8)
    gamma: float = Field(0.1, gt=0, le=1)
    # model selection on held-out training identities (never the protocol's test images)
    val_fraction: float = Field(0.2, gt=0, lt=1)
    eval_every: int = Field(1, ge=1)
    # stop once this many epochs in a row bring no better validation score (None: run every epoch);
    # best/ is the best epoch either way, so stopping only saves the epochs that would not be kept
    # unless a later one improved again
    patience: int | None = Field(None, ge=1)
    # runtime
    seed: int = 0
    num_workers: int = Field(2, ge=0)
    threads: int = Field(0, ge=0)  # torch intra-op threads; 0 = torch's default

    @model_validator(mode="before")
    @classmethod
    def _skip_comments(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {key: value for key, value in data.items() if not key.startswith("_")}
        return data

    @field_validator("milestones")
    @classmethod
    def _check_milestones(cls, milestones: tuple[float, ...]) -> tuple[float, ...]:
        if not all(0 < m <= 1 for m in milestones):
            raise ValueError(f"milestones are fractions in (0, 1], got {milestones}")
        if list(milestones) != sorted(milestones):
            raise ValueError("milestones must be increasing")
        return milestones

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), indent=2, sort_keys=True)

    def milestone_epochs(self) -> list[int]:
        """Epoch indices (0-based) from which the lr is multiplied by another ``gamma``:
        fractions (0.6, 0.8) of 100 epochs give [60, 80], as in the reference."""
        return [round(m * self.epochs) for m in self.milestones]

    def lr_at(self, epoch: int, step: int | None = None) -> float:
        """The learning rate of 0-based ``epoch`` (a pure function, so resuming needs no
        scheduler object: the lr of any epoch is recomputed from the config). ``step``, the
        global optimizer step, matters only to a config with a warmup."""
        return self.lr * self.gamma ** sum(1 for m in self.milestone_epochs() if epoch >= m)


def load_config(path: str | Path, cls: type[C]) -> C:
    """Read a JSON config file into ``cls`` (strict: unknown keys and wrong types are errors)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        return cls.model_validate_json(path.read_text())
    except ValueError as error:  # pydantic's ValidationError is one; the CLI reports it as a usage error
        raise ValueError(f"{path}: {error}") from error


class GlobalTrainConfig(TrainConfig):
    """Training of the global descriptor (backbone tail + global projection).

    Defaults are the reference's SOP recipe (see docs: ResNet-50 aside); the CPU preset in
    ``configs/global-cpu.json`` changes what a 2-core machine cannot afford.
    """

    # model
    backbone: str = "efficientnet_lite0"
    dim: int = Field(128, ge=1)
    # global pooling (waldo.models.pooling): "gem" learns its exponent with the head, "gem:3" fixes it
    pooling: str = "avg"
    # the untrained projection to start from; "views-whiten" is the untrained default (1024-d global
    # descriptor by learned whitening without labels, waldo.models.untrained), so training refines it
    projection_init: Literal["pca", "pca-whiten", "views-whiten", "random"] = "pca-whiten"
    max_fit_images: int = 1000  # training images used to fit that projection
    refit_local_projection: bool = True  # refit the (untrained) local 1x1 projection by PCA at the end
    # images
    image_size: int = Field(224, ge=32)  # RandomResizedCrop side during training
    eval_image_size: int = Field(224, ge=32)  # test-time size, for validation and the saved model
    eval_batch_size: int = 32  # validation extraction
    # loss: a name of waldo.train.losses.LOSSES; each loss reads its own settings below
    loss: str = "softmax-contrastive"
    pos_margin: float = 0.0
    neg_margin: float = 0.5
    # batches: P identities x K images; an epoch is `sampler_passes` passes of the PK sampler
    p: int = Field(400, ge=1)
    k: int = Field(2, ge=2)
    sampler_passes: int = Field(1, ge=1)
    # SGD
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = True
    # guard against forgetting (L2-SP, Li et al. 2018): adds anchor_weight x the squared distance of
    # the trained backbone weights from where they started (ImageNet) to the loss; 0 = off
    anchor_weight: float = Field(0.0, ge=0)

    @field_validator("pooling")
    @classmethod
    def _known_pooling(cls, pooling: str) -> str:
        from waldo.models.pooling import validate_pooling

        return validate_pooling(pooling)

    @field_validator("loss")
    @classmethod
    def _known_loss(cls, loss: str) -> str:
        from waldo.train.losses import LOSSES

        LOSSES.get(loss)
        return loss

    @model_validator(mode="after")
    def _nesterov_needs_momentum(self) -> GlobalTrainConfig:
        if self.nesterov and self.momentum == 0:
            raise ValueError("nesterov needs momentum > 0")
        return self


class RRTTrainConfig(TrainConfig):
    """Every setting of ``waldo train rrt``; saved as ``train_config.json`` beside the run.

    Defaults are the reference's SOP recipe (AdamW, lr 1e-4, weight decay 4e-4, batch 100
    triplets, 100 epochs, milestones at 60% / 80%); ``configs/rrt-*-cpu.json`` change what a
    2-core machine cannot afford (epochs, validation depth) and nothing about the model.

    mode: ``frozen`` trains the local 1x1 projection and the RRT on cached backbone maps (the
    backbone and global head never change, so global search is exactly the init model's);
    ``finetune`` also trains the last ``trainable_blocks`` backbone stages and the global head,
    with BCE + ``global_loss_weight`` x the softmax-contrastive global loss on the same batch so
    that one model keeps serving global search and reranking.
    """

    mode: Literal["frozen", "finetune", "rrt-only"] = "frozen"
    rrt: dict[str, Any] = Field(default_factory=dict)  # RRTConfig overrides; {} = the reference model
    global_loss_weight: float = Field(1.0, ge=0)  # finetune only: weight of the global loss beside the BCE
    # data: cached views per image (view 0 = test transform, the others seeded train augmentations)
    views: int = Field(1, ge=1)
    transform: str = ""  # test-time preset of view 0 and validation; "" = the init model's
    negatives_top_k: int = Field(100, ge=1)  # negatives come from each anchor's global top-k (mined, cached)
    # AdamW
    batch_triplets: int = Field(100, ge=1)
    lr: float = Field(1e-4, gt=0)
    warmup_steps: int = Field(0, ge=0)  # linear lr warmup over the first optimizer steps (0 = none, the reference)
    grad_clip: float = Field(0.0, ge=0)  # max gradient norm; 0 = off (the landmark variant uses 0.1)
    val_top_k: int = Field(20, ge=1)  # rerank depth of the per-epoch validation (the reference used 15)
    val_max_queries: int = Field(0, ge=0)  # 0 = every validation image is a query
    fusion_top_k: int = Field(100, ge=1)  # depth at which the fusion weight is chosen, once, on the best model
    fusion_grid: int = Field(20, ge=1)  # lambda in {0, 1/grid, ..., 1}
    select_metric: Literal["map@100", "map", "recall@1"] = "map@100"
    batch_size: int = Field(32, ge=1)  # feature extraction
    # rrt-only (waldo.train.rrt_online): the RRT alone on a fixed model, pairs from waldo.train.pairs
    online_views: bool = True  # fresh augmented candidate views every step (False: `views` cached views per image)
    real_positive_prob: float = Field(0.5, ge=0, le=1)  # labelled anchors: a real same-identity photo, else a view of itself
    hard_negative_prob: float = Field(0.7, ge=0, le=1)  # a negative from the anchor's mined top-k, else a random one
    hard_negative_k: int = Field(20, ge=1)
    in_batch_negatives: bool = True
    anchors_per_epoch: int = Field(0, ge=0)  # 0 = each source's training images x its weight
    augment: dict[str, Any] = Field(default_factory=dict)  # waldo.data.views.ViewAugment overrides
    # rrt-only, online views: the share of anchors whose pair is swapped (waldo.train.pairs): the
    # positive shows the anchor's middle in other surroundings, the negative another product's
    # middle in the anchor's own surroundings, so matching the surroundings earns nothing (off:
    # it did not help make demo's recipe, docs/results.md "Swapped pairs")
    swap_prob: float = Field(0.0, ge=0, le=1)
    # rrt-only: the residual's scale (one scalar, ~10) learns at lr x this: at the plain lr an Adam
    # step moves it by ~lr, so it barely leaves its start in a short run
    global_skip_lr_scale: float = Field(1.0, gt=0)
    # rrt-only: "bce" scores every pair on its own (the reference); "softmax" is a ranking loss:
    # each anchor's pairs (its positive, its negatives) compete in one softmax, so only their
    # order under one anchor is trained, not where the logits sit
    pair_loss: Literal["bce", "softmax"] = "bce"
    # rrt-only: the seed that draws the held-out identities and the validation queries; None =
    # ``seed``. A second training seed of a recipe sets it to the first run's seed, so both runs
    # hold out (and are chosen on) the same identities and neither trains on the other's validation.
    split_seed: int | None = Field(None, ge=0)

    @model_validator(mode="after")
    def _check_rrt(self) -> RRTTrainConfig:
        rrt = self.rrt_config()  # unknown or inconsistent RRT keys fail here, before any work
        if rrt.global_skip_from == "descriptor" and self.mode != "rrt-only":
            # frozen / finetune train the global head too; their pairs carry only the tokens
            raise ValueError('rrt.global_skip_from="descriptor" needs mode "rrt-only" (a fixed descriptor model)')
        if self.pair_loss != "bce" and self.mode != "rrt-only":
            raise ValueError('pair_loss "softmax" needs mode "rrt-only"')
        if self.global_skip_lr_scale != 1.0 and (self.mode != "rrt-only" or not rrt.global_skip):
            raise ValueError('global_skip_lr_scale needs mode "rrt-only" and rrt.global_skip')
        if self.swap_prob > 0 and (self.mode != "rrt-only" or not self.online_views):
            raise ValueError('swap_prob needs mode "rrt-only" with online_views (swapped views are made per step)')
        if self.split_seed is not None and self.mode != "rrt-only":
            raise ValueError('split_seed needs mode "rrt-only"')
        from waldo.data.views import ViewAugment

        try:
            ViewAugment(**self.augment)
        except TypeError as error:
            raise ValueError(f"augment: {error}") from None
        return self

    @property
    def held_out_seed(self) -> int:
        """The seed of the held-out identities and validation queries (``split_seed``, else ``seed``)."""
        return self.seed if self.split_seed is None else self.split_seed

    def rrt_config(self) -> RRTConfig:
        return RRTConfig.model_validate(dict(self.rrt))

    def lr_at(self, epoch: int, step: int | None = None) -> float:
        lr = super().lr_at(epoch)
        if step is not None and step < self.warmup_steps:
            lr *= (step + 1) / self.warmup_steps
        return lr
