"""The faiss index a snapshot searches: exact ``Flat`` (default) or approximate IVF / HNSW.

An index is created with a faiss factory string (``global_index`` in the manifest):

* ``"Flat"``: exact inner product (``IndexFlatIP``), the reference answer. Search cost grows
  linearly with the gallery: fine up to a few hundred thousand images.
* ``"IVF<nlist>,Flat"`` (e.g. ``"IVF4096,Flat"``): k-means partitions the globals into
  ``nlist`` lists; a query scans only the ``nprobe`` lists nearest to it. Needs training.
* ``"HNSW<M>"`` (e.g. ``"HNSW32"``): a navigable graph; a query visits about ``efSearch``
  candidates. No training, but building the graph takes about 70 s per million on 2 cores,
  and on Waldo's descriptors it stayed below recall@100 0.99 (see docs/results.md): prefer IVF.

Any other factory string faiss accepts with the inner-product metric also works (e.g.
``"IVF1024,PQ32"``); only ``nprobe`` (IVF) and ``efSearch`` (HNSW) can be tuned at search time.

Snapshots are immutable and rebuilt for every index generation (see ``snapshot.py``), so
the faiss index is rebuilt after every add/remove. What that costs, and what is done about it:

* IVF training (k-means) is the expensive part, so the *trained, empty* index is cached in
  the index folder (``global_trained.npz``: faiss' own serialisation, a uint8 array, plus a
  JSON header with its sha256; no pickle) and reused by later generations and processes. It
  is retrained when the index has grown so that a training sample twice as large is
  available, and after ``compact()``. Every rebuild still assigns all rows to their lists
  (measured at a million rows on 2 cores: 11 s with 1024 lists, 34 s with 4096; training
  adds 7 s / 98 s when it happens), so IVF suits galleries that change in batches, not one
  image at a time.
* HNSW has nothing to cache: the graph *is* the data, and it is rebuilt per generation.
  Use it for read-mostly galleries.
* Too few rows to train (fewer than 39 per IVF list, faiss' own minimum): the snapshot
  falls back to exact ``Flat`` search, logs it, and says so in ``info()``; small and
  freshly created indexes keep working.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import time
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from waldo.fsutil import atomic_write_bytes
from waldo.index.errors import is_resource_error, resource_error

log = logging.getLogger("waldo.index")

FLAT = "Flat"
TRAINED_FILE = "global_trained.npz"
# faiss warns below 39 training points per centroid: k-means is then unreliable.
MIN_TRAIN_PER_LIST = 39
# Training sample per IVF list. faiss caps k-means at 256 points per centroid anyway; 64 gives
# stable centroids at a quarter of that cost (k-means time is linear in the sample).
TRAIN_PER_LIST = 64
# Untrained indexes without IVF (e.g. "PQ32", "SQ8"): PQ codebooks have 256 centroids.
MIN_TRAIN_OTHER = MIN_TRAIN_PER_LIST * 256
TRAIN_OTHER = TRAIN_PER_LIST * 256
# Search-time defaults, from benchmarks/ann_search.py (docs/results.md). nprobe scales with
# nlist: the fraction of lists scanned is what sets recall. 1/32 at a million grocery-like
# descriptors: IVF1024 nprobe=32 recall@100 0.9987 at 2.2 ms/query, IVF4096 nprobe=128 1.0 at
# 1.9 ms; 1/64 already passed 0.99 at 1M, but only just (0.992) at 200k rows, where each list
# holds fewer rows. HNSW32 never reached 0.99 on this data (0.82 at efSearch=256 and 1M rows;
# 0.987 at efSearch=1024 and 200k rows, 1.5 ms): 1024 is the best measured trade-off.
DEFAULT_NPROBE_FRACTION = 1 / 32
DEFAULT_EF_SEARCH = 1024
SEARCH_PARAMS = {"ivf": ("nprobe",), "hnsw": ("efSearch",), "flat": (), "other": ()}
_ADD_CHUNK = 1 << 16  # rows per faiss add(): bounds the transient copy to one chunk
_CACHE_FORMAT = 1
# What reading a damaged or foreign cache file can raise (zip CRC errors included).
_CACHE_ERRORS = (OSError, ValueError, KeyError, EOFError, RuntimeError, zipfile.BadZipFile)


class GlobalIndexConfig(BaseModel):
    """How a snapshot builds its faiss index: the factory ``spec``, the default search-time
    ``search_params`` (validated against the spec by :func:`resolve_search_params`), where the
    trained index is cached (``trained_path``, None: never cached) and the training sample's seed."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    spec: str = Field(FLAT, min_length=1)
    search_params: dict[str, int] = Field(default_factory=dict)
    trained_path: Path | None = None
    seed: int = 0


