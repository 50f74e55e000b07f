"""The reranker interface: re-sort one query's global candidates, plus the RRT implementations.

A :class:`Reranker` gets the query's descriptors and its candidates' (local descriptors and
global scores, best global first) and returns a new order with the scores that produced it.
Rerankers are registered by name in :data:`RERANKERS`; each builder takes a reranker
checkpoint folder (see waldo.rerank.rrt_checkpoint):

- ``rrt``: sort by the RRT logit alone, as the reference does;
- ``rrt-fusion``: sort by ``lambda * global + (1 - lambda) * sigmoid(logit)``, with the lambda
  chosen on held-out training identities when the reranker was trained (``rrt.json``).

Sorting is stable, so candidates with equal scores keep their global order.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch

from waldo.registry import Registry
from waldo.rerank.rrt import RerankingTransformer
from waldo.rerank.rrt_checkpoint import load_rrt
from waldo.rerank.rrt_fast import FastRRTScorer, supports_fast_bf16

__all__ = [
    "RERANKERS",
    "FusionReranker",
    "RRTReranker",
    "RerankCandidates",
    "RerankQuery",
    "RerankResult",
    "Reranker",
    "create_reranker",
    "fuse_scores",
    "reranker_names",
]


@dataclass
class RerankQuery:
    """local_desc (L, D) float16/32, not normalised; global_desc (D,) float32 or None."""

    local_desc: np.ndarray | torch.Tensor
    global_desc: np.ndarray | torch.Tensor | None = None


@dataclass
class RerankCandidates:
    """N candidates, best global first. local_desc (N, L, D) float16/32; global_scores (N,)
    float32 inner products with the query; global_desc (N, D) float32, needed only by an RRT
    with ``use_global_tokens``."""

    local_desc: np.ndarray | torch.Tensor
    global_scores: np.ndarray
    global_desc: np.ndarray | torch.Tensor | None = None

    def __post_init__(self) -> None:
        if len(self.local_desc) != len(self.global_scores):
            raise ValueError(f"{len(self.local_desc)} candidate locals but {len(self.global_scores)} global scores")


@dataclass
class RerankResult:
    """order (N,) int64: candidate positions, best first; scores (N,) float32: each reordered
    candidate's score (descending)."""

    order: np.ndarray
    scores: np.ndarray


@runtime_checkable
class Reranker(Protocol):
    name: str

    def rerank(self, query: RerankQuery, candidates: RerankCandidates) -> RerankResult: ...


def _sorted(scores: np.ndarray) -> RerankResult:
    scores = np.asarray(scores, np.float32)
    order = np.argsort(-scores, kind="stable").astype(np.int64)
    return RerankResult(order, scores[order])


def fuse_scores(global_scores: np.ndarray, logits: np.ndarray, weight: float) -> np.ndarray:
    """``weight * global + (1 - weight) * sigmoid(logit)``, elementwise, float32. weight 1 is
    global search alone, 0 the RRT alone (sigmoid keeps the logits' order)."""
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"fusion weight must be in [0, 1], got {weight}")
    logits = np.asarray(logits, np.float64)
    probability = 1.0 / (1.0 + np.exp(-logits))
    return (weight * np.asarray(global_scores, np.float64) + (1.0 - weight) * probability).astype(np.float32)


