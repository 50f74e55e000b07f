"""Tiered merging of small segments: the policy, its bounds over 2,000 one-image adds, merges
beside concurrent adds and readers, and SIGKILLs in the middle of merges."""

from __future__ import annotations

import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from waldo.index import IndexStore, MergePolicy, RaggedKeypoints, exact_knn
from waldo.index.segments import SegmentInfo

REPO = str(Path(__file__).resolve().parents[2])
D, L, DL = 32, 6, 16


def unit(n: int, d: int, rng: np.random.Generator) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def keypoints(counts: list[int], seed: int) -> RaggedKeypoints:
    rng = np.random.default_rng(seed)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    m = int(offsets[-1])
    return RaggedKeypoints(rng.random((m, 2), dtype=np.float32), rng.integers(0, 256, (m, 32), dtype=np.uint8),
                           offsets)


def fast_dir(tmp_path: Path) -> Path:
    """Where a test that commits thousands of times writes: a tmpfs when there is one (fsync
    costs nothing there; the crash-safety code runs all the same), else the test's folder."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        folder = shm / f"waldo-test-{os.getpid()}-{tmp_path.name}"
        folder.mkdir()
        return folder
    return tmp_path


@pytest.fixture
def fast_root(tmp_path):
    folder = fast_dir(tmp_path)
    yield folder / "ix"
    if folder != tmp_path:
        shutil.rmtree(folder, ignore_errors=True)


def info(name: str, rows: int, row_bytes: int = 100) -> SegmentInfo:
    return SegmentInfo(name, rows, "", "", rows * row_bytes, 0)


def test_the_policy_merges_a_full_tier_oldest_first_within_the_size_cap():
    policy = MergePolicy(factor=4, max_segment_bytes=10_000)
    assert [policy.tier(r) for r in (1, 3, 4, 15, 16, 63, 64)] == [0, 0, 1, 1, 2, 2, 3]
    three = [info(f"a{i}", 1) for i in range(3)]
    assert policy.plan(three) == []  # a tier holds up to factor - 1 segments
    assert policy.plan([*three, info("a3", 2)]) == ["a0", "a1", "a2", "a3"]
    # the lowest full tier goes first; tier 1 (4-15 rows) is full too
    tier1 = [info(f"b{i}", 5) for i in range(4)]
    assert policy.plan([*tier1, *three, info("a3", 2)]) == ["a0", "a1", "a2", "a3"]
    assert policy.plan(tier1) == ["b0", "b1", "b2", "b3"]
    # segments at the size cap are never merged; a merge stops before its output passes the cap
    assert policy.plan([info(f"c{i}", 30, row_bytes=400) for i in range(8)]) == []  # 12,000 bytes each
    big = [info(f"d{i}", 20, row_bytes=200) for i in range(5)]  # 4,000 bytes each: two fit in 10,000
    assert policy.plan(big) == ["d0", "d1"]
    mixed = [info("e0", 20, 300), info("e1", 20, 300), info("e2", 20, 50), info("e3", 20, 50)]  # 6,000/1,000 each
    assert policy.plan(mixed) == ["e0", "e2", "e3"]  # e1 would pass the cap: skipped, not the end
    assert policy.bound(1) == 3 and policy.bound(64) == 12
    with pytest.raises(ValueError, match="factor"):
        MergePolicy(factor=1)


def test_two_thousand_one_image_adds_stay_few_segments_few_fds_and_fast(fast_root):
    """The pile-up of issue 19: one add = one segment. With a merge after each add (what
    Waldo.add does), segments stay under the policy's bound, file descriptors stay flat, the
    total rewrite is O(n log n), the last adds are as fast as the first, and search, ids,
    descriptors and keypoints are exactly those of an unmerged index."""
    n = 2000
    store = IndexStore.create(fast_root, manifest={}, global_dim=D, local_shape=(L, DL))
    rng = np.random.default_rng(0)
    globals_, locals_ = unit(n, D, rng), rng.standard_normal((n, L, DL)).astype(np.float16)
    counts = rng.integers(0, 5, n).tolist()
    kp = keypoints(counts, 1)
    ids, seconds, most_segments, rewritten = [], [], 0, 0
    store.snapshot()
    fds = [len(os.listdir("/proc/self/fd"))]
    for i in range(n):
        start = time.perf_counter()
        ids += store.add([f"img/{i}.jpg"], [f"id{i % 7}"], globals_[i : i + 1], locals_[i : i + 1],
                         verification=RaggedKeypoints(*kp[i], np.array([0, counts[i]], np.int64)))
        if store.needs_merge():
            rewritten += store.merge_small_segments()["rows_rewritten"]
        seconds.append(time.perf_counter() - start)
        assert not store.needs_merge(), f"after {i + 1} adds"
        if (i + 1) % 10 == 9:  # the most segments are left just before a cascade: 1,999 = 1 + 9 + 9 + 9
            segments = len(store.info()["segments"])
            most_segments = max(most_segments, segments)
            assert segments <= store.merge_policy.bound(i + 1), f"after {i + 1} adds"
        if i % 200 == 199:
            store.snapshot()  # maps or reads every live segment
            fds.append(len(os.listdir("/proc/self/fd")))
    policy = store.merge_policy
    assert 20 <= most_segments <= policy.bound(n)  # 1,999 rows = 1 + 9 + 9 + 9 segments at the worst
    assert max(fds) - fds[0] <= 2, fds  # unmerged and memory-mapped this was ~4 per segment
    assert rewritten <= n * policy.tier(n), rewritten  # each row rewritten once per tier climbed
    first, last = statistics.median(seconds[:100]), statistics.median(seconds[-100:])
    # Generous absolute slack for a loaded 2-core machine; without merging the last adds took
    # 15x the first (the add reads every segment's catalogue row and lists every folder).
    assert last <= 2 * first + 0.005, (first, last)
    print(f"\n{n} adds: at most {most_segments} segments (bound {policy.bound(n)}), fds {fds[0]}..{max(fds)}, "
          f"{rewritten} rows rewritten, median add {1000 * first:.2f} ms first 100 / {1000 * last:.2f} ms last 100")
    # ids unchanged, and everything reads back as added (keypoints carried through every merge)
    assert ids == list(range(1, n + 1)) and [r.path for r in store.records()] == [f"img/{i}.jpg" for i in range(n)]
    np.testing.assert_array_equal(store.global_descriptors(ids), globals_)
    np.testing.assert_array_equal(store.local_descriptors(ids), locals_)
    got = store.verification_features(ids)
    np.testing.assert_array_equal(got.offsets, kp.offsets)
    np.testing.assert_array_equal(got.keypoints, kp.keypoints)
    np.testing.assert_array_equal(got.descriptors, kp.descriptors)
    q = unit(20, D, np.random.default_rng(5))
    want_s, want_i = exact_knn(q, globals_, 10)
    res = store.search(q, 10)
    np.testing.assert_array_equal(res.ids, np.array(ids)[want_i])
    np.testing.assert_allclose(res.scores, want_s, atol=1e-6)
    assert store.check() == []
    store.close()


@pytest.mark.parametrize("mapped", [False, True], ids=["read", "mapped"])
@pytest.mark.parametrize("local_dtype", ["float16", "int8"])
def test_a_merge_keeps_values_and_old_snapshots_readable(tmp_path, monkeypatch, mapped, local_dtype):
    """A snapshot taken before a merge still reads the merged-away segments (deleted files:
    in RAM, or kept alive by the mapping), and the merge copies values bit for bit (int8 rows
    and their scales as stored, never re-quantised)."""
    from waldo.index import npy_files

    if mapped:
        monkeypatch.setattr(npy_files, "MMAP_MIN_BYTES", 0)
    store = IndexStore.create(tmp_path / "ix", manifest={}, global_dim=D, local_shape=(L, DL),
                              local_dtype=local_dtype)
    store.merge_policy = MergePolicy(factor=4)
    rng = np.random.default_rng(3)
    ids = []
    for i, n in enumerate([1, 3, 2, 1]):  # four tier-0 segments (under 4 rows each): one merge
        ids += store.add([f"{i}/{j}" for j in range(n)], ["x"] * n, unit(n, D, rng),
                         rng.standard_normal((n, L, DL)).astype(np.float32), verification=keypoints([2] * n, i))
    old = store.snapshot()
    before = (old.global_descriptors(ids), old.local_descriptors(ids), old.verification_features(ids))
    old_folders = set(os.listdir(store.path / "segments"))
    assert store.needs_merge()
    stats = store.merge_small_segments()
    assert stats["merges"] == 1 and stats["segments_before"] == 4 and stats["segments_after"] == 1
    assert stats["rows_rewritten"] == 7 and stats["rows_reclaimed"] == 0
    assert not old_folders & set(os.listdir(store.path / "segments"))  # the merged folders are gone
    for snap in (old, store.snapshot()):
        assert snap is old or snap.generation > old.generation
        np.testing.assert_array_equal(snap.global_descriptors(ids), before[0])
        np.testing.assert_array_equal(snap.local_descriptors(ids), before[1])
        np.testing.assert_array_equal(snap.verification_features(ids).descriptors, before[2].descriptors)
    assert store.check() == []
    store.close()


def test_merges_run_beside_adds_removes_and_readers(fast_root):
    """A merging thread (as the service runs one) beside an adding thread and reading threads
    on other store objects (as other processes would be): nothing fails, readers always see
    a consistent snapshot, and the result is the exact answer."""
    root = fast_root
    IndexStore.create(root, manifest={}, global_dim=D, local_shape=(L, DL)).close()
    writer, merger, reader = IndexStore.open(root), IndexStore.open(root), IndexStore.open(root)
    merger.merge_policy = MergePolicy(factor=3)
    done, errors, merges = threading.Event(), [], []
    added: dict[str, np.ndarray] = {}

    def add() -> None:
        rng = np.random.default_rng(11)
        try:
            for i in range(150):
                g = unit(1, D, rng)
                writer.add([f"p{i}"], ["x"], g, rng.standard_normal((1, L, DL)).astype(np.float16))
                added[f"p{i}"] = g[0]
                if i % 25 == 24:
                    writer.remove_paths([f"p{i - 3}"])
                    added.pop(f"p{i - 3}")
        except BaseException as e:  # reported by the main thread
            errors.append(e)
        finally:
            done.set()

    def merge() -> None:
        try:
            while not done.is_set():
                merges.append(merger.merge_small_segments()["merges"])
        except BaseException as e:
            errors.append(e)

    def read(seed: int) -> None:
        rng = np.random.default_rng(seed)
        try:
            while not done.is_set():
                snap = reader.snapshot()
                if len(snap):
                    q = unit(1, D, rng)
                    res = snap.search(q, 5)
                    found = res.ids[0][res.ids[0] >= 0]
                    assert len(found) == min(5, len(snap)) and np.isin(found, snap.ids).all()
                    np.testing.assert_allclose(res.scores[0, : len(found)], snap.global_descriptors(found) @ q[0],
                                               atol=1e-5)
                    assert snap.local_descriptors(found).shape == (len(found), L, DL)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=add), threading.Thread(target=merge),
               *(threading.Thread(target=read, args=(s,)) for s in range(2))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, repr(errors[0])
    assert sum(merges) > 5
    merger.merge_small_segments()
    assert not merger.needs_merge() and merger.check() == []
    records = writer.records()
    assert sorted(r.path for r in records) == sorted(added)
    paths = [r.path for r in records]
    np.testing.assert_array_equal(writer.global_descriptors([r.id for r in records]),
                                  np.stack([added[p] for p in paths]))
    for s in (writer, merger, reader):
        s.close()


# Adds one image at a time with 12 KiB of locals each, merging by a factor-2 policy after each
# add (a merge after nearly every add, some rewriting hundreds of rows), and says where it is.
MERGE_CHILD = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, sys.argv[3])
    import numpy as np
    from waldo.index import IndexStore, MergePolicy
    store = IndexStore.open(sys.argv[1])
    store.merge_policy = MergePolicy(factor=2)
    start = int(sys.argv[2])
    print("ready", flush=True)
    for i in range(start, start + 100_000):
        rng = np.random.default_rng(i)  # the parent regenerates each image's rows from its number
        g = rng.standard_normal((1, store.global_dim)).astype(np.float32)
        g /= np.linalg.norm(g)
        (image_id,) = store.add([f"img/{i}"], ["x"], g, rng.standard_normal((1, *store.local_shape)).astype(np.float16))
        print(f"acked {i} {image_id}", flush=True)
        print("merging", flush=True)
        store.merge_small_segments()
        print("merged", flush=True)
    """
)


