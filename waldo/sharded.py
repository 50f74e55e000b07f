"""A sharded index: N ordinary Waldo indexes searched as one, exactly.

    from waldo.sharded import ShardedWaldo
    engine = ShardedWaldo.create("my-index", shards=4, fit_paths=paths)
    engine.add(paths, identities)
    for hit in engine.search("query.jpg", k=10).hits:
        print(hit.rank, hit.score, hit.identity, hit.path)

The folder layout, the hash that assigns each image to a shard and the id encoding are in
:mod:`waldo.index.shards`: shard ``shard_of(path, N)`` owns an image, and a hit's id is
``local_id * N + shard``. Every shard holds a copy of the one model; the query is decoded and
described once with it, then every shard runs its own kNN and, when asked, reranks its own
global top-``RERANK_TOP_K`` with the reranker; the shards' lists are merged by the score that
ordered them. Without a reranker that is exactly the single index's top-k (exact ``Flat``
search: the global similarity of an image does not depend on where it is stored). With one,
a shard reranks candidates a single index would not have reranked (its own top-100 reaches
deeper than the global top-100), so reranked lists may differ from a single index's there.

Shards are searched one after another in this process; waldo.serve.cluster serves them as Ray
Serve deployments (``waldo serve --engine ray``), merged by :func:`merge_shard_outcomes` as
here. :func:`reshard` splits an existing index into another number of
shards by copying stored rows, without describing any image again.
"""

from __future__ import annotations

import heapq
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from waldo.api import ENGINES, MODEL_FOLDER, RERANK_TOP_K, AddReport, ImageSource, Waldo
from waldo.data.images import load_image
from waldo.fsutil import fsync_dir, sha256_file
from waldo.index import IndexCorruptError, IndexMismatchError, IndexStore, UnknownIdError
from waldo.index.errors import describe_keys
from waldo.index.keypoints import gather_keypoints
from waldo.index.maintenance import MANIFEST_FILE
from waldo.index.shards import (HASH_NAME, KEY_NAME, ShardLayout, create_sharded_dir, distinct_identities,
                                global_id, is_sharded, read_layout, shard_dir_name, shard_of, split_id)
from waldo.models.checkpoint import load_model, model_hash
from waldo.models.keypoints import LocalFeatureConfig, extract_sift
from waldo.rerank import Need
from waldo.results import SearchHit, SearchOutcome, StageTimer

__all__ = ["ID_ENCODING", "ShardedWaldo", "check_sharded", "merge_shard_outcomes", "open_index", "reshard"]

ID_ENCODING = "local_id * shards + shard"  # see waldo.index.shards.global_id
RESHARD_CHUNK = 4096  # rows copied per add by reshard(): bounds its memory (about 150 MB with keypoints)
# Manifest keys IndexStore.create writes itself (waldo.index.manifest): a copied manifest leaves them out.
_STORE_OWNED_KEYS = ("format", "format_version", "created_at", "global_dtype", "local_dtype")


