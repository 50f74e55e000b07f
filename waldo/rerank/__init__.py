"""Rerankers: rescore a query's global top-K candidates (local descriptors, keypoints).

Every module of this package is imported here, so each reranker module registers itself in
:data:`RERANKERS` just by existing: adding a reranker is one new file.
"""

import importlib
import pkgutil

from waldo.rerank.base import (
    NO_RERANK,
    RERANKERS,
    Need,
    RerankCandidates,
    Reranker,
    RerankerSetup,
    RerankerSpec,
    RerankQuery,
    RerankResult,
    SequentialReranker,
)
from waldo.rerank.gv import GeometricReranker, GVConfig
from waldo.rerank.rrt import RerankingTransformer, RRTConfig
from waldo.rerank.rrt_checkpoint import has_rrt, load_rrt, save_reranker, save_rrt
from waldo.rerank.rrt_rerankers import FusionReranker, RRTReranker, fuse_scores

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "NO_RERANK",
    "RERANKERS",
    "FusionReranker",
    "GVConfig",
    "GeometricReranker",
    "Need",
    "RRTConfig",
    "RRTReranker",
    "RerankCandidates",
    "RerankQuery",
    "RerankResult",
    "Reranker",
    "RerankerSetup",
    "RerankerSpec",
    "RerankingTransformer",
    "SequentialReranker",
    "fuse_scores",
    "has_rrt",
    "load_rrt",
    "save_reranker",
    "save_rrt",
]
