"""The index under resource pressure: a full disk and too few file descriptors.

A full disk must be an exception (StorageFullError, the write undone), never a SIGBUS; running
out of file descriptors must never be reported as corruption, and an index of many small
segments must not need one descriptor per segment file in the first place.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from waldo.index import IndexStore, RaggedKeypoints, StorageFullError

REPO = str(Path(__file__).resolve().parents[2])
D, L, DL = 32, 49, 64  # 6 KiB of float16 locals per image: a small tmpfs fills in a few dozen adds
TMPFS_MB = 8


def unit(n: int, d: int, rng: np.random.Generator) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture
def small_tmpfs(tmp_path, missing_dependency):
    """A TMPFS_MB tmpfs mounted for the test (root only). Skipped where mounting is not allowed,
    except under CI=true, where the suite runs as root and this must work."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_MB}m", "tmpfs", str(mount)],
                              capture_output=True, text=True, timeout=30)
        reason = done.stderr.strip() or f"exit {done.returncode}"
    except FileNotFoundError:
        done, reason = None, "no mount command"
    if done is None or done.returncode != 0:
        missing_dependency(f"cannot mount a tmpfs to fill ({reason}): this test needs root")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True, timeout=30)


# Adds batches of 1-60 images (keypoints, attrs of random length) until the disk is full, then
# tries the maintenance writes on the full disk too. A SIGBUS would end it by signal.
FILL_CHILD = textwrap.dedent(
    """
    import json, sys
    sys.path.insert(0, sys.argv[3])
    import numpy as np
    from waldo.index import IndexStore, MergePolicy, RaggedKeypoints, StorageFullError

    store = IndexStore.open(sys.argv[1])
    rng = np.random.default_rng(int(sys.argv[2]))
    (L, DL), D = store.local_shape, store.global_dim
    for i in range(100_000):
        n = int(rng.integers(1, 60))
        g = rng.standard_normal((n, D)).astype(np.float32)
        g /= np.linalg.norm(g, axis=1, keepdims=True)
        offsets = np.concatenate([[0], np.cumsum(rng.integers(0, 30, n))]).astype(np.int64)
        m = int(offsets[-1])
        kp = RaggedKeypoints(rng.random((m, 2), dtype=np.float32),
                             rng.integers(0, 256, (m, 32), dtype=np.uint8), offsets)
        paths = [f"{sys.argv[2]}/{i}/{j}.jpg" for j in range(n)]
        try:
            ids = store.add(paths, ["x"] * n, g, rng.standard_normal((n, L, DL)).astype(np.float32),
                            attrs=[{"note": "y" * int(rng.integers(0, 4000))}] * n, verification=kp)
        except StorageFullError as e:
            print("full " + json.dumps({"errno": e.errno, "message": str(e), "cause": type(e.__cause__).__name__}),
                  flush=True)
            break
        print("acked " + json.dumps(dict(zip(paths, ids))), flush=True)
    for name in ("compact", "merge_small_segments"):
        store.merge_policy = MergePolicy(factor=2)
        try:
            getattr(store, name)()
            print(name + " done", flush=True)
        except StorageFullError as e:
            print(name + " full " + str(e.errno), flush=True)
    """
)


