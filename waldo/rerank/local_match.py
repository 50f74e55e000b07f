"""Training-free local matching: the global similarity plus the share of the query's local cells
that find a mutual match in the candidate.

For each query cell, its most similar candidate cell (cosine of the centred, projected locals);
a pair counts when each is the other's nearest cell and their cosine is above ``threshold``.
The score is ``global + weight x (matched cells / query cells)``: two photos of one object share
many parts at the same fine scale (a label's corner, a lid), photos of two look-alikes share
the overall colour and shape the global descriptor already saw, but fewer exact parts.

It needs cells finer than the reference's 7x7 grid: an index built with ``--local-stage``, whose
locals are stage N's cells (ModelConfig.local_stage; EfficientNet-Lite's stage 4 gives 14x14 at
224 px) or, for a checkpoint, carry them as match cells after the RRT's tokens
(ModelConfig.match_stage, waldo.models.descriptor.MatchCellsLayout). On the last map's 9x9 cells
it adds almost nothing, so it is not offered there. Measured, with the setting
chosen on validation identities: docs/results.md, "Local matching as a reranker".
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from waldo.rerank.base import (
    RERANKERS,
    SCORE_LOCAL_MATCH_FUSED,
    Need,
    RerankCandidates,
    RerankerSetup,
    RerankQuery,
    RerankResult,
    sorted_result,
)

__all__ = ["LocalMatchReranker", "LocalMatchSetting", "matched_cells", "mutual_match_share"]


@dataclass(frozen=True)
class LocalMatchSetting:
    """``threshold``: the cosine a mutual pair of cells must exceed; ``weight``: how much the share
    of matched query cells adds to the global similarity. Defaults chosen on validation identities
    (experiments/local_matching.py --model untrained --local-stage 4 --cells-dim 64); a model may
    carry its own in config.json's ``extra["local_match"]`` (``--store-choice``)."""

    threshold: float = 0.7
    weight: float = 1.0

    def __post_init__(self) -> None:
        if not -1.0 <= self.threshold < 1.0:
            raise ValueError(f"local-match threshold is a cosine in [-1, 1), got {self.threshold}")
        if not 0.0 <= self.weight <= 100.0:
            raise ValueError(f"local-match weight must be in [0, 100], got {self.weight}")

    @classmethod
    def for_model(cls, folder: Path | None) -> LocalMatchSetting:
        """The setting in ``folder``'s config.json (``extra["local_match"]``), else the defaults."""
        chosen = _model_extra(folder).get("local_match")
        if not isinstance(chosen, dict):
            return cls()
        try:
            return cls(float(chosen.get("threshold", cls.threshold)), float(chosen.get("weight", cls.weight)))
        except (TypeError, ValueError) as error:
            raise ValueError(f"{folder}/config.json has a bad local_match setting: {error}") from None


def _model_extra(folder: Path | None) -> dict:
    """``extra`` of ``folder``'s config.json ({} without the folder, the file or the key)."""
    if folder is None or not (Path(folder) / "config.json").is_file():
        return {}
    try:
        extra = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8")).get("extra") or {}
    except (OSError, ValueError, AttributeError) as error:
        raise ValueError(f"{folder}/config.json is unreadable: {error}") from None
    return extra if isinstance(extra, dict) else {}


def match_cells_layout(folder: Path | None, given: dict | None = None):  # noqa: ANN201 - MatchCellsLayout | None
    """Where the match cells sit in a model's local rows: ``given`` (a layout's JSON), else the
    folder's config.json ``extra["match_cells"]``; None when the locals themselves are the cells."""
    data = given if given is not None else _model_extra(folder).get("match_cells")
    if data is None:
        return None
    from waldo.models.descriptor import MatchCellsLayout

    return MatchCellsLayout.from_json(data)


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-6)


