"""The Python API: an index on disk plus the model that built it.

    from waldo import Waldo
    engine = Waldo.create("my-index", backbone="efficientnet_lite0", fit_paths=paths)
    engine.add(paths, identities)
    for hit in engine.search("query.jpg", k=10).hits:
        print(hit.rank, hit.score, hit.identity, hit.path)

An index folder holds the store (manifest.json, SQLite metadata, descriptor segments) and the
model in ``model/`` (config.json + model.safetensors), so a query needs nothing but the folder.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from waldo import __version__
from waldo.data.images import load_image
from waldo.data.transforms import get_transform
from waldo.index import (IndexBusyError, IndexMismatchError, IndexResourceError, IndexStore, RaggedKeypoints,
                         Snapshot, StorageFullError)
from waldo.models.checkpoint import ModelConfig, load_model, model_hash, save_model
from waldo.models.descriptor import DescriptorModel
from waldo.models.extract import extract_descriptors
from waldo.models.keypoints import (LocalFeatureConfig, LocalFeatures, SiftConfig, extract_many, extract_sift,
                                    local_features_for, pack_features, unpack_features)
from waldo.models.untrained import untrained_model
from waldo.rerank import (NO_RERANK, RERANKERS, Need, RerankCandidates, Reranker, RerankerSetup, RerankerSpec,
                          RerankQuery, RerankResult)
from waldo.rerank.base import SCORE_SIMILARITY
from waldo.rerank.rrt_checkpoint import RRT_FILES, has_global_residual, has_rrt, read_rrt_info
from waldo.rerank.rrt_rerankers import resolve_precision, set_colour_weight
from waldo.results import SearchHit, SearchOutcome, StageTimer

log = logging.getLogger("waldo.index")

MODEL_FOLDER = "model"
RERANK_TOP_K = 100  # how many global results a reranker re-sorts
MISSING_RECORD_ROUNDS = 4  # searches of one snapshot to refill hits removed while a query ran
ENGINES = ("local", "ray")  # where add() extracts: this process, or Ray actors (a cluster)
#: A query image: a path, its bytes, a file object, or already decoded (the service's upload check).
ImageSource = str | Path | bytes | IO[bytes] | Image.Image


def result_kind(spec: RerankerSpec, result: RerankResult | None) -> str:
    """What a reranked list's scores are: the result's own word, else its spec's."""
    return (result.score_kind if result is not None else None) or spec.score


@dataclass
class AddReport:
    """What an ``add`` did: new ids, inputs already indexed, and inputs that could not be read."""

    added: list[int] = field(default_factory=list)
    already_indexed: list[str] = field(default_factory=list)
    errors: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class DescribedBatch:
    """Images of one :meth:`Waldo.describe_files` batch that could be read: their ``positions``
    in the paths given, ``global_desc`` (n, D) and ``local_desc`` (n, L, D) in that order, their
    keypoints for verification (None when the index stores none), and ``errors``, (path,
    reason) for each unreadable input of the batch."""

    positions: list[int]
    global_desc: np.ndarray
    local_desc: np.ndarray
    verification: RaggedKeypoints | None
    errors: list[tuple[str, str]]


def _decoded(image: ImageSource) -> Image.Image:
    return image if isinstance(image, Image.Image) else load_image(image)


def _manifest_for(model: DescriptorModel, config: ModelConfig) -> dict:
    return {
        "waldo_version": __version__,
        "backbone": config.backbone,
        "model_hash": model_hash(model),
        "weights_source": config.weights_source,
        "projection": config.projection,
        "transform": config.transform,
        "image_size": config.image_size,
        "descriptor_dim": config.dim,
        "pooling": config.pooling,  # the store records global_dim itself
        **({"global_scales": config.global_scales} if config.global_scales else {}),  # absent: single scale
        **({"local_stage": config.local_stage} if config.local_stage is not None else {}),  # absent: the last map
    }


