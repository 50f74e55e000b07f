"""A sharded index served by Ray Serve: ``waldo serve --engine ray --index SHARDED``.

    waldo index reshard --index my-index --shards 4 --out my-index-4
    RAY_ADDRESS=ray://head:10001 waldo serve --engine ray --index my-index-4 --replicas-per-shard 2

Who does what:

* **The ingress** is ``waldo serve``'s own FastAPI app, page and API, unchanged: it decodes and
  checks uploads, then calls the deployments below through Serve handles and merges what the
  shards return (:func:`waldo.sharded.merge_shard_outcomes`, the very merge of the in-process
  :class:`~waldo.sharded.ShardedWaldo`). Serve's own HTTP proxy is not started.
* **One model deployment** (:class:`QueryDescriber`, ``--model-replicas``) describes each query
  once: its global and local descriptors, and its keypoints when the reranker verifies geometry.
* **One deployment per shard** (:class:`ShardWorker`, ``--replicas-per-shard``) opens that shard
  (an ordinary index) and runs the kNN and the chosen reranker on its own candidates: the
  reranking data (local descriptors, keypoints) never leaves the shard's machine, only the
  query's descriptors and the shard's top-k travel. Adds go to the shard that owns each path
  (waldo.index.shards.shard_of), which describes and commits them itself; an add is
  acknowledged after that commit. Deletes go to the shard their id names.

Faults: a search waits ``shard_timeout_s`` for the shards together; a shard that has not answered
by then, or whose replica died and whose retry failed too, is left out and the answer says
``partial: true`` with ``missing_shards``. A call to a replica that died is retried once
(searches are read-only; an add is idempotent: a retried add finds its committed images
"already indexed"), so with two replicas per shard the other one answers.

What this assumes: every replica can read the index folder and the indexed files at the same
paths (one machine, or a shared filesystem), and replicas of one shard share its folder (the
index's file locks make their writes safe). Replicas of a shard on machines with their own
disks, kept in step by replication, are not built: see docs/scaling.md.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from waldo.api import MODEL_FOLDER, AddReport, Waldo
from waldo.data.images import load_image
from waldo.index import IndexBusyError, IndexedImage, IndexResourceError, StorageFullError, UnknownIdError
from waldo.index.shards import ShardLayout, global_id, read_layout, shard_of, split_id
from waldo.rerank import NO_RERANK, RERANKERS, Need
from waldo.results import SearchOutcome, StageTimer
from waldo.serve.catalogue import collection_root, common_root, group_by_shard, merge_info
from waldo.serve.errors import BackendUnavailableError
from waldo.sharded import merge_shard_outcomes

__all__ = ["BackendUnavailableError", "ClusterCatalogue", "ClusterEngine", "QueryDescriber", "ShardWorker",
           "start_cluster"]

log = logging.getLogger("waldo.serve")

APP_PREFIX = "waldo"  # Serve application names: waldo-model, waldo-shard-000, ...


# ----------------------------------------------------------------------------- errors over Ray
# A shard's typed errors cross the process boundary as plain data and are raised again here as
# the same types (the app maps them to 404 / 503 / 507), instead of relying on how Ray rebuilds
# exception classes with their own constructors.
def _error_record(error: BaseException) -> dict[str, Any]:
    if isinstance(error, UnknownIdError):
        return {"kind": "unknown_id", "message": str(error), "missing": list(error.missing)}
    if isinstance(error, StorageFullError):
        return {"kind": "storage_full", "message": str(error.strerror or error), "errno": error.errno or 0}
    if isinstance(error, IndexResourceError):
        return {"kind": "resource", "message": str(error.strerror or error), "errno": error.errno or 0}
    if isinstance(error, IndexBusyError):
        return {"kind": "busy", "message": str(error)}
    if isinstance(error, ValueError):
        return {"kind": "value", "message": str(error)}
    raise error


def _raise_record(record: dict[str, Any]) -> None:
    kind, message = record["kind"], record["message"]
    if kind == "unknown_id":
        raise UnknownIdError(message, record["missing"])
    if kind == "storage_full":
        raise StorageFullError(record["errno"], message)
    if kind == "resource":
        raise IndexResourceError(record["errno"], message)
    if kind == "busy":
        raise IndexBusyError(message)
    raise ValueError(message)


def _guarded(call: Callable[[], Any]) -> dict[str, Any]:
    try:
        return {"ok": call()}
    except (UnknownIdError, StorageFullError, IndexResourceError, IndexBusyError, ValueError) as error:
        return {"error": _error_record(error)}


def _unwrap(reply: Any) -> Any:
    """A shard method's value: the ``"ok"`` of a guarded reply (its ``"error"`` raised), or the
    reply itself for the unguarded ones (count, info, ...)."""
    if not (isinstance(reply, dict) and reply.keys() in ({"ok"}, {"error"})):
        return reply
    if "error" in reply:
        _raise_record(reply["error"])
    return reply["ok"]


# ----------------------------------------------------------------------------- deployments
class QueryDescriber:
    """The query model (a Serve deployment; a plain class too): one query's descriptors and,
    when asked, its keypoints for geometric verification, with the index's one model."""

    def __init__(self, index_dir: str) -> None:
        import torch

        layout = read_layout(index_dir)
        # Shard 0's model and keypoint settings: read_layout checked that every shard has the same.
        engine = Waldo.open(layout.shard_dirs[0])
        engine.store.close()  # only the model, its transform and gv_sift are needed here
        engine.model.to(memory_format=torch.channels_last)
        self.engine = engine

    def describe(self, pixels: np.ndarray, keypoints: bool) -> dict[str, Any]:
        """``pixels``: the decoded query (H, W, 3) uint8. Returns ``global`` (D,), ``local``
        (L, D), ``keypoints`` (waldo.models.keypoints.LocalFeatures or None) and their
        milliseconds (``extract_ms``, ``keypoints_ms``)."""
        from waldo.models.keypoints import extract_sift

        picture = Image.fromarray(pixels)
        started = time.perf_counter()
        query_global, query_local = self.engine.describe(picture)
        extract_ms = (time.perf_counter() - started) * 1000
        features, keypoints_ms = None, 0.0
        if keypoints and self.engine.gv_sift is not None:
            started = time.perf_counter()
            features = extract_sift(picture, self.engine.gv_sift)
            keypoints_ms = (time.perf_counter() - started) * 1000
        return {"global": query_global, "local": query_local, "keypoints": features, "extract_ms": extract_ms,
                "keypoints_ms": keypoints_ms}

    def pid(self) -> int:
        return os.getpid()


