"""Metric-learning losses for the global descriptor, as objects in a registry of classes.

``SoftmaxContrastiveLoss`` is the reference system's global loss (its code calls it
"contrastive"); ``MarginContrastiveLoss`` is the classic pairwise contrastive loss, as an option.
Both take L2-normalised descriptors (B, D) and integer identity labels (B,) and return a scalar.
A config names its loss (``GlobalTrainConfig.loss``) and the class reads its own settings from
the config (:meth:`MetricLoss.from_config`), so adding a loss touches this file only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from waldo.registry import Registry

if TYPE_CHECKING:  # for annotations only: config.py checks a loss name against LOSSES
    from waldo.train.config import GlobalTrainConfig

__all__ = ["LOSSES", "MarginContrastiveLoss", "MetricLoss", "SoftmaxContrastiveLoss"]


class MetricLoss(nn.Module):
    """A loss over embeddings (B, D) and identity labels (B,): checks both, then its subclass's
    ``compute_loss``."""

    @classmethod
    def from_config(cls, config: GlobalTrainConfig) -> MetricLoss:
        return cls()

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """embeddings (B, D) float; labels (B,) int. Returns a scalar (float32)."""
        if embeddings.ndim != 2:
            raise ValueError(f"embeddings must be (B, D), got {tuple(embeddings.shape)}")
        if labels.shape != embeddings.shape[:1]:
            raise ValueError(f"labels must be ({embeddings.shape[0]},), got {tuple(labels.shape)}")
        if labels.is_floating_point():
            raise ValueError(f"labels must be integer identity ids, got {labels.dtype}")
        return self.compute_loss(embeddings, labels)


LOSSES: Registry[type[MetricLoss]] = Registry("loss")


def _zero_with_grad(embeddings: torch.Tensor) -> torch.Tensor:
    """A 0 that is still connected to the graph, so ``loss.backward()`` works on any batch."""
    return embeddings.float().sum() * 0.0


@LOSSES.register("softmax-contrastive")
class SoftmaxContrastiveLoss(MetricLoss):
    """-log of the softmax mass each anchor puts on its own identity.

    S = G·Gᵀ with the diagonal excluded; p = softmax(S / T) per row; the loss of anchor i is
    -log(sum of p_ij over j != i with labels[j] == labels[i]), averaged over the anchors that
    have at least one positive (others are skipped: they carry no signal). With no such anchor
    the loss is a zero that still has a grad. Computed as logsumexp(positives) - logsumexp(all),
    so it stays exact at T = 0.05 where exp(S / T) would reach e^20. There is no margin, as in
    the reference; T = 0.05 is its value.
    """

    def __init__(self, temperature: float = 0.05) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.temperature = temperature

    @classmethod
    def from_config(cls, config: GlobalTrainConfig) -> SoftmaxContrastiveLoss:
        return cls(temperature=config.temperature)

    def compute_loss(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        batch = embeddings.shape[0]
        self_mask = torch.eye(batch, dtype=torch.bool, device=embeddings.device)
        positive = (labels[:, None] == labels[None, :]) & ~self_mask  # (B, B)
        has_positive = positive.any(dim=1)
        if not bool(has_positive.any()):
            return _zero_with_grad(embeddings)
        # Keep only anchors with a positive before the logsumexps: a row with every entry at
        # -inf would give a NaN gradient even if its loss were dropped afterwards.
        anchors = embeddings[has_positive].float()  # (A, D)
        logits = anchors @ embeddings.float().T / self.temperature  # (A, B)
        logits_all = logits.masked_fill(self_mask[has_positive], float("-inf"))
        logits_pos = logits.masked_fill(~positive[has_positive], float("-inf"))
        loss = torch.logsumexp(logits_all, dim=1) - torch.logsumexp(logits_pos, dim=1)  # (A,)
        return loss.mean()

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"


@LOSSES.register("margin-contrastive")
class MarginContrastiveLoss(MetricLoss):
    """Pairwise contrastive loss on cosine distance d = 1 - cos (in [0, 2]).

    Positive pairs (same label) cost relu(d - pos_margin); negative pairs cost
    relu(neg_margin - d). Each term is the mean over its *active* pairs (cost > 0), as
    pytorch-metric-learning's AvgNonZeroReducer does, so easy pairs do not dilute the signal as
    training progresses; the loss is the sum of the two means (a side with no active pair adds 0).
    Each unordered pair counts once. Embeddings are normalised inside, so raw vectors work too.
    """

    def __init__(self, pos_margin: float = 0.0, neg_margin: float = 0.5) -> None:
        super().__init__()
        if not 0.0 <= pos_margin < 2.0 or not 0.0 < neg_margin <= 2.0:
            raise ValueError(f"margins must lie in the cosine-distance range [0, 2], "
                             f"got pos {pos_margin}, neg {neg_margin}")
        self.pos_margin = pos_margin
        self.neg_margin = neg_margin

    @classmethod
    def from_config(cls, config: GlobalTrainConfig) -> MarginContrastiveLoss:
        return cls(pos_margin=config.pos_margin, neg_margin=config.neg_margin)

    def compute_loss(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        normalised = F.normalize(embeddings.float(), dim=1)
        # Rounding can push 1 - cos slightly below 0 for identical vectors.
        distance = (1.0 - normalised @ normalised.T).clamp_min(0.0)  # (B, B)
        upper = torch.ones_like(distance, dtype=torch.bool).triu(diagonal=1)  # each pair once
        same = labels[:, None] == labels[None, :]
        pos_cost = F.relu(distance[same & upper] - self.pos_margin)
        neg_cost = F.relu(self.neg_margin - distance[~same & upper])
        return _mean_of_active(pos_cost, embeddings) + _mean_of_active(neg_cost, embeddings)

    def extra_repr(self) -> str:
        return f"pos_margin={self.pos_margin}, neg_margin={self.neg_margin}"


def _mean_of_active(cost: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
    """Mean of the strictly positive entries of ``cost`` (P,), or a graph-connected 0."""
    active = cost > 0
    if not bool(active.any()):
        return _zero_with_grad(embeddings)
    return cost[active].mean()
