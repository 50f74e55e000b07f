"""Neighbour mining: exact top-k, self excluded, cached as .npy keyed to its inputs."""

import json

import numpy as np
import pytest

from waldo.data.datasets import read_labels_csv
from waldo.models.untrained import untrained_model
from waldo.train.mining import TopKMiner, list_hash, mine_from_descriptors, neighbour_key


def _unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_mine_from_descriptors_matches_brute_force():
    rng = np.random.default_rng(0)
    desc = _unit(rng, 40, 8)
    indices, scores = mine_from_descriptors(desc, k=5)
    similarity = desc @ desc.T
    np.fill_diagonal(similarity, -np.inf)  # leave-one-out: never the image itself
    expected = np.argsort(-similarity, axis=1, kind="stable")[:, :5]
    np.testing.assert_array_equal(indices, expected)
    np.testing.assert_allclose(scores, np.take_along_axis(similarity, expected, 1), rtol=1e-5)
    assert indices.dtype == np.int64 and scores.dtype == np.float32

    gallery = _unit(rng, 10, 8)
    indices, _ = mine_from_descriptors(desc, 3, gallery)
    np.testing.assert_array_equal(indices, np.argsort(-(desc @ gallery.T), axis=1, kind="stable")[:, :3])


def test_unreadable_rows_and_short_lists_are_padded():
    desc = _unit(np.random.default_rng(1), 4, 8)
    ok = np.array([True, False, True, True])
    indices, scores = mine_from_descriptors(desc, k=5, query_ok=ok)
    assert np.all(indices[1] == -1) and np.all(np.isneginf(scores[1]))  # unreadable query
    assert not np.any(indices == 1)  # ... never a neighbour
    assert np.all(indices[[0, 2, 3], 2:] == -1)  # only 2 other readable images


def test_key_depends_on_every_input():
    base = neighbour_key("a" * 64, ["x", "y"], None, "resize256-crop224", 224, 100)
    variants = [neighbour_key("b" * 64, ["x", "y"], None, "resize256-crop224", 224, 100),
                neighbour_key("a" * 64, ["y", "x"], None, "resize256-crop224", 224, 100),
                neighbour_key("a" * 64, ["x", "y"], ["x"], "resize256-crop224", 224, 100),
                neighbour_key("a" * 64, ["x", "y"], None, "resize224", 224, 100),
                neighbour_key("a" * 64, ["x", "y"], None, "resize256-crop224", 256, 100),
                neighbour_key("a" * 64, ["x", "y"], None, "resize256-crop224", 224, 50)]
    assert len({base[0], *[v[0] for v in variants]}) == 7
    assert list_hash(["x", "y"]) != list_hash(["xy"])


def test_top_k_miner_caches_npy_with_manifest(data_root, tmp_path, monkeypatch):
    images = read_labels_csv(data_root / "abo_sample")
    model, config = untrained_model("efficientnet_lite0", dim=32, projection="random", progress=False)
    miner = TopKMiner(config.transform, config.image_size, 4, tmp_path, num_workers=0, progress=False)
    first = miner(model, images.paths)
    assert first.indices.shape == (12, 4) and first.global_desc.shape == (12, 32)
    assert np.all(first.indices != np.arange(12)[:, None])
    assert np.all(np.diff(first.scores, axis=1) <= 0)
    files = sorted(p.name for p in first.folder.iterdir())
    assert files == ["global.npy", "indices.npy", "manifest.json", "ok.npy", "scores.npy"]
    manifest = json.loads((first.folder / "manifest.json").read_text())
    assert manifest["inputs"]["model_hash"] and manifest["inputs"]["n_queries"] == 12
    np.load(first.folder / "indices.npy", allow_pickle=False)  # plain arrays, no pickle

    # A second call reads the cache: extraction must not run again.
    from waldo.train import mining

    monkeypatch.setattr(mining, "extract_descriptors", lambda *a, **k: pytest.fail("extracted again"))
    again = TopKMiner(config.transform, config.image_size, 4, tmp_path, progress=False)(model, images.paths)
    np.testing.assert_array_equal(again.indices, first.indices)
    # Given descriptors are used only on a cache miss (another k is another folder).
    given = TopKMiner(config.transform, config.image_size, 3, tmp_path)(model, images.paths,
                                                                        global_desc=lambda: first.global_desc)
    np.testing.assert_array_equal(given.indices, first.indices[:, :3])
    assert given.folder != first.folder
