"""Waldo's index: exact kNN search and the persistent, crash-safe descriptor store.

Flat re-exports so callers write ``from waldo.index import IndexStore, exact_knn``.
"""

from waldo.index.db import IndexedImage
from waldo.index.errors import (
    IndexBusyError,
    IndexCorruptError,
    IndexMismatchError,
    IndexResourceError,
    StorageFullError,
    UnknownIdError,
)
from waldo.index.keypoints import RaggedKeypoints
from waldo.index.knn import exact_knn, numpy_knn, search_flat_index
from waldo.index.maintenance import MergePolicy
from waldo.index.snapshot import SearchResult, Snapshot
from waldo.index.store import AddResult, IndexStore

__all__ = [
    "AddResult",
    "IndexBusyError",
    "IndexCorruptError",
    "IndexMismatchError",
    "IndexResourceError",
    "IndexStore",
    "IndexedImage",
    "MergePolicy",
    "RaggedKeypoints",
    "SearchResult",
    "Snapshot",
    "StorageFullError",
    "UnknownIdError",
    "exact_knn",
    "numpy_knn",
    "search_flat_index",
]
