"""Waldo.add against other writers and the segment pile-up, on real photos: the final
"already indexed" decision is made under the write lock, and adds merge small segments."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from waldo.api import Waldo
from waldo.cli import main
from waldo.data.datasets import read_labels_csv
from waldo.index import MergePolicy


@pytest.fixture(scope="module")
def photos(grocery_dir) -> list[str]:
    records = [r for r in read_labels_csv(grocery_dir).records if r.attrs.get("kind") == "natural"]
    return [str(Path(r.path).resolve()) for r in records[::97][:16]]  # 16 different products


def test_a_path_another_writer_added_since_the_check_is_skipped_not_fatal(photos, tmp_path):
    """Waldo.add looks for already-indexed paths before extracting (to skip the work), but
    another writer can commit some of them before this add does. Simulated here by a check
    that saw nothing: the add still succeeds and reports those paths as already indexed."""
    engine = Waldo.create(tmp_path / "ix", projection="random", progress=False, gv_features=False)
    first = engine.add(photos[:4], progress=False, num_workers=0)
    assert len(first.added) == 4
    engine.store.contains_paths = lambda paths: [False] * len(paths)  # a check made before their commit
    report = engine.add(photos[2:7], progress=False, num_workers=0)
    assert len(report.added) == 3 and report.already_indexed == photos[2:4]
    assert len(engine) == 7 and sorted(r.path for r in engine.store.records()) == sorted(photos[:7])


def test_two_concurrent_index_adds_of_overlapping_photos_both_succeed(photos, tmp_path, capsys):
    """Two `waldo index add` runs at once, 8 photos each, 4 shared (issue 19: the loser used to
    exit 2 having added none of its photos). Threads of one process exclude each other on the
    write lock exactly as processes do, without loading torch twice."""
    root = tmp_path / "ix"
    Waldo.create(root, projection="random", progress=False).store.close()
    runs = [photos[:8], photos[4:12]]
    codes: list[int] = []
    start = threading.Barrier(2)

    def add(paths: list[str]) -> None:
        start.wait()
        codes.append(main(["index", "add", "--index", str(root), *paths, "--workers", "0", "--quiet"]))

    threads = [threading.Thread(target=add, args=(paths,)) for paths in runs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    out, err = capsys.readouterr()
    assert codes == [0, 0], err
    lines = sorted(line for line in out.splitlines() if line.startswith("added "))
    added = [int(line.split()[1]) for line in lines]
    already = [int(line.split("(")[1].split()[0]) for line in lines]
    assert sum(added) == 12 and sum(already) == 4, out
    engine = Waldo.open(root)
    assert sorted(r.path for r in engine.store.records()) == sorted(photos[:12])  # the union, each once
    assert engine.store.check() == []


def test_adds_merge_small_segments_unless_told_not_to(photos, tmp_path):
    engine = Waldo.create(tmp_path / "ix", projection="random", progress=False, gv_features=False)
    engine.store.merge_policy = MergePolicy(factor=2)
    for photo in photos[:4]:
        engine.add([photo], progress=False, num_workers=0, merge=False)
    assert len(engine.store.info()["segments"]) == 4 and engine.store.needs_merge()
    engine.add([photos[4]], progress=False, num_workers=0)  # merges after its commit
    assert not engine.store.needs_merge()
    assert len(engine.store.info()["segments"]) <= engine.store.merge_policy.bound(5)
    hits = engine.search(photos[1], k=1).hits
    assert hits[0].path == photos[1] and engine.store.check() == []
