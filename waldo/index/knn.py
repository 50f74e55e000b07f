"""Exact k-nearest-neighbour search by inner product.

Descriptors in Waldo are L2-normalised, so inner product equals cosine similarity and an
exact flat search is both the reference answer and, up to a few million images, fast
enough. :func:`exact_knn` uses faiss ``IndexFlatIP`` (BLAS, multi-threaded);
:func:`numpy_knn` is a plain matmul + ``argpartition`` baseline used by the benchmark and as
an independent cross-check in tests.

Both return the faiss convention: ``scores`` (Q, k) float32 in descending order and
``indices`` (Q, k) int64, padded with ``-inf`` / ``-1`` where fewer than ``k`` neighbours
exist (k > N, or an excluded self-match).
"""

from __future__ import annotations

import faiss
import numpy as np

__all__ = ["exact_knn", "numpy_knn", "search_flat_index"]


def _as_matrix(name: str, x: np.ndarray) -> np.ndarray:
    """``x`` as a C-contiguous float32 (n, D) array (faiss needs exactly that layout)."""
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D (n, D) array, got shape {x.shape}")
    if x.shape[1] < 1:
        raise ValueError(f"{name} has zero columns (shape {x.shape})")
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise ValueError(f"{name} must be numeric, got dtype {x.dtype}")
    return np.ascontiguousarray(x, dtype=np.float32)


def _check_k(k: int) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    return int(k)


def _check_batch_size(batch_size: int) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    return int(batch_size)


def _check_exclude(exclude: np.ndarray | None, n_queries: int, n_gallery: int) -> np.ndarray | None:
    """Validate ``exclude`` -> (Q,) int64 with values in [-1, N), or ``None``."""
    if exclude is None:
        return None
    ex = np.asarray(exclude)
    if ex.shape != (n_queries,):
        raise ValueError(f"exclude must have shape ({n_queries},) (one gallery index per query), got {ex.shape}")
    if ex.size and not np.issubdtype(ex.dtype, np.integer):
        raise ValueError(f"exclude must hold integer gallery indices, got dtype {ex.dtype}")
    ex = ex.astype(np.int64, copy=False)
    bad = (ex < -1) | (ex >= n_gallery)
    if bad.any():
        raise ValueError(
            f"exclude values must be -1 (none) or in [0, {n_gallery}); "
            f"got {ex[bad][:5].tolist()} at queries {np.flatnonzero(bad)[:5].tolist()}"
        )
    return ex


def _drop_excluded(
    scores: np.ndarray, indices: np.ndarray, ex: np.ndarray, keep: int
) -> tuple[np.ndarray, np.ndarray]:
    """Remove each row's excluded index and keep the first ``keep`` of what remains.

    A stable argsort on the boolean "is excluded" mask moves the excluded hit (if present)
    to the end of its row while preserving the descending order of everything else; rows
    without a hit simply lose their extra (k+1)-th neighbour. When the gallery is too small
    for k+1 the hit can survive the cut at the tail: it is then blanked to -1 / -inf.
    """
    hit = (indices == ex[:, None]) & (ex[:, None] >= 0)
    order = np.argsort(hit, axis=1, kind="stable")[:, :keep]
    scores = np.take_along_axis(scores, order, axis=1)
    indices = np.take_along_axis(indices, order, axis=1)
    kept_hit = np.take_along_axis(hit, order, axis=1)
    scores[kept_hit], indices[kept_hit] = -np.inf, -1
    return scores, indices