@dataclass(frozen=True)
class GlobalIndexStatus:
    """What a snapshot actually built. ``built`` is ``requested`` or ``"Flat"`` (fallback, with
    the ``reason``); ``trained_rows`` is the size of the training sample (0: no training) and
    ``trained_cached`` whether the trained index came from ``global_trained.npz``;
    ``train_seconds`` is part of ``build_seconds`` (0 when nothing was trained)."""

    requested: str
    built: str
    reason: str = ""
    trained_rows: int = 0
    trained_cached: bool = False
    build_seconds: float = 0.0
    train_seconds: float = 0.0


def _factory(spec: str, dim: int) -> faiss.Index:
    return faiss.index_factory(int(dim), spec, faiss.METRIC_INNER_PRODUCT)


def _core(index: faiss.Index) -> faiss.Index:
    """The index under an optional pre-transform (e.g. "PCA64,HNSW32"), downcast."""
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexPreTransform):
        return faiss.downcast_index(index.index)
    return index


def kind(index: faiss.Index) -> str:
    """``"ivf"``, ``"hnsw"``, ``"flat"`` or ``"other"``: which search parameters apply."""
    if faiss.try_extract_index_ivf(index) is not None:
        return "ivf"
    core = _core(index)
    if isinstance(core, faiss.IndexHNSW):
        return "hnsw"
    if isinstance(core, faiss.IndexFlat):
        return "flat"
    return "other"


@functools.lru_cache(maxsize=64)
def _describe(spec: str, dim: int) -> tuple[str, int, int]:
    """``(kind, nlist or 0, rows needed to train)`` of a valid spec; cached because searches
    with per-call parameters validate them against the spec every time."""
    index = _factory(spec, dim)
    ivf = faiss.try_extract_index_ivf(index)
    return kind(index), int(ivf.nlist) if ivf is not None else 0, required_train_rows(index)


