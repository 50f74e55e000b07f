"""The RRT rerankers, registered in :data:`~waldo.rerank.base.RERANKERS`; each reads the trained
RRT stored beside the model (``rrt.json``, see waldo.rerank.rrt_checkpoint):

- ``rrt``: sort by the RRT logit alone, as the reference does (scores reported as the logit's
  probability, sigmoid(logit): same order, a unit people read);
- ``rrt-fusion``: sort by ``lambda * global + (1 - lambda) * sigmoid(logit)``, with the lambda
  chosen on held-out training identities when the reranker was trained (``rrt.json``);
- ``rrt-consensus``: the RRT logit plus how alike each candidate is to the RRT's own first
  candidates (neighbourhood consensus, :func:`neighbour_consensus`): a wrong first answer that
  looks like the query but not like the other photos ranked high is pushed down.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

# torch and the RRT modules are imported where a reranker is built or scores: importing this
# module registers "rrt" and "rrt-fusion", which `waldo --help` lists, and must not load torch.
from waldo.rerank.base import (
    RERANKERS,
    SCORE_RRT_CONSENSUS,
    SCORE_RRT_FUSED,
    SCORE_RRT_PROBABILITY,
    Need,
    RerankCandidates,
    RerankerSetup,
    RerankQuery,
    RerankResult,
    sorted_result,
)

if TYPE_CHECKING:
    import torch

    from waldo.rerank.rrt import RerankingTransformer
    from waldo.rerank.rrt_fast import FastRRTScorer

__all__ = ["CONSENSUS_K", "CONSENSUS_WEIGHT", "PRECISIONS", "ConsensusReranker", "FusionReranker", "RRTReranker",
           "consensus_setting", "fuse_scores", "neighbour_consensus", "resolve_precision"]

#: rrt-consensus's setting where a model's rrt.json records none (``training["consensus"]``):
#: the one chosen on make demo's fair validation (experiments/rrt_consensus.py: the RRT's first 3
#: candidates, weighed like the query's own global similarity).
CONSENSUS_K = 3
CONSENSUS_WEIGHT = 1.0


def fuse_scores(global_scores: np.ndarray, logits: np.ndarray, weight: float) -> np.ndarray:
    """``weight * global + (1 - weight) * sigmoid(logit)``, elementwise, float32. weight 1 is
    global search alone, 0 the RRT alone (sigmoid keeps the logits' order)."""
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"fusion weight must be in [0, 1], got {weight}")
    logits = np.asarray(logits, np.float64)
    probability = 1.0 / (1.0 + np.exp(-logits))
    return (weight * np.asarray(global_scores, np.float64) + (1.0 - weight) * probability).astype(np.float32)


def neighbour_consensus(scores: np.ndarray, cand_global: np.ndarray, k: int) -> np.ndarray:
    """How alike each candidate is to the ``k`` best-scored candidates other than itself: the
    mean cosine of its global descriptor to theirs (database-side query expansion without the
    candidate's own term, so a candidate is never lifted by its similarity to itself).

    ``scores`` (..., N): the ranking whose first ``k`` are the neighbours (ties keep list order);
    ``cand_global`` (..., N, D): unit global descriptors. Returns (..., N) float32; a candidate
    with no other neighbour (N = 1) gets 0."""
    scores = np.asarray(scores)
    cand_global = np.asarray(cand_global, np.float32)
    if cand_global.shape[:-1] != scores.shape:
        raise ValueError(f"scores {scores.shape} and candidate descriptors {cand_global.shape} disagree")
    if k < 1:
        raise ValueError(f"k must be positive, got {k}")
    n = scores.shape[-1]
    if n == 0:
        return np.zeros(scores.shape, np.float32)
    k = min(k, n)
    first = np.argsort(-scores, axis=-1, kind="stable")[..., :k]  # positions of the neighbours
    neighbours = np.take_along_axis(cand_global, first[..., None], -2)  # (..., k, D)
    total = np.einsum("...kd,...nd->...n", neighbours, cand_global)
    is_neighbour = np.zeros(scores.shape, bool)
    np.put_along_axis(is_neighbour, first, True, -1)
    own = np.einsum("...nd,...nd->...n", cand_global, cand_global)
    total = total - np.where(is_neighbour, own, 0.0)
    count = k - is_neighbour.astype(np.float32)
    return np.where(count > 0, total / np.maximum(count, 1), 0.0).astype(np.float32)