class ShardWorker:
    """One shard of a sharded index (a Serve deployment; a plain class too): its kNN, reranking,
    adds, removes and catalogue reads. Every method answers ``{"ok": value}`` or ``{"error":
    record}`` for the typed index errors (see :func:`_unwrap`)."""

    def __init__(self, shard_dir: str, shard: int, shards: int, *, rrt_compile: bool = False,
                 lock_timeout: float | None = None) -> None:
        import torch

        self.shard, self.shards = shard, shards
        self.engine = Waldo.open(shard_dir, rrt_compile=rrt_compile)
        self.engine.model.to(memory_format=torch.channels_last)
        self.engine.store.lock_timeout = lock_timeout

    def search(self, query_global: np.ndarray, query_local: np.ndarray, keypoints: Any, k: int,
               rerank: str) -> dict[str, Any]:
        """This shard's answer (its own ids): its global top ``max(k, RERANK_TOP_K)`` reranked."""
        return _guarded(lambda: self.engine.search_described(None, query_global, query_local, k, rerank,
                                                             query_keypoints=keypoints))

    def add(self, paths: list[str], identities: list[str], attrs: list[dict]) -> dict[str, Any]:
        """Describe and commit the images this shard owns (in one transaction); returns
        ``added`` (path -> local id), ``already_indexed`` and ``errors`` ((path, reason) pairs)."""
        misplaced = [p for p in paths if shard_of(p, self.shards) != self.shard]
        if misplaced:  # a routing bug must not store an image where adds and removes will not find it
            return {"error": {"kind": "value", "message": f"{len(misplaced)} paths belong to another shard"}}

        def run() -> dict[str, Any]:
            report = self.engine.add(paths, identities, attrs, batch_size=8, num_workers=0, progress=False,
                                     merge=True)
            skipped = set(report.already_indexed) | {error[0] for error in report.errors}
            new = [path for path in paths if path not in skipped]
            ids = {record.path: record.id for record in self.engine.store.records_for_paths(new)}
            return {"added": {path: ids[path] for path in new if path in ids},
                    "already_indexed": list(report.already_indexed),
                    "errors": [list(error) for error in report.errors]}

        return _guarded(run)

    def remove(self, ids: list[int]) -> dict[str, Any]:
        return _guarded(lambda: self.engine.remove(ids=ids))

    def contains_paths(self, paths: list[str]) -> dict[str, Any]:
        return _guarded(lambda: self.engine.store.contains_paths(paths))

    def records_for_paths(self, paths: list[str]) -> dict[str, Any]:
        return _guarded(lambda: self.engine.store.records_for_paths(paths))

    def get(self, image_id: int) -> dict[str, Any]:
        return _guarded(lambda: self.engine.store.get(image_id))

    def count(self) -> int:
        return len(self.engine)

    def info(self) -> dict[str, Any]:
        """The store's counts, this shard's identities (counted across shards by the ingress)
        and this process's resident memory."""
        from waldo.serve.metrics import resident_memory_bytes

        info = self.engine.store.info()
        identities = sorted({record.identity for record in self.engine.store.records()})
        return {"count": info["count"], "bytes": info["bytes"], "segments": info["segments"],
                "identities": identities, "rss_bytes": resident_memory_bytes(), "pid": os.getpid()}

    def collection_root(self, index_root: str) -> str | None:
        root = collection_root(self.engine.store.snapshot().paths, Path(index_root))
        return None if root is None else str(root)

    def rerankers(self) -> dict[str, Any]:
        return {"available": self.engine.available_rerankers(), "default": self.engine.default_reranker,
                "stored_default": self.engine.stored_default_reranker, "chain": list(self.engine.default_chain)}

    def pid(self) -> int:
        return os.getpid()


