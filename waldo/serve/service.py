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
* Writes never wait without a bound and never inside a query slot: the write lock, the uploads
  lock and the index's own write lock (which ``waldo index add`` in another process may hold
  for minutes) are each waited for at most ``write_wait_s``; then the write answers 503.
* Every decode (queries, uploads, thumbnails) reserves its memory from one
  :class:`~waldo.data.images.DecodeBudget`, so concurrent big images queue instead of adding up.
* Each add commits one small segment; a background thread merges small segments
  (``IndexStore.merge_small_segments``, crash-safe like every write), so their number, the
  process's open files and the add latency stay bounded however many uploads arrive.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from waldo.api import Waldo, first_offered
from waldo.sharded import ShardedWaldo, open_index
from waldo.data.images import DecodeBudget, ImageLoadError, decode_memory_estimate
from waldo.fsutil import LockTimeout
from waldo.index.errors import IndexBusyError, IndexResourceError, StorageFullError, is_resource_error, storage_full_errno
from waldo.rerank import NO_RERANK, RERANKERS
from waldo.rerank.base import NO_RERANK_DESCRIPTION, NO_RERANK_TITLE, SCORE_KINDS, SCORE_SIMILARITY
from waldo.serve.catalogue import StoresCatalogue
from waldo.serve.errors import ClientError
from waldo.serve.match import match_cells, match_pair

from waldo.serve.memory import trim_heap
from waldo.serve.metrics import ServiceMetrics, resident_memory_bytes
from waldo.serve.schemas import AddedImage, SearchResponse
from waldo.serve.settings import ServeSettings
from waldo.serve.thumbnails import ThumbnailCache, render_thumbnail
from waldo.serve.uploads import (
    UPLOADS_DIR,
    CheckedUpload,
    check_identity,
    check_upload,
    clean_orphan_uploads,
    store_upload,
    uploads_lock,
)

#: what ``POST /match/{id}?method=`` draws: the verifier's inliers, or local-match's cell pairs
MATCH_METHODS = ("geometry", "cells")

__all__ = ["SearchService"]

log = logging.getLogger("waldo.serve")


def _as_storage_error(error: OSError, root: Path) -> OSError:
    """A full disk (the uploads folder shares the index's) or exhausted file handles, as the
    index's own typed errors (507 and 503 in the app); any other OSError unchanged."""
    if isinstance(error, (StorageFullError, IndexResourceError, IndexBusyError)):
        return error
    code = storage_full_errno(error)
    if code is not None:
        return StorageFullError(code, f"no space left on device while storing an upload in {root}: nothing was "
                                      f"added", str(root))
    if is_resource_error(error):
        return IndexResourceError(error.errno or 0, f"out of file handles or memory while writing to {root}")
    return error


def _query_max_side(engine: Any) -> int:
    """The longest side a query needs: twice the larger of the model's resize and the
    verifier's working size (so the reduction itself never decides a result)."""
    from waldo.data.transforms import resize_size_for

    sides = [resize_size_for(engine.config.image_size)]
    features = engine.gv_sift  # the keypoint settings (None: no verification)
    if features is not None:
        sides.append(int(features.max_side))
    return 2 * max(sides)


def catalogue_of(engine: Any) -> Any:
    """The catalogue (waldo.serve.catalogue) of an engine: its stores' for a single or sharded
    index open here, the engine's own (``engine.catalogue``) for one served elsewhere."""
    if isinstance(engine, ShardedWaldo):
        return StoresCatalogue(engine.stores, engine.layout.shard_dirs)
    if isinstance(engine, Waldo):
        return StoresCatalogue([engine.store])
    return engine.catalogue


