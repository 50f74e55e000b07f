"""The sharded index's storage level: the shard hash, the id encoding, shards.json and its errors,
and crash-safe creation (waldo/index/shards.py). Tiny stores, no model: seconds."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from waldo.index import IndexCorruptError, IndexMismatchError, IndexStore
from waldo.index.shards import (MAX_SHARDS, SHARDS_FILE, create_sharded_dir, distinct_identities, global_id,
                                is_sharded, layout_record, read_layout, shard_dir_name, shard_of, split_id)

# Recorded once. A different hash (or key encoding) would send existing images to other shards,
# so any change here must fail: an index written by one Waldo must route the same in the next.
EXPECTED_SHARDS = {
    # key: shard for n = 1, 2, 3, 4, 7, 16
    "/data/grocery_store/dataset/train/Fruit/Apple/Golden-Delicious/Golden-Delicious_001.jpg": [0, 0, 2, 2, 3, 2],
    "/a.jpg": [0, 0, 1, 2, 2, 10],
    "": [0, 0, 0, 0, 0, 4],
    "ünïcødé/photo.png": [0, 0, 0, 0, 1, 0],
}
COUNTS = (1, 2, 3, 4, 7, 16)


@pytest.mark.parametrize("key", sorted(EXPECTED_SHARDS))
def test_the_shard_of_a_key_never_changes(key):
    assert [shard_of(key, n) for n in COUNTS] == EXPECTED_SHARDS[key]


def test_the_hash_spreads_paths_evenly():
    keys = [f"/photos/{i // 100:03d}/IMG_{i:05d}.jpg" for i in range(8000)]
    counts = np.bincount([shard_of(k, 4) for k in keys], minlength=4)
    # Binomial(8000, 1/4) has a standard deviation of ~39: 150 is almost 4 of them.
    assert np.all(np.abs(counts - 2000) < 150), counts


@pytest.mark.parametrize("n", [0, -1, MAX_SHARDS + 1, True, 2.0])
def test_a_bad_number_of_shards_is_refused(n):
    with pytest.raises(ValueError, match="number of shards"):
        shard_of("/a.jpg", n)


def test_a_key_must_be_a_string():
    with pytest.raises(TypeError, match="str"):
        shard_of(Path("/a.jpg"), 2)  # type: ignore[arg-type]


def test_ids_encode_the_shard_and_the_local_id():
    for n in (1, 3, 8):
        for shard in range(n):
            for local in (0, 1, 17, 2**40):
                image_id = global_id(local, shard, n)
                assert split_id(image_id, n) == (shard, local)
    assert global_id(41, 0, 1) == 41  # one shard: the ids of an ordinary index
    assert global_id(5, 2, 3) == 17
    with pytest.raises(ValueError):
        split_id(-1, 3)
    with pytest.raises(ValueError):
        global_id(1, 3, 3)


def _make_shard(folder: Path, model_hash: str = "h0", identities=("a", "b")) -> None:
    """A tiny real index (no model) holding one image per identity."""
    rng = np.random.default_rng(len(str(folder)))
    with IndexStore.create(folder, manifest={"backbone": "toy", "model_hash": model_hash},
                           global_dim=4, local_shape=(2, 4)) as store:
        g = rng.standard_normal((len(identities), 4)).astype(np.float32)
        g /= np.linalg.norm(g, axis=1, keepdims=True)
        store.add([f"/{folder.name}/{i}.jpg" for i in range(len(identities))], list(identities), g,
                  rng.standard_normal((len(identities), 2, 4)).astype(np.float16))


def _sharded(tmp_path: Path, n: int = 3) -> Path:
    return create_sharded_dir(tmp_path / "idx", n, lambda folder, i: _make_shard(folder, identities=("a", f"x{i}")))


def test_creation_writes_the_layout_and_reads_back(tmp_path):
    root = _sharded(tmp_path)
    assert is_sharded(root) and not is_sharded(root / shard_dir_name(0))
    assert json.loads((root / SHARDS_FILE).read_text()) == {
        "format": "waldo-sharded", "version": 1, "shards": 3, "hash": "blake2b-64", "key": "path"}
    layout = read_layout(root)
    assert layout.shards == 3 and [p.name for p in layout.shard_dirs] == ["shard-000", "shard-001", "shard-002"]
    assert all(m["model_hash"] == "h0" for m in layout.manifests)
    assert distinct_identities(layout.shard_dirs) == 4  # "a" in every shard counts once
    assert [p.name for p in tmp_path.iterdir()] == ["idx"]  # no staging folder left behind


def test_the_layout_file_is_written_last_and_the_folder_appears_only_when_complete(tmp_path):
    seen = []

    def make_shard(folder: Path, i: int) -> None:
        staging = folder.parent
        # While shards are being made nothing claims to be an index: no shards.json, no target.
        seen.append((i, (staging / SHARDS_FILE).exists(), (tmp_path / "idx").exists(), staging.name.startswith(".")))
        _make_shard(folder)

    create_sharded_dir(tmp_path / "idx", 3, make_shard)
    assert seen == [(0, False, False, True), (1, False, False, True), (2, False, False, True)]
    assert is_sharded(tmp_path / "idx")


def test_a_failure_mid_creation_leaves_nothing(tmp_path):
    def make_shard(folder: Path, i: int) -> None:
        if i == 2:
            raise OSError("disk gone")
        _make_shard(folder)

    with pytest.raises(OSError, match="disk gone"):
        create_sharded_dir(tmp_path / "idx", 3, make_shard)
    assert list(tmp_path.iterdir()) == []


def test_creation_refuses_a_folder_with_something_in_it(tmp_path):
    (tmp_path / "idx").mkdir()
    (tmp_path / "idx" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not an empty folder"):
        create_sharded_dir(tmp_path / "idx", 2, lambda folder, i: _make_shard(folder))
    assert [p.name for p in (tmp_path / "idx").iterdir()] == ["notes.txt"]
    assert layout_record(2)["shards"] == 2


@pytest.mark.parametrize("damage, message", [
    (lambda root: (root / SHARDS_FILE).unlink(), "shards.json is missing"),
    (lambda root: (root / SHARDS_FILE).write_text("{not json"), "not valid JSON"),
    (lambda root: (root / SHARDS_FILE).write_text(json.dumps({"format": "other"})), "not a sharded index layout"),
    (lambda root: _rewrite(root, version=2), "newer than this Waldo supports"),
    (lambda root: _rewrite(root, shards=0), "'shards' must be an integer"),
    (lambda root: _rewrite(root, hash="python-hash"), "unknown shard hash"),
    (lambda root: _rewrite(root, key="id"), "unknown shard key"),
    (lambda root: (root / "shard-001").rename(root / "elsewhere"), "shard-001 of 3 shards is missing"),
    (lambda root: (root / "shard-002" / "manifest.json").write_text("[]"), "not a Waldo index manifest"),
])
def test_a_damaged_layout_is_a_clear_error(tmp_path, damage, message):
    root = _sharded(tmp_path)
    damage(root)
    with pytest.raises(IndexCorruptError, match=message):
        read_layout(root)


def _rewrite(root: Path, **changes) -> None:
    record = json.loads((root / SHARDS_FILE).read_text())
    (root / SHARDS_FILE).write_text(json.dumps({**record, **changes}))


def test_shards_of_different_models_are_a_mismatch(tmp_path):
    root = create_sharded_dir(tmp_path / "idx", 3,
                              lambda folder, i: _make_shard(folder, model_hash="other" if i == 2 else "h0"))
    with pytest.raises(IndexMismatchError, match="not built by the same model: shard-002") as caught:
        read_layout(root)
    assert caught.value.differences == {"model_hash": ("other", "h0")}