def probabilities(logits: np.ndarray) -> np.ndarray:
    """sigmoid(logits) as float32, computed in float64 (no overflow warnings for large logits)."""
    return (1.0 / (1.0 + np.exp(-np.asarray(logits, np.float64)))).astype(np.float32)


def _as_float_tensor(array: np.ndarray | torch.Tensor) -> torch.Tensor:
    import torch

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
        from waldo.rerank.rrt_fast import supports_fast_bf16

        return "bf16" if supports_fast_bf16() else "fp32"
    return precision


def colour_tokens_error(rrt_config: dict, model_config: dict) -> str | None:
    """Why an RRT (its rrt.json ``rrt`` settings) cannot serve with a model (its config.json
    fields), or None: an RRT whose global token is the model's global descriptor cannot read a
    descriptor that carries colour (ModelConfig.colour_weight); the wider descriptor would
    silently turn the token into the locals' mean (waldo.models.descriptor.global_tokens), not
    what the RRT was trained on. An RRT whose token is the locals' mean (a wider global
    descriptor, as make demo's) reads colour through its residual only."""
    width = model_config.get("global_dim") or model_config.get("dim")
    if rrt_config.get("use_global_tokens") and model_config.get("colour_weight") and rrt_config.get("d_model") == width:
        return (f"this RRT reads the {width}-d global descriptor as a token, and the model's descriptor carries "
                "colour (colour_weight); drop colour_weight or train the RRT on the coloured model")
    return None


def set_colour_weight(model, config, weight: float | None, model_dir: str | Path | None = None) -> None:
    """Give ``model`` and its ``config`` the colour term at ``weight`` (None: leave them; 0: none),
    refusing first when the RRT stored in ``model_dir`` could not serve the coloured descriptor
    (:func:`colour_tokens_error`). Appended after the global head: no fitted part depends on it."""
    if weight is None:
        return
    if not weight >= 0:
        raise ValueError(f"colour_weight must be >= 0, got {weight}")
    if model_dir is not None:
        from waldo.rerank.rrt_checkpoint import has_rrt, read_rrt_info

        if has_rrt(model_dir):
            error = colour_tokens_error(read_rrt_info(model_dir)["rrt"], {**config.model_dump(), "colour_weight": weight})
            if error:
                raise ValueError(f"{model_dir}: {error}")
    config.colour_weight = model.colour_weight = float(weight)


def check_colour_tokens(rrt, folder: Path) -> None:
    """:func:`colour_tokens_error` for a loaded RRT and its model folder's config.json."""
    import json

    config_file = folder / "config.json"
    if not config_file.is_file():
        return
    error = colour_tokens_error({"use_global_tokens": rrt.config.use_global_tokens, "d_model": rrt.config.d_model},
                                json.loads(config_file.read_text(encoding="utf-8")))
    if error:
        raise ValueError(f"{folder}: {error}")


