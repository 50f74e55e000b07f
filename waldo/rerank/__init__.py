"""Rerankers: rescore a query's global top-K candidates from local descriptors."""

from waldo.rerank.rrt import (
    SEGMENT_CANDIDATE,
    SEGMENT_CANDIDATE_GLOBAL,
    SEGMENT_CLS,
    SEGMENT_QUERY,
    SEGMENT_QUERY_GLOBAL,
    SEGMENT_SEP,
    RerankingTransformer,
    RRTConfig,
    flops_per_pair,
    sine_position_embedding,
)

from waldo.rerank.base import (
    RERANKERS,
    FusionReranker,
    RerankCandidates,
    Reranker,
    RerankQuery,
    RerankResult,
    RRTReranker,
    create_reranker,
    fuse_scores,
    reranker_names,
)
from waldo.rerank.rrt_checkpoint import has_rrt, load_rrt, save_reranker, save_rrt

__all__ = [
    "RERANKERS",
    "FusionReranker",
    "RerankCandidates",
    "RerankQuery",
    "RerankResult",
    "Reranker",
    "RRTReranker",
    "create_reranker",
    "fuse_scores",
    "has_rrt",
    "load_rrt",
    "reranker_names",
    "save_reranker",
    "save_rrt",
    "SEGMENT_CANDIDATE",
    "SEGMENT_CANDIDATE_GLOBAL",
    "SEGMENT_CLS",
    "SEGMENT_QUERY",
    "SEGMENT_QUERY_GLOBAL",
    "SEGMENT_SEP",
    "RRTConfig",
    "RerankingTransformer",
    "flops_per_pair",
    "sine_position_embedding",
]
