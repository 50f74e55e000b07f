"""Neighbour mining: each image's global top-k, cached on disk and keyed to what made it.

The reranker draws its hard negatives from each anchor's global top-100. Computing them means
extracting every training image, so the result is cached as plain ``.npy`` files in a folder
whose name is derived from everything that determines it (model weights hash, image list,
transform, image size, k), with a ``manifest.json`` of those inputs beside it. The reference
kept an unversioned ``nn_inds_<desc>.pkl`` with no record of the model that made it: a stale
pickle was indistinguishable from a fresh one. Here a different model or image list simply
lands in a different folder, and a folder is only ever published complete (written to a
staging folder, then renamed).

Cache folder::

    <cache_root>/neighbours/<key>/manifest.json   inputs and shapes
                                  indices.npy     (N, k) int64, positions in the gallery list, -1 padding
                                  scores.npy      (N, k) float32 inner products, descending
                                  global.npy      (N, D) float32 query descriptors (zeros if unreadable)
                                  ok.npy          (N,) bool, which query images could be read
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from waldo.data.transforms import get_transform
from waldo.index.knn import exact_knn
from waldo.models.checkpoint import model_hash
from waldo.models.descriptor import DescriptorModel
from waldo.models.extract import extract_descriptors
from waldo.paths import default_cache_root

__all__ = ["MinedNeighbours", "TopKMiner", "default_cache_root", "list_hash", "mine_from_descriptors",
           "neighbour_key"]

CACHE_FORMAT = 1


def list_hash(paths: Sequence[str]) -> str:
    """sha256 of an ordered path list (order matters: rows of the cache follow it)."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(os.fspath(path).encode())
        digest.update(b"\0")
    return digest.hexdigest()


@dataclass
class MinedNeighbours:
    """Each query image's top-k among the gallery images (itself excluded under leave-one-out).

    indices: (N, k) int64 positions in the gallery list, best first, -1 padding (an unreadable
    query's row is all -1). scores: (N, k) float32 inner products, -inf padding.
    global_desc: (N, D) float32 query descriptors. ok: (N,) bool readable queries.
    """

    indices: np.ndarray
    scores: np.ndarray
    global_desc: np.ndarray
    ok: np.ndarray
    manifest: dict
    folder: Path | None = None