# ----------------------------------------------------------------------------- the ingress's side
def _is_replica_death(error: BaseException) -> bool:
    """Whether a call failed because the replica (or its process) died or was unreachable,
    rather than because of the request."""
    from ray import exceptions

    kinds = tuple(getattr(exceptions, name) for name in ("RayActorError", "ActorDiedError", "ActorUnavailableError",
                                                         "WorkerCrashedError", "NodeDiedError")
                  if hasattr(exceptions, name))
    return isinstance(error, kinds)


class ClusterEngine:
    """The engine :class:`waldo.serve.service.SearchService` drives when the index is served by
    Ray Serve: the surface of :class:`waldo.sharded.ShardedWaldo` (search, add, remove, the
    reranker attributes), each call going to the deployments through their handles."""

    def __init__(self, layout: ShardLayout, model_handle: Any, shard_handles: Sequence[Any], *,
                 shard_timeout_s: float = 10.0, write_timeout_s: float = 600.0,
                 apps: Sequence[str] = (), owns_ray: bool = False) -> None:
        from waldo.models.checkpoint import ModelConfig

        if len(shard_handles) != layout.shards:
            raise ValueError(f"{layout.root} has {layout.shards} shards, got {len(shard_handles)} handles")
        self.layout = layout
        self.root = layout.root
        self.n_shards = layout.shards
        self.model_handle = model_handle
        self.shard_handles = list(shard_handles)
        self.shard_timeout_s = shard_timeout_s
        self.write_timeout_s = write_timeout_s
        self.apps = list(apps)
        self.owns_ray = owns_ray
        config_file = layout.shard_dirs[0] / MODEL_FOLDER / "config.json"
        self.config = ModelConfig.model_validate_json(config_file.read_text(encoding="utf-8"))
        gv = layout.manifests[0].get("gv_features")
        from waldo.models.keypoints import SiftConfig

        self.gv_sift = SiftConfig.model_validate(gv) if gv else None
        offer = self._call(0, "rerankers", timeout=120.0)
        self._available: list[str] = offer["available"]
        self.default_reranker: str = offer["default"]
        self.stored_default_reranker: str | None = offer["stored_default"]
        self.default_chain: tuple[str, ...] = tuple(offer["chain"])
        self.catalogue = ClusterCatalogue(self)

    # ------------------------------------------------------------------ calls
    def _call(self, shard: int, method: str, *args: Any, timeout: float | None = None) -> Any:
        """One call to shard ``shard``'s deployment (:meth:`_fan_out` for one shard: its typed
        errors raised again here, a call that met a dead replica tried once more);
        BackendUnavailableError when it did not answer within ``timeout`` (default the shard
        timeout) or has no live replica."""
        timeout = self.shard_timeout_s if timeout is None else timeout
        replies = self._fan_out(method, {shard: args}, timeout)
        if shard not in replies:
            raise BackendUnavailableError(f"shard {shard} did not answer within {timeout:g} s or has no live replica")
        return replies[shard]

    def _fan_out(self, method: str, args_per_shard: dict[int, tuple], timeout: float) -> dict[int, Any]:
        """``method`` on several shards at once; returns shard -> reply (typed errors raised),
        leaving out the shards that did not answer in ``timeout`` seconds (together) or whose
        replica died twice. The caller decides whether a missing shard is acceptable."""
        deadline = time.monotonic() + timeout
        pending = {shard: getattr(self.shard_handles[shard], method).remote(*args)
                   for shard, args in args_per_shard.items()}
        retried: set[int] = set()
        replies: dict[int, Any] = {}
        while pending:
            shard, response = next(iter(pending.items()))
            try:
                reply = response.result(timeout_s=max(0.05, deadline - time.monotonic()))
            except TimeoutError:
                log.warning("shard %d did not answer %s within %.1f s", shard, method, timeout)
                del pending[shard]
                continue
            except Exception as error:  # noqa: BLE001 - a dead replica: once more, else leave it out
                if not _is_replica_death(error):
                    raise
                if shard not in retried and time.monotonic() < deadline:
                    retried.add(shard)
                    log.warning("shard %d: a replica died during %s; retrying once", shard, method)
                    pending[shard] = getattr(self.shard_handles[shard], method).remote(*args_per_shard[shard])
                    continue
                log.warning("shard %d has no live replica for %s", shard, method)
                del pending[shard]
                continue
            del pending[shard]
            replies[shard] = _unwrap(reply)
        return replies

    # ------------------------------------------------------------------ reading
    def available_rerankers(self) -> list[str]:
        return list(self._available)

    def search(self, image: Any, k: int = 10, rerank: str | None = None) -> SearchOutcome:
        """:meth:`waldo.sharded.ShardedWaldo.search` across the deployments: the model
        deployment describes the query once, every shard searches and reranks its own
        candidates, the ingress merges. Shards that do not answer within ``shard_timeout_s``
        are left out (``partial``); BackendUnavailableError when the model or every shard is
        unavailable."""
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        rerank = self.default_reranker if rerank is None else rerank
        if rerank not in self._available:
            raise ValueError(f"rerank {rerank!r} is not available for this index; choose one of "
                             f"{', '.join(self._available)}")
        spec = None if rerank == NO_RERANK else RERANKERS.spec(rerank)
        stage = StageTimer()
        with stage("decode"):
            picture = image if isinstance(image, Image.Image) else load_image(image)
            pixels = np.asarray(picture.convert("RGB"))
        wants_keypoints = spec is not None and Need.KEYPOINTS in spec.needs
        started = time.monotonic()
        try:
            described = self.model_handle.describe.remote(pixels, wants_keypoints).result(
                timeout_s=self.shard_timeout_s)
        except TimeoutError:
            raise BackendUnavailableError(f"the query model did not answer within {self.shard_timeout_s:g} s") from None
        except Exception as error:  # noqa: BLE001
            if not _is_replica_death(error):
                raise
            described = self.model_handle.describe.remote(pixels, wants_keypoints).result(
                timeout_s=max(0.05, self.shard_timeout_s - (time.monotonic() - started)))
        stage.ms["extract"] = round(described["extract_ms"], 2)
        args = (described["global"], described["local"], described["keypoints"], k, rerank)
        replies = self._fan_out("search", {shard: args for shard in range(self.n_shards)}, self.shard_timeout_s)
        if not replies:
            raise BackendUnavailableError(f"none of the {self.n_shards} shards answered within "
                                          f"{self.shard_timeout_s:g} s")
        outcomes = [replies.get(shard) for shard in range(self.n_shards)]
        return merge_shard_outcomes(outcomes, k=k, rerank=rerank, reranked=spec is not None, timings=stage.ms,
                                    rerank_ms=described["keypoints_ms"])

    def replica_pids(self, shard: int | None = None, *, calls: int = 16) -> set[int]:
        """Process ids of the replicas that answered ``calls`` calls (spread over replicas by
        Serve's router) of shard ``shard``'s deployment, or of the query model's (None): for
        fault tests and per-process memory figures."""
        handle = self.model_handle if shard is None else self.shard_handles[shard]
        responses = [handle.pid.remote() for _ in range(calls)]
        return {response.result(timeout_s=60) for response in responses}

    def __len__(self) -> int:
        return sum(self._fan_out("count", {shard: () for shard in range(self.n_shards)},
                                 self.shard_timeout_s).values())

    # ------------------------------------------------------------------ writing
    def add(self, paths: Sequence[str], identities: Sequence[str] | None = None,
            attrs: Sequence[dict] | None = None, **_: Any) -> AddReport:
        """Send each image to the shard that owns its path (all shards at once); each describes
        and commits its part. The report's ``added`` holds sharded ids in input order. Every
        shard must answer: a shard that does not (in ``write_timeout_s``) fails the add with
        BackendUnavailableError after the others committed (rerunning it skips those)."""
        paths = [str(Path(p).resolve()) for p in paths]
        identities = list(identities) if identities is not None else [""] * len(paths)
        attrs = list(attrs) if attrs is not None else [{} for _ in paths]
        groups: dict[int, list[int]] = {}
        for position, path in enumerate(paths):
            groups.setdefault(shard_of(path, self.n_shards), []).append(position)
        requests = {shard: ([paths[i] for i in positions], [identities[i] for i in positions],
                            [attrs[i] for i in positions]) for shard, positions in groups.items()}
        replies = self._fan_out("add", requests, self.write_timeout_s)
        missing = sorted(set(requests) - set(replies))
        if missing:
            raise BackendUnavailableError(f"shards {missing} did not confirm their part of the add; images "
                                          f"sent to the other shards were added")
        report = AddReport()
        added: dict[str, int] = {}
        for shard, reply in replies.items():
            report.already_indexed += reply["already_indexed"]
            report.errors += [tuple(error) for error in reply["errors"]]
            for path, local_id in reply["added"].items():  # path -> the id the shard committed it under
                added[path] = global_id(local_id, shard, self.n_shards)
        report.added = [added[path] for path in paths if path in added]
        return report

    def remove(self, ids: Sequence[int] = (), paths: Sequence[str] = ()) -> int:
        """Remove images by sharded id (each from the shard its id names); UnknownIdError for
        an id no shard holds (checked on every shard first: nothing is removed then)."""
        if paths:
            raise ValueError("the Ray service removes by id only")
        by_shard: dict[int, list[int]] = {}
        for image_id in ids:
            shard, local_id = split_id(int(image_id), self.n_shards)
            by_shard.setdefault(shard, []).append(local_id)
        for shard, local_ids in by_shard.items():
            for local_id in local_ids:
                self._call(shard, "get", local_id)  # UnknownIdError before anything is removed
        return sum(self._call(shard, "remove", local_ids, timeout=self.write_timeout_s)
                   for shard, local_ids in by_shard.items())

    def close(self) -> None:
        """Delete the Serve applications this engine deployed (and stop Ray if it started it)."""
        try:
            from ray import serve

            for app in self.apps:
                serve.delete(app)
            if self.owns_ray:
                import ray

                serve.shutdown()
                ray.shutdown()
        except Exception:  # noqa: BLE001 - closing must not raise over a failed shutdown
            log.exception("could not shut the Ray Serve applications down")