def _reranker_info(names: list[str]) -> dict[str, dict[str, str]]:
    """What the page shows of each offered ranking (its short title, what it does, its usual
    score kind), from the registry; "none" (the global ranking) included."""
    info = {NO_RERANK: {"title": NO_RERANK_TITLE, "description": NO_RERANK_DESCRIPTION, "score": SCORE_SIMILARITY}}
    for spec in (RERANKERS.spec(name) for name in names if name != NO_RERANK):
        info[spec.name] = {"title": spec.title or spec.name, "description": spec.description, "score": spec.score}
    return {name: info[name] for name in names}


class SearchService:
    """Everything the routes need, independent of HTTP (tests may drive it directly).

    ``engine``: a :class:`Waldo` (one index), a :class:`ShardedWaldo` (a sharded index, its
    shards searched in this process) or a ``waldo.serve.cluster.ClusterEngine`` (a sharded
    index served by Ray Serve deployments): anything with their ``search``, ``add``,
    ``remove``, reranker and model attributes; what else the service reads of the index goes
    through :attr:`catalogue`."""

    def __init__(self, engine: Waldo | ShardedWaldo | Any, settings: ServeSettings) -> None:
        self.engine = engine
        self.catalogue = catalogue_of(engine)
        self.settings = settings
        self.root = Path(engine.root).resolve()
        self.uploads_dir = self.root / UPLOADS_DIR
        self.metrics = ServiceMetrics()
        self.thumbnails = ThumbnailCache(settings.thumbnail_cache)
        self._write_lock = threading.Lock()
        self._rerankers = engine.available_rerankers()
        self.orphan_uploads_removed = 0  # by clean_orphan_uploads() since start
        self.decode_budget = DecodeBudget(settings.decode_memory_bytes)
        # Writers wait this long for the index's write lock (another process's add), then 503.
        self.catalogue.lock_timeout = settings.write_wait_s
        # Queries are decoded no larger than the model and the verifier use (JPEGs at reduced
        # scale): less time and memory per query, the same descriptors to rounding.
        self.query_max_side = _query_max_side(engine)
        # Where the indexed files live, to name them in responses without the server's own paths.
        self.collection_root = self.catalogue.collection_root(self.root)
        self._merge_thread: threading.Thread | None = None
        self._merge_guard = threading.Lock()
        self._closing = threading.Event()
        self.merges = 0  # background merges finished since start

    @classmethod
    def open(cls, index_dir: str | Path, settings: ServeSettings, engine: Any = None) -> SearchService:
        """Load the index (single or sharded) and its model once, and warm the model up so the
        first client does not pay for lazy initialisation; ``engine``: one already open (e.g.
        the Ray one, waldo.serve.cluster) instead."""
        if engine is None:
            engine = open_index(index_dir, rrt_compile=settings.compile_rrt)
            # Convert the weights to the layout extraction uses now, not inside the first add,
            # where it would rewrite parameters under running queries.
            engine.model.to(memory_format=torch.channels_last)
        service = cls(engine, settings)
        service.clean_orphan_uploads()
        service.warm_up()
        service._merge_in_background()  # an index left with many small segments starts merging at once
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
                                "no reranker gets %r", mode, self.default_reranker)

    def clean_orphan_uploads(self) -> int:
        """Delete stored uploads that no live image names (left by a crash between storing a
        file and its commit, or between a remove's commit and the file's deletion)."""
        removed = clean_orphan_uploads(self.uploads_dir, self.catalogue.contains_paths)
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
        """What a query that names no reranker gets: the first of the index's validated choices
        (``Waldo.default_chain``) this service offers, else "none" (a default withdrawn at
        warm-up falls back to the next choice, then to the global ranking)."""
        return first_offered(self.engine.default_chain, self._rerankers, NO_RERANK)

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

    def _checked_upload(self, data: bytes, filename: str | None, *, max_side: int | None = None,
                        keep_pixels: bool = True) -> CheckedUpload:
        """check_upload under this service's limits and decode budget; a refusal is counted
        before it propagates."""
        try:
            return check_upload(data, filename, max_bytes=self.settings.max_upload_bytes,
                                max_pixels=self.settings.max_pixels, budget=self.decode_budget,
                                budget_timeout=self.settings.write_wait_s, max_side=max_side,
                                keep_pixels=keep_pixels)
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
        upload = self._checked_upload(data, filename, max_side=self.query_max_side)
        decode_ms = round((time.perf_counter() - start) * 1000, 2)
        outcome = self.engine.search(upload.image, k, rerank)  # k and rerank were checked above
        timings = {**outcome.timings_ms, "decode": decode_ms, "total": round((time.perf_counter() - start) * 1000, 2)}
        self.metrics.record_query(outcome.rerank, timings["total"])
        response = SearchResponse.from_outcome(outcome, k, timings)
        response.results = [hit.model_copy(update={"path": self.public_path(hit.path)}) for hit in response.results]
        return response

    def match(self, data: bytes, filename: str | None, image_id: int, method: str = "geometry") -> dict[str, Any]:
        """Correspondences between an uploaded query and indexed image ``image_id``: the
        verifier's inliers (``method="geometry"``) or the image cells local-match counted
        (``"cells"``, for an index that offers it)."""
        if method not in MATCH_METHODS:
            raise ClientError(422, f"match method must be one of {', '.join(MATCH_METHODS)}, got {method!r}")
        if method == "cells" and "local-match" not in self._rerankers:
            raise ClientError(422, "this index has no stage locals to match cells with (build it with --local-stage)")
        upload = self._checked_upload(data, filename)
        path = self.image_path(image_id)
        if method == "cells":
            transform = getattr(self.engine, "transform", None) or self.engine.shards[0].transform
            return match_cells(self.engine, transform, upload.image, image_id, path,
                               max_pixels=self.settings.max_pixels, budget=self.decode_budget,
                               budget_timeout=self.settings.write_wait_s)
        return match_pair(upload.image, image_id, path, max_pixels=self.settings.max_pixels,
                          features=self.engine.gv_sift, budget=self.decode_budget,
                          budget_timeout=self.settings.write_wait_s)

    def image_path(self, image_id: int) -> Path:
        """The file of a live image; UnknownIdError if no live image has this id, and
        FileNotFoundError if its file has gone from disk."""
        record = self.catalogue.get(image_id)
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
        data = render_thumbnail(str(path), self.settings.thumbnail_size, self.settings.max_pixels,
                                budget=self.decode_budget, budget_timeout=self.settings.write_wait_s)
        self.thumbnails.put(image_id, data)
        return data

    def public_path(self, path: str) -> str:
        """How responses name an indexed file: relative to the index folder (uploads) or to the
        folder the collection was indexed from, never the server's absolute path (it tells a
        client about the machine and its users, and means nothing to them)."""
        for root in (self.root, self.collection_root):
            if root is not None:
                try:
                    return Path(path).relative_to(root).as_posix()
                except ValueError:
                    pass
        return Path(path).name

    def stats(self) -> dict[str, Any]:
        info = self.catalogue.info()
        config = self.engine.config
        return {
            "images": info["count"],
            "identities": info["identities"],
            "index_name": self.root.name,
            "index_bytes": sum(info["bytes"].values()),
            "segments": len(info["segments"]),
            "merges": self.merges,
            "model": {"backbone": config.backbone, "dim": config.dim, "global_dim": config.descriptor_width,
                      "pooling": config.pooling, "transform": config.transform, "image_size": config.image_size},
            "rerankers": self.rerankers,
            "reranker_info": _reranker_info(self.rerankers),
            "score_kinds": dict(SCORE_KINDS),  # score_kind -> what it means, in one sentence
            # what POST /search runs without a rerank field; "validation" when it is one of the
            # choices made on held-out identities (the first this service offers), "fallback" when
            # none was stored or this service offers none of them (then the global ranking alone)
            "default_reranker": self.default_reranker,
            "default_reranker_source": "validation" if self.default_reranker in self.engine.default_chain else "fallback",
            "limits": {"max_upload_bytes": self.settings.max_upload_bytes,
                       "max_pixels": self.settings.max_pixels, "max_k": self.settings.max_k,
                       "default_k": self.settings.default_k,
                       "max_files_per_add": self.settings.max_files_per_add,
                       "max_inflight_uploads": self.settings.max_inflight_uploads,
                       "max_upload_memory_bytes": self.settings.max_upload_memory_bytes,
                       "body_idle_timeout_s": self.settings.body_idle_timeout_s,
                       "body_timeout_s": self.settings.body_timeout_s,
                       "write_wait_s": self.settings.write_wait_s,
                       "decode_memory_bytes": self.settings.decode_memory_bytes},
            "resident_memory_bytes": resident_memory_bytes(),
            "thumbnails_cached": len(self.thumbnails),
            "orphan_uploads_removed": self.orphan_uploads_removed,
            # a sharded index served on Ray: shards that did not answer (the counts above are the others')
            **({"missing_shards": info["missing_shards"]} if "missing_shards" in info else {}),
            **self.metrics.snapshot(),
        }

    # ------------------------------------------------------------------ writing
    def add(self, files: list[tuple[bytes, str | None]], identity: str = "") -> list[AddedImage]:
        """Check every file, store the new ones under ``INDEX/uploads/`` and index them.

        All files are decoded before anything is written: one bad file refuses the whole
        request (4xx) and leaves the index and the folder untouched. ``identity`` is stored
        exactly as given (:func:`check_identity`). Bytes already indexed are not added again:
        their entry reports ``created: false`` and the identity they were indexed under; under
        a *different* identity the request is refused (409) rather than silently keeping the old
        label or relabelling an image someone else added.
        """
        if not files:
            raise ClientError(422, "no file given in the field 'image'")
        if len(files) > self.settings.max_files_per_add:
            raise ClientError(413, f"{len(files)} files in one request; the limit is "
                                   f"{self.settings.max_files_per_add}")
        identity = check_identity(identity)
        # One at a time, at query size, keeping only the bytes: indexing re-reads the stored file.
        checked = [self._checked_upload(data, name, max_side=self.query_max_side, keep_pixels=False)
                   for data, name in files]
        # Indexing decodes each file again at full resolution, one at a time, through code that
        # takes no budget: reserve its largest decode (at most the whole budget) around it.
        index_decode = min(max(decode_memory_estimate(upload.data) for upload in checked),
                           self.decode_budget.max_bytes)
        with self._writing():
            paths = [str(self.uploads_dir / upload.stored_name) for upload in checked]
            indexed = self._indexed_identities(paths)
            for upload, path in zip(checked, paths):
                if path in indexed and identity and indexed[path][1] != identity:
                    image_id, stored = indexed[path]
                    raise ClientError(409, f"the upload {upload.name!r} is already indexed as image {image_id} "
                                           f"with identity {stored!r}; nothing was added. To give it identity "
                                           f"{identity!r}, remove it first (DELETE /images/{image_id}) and add it "
                                           f"again")
            stored_files = [store_upload(upload, self.uploads_dir) for upload in checked]
            attrs = [{"source": "upload", "original_name": upload.name} for upload in checked]
            try:
                with self.decode_budget.reserve(index_decode, timeout=self.settings.write_wait_s):
                    report = self.engine.add(paths, [identity] * len(paths), attrs, batch_size=8,
                                             num_workers=0, progress=False, merge=False)
            except BaseException:
                self._drop_unindexed(stored_files)
                raise
            if report.errors:  # decoded above, so only a file changed on disk gets here
                self._drop_unindexed(stored_files)
                raise ClientError(400, f"could not index: {report.errors[0][1]}")
            ids = self._ids_for(paths)
        self.metrics.record_add(len(report.added))
        self._merge_in_background()
        trim_heap()
        seen: set[str] = set()
        out = []
        for upload, path in zip(checked, paths):
            if path in seen:
                continue  # the same bytes twice in one request: report once
            seen.add(path)
            created = path not in indexed
            out.append(AddedImage(id=ids[path], path=self.public_path(path),
                                  identity=identity if created else indexed[path][1], name=upload.name,
                                  created=created))
        return out

    def remove(self, image_id: int) -> None:
        """Remove a live image (UnknownIdError if none); its file goes too when the service
        stored it (under ``INDEX/uploads/``), never when it belongs to a dataset."""
        with self._writing():
            record = self.catalogue.get(image_id)
            self.engine.remove(ids=[image_id])
            path = Path(record.path)
            if path.parent == self.uploads_dir:
                path.unlink(missing_ok=True)
        self.thumbnails.drop(image_id)
        self.metrics.record_remove()

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """Hold this service's write lock and the uploads folder's lock, each waited for at most
        ``write_wait_s`` (503 after that: a long ``waldo index add`` elsewhere, or a burst of
        writes here, must not leave requests hanging)."""
        wait = self.settings.write_wait_s
        if not self._write_lock.acquire(timeout=wait):
            raise IndexBusyError(f"another write to this index is in progress; waited {wait:g} s")
        try:
            with uploads_lock(self.uploads_dir, timeout=wait):
                yield
        except LockTimeout as error:  # the uploads folder's lock, held by another process
            raise IndexBusyError(str(error)) from None
        except OSError as error:
            raise _as_storage_error(error, self.root) from None
        finally:
            self._write_lock.release()

    def _indexed_identities(self, paths: list[str]) -> dict[str, tuple[int, str]]:
        """path -> (id, identity) for those of ``paths`` that are live (the catalogue only)."""
        return {r.path: (r.id, r.identity) for r in self.catalogue.records_for_paths(sorted(set(paths)))}

    # ------------------------------------------------------------------ merging
    def _merge_in_background(self) -> None:
        """Start a merge of small segments when the index wants one and none is running."""
        with self._merge_guard:
            if self._closing.is_set() or (self._merge_thread is not None and self._merge_thread.is_alive()):
                return
            try:
                if not self.catalogue.needs_merge():
                    return
            except Exception:  # noqa: BLE001 - a probe failure must not fail the add that triggered it
                log.exception("could not check whether the index needs a merge")
                return
            self._merge_thread = threading.Thread(target=self._merge, name="waldo-merge", daemon=True)
            self._merge_thread.start()

    def _merge(self) -> None:
        try:
            while not self._closing.is_set() and self.catalogue.needs_merge():
                stats = self.catalogue.merge_small_segments()
                self.merges += 1
                log.info("merged small segments: %s", stats)
        except IndexBusyError:
            pass  # another writer holds the lock; the next add tries again
        except Exception:  # noqa: BLE001 - logged; the index stays as it was (crash-safe merge)
            log.exception("background merge of small segments failed")
        finally:
            trim_heap()

    def close(self, timeout: float = 60.0) -> None:
        """Stop merging (a merge in progress finishes: it is crash-safe but finishing is kinder)
        and close the index."""
        self._closing.set()
        thread = self._merge_thread
        if thread is not None:
            thread.join(timeout)
        self.catalogue.close()

    def _ids_for(self, paths: list[str]) -> dict[str, int]:
        found = {path: image_id for path, (image_id, _) in self._indexed_identities(paths).items()}
        missing = set(paths) - found.keys()
        if missing:
            raise RuntimeError(f"just-added paths not found in the index: {sorted(missing)[:3]}")
        return found

    def _drop_unindexed(self, stored: list[tuple[Path, bool]]) -> None:
        """Delete files this request created that did not make it into the index."""
        created = [path for path, new in stored if new]
        live = self.catalogue.contains_paths([str(p) for p in created])
        for path, indexed in zip(created, live):
            if not indexed:
                path.unlink(missing_ok=True)
