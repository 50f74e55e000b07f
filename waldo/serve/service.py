"""The state the service shares between requests: one engine, its locks, caches and counters.

Built once in the app's lifespan. Concurrency model:

* Queries only read. The index hands out immutable snapshots and the model runs in inference
  mode, so any number of queries may run at once; the routes bound how many use the CPU at
  a time (``ServeSettings.query_slots``).
* Writes (add, remove) take ``_write_lock``: the engine's "already indexed?" check and its
  commit must not interleave with another upload of the same bytes. The index commits each
  add in one SQLite transaction, so a query sees all of an add or none of it. They also hold
  the uploads folder's file lock (``uploads_lock``) from storing a file until its add has
  committed or been undone, so a service starting up can delete the files of adds that a crash
  cut short without racing another process's add (``clean_orphan_uploads``).
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from waldo.api import Waldo
from waldo.data.images import ImageLoadError
from waldo.rerank import NO_RERANK, RERANKERS
from waldo.rerank.base import NO_RERANK_DESCRIPTION, NO_RERANK_TITLE, SCORE_KINDS, SCORE_SIMILARITY
from waldo.serve.errors import ClientError
from waldo.serve.match import match_pair
from waldo.serve.metrics import ServiceMetrics, resident_memory_bytes
from waldo.serve.schemas import AddedImage, SearchResponse
from waldo.serve.settings import ServeSettings
from waldo.serve.thumbnails import ThumbnailCache, render_thumbnail
from waldo.serve.uploads import (
    UPLOADS_DIR,
    CheckedUpload,
    check_upload,
    clean_orphan_uploads,
    store_upload,
    uploads_lock,
)

__all__ = ["SearchService"]

log = logging.getLogger("waldo.serve")


def _reranker_info(names: list[str]) -> dict[str, dict[str, str]]:
    """What the page shows of each offered ranking (its short title, what it does, its usual
    score kind), from the registry; "none" (the global ranking) included."""
    info = {NO_RERANK: {"title": NO_RERANK_TITLE, "description": NO_RERANK_DESCRIPTION, "score": SCORE_SIMILARITY}}
    for spec in (RERANKERS.spec(name) for name in names if name != NO_RERANK):
        info[spec.name] = {"title": spec.title or spec.name, "description": spec.description, "score": spec.score}
    return {name: info[name] for name in names}


class SearchService:
    """Everything the routes need, independent of HTTP (tests may drive it directly)."""

    def __init__(self, engine: Waldo, settings: ServeSettings) -> None:
        self.engine = engine
        self.settings = settings
        self.root = Path(engine.root).resolve()
        self.uploads_dir = self.root / UPLOADS_DIR
        self.metrics = ServiceMetrics()
        self.thumbnails = ThumbnailCache(settings.thumbnail_cache)
        self._write_lock = threading.Lock()
        self._rerankers = engine.available_rerankers()
        self.orphan_uploads_removed = 0  # by clean_orphan_uploads() since start

    @classmethod
    def open(cls, index_dir: str | Path, settings: ServeSettings) -> SearchService:
        """Load the index and its model once, and warm the model up so the first client does
        not pay for lazy initialisation."""
        engine = Waldo.open(index_dir, rrt_compile=settings.compile_rrt)
        # Convert the weights to the layout extraction uses now, not inside the first add,
        # where it would rewrite parameters under running queries.
        engine.model.to(memory_format=torch.channels_last)
        service = cls(engine, settings)
        service.clean_orphan_uploads()
        service.warm_up()
        return service

    def warm_up(self) -> None:
        """One throw-away query per rank mode, so the first client neither waits for lazy
        initialisation nor for a reranker's weights to load. A reranker that fails here is
        withdrawn from the offer (logged) instead of failing every query that asks for it."""
        blank = Image.new("RGB", (64, 64), (128, 128, 128))
        for mode in list(self._rerankers):
            try:
                self.engine.search(blank, 1, mode)
            except Exception as error:
                if mode == NO_RERANK:
                    raise
                log.warning("reranker %r withdrawn: it failed on a warm-up query (%s)", mode, error)
                self._rerankers.remove(mode)
                if mode == self.engine.default_reranker:
                    log.warning("the index's default reranker %r is withdrawn: a query that names "
                                "no reranker gets the global ranking alone", mode)

    def clean_orphan_uploads(self) -> int:
        """Delete stored uploads that no live image names (left by a crash between storing a
        file and its commit, or between a remove's commit and the file's deletion)."""
        removed = clean_orphan_uploads(self.uploads_dir, self.engine.store.contains_paths)
        if removed:
            log.info("removed %d upload file(s) that no indexed image names", len(removed))
        self.orphan_uploads_removed += len(removed)
        return len(removed)

    # ------------------------------------------------------------------ reading
    @property
    def rerankers(self) -> list[str]:
        return list(self._rerankers)

    @property
    def default_reranker(self) -> str:
        """What a query that names no reranker gets: the index's default (chosen on validation,
        see ``Waldo.default_reranker``) while this service offers it, else "none" (a default
        withdrawn at warm-up falls back to the global ranking)."""
        default = self.engine.default_reranker
        return default if default in self._rerankers else NO_RERANK

    def resolve_rerank(self, rerank: str | None) -> str:
        """The reranker a query runs: ``rerank``, or the default when it is None."""
        return self.default_reranker if rerank is None else rerank

    def check_query(self, k: int, rerank: str) -> None:
        """Raise ClientError (422) for a ``k`` or ``rerank`` this service cannot honour (a
        name: resolve None with :meth:`resolve_rerank` first)."""
        if not 1 <= k <= self.settings.max_k:
            raise ClientError(422, f"k must be between 1 and {self.settings.max_k}, got {k}")
        if rerank not in self._rerankers:
            raise ClientError(422, f"rerank {rerank!r} is not available here; choose one of "
                                   f"{', '.join(self._rerankers)}")

    def _checked_upload(self, data: bytes, filename: str | None) -> CheckedUpload:
        """check_upload under this service's limits; a refusal is counted before it propagates."""
        try:
            return check_upload(data, filename, max_bytes=self.settings.max_upload_bytes,
                                max_pixels=self.settings.max_pixels)
        except (ClientError, ImageLoadError):
            self.metrics.record_rejected()
            raise

    def search(self, data: bytes, filename: str | None, k: int, rerank: str | None = None) -> SearchResponse:
        """Decode and check the upload, then query the engine with the decoded image (the
        upload's one decode); ImageLoadError/ClientError for bad input. ``rerank`` None: the
        service's :attr:`default_reranker`; the response's ``rerank`` names the one that ran."""
        rerank = self.resolve_rerank(rerank)
        self.check_query(k, rerank)
        start = time.perf_counter()
        upload = self._checked_upload(data, filename)
        decode_ms = round((time.perf_counter() - start) * 1000, 2)
        outcome = self.engine.search(upload.image, k, rerank)  # k and rerank were checked above
        timings = {**outcome.timings_ms, "decode": decode_ms, "total": round((time.perf_counter() - start) * 1000, 2)}
        self.metrics.record_query(outcome.rerank, timings["total"])
        return SearchResponse.from_outcome(outcome, k, timings)

    def match(self, data: bytes, filename: str | None, image_id: int) -> dict[str, Any]:
        """Correspondences between an uploaded query and indexed image ``image_id``."""
        upload = self._checked_upload(data, filename)
        path = self.image_path(image_id)
        return match_pair(upload.image, image_id, path, max_pixels=self.settings.max_pixels,
                          features=self.engine.gv_sift)

    def image_path(self, image_id: int) -> Path:
        """The file of a live image; UnknownIdError if no live image has this id, and
        FileNotFoundError if its file has gone from disk."""
        record = self.engine.store.get(image_id)
        path = Path(record.path)
        if not path.is_file():
            raise FileNotFoundError(f"image {image_id} is indexed but its file is missing")
        return path

    def thumbnail(self, image_id: int) -> bytes:
        """JPEG thumbnail of a live image (cached)."""
        cached = self.thumbnails.get(image_id)
        if cached is not None:
            return cached
        path = self.image_path(image_id)
        data = render_thumbnail(str(path), self.settings.thumbnail_size, self.settings.max_pixels)
        self.thumbnails.put(image_id, data)
        return data

    def stats(self) -> dict[str, Any]:
        info = self.engine.store.info()
        config = self.engine.config
        return {
            "images": info["count"],
            "identities": info["identities"],
            "index_path": str(self.root),
            "index_bytes": sum(info["bytes"].values()),
            "segments": len(info["segments"]),
            "model": {"backbone": config.backbone, "dim": config.dim, "global_dim": config.global_width,
                      "pooling": config.pooling, "transform": config.transform, "image_size": config.image_size},
            "rerankers": self.rerankers,
            "reranker_info": _reranker_info(self.rerankers),
            "score_kinds": dict(SCORE_KINDS),  # score_kind -> what it means, in one sentence
            # what POST /search runs without a rerank field; "validation" when it is the choice the
            # reranker's training made on held-out identities, "fallback" when none was stored or
            # this index/service cannot offer the stored one (then the global ranking alone)
            "default_reranker": self.default_reranker,
            "default_reranker_source": ("validation" if self.engine.stored_default_reranker == self.default_reranker
                                        else "fallback"),
            "limits": {"max_upload_bytes": self.settings.max_upload_bytes,
                       "max_pixels": self.settings.max_pixels, "max_k": self.settings.max_k,
                       "default_k": self.settings.default_k,
                       "max_files_per_add": self.settings.max_files_per_add,
                       "max_inflight_uploads": self.settings.max_inflight_uploads},
            "resident_memory_bytes": resident_memory_bytes(),
            "thumbnails_cached": len(self.thumbnails),
            "orphan_uploads_removed": self.orphan_uploads_removed,
            **self.metrics.snapshot(),
        }

    # ------------------------------------------------------------------ writing
    def add(self, files: list[tuple[bytes, str | None]], identity: str = "") -> list[AddedImage]:
        """Check every file, store the new ones under ``INDEX/uploads/`` and index them.

        All files are decoded before anything is written: one bad file refuses the whole
        request (4xx) and leaves the index and the folder untouched.
        """
        if not files:
            raise ClientError(422, "no file given in the field 'image'")
        if len(files) > self.settings.max_files_per_add:
            raise ClientError(413, f"{len(files)} files in one request; the limit is "
                                   f"{self.settings.max_files_per_add}")
        checked = [self._checked_upload(data, name) for data, name in files]
        with self._write_lock, uploads_lock(self.uploads_dir):
            stored = [store_upload(upload, self.uploads_dir) for upload in checked]
            paths = [str(path) for path, _ in stored]
            already = dict(zip(paths, self.engine.store.contains_paths(paths)))
            attrs = [{"source": "upload", "original_name": upload.name} for upload in checked]
            try:
                report = self.engine.add(paths, [identity] * len(paths), attrs, batch_size=8,
                                         num_workers=0, progress=False)
            except BaseException:
                self._drop_unindexed(stored)
                raise
            if report.errors:  # decoded above, so only a file changed on disk gets here
                self._drop_unindexed(stored)
                raise ClientError(400, f"could not index: {report.errors[0][1]}")
            ids = self._ids_for(paths)
        self.metrics.record_add(len(report.added))
        seen: set[str] = set()
        out = []
        for upload, path in zip(checked, paths):
            if path in seen:
                continue  # the same bytes twice in one request: report once
            seen.add(path)
            out.append(AddedImage(id=ids[path], path=path, identity=identity, name=upload.name,
                                  created=not already[path]))
        return out

    def remove(self, image_id: int) -> None:
        """Remove a live image (UnknownIdError if none); its file goes too when the service
        stored it (under ``INDEX/uploads/``), never when it belongs to a dataset."""
        with self._write_lock, uploads_lock(self.uploads_dir):
            record = self.engine.store.get(image_id)
            self.engine.remove(ids=[image_id])
            path = Path(record.path)
            if path.parent == self.uploads_dir:
                path.unlink(missing_ok=True)
        self.thumbnails.drop(image_id)
        self.metrics.record_remove()

    def _ids_for(self, paths: list[str]) -> dict[str, int]:
        wanted = set(paths)
        snapshot = self.engine.store.snapshot()
        found = {p: int(i) for i, p in zip(snapshot.ids, snapshot.paths) if p in wanted}
        missing = wanted - found.keys()
        if missing:
            raise RuntimeError(f"just-added paths not found in the index: {sorted(missing)[:3]}")
        return found

    def _drop_unindexed(self, stored: list[tuple[Path, bool]]) -> None:
        """Delete files this request created that did not make it into the index."""
        created = [path for path, new in stored if new]
        live = self.engine.store.contains_paths([str(p) for p in created])
        for path, indexed in zip(created, live):
            if not indexed:
                path.unlink(missing_ok=True)
