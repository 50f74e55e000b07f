"""Evaluate global retrieval on a protocol: extract, search exactly, score.

Queries whose images could not be read, and queries with no other image of their identity in
the gallery, are dropped (and counted), as the protocols prescribe. mAP ranks the whole gallery
(up to ``FULL_RANKING_LIMIT`` images, past which it is computed over the top 1000).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from waldo.data.protocols import Protocol
from waldo.eval.metrics import match_matrix, retrieval_metrics
from waldo.eval.multiscale import extract_multiscale
from waldo.index.knn import exact_knn
from waldo.models.descriptor import DescriptorModel
from waldo.models.extract import Extracted, extract_descriptors

FULL_RANKING_LIMIT = 10_000


@dataclass
class EvalRun:
    """Everything an evaluation computed, for reports and rerankers.

    query_rows: (Q,) rows of protocol.queries that were evaluated.
    gallery_rows: (N,) rows of protocol.gallery that were read.
    knn_indices: (Q, R) positions in gallery_rows, best first (-1 padding); R = ranking length.
    knn_scores: (Q, R) inner products.   matches: (Q, R) bool.   n_positives: (Q,) int.
    """

    metrics: dict[str, float]
    query_rows: np.ndarray
    gallery_rows: np.ndarray
    knn_indices: np.ndarray
    knn_scores: np.ndarray
    matches: np.ndarray
    n_positives: np.ndarray
    queries: Extracted | None = None
    gallery: Extracted | None = None
    skipped: list[tuple[str, str]] = field(default_factory=list)


def evaluate_descriptors(protocol: Protocol, queries: Extracted, gallery: Extracted,
                         *, ks: tuple[int, ...] = (1, 10, 100)) -> EvalRun:
    """Score already-extracted descriptors (queries is gallery under leave-one-out)."""
    gallery_rows = np.flatnonzero(gallery.ok)
    query_ok_rows = np.flatnonzero(queries.ok)
    identities = sorted(set(protocol.gallery.identities) | set(protocol.queries.identities))
    vocabulary = {identity: code for code, identity in enumerate(identities)}
    gallery_labels = np.array([vocabulary[protocol.gallery.identities[r]] for r in gallery_rows], np.int64)
    query_labels_all = np.array([vocabulary[protocol.queries.identities[r]] for r in query_ok_rows], np.int64)
    counts = np.bincount(gallery_labels, minlength=len(vocabulary))
    n_positives_all = counts[query_labels_all] - (1 if protocol.leave_one_out else 0)
    keep = n_positives_all > 0
    query_rows = query_ok_rows[keep]
    query_labels = query_labels_all[keep]
    n_positives = n_positives_all[keep]
    query_desc = queries.global_desc[keep]

    exclude = None
    if protocol.leave_one_out:
        # Under LOO the query is gallery image `row`; its position among the read gallery rows.
        position = {row: i for i, row in enumerate(gallery_rows)}
        exclude = np.array([position[row] for row in query_rows], np.int64)
    n_gallery = len(gallery_rows)
    ranking = n_gallery if n_gallery <= FULL_RANKING_LIMIT else max(max(ks), 1000)
    ranking = max(1, min(ranking, n_gallery))
    scores, indices = exact_knn(query_desc, gallery.global_desc, ranking, exclude=exclude)
    matches = match_matrix(indices, query_labels, gallery_labels)
    metrics = retrieval_metrics(matches, n_positives, ks)
    metrics["n_gallery"] = int(n_gallery)
    metrics["n_dropped_queries"] = int(len(protocol.queries) - len(query_rows))
    return EvalRun(metrics, query_rows, gallery_rows, indices, scores, matches, n_positives,
                   queries, gallery, skipped=list(gallery.errors) + ([] if queries is gallery else list(queries.errors)))


def evaluate_protocol(model: DescriptorModel, protocol: Protocol, transform: Callable, *,
                      batch_size: int = 32, num_workers: int | None = None,
                      progress: bool = True, ks: tuple[int, ...] = (1, 10, 100),
                      extra_transforms: Sequence[Callable] = ()) -> EvalRun:
    """Extract descriptors of the protocol's gallery (and queries) and evaluate global search.

    ``extra_transforms`` (e.g. the same preset at other sizes, see waldo.eval.multiscale) turns on
    multi-scale global descriptors: averaged over ``transform`` and these; off by default."""

    def extract(paths: list[str], description: str) -> Extracted:
        options = {"batch_size": batch_size, "num_workers": num_workers, "progress": progress,
                   "description": description}
        if extra_transforms:
            return extract_multiscale(model, paths, transform, extra_transforms, **options)
        return extract_descriptors(model, paths, transform, **options)

    gallery = extract(protocol.gallery.paths, "gallery")
    queries = gallery if protocol.leave_one_out else extract(protocol.queries.paths, "queries")
    return evaluate_descriptors(protocol, queries, gallery, ks=ks)