def mutual_match_share(query_locals: np.ndarray, candidate_locals: np.ndarray, threshold: float) -> np.ndarray:
    """(N,) float32: for each of N candidates ((N, M, D) locals), the share of the query's (L, D)
    cells whose nearest candidate cell has the query cell as its own nearest and a cosine above
    ``threshold``."""
    query = _unit(query_locals)
    candidates = _unit(candidate_locals)
    if query.ndim != 2 or candidates.ndim != 3 or candidates.shape[2] != query.shape[1]:
        raise ValueError(f"local-match needs (L, D) query and (N, M, D) candidate locals, got "
                         f"{query.shape} and {candidates.shape}")
    if len(candidates) == 0 or len(query) == 0 or candidates.shape[1] == 0:
        return np.zeros(len(candidates), np.float32)
    matched, _, _ = _mutual_matches(np.matmul(candidates, query.T), threshold)
    return matched.mean(1).astype(np.float32)


def _mutual_matches(sims: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For (N, M, L) cosines (candidate cell x query cell): (N, L) whether each query cell has a
    mutual nearest candidate cell above ``threshold``, (N, L) that cell, (N, L) its cosine."""
    best_candidate = sims.argmax(1)  # (N, L): each query cell's nearest candidate cell
    best_query = sims.argmax(2)  # (N, M): each candidate cell's nearest query cell
    mutual = np.take_along_axis(best_query, best_candidate, 1) == np.arange(sims.shape[2])[None]
    cosine = sims.max(1)
    return mutual & (cosine > threshold), best_candidate, cosine


def matched_cells(query_locals: np.ndarray, candidate_locals: np.ndarray,
                  threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """The cells :func:`mutual_match_share` counts for one pair: ((K, 2) int64 [query cell,
    candidate cell] indices, (K,) float32 cosines), strongest first. What the page draws."""
    query, candidate = _unit(query_locals), _unit(candidate_locals)
    if query.ndim != 2 or candidate.ndim != 2 or candidate.shape[1] != query.shape[1]:
        raise ValueError(f"local-match needs (L, D) and (M, D) locals, got {query.shape} and {candidate.shape}")
    if len(query) == 0 or len(candidate) == 0:
        return np.zeros((0, 2), np.int64), np.zeros(0, np.float32)
    matched, best, cosine = (a[0] for a in _mutual_matches(np.matmul(candidate, query.T)[None], threshold))
    cells = np.flatnonzero(matched)
    order = np.argsort(-cosine[cells], kind="stable")
    cells = cells[order]
    return np.stack([cells, best[cells]], 1).astype(np.int64), cosine[cells].astype(np.float32)


class LocalMatchReranker:
    """global similarity + ``setting.weight`` x :func:`mutual_match_share` (module doc)."""

    name = "local-match"

    def __init__(self, setting: LocalMatchSetting = LocalMatchSetting(), layout=None) -> None:  # noqa: ANN001
        self.setting = setting
        #: MatchCellsLayout of a model that stores match cells after its locals; None: the locals are the cells
        self.layout = layout

    def cells(self, local_desc: np.ndarray) -> np.ndarray:
        """The cells to match in stored local rows (..., rows, width)."""
        local_desc = np.asarray(local_desc)
        return local_desc if self.layout is None else self.layout.split(local_desc)[1]

    def rerank(self, query: RerankQuery, candidates: RerankCandidates) -> RerankResult:
        if query.local_desc is None or candidates.local_desc is None:
            raise ValueError("local-match needs the query's and the candidates' local descriptors")
        share = mutual_match_share(self.cells(query.local_desc), self.cells(candidates.local_desc),
                                   self.setting.threshold)
        result = sorted_result(np.asarray(candidates.global_scores, np.float32) + self.setting.weight * share)
        result.score_kind = SCORE_LOCAL_MATCH_FUSED
        return result


@RERANKERS.register("local-match", description="compares the photos part by part: the share of the query's "
                                               "small image cells that find a mutual match in the other photo "
                                               "is added to the global similarity. No training, a few ms; finds "
                                               "the same object among look-alikes more often than global search",
                    needs=(Need.LOCAL_DESCRIPTORS, Need.FINE_LOCALS), score=SCORE_LOCAL_MATCH_FUSED,
                    title="Local match")
def _local_match(setup: RerankerSetup) -> LocalMatchReranker:
    return LocalMatchReranker(LocalMatchSetting.for_model(setup.folder), match_cells_layout(setup.folder, setup.match_cells))


RERANKERS.offer("local-match+gv", "local-match's order, then images with a geometric match first (by inliers)",
                title="Local match then Geometric")