def check_spec(spec: str, dim: int) -> str:
    """``spec`` if faiss can build it for ``dim``-d vectors with inner product, else ValueError."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"global_index must be a faiss index factory string such as 'Flat', "
                         f"'IVF1024,Flat' or 'HNSW32', got {spec!r}")
    spec = spec.strip()
    try:
        _describe(spec, int(dim))
    except RuntimeError as e:
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise ValueError(f"global_index {spec!r} is not a faiss index factory string faiss can build for "
                         f"{dim}-d inner-product search ({reason}); try 'Flat', 'IVF1024,Flat' or 'HNSW32'") from None
    return spec


def default_search_params(spec: str, dim: int) -> dict[str, int]:
    """The search-time parameters used when the caller gives none (see the module constants)."""
    k, nlist, _ = _describe(spec, int(dim))
    if k == "ivf":
        return {"nprobe": max(1, min(nlist, round(nlist * DEFAULT_NPROBE_FRACTION)))}
    if k == "hnsw":
        return {"efSearch": DEFAULT_EF_SEARCH}
    return {}


def resolve_search_params(spec: str, dim: int, params: Mapping[str, Any] | None) -> dict[str, int]:
    """Validated search parameters for ``spec``: the defaults overridden by ``params``.

    ``nprobe`` (1..nlist) applies to IVF indexes and ``efSearch`` (>= 1) to HNSW; any other key,
    or a key the index type does not use, is a ValueError naming what is accepted.
    """
    spec = check_spec(spec, dim)
    k, nlist, _ = _describe(spec, int(dim))
    allowed = SEARCH_PARAMS[k]
    out = default_search_params(spec, dim)
    for key, value in (params or {}).items():
        if key not in allowed:
            accepted = ", ".join(allowed) if allowed else "none"
            raise ValueError(f"search parameter {key!r} does not apply to global_index {spec!r} "
                             f"(accepted: {accepted})")
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"search parameter {key} must be a positive integer, got {value!r}")
        if key == "nprobe" and value > nlist:
            raise ValueError(f"nprobe={value} exceeds the {nlist} lists of {spec!r}")
        out[key] = int(value)
    return out


def required_train_rows(index: faiss.Index) -> int:
    """Rows needed to train ``index`` sensibly (0 if it needs no training)."""
    if index.is_trained:
        return 0
    ivf = faiss.try_extract_index_ivf(index)
    return MIN_TRAIN_PER_LIST * int(ivf.nlist) if ivf is not None else MIN_TRAIN_OTHER


def train_rows(index: faiss.Index, n: int) -> int:
    """Size of the training sample for ``index`` when ``n`` rows are available."""
    ivf = faiss.try_extract_index_ivf(index)
    return min(n, TRAIN_PER_LIST * int(ivf.nlist) if ivf is not None else TRAIN_OTHER)


def plan(spec: str, dim: int, n: int) -> tuple[str, str]:
    """``(spec to build, reason)`` for ``n`` live rows without building anything: ``spec`` itself,
    or ``"Flat"`` with the reason when there are too few rows to train it."""
    if spec == FLAT:
        return FLAT, ""
    need = _describe(spec, int(dim))[2]
    if n < need:
        return FLAT, (f"{n} live rows are fewer than the {need} needed to train {spec!r}; "
                      f"exact Flat search until the index holds {need}")
    return spec, ""


def search_parameters(index: faiss.Index, params: Mapping[str, int] | None) -> faiss.SearchParameters | None:
    """Per-call faiss search parameters for ``index`` from ``{"nprobe": n}`` / ``{"efSearch": e}``.

    Keys that do not apply to the index actually built are ignored (a snapshot that fell back
    to exact search ignores ``nprobe``); validate keys against the configured spec with
    :func:`resolve_search_params` first. None when nothing applies.
    """
    if not params:
        return None
    k = kind(index)
    inner: faiss.SearchParameters | None = None
    if k == "ivf" and "nprobe" in params:
        nlist = int(faiss.extract_index_ivf(index).nlist)
        inner = faiss.SearchParametersIVF(nprobe=min(int(params["nprobe"]), nlist))
    elif k == "hnsw" and "efSearch" in params:
        inner = faiss.SearchParametersHNSW(efSearch=int(params["efSearch"]))
    if inner is None:
        return None
    if isinstance(faiss.downcast_index(index), faiss.IndexPreTransform):
        wrapped = faiss.SearchParametersPreTransform()
        wrapped.index_params = inner
        wrapped._inner = inner  # keep the Python object alive as long as the wrapper
        return wrapped
    return inner


def apply_search_params(index: faiss.Index, params: Mapping[str, int]) -> None:
    """Set default search-time parameters on ``index`` itself (done once, before sharing it)."""
    space = faiss.ParameterSpace()
    for key, value in params.items():
        if key in SEARCH_PARAMS[kind(index)]:
            space.set_index_parameter(index, key, int(value))


def build_index(
    config: GlobalIndexConfig, dim: int, n: int, rows: Callable[[np.ndarray], np.ndarray]
) -> tuple[faiss.Index, GlobalIndexStatus]:
    """Build the searchable faiss index over ``n`` rows.

    ``rows(positions)`` returns the (len, dim) float32 rows at those positions (the snapshot
    reads them from memory-mapped segments); it is called in chunks, so only one chunk is
    copied at a time beside the index. Training (if the spec needs it) uses a seeded random
    sample, or the cached trained index (see the module docstring).
    """
    start = time.perf_counter()
    built, reason = plan(config.spec, dim, n)
    trained, cached, train_s = 0, False, 0.0
    if built == FLAT:
        index: faiss.Index = faiss.IndexFlatIP(dim)
        if reason:
            log.info("global index %s: %s", config.spec, reason)
    else:
        index = _factory(built, dim)
        if not index.is_trained:
            t0 = time.perf_counter()
            index, trained, cached = _trained(config, index, dim, n, rows)
            train_s = time.perf_counter() - t0
        apply_search_params(index, config.search_params)
    for s in range(0, n, _ADD_CHUNK):
        index.add(np.ascontiguousarray(rows(np.arange(s, min(s + _ADD_CHUNK, n))), dtype=np.float32))
    status = GlobalIndexStatus(config.spec, built, reason, trained, cached, round(time.perf_counter() - start, 3),
                               round(train_s, 3))
    return index, status


def _trained(
    config: GlobalIndexConfig, empty: faiss.Index, dim: int, n: int, rows: Callable[[np.ndarray], np.ndarray]
) -> tuple[faiss.Index, int, bool]:
    """A trained empty index: from the cache if it is still good enough, else trained now."""
    want = train_rows(empty, n)
    if config.trained_path is not None:
        hit = load_trained(config.trained_path, config.spec, dim)
        # Retrain once a sample twice as large as the cached one's is available.
        if hit is not None and 2 * hit[1] > want:
            return hit[0], hit[1], True
    rng = np.random.default_rng(config.seed)
    positions = np.sort(rng.choice(n, size=want, replace=False)) if want < n else np.arange(n)
    t0 = time.perf_counter()
    sample = np.ascontiguousarray(rows(positions), dtype=np.float32)
    empty.train(sample)
    log.info("global index %s: trained on %d of %d rows in %.1f s", config.spec, want, n, time.perf_counter() - t0)
    if config.trained_path is not None:
        save_trained(config.trained_path, empty, config.spec, dim, want)
    return empty, want, False


def save_trained(path: Path, index: faiss.Index, spec: str, dim: int, rows: int) -> None:
    """Cache a trained, empty index at ``path`` (atomic replace). Best effort: a read-only
    index folder only costs retraining, so failures are logged, not raised."""
    blob = faiss.serialize_index(index)  # numpy uint8: faiss' own format, no pickle
    meta = {"format": _CACHE_FORMAT, "spec": spec, "dim": int(dim), "train_rows": int(rows),
            "sha256": hashlib.sha256(blob.tobytes()).hexdigest(), "created_at": time.time()}
    buf = io.BytesIO()
    np.savez(buf, index=blob, meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8))
    try:
        atomic_write_bytes(path, buf.getvalue())
    except OSError as e:
        log.warning("could not cache the trained global index at %s: %s", path, e)


def read_trained_meta(path: Path) -> dict[str, Any] | None:
    """The JSON header of a cached trained index (for ``info()``), or None if absent/unreadable."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return json.loads(z["meta"].tobytes().decode())
    except _CACHE_ERRORS:
        return None


def load_trained(path: Path, spec: str, dim: int) -> tuple[faiss.Index, int] | None:
    """``(trained empty index, training rows)`` from the cache, or None if it is absent, for
    another spec/dimension, or damaged (checked by sha256 before faiss reads a byte of it)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(z["meta"].tobytes().decode())
            blob = np.ascontiguousarray(z["index"], dtype=np.uint8)
        if meta.get("format") != _CACHE_FORMAT or meta.get("spec") != spec or meta.get("dim") != dim:
            return None
        if hashlib.sha256(blob.tobytes()).hexdigest() != meta.get("sha256"):
            raise ValueError("sha256 differs from its header")
        index = faiss.deserialize_index(blob)
        if index.d != dim or not index.is_trained or index.ntotal != 0:
            raise ValueError("not a trained empty index of the right dimension")
        return index, int(meta["train_rows"])
    except _CACHE_ERRORS as e:
        if isinstance(e, OSError) and is_resource_error(e):  # the cache is fine: retraining would waste minutes
            raise resource_error(e, str(path)) from None
        log.warning("ignoring the cached trained global index %s (%s); retraining", path, e)
        return None