class ClusterCatalogue:
    """:class:`waldo.serve.catalogue.StoresCatalogue`'s surface over the shard deployments."""

    def __init__(self, engine: ClusterEngine) -> None:
        self.engine = engine
        self.n = engine.n_shards
        self.lock_timeout: float | None = None  # given to the shard replicas when they start

    def contains_paths(self, paths: Sequence[str]) -> list[bool]:
        found = [False] * len(paths)
        for shard, positions in group_by_shard(paths, self.n).items():
            answer = self.engine._call(shard, "contains_paths", [paths[i] for i in positions])
            for position, ok in zip(positions, answer):
                found[position] = ok
        return found

    def records_for_paths(self, paths: Sequence[str]) -> list[IndexedImage]:
        import dataclasses

        out = []
        for shard, positions in group_by_shard(paths, self.n).items():
            records = self.engine._call(shard, "records_for_paths", [paths[i] for i in positions])
            out += [dataclasses.replace(r, id=global_id(r.id, shard, self.n)) for r in records]
        return out

    def get(self, image_id: int) -> IndexedImage:
        import dataclasses

        shard, local_id = split_id(image_id, self.n)
        return dataclasses.replace(self.engine._call(shard, "get", local_id), id=image_id)

    def collection_root(self, index_root: Path) -> Path | None:
        roots = self.engine._fan_out("collection_root", {s: (str(index_root),) for s in range(self.n)}, 120.0)
        return common_root([Path(root) if root else None for root in roots.values()])

    def info(self) -> dict[str, Any]:
        rows = self.engine._fan_out("info", {s: () for s in range(self.n)}, self.engine.shard_timeout_s)
        if not rows:
            raise BackendUnavailableError(f"none of the {self.n} shards answered")
        identities = len(set().union(*(set(row["identities"]) for row in rows.values())))
        merged = merge_info(list(rows.values()), identities)
        merged["per_shard"] = [{"shard": s, "count": rows[s]["count"], "rss_bytes": rows[s]["rss_bytes"],
                                "pid": rows[s]["pid"]} for s in sorted(rows)]
        merged["missing_shards"] = sorted(set(range(self.n)) - set(rows))  # counts are the others' alone
        return merged

    def needs_merge(self) -> bool:
        return False  # every shard merges its small segments right after its own adds

    def merge_small_segments(self) -> list[dict[str, Any]]:
        return []

    def close(self) -> None:
        self.engine.close()


