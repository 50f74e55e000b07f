"""Immutable, consistent read views of an index.

A :class:`Snapshot` is built from one SQLite read transaction (one generation) plus the
committed segment files it names. Nothing in it changes afterwards, so any number of threads
can search it while a writer adds, removes or compacts: a query never sees a half-written
state, and the ids it returns always belong to that generation.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from waldo.index import db, global_index
from waldo.index.db import LiveRows
from waldo.index.errors import IndexCorruptError, UnknownIdError, describe_keys
from waldo.index.global_index import GlobalIndexConfig, GlobalIndexStatus
from waldo.index.keypoints import RaggedKeypoints, gather_keypoints
from waldo.index.knn import search_flat_index
from waldo.index.segments import SegmentArrays, SegmentInfo, gather_rows


@dataclass(frozen=True)
class SearchResult:
    """Top-k neighbours per query: ``scores`` (Q, k) float32 descending inner products and
    ``ids`` (Q, k) int64 image ids, ``-inf`` / ``-1`` where fewer than k exist.
    ``generation`` is the index state the answer came from."""

    scores: np.ndarray
    ids: np.ndarray
    generation: int


def _readonly(a: np.ndarray) -> np.ndarray:
    a.flags.writeable = False
    return a


class Snapshot:
    """The live images of one index generation, with a faiss index over their globals.

    The faiss index is exact ``IndexFlatIP`` by default, or the approximate one the index was
    created with (``global_index``, see ``global_index.py``; ``global_index_status`` says what
    was built, e.g. an exact fallback for too few rows to train). It is built when the
    snapshot is, i.e. once per generation: cheap for Flat, a full graph build for HNSW.

    Memory: the faiss index holds the (n, D) float32 global descriptors in RAM (that is what
    makes search fast; HNSW adds its graph); big segment files stay memory-mapped, so
    ``local_descriptors`` reads only the rows asked for (files under 4 MiB are read into RAM:
    see npy_files.py). Paths and identities are kept so
    results can be interpreted consistently even if the images are removed meanwhile.
    """

    def __init__(
        self,
        live: LiveRows,
        arrays: Sequence[SegmentArrays],
        global_dim: int,
        local_shape: tuple[int, int],
        global_config: GlobalIndexConfig | None = None,
    ) -> None:
        self.generation = live.generation
        self.global_dim = global_dim
        self.local_shape = local_shape
        self.ids = _readonly(live.ids)  # (n,) int64, ascending
        self.paths: tuple[str, ...] = tuple(live.paths)
        self.identities: tuple[str, ...] = tuple(live.identities)
        self._segments = _readonly(live.segments)
        self._rows = _readonly(live.rows)
        self._arrays = list(arrays)
        self.segment_names: tuple[str, ...] = tuple(info.name for info in live.segment_infos)
        self._global_config = global_config or GlobalIndexConfig()
        # Rows go to faiss in chunks: faiss copies what it is given, so this bounds the transient
        # extra memory to one chunk instead of a second full (n, D) matrix.
        self.global_index_status: GlobalIndexStatus
        self._index, self.global_index_status = global_index.build_index(
            self._global_config, global_dim, len(self.ids), lambda pos: self._gather("global_", pos)
        )

    def __len__(self) -> int:
        return len(self.ids)

    def _gather(self, part: str, positions: np.ndarray) -> np.ndarray:
        if len(positions) == 0:
            shape = (self.global_dim,) if part == "global_" else self.local_shape
            return np.empty((0, *shape), dtype=np.float32 if part == "global_" else np.float16)
        return gather_rows(self._arrays, self._segments[positions], self._rows[positions], part)

    def positions(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """(n,) int64 snapshot positions of live ``ids``; raises :class:`UnknownIdError` otherwise."""
        ids_arr = np.asarray(ids, dtype=np.int64).reshape(-1)
        pos = np.searchsorted(self.ids, ids_arr)
        pos_c = np.minimum(pos, max(len(self.ids) - 1, 0))
        ok = (pos < len(self.ids)) & (self.ids[pos_c] == ids_arr) if len(self.ids) else np.zeros(len(ids_arr), bool)
        if not ok.all():
            missing = ids_arr[~ok].tolist()
            msg = f"ids not in the index (generation {self.generation}): {describe_keys(missing)}"
            raise UnknownIdError(msg, missing)
        return pos_c

    def search(
        self,
        queries: np.ndarray,
        k: int,
        *,
        exclude_ids: Sequence[int] | np.ndarray | None = None,
        batch_size: int = 4096,
        search_params: Mapping[str, int] | None = None,
    ) -> SearchResult:
        """Top-``k`` live images by inner product for each (Q, D) float32 query: exact with the
        default ``Flat`` global index, approximate with IVF/HNSW.

        ``exclude_ids``: (Q,) image id to leave out of each query's results (leave-one-out),
        -1 for none; ids that are not live are ignored (nothing to exclude).
        ``search_params``: per-call override of the index's search-time parameters, e.g.
        ``{"nprobe": 128}`` (IVF) or ``{"efSearch": 512}`` (HNSW); keys that do not apply to
        the configured index are a ValueError, and are ignored after an exact fallback.
        """
        faiss_params = None
        if search_params:
            global_index.resolve_search_params(self._global_config.spec, self.global_dim, search_params)
            faiss_params = global_index.search_parameters(self._index, search_params)
        q = np.asarray(queries)
        if q.ndim != 2 or q.shape[1] != self.global_dim:
            hint = " (for one query use queries[None, :])" if q.ndim == 1 else ""
            raise ValueError(f"queries must have shape (Q, {self.global_dim}), got {q.shape}{hint}")
        exclude = None
        if exclude_ids is not None:
            ex = np.asarray(exclude_ids, dtype=np.int64).reshape(-1)
            if ex.shape != (q.shape[0],):
                raise ValueError(f"exclude_ids must have one id per query ({q.shape[0]}), got {ex.shape[0]}")
            pos = np.searchsorted(self.ids, ex)
            pos_c = np.minimum(pos, max(len(self.ids) - 1, 0))
            live = (ex >= 0) & (pos < len(self.ids)) & (self.ids[pos_c] == ex) if len(self.ids) else ex < -1
            exclude = np.where(live, pos_c, -1).astype(np.int64)
        scores, idx = search_flat_index(self._index, q, k, exclude=exclude, batch_size=batch_size,
                                        params=faiss_params)
        ids = np.where(idx >= 0, self.ids[np.maximum(idx, 0)] if len(self.ids) else -1, -1).astype(np.int64)
        return SearchResult(scores=scores, ids=ids, generation=self.generation)

    def global_descriptors(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """(n, D) float32 global descriptors of ``ids``, in the order given."""
        return self._gather("global_", self.positions(ids))

    def local_descriptors(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """(n, L, Dl) float16 local descriptors of ``ids``, read from the memory-mapped segments."""
        return self._gather("local", self.positions(ids))

    def exact_local_descriptors(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """(n, L, Dl) float32 local descriptors of ``ids`` holding exactly the stored values:
        float16 rows widened, int8 rows times their scale computed in float32 (exact: 7 + 11
        significant bits). For copying rows into another index (``waldo index reshard``):
        ``IndexStore.add`` stores float16 rows unchanged and re-quantises int8 ones to the same
        bytes (a row's largest |q| is 127, so its scale comes back exactly), except rows whose
        float16 scale is subnormal (all values below about 0.008), which may move by less
        than half a step. :meth:`local_descriptors` rounds int8 rows to float16 instead."""
        pos = self.positions(ids)
        stored = self._gather("local_stored", pos)
        if stored.dtype != np.int8:
            return stored.astype(np.float32)
        scale = self._gather("local_scale", pos)
        return stored.astype(np.float32) * scale.astype(np.float32)[..., None]

    def verification_features(self, ids: Sequence[int] | np.ndarray) -> RaggedKeypoints | None:
        """Verification keypoints/descriptors of ``ids`` in the order given (one ragged batch).

        None when no live segment stores any (the index was built without them). Images of a
        segment stored without them get zero keypoints: they cannot be verified.
        """
        parts = [a.gv for a in self._arrays]
        if all(p is None for p in parts):
            return None
        pos = self.positions(ids)
        return gather_keypoints(parts, self._segments[pos], self._rows[pos])

    def local_view(self, image_id: int) -> np.ndarray:
        """One image's (L, Dl) float16 local descriptors.

        float16 storage: a zero-copy, read-only view of the stored array (an ``np.memmap`` that
        reads nothing until used for a big segment, RAM for a small one), valid as long as
        this snapshot is referenced (a mapping keeps the file alive even if a later
        ``compact`` or merge deletes it). int8 storage: a new, dequantised float16 array.
        """
        p = int(self.positions([image_id])[0])
        arrays = self._arrays[self._segments[p]]
        if arrays.local_scale is None:
            return arrays.local[self._rows[p]]
        return arrays.local_rows(int(self._rows[p]))


def load_snapshot(
    conn: sqlite3.Connection,
    open_seg: Callable[[SegmentInfo], SegmentArrays],
    global_dim: int,
    local_shape: tuple[int, int],
    global_config: GlobalIndexConfig | None = None,
) -> tuple[Snapshot, dict[str, SegmentArrays]]:
    """Build a snapshot of the current committed state.

    Returns it with the opened segments by name (the caller caches them: committed segments
    never change, so the next reload only opens new ones). If a segment folder vanished
    between the catalogue read and opening it, a concurrent compact/merge/remove committed
    meanwhile (the generation moved): retry on the new state. A missing folder at an unchanged
    generation is real damage.
    """
    for _attempt in range(10):
        live = db.live_rows(conn)
        try:
            arrays = [open_seg(info) for info in live.segment_infos]
        except FileNotFoundError as e:
            if db.generation(conn) == live.generation:
                raise IndexCorruptError(f"a live segment file is missing: {e.filename}") from None
            continue
        except IndexCorruptError:
            # A folder deleted while we read it looks damaged (some keypoint files gone, the
            # others not yet); it is a race only if a writer committed meanwhile.
            if db.generation(conn) == live.generation:
                raise
            continue
        by_name = {info.name: a for info, a in zip(live.segment_infos, arrays)}
        return Snapshot(live, arrays, global_dim, local_shape, global_config), by_name
    raise IndexCorruptError("the index changed under 10 consecutive snapshot attempts")