class Waldo:
    """An open index and its model. Create with :meth:`create`, reopen with :meth:`open`."""

    def __init__(self, store: IndexStore, model: DescriptorModel, config: ModelConfig, root: Path, *,
                 rrt_precision: str = "auto", rrt_compile: bool = False) -> None:
        resolve_precision(rrt_precision)  # a typo fails here, not at the first reranked query
        self.store = store
        self.model = model.eval()
        self.config = config
        self.root = root
        self.transform = get_transform(config.transform, config.image_size)
        self._rerankers: dict[str, Reranker] = {}  # name -> Reranker, checked and built on first use
        self._reranker_specs: dict[str, RerankerSpec] = {}
        #: How RRT rerankers score (waldo.rerank.rrt_rerankers.PRECISIONS; "auto": bf16 where the CPU has
        #: native bf16, measured within 0.2 point of fp32 Recall@1 by experiments/performance_accuracy.py)
        #: and whether they compile their scorer (worth it for a long-lived service, not one query).
        self.rrt_precision = rrt_precision
        self.rrt_compile = rrt_compile
        self._default_chain: tuple[str, ...] | None = None  # rrt.json's default_reranker + fallbacks, read once
        self._global_residual: bool | None = None  # rrt.json's rrt.global_skip, read once there is an RRT
        gv = store.manifest.get("gv_features")  # how keypoints for --rerank gv are stored, or None
        self.gv_sift = SiftConfig.model_validate(gv) if gv else None

    # ------------------------------------------------------------------ opening
    @classmethod
    def create(cls, index_dir: str | Path, *, backbone: str = "efficientnet_lite0", dim: int = 128,
               projection: str = "views-whiten", fit_paths: Sequence[str] = (), fit_source: str = "",
               model_dir: str | Path | None = None, transform: str | None = None,
               progress: bool = True, seed: int = 0, gv_features: bool | str | LocalFeatureConfig = True,
               local_dtype: str = "float16", global_index: str = "Flat",
               global_search_params: dict | None = None, pooling: str | None = None,
               global_dim: int | None = None, global_scales: Sequence[float] = (),
               local_stage: int | None = None, fit_runtime: str = "auto",
               backbone_from: str | Path | None = None, colour_weight: float | None = None) -> "Waldo":
        """Make a new, empty index. The model is a trained checkpoint (``model_dir``) or an
        untrained ``backbone`` whose projection is fitted on ``fit_paths`` (typically the images
        about to be indexed). ``gv_features`` stores local features of every added image
        (True: the default ORB + TEBLID, about 19 KB per image; a kind of
        waldo.models.keypoints.LOCAL_FEATURE_KINDS or a LocalFeatureConfig; False: none) so that searches can use ``rerank="gv"``. ``local_dtype="int8"`` stores
        local descriptors in half the bytes; ``global_index`` ("Flat" = exact, or e.g.
        "IVF4096,Flat" / "HNSW32") and ``global_search_params`` ({"nprobe": 128}) choose the
        global search; see :meth:`IndexStore.create`. ``pooling`` / ``global_dim`` /
        ``global_scales`` shape an untrained model's global descriptor (waldo.models.untrained;
        defaults chosen on validation identities); ``local_stage`` takes its locals from that
        finer backbone stage (ModelConfig.local_stage), which the ``local-match`` reranker needs;
        with ``model_dir``, the checkpoint keeps its descriptors and RRT and stores ``dim``-wide
        match cells of that stage after its locals, fitted on ``fit_paths`` (ModelConfig.match_stage).
        ``fit_runtime``: how those fits run the backbone: ``auto`` (ONNX Runtime for 1,000 passes
        or more, from 200 once its export is cached; waldo.models.extract.backbone_runner),
        ``onnx`` or ``eager`` (what evaluations fit with). ``backbone_from``: an untrained model on a
        trained checkpoint's backbone (its heads unused; waldo.models.untrained.untrained_model).
        ``colour_weight``: append each photo's colour signature to its global descriptor at that
        weight (ModelConfig.colour_weight; 0 turns a checkpoint's own colour term off; None keeps
        the checkpoint's, none for an untrained model)."""
        if colour_weight is not None and not colour_weight >= 0:
            raise ValueError(f"colour_weight must be >= 0, got {colour_weight}")
        if backbone_from is not None and model_dir is not None:
            raise ValueError("backbone_from builds an untrained model on a trained backbone; with model_dir the "
                             "checkpoint is used whole: give one or the other")
        root = Path(index_dir)
        if model_dir is None:  # refuse bad options before fitting a projection (minutes)
            from waldo.models.pooling import validate_pooling
            from waldo.models.untrained import DEFAULT_GLOBAL_DIM

            if pooling is not None:
                validate_pooling(pooling)
            from waldo.models.colour import SIGNATURE_DIM

            wide = global_dim or (DEFAULT_GLOBAL_DIM if projection in ("pca-shrink", "views-whiten") else dim)
            wide += SIGNATURE_DIM if colour_weight else 0
            IndexStore.check_options(wide, local_dtype, global_index, global_search_params)
        if model_dir is not None:
            model, config = load_model(model_dir)
            if local_stage is not None:  # match cells of a finer stage, fitted on these images
                from waldo.models.untrained import with_match_cells

                model, config = with_match_cells(model, config, local_stage, dim=dim, fit_paths=fit_paths,
                                                 fit_source=fit_source, seed=seed, progress=progress,
                                                 fit_runtime=fit_runtime)
            if transform:
                config.transform = transform
            if global_scales:  # the checkpoint's own scales otherwise
                config.global_scales = list(global_scales)
                model.global_scales = tuple(config.global_scales)
        else:
            model, config = untrained_model(backbone, dim=dim, projection=projection, fit_paths=fit_paths,
                                            fit_source=fit_source, transform=transform or "resize256-crop224",
                                            progress=progress, seed=seed, pooling=pooling, global_dim=global_dim,
                                            global_scales=global_scales, local_stage=local_stage,
                                            fit_runtime=fit_runtime, backbone_from=backbone_from)
        set_colour_weight(model, config, colour_weight, model_dir)
        local_cells = model.local_rows(config.image_size)
        features = local_features_for(gv_features)
        manifest = {**_manifest_for(model, config), "gv_features": features.model_dump() if features else None}
        store = IndexStore.create(root, manifest=manifest, global_dim=config.descriptor_width,
                                  local_shape=(local_cells, config.dim), local_dtype=local_dtype,
                                  global_index=global_index, global_search_params=global_search_params)
        try:
            save_model(model, config, root / MODEL_FOLDER)
            if model_dir is not None and has_rrt(model_dir):  # a reranker travels with its model
                for name in RRT_FILES:
                    shutil.copy2(Path(model_dir) / name, root / MODEL_FOLDER / name)
        except BaseException:
            shutil.rmtree(root, ignore_errors=True)  # never leave an index without its model
            raise
        return cls(store, model, config, root)

    @classmethod
    def open(cls, index_dir: str | Path, *, model_dir: str | Path | None = None, rrt_precision: str = "auto",
             rrt_compile: bool = False) -> "Waldo":
        """Open an index. ``model_dir`` asks to query with another checkpoint: it must be the
        very model that built the index, or this raises IndexMismatchError. ``rrt_precision``
        and ``rrt_compile``: how RRT rerankers score (see :class:`waldo.rerank.rrt_rerankers.RRTReranker`)."""
        root = Path(index_dir)
        if not (root / "manifest.json").is_file():
            raise FileNotFoundError(f"{root} is not a Waldo index (no manifest.json); build one with "
                                    f"`waldo index build`")
        model, config = load_model(model_dir if model_dir is not None else root / MODEL_FOLDER)
        store = IndexStore.open(root, expected={"backbone": config.backbone, "model_hash": model_hash(model)})
        return cls(store, model, config, root, rrt_precision=rrt_precision, rrt_compile=rrt_compile)

    # ------------------------------------------------------------------ writing
    def add(self, paths: Sequence[str], identities: Sequence[str] | None = None,
            attrs: Sequence[dict] | None = None, *, batch_size: int = 32,
            num_workers: int | None = None, progress: bool = True, engine: str = "local",
            actors: int | None = None, runtime: str = "auto", merge: bool = True) -> AddReport:
        """Extract and add images. Paths already in the index, and duplicates within ``paths``,
        are skipped (reported, not re-added); unreadable images are reported and skipped.
        Paths another writer adds meanwhile are skipped too: the final check runs under the
        index's write lock, so two concurrent adds of overlapping paths both succeed.

        ``engine="local"`` extracts in this process (``num_workers`` decoding processes) and
        commits all images at once; ``engine="ray"`` extracts on Ray actors (``actors`` of them;
        a cluster when ``RAY_ADDRESS`` is set, see waldo.models.extract_ray) and commits every
        few thousand images, so an interrupted add keeps what it committed.

        ``merge``: after committing, merge small segments when the index's merge policy asks
        for it (:meth:`IndexStore.merge_small_segments`), so that adding photos one at a time
        does not pile up segments. A merge that fails (a full disk, a busy lock) is logged and
        leaves the committed add as it is. A long-lived service passes False and merges from a
        background thread instead.

        Raises (besides ValueError for bad input): StorageFullError when the disk filled up
        while writing (nothing of that commit was added), IndexBusyError when the store's
        ``lock_timeout`` passed."""
        if engine not in ENGINES:
            raise ValueError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
        paths = [str(Path(p).resolve()) for p in paths]
        identities = list(identities) if identities is not None else [""] * len(paths)
        attrs = list(attrs) if attrs is not None else [{} for _ in paths]
        if not (len(paths) == len(identities) == len(attrs)):
            raise ValueError("paths, identities and attrs must have the same length")
        report = AddReport()
        present = self.store.contains_paths(paths)
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
        todo = [paths[i] for i in keep]
        for batch in self.describe_files(todo, batch_size=batch_size, num_workers=num_workers, progress=progress,
                                         engine=engine, actors=actors, runtime=runtime):
            report.errors += batch.errors
            rows = [keep[j] for j in batch.positions]  # positions in add()'s input
            if rows:
                self._commit(report, [paths[i] for i in rows], [identities[i] for i in rows], batch.global_desc,
                             batch.local_desc, [attrs[i] for i in rows], batch.verification, merge)
        return report

    def describe_files(self, paths: Sequence[str], *, batch_size: int = 32, num_workers: int | None = None,
                       progress: bool = True, engine: str = "local", actors: int | None = None,
                       runtime: str = "auto") -> Iterator[DescribedBatch]:
        """What :meth:`add` stores for ``paths`` (image files, read where they lie), without
        storing it: descriptors with this index's model and, when the index stores them,
        keypoints for verification. Yields :class:`DescribedBatch` objects covering ``paths`` in
        order: one for ``engine="local"`` (this process, ``num_workers`` decoding processes),
        one per chunk of a few thousand images for ``engine="ray"`` (Ray actors, see
        waldo.models.extract_ray). A sharded index describes once and routes the rows."""
        if engine not in ENGINES:
            raise ValueError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
        if engine == "ray":
            from waldo.models.extract_ray import iter_extract_ray

            for chunk in iter_extract_ray(self.root / MODEL_FOLDER, list(paths), sift=self.gv_sift,
                                          expected_hash=self.store.manifest.get("model_hash"),
                                          batch_size=batch_size, actors=actors, runtime=runtime, progress=progress):
                verification = (pack_features(chunk.keypoints, self.gv_sift.descriptor_bytes)
                                if chunk.keypoints is not None and self.gv_sift is not None else None)
                yield DescribedBatch([chunk.start + int(j) for j in np.flatnonzero(chunk.ok)], chunk.global_desc,
                                     chunk.local_desc, verification, list(chunk.errors))
            return
        # runtime "auto" exports the model to ONNX Runtime (waldo.models.onnx_runtime) for big adds only.
        extracted = extract_descriptors(self.model, list(paths), self.transform, batch_size=batch_size,
                                        num_workers=num_workers, progress=progress, description="index",
                                        runtime=runtime)
        positions = [int(j) for j in np.flatnonzero(extracted.ok)]
        verification = None
        if positions and self.gv_sift is not None:
            # Keypoints for geometric verification: computed once here, never per query.
            # num_workers=0 ("decode in this process", the service's choice) decodes the keypoints'
            # images one at a time too: two full-size decodes at once would double the peak memory.
            keypoint_workers = 1 if num_workers == 0 else num_workers or None
            verification = pack_features(extract_many([paths[j] for j in positions], self.gv_sift,
                                                      workers=keypoint_workers, progress=progress),
                                         self.gv_sift.descriptor_bytes)
        yield DescribedBatch(positions, extracted.global_desc, extracted.local_desc, verification,
                             list(extracted.errors))

    def _commit(self, report: AddReport, paths: list[str], identities: list[str], global_desc: np.ndarray,
                local_desc: np.ndarray, attrs: list[dict], verification: RaggedKeypoints | None,
                merge: bool) -> None:
        """Add one extracted batch: paths that became live since :meth:`add` looked (another
        writer) are skipped under the write lock and reported as already indexed; then merge
        small segments if the policy asks for it and ``merge``."""
        result = self.store.add_new(paths, identities, global_desc, local_desc, attrs=attrs,
                                    verification=verification)
        report.added += result.ids
        report.already_indexed += result.skipped_paths
        if merge:
            self.merge_small_segments()

    def merge_small_segments(self) -> dict | None:
        """Merge small segments if the index's merge policy asks for it (cheap to call when it
        does not); returns what was merged, or None. Housekeeping: a failure (a full disk, a
        busy lock, no file descriptors) is logged as a warning and the index stays valid."""
        try:
            if not self.store.needs_merge():
                return None
            return self.store.merge_small_segments()
        except (StorageFullError, IndexBusyError, IndexResourceError) as error:
            log.warning("merging small segments of %s skipped: %s", self.root, error)
            return None

    def compact(self) -> dict:
        """Rewrite every live image into one segment (reclaims removed rows); see
        :meth:`IndexStore.compact`. Returns its statistics plus ``seconds``."""
        start = time.perf_counter()
        stats: dict = dict(self.store.compact())
        stats["seconds"] = round(time.perf_counter() - start, 3)
        return stats

    def remove(self, ids: Sequence[int] = (), paths: Sequence[str] = ()) -> int:
        """Remove images by id and/or path; returns how many were removed."""
        removed = self.store.remove(list(ids)) if ids else 0
        if paths:
            removed += self.store.remove_paths([str(Path(p).resolve()) for p in paths])
        return removed

    # ------------------------------------------------------------------ reading
    @torch.inference_mode()
    def describe(self, image: ImageSource) -> tuple[np.ndarray, np.ndarray]:
        """Descriptors of one query image: (global (D,), local (L, D))."""
        tensor = self.transform(_decoded(image), 0)[None]
        out = self.model(tensor.contiguous(memory_format=torch.channels_last))
        return out.global_desc[0].numpy(), out.local_desc[0].numpy()

    def matched_cells(self, image: ImageSource, image_id: int) -> dict[str, Any]:
        """What ``local-match`` counted for the query ``image`` and indexed image ``image_id``:
        ``pairs`` (K, 2) [query cell, candidate cell] and their ``cosines``, strongest first,
        ``cells`` (the query's cell count), ``grid`` (h, w), the reranker's ``setting`` and the
        ``share`` it adds ``setting.weight`` times to the global similarity. ValueError when
        the index has no stage locals (it does not offer local-match)."""
        from waldo.rerank.local_match import matched_cells

        if Need.FINE_LOCALS not in self._needs_met():
            raise ValueError("this index has no stage locals to match (build it with --local-stage)")
        reranker = self._reranker("local-match")[1]  # built once: its setting and where the cells sit
        _, query_local = self.describe(image)
        query_cells = reranker.cells(query_local)
        candidate_cells = reranker.cells(self.store.local_descriptors([image_id])[0])
        layout = self.model.match_layout(self.config.image_size)
        grid = layout.grid if layout is not None else self.model.local_grid(self.config.image_size)
        pairs, cosines = matched_cells(query_cells, candidate_cells, reranker.setting.threshold)
        return {"pairs": pairs, "cosines": cosines, "cells": len(query_cells), "grid": grid,
                "setting": reranker.setting, "share": len(pairs) / max(1, len(query_cells))}

    def search(self, image: ImageSource, k: int = 10, rerank: str | None = None) -> SearchOutcome:
        """The ``k`` indexed images most similar to ``image`` (a path, bytes, a file object or a
        decoded PIL image), best first, with the time each stage took.

        Each stage runs once: decode, extract (the query's descriptors), search (one kNN, one
        metadata read), rerank. ``rerank`` names a reranker of :data:`waldo.rerank.RERANKERS`
        (``available_rerankers()`` lists those this index supports): it re-sorts the global
        top-``RERANK_TOP_K`` and each hit's ``score`` becomes the reranker's (an RRT logit, a
        fused score, or for "gv" the inlier count, negative when not verified). ``None`` (the
        default) uses :attr:`default_reranker`, the one chosen on validation when the index's
        reranker folder names one; "none" is the global ranking alone. The outcome's ``rerank``
        says which ran.
        """
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        rerank = self.default_reranker if rerank is None else rerank
        self._reranker(rerank)  # an unsupported reranker fails before any work
        stage = StageTimer()
        with stage("decode"):
            picture = _decoded(image)
        with stage("extract"):
            query_global, query_local = self.describe(picture)
        return self.search_described(picture, query_global, query_local, k, rerank, timer=stage)

    def search_described(self, picture: Image.Image | None, query_global: np.ndarray, query_local: np.ndarray,
                         k: int = 10, rerank: str | None = None, *, query_keypoints: LocalFeatures | None = None,
                         timer: StageTimer | None = None) -> SearchOutcome:
        """:meth:`search` for a query already decoded (``picture``) and described (``query_global``
        (D,), ``query_local`` (L, D), from :meth:`describe` with this index's model): the search
        and rerank stages only. A sharded index describes its query once and calls this on
        every shard (waldo.sharded).

        ``picture`` is read only by rerankers that verify geometry, for the query's keypoints;
        ``query_keypoints`` gives them instead (extracted once for several shards), and then
        ``picture`` may be None. ``timer``: the :class:`StageTimer` that timed the stages
        before (the outcome's timings are its stages plus search and rerank).
        """
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        rerank = self.default_reranker if rerank is None else rerank
        spec, reranker = self._reranker(rerank)
        stage = timer if timer is not None else StageTimer()
        with stage("search"):
            snapshot = self.store.snapshot()  # one view of the index for every read of this query
            global_hits = self._global_hits(snapshot, query_global, k if reranker is None else max(k, RERANK_TOP_K))
        with stage("rerank"):
            hits, note, kind = (global_hits, "", SCORE_SIMILARITY) if reranker is None else self._reranked(
                spec, reranker, snapshot, picture, RerankQuery(query_local, query_global, query_keypoints), global_hits)
        return SearchOutcome(hits[:k], global_hits, stage.ms, rerank=rerank, note=note, score_kind=kind)

    def _global_hits(self, snapshot: Snapshot, query_global: np.ndarray, k: int) -> list[SearchHit]:
        """The snapshot's global top-``k`` with their records, ranked 1..n without gaps. An image
        removed after the snapshot was taken has no record any more: it is skipped and the
        snapshot asked for as many more (a few rounds at most), so that a removal during the
        query neither leaves a hole in the ranks nor shortens the answer."""
        query = np.asarray(query_global, np.float32)[None]
        want = k
        for _ in range(MISSING_RECORD_ROUNDS):
            result = snapshot.search(query, want)
            ids = [int(i) for i in result.ids[0] if i >= 0]
            records = {r.id: r for r in self.store.records(ids, skip_missing=True)}  # removed meanwhile: skip
            kept = [(i, float(score)) for i, score in zip(ids, result.scores[0]) if i in records]
            if len(kept) >= k or len(ids) < want:  # enough, or the snapshot holds no more
                break
            want += len(ids) - len(kept)
        return [SearchHit.from_global(records[i], rank, score) for rank, (i, score) in enumerate(kept[:k], start=1)]

    def _reranked(self, spec: RerankerSpec, reranker: Reranker, snapshot: Snapshot, picture: Image.Image | None,
                  query: RerankQuery, global_hits: list[SearchHit]) -> tuple[list[SearchHit], str, str]:
        """The global top-``RERANK_TOP_K`` in the reranker's order, then the rest unchanged, the
        reranker's note and its score kind; the reranker gets what it declared it needs
        (``spec.needs``) and nothing else."""
        head, tail = global_hits[:RERANK_TOP_K], global_hits[RERANK_TOP_K:]
        if not head:
            return [], "", result_kind(spec, None)
        ids = [hit.id for hit in head]
        local = Need.LOCAL_DESCRIPTORS in spec.needs
        candidate_keypoints = None
        if Need.KEYPOINTS in spec.needs:  # the query's from the decoded image, the candidates' from the index
            if query.keypoints is None:
                if picture is None:
                    raise ValueError(f"reranker {spec.name!r} verifies geometry: pass the decoded query picture "
                                     f"or its keypoints")
                query.keypoints = extract_sift(picture, self.gv_sift)
            ragged = snapshot.verification_features(ids)  # images indexed without keypoints: never verified
            candidate_keypoints = unpack_features(ragged) if ragged is not None else [LocalFeatures.empty(self.gv_sift.descriptor_bytes)] * len(ids)
        candidates = RerankCandidates(snapshot.local_descriptors(ids) if local else None,
                                      np.array([hit.score for hit in head], np.float32),
                                      snapshot.global_descriptors(ids) if local else None, candidate_keypoints)
        result = reranker.rerank(query, candidates)
        hits = []
        for position, (i, score) in enumerate(zip(result.order, result.scores)):
            update = {"rank": position + 1, "score": float(score)}
            if result.inliers is not None:
                update["inliers"] = int(result.inliers[position])
            if result.verified is not None:
                update["verified"] = bool(result.verified[position])
            if result.rrt_scores is not None:
                update["rrt_score"] = float(result.rrt_scores[position])
            hits.append(head[i].model_copy(update=update))
        # Hits past the reranked head (k > RERANK_TOP_K) keep their global rank and similarity.
        return hits + tail, result.note, result_kind(spec, result)

    def _reranker(self, name: str) -> tuple[RerankerSpec | None, Reranker | None]:
        """The registered reranker ``name`` and its spec, checked and built on first use, then
        kept (a query pays neither the check nor the build), or (None, None) for "none"."""
        if name == NO_RERANK:
            return None, None
        if name not in self._rerankers:
            spec = RERANKERS.spec(name)
            missing = spec.needs - self._needs_met()
            if missing:
                raise ValueError(f"this index cannot rerank with {name!r}: it lacks "
                                 f"{'; '.join(sorted(need.value for need in missing))}")
            self._rerankers[name] = spec.build(RerankerSetup(self.root / MODEL_FOLDER, self.rrt_precision,
                                                             self.rrt_compile))
            self._reranker_specs[name] = spec
        return self._reranker_specs[name], self._rerankers[name]

    def check_reranker(self, name: str) -> RerankerSpec | None:
        """The spec of reranker ``name`` once this index is known to support it (ValueError
        naming what it lacks otherwise) and the reranker is built (kept for later searches);
        None for "none". Lets a caller fail before decoding a query."""
        return self._reranker(name)[0]

    def share_rerankers(self, other: "Waldo") -> None:
        """Use ``other``'s rerankers (built on first use by either, then kept) instead of
        building this index's own: for the shards of one sharded index, whose model folders
        are identical, so an RRT is loaded (and compiled) once, not once per shard."""
        self._rerankers = other._rerankers
        self._reranker_specs = other._reranker_specs

    def _needs_met(self) -> set[Need]:
        needs = {Need.LOCAL_DESCRIPTORS}
        if self.gv_sift is not None:
            needs.add(Need.KEYPOINTS)
        if has_rrt(self.root / MODEL_FOLDER):
            needs.add(Need.TRAINED_RRT)
            if self._global_residual is None:  # read once: every search without --rerank asks (default_reranker)
                self._global_residual = has_global_residual(self.root / MODEL_FOLDER)
            if self._global_residual:
                needs.add(Need.RRT_GLOBAL_RESIDUAL)
        if self.config.local_stage is not None or self.config.match_stage is not None:
            needs.add(Need.FINE_LOCALS)
        return needs

    def available_rerankers(self) -> list[str]:
        """The ``rerank`` values :meth:`search` accepts for this index: "none", then every
        registered reranker whose needs the index meets. Services offer exactly these."""
        return [NO_RERANK, *RERANKERS.supported(self._needs_met())]

    @property
    def default_chain(self) -> tuple[str, ...]:
        """The rerankers the index's model folder names as chosen on validation, in order of
        preference: ("local-match",) when the index stores finer cells and the model's config
        records local matching as its validated default (``extra["local_match"]["default"]``,
        experiments/local_matching.py --store-choice), else ``rrt.json``'s
        ``training["default_reranker"]`` followed by its ``training["default_fallbacks"]`` (the
        choice for an index that cannot offer the first, e.g. one built without keypoints);
        empty when there is no such entry (older folders). Read once, then kept."""
        if self._default_chain is None:
            local_match = self.config.extra.get("local_match")
            if (isinstance(local_match, dict) and local_match.get("default") is True
                    and Need.FINE_LOCALS in self._needs_met()):
                self._default_chain = ("local-match",)
                return self._default_chain
            try:
                training = read_rrt_info(self.root / MODEL_FOLDER).get("training")
            except (OSError, ValueError):  # no reranker, unreadable or newer-format rrt.json
                training = None
            chain: list[str] = []
            if isinstance(training, dict) and isinstance(training.get("default_reranker"), str):
                fallbacks = training.get("default_fallbacks")
                chain = [training["default_reranker"],
                         *(name for name in (fallbacks if isinstance(fallbacks, list) else [])
                           if isinstance(name, str))]
            self._default_chain = tuple(dict.fromkeys(chain))
        return self._default_chain

    @property
    def stored_default_reranker(self) -> str | None:
        """The validated choice that applies to this index: the first of :attr:`default_chain`
        it offers (:meth:`available_rerankers`), else the chain's first (named, not offered);
        None without a stored choice."""
        return first_offered(self.default_chain, self.available_rerankers(), self.default_chain[0]
                             if self.default_chain else None)

    @property
    def default_reranker(self) -> str:
        """What :meth:`search` reranks with when asked for no reranker: the first of
        :attr:`default_chain` this index offers, else "none" (the global ranking alone)."""
        return first_offered(self.default_chain, self.available_rerankers(), NO_RERANK)

    def __len__(self) -> int:
        return len(self.store)

    def info(self) -> dict:
        return {**self.store.info(), "model": self.config.model_dump()}


def first_offered(chain: Sequence[str], offered: Sequence[str], otherwise: str | None) -> str | None:
    """The first name of ``chain`` in ``offered``, else ``otherwise``."""
    return next((name for name in chain if name in offered), otherwise)


__all__ = ["AddReport", "DescribedBatch", "IndexMismatchError", "SearchHit", "SearchOutcome", "Waldo", "first_offered"]