def test_a_full_disk_is_an_error_never_a_signal_and_loses_nothing(small_tmpfs):
    """Fill a small tmpfs with adds, several times (the disk fills during a segment file, the
    keypoints or the SQLite commit, wherever it happens to): every run ends with
    StorageFullError, not a signal, and leaves a valid index holding every acknowledged image
    and nothing else. Freeing space (a bigger tmpfs) makes the next add work."""
    causes = []
    for run, local_dtype in enumerate(["float16", "int8", "float16"]):
        root = small_tmpfs / f"ix{run}"
        IndexStore.create(root, manifest={}, global_dim=D, local_shape=(L, DL), local_dtype=local_dtype).close()
        child = subprocess.run([sys.executable, "-c", FILL_CHILD, str(root), str(run), REPO],
                               capture_output=True, text=True, timeout=120)
        assert child.returncode == 0, f"run {run}: exit {child.returncode} (a SIGBUS is -7)\n{child.stderr[-2000:]}"
        lines = child.stdout.splitlines()
        acked = {p: i for line in lines if line.startswith("acked ") for p, i in json.loads(line[6:]).items()}
        full = [json.loads(line[5:]) for line in lines if line.startswith("full ")]
        assert acked and len(full) == 1, child.stdout[-1000:]
        assert full[0]["errno"] == errno.ENOSPC
        assert full[0]["message"] == (f"no space left on device while writing the index at {root}: nothing was "
                                      f"added; free space and retry")
        causes.append(full[0]["cause"])
        assert [line.split()[0] for line in lines[-2:]] == ["compact", "merge_small_segments"], lines[-2:]
        with IndexStore.open(root) as store:
            assert store.check() == [], f"run {run}"
            assert {r.path: r.id for r in store.records()} == acked, f"run {run}: lost or unexpected images"
            info = store.info()
            assert info["orphan_segments"] == 0  # the failed write left no folder behind
            assert sorted(os.listdir(root / "segments")) == sorted(s["name"] for s in info["segments"])
        if run < 2:
            shutil.rmtree(root)  # room for the next run
    subprocess.run(["mount", "-o", f"remount,size={4 * TMPFS_MB}m", str(small_tmpfs)], check=True, timeout=30)
    with IndexStore.open(root) as store:
        rng = np.random.default_rng(7)
        store.add(["after.jpg"], ["x"], unit(1, D, rng), rng.standard_normal((1, L, DL)).astype(np.float16))
        assert store.check() == [] and len(store) == len(acked) + 1
    print("where the disk filled up:", causes)


def test_sqlite_full_is_storage_full_and_undone(tmp_path):
    """SQLite's "database or disk is full" (here: its page limit) is the same StorageFullError,
    after the segment written for the failed commit has been deleted."""
    rng = np.random.default_rng(0)
    store = IndexStore.create(tmp_path / "ix", manifest={}, global_dim=D, local_shape=(2, 8))
    store.add(["a.jpg"], ["x"], unit(1, D, rng), np.zeros((1, 2, 8), np.float16))
    conn = store._conn()  # the writer's connection (this thread's)
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    conn.execute(f"PRAGMA max_page_count = {pages}")  # the next page the commit needs is refused
    n = 200
    with pytest.raises(StorageFullError, match="while writing the index at .*: nothing was added") as caught:
        store.add([f"big/{i}" + "x" * 500 for i in range(n)], ["x"] * n, unit(n, D, rng),
                  np.zeros((n, 2, 8), np.float16))
    assert caught.value.errno == errno.ENOSPC and isinstance(caught.value.__cause__, sqlite3.OperationalError)
    assert len(store) == 1 and store.check() == [] and store.info()["orphan_segments"] == 0
    assert len(os.listdir(store.path / "segments")) == 1
    store.close()


FD_CHILD = textwrap.dedent(
    """
    import os, resource, sys
    sys.path.insert(0, sys.argv[4])
    import numpy as np
    from waldo.index import IndexCorruptError, IndexResourceError, IndexStore, npy_files
    if sys.argv[3] == "mapped":
        npy_files.MMAP_MIN_BYTES = 0  # map every file, as before: one descriptor per array
    resource.setrlimit(resource.RLIMIT_NOFILE, (int(sys.argv[2]), resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    try:
        with IndexStore.open(sys.argv[1]) as store:
            snap = store.snapshot()
            q = np.zeros((1, store.global_dim), np.float32)
            q[0, 0] = 1
            store.search(q, 5)
            store.local_descriptors(snap.ids[:3])
            print("ok", len(snap.segment_names), len(os.listdir("/proc/self/fd")), flush=True)
    except IndexResourceError as e:
        print("resource", e.errno, e, flush=True)
    except IndexCorruptError as e:
        print("corrupt", e, flush=True)
    """
)


