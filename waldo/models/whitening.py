"""Learned whitening, the math: a linear global projection from the pooled features of photos
grouped by identity (waldo.train.whitening trains and validates one from labelled sources;
waldo.models.untrained fits one without labels, each photo and its augmented views a group).

From the groups, the *within-group* scatter S_w says which directions of the pooled feature are
nuisance (viewpoint, light, framing changes of one thing); whitening by S_w^-1/2 shrinks them,
and a PCA of the whole collection in that whitened space keeps the ``dim`` directions that still
vary the most, i.e. tell things apart (Radenovic, Tolias & Chum's learned whitening "Lw").
``shrink`` adds shrink x the mean eigenvalue to S_w so directions the groups never varied along
are not blown up; ``mix`` blends the learned metric with the untrained default's
(waldo.models.untrained: PCA scaled by (eigenvalue + 10 x mean)^-1/4).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["WhiteningSetting", "describe", "learned_projection", "untrained_metric_projection", "within_scatter"]

#: The untrained default's whitening (waldo.models.untrained re-exports these).
WHITEN_POWER = 0.25
WHITEN_SHRINK = 10.0


@dataclass(frozen=True)
class WhiteningSetting:
    dim: int
    shrink: float
    mix: float

    def describe(self) -> str:
        return f"dim={self.dim},shrink={self.shrink:g},mix={self.mix:g}"


def within_scatter(features: np.ndarray, identities: np.ndarray) -> np.ndarray:
    """(C, C) mean within-identity scatter of (N, C) features: each row minus its identity's
    mean. Identities with one image contribute nothing (they have no variation to learn from)."""
    x = np.asarray(features, np.float64)
    scatter = np.zeros((x.shape[1], x.shape[1]))
    counted = 0
    for identity in np.unique(identities):
        rows = x[identities == identity]
        if len(rows) < 2:
            continue
        centred = rows - rows.mean(0)
        scatter += centred.T @ centred
        counted += len(rows)
    if counted == 0:
        raise ValueError("learned whitening needs identities with at least two photos; none has")
    return scatter / counted


def _top_eigen(matrix: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    order = np.argsort(values)[::-1][:k]
    vectors = vectors[:, order]
    # Deterministic signs across LAPACK builds: each vector's largest entry positive.
    vectors = vectors * np.sign(vectors[np.abs(vectors).argmax(0), np.arange(vectors.shape[1])])
    return values[order], vectors


def untrained_metric_projection(features: np.ndarray, dim: int, power: float = WHITEN_POWER,
                                shrink: float = WHITEN_SHRINK) -> np.ndarray:
    """(C, dim): a label-free PCA to ``dim`` whose components are scaled by (eigenvalue +
    ``shrink`` x their mean eigenvalue)^-``power`` (power 0: plain PCA, 0.5: full whitening); the
    ``pca-shrink`` projection (DescriptorModel.fit_global_whitening)."""
    x = np.asarray(features, np.float64)
    values, vectors = _top_eigen(np.cov((x - x.mean(0)).T), dim)
    values = np.clip(values, 0, None)
    return vectors * (np.maximum(values + shrink * values.mean(), 1e-12) ** -power)[None, :]


def learned_projection(labelled: np.ndarray, identities: np.ndarray, collection: np.ndarray,
                       setting: WhiteningSetting) -> tuple[np.ndarray, np.ndarray]:
    """(mean (C,), projection (C, dim)): global descriptor = normalise((x - mean) @ projection).

    labelled: (N, C) pooled features of labelled photos with their ``identities``; collection:
    (M, C) pooled features of every training photo (labelled or not), for the mean and the total
    covariance (module doc)."""
    return _FitStatistics(labelled, identities, collection).projection(setting)


class _FitStatistics:
    """What every setting's fit shares (means, scatters, eigen-decompositions), computed once."""

    def __init__(self, labelled: np.ndarray, identities: np.ndarray, collection: np.ndarray) -> None:
        x = np.asarray(collection, np.float64)
        self.mean = x.mean(0)
        self.total = np.cov((x - self.mean).T)
        self.within = within_scatter(labelled, identities)
        self.collection = x
        self._cache: dict = {}

    def _cached(self, key, compute):
        if key not in self._cache:
            self._cache[key] = compute()
        return self._cache[key]

    def projection(self, setting: WhiteningSetting) -> tuple[np.ndarray, np.ndarray]:
        channels = self.within.shape[0]
        if not 0 < setting.dim <= channels:
            raise ValueError(f"whitening dim must be in 1..{channels}, got {setting.dim}")

        def whitened_total():
            shrunk = self.within + setting.shrink * np.trace(self.within) / channels * np.eye(channels)
            values, vectors = _top_eigen(shrunk, channels)
            inverse_sqrt = (vectors * values.clip(1e-12) ** -0.5) @ vectors.T
            return inverse_sqrt, _top_eigen(inverse_sqrt @ self.total @ inverse_sqrt, channels)[1]

        inverse_sqrt, directions = self._cached(("lw", setting.shrink), whitened_total)
        learned = inverse_sqrt @ directions[:, : setting.dim]
        if setting.mix <= 0:
            return self.mean, learned
        untrained = self._cached(("untrained", setting.dim),
                                 lambda: untrained_metric_projection(self.collection, setting.dim))
        return self.mean, _mix(untrained, learned, self.total, setting)


def _mix(untrained: np.ndarray, learned: np.ndarray, total: np.ndarray, setting: WhiteningSetting) -> np.ndarray:
    metrics = []
    for projection in (untrained, learned):
        metric = projection @ projection.T
        metrics.append(metric / np.trace(metric @ total))  # same total variance after projection
    mixed = setting.mix * metrics[0] + (1 - setting.mix) * metrics[1]
    values, vectors = _top_eigen(mixed, setting.dim)
    return vectors * np.sqrt(values.clip(0))[None, :]


def describe(features: np.ndarray, mean: np.ndarray, projection: np.ndarray) -> np.ndarray:
    out = (features - mean) @ projection
    return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
