"""Tests for waldo.index.store.IndexStore with random unit vectors (no images, no model)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

REPO = str(Path(__file__).resolve().parents[2])

from waldo.index import IndexCorruptError, IndexMismatchError, IndexStore, UnknownIdError, exact_knn

D, L, DL = 32, 6, 16
MANIFEST = {"backbone": "efficientnet_lite0", "model_hash": "abc123", "transform": {"size": 224}}


def unit(n: int, d: int, rng: np.random.Generator) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def batch(n: int, seed: int, prefix: str = "img") -> tuple[list[str], list[str], np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    paths = [f"{prefix}/{seed}/{i}.jpg" for i in range(n)]
    return paths, [f"id{i % 3}" for i in range(n)], unit(n, D, rng), rng.standard_normal((n, L, DL)).astype(np.float32)


@pytest.fixture
def store(tmp_path: Path):
    s = IndexStore.create(tmp_path / "ix", manifest=MANIFEST, global_dim=D, local_shape=(L, DL))
    yield s
    s.close()


def test_round_trip(store, tmp_path):
    paths, idents, g, loc = batch(12, 0)
    ids = store.add(paths, idents, g, loc, attrs=[{"i": i} for i in range(12)])
    assert ids == sorted(ids) and len(set(ids)) == 12 and len(store) == 12
    q = unit(5, D, np.random.default_rng(9))
    res = store.search(q, 4)
    assert res.scores.shape == res.ids.shape == (5, 4) and res.ids.dtype == np.int64
    store.close()
    with IndexStore.open(tmp_path / "ix", expected={"model_hash": "abc123"}) as again:
        assert len(again) == 12 and again.global_dim == D and again.local_shape == (L, DL)
        assert again.manifest["backbone"] == "efficientnet_lite0" and again.manifest["format_version"] == 1
        res2 = again.search(q, 4)
        np.testing.assert_array_equal(res2.ids, res.ids)
        np.testing.assert_array_equal(res2.scores, res.scores)
        rec = again.get(ids[3])
        assert (rec.path, rec.identity, rec.attrs) == (paths[3], idents[3], {"i": 3})
        np.testing.assert_array_equal(again.global_descriptors([ids[3], ids[0]]), g[[3, 0]])
        np.testing.assert_array_equal(again.local_descriptors([ids[5]]), loc[[5]].astype(np.float16))
        assert again.check() == []
        info = again.info()
        assert info["count"] == 12 and info["identities"] == 3 and info["bytes"]["local"] > 0


def test_batches_equal_exact_knn(store):
    all_g, all_ids = [], []
    for seed in range(4):
        paths, idents, g, loc = batch(25, seed)
        all_ids += store.add(paths, idents, g, loc)
        all_g.append(g)
    gallery, ids = np.concatenate(all_g), np.array(all_ids)
    q = unit(7, D, np.random.default_rng(99))
    want_s, want_i = exact_knn(q, gallery, 10)
    res = store.search(q, 10)
    np.testing.assert_array_equal(res.ids, ids[want_i])
    np.testing.assert_allclose(res.scores, want_s, atol=1e-6)
    # leave-one-out by id equals leave-one-out by position
    loo = store.search(gallery, 5, exclude_ids=ids)
    want_s, want_i = exact_knn(gallery, gallery, 5, exclude=np.arange(len(ids)))
    np.testing.assert_array_equal(loo.ids, ids[want_i])
    # k beyond the index size pads with -1 / -inf
    res = store.search(q[:1], 150)
    assert (res.ids[0, 100:] == -1).all() and np.isneginf(res.scores[0, 100:]).all()


def test_remove_never_returned(store):
    for seed in range(3):
        store.add(*batch(10, seed))
    ids = [r.id for r in store.records()]
    gone = ids[::3]
    assert store.remove(gone) == len(gone)
    assert store.remove_paths(["img/1/9.jpg"]) == 1
    gone.append(ids[19])
    q = unit(20, D, np.random.default_rng(5))
    res = store.search(q, 30)
    assert not np.isin(res.ids, gone).any()
    assert (res.ids >= 0).sum() == 20 * (30 - len(gone))
    assert len(store) == 30 - len(gone)
    with pytest.raises(UnknownIdError, match=str(gone[0])):
        store.remove([gone[0], ids[1]])
    assert len(store) == 30 - len(gone)  # all-or-nothing: ids[1] was not removed
    with pytest.raises(KeyError):
        store.get(gone[0])
    assert [r.id for r in store.records([gone[0], ids[1]], skip_missing=True)] == [ids[1]]
    with pytest.raises(UnknownIdError, match="nope.jpg"):
        store.remove_paths(["nope.jpg"])
    assert store.contains_paths(["img/1/9.jpg", "img/1/7.jpg"]) == [False, True]
    store.add(["img/1/9.jpg"], ["x"], *batch(1, 7)[2:])  # a removed path may be added again
    assert max(r.id for r in store.records()) > max(ids)  # ids are never reused
    assert store.check() == []


def test_removing_a_whole_segment_frees_its_folder(store):
    ids = store.add(*batch(4, 0))
    store.add(*batch(4, 1))
    assert len(store.info()["segments"]) == 2
    store.remove(ids)
    info = store.info()
    assert len(info["segments"]) == 1 and info["orphan_segments"] == 0
    assert len(os.listdir(store.path / "segments")) == 1


def test_compact_keeps_results(store):
    for seed in range(5):
        store.add(*batch(20, seed))
    store.remove([r.id for r in store.records()][::4])
    q = unit(10, D, np.random.default_rng(3))
    before = store.search(q, 15)
    ids = [r.id for r in store.records()]
    local_before = store.local_descriptors(ids)
    stats = store.compact()
    assert stats == {"segments_before": 5, "segments_after": 1, "rows_reclaimed": 25}
    after = store.search(q, 15)
    np.testing.assert_array_equal(after.ids, before.ids)
    np.testing.assert_array_equal(after.scores, before.scores)
    np.testing.assert_array_equal(store.local_descriptors(ids), local_before)
    assert [r.id for r in store.records()] == ids
    info = store.info()
    assert len(info["segments"]) == 1 and info["dead_rows"] == 0
    assert len(os.listdir(store.path / "segments")) == 1
    assert store.check() == []
    assert store.compact()["rows_reclaimed"] == 0  # nothing left to do


def test_manifest_mismatch_and_bad_dirs(store, tmp_path):
    root = store.path
    with pytest.raises(IndexMismatchError, match="backbone='efficientnet_lite0'.*backbone='resnet50'") as e:
        IndexStore.open(root, expected={"backbone": "resnet50", "model_hash": "abc123"})
    assert e.value.differences == {"backbone": ("efficientnet_lite0", "resnet50")}
    with pytest.raises(IndexMismatchError, match="local_shape"):
        IndexStore.create(root, manifest=MANIFEST, global_dim=D, local_shape=(L + 1, DL), exist_ok=True)
    IndexStore.create(root, manifest=MANIFEST, global_dim=D, local_shape=(L, DL), exist_ok=True).close()
    with pytest.raises(FileExistsError, match="already holds an index"):
        IndexStore.create(root, manifest=MANIFEST, global_dim=D, local_shape=(L, DL))
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("hi")
    with pytest.raises(FileExistsError, match="not empty"):
        IndexStore.create(other, manifest={}, global_dim=D, local_shape=(L, DL))
    with pytest.raises(IndexCorruptError, match="does not exist"):
        IndexStore.open(tmp_path / "missing")
    with pytest.raises(IndexCorruptError, match="manifest.json is missing"):
        IndexStore.open(other)
    (other / "manifest.json").write_text("{not json")
    with pytest.raises(IndexCorruptError, match="not valid JSON"):
        IndexStore.open(other)
    with pytest.raises(ValueError, match="reserved"):
        IndexStore.create(tmp_path / "r", manifest={"format_version": 9}, global_dim=D, local_shape=(L, DL))
    damaged = tmp_path / "damaged"
    IndexStore.create(damaged, manifest={}, global_dim=4, local_shape=(1, 4)).close()
    (damaged / "index.sqlite").write_bytes(b"garbage" * 1000)
    with pytest.raises(IndexCorruptError, match="not a readable index catalogue"):
        IndexStore.open(damaged)
    empty = tmp_path / "empty"
    empty.mkdir()
    IndexStore.create(empty, manifest={}, global_dim=4, local_shape=(1, 4)).close()  # an empty dir is fine


def test_duplicate_paths_refused(store):
    paths, idents, g, loc = batch(5, 0)
    store.add(paths, idents, g, loc)
    with pytest.raises(ValueError, match=r"already in the index: 'img/0/1.jpg'"):
        store.add(["new.jpg", paths[1]], ["a", "b"], g[:2], loc[:2])
    with pytest.raises(ValueError, match="duplicate paths within one add call"):
        store.add(["x.jpg", "x.jpg"], ["a", "a"], g[:2], loc[:2])
    assert len(store) == 5 and store.contains_paths([paths[0], "new.jpg"]) == [True, False]
    assert store.info()["orphan_segments"] == 0  # refused before anything was written


def test_bad_inputs_refused(store):
    paths, idents, g, loc = batch(3, 0)
    with pytest.raises(ValueError, match=r"global_desc must have shape \(3, 32\)"):
        store.add(paths, idents, g[:, :16], loc)
    with pytest.raises(ValueError, match=r"local_desc must have shape \(3, 6, 16\)"):
        store.add(paths, idents, g, loc[:, :5])
    with pytest.raises(ValueError, match="L2-normalised"):
        store.add(paths, idents, g * 2, loc)
    bad = g.copy()
    bad[1, 0] = np.nan
    with pytest.raises(ValueError, match="NaN/inf values in rows 1"):
        store.add(paths, idents, bad, loc)
    with pytest.raises(ValueError, match="overflow float16"):
        store.add(paths, idents, g, loc * 1e6)
    with pytest.raises(ValueError, match="3 paths but 2 identities"):
        store.add(paths, idents[:2], g, loc)
    with pytest.raises(ValueError, match="floating-point"):
        store.add(paths, idents, g.astype(np.int32), loc)
    with pytest.raises(ValueError, match="not JSON-serialisable"):
        store.add(paths, idents, g, loc, attrs=[{}, {"x": object()}, {}])
    with pytest.raises(ValueError, match=r"queries must have shape \(Q, 32\)"):
        store.search(g[:, :8], 3)
    assert len(store) == 0


def test_big_segment_files_are_memory_mapped_small_ones_read(store, monkeypatch):
    """Big files stay memory-mapped (never all in RAM); small ones are read, holding no fd."""
    from waldo.index import npy_files

    small = store.add(*batch(6, 0))
    first = store.snapshot()  # opens (and caches) the small segment: read into RAM
    monkeypatch.setattr(npy_files, "MMAP_MIN_BYTES", 0)  # every file opened from here on is "big"
    ids = store.add(*batch(6, 1))
    snap = store.snapshot()
    view = snap.local_view(ids[2])
    assert isinstance(view, np.memmap) and view.dtype == np.float16 and view.shape == (L, DL)
    in_ram = snap.local_view(small[2])
    assert not isinstance(in_ram, np.memmap) and not in_ram.flags.writeable and in_ram.dtype == np.float16
    assert store.local_descriptors(ids[:2]).dtype == np.float16
    assert store.snapshot() is snap  # no write: the snapshot is reused, not rebuilt
    store.add(*batch(1, 2))
    assert store.snapshot() is not snap and len(snap) == 12 and len(first) == 6  # old snapshots unchanged


def test_empty_index_and_empty_calls(store):
    res = store.search(unit(2, D, np.random.default_rng(0)), 3)
    assert (res.ids == -1).all() and np.isneginf(res.scores).all()
    assert store.add([], [], np.zeros((0, D), np.float32), np.zeros((0, L, DL), np.float16)) == []
    assert store.remove([]) == 0 and store.records() == [] and len(store) == 0
    ids = store.add(*batch(2, 0))
    store.remove(ids)
    assert store.compact()["segments_after"] == 0 and store.check() == []
    assert os.listdir(store.path / "segments") == []
    (one,) = store.add(["unlabelled.jpg"], [""], *batch(1, 3)[2:])  # identity may be unknown
    assert store.get(one).identity == ""


def test_check_detects_damage(store, flip_last_byte):
    store.add(*batch(4, 0))
    seg = next((store.path / "segments").iterdir())
    flip_last_byte(seg / "local.npy")
    problems = store.check()
    assert len(problems) == 1 and "local.npy sha256 differs" in problems[0]


ORPHAN_CHILD = textwrap.dedent(
    """
    import os, signal, sys
    sys.path.insert(0, sys.argv[2])
    import numpy as np
    from waldo.index import IndexStore, db
    def die(*args, **kwargs):  # crash after the segment is written, before its commit
        os.kill(os.getpid(), signal.SIGKILL)
    db.insert_images = die
    store = IndexStore.open(sys.argv[1])
    g = np.zeros((2, store.global_dim), np.float32); g[:, 0] = 1
    store.add(["a.jpg", "b.jpg"], ["a", "b"], g, np.zeros((2, *store.local_shape), np.float16))
    """
)


def test_orphan_from_killed_add_is_cleaned_by_next_writer(store):
    store.add(*batch(3, 0))
    before = set(os.listdir(store.path / "segments"))
    proc = subprocess.run([sys.executable, "-c", ORPHAN_CHILD, str(store.path), REPO], capture_output=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    orphans = set(os.listdir(store.path / "segments")) - before
    assert len(orphans) == 1
    with IndexStore.open(store.path) as reader:  # readers ignore the orphan
        assert reader.check() == [] and len(reader) == 3 and reader.info()["orphan_segments"] == 1
        assert (reader.search(unit(2, D, np.random.default_rng(0)), 5).ids[:, 3:] == -1).all()
    store.add(*batch(1, 1))  # the next writer deletes it
    assert not orphans & set(os.listdir(store.path / "segments"))
    assert store.info()["orphan_segments"] == 0


CRASH_CHILD = textwrap.dedent(
    """
    import json, sys
    sys.path.insert(0, sys.argv[3])
    import numpy as np
    from waldo.index import IndexStore
    store = IndexStore.open(sys.argv[1])
    tag = sys.argv[2]
    rng = np.random.default_rng(int(tag))
    print("ready", flush=True)
    for i in range(10**6):
        n = int(rng.integers(1, 8))
        paths = [f"{tag}/{i}/{j}.jpg" for j in range(n)]
        g = rng.standard_normal((n, store.global_dim)).astype(np.float32)
        g /= np.linalg.norm(g, axis=1, keepdims=True)
        loc = rng.standard_normal((n, *store.local_shape)).astype(np.float16)
        print("intent " + json.dumps(paths), flush=True)
        ids = store.add(paths, [tag] * n, g, loc)
        print("acked " + json.dumps(dict(zip(paths, ids))), flush=True)
        if i % 5 == 4:
            store.compact()  # also kill compactions mid-way
    """
)


def test_sigkill_during_writes_never_corrupts(store):
    root, rng = store.path, random.Random(1234)
    store.close()
    known: dict[str, int] = {}  # path -> id of every image known to be committed
    acked_total, start = 0, time.monotonic()
    for run in range(1, 16):
        proc = subprocess.Popen(
            [sys.executable, "-c", CRASH_CHILD, str(root), str(run), REPO],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        assert proc.stdout is not None
        first = proc.stdout.readline()
        if first.strip() != "ready":
            proc.kill()
            pytest.fail(f"child did not start: {first!r} {proc.communicate()[1]}")
        time.sleep(rng.uniform(0.0, 0.3))
        proc.send_signal(signal.SIGKILL)
        # Read through the buffered wrapper readline() used: communicate() reads the raw pipe
        # and loses lines readline() had already buffered (an add then looks committed but
        # never acknowledged, which made this test flaky on a busy machine).
        out, err = proc.stdout.read(), proc.stderr.read()
        proc.wait(timeout=20)
        assert proc.returncode == -signal.SIGKILL, err
        lines = out.split("\n")[:-1]  # only complete lines
        in_flight: set[str] = set()
        for line in lines:
            kind, _, payload = line.partition(" ")
            if kind == "intent":
                in_flight = set(json.loads(payload))
            elif kind == "acked":
                acked = json.loads(payload)
                known.update(acked)
                acked_total += len(acked)
                in_flight = set()
        with IndexStore.open(root) as s:
            assert s.check() == [], f"run {run}"
            live = {r.path: r.id for r in s.records()}
            assert {p: live.get(p) for p in known} == known, f"run {run}: an acknowledged image is missing"
            extra = set(live) - set(known)
            assert extra in (set(), in_flight), f"run {run}: partial or unexpected images {extra}"
            known.update({p: live[p] for p in extra})  # the in-flight add committed after all
            res = s.search(unit(3, D, np.random.default_rng(run)), 5)
            assert set(res.ids[res.ids >= 0].tolist()) <= set(live.values())
    assert acked_total > 0
    assert time.monotonic() - start < 30


def test_concurrent_readers_see_consistent_snapshots(store):
    store.add(*batch(10, 0))
    other = IndexStore.open(store.path)  # a second handle behaves like another process
    stop, errors = threading.Event(), []

    def reader(s: IndexStore, seed: int) -> None:
        rng = np.random.default_rng(seed)
        try:
            while not stop.is_set():
                snap = s.snapshot()
                q = unit(3, D, rng)
                res = snap.search(q, 8)
                assert (res.ids >= 0).sum() == 3 * min(8, len(snap))
                found = res.ids[res.ids >= 0]
                assert np.isin(found, snap.ids).all()
                row = res.ids[0][res.ids[0] >= 0]
                np.testing.assert_allclose(res.scores[0, : len(row)], snap.global_descriptors(row) @ q[0], atol=1e-5)
                assert [r.id for r in s.records(found)] == found.tolist()  # always resolvable
                assert s.local_descriptors(s.search(q, 2).ids[:, 0]).shape == (3, L, DL)
        except BaseException as e:  # reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=reader, args=(s, i)) for i, s in enumerate([store, store, other, other])]
    for t in threads:
        t.start()
    try:
        for seed in range(1, 31):
            store.add(*batch(5, seed))
            if seed % 10 == 0:
                store.compact()
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
        other.close()
    assert not errors, errors[0]
    assert len(store) == 160 and store.check() == []
