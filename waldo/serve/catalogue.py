"""What the service reads and maintains of an index besides searching it: its catalogue.

The service (waldo.serve.service) serves three kinds of engine through one surface: a single
index (:class:`waldo.Waldo`), a sharded index in this process (:class:`waldo.sharded.ShardedWaldo`)
and a sharded index served by Ray Serve deployments (:mod:`waldo.serve.cluster`). Searching,
adding and removing are the engines' own methods; everything else the service needs (is this
path indexed, which file is image 42, counts for /stats, merging small segments) goes through
a catalogue: :class:`StoresCatalogue` here for the first two, ``ClusterCatalogue`` for Ray.

Ids are the engine's: a single index's own, a sharded index's ``local_id * N + shard``
(waldo.index.shards.global_id, equal to the local id when N = 1).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from waldo.index import IndexedImage, IndexStore
from waldo.index.shards import distinct_identities, global_id, shard_of, split_id

__all__ = ["StoresCatalogue", "collection_root", "common_root", "group_by_shard", "merge_info"]


def collection_root(paths: Sequence[str], index_root: Path) -> Path | None:
    """The deepest folder holding every indexed file outside the index folder, or None."""
    outside = [p for p in paths if not p.startswith(str(index_root) + os.sep)]
    if not outside:
        return None
    try:
        common = Path(os.path.commonpath(outside))
    except ValueError:  # mixed absolute and relative paths
        return None
    return common.parent if len(outside) == 1 else common


def group_by_shard(paths: Sequence[str], n: int) -> dict[int, list[int]]:
    """Positions of ``paths`` grouped by the shard (of ``n``) that owns each path, in input order."""
    groups: dict[int, list[int]] = {}
    for position, path in enumerate(paths):
        groups.setdefault(shard_of(os.fspath(path), n) if n > 1 else 0, []).append(position)
    return groups


def common_root(roots: Sequence[Path | None]) -> Path | None:
    """The deepest folder holding every one of several shards' collection roots."""
    found = [str(root) for root in roots if root is not None]
    if not found:
        return None
    try:
        return Path(os.path.commonpath(found))
    except ValueError:
        return None


def merge_info(rows: Sequence[dict[str, Any]], identities: int) -> dict[str, Any]:
    """The service's counts (``count``, ``identities``, ``bytes`` per part, ``segments``) of a
    sharded index from its shards' :meth:`IndexStore.info` rows; ``identities`` is counted
    across shards by the caller (an identity can live in several)."""
    parts = dict.fromkeys(part for row in rows for part in row["bytes"])
    return {"count": sum(row["count"] for row in rows), "identities": identities,
            "bytes": {part: sum(row["bytes"].get(part, 0) for row in rows) for part in parts},
            "segments": [segment for row in rows for segment in row["segments"]]}


class StoresCatalogue:
    """The catalogue of an index whose shards' stores are open in this process: one store (a
    single index, where every method is the store's own) or N (a sharded index: each path is
    asked of the shard that owns it, each id of the shard it encodes)."""

    def __init__(self, stores: Sequence[IndexStore], shard_dirs: Sequence[Path] | None = None) -> None:
        self.stores = list(stores)
        self.n = len(self.stores)
        self.shard_dirs = list(shard_dirs) if shard_dirs is not None else None

    @property
    def lock_timeout(self) -> float | None:
        return self.stores[0].lock_timeout

    @lock_timeout.setter
    def lock_timeout(self, seconds: float | None) -> None:
        for store in self.stores:
            store.lock_timeout = seconds

    def _global(self, record: IndexedImage, shard: int) -> IndexedImage:
        return record if self.n == 1 else dataclasses.replace(record, id=global_id(record.id, shard, self.n))

    def contains_paths(self, paths: Sequence[str]) -> list[bool]:
        found = [False] * len(paths)
        for shard, positions in group_by_shard(paths, self.n).items():
            for position, ok in zip(positions, self.stores[shard].contains_paths([paths[i] for i in positions])):
                found[position] = ok
        return found

    def records_for_paths(self, paths: Sequence[str]) -> list[IndexedImage]:
        """The live images with these paths, in no particular order (unknown paths skipped)."""
        out = []
        for shard, positions in group_by_shard(paths, self.n).items():
            out += [self._global(r, shard) for r in self.stores[shard].records_for_paths([paths[i] for i in positions])]
        return out

    def get(self, image_id: int) -> IndexedImage:
        """One live image's metadata; UnknownIdError (a KeyError) if no live image has the id."""
        shard, local_id = split_id(image_id, self.n)
        return self._global(self.stores[shard].get(local_id), shard)

    def collection_root(self, index_root: Path) -> Path | None:
        return common_root([collection_root(store.snapshot().paths, index_root) for store in self.stores])

    def info(self) -> dict[str, Any]:
        if self.n == 1:
            return self.stores[0].info()
        identities = distinct_identities(self.shard_dirs) if self.shard_dirs is not None else 0
        return merge_info([store.info() for store in self.stores], identities)

    def needs_merge(self) -> bool:
        return any(store.needs_merge() for store in self.stores)

    def merge_small_segments(self) -> list[dict[str, Any]]:
        return [store.merge_small_segments() for store in self.stores if store.needs_merge()]

    def close(self) -> None:
        for store in self.stores:
            store.close()