def _as_float_tensor(array: np.ndarray | torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(np.asarray(array) if not isinstance(array, torch.Tensor) else array).float()


#: How an RRTReranker computes its logits (see waldo.rerank.rrt_fast):
#: ``reference``: the training module, fp32 (every token of every layer);
#: ``fp32``: the inference scorer, fp32: the same logits, the last layer for CLS alone;
#: ``bf16``: the inference scorer with bf16 matmuls and attention, fp32 residuals and norms;
#: ``auto``: ``bf16`` where the CPU has native bf16 dot products, else ``fp32``.
PRECISIONS = ("reference", "fp32", "bf16", "auto")


def resolve_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "auto":
        return "bf16" if supports_fast_bf16() else "fp32"
    return precision


class RRTReranker:
    """Sort candidates by the RRT logit; one forward pass scores ``batch_size`` pairs (100 = the
    whole top-100 at once). ``fusion_weight`` is what the trainer chose on validation, if any.
    ``precision``: see :data:`PRECISIONS`. ``compile``: run the inference scorer through
    torch.compile (waldo.rerank.rrt_fast; 10-20 s at the first query, then about 2x faster);
    ignored for ``precision="reference"``."""

    name = "rrt"

    def __init__(self, rrt: RerankingTransformer, *, grid: tuple[int, int] = (7, 7), batch_size: int = 100,
                 fusion_weight: float | None = None, precision: str = "reference",
                 compile: bool = False) -> None:
        self.rrt = rrt
        self.grid = tuple(grid)
        self.batch_size = batch_size
        self.fusion_weight = fusion_weight
        self.precision = resolve_precision(precision)
        self._scorer: FastRRTScorer | None = None
        if self.precision != "reference":
            dtype = torch.bfloat16 if self.precision == "bf16" else torch.float32
            self._scorer = FastRRTScorer(rrt, dtype=dtype, grid=self.grid, compile=compile)

    @classmethod
    def from_folder(cls, folder: str | Path, *, batch_size: int = 100, precision: str = "reference",
                    compile: bool = False) -> RRTReranker:
        rrt, info = load_rrt(folder)
        weight = info.get("training", {}).get("fusion_weight")
        return cls(rrt, grid=tuple(info.get("grid", (7, 7))), batch_size=batch_size,
                   fusion_weight=None if weight is None else float(weight), precision=precision,
                   compile=compile)

    def logits(self, query: RerankQuery, candidates: RerankCandidates) -> np.ndarray:
        """(N,) float32 logits, one per candidate (the query locals are shared, not copied)."""
        if len(candidates.global_scores) == 0:
            return np.zeros(0, np.float32)
        globals_ = {}
        if self.rrt.config.use_global_tokens:  # the two extra tokens carry the global descriptors
            if query.global_desc is None or candidates.global_desc is None:
                raise ValueError("this RRT uses global tokens: the query and candidates need global_desc")
            globals_ = {"query_global": _as_float_tensor(query.global_desc),
                        "cand_globals": _as_float_tensor(candidates.global_desc)}
        if self._scorer is not None:
            embedded = self._scorer.embed_candidates(torch.as_tensor(np.asarray(candidates.local_desc)),
                                                     globals_.get("cand_globals"))
            scores = self._scorer.score(torch.as_tensor(np.asarray(query.local_desc)), embedded,
                                        query_global=globals_.get("query_global"), batch_size=self.batch_size)
        else:
            scores = self.rrt.score_candidates(_as_float_tensor(query.local_desc),
                                               _as_float_tensor(candidates.local_desc),
                                               grid=self.grid, batch_size=self.batch_size, **globals_)
        return scores.numpy().astype(np.float32)

    def rerank(self, query: RerankQuery, candidates: RerankCandidates) -> RerankResult:
        return _sorted(self.logits(query, candidates))


class FusionReranker:
    """Sort by :func:`fuse_scores` of the global score and the RRT's probability."""

    name = "rrt-fusion"

    def __init__(self, rrt: RRTReranker, weight: float) -> None:
        fuse_scores(np.zeros(0), np.zeros(0), weight)  # validates the weight
        self.rrt = rrt
        self.weight = float(weight)

    def rerank(self, query: RerankQuery, candidates: RerankCandidates) -> RerankResult:
        logits = self.rrt.logits(query, candidates)
        return _sorted(fuse_scores(candidates.global_scores, logits, self.weight))


#: name -> builder ``(folder, **options) -> Reranker``.
RERANKERS: Registry[Reranker] = Registry("reranker")


@RERANKERS.register("rrt")
def _rrt(folder: str | Path, *, batch_size: int = 100, precision: str = "reference",
         compile: bool = False) -> Reranker:
    return RRTReranker.from_folder(folder, batch_size=batch_size, precision=precision, compile=compile)


@RERANKERS.register("rrt-fusion")
def _rrt_fusion(folder: str | Path, *, batch_size: int = 100, weight: float | None = None,
                precision: str = "reference", compile: bool = False) -> Reranker:
    rrt = RRTReranker.from_folder(folder, batch_size=batch_size, precision=precision, compile=compile)
    weight = rrt.fusion_weight if weight is None else weight
    if weight is None:
        raise ValueError(f"{folder}/rrt.json has no fusion_weight (chosen on validation at the end of "
                         f"training); finish training or pass a weight")
    return FusionReranker(rrt, weight)


def create_reranker(name: str, folder: str | Path, **options) -> Reranker:
    """Build registered reranker ``name`` from a reranker checkpoint folder."""
    return RERANKERS.create(name, folder, **options)


def reranker_names() -> list[str]:
    return RERANKERS.names()
