"""Tests for waldo.index.knn: exact_knn (faiss) against hand-computed answers and numpy_knn."""

from __future__ import annotations


import numpy as np
import pytest


from waldo.index.knn import exact_knn, numpy_knn

BOTH = pytest.mark.parametrize("knn", [exact_knn, numpy_knn], ids=["faiss", "numpy"])


def unit(n: int, d: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@BOTH
def test_hand_computed(knn):
    gallery = np.array([[1, 0], [0, 1], [0.6, 0.8], [-1, 0]], dtype=np.float32)
    queries = np.array([[1, 0], [0, 1]], dtype=np.float32)
    scores, idx = knn(queries, gallery, 3)
    assert scores.dtype == np.float32 and idx.dtype == np.int64
    assert scores.shape == idx.shape == (2, 3)
    np.testing.assert_array_equal(idx, [[0, 2, 1], [1, 2, 0]])
    np.testing.assert_allclose(scores, [[1.0, 0.6, 0.0], [1.0, 0.8, 0.0]], atol=1e-6)


@BOTH
def test_k_larger_than_gallery_pads(knn):
    gallery = np.array([[1, 0], [0, 1]], dtype=np.float32)
    scores, idx = knn(np.array([[0.0, 1.0]], dtype=np.float32), gallery, 4)
    np.testing.assert_array_equal(idx, [[1, 0, -1, -1]])
    assert scores[0, 0] == pytest.approx(1.0) and scores[0, 1] == pytest.approx(0.0)
    assert np.isneginf(scores[0, 2:]).all()


@BOTH
def test_empty_gallery_and_queries(knn):
    scores, idx = knn(np.ones((2, 3), np.float32), np.zeros((0, 3), np.float32), 2)
    assert (idx == -1).all() and np.isneginf(scores).all() and idx.shape == (2, 2)
    scores, idx = knn(np.zeros((0, 3), np.float32), np.ones((5, 3), np.float32), 2)
    assert scores.shape == idx.shape == (0, 2)


@BOTH
def test_self_exclusion_tiny(knn):
    gallery = np.array([[1, 0], [0.8, 0.6], [0, 1]], dtype=np.float32)
    # Query 0 is gallery 0 (excluded), query 1 excludes nothing, query 2 excludes gallery 2.
    scores, idx = knn(gallery, gallery, 2, exclude=np.array([0, -1, 2]))
    np.testing.assert_array_equal(idx, [[1, 2], [1, 0], [1, 0]])
    np.testing.assert_allclose(scores, [[0.8, 0.0], [1.0, 0.8], [0.6, 0.0]], atol=1e-6)


@BOTH
def test_self_exclusion_with_k_at_least_n(knn):
    gallery = np.array([[1, 0], [0, 1], [0.6, 0.8]], dtype=np.float32)
    scores, idx = knn(gallery[:1], gallery, 5, exclude=np.array([0]))
    np.testing.assert_array_equal(idx, [[2, 1, -1, -1, -1]])
    assert np.isneginf(scores[0, 2:]).all()


@pytest.mark.parametrize("batch_size", [7, 4096])
def test_faiss_agrees_with_numpy(batch_size):
    gallery, queries = unit(500, 32, 0), unit(50, 32, 1)
    fs, fi = exact_knn(queries, gallery, 10, batch_size=batch_size)
    ns, ni = numpy_knn(queries, gallery, 10, batch_size=batch_size)
    np.testing.assert_array_equal(fi, ni)  # random floats: no ties
    np.testing.assert_allclose(fs, ns, atol=1e-5)
    assert (np.diff(fs, axis=1) <= 1e-7).all()  # descending
    # and both equal a brute-force sort
    full = queries @ gallery.T
    np.testing.assert_array_equal(fi, np.argsort(-full, axis=1)[:, :10])


def test_leave_one_out_agrees_with_numpy():
    gallery = unit(300, 16, 2)
    exclude = np.arange(300)
    exclude[::3] = -1  # every third query keeps itself
    fs, fi = exact_knn(gallery, gallery, 8, exclude=exclude, batch_size=64)
    ns, ni = numpy_knn(gallery, gallery, 8, exclude=exclude, batch_size=64)
    np.testing.assert_array_equal(fi, ni)
    np.testing.assert_allclose(fs, ns, atol=1e-5)
    excluded = exclude >= 0
    assert not (fi[excluded] == np.arange(300)[excluded, None]).any()
    assert (fi[~excluded, 0] == np.arange(300)[~excluded]).all()  # self is the top hit
    assert (fi >= 0).all()  # exactly k kept after dropping self


def test_inputs_are_cast():
    gallery = unit(20, 8, 3)
    fs, fi = exact_knn(gallery[:3].astype(np.float64), np.asfortranarray(gallery.astype(np.float64)), 3)
    assert fs.dtype == np.float32
    np.testing.assert_array_equal(fi[:, 0], [0, 1, 2])


@BOTH
def test_errors(knn):
    g = unit(10, 8, 4)
    with pytest.raises(ValueError, match="dimension 4 but the gallery has dimension 8"):
        knn(np.ones((2, 4), np.float32), g, 3)
    with pytest.raises(ValueError, match="2-D"):
        knn(np.ones(8, np.float32), g, 3)
    with pytest.raises(ValueError, match="k must be a positive integer"):
        knn(g, g, 0)
    with pytest.raises(ValueError, match="exclude must have shape"):
        knn(g, g, 3, exclude=np.arange(3))
    with pytest.raises(ValueError, match="exclude values"):
        knn(g, g, 3, exclude=np.full(10, 10))
    with pytest.raises(ValueError, match="numeric"):
        knn(np.array([["a"] * 8]), g, 3)
