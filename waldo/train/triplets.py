"""Triplets for reranker training: (anchor, positive, hard negative) rows, epoch by epoch.

Every usable training image is an anchor once per epoch (in a seeded random order). Its
positive is a random *other* image of its identity (SOP variant: not restricted to the
top-k); its negative a random different-identity image among its global top-k neighbours
(mined once with the init model). Validation rows are never drawn. Grocery classes have
40-130 photos, so an anchor's whole top-100 can share its identity: the negative is then a
random different-identity training image, and the batch reports how many fell back.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from waldo.train.common import epoch_seed

__all__ = ["TripletSampler"]

Triplets = tuple[np.ndarray, np.ndarray, np.ndarray, int]


class TripletSampler:
    """(anchor, positive, negative) rows for each epoch; depends only on (seed, epoch).

    labels (N,) int64 identity codes; train (N,) bool rows that may be used; neighbours (N, k)
    int64 global top-k rows (-1 padding).
    """

    def __init__(self, labels: np.ndarray, train: np.ndarray, neighbours: np.ndarray, seed: int = 0) -> None:
        self.labels, self.train, self.seed = np.asarray(labels), np.asarray(train, bool), seed
        rows = np.flatnonzero(self.train)
        self.groups = {int(c): rows[self.labels[rows] == c] for c in np.unique(self.labels[rows])}
        self.anchors = np.array([r for r in rows if len(self.groups[int(self.labels[r])]) >= 2], np.int64)
        if len(self.anchors) == 0:
            raise ValueError("no training identity has 2 images: there are no positives")
        self.train_rows = rows
        self.hard: list[np.ndarray] = []  # per anchor: candidate negatives from its top-k
        for anchor in self.anchors:
            nb = neighbours[anchor]
            nb = nb[nb >= 0]
            self.hard.append(nb[self.train[nb] & (self.labels[nb] != self.labels[anchor])])
        if len(self.groups) < 2:
            raise ValueError("training needs at least 2 identities (negatives)")

    def epoch(self, epoch: int, batch_triplets: int) -> Iterator[Triplets]:
        """Batches of (anchors, positives, negatives) (B,) int64 rows + how many negatives fell back."""
        rng = np.random.default_rng(epoch_seed(self.seed, epoch))
        order = rng.permutation(len(self.anchors))
        for start in range(0, len(order), batch_triplets):
            chosen = order[start:start + batch_triplets]
            anchors = self.anchors[chosen]
            positives, negatives, fallbacks = np.empty_like(anchors), np.empty_like(anchors), 0
            for i, (index, anchor) in enumerate(zip(chosen, anchors)):
                group = self.groups[int(self.labels[anchor])]
                others = group[group != anchor]
                positives[i] = others[rng.integers(len(others))]
                hard = self.hard[index]
                if len(hard):
                    negatives[i] = hard[rng.integers(len(hard))]
                else:
                    fallbacks += 1
                    pool = self.train_rows[self.labels[self.train_rows] != self.labels[anchor]]
                    negatives[i] = pool[rng.integers(len(pool))]
            yield anchors, positives, negatives, fallbacks