class RRTReranker:
    """Sort candidates by the RRT logit; one forward pass scores ``batch_size`` pairs (100 = the
    whole top-100 at once). ``fusion_weight`` is what the trainer chose on validation, if any.
    ``precision``: see :data:`PRECISIONS`. ``compile``: run the inference scorer through
    torch.compile (waldo.rerank.rrt_fast; 10-20 s at the first query, then about 2x faster);
    ignored for ``precision="reference"``."""

    name = "rrt"

    def __init__(self, rrt: RerankingTransformer, *, grid: tuple[int, int] = (7, 7), batch_size: int = 100,
                 fusion_weight: float | None = None, precision: str = "reference",
                 compile: bool = False, tokens: int | None = None) -> None:
        self.rrt = rrt
        self.grid = tuple(grid)
        #: how many leading local rows are the RRT's tokens when a model stores match cells after
        #: them (waldo.models.descriptor.MatchCellsLayout); None: every row is a token
        self.tokens = tokens
        self.batch_size = batch_size
        self.fusion_weight = fusion_weight
        self.precision = resolve_precision(precision)
        self._scorer: FastRRTScorer | None = None
        if self.precision != "reference":
            import torch

            from waldo.rerank.rrt_fast import FastRRTScorer

            dtype = torch.bfloat16 if self.precision == "bf16" else torch.float32
            self._scorer = FastRRTScorer(rrt, dtype=dtype, grid=self.grid, compile=compile)

    @classmethod
    def from_folder(cls, folder: str | Path, *, batch_size: int = 100, precision: str = "reference",
                    compile: bool = False, match_cells: dict | None = None) -> RRTReranker:
        """The RRT stored in ``folder``; ``match_cells``: the layout of a model prepared in memory
        (else the folder's config.json says whether match cells follow the tokens)."""
        from waldo.rerank.local_match import match_cells_layout
        from waldo.rerank.rrt_checkpoint import load_rrt

        rrt, info = load_rrt(folder)
        check_colour_tokens(rrt, Path(folder))
        weight = info.get("training", {}).get("fusion_weight")
        layout = match_cells_layout(Path(folder), match_cells)
        return cls(rrt, grid=tuple(info.get("grid", (7, 7))), batch_size=batch_size,
                   fusion_weight=None if weight is None else float(weight), precision=precision,
                   compile=compile, tokens=None if layout is None else layout.tokens)

    def logits(self, query: RerankQuery, candidates: RerankCandidates) -> np.ndarray:
        """(N,) float32 logits, one per candidate (the query locals are shared, not copied)."""
        import torch

        from waldo.models.descriptor import rrt_global_inputs

        if len(candidates.global_scores) == 0:
            return np.zeros(0, np.float32)
        if self.tokens is not None:  # the rows after the tokens are match cells, local-match's
            query = RerankQuery(query.local_desc[: self.tokens], query.global_desc, query.keypoints)
            candidates = RerankCandidates(candidates.local_desc[:, : self.tokens], candidates.global_scores,
                                          candidates.global_desc, candidates.keypoints, candidates.ordered_by)
        globals_ = {}
        if self.rrt.config.use_global_tokens:  # the two extra tokens carry the global descriptors
            if query.global_desc is None or candidates.global_desc is None:
                raise ValueError("this RRT uses global tokens: the query and candidates need global_desc")
            query_global, query_skip = rrt_global_inputs(self.rrt, _as_float_tensor(query.global_desc)[None],
                                                         _as_float_tensor(query.local_desc)[None])
            cand_globals, cand_skips = rrt_global_inputs(self.rrt, _as_float_tensor(candidates.global_desc),
                                                         _as_float_tensor(candidates.local_desc))
            globals_ = {"query_global": query_global[0], "cand_globals": cand_globals,
                        "query_skip": None if query_skip is None else query_skip[0], "cand_skips": cand_skips}
        if self._scorer is not None:
            embedded = self._scorer.embed_candidates(torch.as_tensor(np.asarray(candidates.local_desc)),
                                                     globals_.get("cand_globals"))
            scores = self._scorer.score(torch.as_tensor(np.asarray(query.local_desc)), embedded,
                                        query_global=globals_.get("query_global"), batch_size=self.batch_size)
            with torch.inference_mode():  # the fast scorer reads the encoder only; the residuals are added here
                skip = self.rrt.skip_logit(*self.rrt.skip_inputs(
                    globals_.get("query_global"), globals_.get("cand_globals"), globals_.get("query_skip"),
                    globals_.get("cand_skips")))
                match = self.rrt.match_logit(_as_float_tensor(query.local_desc), _as_float_tensor(candidates.local_desc))
            if skip is not None:
                scores = scores + skip.float()
            if match is not None:
                scores = scores + match.float()
        else:
            scores = self.rrt.score_candidates(_as_float_tensor(query.local_desc),
                                               _as_float_tensor(candidates.local_desc),
                                               grid=self.grid, batch_size=self.batch_size, **globals_)
        return scores.numpy().astype(np.float32)

    def rerank(self, query: RerankQuery, candidates: RerankCandidates) -> RerankResult:
        """Sorted by logit (float32 probabilities saturate at 1 and would tie); scored by the
        logit's probability."""
        logits = self.logits(query, candidates)
        result = sorted_result(logits)
        probability = probabilities(result.scores)
        return RerankResult(result.order, probability, rrt_scores=probability, score_kind=SCORE_RRT_PROBABILITY)


class FusionReranker:
    """Sort by :func:`fuse_scores` of the global score and the RRT's probability."""

    name = "rrt-fusion"

    def __init__(self, rrt: RRTReranker, weight: float) -> None:
        fuse_scores(np.zeros(0), np.zeros(0), weight)  # validates the weight
        self.rrt = rrt
        self.weight = float(weight)

    def rerank(self, query: RerankQuery, candidates: RerankCandidates) -> RerankResult:
        logits = self.rrt.logits(query, candidates)
        result = sorted_result(fuse_scores(candidates.global_scores, logits, self.weight))
        return RerankResult(result.order, result.scores, rrt_scores=probabilities(logits[result.order]),
                            score_kind=SCORE_RRT_FUSED)


