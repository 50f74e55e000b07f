"""Rerankers: rescore a query's global top-K candidates (local descriptors, keypoints).

Every module of this package that defines a reranker is imported here, so each registers itself
in :data:`RERANKERS` just by existing: adding a reranker is one new file. Those modules import
torch and OpenCV inside the functions that score, so listing the registry (``waldo --help``) stays
fast; the modules that build the networks themselves (:data:`_SUPPORT_MODULES`) register nothing
and load when a name of theirs is first used: ``from waldo.rerank import RRTReranker`` and
``waldo.rerank.rrt_checkpoint`` work as if everything had been imported up front.
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

#: Modules that register no reranker and load torch or OpenCV at import: imported on first use.
#: A new reranker module must not be listed here (it would not register) and must keep torch
#: out of its module level (tests/test_cli_help.py fails if `waldo --help` loads torch).
_SUPPORT_MODULES = frozenset({"explain", "rrt", "rrt_checkpoint", "rrt_fast"})

#: Names re-exported from a module loaded on first access (PEP 562 ``__getattr__`` below).
_LAZY_NAMES = {
    "GeometricReranker": "gv",
    "GVConfig": "gv",
    "RerankingTransformer": "rrt",
    "RRTConfig": "rrt",
    "has_rrt": "rrt_checkpoint",
    "load_rrt": "rrt_checkpoint",
    "save_reranker": "rrt_checkpoint",
    "save_rrt": "rrt_checkpoint",
    "FusionReranker": "rrt_rerankers",
    "RRTReranker": "rrt_rerankers",
    "fuse_scores": "rrt_rerankers",
}

for _module in pkgutil.iter_modules(__path__):
    if _module.name not in _SUPPORT_MODULES:
        importlib.import_module(f"{__name__}.{_module.name}")


def __getattr__(name: str):
    if name in _LAZY_NAMES:
        value = getattr(importlib.import_module(f"{__name__}.{_LAZY_NAMES[name]}"), name)
        globals()[name] = value  # looked up once
        return value
    if name in _SUPPORT_MODULES:  # `import waldo.rerank` then `waldo.rerank.rrt_checkpoint.X`
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY_NAMES, *_SUPPORT_MODULES})


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