def mine_from_descriptors(query_desc: np.ndarray, k: int, gallery_desc: np.ndarray | None = None,
                          *, query_ok: np.ndarray | None = None,
                          gallery_ok: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by inner product. ``gallery_desc`` None = leave-one-out over ``query_desc``.

    query_desc (N, D), gallery_desc (M, D) float32 L2-normalised; ``*_ok`` (N,)/(M,) bool mark
    readable rows (unreadable gallery rows are never returned, unreadable queries get -1 rows).
    Returns (indices (N, k) int64, scores (N, k) float32), best first.
    """
    query_desc = np.asarray(query_desc, np.float32)
    loo = gallery_desc is None
    gallery_desc = query_desc if loo else np.asarray(gallery_desc, np.float32)
    n, m = len(query_desc), len(gallery_desc)
    query_ok = np.ones(n, bool) if query_ok is None else np.asarray(query_ok, bool)
    gallery_ok = (query_ok if loo else np.ones(m, bool)) if gallery_ok is None else np.asarray(gallery_ok, bool)
    indices = np.full((n, k), -1, np.int64)
    scores = np.full((n, k), -np.inf, np.float32)
    gallery_rows = np.flatnonzero(gallery_ok)
    query_rows = np.flatnonzero(query_ok)
    if len(gallery_rows) == 0 or len(query_rows) == 0:
        return indices, scores
    exclude = None
    if loo:  # the query's own position among the readable gallery rows
        exclude = np.searchsorted(gallery_rows, query_rows)
    found_scores, found = exact_knn(query_desc[query_rows], gallery_desc[gallery_rows],
                                    min(k, len(gallery_rows)), exclude=exclude)
    width = found.shape[1]
    indices[query_rows, :width] = np.where(found >= 0, gallery_rows[np.maximum(found, 0)], -1)
    scores[query_rows, :width] = found_scores
    return indices, scores


def neighbour_key(model_sha: str, query_paths: Sequence[str], gallery_paths: Sequence[str] | None,
                  transform: str, image_size: int, k: int) -> tuple[str, dict]:
    """(folder name, manifest inputs) of a mining result; equal inputs give the same folder."""
    inputs = {"format": CACHE_FORMAT, "model_hash": model_sha, "query_list_hash": list_hash(query_paths),
              "gallery_list_hash": "leave-one-out" if gallery_paths is None else list_hash(gallery_paths),
              "n_queries": len(query_paths), "n_gallery": len(query_paths if gallery_paths is None else gallery_paths),
              "transform": transform, "image_size": image_size, "k": k}
    digest = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]
    return f"{model_sha[:12]}-{transform}-{image_size}-k{k}-{digest}", inputs


def _load(folder: Path, inputs: dict) -> MinedNeighbours | None:
    manifest_path = folder / "manifest.json"
    if not manifest_path.is_file():
        return None
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("inputs") != inputs:  # a hash-prefix collision or a hand-edited folder
        raise ValueError(f"{folder} holds neighbours of other inputs; delete it to rebuild")
    arrays = {name: np.load(folder / f"{name}.npy", allow_pickle=False)
              for name in ("indices", "scores", "global", "ok")}
    return MinedNeighbours(arrays["indices"], arrays["scores"], arrays["global"], arrays["ok"], manifest, folder)


def _publish(folder: Path, result: MinedNeighbours) -> MinedNeighbours:
    """Write into a staging folder and rename it into place: readers never see half a cache."""
    staging = folder.parent / f".{folder.name}.{os.getpid()}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for name, array in (("indices", result.indices), ("scores", result.scores),
                        ("global", result.global_desc), ("ok", result.ok)):
        np.save(staging / f"{name}.npy", array, allow_pickle=False)
    (staging / "manifest.json").write_text(json.dumps(result.manifest, indent=2, sort_keys=True) + "\n")
    try:
        os.replace(staging, folder)
    except OSError:  # another process published the same inputs first: theirs is equivalent
        shutil.rmtree(staging, ignore_errors=True)
    return result


@dataclass(frozen=True)
class TopKMiner:
    """The hard-negative miner: every query image's top-``k`` global neighbours, by the
    descriptors of a model with test-time ``transform`` at ``image_size``, cached under
    ``cache_root`` (None = :func:`default_cache_root`). Every result is cached: its inputs
    determine it fully, so a later run with the same model and images reuses it."""

    transform: str
    image_size: int
    k: int = 100
    cache_root: str | Path | None = None
    batch_size: int = 32
    num_workers: int | None = None
    progress: bool = True

    def __call__(self, model: DescriptorModel, query_paths: Sequence[str], gallery_paths: Sequence[str] | None = None,
                 global_desc: np.ndarray | Callable[[], np.ndarray] | None = None) -> MinedNeighbours:
        """Neighbours of ``query_paths`` among ``gallery_paths`` (None = leave-one-out within
        ``query_paths``), from the cache when it holds them.

        ``global_desc`` (N, D) float32, or a function returning them (called only on a cache
        miss), may pass descriptors the caller computes more cheaply *with this model, transform
        and image size on query_paths* (e.g. from cached feature maps); leave-one-out only.
        """
        name, inputs = neighbour_key(model_hash(model), query_paths, gallery_paths, self.transform,
                                     self.image_size, self.k)
        folder = Path(self.cache_root or default_cache_root()) / "neighbours" / name
        cached = _load(folder, inputs)
        if cached is not None:
            return cached
        start = time.perf_counter()
        if global_desc is not None:
            if callable(global_desc):
                global_desc = global_desc()
            if gallery_paths is not None or len(global_desc) != len(query_paths):
                raise ValueError("global_desc is only accepted for leave-one-out, one row per query path")
            query_global, query_ok = np.asarray(global_desc, np.float32), np.ones(len(query_paths), bool)
        else:
            query_global, query_ok = self._describe(model, query_paths, "mine")
        gallery_global = gallery_ok = None
        if gallery_paths is not None:
            gallery_global, gallery_ok = self._describe(model, gallery_paths, "mine gallery")
        indices, scores = mine_from_descriptors(query_global, self.k, gallery_global, query_ok=query_ok,
                                                gallery_ok=gallery_ok)
        return _publish(folder, MinedNeighbours(indices, scores, query_global, query_ok, {
            "inputs": inputs, "descriptors": "extracted" if global_desc is None else "given by the caller",
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "seconds": round(time.perf_counter() - start, 1),
            "n_unreadable": int((~query_ok).sum()),
            "shapes": {"indices": list(indices.shape), "global": list(query_global.shape)}}, folder))

    def _describe(self, model: DescriptorModel, paths: Sequence[str], description: str
                  ) -> tuple[np.ndarray, np.ndarray]:
        """(global (N, D) float32 with zero rows for unreadable images, ok (N,) bool)."""
        extracted = extract_descriptors(model, paths, get_transform(self.transform, self.image_size),
                                        batch_size=self.batch_size, num_workers=self.num_workers,
                                        progress=self.progress, description=description)
        rows = extracted.global_desc  # (n_ok, D) of the readable images
        full = np.zeros((len(extracted.ok), rows.shape[1] if rows.ndim == 2 else 0), np.float32)
        full[extracted.ok] = rows
        return full, extracted.ok