class ShardedWaldo:
    """An open sharded index: its shards (:class:`Waldo` objects sharing one model and one set
    of rerankers). Create with :meth:`create`, reopen with :meth:`open`; the surface follows
    :class:`Waldo`'s."""

    def __init__(self, layout: ShardLayout, shards: Sequence[Waldo]) -> None:
        """Internal: use :meth:`create` or :meth:`open`."""
        if len(shards) != layout.shards:
            raise ValueError(f"{layout.root} has {layout.shards} shards, got {len(shards)} open ones")
        self.layout = layout
        self.root = layout.root
        self.shards = list(shards)
        first = self.shards[0]
        self.model, self.config = first.model, first.config
        for shard in self.shards[1:]:
            shard.share_rerankers(first)

    # ------------------------------------------------------------------ opening
    @classmethod
    def create(cls, index_dir: str | Path, *, shards: int, backbone: str = "efficientnet_lite0", dim: int = 128,
               projection: str = "views-whiten", fit_paths: Sequence[str] = (), fit_source: str = "",
               model_dir: str | Path | None = None, transform: str | None = None, progress: bool = True,
               seed: int = 0, gv_features: bool | str | LocalFeatureConfig = True, local_dtype: str = "float16",
               global_index: str = "Flat", global_search_params: dict | None = None, pooling: str | None = None,
               global_dim: int | None = None, global_scales: Sequence[float] = (),
               local_stage: int | None = None, fit_runtime: str = "auto",
               backbone_from: str | Path | None = None, colour_weight: float | None = None) -> ShardedWaldo:
        """Make a new, empty index of ``shards`` shards at ``index_dir`` (absent or empty); the
        other options are :meth:`Waldo.create`'s. Shard 0 is created as a single index would be
        (an untrained model's projection is fitted once, on ``fit_paths``); every other shard is
        created from shard 0's saved model folder, so all hold the identical model (and RRT
        files). Built in a hidden folder and renamed into place (see
        :func:`waldo.index.shards.create_sharded_dir`)."""
        storage = {"gv_features": gv_features, "local_dtype": local_dtype, "global_index": global_index,
                   "global_search_params": global_search_params}

        def make_shard(folder: Path, i: int) -> None:
            if i == 0:
                engine = Waldo.create(folder, backbone=backbone, dim=dim, projection=projection, fit_paths=fit_paths,
                                      fit_source=fit_source, model_dir=model_dir, transform=transform,
                                      progress=progress, seed=seed, pooling=pooling, global_dim=global_dim,
                                      global_scales=global_scales, local_stage=local_stage,
                                      fit_runtime=fit_runtime, backbone_from=backbone_from,
                                      colour_weight=colour_weight, **storage)
            else:  # shard 0's model, transform included (its config.json), RRT files included
                engine = Waldo.create(folder, model_dir=folder.parent / shard_dir_name(0) / MODEL_FOLDER,
                                      progress=progress, **storage)
            engine.store.close()

        root = create_sharded_dir(index_dir, shards, make_shard)
        return cls.open(root)

    @classmethod
    def open(cls, index_dir: str | Path, *, model_dir: str | Path | None = None, rrt_precision: str = "auto",
             rrt_compile: bool = False) -> ShardedWaldo:
        """Open a sharded index: its layout (:func:`waldo.index.shards.read_layout`: errors for a
        missing or damaged ``shards.json`` or shard, IndexMismatchError for shards of different
        models), the model once (shard 0's, or ``model_dir``, which must be the very model that
        built the index) and every shard's store. Options: :meth:`Waldo.open`'s."""
        layout = read_layout(index_dir)
        model, config = load_model(model_dir if model_dir is not None else layout.shard_dirs[0] / MODEL_FOLDER)
        expected = {"backbone": config.backbone, "model_hash": model_hash(model)}
        stores: list[IndexStore] = []
        try:
            for folder in layout.shard_dirs:
                stores.append(IndexStore.open(folder, expected=expected))
        except BaseException:
            for store in stores:
                store.close()
            raise
        return cls(layout, [Waldo(store, model, config, folder, rrt_precision=rrt_precision, rrt_compile=rrt_compile)
                            for store, folder in zip(stores, layout.shard_dirs)])

    def close(self) -> None:
        """Close every shard's store (their SQLite connections)."""
        for shard in self.shards:
            shard.store.close()

    @property
    def stores(self) -> list[IndexStore]:
        """The shards' stores, in shard order (e.g. to set ``lock_timeout`` on each)."""
        return [shard.store for shard in self.shards]

    @property
    def n_shards(self) -> int:
        return self.layout.shards

    def shard_of(self, path: str | os.PathLike[str]) -> int:
        """The shard that owns (or would own) the image file ``path``."""
        return shard_of(str(Path(path).resolve()), self.n_shards)

    # ------------------------------------------------------------------ writing
    def add(self, paths: Sequence[str], identities: Sequence[str] | None = None,
            attrs: Sequence[dict] | None = None, *, batch_size: int = 32, num_workers: int | None = None,
            progress: bool = True, engine: str = "local", actors: int | None = None, runtime: str = "auto",
            merge: bool = True) -> AddReport:
        """:meth:`Waldo.add` for a sharded index: every image is described once (one model, the
        same batches as a single index), then stored in the shard that owns its path. The
        report's ``added`` holds sharded ids (:data:`ID_ENCODING`) in input order.

        Each shard commits its part atomically, but an add spanning shards is not one
        transaction: when a shard's commit fails (a full disk, a busy lock) the shards
        committed before it keep their images; rerunning the add skips those."""
        if engine not in ENGINES:
            raise ValueError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
        paths = [str(Path(p).resolve()) for p in paths]  # the key: the path as a shard stores it
        identities = list(identities) if identities is not None else [""] * len(paths)
        attrs = list(attrs) if attrs is not None else [{} for _ in paths]
        if not (len(paths) == len(identities) == len(attrs)):
            raise ValueError("paths, identities and attrs must have the same length")
        owners = [shard_of(path, self.n_shards) for path in paths]
        present = [False] * len(paths)
        for shard, positions in _group(range(len(paths)), owners).items():
            found = self.shards[shard].store.contains_paths([paths[i] for i in positions])
            for i, indexed in zip(positions, found):
                present[i] = indexed
        report = AddReport()
        seen: set[str] = set()
        keep = []
        for i, (path, indexed) in enumerate(zip(paths, present)):
            if indexed or path in seen:
                report.already_indexed.append(path)
            else:
                seen.add(path)
                keep.append(i)
        if not keep:
            return report
        added: dict[str, int] = {}  # path -> sharded id
        for batch in self.shards[0].describe_files([paths[i] for i in keep], batch_size=batch_size,
                                                   num_workers=num_workers, progress=progress, engine=engine,
                                                   actors=actors, runtime=runtime):
            report.errors += batch.errors
            rows = [keep[j] for j in batch.positions]  # positions in add()'s input
            for shard, in_batch in _group(range(len(rows)), [owners[row] for row in rows]).items():
                chosen = [rows[j] for j in in_batch]
                verification = None
                if batch.verification is not None:  # this shard's rows of the batch's ragged keypoints
                    verification = gather_keypoints([batch.verification], np.zeros(len(in_batch), np.int64),
                                                    np.asarray(in_batch, np.int64))
                target = self.shards[shard]
                shard_paths = [paths[i] for i in chosen]
                result = target.store.add_new(shard_paths, [identities[i] for i in chosen],
                                              batch.global_desc[in_batch], batch.local_desc[in_batch],
                                              attrs=[attrs[i] for i in chosen], verification=verification)
                skipped = set(result.skipped_paths)  # added by another writer since we looked
                report.already_indexed += result.skipped_paths
                for path, local_id in zip([p for p in shard_paths if p not in skipped], result.ids):
                    added[path] = global_id(local_id, shard, self.n_shards)
                if merge:
                    target.merge_small_segments()
        report.added = [added[paths[i]] for i in keep if paths[i] in added]
        return report

    def remove(self, ids: Sequence[int] = (), paths: Sequence[str] = ()) -> int:
        """Remove images by sharded id (:data:`ID_ENCODING`) and/or path; returns how many were
        removed. Every id and path is checked first: an unknown one raises
        :class:`UnknownIdError` (naming the sharded ids or paths) and nothing is removed."""
        wanted_ids = [int(i) for i in ids]
        by_shard_ids: dict[int, list[int]] = {}
        for image_id in wanted_ids:
            shard, local_id = split_id(image_id, self.n_shards)
            by_shard_ids.setdefault(shard, []).append(local_id)
        resolved = [str(Path(p).resolve()) for p in paths]
        by_shard_paths = _group(resolved, [shard_of(p, self.n_shards) for p in resolved])
        missing_ids: list[int] = []
        for shard, local_ids in by_shard_ids.items():
            live = {r.id for r in self.shards[shard].store.records(local_ids, skip_missing=True)}
            missing_ids += [global_id(i, shard, self.n_shards) for i in local_ids if i not in live]
        missing_paths = []
        for shard, shard_paths in by_shard_paths.items():
            found = self.shards[shard].store.contains_paths(shard_paths)
            missing_paths += [p for p, ok in zip(shard_paths, found) if not ok]
        if missing_ids or missing_paths:
            missing: list[Any] = sorted(missing_ids) + sorted(missing_paths)
            raise UnknownIdError(f"not in the index (nothing was removed): {describe_keys(missing)}", missing)
        removed = 0
        for shard in sorted(set(by_shard_ids) | set(by_shard_paths)):
            removed += self.shards[shard].remove(ids=by_shard_ids.get(shard, []), paths=by_shard_paths.get(shard, []))
        return removed

    def merge_small_segments(self) -> list[dict | None]:
        """:meth:`Waldo.merge_small_segments` of every shard, in shard order."""
        return [shard.merge_small_segments() for shard in self.shards]

    def compact(self) -> dict:
        """:meth:`Waldo.compact` of every shard; returns the summed statistics, ``seconds`` and
        ``per_shard`` (each shard's own)."""
        start = time.perf_counter()
        per_shard = [shard.compact() for shard in self.shards]
        totals: dict[str, Any] = {key: sum(stats[key] for stats in per_shard)
                                  for key in ("segments_before", "segments_after", "rows_reclaimed")}
        return {**totals, "seconds": round(time.perf_counter() - start, 3), "per_shard": per_shard}

    # ------------------------------------------------------------------ reading
    def describe(self, image: ImageSource) -> tuple[np.ndarray, np.ndarray]:
        """Descriptors of one query image with the index's one model: (global (D,), local (L, D))."""
        return self.shards[0].describe(image)

    def search(self, image: ImageSource, k: int = 10, rerank: str | None = None) -> SearchOutcome:
        """:meth:`Waldo.search` over every shard: the query is decoded and described once; each
        shard runs its own kNN (``max(k, RERANK_TOP_K)`` deep when reranking) and reranks its own
        global top-``RERANK_TOP_K``; the lists are merged by the score that ordered them.

        The merged hits: the shards' reranked heads by the reranker's score, then (k >
        RERANK_TOP_K) the rest by global similarity, as a single index orders them; ties keep
        the shards' own orders and go to the lower shard first. Hits carry sharded ids;
        ``rank_before_rerank`` is the rank in the merged global list (exact within
        ``global_hits``; for a candidate deeper than that, its rank among the candidates the
        shards returned). ``global_hits`` is the merged global list, exactly a single index's
        with exact search. Timings: decode and extract once, search and rerank summed over
        the shards (the query's keypoints, extracted once, count as rerank): see
        :func:`merge_shard_outcomes`."""
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        first = self.shards[0]
        rerank = self.default_reranker if rerank is None else rerank
        spec = first.check_reranker(rerank)  # an unsupported reranker fails before any work
        stage = StageTimer()
        with stage("decode"):
            picture = image if isinstance(image, Image.Image) else load_image(image)
        with stage("extract"):
            query_global, query_local = first.describe(picture)
        keypoints_ms = 0.0
        keypoints = None
        if spec is not None and Need.KEYPOINTS in spec.needs and first.gv_sift is not None:
            started = time.perf_counter()
            keypoints = extract_sift(picture, first.gv_sift)  # once, not once per shard
            keypoints_ms = (time.perf_counter() - started) * 1000
        outcomes = [shard.search_described(picture, query_global, query_local, k, rerank, query_keypoints=keypoints)
                    for shard in self.shards]
        return merge_shard_outcomes(outcomes, k=k, rerank=rerank, reranked=spec is not None, timings=stage.ms,
                                    rerank_ms=keypoints_ms)

    def matched_cells(self, image: ImageSource, image_id: int) -> dict[str, Any]:
        """:meth:`Waldo.matched_cells` against sharded id ``image_id`` (its shard's stored locals)."""
        from waldo.index.shards import split_id

        shard, local_id = split_id(image_id, len(self.shards))
        return self.shards[shard].matched_cells(image, local_id)

    def available_rerankers(self) -> list[str]:
        """The ``rerank`` values :meth:`search` accepts (every shard holds the same model and
        keypoint kind: :func:`waldo.index.shards.read_layout` checks)."""
        return self.shards[0].available_rerankers()

    @property
    def stored_default_reranker(self) -> str | None:
        return self.shards[0].stored_default_reranker

    @property
    def default_chain(self) -> tuple[str, ...]:
        return self.shards[0].default_chain

    @property
    def gv_sift(self):  # noqa: ANN201 - the keypoint settings (waldo.models.keypoints), one for every shard
        return self.shards[0].gv_sift

    @property
    def default_reranker(self) -> str:
        return self.shards[0].default_reranker

    def __len__(self) -> int:
        return sum(len(shard) for shard in self.shards)

    def info(self) -> dict:
        """Totals over the shards in :meth:`Waldo.info`'s keys (``count``, ``identities``
        distinct over all shards, ``segments`` with their ``shard``, ``bytes`` and
        ``bytes_per_image`` per part, shard 0's ``manifest``, ``global_index`` and ``model``),
        plus ``sharded``, ``shards``, ``hash``, ``key``, ``id_encoding`` and ``per_shard``, one
        row per shard (path, count, identities, generation, segments, dead_rows, bytes)."""
        rows = [shard.store.info() for shard in self.shards]
        stored_rows = sum(segment["rows"] for row in rows for segment in row["segments"])
        parts = dict.fromkeys(part for row in rows for part in row["bytes"])
        total_bytes = {part: sum(row["bytes"].get(part, 0) for row in rows) for part in parts}
        per_image = {part: round(total_bytes.get(part, 0) / stored_rows, 1) if stored_rows else 0.0
                     for part in rows[0]["bytes_per_image"] if part != "total"}
        per_image["total"] = round(sum(per_image.values()), 1)
        return {
            "path": str(self.root),
            "sharded": True,
            "shards": self.n_shards,
            "hash": HASH_NAME,
            "key": KEY_NAME,
            "id_encoding": ID_ENCODING,
            "generation": None,  # each shard has its own: see per_shard
            "count": sum(row["count"] for row in rows),
            "identities": distinct_identities(self.layout.shard_dirs),
            "local_dtype": rows[0]["local_dtype"],
            "segments": [{**segment, "shard": i} for i, row in enumerate(rows) for segment in row["segments"]],
            "dead_rows": sum(row["dead_rows"] for row in rows),
            "orphan_segments": sum(row["orphan_segments"] for row in rows),
            "bytes": total_bytes,
            "bytes_per_image": per_image,
            "global_index": rows[0]["global_index"],
            "manifest": rows[0]["manifest"],
            "model": self.config.model_dump(),
            "per_shard": [{"shard": i, "path": row["path"], "count": row["count"], "identities": row["identities"],
                           "generation": row["generation"], "segments": len(row["segments"]),
                           "dead_rows": row["dead_rows"], "bytes": sum(row["bytes"].values())}
                          for i, row in enumerate(rows)],
        }


