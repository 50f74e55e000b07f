"""The reranker interface and the one registry every reranker is listed in.

A :class:`Reranker` gets the query's inputs and its candidates' (best global first) and returns
a new order with the scores that produced it. Each reranker module registers itself in
:data:`RERANKERS` with what it needs (:class:`Need`) and a one-line description; the package
imports every module, so adding a reranker is one new file. ``"a+b"`` composes: ``a`` reorders
the candidates, then ``b`` reranks ``a``'s order (:class:`SequentialReranker`).

Sorting is stable, so candidates with equal scores keep their prior order. Every result says
what its scores are (:data:`SCORE_KINDS`): a user is shown the number that ordered the list, in
its own unit, never a placeholder.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np

if TYPE_CHECKING:  # annotations only: listing the registry (`waldo --help`) must not load torch or OpenCV
    import torch

    from waldo.models.keypoints import LocalFeatures

__all__ = [
    "NO_RERANK",
    "NO_RERANK_DESCRIPTION",
    "NO_RERANK_TITLE",
    "RERANKERS",
    "Need",
    "RerankCandidates",
    "RerankQuery",
    "RerankResult",
    "Reranker",
    "RerankerRegistry",
    "RerankerSetup",
    "RerankerSpec",
    "SCORE_KINDS",
    "SequentialReranker",
    "sorted_result",
]


#: The rerank value that keeps the global ranking; its short name and explanation for people.
NO_RERANK = "none"
NO_RERANK_TITLE = "Global only"
NO_RERANK_DESCRIPTION = ("ranks by overall appearance: one descriptor per photo, compared by cosine similarity. "
                         "Fastest; finds look-alikes, may mix up variants of one brand")

#: What a ranking's ``score`` is (``RerankResult.score_kind``, a search response's
#: ``score_kind``): the kind -> one sentence a user reads. Each reranker names its kind.
SCORE_SIMILARITY = "similarity"
SCORE_GV_FUSED = "similarity + geometry bonus"
SCORE_INLIERS = "inliers"
SCORE_RRT_PROBABILITY = "RRT probability"
SCORE_RRT_FUSED = "similarity + RRT probability"
SCORE_LOCAL_MATCH_FUSED = "similarity + matched cells"
SCORE_RRT_CONSENSUS = "RRT + neighbours probability"
SCORE_KINDS: dict[str, str] = {
    SCORE_SIMILARITY: "cosine similarity of the global descriptors (-1 to 1; higher is more alike)",
    SCORE_GV_FUSED: "the global similarity plus a bonus for an image with at least the minimum inliers of a "
                    "geometric match, growing slowly with their number",
    SCORE_INLIERS: "inlier count of a geometric match (at least the minimum); 0 for an image without one, "
                   "which keeps the prior order behind the matched ones",
    SCORE_RRT_PROBABILITY: "the Reranking Transformer's probability that both photos show the same object (0 to 1)",
    SCORE_RRT_FUSED: "a weighted sum of the global similarity and the RRT's probability (weight chosen on "
                     "validation)",
    SCORE_LOCAL_MATCH_FUSED: "the global similarity plus a weighted share (0 to 1) of the query's image cells "
                             "that have a mutual match in the other photo (weight chosen on validation)",
    SCORE_RRT_CONSENSUS: "the probability (0 to 1) of the RRT's score plus a bonus for looking like the RRT's own "
                         "first results (neighbourhood consensus; its weight chosen on validation)",
}


@dataclass
class RerankQuery:
    """local_desc (L, D) float16/32, not normalised; global_desc (D,) float32; keypoints: the
    query image's SIFT. Each is needed only by the rerankers that declare it (:class:`Need`)."""

    local_desc: np.ndarray | torch.Tensor | None
    global_desc: np.ndarray | torch.Tensor | None = None
    keypoints: LocalFeatures | None = None


