"""The configuration of a reranker (RRT) training run, as a strict JSON dataclass.

Defaults are the reference's SOP recipe (see docs: AdamW, lr 1e-4, weight decay 4e-4, batch 100
triplets, 100 epochs, milestones at 60% / 80%); ``configs/rrt-*-cpu.json`` change what a 2-core
machine cannot afford (epochs, validation depth) and nothing about the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from waldo.rerank.rrt import RRTConfig
from waldo.train.config import TrainConfig

__all__ = ["MODES", "RRTTrainConfig"]

MODES = ("frozen", "finetune")


@dataclass
class RRTTrainConfig(TrainConfig):
    """Every setting of ``waldo train rrt``; saved as ``train_config.json`` beside the run.

    mode: ``frozen`` trains the local 1x1 projection and the RRT on cached backbone maps (the
    backbone and global head never change, so global search is exactly the init model's);
    ``finetune`` also trains the last ``trainable_blocks`` backbone stages and the global head,
    with BCE + ``global_loss_weight`` x the softmax-contrastive global loss on the same batch so
    that one model keeps serving global search and reranking.
    """

    mode: str = "frozen"
    rrt: dict[str, Any] = field(default_factory=dict)  # RRTConfig overrides; {} = the reference model
    # finetune only: last N backbone stages (+ head) train; -1 = the whole backbone (online images)
    trainable_blocks: int = -1
    global_loss_weight: float = 1.0  # finetune only: weight of the global loss beside the BCE
    temperature: float = 0.05  # of the softmax-contrastive global loss (the reference's value)
    # data: cached views per image (view 0 = test transform, the others seeded train augmentations)
    views: int = 1
    transform: str = ""  # test-time preset of view 0 and validation; "" = the init model's
    negatives_top_k: int = 100  # negatives come from each anchor's global top-k (mined, cached)
    # optimiser: AdamW with step decay at fractions of the epochs
    batch_triplets: int = 100
    epochs: int = 100
    lr: float = 1e-4
    weight_decay: float = 4e-4
    milestones: tuple[float, ...] = (0.6, 0.8)
    gamma: float = 0.1
    warmup_steps: int = 0  # linear lr warmup over the first optimizer steps (0 = none, the reference)
    grad_clip: float = 0.0  # max gradient norm; 0 = off (the landmark variant uses 0.1)
    # model selection on held-out training identities (never the protocol's test images)
    val_fraction: float = 0.2
    val_top_k: int = 20  # rerank depth of the per-epoch validation (the reference used 15)
    val_max_queries: int = 0  # 0 = every validation image is a query
    fusion_top_k: int = 100  # depth at which the fusion weight is chosen, once, on the best model
    fusion_grid: int = 20  # lambda in {0, 1/grid, ..., 1}
    select_metric: str = "map@100"
    eval_every: int = 1
    # runtime
    seed: int = 0
    batch_size: int = 32  # feature extraction
    num_workers: int = 2
    threads: int = 0  # torch intra-op threads; 0 = torch's default

    def rrt_config(self) -> RRTConfig:
        return RRTConfig.from_dict(dict(self.rrt))

    def validate(self) -> None:
        checks = [
            (self.mode in MODES, f"mode must be one of {MODES}, got {self.mode!r}"),
            (self.trainable_blocks >= -1, f"trainable_blocks must be >= -1, got {self.trainable_blocks}"),
            (self.global_loss_weight >= 0, "global_loss_weight must be >= 0"),
            (self.temperature > 0, f"temperature must be positive, got {self.temperature}"),
            (self.views >= 1, f"views must be >= 1, got {self.views}"),
            (self.negatives_top_k >= 1, "negatives_top_k must be >= 1"),
            (self.batch_triplets >= 1 and self.epochs >= 1, "batch_triplets and epochs must be >= 1"),
            (self.lr > 0 and self.weight_decay >= 0 and self.grad_clip >= 0 and self.warmup_steps >= 0,
             "need lr > 0, weight_decay >= 0, grad_clip >= 0, warmup_steps >= 0"),
            (all(0 < m <= 1 for m in self.milestones), f"milestones are fractions in (0, 1], got {self.milestones}"),
            (list(self.milestones) == sorted(self.milestones), "milestones must be increasing"),
            (0 < self.gamma <= 1, f"gamma must be in (0, 1], got {self.gamma}"),
            (0 < self.val_fraction < 1, f"val_fraction must be in (0, 1), got {self.val_fraction}"),
            (self.val_top_k >= 1 and self.fusion_top_k >= 1 and self.fusion_grid >= 1,
             "val_top_k, fusion_top_k and fusion_grid must be >= 1"),
            (self.val_max_queries >= 0 and self.eval_every >= 1, "val_max_queries >= 0, eval_every >= 1"),
            (self.select_metric in ("map@100", "map", "recall@1"),
             f"select_metric must be map@100, map or recall@1, got {self.select_metric!r}"),
            (self.batch_size >= 1 and self.num_workers >= 0 and self.threads >= 0, "bad runtime settings"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        self.rrt_config()  # unknown or inconsistent RRT keys fail here, before any work

    def milestone_epochs(self) -> list[int]:
        """0-based epochs from which the lr drops by another ``gamma`` ([60, 80] of 100)."""
        return [round(m * self.epochs) for m in self.milestones]

    def lr_at(self, epoch: int, step: int | None = None) -> float:
        """The lr of 0-based ``epoch`` (and global optimizer ``step``, for the warmup): a pure
        function, so a resumed run needs no scheduler state."""
        lr = self.lr * self.gamma ** sum(1 for m in self.milestone_epochs() if epoch >= m)
        if step is not None and step < self.warmup_steps:
            lr *= (step + 1) / self.warmup_steps
        return lr
