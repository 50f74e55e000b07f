"""Approximate global search in IndexStore (global_index="IVF..."/"HNSW..."), and its fallback."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from waldo.index import IndexStore, exact_knn
from waldo.index import global_index as gi

D, L, DL = 16, 2, 4
MANIFEST = {"backbone": "efficientnet_lite0", "model_hash": "abc123"}


def clustered(n: int, seed: int, centres: int = 40) -> np.ndarray:
    """Unit vectors around a few random centres: structure that IVF can partition."""
    rng = np.random.default_rng(seed)
    c = np.random.default_rng(1000).standard_normal((centres, D))
    x = c[rng.integers(0, centres, n)] + 0.3 * rng.standard_normal((n, D))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def add(store: IndexStore, n: int, seed: int) -> list[int]:
    g = clustered(n, seed)
    return store.add([f"{seed}/{i}.jpg" for i in range(n)], ["x"] * n, g, np.zeros((n, L, DL), np.float32))


def recall(found: np.ndarray, want: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(w)) / len(w) for f, w in zip(found, want)]))


def create(root, spec: str, params=None) -> IndexStore:
    return IndexStore.create(root, manifest=MANIFEST, global_dim=D, local_shape=(L, DL), global_index=spec,
                             global_search_params=params)


def test_ivf_falls_back_to_exact_then_trains_and_caches(tmp_path, caplog):
    store = create(tmp_path / "ix", "IVF8,Flat")
    assert store.manifest["global_index"] == "IVF8,Flat"
    assert store.manifest["global_search_params"] == {"nprobe": 1}  # default: nlist / 32, at least 1
    ids = add(store, 200, 0)  # fewer than 39 * 8 rows: exact search
    with caplog.at_level(logging.INFO, logger="waldo.index"):
        status = store.snapshot().global_index_status
    assert status.built == "Flat" and "fewer than the 312 needed" in status.reason
    assert "exact Flat search" in caplog.text
    info = store.info()["global_index"]
    assert info["built"] == "Flat" and info["reason"] and info["snapshot"]["built"] == "Flat"
    q = clustered(10, 7)
    np.testing.assert_array_equal(store.search(q, 5).ids, np.array(ids)[exact_knn(q, clustered(200, 0), 5)[1]])

    ids += add(store, 400, 1)
    snap = store.snapshot()
    assert snap.global_index_status.built == "IVF8,Flat" and snap.global_index_status.trained_rows == 8 * 64
    assert not snap.global_index_status.trained_cached and (store.path / gi.TRAINED_FILE).is_file()
    gallery = store.global_descriptors(ids)
    want = np.array(ids)[exact_knn(q, gallery, 10)[1]]
    # scanning every list is exact; the default (1 of 8 lists) is approximate but close
    np.testing.assert_array_equal(store.search(q, 10, search_params={"nprobe": 8}).ids, want)
    assert recall(store.search(q, 10).ids, want) > 0.5
    assert store.info()["global_index"]["trained"]["train_rows"] == 512
    store.close()

    with IndexStore.open(tmp_path / "ix") as again:  # another process: the trained index is reused
        status = again.snapshot().global_index_status
        assert status.built == "IVF8,Flat" and status.trained_cached
        np.testing.assert_array_equal(again.search(q, 10, search_params={"nprobe": 8}).ids, want)
        again.remove(ids[:10])
        again.compact()  # refreshes the training on the compacted rows
        assert not (again.path / gi.TRAINED_FILE).exists()
        assert not again.snapshot().global_index_status.trained_cached
        assert again.check() == []


def test_damaged_training_cache_is_retrained(tmp_path, caplog):
    store = create(tmp_path / "ix", "IVF4,Flat", {"nprobe": 4})
    add(store, 300, 0)
    store.snapshot()
    path = store.path / gi.TRAINED_FILE
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    store.add(["new.jpg"], ["x"], clustered(1, 5), np.zeros((1, L, DL), np.float32))
    with caplog.at_level(logging.WARNING, logger="waldo.index"):
        status = store.snapshot().global_index_status
    assert status.built == "IVF4,Flat" and not status.trained_cached
    assert "ignoring the cached trained global index" in caplog.text
    assert gi.load_trained(path, "IVF4,Flat", D) is not None  # rewritten
    store.close()


def test_hnsw(tmp_path):
    with create(tmp_path / "ix", "HNSW8", {"efSearch": 64}) as store:
        ids = add(store, 500, 0)
        assert store.snapshot().global_index_status.built == "HNSW8"
        q = clustered(20, 3)
        want = np.array(ids)[exact_knn(q, store.global_descriptors(ids), 10)[1]]
        assert recall(store.search(q, 10).ids, want) >= 0.95
        assert recall(store.search(q, 10, search_params={"efSearch": 500}).ids, want) >= 0.99
        # leave-one-out still drops the excluded id
        res = store.search(store.global_descriptors(ids[:3]), 4, exclude_ids=ids[:3])
        assert not any(i in row for i, row in zip(ids[:3], res.ids.tolist()))


def test_bad_specs_and_params_are_refused(tmp_path):
    with pytest.raises(ValueError, match="not a faiss index factory string"):
        create(tmp_path / "a", "Bogus42")
    with pytest.raises(ValueError, match="'efSearch' does not apply.*accepted: nprobe"):
        create(tmp_path / "b", "IVF8,Flat", {"efSearch": 10})
    with pytest.raises(ValueError, match="exceeds the 8 lists"):
        create(tmp_path / "c", "IVF8,Flat", {"nprobe": 9})
    with pytest.raises(ValueError, match="positive integer"):
        create(tmp_path / "d", "HNSW8", {"efSearch": 0})
    with pytest.raises(ValueError, match="accepted: none"):
        create(tmp_path / "e", "Flat", {"nprobe": 4})
    assert not any((tmp_path / n).exists() for n in "abcde")
    with create(tmp_path / "f", "Flat") as store:
        add(store, 5, 0)
        with pytest.raises(ValueError, match="does not apply"):
            store.search(clustered(1, 1), 2, search_params={"nprobe": 2})
    with create(tmp_path / "g", "IVF8,Flat") as store:  # fell back to exact: nprobe is accepted, unused
        add(store, 5, 0)
        assert store.search(clustered(1, 1), 2, search_params={"nprobe": 2}).ids.shape == (1, 2)


def test_global_index_config_validates_and_round_trips_through_json(tmp_path):
    config = gi.GlobalIndexConfig(spec="IVF8,Flat", search_params={"nprobe": 2}, trained_path=tmp_path / "t.npz")
    assert gi.GlobalIndexConfig.model_validate_json(config.model_dump_json()) == config
    with pytest.raises(ValueError, match="spek"):
        gi.GlobalIndexConfig(spek="Flat")
    with pytest.raises(ValueError, match="spec"):
        gi.GlobalIndexConfig(spec="")
    with pytest.raises(ValueError, match="nprobe"):
        gi.GlobalIndexConfig(search_params={"nprobe": "many"})