def merge_shard_outcomes(outcomes: Sequence[SearchOutcome | None], *, k: int, rerank: str, reranked: bool,
                         timings: dict[str, float] | None = None, rerank_ms: float = 0.0) -> SearchOutcome:
    """One answer from every shard's own (``outcomes[i]``: shard ``i``'s, with its local ids;
    None for a shard that did not answer), as :meth:`ShardedWaldo.search` and the Ray service
    (waldo.serve.cluster) both give it.

    The merged hits: the shards' reranked heads by the reranker's score, then (k >
    RERANK_TOP_K) the rest by global similarity, as a single index orders them; ties keep the
    shards' own orders and go to the lower shard first. Hits carry sharded ids;
    ``rank_before_rerank`` is the rank in the merged global list. ``timings``: the stages run
    once for the query (decode, extract); search and rerank are summed over the shards, plus
    ``rerank_ms`` (the query's keypoints, extracted once). A shard that did not answer makes
    the outcome ``partial`` and is named in ``missing_shards``: the hits are the best of the
    others."""
    n = len(outcomes)
    answered = [(s, o) for s, o in enumerate(outcomes) if o is not None]

    def with_ids(hits: list[SearchHit], shard: int) -> list[SearchHit]:
        return [hit.model_copy(update={"id": global_id(hit.id, shard, n)}) for hit in hits]

    # Every shard's global list is its own top (k, or max(k, RERANK_TOP_K) when reranking), so
    # their merge is the global list of the whole index to that depth.
    merged_global = list(heapq.merge(*(with_ids(o.global_hits, s) for s, o in answered),
                                     key=lambda hit: -hit.global_score))
    global_rank = {hit.id: rank for rank, hit in enumerate(merged_global, start=1)}
    depth = max(k, RERANK_TOP_K) if reranked else k
    global_hits = [hit.model_copy(update={"rank": global_rank[hit.id], "rank_before_rerank": global_rank[hit.id]})
                   for hit in merged_global[:depth]]
    if not reranked:
        ordered = merged_global
    else:  # the reranked heads by the reranker's score, then the global tails
        heads = [with_ids(o.hits[:RERANK_TOP_K], s) for s, o in answered]
        tails = [with_ids(o.hits[RERANK_TOP_K:], s) for s, o in answered]
        ordered = [*heapq.merge(*heads, key=lambda hit: -hit.score),
                   *heapq.merge(*tails, key=lambda hit: -hit.global_score)]
    hits = [hit.model_copy(update={"rank": rank, "rank_before_rerank": global_rank[hit.id]})
            for rank, hit in enumerate(ordered[:k], start=1)]
    merged_timings = {**(timings or {}),
                      "search": round(sum(o.timings_ms.get("search", 0.0) for _, o in answered), 2),
                      "rerank": round(rerank_ms + sum(o.timings_ms.get("rerank", 0.0) for _, o in answered), 2)}
    # A note holds for the whole index when every shard that had candidates said it (the
    # query has too few keypoints; no shard found a geometric match), not when some did.
    said = [o.note for _, o in answered if o.global_hits]
    notes = [note for note in dict.fromkeys(said) if note and all(other == note for other in said)]
    missing = [s for s, o in enumerate(outcomes) if o is None]
    if missing:
        notes.append(f"{len(missing)} of {n} shards did not answer in time: these results are the best of "
                     f"the others")
    kind = next((o.score_kind for _, o in answered if o.hits), answered[0][1].score_kind if answered else "similarity")
    return SearchOutcome(hits, global_hits, merged_timings, rerank=rerank, note="; ".join(notes), score_kind=kind,
                         partial=bool(missing), missing_shards=missing)


