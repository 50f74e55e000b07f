"""Stored uploads that no indexed image names are deleted at start-up, never while a writer
(in this process or another) is between storing its file and committing its add."""

from __future__ import annotations

import multiprocessing
import threading
import time
from pathlib import Path

import pytest

from waldo.serve.uploads import LOCK_NAME, clean_orphan_uploads, uploads_lock

pytestmark = pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="flock/fork are POSIX")


def _files(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir() if p.name != LOCK_NAME}


def test_files_no_live_row_names_and_temporaries_are_deleted(tmp_path):
    uploads = tmp_path / "uploads"
    uploads.mkdir()
    for name in ("live.jpg", "orphan.png", ".orphan.png.abc123.tmp"):
        (uploads / name).write_bytes(b"x")
    live = {str(uploads / "live.jpg")}
    asked: list[str] = []

    def is_live(paths):
        asked.extend(paths)
        return [p in live for p in paths]

    removed = clean_orphan_uploads(uploads, is_live)
    assert sorted(p.name for p in removed) == [".orphan.png.abc123.tmp", "orphan.png"]
    assert _files(uploads) == {"live.jpg"}
    assert str(uploads / LOCK_NAME) not in asked  # the lock file is never taken for an upload
    assert clean_orphan_uploads(uploads, is_live) == []  # nothing left to do
    assert clean_orphan_uploads(tmp_path / "absent", is_live) == []


def test_clean_up_waits_for_a_writer_in_this_process(tmp_path):
    uploads = tmp_path / "uploads"
    committed: set[str] = set()
    stored = threading.Event()
    finished: list[list[Path]] = []

    def writer():
        with uploads_lock(uploads):
            (uploads / "new.jpg").write_bytes(b"x")  # stored, not yet committed
            stored.set()
            time.sleep(0.5)
            committed.add(str(uploads / "new.jpg"))

    thread = threading.Thread(target=writer)
    thread.start()
    stored.wait(5)
    finished.append(clean_orphan_uploads(uploads, lambda paths: [p in committed for p in paths]))
    thread.join()
    assert finished == [[]] and _files(uploads) == {"new.jpg"}


def _hold_lock_then_commit(folder: str, ready, release) -> None:
    with uploads_lock(Path(folder)):
        (Path(folder) / "pending.jpg").write_bytes(b"x")
        ready.set()
        release.wait(10)


def test_clean_up_waits_for_a_writer_in_another_process_and_a_killed_one_frees_the_lock(tmp_path):
    uploads = tmp_path / "uploads"
    context = multiprocessing.get_context("fork")
    ready, release = context.Event(), context.Event()
    process = context.Process(target=_hold_lock_then_commit, args=(str(uploads), ready, release))
    process.start()
    assert ready.wait(10)
    result: list[list[Path]] = []
    cleaner = threading.Thread(target=lambda: result.append(clean_orphan_uploads(uploads, lambda p: [False] * len(p))))
    cleaner.start()
    cleaner.join(0.5)
    assert cleaner.is_alive() and _files(uploads) == {"pending.jpg"}  # blocked while the writer holds the lock
    process.kill()  # SIGKILL mid-add: the kernel drops the flock with the process
    process.join(10)
    cleaner.join(10)
    assert not cleaner.is_alive()
    assert [p.name for p in result[0]] == ["pending.jpg"] and _files(uploads) == set()