@dataclass
class RerankCandidates:
    """N candidates, best global first. local_desc (N, L, D) float16/32; global_scores (N,)
    float32 inner products with the query; global_desc (N, D) float32, needed only by an RRT
    with ``use_global_tokens``; keypoints: N images' local features, for geometric
    verification. ``ordered_by``: whose order the candidates are in ("global", or the reranker
    before this one in a composition)."""

    local_desc: np.ndarray | torch.Tensor | None
    global_scores: np.ndarray
    global_desc: np.ndarray | torch.Tensor | None = None
    keypoints: Sequence[LocalFeatures] | None = None
    ordered_by: str = "global"

    def __post_init__(self) -> None:
        n = len(self.global_scores)
        for name, value in (("local_desc", self.local_desc), ("global_desc", self.global_desc),
                            ("keypoints", self.keypoints)):
            if value is not None and len(value) != n:
                raise ValueError(f"{len(value)} candidate {name} but {n} global scores")

    def __len__(self) -> int:
        return len(self.global_scores)

    def reordered(self, order: np.ndarray, by: str) -> RerankCandidates:
        """The same candidates in ``order`` (positions into this list), which reranker ``by``
        chose."""
        def pick(values):
            if values is None:
                return None
            return [values[i] for i in order] if isinstance(values, list | tuple) else values[order]

        return RerankCandidates(pick(self.local_desc), self.global_scores[order], pick(self.global_desc),
                                pick(self.keypoints), by)


@dataclass
class RerankResult:
    """order (N,) int64: candidate positions, best first; scores (N,) float32: each reordered
    candidate's score (descending), of kind ``score_kind`` (a key of :data:`SCORE_KINDS`; None:
    the registered spec's). A verifying reranker also says, in the same order, each
    candidate's ``inliers`` (N,) int32 and whether it was ``verified`` (N,) bool; an RRT each
    candidate's ``rrt_scores`` (N,) float32 probability; any may leave a ``note`` for the user
    (e.g. why nothing could be verified)."""

    order: np.ndarray
    scores: np.ndarray
    inliers: np.ndarray | None = None
    verified: np.ndarray | None = None
    note: str = ""
    rrt_scores: np.ndarray | None = None
    score_kind: str | None = None


@runtime_checkable
class Reranker(Protocol):
    name: str

    def rerank(self, query: RerankQuery, candidates: RerankCandidates) -> RerankResult: ...


def sorted_result(scores: np.ndarray) -> RerankResult:
    """Candidates by descending ``scores``, ties in prior order."""
    scores = np.asarray(scores, np.float32)
    order = np.argsort(-scores, kind="stable").astype(np.int64)
    return RerankResult(order, scores[order])


class Need(enum.Enum):
    """What a reranker needs beyond the global ranking; an index offers a reranker only when it
    has all of them (:meth:`RerankerRegistry.supported`)."""

    LOCAL_DESCRIPTORS = "local descriptors"
    KEYPOINTS = "local-feature keypoints"
    TRAINED_RRT = "a trained RRT (rrt.json beside the model, from `waldo train rrt`)"
    FINE_LOCALS = "local descriptors of a finer backbone stage (an index built with --local-stage)"
    RRT_GLOBAL_RESIDUAL = ("an RRT with a global residual (`global_skip`, as every RRT trained from augmented views "
                           "has; not the seed's)")


@dataclass(frozen=True)
class RerankerSetup:
    """What a builder may read: the model folder (holding ``rrt.json`` when an RRT was trained)
    and how RRTs score (see waldo.rerank.rrt_rerankers.PRECISIONS)."""

    folder: Path | None = None
    precision: str = "reference"
    compile: bool = False
    #: where match cells sit in the local rows (waldo.models.descriptor.MatchCellsLayout.to_json()),
    #: for a model prepared in memory; None: the model folder's config.json says (or there are none)
    match_cells: dict | None = None


@dataclass(frozen=True)
class RerankerSpec:
    """A registered reranker: ``build(setup) -> Reranker``; ``score`` names what its scores
    usually are (a key of :data:`SCORE_KINDS`; a result may say otherwise, e.g. "gv" on another
    reranker's order counts inliers); ``title`` is its short name on the page."""

    name: str
    description: str
    needs: frozenset[Need]
    build: Callable[[RerankerSetup], Reranker]
    score: str = SCORE_SIMILARITY
    title: str = ""
    #: its score kind as a later stage of a composition ("gv" after "rrt" counts inliers); None: ``score``
    score_after: str | None = None