def _group(items: Sequence[Any] | range, keys: Sequence[int]) -> dict[int, list[Any]]:
    """``items`` grouped by their ``keys`` (same length), each group in input order."""
    groups: dict[int, list[Any]] = {}
    for item, key in zip(items, keys):
        groups.setdefault(key, []).append(item)
    return groups


def open_index(index_dir: str | Path, **options: Any) -> Waldo | ShardedWaldo:
    """:meth:`ShardedWaldo.open` when ``index_dir`` holds a sharded index (``shards.json``), else
    :meth:`Waldo.open`; ``options``: theirs (model_dir, rrt_precision, rrt_compile)."""
    return ShardedWaldo.open(index_dir, **options) if is_sharded(index_dir) else Waldo.open(index_dir, **options)


def _model_files(folder: Path) -> dict[str, str]:
    """sha256 of every file of a model folder, by relative path."""
    return {str(path.relative_to(folder)): sha256_file(path) for path in sorted(folder.rglob("*")) if path.is_file()}


def check_sharded(index_dir: str | Path) -> list[str]:
    """Integrity problems of a sharded index, empty when healthy: its layout (shards.json,
    shard folders, one model in every manifest), every shard's own :meth:`IndexStore.check`
    (each prefixed with the shard's folder name), model folders identical file for file, and
    every image stored in the shard that owns its path. Reads every byte: slow on big indexes."""
    try:
        layout = read_layout(index_dir)
    except (IndexCorruptError, IndexMismatchError) as error:
        return [str(error)]
    problems: list[str] = []
    reference: dict[str, str] | None = None
    for i, folder in enumerate(layout.shard_dirs):
        name = shard_dir_name(i)
        try:
            store = IndexStore.open(folder)
        except IndexCorruptError as error:
            problems.append(f"{name}: {error}")
            continue
        with store:
            problems += [f"{name}: {problem}" for problem in store.check()]
            misplaced = [record.path for record in store.records() if shard_of(record.path, layout.shards) != i]
        if misplaced:
            problems.append(f"{name}: {len(misplaced)} images belong to another shard by the hash of their path "
                            f"(stored here by mistake: searches find them, adds and removes by path miss them): "
                            f"{describe_keys(misplaced, 3)}")
        if not (folder / MODEL_FOLDER).is_dir():
            problems.append(f"{name}: its model folder {MODEL_FOLDER}/ is missing")
            continue
        files = _model_files(folder / MODEL_FOLDER)
        if reference is None:
            reference = files
        elif files != reference:
            differing = sorted(path for path in set(files) | set(reference) if files.get(path) != reference.get(path))
            problems.append(f"{name}: its model folder differs from the first shard's in {', '.join(differing)} "
                            f"(every shard must hold the identical model and reranker)")
    expected = {shard_dir_name(i) for i in range(layout.shards)}
    strays = sorted(p.name for p in layout.root.glob("shard-*") if p.is_dir() and p.name not in expected)
    if strays:
        problems.append(f"folders that look like shards but are not in {layout.root.name}/shards.json "
                        f"({layout.shards} shards): {', '.join(strays)}")
    return problems


