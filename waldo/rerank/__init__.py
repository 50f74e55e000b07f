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

__all__ = [
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
