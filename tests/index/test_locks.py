"""The write lock: bounded waits (IndexBusyError naming the holder), the busy probe, and adds
of overlapping paths by concurrent writers (skip_existing, decided under the lock)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from waldo.fsutil import LockTimeout, file_lock, lock_holders, lock_is_held
from waldo.index import IndexBusyError, IndexStore, RaggedKeypoints

REPO = str(Path(__file__).resolve().parents[2])
D, L, DL = 16, 2, 8

HOLDER = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, sys.argv[2])
    from pathlib import Path
    from waldo.fsutil import file_lock
    with file_lock(Path(sys.argv[1])):
        print("held", flush=True)
        sys.stdin.read()  # until the parent closes our stdin
    """
)


def unit(n: int, rng: np.random.Generator) -> np.ndarray:
    x = rng.standard_normal((n, D)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def rows(paths: list[str], seed: int = 0) -> tuple[list[str], list[str], np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return paths, ["x"] * len(paths), unit(len(paths), rng), rng.standard_normal((len(paths), L, DL)).astype(np.float16)


@pytest.fixture
def store(tmp_path):
    s = IndexStore.create(tmp_path / "ix", manifest={}, global_dim=D, local_shape=(L, DL))
    yield s
    s.close()


@pytest.fixture
def held_by_another_process(store):
    """Another process holding the index's write lock until the test ends; yields its pid."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(store.path / "write.lock"), REPO],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    yield proc.pid
    proc.stdin.close()
    proc.wait(timeout=30)


def test_file_lock_waits_up_to_its_timeout_and_says_once_that_it_waits(tmp_path):
    path = tmp_path / "write.lock"
    assert not lock_is_held(path)  # never locked: not even created
    with file_lock(path):
        assert lock_is_held(path) and lock_holders(path) in ([], [os.getpid()])  # [] where /proc/locks is not
        start = time.monotonic()
        with pytest.raises(LockTimeout, match="retried for 0.2 s"):
            with file_lock(path, timeout=0.2):
                pass
        assert 0.2 <= time.monotonic() - start < 2
        with pytest.raises(LockTimeout):
            with file_lock(path, timeout=0):  # one attempt
                pass
    assert not lock_is_held(path)
    notices: list[float] = []

    def hold() -> None:
        with file_lock(path):
            ready.set()
            time.sleep(0.6)

    ready = threading.Event()
    holder = threading.Thread(target=hold)
    holder.start()
    ready.wait()
    start = time.monotonic()
    with file_lock(path, on_wait=lambda: notices.append(time.monotonic() - start), notice_after=0.2):
        waited = time.monotonic() - start
    holder.join()
    assert len(notices) == 1 and 0.2 <= notices[0] < waited  # said once, then waited on
    with file_lock(path, on_wait=lambda: notices.append(-1.0)):
        pass  # free at once: nothing to say
    assert len(notices) == 1


def test_every_writer_gives_up_after_lock_timeout_naming_the_holder(store, held_by_another_process):
    pid = held_by_another_process
    busy = IndexStore.open(store.path, lock_timeout=0.3)
    assert busy.writer_busy() and store.writer_busy()
    for write in (lambda: busy.add(*rows(["c.jpg"])), lambda: busy.remove([1]), busy.compact,
                  busy.merge_small_segments):
        start = time.monotonic()
        with pytest.raises(IndexBusyError) as caught:
            write()
        assert 0.3 <= time.monotonic() - start < 3
        message = str(caught.value)
        assert f"is being written by another process (pid {pid}); retried for 0.3 s" in message, message
    assert isinstance(caught.value, TimeoutError)
    assert len(busy) == 0 and busy.info()["orphan_segments"] == 0  # nothing was written
    busy.lock_timeout = 0.0  # settable: one attempt
    with pytest.raises(IndexBusyError):
        busy.add(*rows(["c.jpg"]))
    busy.close()


def test_the_busy_probe_and_a_waiting_writer_after_release(store):
    assert not store.writer_busy()
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(store.path / "write.lock"), REPO],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    result: list[list[int]] = []
    waiter = threading.Thread(target=lambda: result.append(store.add(*rows(["late.jpg"]))))
    waiter.start()
    time.sleep(0.4)
    assert store.writer_busy() and waiter.is_alive() and not result  # lock_timeout None: waits
    holder.stdin.close()
    holder.wait(timeout=30)
    waiter.join(timeout=30)
    assert result == [[1]] and not store.writer_busy()


def test_skip_existing_drops_live_paths_and_says_which(store):
    first = store.add(*rows(["a.jpg", "b.jpg"]))
    with pytest.raises(ValueError, match="already in the index: 'b.jpg'"):
        store.add(*rows(["b.jpg", "c.jpg"]))  # the default contract is unchanged
    paths = ["b.jpg", "c.jpg", "a.jpg", "d.jpg"]
    kp = RaggedKeypoints(np.arange(20, dtype=np.float32).reshape(10, 2), np.arange(10, dtype=np.uint8)[:, None]
                         .repeat(4, 1), np.array([0, 1, 3, 6, 10], np.int64))
    _, idents, g, loc = rows(paths, seed=3)
    result = store.add_new(paths, idents, g, loc, verification=kp)
    assert result.skipped_paths == ["b.jpg", "a.jpg"] and len(result.ids) == 2
    assert [r.path for r in store.records(result.ids)] == ["c.jpg", "d.jpg"]
    np.testing.assert_array_equal(store.global_descriptors(result.ids), g[[1, 3]])
    got = store.verification_features(result.ids)  # the kept images' own keypoints
    np.testing.assert_array_equal(got.keypoints, np.concatenate([kp[1][0], kp[3][0]]))
    np.testing.assert_array_equal(got.offsets, [0, 2, 6])
    assert store.add_new(*rows(["a.jpg", "d.jpg"])).ids == []  # nothing new: nothing written
    assert store.add(*rows(["e.jpg", "a.jpg"]), skip_existing=True) == [max(result.ids) + 1]
    assert len(store) == 5 and first == [1, 2] and store.check() == []
    assert len(store.info()["segments"]) == 3


ADDER = textwrap.dedent(
    """
    import json, os, sys, time
    sys.path.insert(0, sys.argv[4])
    import numpy as np
    from waldo.index import IndexStore
    store = IndexStore.open(sys.argv[1])
    paths = json.loads(sys.argv[2])
    rng = np.random.default_rng(len(paths))
    g = rng.standard_normal((len(paths), store.global_dim)).astype(np.float32)
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    loc = rng.standard_normal((len(paths), *store.local_shape)).astype(np.float16)
    print("ready", flush=True)
    while not os.path.exists(sys.argv[3]):  # start together
        time.sleep(0.001)
    result = store.add_new(paths, ["x"] * len(paths), g, loc)
    print(json.dumps({"ids": result.ids, "skipped": result.skipped_paths}))
    """
)


def test_two_processes_adding_overlapping_paths_at_once_both_succeed(store, tmp_path):
    """Two writers start at the same moment with 40 paths each, 20 of them shared: both
    succeed, the index holds the union once, and each shared path went to exactly one."""
    go = tmp_path / "go"
    sets = [[f"shared/{i}" for i in range(20)] + [f"{who}/{i}" for i in range(20)] for who in ("a", "b")]
    procs = [subprocess.Popen([sys.executable, "-c", ADDER, str(store.path), json.dumps(paths), str(go), REPO],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for paths in sets]
    for proc in procs:
        assert proc.stdout.readline().strip() == "ready"
    go.touch()
    outcomes = []
    for proc in procs:
        out, err = proc.stdout.read(), proc.stderr.read()  # through readline()'s buffer, not communicate()
        assert proc.wait(timeout=60) == 0, err
        outcomes.append(json.loads(out))
    records = store.records()
    assert sorted(r.path for r in records) == sorted(set(sets[0]) | set(sets[1]))  # the union, each once
    added = [set(r.path for r in store.records(o["ids"])) for o in outcomes]
    assert added[0].isdisjoint(added[1]) and len(added[0]) + len(added[1]) == 60
    for paths, outcome, mine in zip(sets, outcomes, added):
        assert set(outcome["skipped"]) == set(paths) - mine  # skipped exactly what the other one added
    assert store.check() == []