def reshard(source: str | Path, out: str | Path, shards: int, *, progress: bool = True,
            chunk_rows: int = RESHARD_CHUNK) -> dict[str, Any]:
    """Copy the index at ``source`` (single or sharded) into a new index at ``out`` with
    ``shards`` shards (1: an ordinary single index), without describing any image again:
    every live image's global and local descriptors, keypoints and metadata (path, identity,
    attrs) are copied into the shard that owns its path, with the same model folder, manifest
    and storage options.

    The copy is of the source's state when it starts (one snapshot per source shard; images
    added meanwhile are not copied, images removed meanwhile are left out). Ids are new
    (:data:`ID_ENCODING` with the new number of shards) and so are the added_at times.
    float16 local descriptors are copied bit for bit, int8 ones re-quantise to the same bytes
    (see :meth:`Snapshot.exact_local_descriptors`). Photos a service stored in the source's
    ``uploads/`` stay there: their paths keep pointing into the source folder.

    ``out`` must not exist; it is built in a hidden sibling folder and renamed into place
    when complete, so a crash leaves no partial index at ``out``. Returns ``{"source", "out",
    "shards", "images", "per_shard", "seconds"}``.
    """
    started = time.perf_counter()
    source, out = Path(source).expanduser().absolute(), Path(out).expanduser().absolute()
    if isinstance(shards, bool) or not isinstance(shards, int) or shards < 1:
        raise ValueError(f"the number of shards must be a positive integer, got {shards!r}")
    if out.exists():
        raise FileExistsError(f"{out} already exists; reshard writes a new index (choose another --out)")
    if is_sharded(source):
        source_dirs = read_layout(source).shard_dirs
    elif (source / MANIFEST_FILE).is_file():
        source_dirs = [source]
    else:
        raise FileNotFoundError(f"{source} is not a Waldo index (no manifest.json or shards.json)")
    model_folder = source_dirs[0] / MODEL_FOLDER
    if not (model_folder / "config.json").is_file():
        raise FileNotFoundError(f"{source}: the model folder {model_folder} is missing; cannot copy the model")
    stores = [IndexStore.open(folder) for folder in source_dirs]
    try:
        snapshots = [store.snapshot() for store in stores]  # the moment copied
        owners = [np.array([shard_of(path, shards) for path in snap.paths], np.int64) for snap in snapshots]
        template = stores[0]
        manifest = {key: value for key, value in template.manifest.items() if key not in _STORE_OWNED_KEYS}
        counts = [0] * shards
        bar = _progress(sum(len(snap) for snap in snapshots), progress)

        def fill(folder: Path, shard: int) -> None:
            with IndexStore.create(folder, manifest=manifest, global_dim=template.global_dim,
                                   local_shape=template.local_shape, local_dtype=template.local_dtype,
                                   global_index=template.global_index,
                                   global_search_params=manifest.get("global_search_params")) as target:
                for store, snap, owner in zip(stores, snapshots, owners):
                    ids = snap.ids[owner == shard]
                    for start in range(0, len(ids), chunk_rows):
                        # The catalogue, not the snapshot, holds attrs; an image removed since the
                        # snapshot is not copied.
                        records = store.records(ids[start:start + chunk_rows], skip_missing=True)
                        chunk = [record.id for record in records]
                        if chunk:
                            target.add([r.path for r in records], [r.identity for r in records],
                                       snap.global_descriptors(chunk), snap.exact_local_descriptors(chunk),
                                       attrs=[r.attrs for r in records], verification=snap.verification_features(chunk))
                        counts[shard] += len(chunk)
                        bar(len(ids[start:start + chunk_rows]))
                    # Bounded segments: one per chunk otherwise. Ids and values are unchanged by merges.
                target.merge_small_segments()
            shutil.copytree(model_folder, folder / MODEL_FOLDER)
            fsync_dir(folder)

        if shards == 1:
            _build_single(out, lambda folder: fill(folder, 0))
        else:
            create_sharded_dir(out, shards, fill)
        bar(0, close=True)
    finally:
        for store in stores:
            store.close()
    return {"source": str(source), "out": str(out), "shards": shards, "images": sum(counts), "per_shard": counts,
            "seconds": round(time.perf_counter() - started, 3)}


def _build_single(out: Path, fill: Callable[[Path], None]) -> None:
    """Fill a new single index in a hidden sibling of ``out`` and rename it into place."""
    import uuid

    out.parent.mkdir(parents=True, exist_ok=True)
    staging_root = out.parent / f".{out.name}.creating-{uuid.uuid4().hex[:8]}"
    staging_root.mkdir()
    try:
        fill(staging_root / "index")
        os.rename(staging_root / "index", out)  # out does not exist: checked by reshard
    finally:
        shutil.rmtree(staging_root, ignore_errors=True)
    fsync_dir(out.parent)


def _progress(total: int, enabled: bool) -> Callable[..., None]:
    """``step(n)`` advances a tqdm bar of ``total`` images (nothing when not ``enabled``);
    ``step(0, close=True)`` closes it."""
    if not enabled:
        return lambda n, close=False: None
    from tqdm import tqdm

    bar = tqdm(total=total, desc="reshard", unit="img")

    def step(n: int, close: bool = False) -> None:
        bar.update(n)
        if close:
            bar.close()

    return step