def _rows(i: int, global_dim: int, local_shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(i)
    g = rng.standard_normal((1, global_dim)).astype(np.float32)
    g /= np.linalg.norm(g)
    return g[0], rng.standard_normal((1, *local_shape)).astype(np.float16)[0]


def test_sigkill_during_merges_loses_nothing(fast_root):
    """SIGKILL a process that adds and merges, at random moments, until several kills have
    landed inside a merge: after each, the index opens, check() is clean, every acknowledged
    image is there with its id and its exact descriptors, and the next writer carries on."""
    shape = (49, 128)
    IndexStore.create(fast_root, manifest={}, global_dim=64, local_shape=shape).close()
    rng = random.Random(19)
    acked: dict[int, int] = {}  # image number -> id
    next_image, kills_in_merge, kills = 0, 0, 0
    while kills_in_merge < 3 and kills < 15:
        proc = subprocess.Popen([sys.executable, "-c", MERGE_CHILD, str(fast_root), str(next_image), REPO],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
        time.sleep(rng.uniform(0.05, 0.6))
        proc.send_signal(signal.SIGKILL)
        out, err = proc.stdout.read(), proc.stderr.read()  # through the buffered reader (see test_store.py)
        proc.wait(timeout=20)
        assert proc.returncode == -signal.SIGKILL, err
        kills += 1
        lines = out.split("\n")[:-1]  # only complete lines
        for line in lines:
            if line.startswith("acked "):
                _, number, image_id = line.split()
                acked[int(number)] = int(image_id)
                next_image = int(number) + 1
        kills_in_merge += bool(lines) and lines[-1] == "merging"
        with IndexStore.open(fast_root) as store:
            assert store.check() == [], f"kill {kills}"
            live = {r.path: r.id for r in store.records()}
            # The add in flight at the kill may have committed without its "acked" line.
            extra = set(live) - {f"img/{i}" for i in acked}
            assert extra <= {f"img/{next_image}"}, f"kill {kills}: unexpected {extra}"
            if extra:
                acked[next_image] = live[f"img/{next_image}"]
                next_image += 1
            assert {f"img/{i}": image_id for i, image_id in acked.items()} == live, f"kill {kills}: lost images"
            numbers = sorted(acked)
            want = [_rows(i, 64, shape) for i in numbers]
            ids = [acked[i] for i in numbers]
            np.testing.assert_array_equal(store.global_descriptors(ids), np.stack([g for g, _ in want]))
            np.testing.assert_array_equal(store.local_descriptors(ids), np.stack([loc for _, loc in want]))
    assert kills_in_merge >= 3, f"only {kills_in_merge} of {kills} kills landed inside a merge"
    with IndexStore.open(fast_root) as store:
        store.merge_policy = MergePolicy(factor=2)
        store.merge_small_segments()  # the next writer deletes what the kills left and merges on
        assert store.check() == [] and store.info()["orphan_segments"] == 0 and len(store) == len(acked)
    print(f"\n{kills} kills, {kills_in_merge} inside a merge, {len(acked)} images")
