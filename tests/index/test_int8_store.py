"""IndexStore with int8 local descriptors (local_dtype="int8"), and old float16 indexes."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from waldo.index import IndexCorruptError, IndexMismatchError, IndexStore
from waldo.index.quantize import dequantize_int8, quantize_int8

D, L, DL = 32, 49, 128
MANIFEST = {"backbone": "efficientnet_lite0", "model_hash": "abc123"}


def batch(n: int, seed: int) -> tuple[list[str], list[str], np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    g = rng.standard_normal((n, D)).astype(np.float32)
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    loc = (rng.standard_normal((n, L, DL)) * rng.uniform(0.05, 3, (n, L, 1))).astype(np.float32)
    return [f"img/{seed}/{i}.jpg" for i in range(n)], [f"id{i % 4}" for i in range(n)], g, loc


def create(root: Path, local_dtype: str = "int8") -> IndexStore:
    return IndexStore.create(root, manifest=MANIFEST, global_dim=D, local_shape=(L, DL), local_dtype=local_dtype)


def test_int8_add_search_remove_compact_check_reopen(tmp_path):
    store, plain = create(tmp_path / "q"), create(tmp_path / "f", "float16")
    assert store.local_dtype == "int8" and store.manifest["format_version"] == 2
    assert plain.local_dtype == "float16" and plain.manifest["format_version"] == 1
    locs, ids = [], []
    for seed in range(3):
        paths, idents, g, loc = batch(20, seed)
        ids += store.add(paths, idents, g, loc)
        assert plain.add(paths, idents, g, loc) == ids[-20:]
        locs.append(loc)
    loc = np.concatenate(locs)
    got = store.local_descriptors(ids)
    assert got.dtype == np.float16 and got.shape == (60, L, DL)  # readers see float16, as before
    # the error of what readers get: half a step, plus float16 rounding of the dequantised output
    q, scale = quantize_int8(loc)
    np.testing.assert_array_equal(got, dequantize_int8(q, scale))
    step = scale.astype(np.float32)[..., None]
    assert (np.abs(got.astype(np.float32) - loc) <= step * 0.5 + np.abs(loc) * 1e-3 + 1e-6).all()
    assert isinstance(store.snapshot().local_view(ids[3]), np.ndarray)
    np.testing.assert_array_equal(store.snapshot().local_view(ids[3]), got[3])
    # global search does not depend on how locals are stored
    queries = batch(5, 99)[2]
    np.testing.assert_array_equal(store.search(queries, 7).ids, plain.search(queries, 7).ids)

    store.remove(ids[5:25])
    keep = ids[:5] + ids[25:]
    before = store.local_descriptors(keep)
    stats = store.compact()
    assert stats["rows_reclaimed"] == 20 and stats["segments_after"] == 1
    np.testing.assert_array_equal(store.local_descriptors(keep), before)  # copied, not re-quantised
    seg = next((store.path / "segments").iterdir())
    assert (seg / "local_scale.npy").is_file()
    assert np.load(seg / "local.npy", mmap_mode="r").dtype == np.int8
    assert store.check() == []
    store.close()
    with IndexStore.open(tmp_path / "q") as again:
        assert again.local_dtype == "int8" and len(again) == 40
        np.testing.assert_array_equal(again.local_descriptors(keep), before)
        assert again.check() == []
    plain.close()


def test_bytes_per_image(tmp_path):
    n = 200
    with create(tmp_path / "q") as store, create(tmp_path / "f", "float16") as plain:
        store.add(*batch(n, 0))
        plain.add(*batch(n, 0))
        per = store.info()["bytes_per_image"]
        header = 128 / n  # one .npy header per file per segment
        assert per["local"] == pytest.approx(L * DL + header, abs=0.2)
        assert per["local_scale"] == pytest.approx(L * 2 + header, abs=0.2)
        assert per["global"] == pytest.approx(D * 4 + header, abs=0.2)
        info_f = plain.info()
        assert info_f["bytes_per_image"]["local"] == pytest.approx(L * DL * 2 + header, abs=0.2)
        assert info_f["bytes_per_image"]["local_scale"] == 0 and info_f["local_dtype"] == "float16"
        assert store.info()["local_dtype"] == "int8"
        assert not any(p.name == "local_scale.npy" for p in (plain.path / "segments").rglob("*"))


def test_check_covers_the_scale_file(tmp_path, flip_last_byte):
    with create(tmp_path / "q") as store:
        store.add(*batch(4, 0))
        seg = next((store.path / "segments").iterdir())
        flip_last_byte(seg / "local_scale.npy", 0x01)
        problems = store.check()
        assert len(problems) == 1 and "local_scale.npy sha256 differs" in problems[0]
        (seg / "local_scale.npy").unlink()
        assert any("local_scale.npy" in p for p in store.check())


def test_options_are_checked(tmp_path):
    with pytest.raises(ValueError, match="local_dtype"):
        create(tmp_path / "x", "int4")
    create(tmp_path / "q").close()
    with pytest.raises(IndexMismatchError, match="local_dtype"):
        IndexStore.create(tmp_path / "q", manifest=MANIFEST, global_dim=D, local_shape=(L, DL), exist_ok=True)
    IndexStore.create(tmp_path / "q", manifest=MANIFEST, global_dim=D, local_shape=(L, DL), exist_ok=True,
                      local_dtype="int8").close()
    # an int8 manifest claiming the old format version is refused, not misread
    path = tmp_path / "q" / "manifest.json"
    manifest = json.loads(path.read_text())
    path.write_text(json.dumps({**manifest, "format_version": 1}))
    with pytest.raises(IndexCorruptError, match="needs format_version 2"):
        IndexStore.open(tmp_path / "q")
    path.write_text(json.dumps({**manifest, "local_dtype": "int4"}))
    with pytest.raises(IndexCorruptError, match="(?s)invalid storage options.*local_dtype"):
        IndexStore.open(tmp_path / "q")


def test_index_written_before_int8_and_ann_still_works(tmp_path):
    """An index as older Waldo wrote it: no storage keys in its manifest, no scale columns."""
    root = tmp_path / "old"
    with create(root, "float16") as store:
        ids = store.add(*batch(6, 0))
    manifest = json.loads((root / "manifest.json").read_text())
    for key in ("global_index", "global_search_params"):
        del manifest[key]
    (root / "manifest.json").write_text(json.dumps(manifest))
    conn = sqlite3.connect(root / "index.sqlite")
    for column in ("local_scale_sha256", "local_scale_bytes"):
        conn.execute(f"ALTER TABLE segments DROP COLUMN {column}")
    conn.commit()
    conn.close()
    with IndexStore.open(root) as old:
        assert old.local_dtype == "float16" and old.global_index == "Flat"
        assert old.local_descriptors(ids[:2]).dtype == np.float16
        more = old.add(*batch(6, 1))
        old.remove(ids[:3])
        assert old.compact()["segments_after"] == 1 and old.check() == []
        info = old.info()
        assert info["count"] == 9 and info["bytes_per_image"]["local_scale"] == 0
        assert info["global_index"]["built"] == "Flat"
        res = old.search(batch(2, 5)[2], 3)
        assert set(res.ids.ravel().tolist()) <= set(ids[3:] + more)
    with pytest.raises(IndexMismatchError, match="global_index"):
        IndexStore.create(root, manifest=MANIFEST, global_dim=D, local_shape=(L, DL), exist_ok=True,
                          global_index="HNSW8")
