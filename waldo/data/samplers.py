"""Batch samplers for metric learning.

``PKSampler`` builds batches of P identities x K images each, so every anchor in a batch has
K - 1 positives for an in-batch loss such as ``SoftmaxContrastiveLoss`` (the reference global
model trains on 400 identities x 2 images). pytorch-metric-learning's MPerClassSampler is not
used: it draws from a module-global NumPy RNG, so a resumed run could not replay its batches.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler


class PKSampler(Sampler[list[int]]):
    """Yields batches (lists of dataset indices) of ``p`` identities x ``k`` images; use it as a
    DataLoader's ``batch_sampler``.

    Eligible identities have at least 2 images; identities with a single image are skipped,
    since in-batch losses ignore anchors without a positive, so they would only cost compute.
    Each epoch shuffles the eligible identities and deals them out P at a time, so every eligible
    identity appears in exactly one batch per epoch (except the < P left over when ``drop_last``),
    with K of its images:
      - at least K images: K distinct images, drawn without replacement;
      - 2 to K-1 images: all of them once, then the rest of the K slots drawn with replacement
        from them (so no image is left out and duplicates are as few as possible).
    An epoch therefore shows P*K images per batch, not every image: identities with many images
    are sub-sampled differently each epoch.

    The order depends only on (seed, epoch): call ``set_epoch(epoch)`` before each epoch (as
    with DistributedSampler); iterating twice without it repeats the same batches.
    Index order within a batch: identity by identity, K consecutive indices each.
    """

    def __init__(
        self,
        labels: Sequence[int] | np.ndarray,
        p: int,
        k: int,
        *,
        seed: int = 0,
        drop_last: bool = True,
    ) -> None:
        labels_array = np.asarray(labels)
        if labels_array.ndim != 1:
            raise ValueError(f"labels must be 1-D (one identity per image), got shape {labels_array.shape}")
        if labels_array.size and not np.issubdtype(labels_array.dtype, np.integer):
            raise ValueError(f"labels must be integer identity ids, got dtype {labels_array.dtype}")
        if p < 1:
            raise ValueError(f"p (identities per batch) must be at least 1, got {p}")
        if k < 2:
            raise ValueError(f"k (images per identity) must be at least 2 to form positives, got {k}")
        self.p, self.k, self.seed, self.drop_last = p, k, seed, drop_last
        self.epoch = 0
        # Group image indices by identity in sorted label order (not dict/hash order), so the
        # batches depend only on the labels, the seed and the epoch.
        _, inverse, counts = np.unique(labels_array, return_inverse=True, return_counts=True)
        order = np.argsort(inverse, kind="stable")
        groups = np.split(order, np.cumsum(counts)[:-1]) if labels_array.size else []
        self._groups: list[np.ndarray] = [g for g in groups if len(g) >= 2]  # (n_images,) int64 each
        self.n_skipped = len(groups) - len(self._groups)
        if len(self._groups) < p:
            raise ValueError(
                f"only {len(self._groups)} identities have at least 2 images ({self.n_skipped} "
                f"single-image identities skipped), fewer than p={p}; use p <= {len(self._groups)}"
            )

    @property
    def n_identities(self) -> int:
        """Eligible identities (with at least 2 images)."""
        return len(self._groups)

    def set_epoch(self, epoch: int) -> None:
        """Select the shuffle of ``epoch``; the same (seed, epoch) always gives the same batches."""
        self.epoch = epoch

    def __len__(self) -> int:
        """Batches per epoch."""
        full, rest = divmod(len(self._groups), self.p)
        return full + (1 if rest and not self.drop_last else 0)

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        identity_order = rng.permutation(len(self._groups))
        for batch_number in range(len(self)):
            batch_identities = identity_order[batch_number * self.p:(batch_number + 1) * self.p]
            batch = [self._draw(self._groups[i], rng) for i in batch_identities]
            yield np.concatenate(batch).tolist()

    def _draw(self, images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """K image indices (K,) of one identity; see the class docstring for small identities."""
        if len(images) >= self.k:
            return rng.choice(images, size=self.k, replace=False)
        extra = rng.choice(images, size=self.k - len(images), replace=True)
        return rng.permutation(np.concatenate([images, extra]))