class ConsensusReranker:
    """Sort by the RRT logit plus ``weight * a * consensus``: :func:`neighbour_consensus` over the
    RRT's first ``k`` candidates, ``a`` the RRT's global-residual scale (its logit counts the
    query's own global similarity ``a`` times, so ``weight`` 1 weighs the neighbours' agreement
    like the query's). Scored by the combined logit's probability; ``rrt_score`` stays the
    RRT's own."""

    name = "rrt-consensus"

    def __init__(self, rrt: RRTReranker, k: int = CONSENSUS_K, weight: float = CONSENSUS_WEIGHT) -> None:
        if not rrt.rrt.config.global_skip:
            raise ValueError("rrt-consensus weighs the neighbours by the RRT's global-residual scale: this RRT "
                             "has no global residual (global_skip); use rrt or rrt-fusion")
        if int(k) < 1 or not np.isfinite(weight) or weight < 0:
            raise ValueError(f"rrt-consensus needs k >= 1 and a weight >= 0, got k={k}, weight={weight}")
        self.rrt, self.k, self.weight = rrt, int(k), float(weight)
        self.scale = float(rrt.rrt.global_skip_scale.detach())

    def rerank(self, query: RerankQuery, candidates: RerankCandidates) -> RerankResult:
        if candidates.global_desc is None:
            raise ValueError("rrt-consensus compares the candidates' global descriptors: pass global_desc")
        logits = self.rrt.logits(query, candidates)
        combined = logits + self.weight * self.scale * neighbour_consensus(logits, candidates.global_desc, self.k)
        result = sorted_result(combined)
        return RerankResult(result.order, probabilities(result.scores), rrt_scores=probabilities(logits[result.order]),
                            score_kind=SCORE_RRT_CONSENSUS)


def consensus_setting(training: dict) -> tuple[int, float]:
    """(k, weight) of rrt-consensus from rrt.json's ``training["consensus"]``, else the defaults
    (:data:`CONSENSUS_K`, :data:`CONSENSUS_WEIGHT`)."""
    entry = training.get("consensus") if isinstance(training, dict) else None
    if not isinstance(entry, dict):
        return CONSENSUS_K, CONSENSUS_WEIGHT
    return int(entry.get("k", CONSENSUS_K)), float(entry.get("weight", CONSENSUS_WEIGHT))


_RRT_NEEDS = (Need.LOCAL_DESCRIPTORS, Need.TRAINED_RRT)


@RERANKERS.register("rrt", description="a trained Reranking Transformer reads the local features of both photos "
                                       "and scores whether they show the same object; its score alone orders "
                                       "the global top-100", needs=_RRT_NEEDS, score=SCORE_RRT_PROBABILITY,
                    title="RRT")
def _rrt(setup: RerankerSetup) -> RRTReranker:
    return RRTReranker.from_folder(setup.folder, precision=setup.precision, compile=setup.compile,
                                   match_cells=setup.match_cells)


@RERANKERS.register("rrt-fusion", description="the RRT's probability mixed with the global similarity "
                                              "(weight chosen on validation)", needs=_RRT_NEEDS,
                    score=SCORE_RRT_FUSED, title="RRT + global")
def _rrt_fusion(setup: RerankerSetup) -> FusionReranker:
    rrt = _rrt(setup)
    if rrt.fusion_weight is None:
        raise ValueError(f"{setup.folder}/rrt.json has no fusion_weight (chosen on validation at the end of "
                         f"training); finish training first")
    return FusionReranker(rrt, rrt.fusion_weight)


@RERANKERS.register("rrt-consensus", description="the RRT's score plus how alike each photo is to the RRT's own "
                                                 "first few results: a look-alike that matches the query but not "
                                                 "the others is pushed down (setting chosen on validation)",
                    needs=(*_RRT_NEEDS, Need.RRT_GLOBAL_RESIDUAL), score=SCORE_RRT_CONSENSUS,
                    title="RRT + neighbours")
def _rrt_consensus(setup: RerankerSetup) -> ConsensusReranker:
    from waldo.rerank.rrt_checkpoint import read_rrt_info

    k, weight = consensus_setting(read_rrt_info(setup.folder).get("training", {}))
    return ConsensusReranker(_rrt(setup), k, weight)
