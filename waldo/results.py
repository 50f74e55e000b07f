"""What a search returns: one hit type from the engine to the CLI's ``--json`` and the HTTP body.

:class:`SearchHit` is the service's response schema too, so ``waldo search --json`` and
``POST /search``'s ``results`` are the same JSON (:func:`hits_json`) for the same query.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from waldo.index import IndexedImage

__all__ = ["SearchHit", "SearchOutcome", "StageTimer", "hits_json"]


class SearchHit(BaseModel):
    """One hit. ``score`` ordered the list (its kind is the outcome's ``score_kind``: see
    :data:`waldo.rerank.base.SCORE_KINDS`); ``global_score`` and ``rank_before_rerank`` are the
    global-descriptor similarity and rank before any reranker moved the hit; ``inliers`` /
    ``verified`` where geometric verification ran, ``rrt_score`` where an RRT did, else null."""

    model_config = ConfigDict(frozen=True)

    id: int = Field(description="image id in the index (stable, never reused)")
    rank: int = Field(description="1-based rank in this list")
    path: str = Field(description="the indexed file")
    identity: str = Field(description="the instance label stored with the image")
    label: str = Field(description="a display name: class_name attribute, identity or file name")
    score: float = Field(description="the score that ordered this list, of the response's score_kind: "
                                     "similarity (no reranker), 'similarity + geometry bonus' (gv), inliers "
                                     "(gv on another reranker's order: 0 without a geometric match), "
                                     "'RRT probability' (rrt), 'similarity + RRT probability' (rrt-fusion)")
    global_score: float = Field(description="cosine similarity of the global descriptors")
    rank_before_rerank: int = Field(description="rank in the global-only list")
    inliers: int | None = Field(None, description="geometric verification's inlier count, where it ran")
    verified: bool | None = Field(None, description="whether geometric verification accepted the match, where it ran")
    rrt_score: float | None = Field(None, description="the RRT's probability that both show the same object, "
                                                      "where an RRT ran")
    attrs: dict[str, Any] = Field(default_factory=dict, description="metadata stored with the image")

    @classmethod
    def from_global(cls, record: IndexedImage, rank: int, score: float) -> SearchHit:
        """A hit of the global ranking (before any reranker)."""
        attrs = dict(record.attrs)
        label = attrs.get("class_name") or attrs.get("label") or record.identity or attrs.get("original_name", "")
        return cls(id=record.id, rank=rank, path=record.path, identity=record.identity, label=str(label),
                   score=score, global_score=score, rank_before_rerank=rank, attrs=attrs)


@dataclass(frozen=True)
class SearchOutcome:
    """One query's answer: ``hits`` (best first), ``global_hits`` (the global ranking the
    reranker started from; the hits themselves without one), the milliseconds each stage took
    (decode, extract, search, rerank) and ``rerank``, the reranker that ran ("none": the
    global ranking alone; a search that named none ran the index's default); ``note``: what the
    reranker wants the user to know (e.g. the query has too few keypoints to verify);
    ``score_kind``: what the hits' ``score`` is (a key of waldo.rerank.base.SCORE_KINDS);
    ``partial``/``missing_shards``: see below."""

    hits: list[SearchHit]
    global_hits: list[SearchHit]
    timings_ms: dict[str, float] = field(default_factory=dict)
    rerank: str = "none"
    note: str = ""
    score_kind: str = "similarity"
    #: A sharded index searched across processes (waldo.serve.cluster) answers from the shards
    #: that answered in time: ``partial`` is then True and ``missing_shards`` names the others.
    partial: bool = False
    missing_shards: list[int] = field(default_factory=list)


def hits_json(hits: Sequence[SearchHit]) -> list[dict[str, Any]]:
    """The JSON of ``hits``, exactly as ``POST /search`` returns them under ``results``."""
    return [hit.model_dump(mode="json") for hit in hits]


class StageTimer:
    """``with timer("extract"): ...`` records that block's wall time in ``timer.ms``."""

    def __init__(self) -> None:
        self.ms: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.ms[stage] = round((time.perf_counter() - start) * 1000, 2)