def _no_neighbours(num_queries: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(Q, k) float32 scores of -inf and int64 indices of -1: how a missing neighbour reads."""
    return np.full((num_queries, k), -np.inf, dtype=np.float32), np.full((num_queries, k), -1, dtype=np.int64)


def _check_dims(queries: np.ndarray, gallery_dim: int) -> None:
    if queries.shape[1] != gallery_dim:
        raise ValueError(f"queries have dimension {queries.shape[1]} but the gallery has dimension {gallery_dim}")


def _pad(scores: np.ndarray, indices: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Pad (Q, m<=k) results to (Q, k) with -inf / -1 and normalise faiss' "missing" marker."""
    m = indices.shape[1]
    out_s, out_i = _no_neighbours(len(indices), k)
    out_s[:, :m] = scores
    out_i[:, :m] = indices
    # faiss reports missing neighbours as index -1 with score -FLT_MAX; make that -inf.
    out_s[out_i < 0] = -np.inf
    return out_s, out_i


def search_flat_index(index: faiss.Index, queries: np.ndarray, k: int, *, exclude: np.ndarray | None = None,
                      batch_size: int = 4096, params: faiss.SearchParameters | None = None,
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Search an already-built inner-product faiss index (e.g. a snapshot's ``IndexFlatIP``,
    or an approximate IVF/HNSW one: then the answer is approximate too).

    Split out of :func:`exact_knn` so that a persistent index can build its faiss index once
    per snapshot and reuse it for every query. Same arguments and return value as
    :func:`exact_knn`; indices are positions in ``index``. ``params``: optional per-call faiss
    search parameters (e.g. ``faiss.SearchParametersIVF(nprobe=64)``), which leave the
    shared index untouched, so concurrent searches may use different ones.
    """
    k = _check_k(k)
    batch_size = _check_batch_size(batch_size)
    q = _as_matrix("queries", queries)
    _check_dims(q, index.d)
    n = int(index.ntotal)
    ex = _check_exclude(exclude, q.shape[0], n)
    # Ask faiss for one extra neighbour when excluding, so that dropping the self-match
    # still leaves k; never ask for more than exist (saves memory for huge k).
    k_search = min(k + (1 if ex is not None else 0), n)
    all_s, all_i = _no_neighbours(q.shape[0], k)
    if k_search == 0 or q.shape[0] == 0:
        return all_s, all_i
    # Batching bounds the (batch, k+1) result buffers and faiss' per-call scratch, so Q can be
    # as large as the gallery (leave-one-out evaluation) without a Q x N allocation.
    for start in range(0, q.shape[0], batch_size):
        stop = min(start + batch_size, q.shape[0])
        s, i = index.search(q[start:stop], k_search) if params is None else index.search(
            q[start:stop], k_search, params=params)
        if ex is not None:
            s, i = _drop_excluded(s, i, ex[start:stop], min(k, k_search))
        all_s[start:stop], all_i[start:stop] = _pad(s, i, k)
    return all_s, all_i


def exact_knn(queries: np.ndarray, gallery: np.ndarray, k: int, *, exclude: np.ndarray | None = None,
              batch_size: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` gallery rows by inner product for every query, with faiss ``IndexFlatIP``.

    Args:
        queries: (Q, D) descriptors; cast to C-contiguous float32.
        gallery: (N, D) descriptors; cast to C-contiguous float32.
        k: neighbours per query (>= 1; may exceed N, the tail is then padded).
        exclude: optional (Q,) int64 gallery index to drop from each query's results, -1 for
            none; used for leave-one-out evaluation where every gallery image is also a query.
        batch_size: queries per faiss call.

    Returns:
        ``(scores, indices)``: (Q, k) float32 descending inner products and (Q, k) int64
        gallery row indices; ``-inf`` / ``-1`` where fewer than ``k`` neighbours exist.
    """
    g = _as_matrix("gallery", gallery)
    q = _as_matrix("queries", queries)
    _check_dims(q, g.shape[1])
    index = faiss.IndexFlatIP(g.shape[1])
    index.add(g)
    return search_flat_index(index, q, k, exclude=exclude, batch_size=batch_size)


def numpy_knn(queries: np.ndarray, gallery: np.ndarray, k: int, *, exclude: np.ndarray | None = None,
              batch_size: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Same contract as :func:`exact_knn`, computed with numpy only (matmul + argpartition).

    Kept deliberately independent of faiss: it is the baseline in
    ``benchmarks/search_latency.py`` and the oracle the faiss path is tested against.
    Exclusion is done by masking the excluded score to ``-inf`` before selecting.
    """
    k = _check_k(k)
    batch_size = _check_batch_size(batch_size)
    g = _as_matrix("gallery", gallery)
    q = _as_matrix("queries", queries)
    _check_dims(q, g.shape[1])
    n = g.shape[0]
    ex = _check_exclude(exclude, q.shape[0], n)
    all_s, all_i = _no_neighbours(q.shape[0], k)
    kk = min(k, n)
    if kk == 0 or q.shape[0] == 0:
        return all_s, all_i
    for start in range(0, q.shape[0], batch_size):
        stop = min(start + batch_size, q.shape[0])
        sims = q[start:stop] @ g.T  # (B, N) float32
        rows = np.arange(stop - start)
        if ex is not None:
            has = ex[start:stop] >= 0
            sims[rows[has], ex[start:stop][has]] = -np.inf
        # argpartition finds the top kk in O(N); only those kk are then fully sorted.
        part = np.argpartition(-sims, kk - 1, axis=1)[:, :kk] if kk < n else np.tile(np.arange(n), (len(rows), 1))
        part_s = np.take_along_axis(sims, part, axis=1)
        order = np.argsort(-part_s, axis=1, kind="stable")
        idx = np.take_along_axis(part, order, axis=1).astype(np.int64)
        sc = np.take_along_axis(part_s, order, axis=1)
        if ex is not None:
            # With k >= N the masked self-match is still selected (last, at -inf): drop it.
            idx[(idx == ex[start:stop, None]) & (ex[start:stop, None] >= 0)] = -1
        all_s[start:stop, :kk], all_i[start:stop, :kk] = sc, idx
    all_s[all_i < 0] = -np.inf
    return all_s, all_i
