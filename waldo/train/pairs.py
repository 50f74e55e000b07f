"""Training pairs for the reranker, and the validation that chooses among reranker checkpoints.

Split: a labelled source holds out a seeded fraction of its *identities*, an unlabelled one a
fraction of its *images*; held-out rows are never anchors nor candidates.

Pairs (:class:`PairSampler`): each epoch draws anchors from every source in proportion to its
weight. An anchor's positive candidate is, for a labelled anchor with another training photo of
its identity, that real photo with probability ``real_positive_prob``, else the anchor's own
photo; its negative candidate is, with probability ``hard_negative_prob``, one of the first
``hard_negative_k`` rows of its global top-k (mined over all training rows) that has another
identity, else a random row of another identity. Every candidate is seen through a fresh strong
augmented view (waldo.data.views), positives and negatives alike, so "was augmented" tells the
model nothing. ``in_batch_negatives`` also pairs each anchor with the next anchor's positive
view when their identities differ: one more negative per anchor for no extra backbone pass.
With ``swap_prob`` an anchor's pair is *swapped* (waldo.data.views.swap_centre): its positive
shows the positive photo's middle in the negative photo's surroundings, its negative the negative
photo's middle in the anchor's own surroundings, so the only thing that tells them apart is the
middle, where a product photo keeps its product.

Validation (:func:`validation_sets`), per source, built like the test it should predict:

- a protocol's training split: its held-out identities' photos searched the way the protocol
  searches its test identities (e.g. coil100-open: views 0/90/180/270 against views >= 40
  degrees away; grocery-open-cross: test-split photos against train/val-split photos), with
  every other photo of the source (all its identities) in the gallery as distractors;
- another labelled source: leave-one-out over its held-out identities, the whole source as gallery;
- an unlabelled source: a fixed strong view of each held-out image searches the whole source.
Queries rank the gallery by global similarity; the top-``top_k`` (the serving 100) is reranked.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from waldo.train.mining import mine_from_descriptors
from waldo.train.sources import PooledImages

__all__ = ["PairBatch", "PairSampler", "ValidationSet", "split_rows", "top_k_neighbours", "validation_sets"]


def split_rows(pool: PooledImages, val_fraction: float, seed: int) -> np.ndarray:
    """(N,) bool: held-out rows (see module doc). A source with fewer than 2 identities (or 2
    images) keeps everything for training."""
    held_out = np.zeros(len(pool), bool)
    rng = np.random.default_rng([seed, 7])
    for index in range(len(pool.sources)):
        rows = np.flatnonzero(pool.source == index)
        units = np.unique(pool.identity[rows])  # identities; unlabelled rows are identities of their own
        n_val = int(round(val_fraction * len(units)))
        if len(units) < 2 or n_val == 0:
            continue
        chosen = rng.choice(units, size=min(n_val, len(units) - 1), replace=False)
        held_out[rows[np.isin(pool.identity[rows], chosen)]] = True
    return held_out


def top_k_neighbours(global_desc: np.ndarray, rows: np.ndarray, k: int) -> np.ndarray:
    """(N, k) int64: for each of ``rows``, its ``k`` most similar other rows among ``rows``, most
    similar first (waldo.train.mining's exact leave-one-out search); rows outside ``rows``, and
    padding, are -1."""
    among = np.zeros(len(global_desc), bool)
    among[np.asarray(rows, np.int64)] = True
    return mine_from_descriptors(global_desc, k, query_ok=among)[0]


@dataclass
class PairBatch:
    """anchors (B,) rows seen clean; candidates (C,) rows seen through augmented views; pairs
    (P,) = (index into anchors, index into candidates, target 0/1); middles (C,) the row whose
    middle a swapped candidate shows in its candidate row's surroundings, -1 for a plain view
    (None: no swapped candidate in the batch)."""

    anchors: np.ndarray
    candidates: np.ndarray
    pair_anchor: np.ndarray
    pair_candidate: np.ndarray
    targets: np.ndarray
    counters: dict
    middles: np.ndarray | None = None


class PairSampler:
    def __init__(self, pool: PooledImages, train: np.ndarray, neighbours: np.ndarray, *, seed: int = 0,
                 real_positive_prob: float = 0.5, hard_negative_prob: float = 0.7, hard_negative_k: int = 20,
                 in_batch_negatives: bool = True, anchors_per_epoch: int = 0, swap_prob: float = 0.0) -> None:
        if not 0.0 <= swap_prob <= 1.0:
            raise ValueError(f"swap_prob must be in [0, 1], got {swap_prob}")
        self.pool, self.seed, self.swap_prob = pool, seed, swap_prob
        self.train_rows = np.flatnonzero(train)
        if len(self.train_rows) < 2:
            raise ValueError(f"reranker training needs at least 2 training images, got {len(self.train_rows)}")
        self.is_train = train
        self.neighbours = neighbours
        self.real_positive_prob, self.hard_negative_prob = real_positive_prob, hard_negative_prob
        self.hard_negative_k, self.in_batch_negatives = hard_negative_k, in_batch_negatives
        self.by_identity: dict[int, np.ndarray] = {}
        for row in self.train_rows:
            self.by_identity.setdefault(int(pool.identity[row]), []).append(int(row))
        self.by_identity = {key: np.array(rows) for key, rows in self.by_identity.items()}
        weights = np.array([source.weight for source in pool.sources])
        per_source = [self.train_rows[pool.source[self.train_rows] == s] for s in range(len(pool.sources))]
        self.per_source = per_source
        natural = sum(w * len(rows) for w, rows in zip(weights, per_source))
        scale = anchors_per_epoch / natural if anchors_per_epoch else 1.0
        self.counts = [int(round(w * len(rows) * scale)) if len(rows) else 0 for w, rows in zip(weights, per_source)]

    @property
    def anchors_per_epoch(self) -> int:
        return sum(self.counts)

    def _anchors(self, rng: np.random.Generator) -> np.ndarray:
        parts = [rng.choice(rows, size=count, replace=count > len(rows))
                 for rows, count in zip(self.per_source, self.counts) if count]
        anchors = np.concatenate(parts)
        return anchors[rng.permutation(len(anchors))]

    def _positive(self, anchor: int, rng: np.random.Generator) -> tuple[int, bool]:
        if self.pool.labelled[anchor] and rng.random() < self.real_positive_prob:
            same = self.by_identity[int(self.pool.identity[anchor])]
            others = same[same != anchor]
            if len(others):
                return int(rng.choice(others)), True
        return anchor, False

    def _negative(self, anchor: int, rng: np.random.Generator) -> tuple[int, bool]:
        identity = self.pool.identity[anchor]
        if rng.random() < self.hard_negative_prob:
            near = self.neighbours[anchor]
            near = near[near >= 0]
            near = near[self.is_train[near] & (self.pool.identity[near] != identity)][: self.hard_negative_k]
            if len(near):
                return int(rng.choice(near)), True
        for _ in range(100):
            row = int(rng.choice(self.train_rows))
            if self.pool.identity[row] != identity:
                return row, False
        raise ValueError("every training image has the same identity: there are no negatives")

    def epoch(self, epoch: int, batch_anchors: int) -> Iterator[PairBatch]:
        rng = np.random.default_rng([self.seed, epoch, 11])
        anchors = self._anchors(rng)
        for start in range(0, len(anchors), batch_anchors):
            chunk = anchors[start:start + batch_anchors]
            b = len(chunk)
            positives, negatives, real, hard = [], [], 0, 0
            positive_middles, negative_middles = [], []
            for anchor in chunk:
                positive, is_real = self._positive(int(anchor), rng)
                negative, is_hard = self._negative(int(anchor), rng)
                # drawn only when asked for, so that runs without swaps keep their old draws
                if self.swap_prob > 0 and rng.random() < self.swap_prob:
                    positives.append(negative)  # the negative photo's surroundings ...
                    positive_middles.append(positive)  # ... around the positive's middle
                    negatives.append(int(anchor))  # the anchor's own surroundings ...
                    negative_middles.append(negative)  # ... around the negative's middle
                else:
                    positives.append(positive)
                    negatives.append(negative)
                    positive_middles.append(-1)
                    negative_middles.append(-1)
                real, hard = real + is_real, hard + is_hard
            candidates = np.array(positives + negatives, np.int64)
            middles = np.array(positive_middles + negative_middles, np.int64)
            swapped = int((middles[:b] >= 0).sum())
            # what a candidate shows is its middle's identity when swapped
            shown = np.where(middles >= 0, middles, candidates)
            pair_anchor = [np.arange(b), np.arange(b)]
            pair_candidate = [np.arange(b), b + np.arange(b)]
            targets = [np.ones(b), np.zeros(b)]
            if self.in_batch_negatives and b > 1:
                other = (np.arange(b) + 1) % b
                keep = self.pool.identity[chunk] != self.pool.identity[shown[other]]
                pair_anchor.append(np.arange(b)[keep])
                pair_candidate.append(other[keep])
                targets.append(np.zeros(int(keep.sum())))
            counters = {"real_positives": real, "hard_negatives": hard}
            if self.swap_prob > 0:
                counters["swapped_pairs"] = swapped
            yield PairBatch(chunk.astype(np.int64), candidates, np.concatenate(pair_anchor),
                            np.concatenate(pair_candidate), np.concatenate(targets).astype(np.float32),
                            counters, middles if swapped else None)


@dataclass
class ValidationSet:
    """One source's validation: ``queries`` rows (seen clean, or through a fixed augmented view
    when ``augmented``), ``gallery`` rows (clean); a query matches gallery rows of its identity;
    ``exclude_self``: a query row in the gallery is not its own result."""

    name: str
    kind: str
    queries: np.ndarray
    gallery: np.ndarray
    augmented: bool
    exclude_self: bool


def validation_sets(pool: PooledImages, held_out: np.ndarray, *, max_queries: int = 0,
                    seed: int = 0) -> list[ValidationSet]:
    """One :class:`ValidationSet` per source that holds out anything (see module doc). Queries
    without a positive in the gallery are dropped; ``max_queries`` (0 = all) caps each set with
    a seeded sample."""
    sets = []
    rng = np.random.default_rng([seed, 13])
    for index, source in enumerate(pool.sources):
        rows = np.flatnonzero(pool.source == index)
        val = rows[held_out[rows]]
        if len(val) == 0:
            continue
        if not source.labelled:
            queries, gallery, kind, augmented, exclude = val, rows, "augmented views", True, False
        elif source.validation_split is not None:
            is_query, is_gallery = source.validation_split
            queries = np.array([r for r in val if is_query(pool.records[r])], np.int64)
            gallery = np.array([r for r in rows if is_gallery(pool.records[r])], np.int64)
            kind, augmented, exclude = "protocol twin", False, True
        else:
            queries, gallery, kind, augmented, exclude = val, rows, "leave-one-out", False, True
        identities = pool.identity[gallery]
        has_positive = np.array([np.sum((identities == pool.identity[q]) & ((gallery != q) | (not exclude))) > 0
                                 for q in queries], bool)
        queries = queries[has_positive] if len(queries) else queries
        if max_queries and len(queries) > max_queries:
            queries = np.sort(rng.choice(queries, max_queries, replace=False))
        if len(queries) and len(gallery) > 1:
            sets.append(ValidationSet(source.name, kind, queries, gallery, augmented, exclude))
    if not sets:
        raise ValueError("no validation queries: the sources are too small to hold any images out")
    return sets