class SequentialReranker:
    """``stages[0]`` reorders the candidates, each next stage reranks the previous order; the
    scores and notes are the last stage's; evidence (inliers, verified, RRT probabilities) is
    the last stage's that reported it, carried to the final order."""

    def __init__(self, name: str, stages: Sequence[Reranker]) -> None:
        self.name = name
        self.stages = list(stages)

    def rerank(self, query: RerankQuery, candidates: RerankCandidates) -> RerankResult:
        order = np.arange(len(candidates), dtype=np.int64)
        evidence: dict[str, np.ndarray] = {}  # name -> values per candidate position

        def keep_evidence(result: RerankResult, order: np.ndarray) -> None:
            for name in ("inliers", "verified", "rrt_scores"):
                values = getattr(result, name)
                if values is not None:
                    by_position = np.empty_like(values)
                    by_position[order] = values
                    evidence[name] = by_position

        result = self.stages[0].rerank(query, candidates)
        order = order[result.order]
        keep_evidence(result, order)
        for before, stage in zip(self.stages, self.stages[1:]):
            result = stage.rerank(query, candidates.reordered(order, before.name))
            order = order[result.order]
            keep_evidence(result, order)
        final = {name: values[order] for name, values in evidence.items()}
        return RerankResult(order, result.scores, final.get("inliers"), final.get("verified"), result.note,
                            final.get("rrt_scores"), result.score_kind)


class RerankerRegistry:
    """name -> :class:`RerankerSpec`, in registration order; ``"a+b"`` names a composition."""

    def __init__(self) -> None:
        self._specs: dict[str, RerankerSpec] = {}
        self._offered: dict[str, tuple[str, str]] = {}  # composition -> (description, title)

    def register(self, name: str, *, description: str, needs: Iterable[Need] = (),
                 score: str = SCORE_SIMILARITY, title: str = "",
                 score_after: str | None = None) -> Callable[[Callable[[RerankerSetup], Reranker]], Callable]:
        """Decorate ``builder(setup) -> Reranker`` to list it under ``name`` (``title``: its short
        name for people, default ``name``; ``score``: a key of :data:`SCORE_KINDS`)."""
        if "+" in name or name == NO_RERANK:
            raise ValueError(f"reranker name {name!r} is reserved ('+' composes, 'none' is no reranking)")
        for kind in (score, score_after or score):
            if kind not in SCORE_KINDS:
                raise ValueError(f"score kind {kind!r} is not one of {', '.join(SCORE_KINDS)}")

        def decorator(builder: Callable[[RerankerSetup], Reranker]) -> Callable:
            if name in self._specs:
                raise ValueError(f"reranker {name!r} is registered twice")
            self._specs[name] = RerankerSpec(name, description, frozenset(needs), builder, score, title or name,
                                             score_after)
            return builder

        return decorator

    def offer(self, composition: str, description: str, title: str = "") -> None:
        """List a composition (e.g. ``"rrt+gv"``) beside the single rerankers; its parts may
        register later (modules import in any order)."""
        self._offered[composition] = (description, title)

    def spec(self, name: str) -> RerankerSpec:
        """The spec of a registered name or of any composition ``"a+b[+c...]"`` of them."""
        if name in self._specs:
            return self._specs[name]
        parts = name.split("+")
        if len(parts) < 2 or any(part not in self._specs for part in parts):
            raise ValueError(f"unknown reranker {name!r}; known: {', '.join(self.names())} "
                             f"(or 'a+b': a reorders, then b reranks a's order)")
        stages = [self._specs[part] for part in parts]

        def build(setup: RerankerSetup) -> Reranker:
            return SequentialReranker(name, [stage.build(setup) for stage in stages])

        offered, title = self._offered.get(name, ("", ""))
        description = offered or ", then ".join(stage.description for stage in stages)
        return RerankerSpec(name, description, frozenset().union(*(stage.needs for stage in stages)), build,
                            stages[-1].score_after or stages[-1].score,
                            title or " then ".join(stage.title for stage in stages))

    def names(self) -> list[str]:
        """Registered rerankers, then offered compositions, each in registration order."""
        return [*self._specs, *self._offered]

    def supported(self, available: Iterable[Need]) -> list[str]:
        """The listed names whose needs are all ``available``."""
        have = set(available)
        return [name for name in self.names() if self.spec(name).needs <= have]

    def create(self, name: str, setup: RerankerSetup = RerankerSetup()) -> Reranker:
        spec = self.spec(name)
        if Need.TRAINED_RRT in spec.needs and setup.folder is None:
            raise ValueError(f"reranker {name!r} needs {Need.TRAINED_RRT.value}: give its model folder (--model)")
        return spec.build(setup)

    def __contains__(self, name: object) -> bool:
        return name in self._specs or name in self._offered


#: Every reranker, registered by its module (``waldo.rerank`` imports them all).
RERANKERS = RerankerRegistry()