# ----------------------------------------------------------------------------- starting
def start_cluster(index_dir: str | Path, *, replicas_per_shard: int = 1, model_replicas: int = 1,
                  model_max_replicas: int | None = None, shard_cpus: float = 1.0, model_cpus: float = 1.0,
                  shards_per_node: int | None = None,
                  shard_timeout_s: float = 10.0,
                  lock_timeout: float | None = None, rrt_compile: bool = False, address: str | None = None,
                  app_prefix: str = APP_PREFIX) -> ClusterEngine:
    """Deploy a sharded index on Ray Serve and return the engine the service drives.

    Connects to the cluster at ``address`` (default ``$RAY_ADDRESS``), else starts a local Ray
    whose logical CPUs fit the replicas asked for (on one small machine they then share its
    cores). Deploys one application for the query model (``model_replicas`` replicas of
    ``model_cpus`` CPUs) and one per shard (``replicas_per_shard`` of ``shard_cpus``), without
    Serve's HTTP proxy, and waits until every replica is up. ``shards_per_node``: instead of
    ``shard_cpus``, reserve for each shard replica the smallest node's CPUs divided by it, so
    that Ray packs at most that many shard replicas on a node. ``model_max_replicas`` (more
    than ``model_replicas``): the query model autoscales between the two with the load (Serve
    adds a replica when its replicas have more than two queries each waiting or running)."""
    import ray
    from ray import serve
    from ray.serve.api import RunTarget

    layout = read_layout(index_dir)
    if replicas_per_shard < 1 or model_replicas < 1:
        raise ValueError("replicas_per_shard and model_replicas must be at least 1")
    owns_ray = False
    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS") or None
        if address is None:
            needed = layout.shards * replicas_per_shard * shard_cpus + model_replicas * model_cpus
            ray.init(num_cpus=max(os.cpu_count() or 1, int(np.ceil(needed)) + 1), include_dashboard=False,
                     log_to_driver=False)
            owns_ray = True
        else:
            ray.init(address=address, log_to_driver=False)
    if shards_per_node is not None:
        if shards_per_node < 1:
            raise ValueError("shards_per_node must be at least 1")
        node_cpus = min(node["Resources"].get("CPU", 0.0) for node in ray.nodes() if node.get("Alive"))
        shard_cpus = max(0.01, node_cpus / shards_per_node)
        log.info("%d shard replicas per node: %.2f CPUs each", shards_per_node, shard_cpus)
    serve.start(proxy_location="Disabled")  # no Serve HTTP proxy: the ingress is waldo serve's own app
    root = str(layout.root)
    if model_max_replicas is not None and model_max_replicas > model_replicas:
        scaling: dict[str, Any] = {"autoscaling_config": {"min_replicas": model_replicas,
                                                          "max_replicas": model_max_replicas,
                                                          "target_ongoing_requests": 2}}
    else:
        scaling = {"num_replicas": model_replicas}
    targets = [RunTarget(serve.deployment(QueryDescriber).options(
        name="model", ray_actor_options={"num_cpus": model_cpus}, **scaling).bind(root),
        name=f"{app_prefix}-model", route_prefix=None)]
    for shard, folder in enumerate(layout.shard_dirs):
        deployment = serve.deployment(ShardWorker).options(
            name=f"shard-{shard:03d}", num_replicas=replicas_per_shard, ray_actor_options={"num_cpus": shard_cpus},
            max_ongoing_requests=8)
        targets.append(RunTarget(deployment.bind(str(folder), shard, layout.shards, rrt_compile=rrt_compile,
                                                 lock_timeout=lock_timeout),
                                 name=f"{app_prefix}-shard-{shard:03d}", route_prefix=None))
    # Every application at once (their replicas start in parallel), then wait until all run.
    handles = serve.run_many(targets, wait_for_applications_running=True)
    apps = [target.name for target in targets]
    model_handle, shard_handles = handles[0], handles[1:]
    return ClusterEngine(layout, model_handle, shard_handles, shard_timeout_s=shard_timeout_s, apps=apps,
                         owns_ray=owns_ray)