def test_many_small_segments_need_no_file_descriptors_and_running_out_is_not_corruption(tmp_path):
    """300 one-image segments with keypoints are 1,200 files. With 128 descriptors allowed, the
    index opens and searches (small files are read, not mapped). Mapped one descriptor per file,
    as before, it cannot open: and says the process ran out of descriptors, never "corrupt"."""
    base = Path("/dev/shm") if Path("/dev/shm").is_dir() and os.access("/dev/shm", os.W_OK) else tmp_path
    root = base / f"waldo-fd-test-{os.getpid()}"
    try:
        rng = np.random.default_rng(1)
        with IndexStore.create(root, manifest={}, global_dim=16, local_shape=(2, 8)) as store:
            for i in range(300):
                kp = RaggedKeypoints(rng.random((3, 2), dtype=np.float32), np.zeros((3, 32), np.uint8),
                                     np.array([0, 3], np.int64))
                store.add([f"p{i}"], ["x"], unit(1, 16, rng), np.zeros((1, 2, 8), np.float16), verification=kp)
        limit = "128"
        read = subprocess.run([sys.executable, "-c", FD_CHILD, str(root), limit, "read", REPO],
                              capture_output=True, text=True, timeout=120)
        kind, segments, fds = read.stdout.split()[:3]
        assert (kind, segments) == ("ok", "300") and int(fds) < 64, read.stdout + read.stderr
        mapped = subprocess.run([sys.executable, "-c", FD_CHILD, str(root), limit, "mapped", REPO],
                                capture_output=True, text=True, timeout=120)
        assert mapped.stdout.startswith(f"resource {errno.EMFILE} the process ran out of file descriptors"), \
            mapped.stdout + mapped.stderr
        assert "ulimit -n" in mapped.stdout and "waldo index compact" in mapped.stdout
        assert "not damaged" in mapped.stdout and "corrupt" not in mapped.stdout
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_running_out_of_descriptors_while_opening_the_catalogue_is_not_corruption(tmp_path):
    IndexStore.create(tmp_path / "ix", manifest={}, global_dim=4, local_shape=(1, 4)).close()
    from waldo.index import IndexCorruptError, IndexResourceError

    held = []
    try:
        try:
            while True:
                held.append(os.open(os.devnull, os.O_RDONLY))
        except OSError as e:
            assert e.errno == errno.EMFILE
        for _free in range(3):  # none free, then one (the manifest opens), then two (not enough for SQLite)
            with pytest.raises(IndexResourceError, match="ran out of file descriptors") as caught:
                IndexStore.open(tmp_path / "ix")
            assert not isinstance(caught.value, IndexCorruptError) and caught.value.errno == errno.EMFILE
            os.close(held.pop())
    finally:
        for fd in held:
            os.close(fd)
    with IndexStore.open(tmp_path / "ix") as store:
        assert store.check() == []


def test_connections_of_ended_threads_are_closed(tmp_path):
    """A server's worker threads come and go: each retired thread's SQLite connection must be
    closed, not kept open for the life of the process (one fd leak per thread otherwise)."""
    import threading

    from waldo.index.db import ThreadConnections, connect, init_schema

    path = tmp_path / "c.sqlite"
    init_schema(connect(path))
    conns = ThreadConnections(path)
    fds = lambda: len(os.listdir("/proc/self/fd"))  # noqa: E731
    for _ in range(30):
        worker = threading.Thread(target=lambda: conns.get().execute("SELECT 1").fetchall())
        worker.start()
        worker.join()
    before = fds()
    for _ in range(30):
        worker = threading.Thread(target=lambda: conns.get().execute("SELECT 1").fetchall())
        worker.start()
        worker.join()
    assert conns.open_count() <= 2  # the last worker's, and none of the 59 ended ones
    assert fds() <= before + 2
    conns.close_all()
