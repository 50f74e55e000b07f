"""waldo.fsutil: the one module for durable writes, locks and file hashes."""

from __future__ import annotations

import hashlib
import threading
import time

import pytest

from waldo.fsutil import atomic_write_json, atomic_write_text, file_lock, sha256_file


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "sub" / "state.json"
    atomic_write_json(target, {"b": 1, "a": [1, 2]})
    assert target.read_text() == '{\n  "a": [\n    1,\n    2\n  ],\n  "b": 1\n}\n'
    with pytest.raises(ValueError):
        atomic_write_json(target, {"loss": float("nan")})  # not valid JSON: refused before writing
    with pytest.raises(TypeError):
        atomic_write_json(target, {"x": object()})
    assert target.read_text().startswith('{\n  "a"') and [p.name for p in target.parent.iterdir()] == ["state.json"]
    atomic_write_text(target, "new")
    assert target.read_text() == "new" and sha256_file(target) == hashlib.sha256(b"new").hexdigest()


def test_file_lock_excludes_threads_of_one_process(tmp_path):
    """Each holder opens its own file description, so flock serialises threads as well as
    processes (the index's writers and the uploads folder rely on it)."""
    events: list[tuple[str, int]] = []

    def hold(n: int) -> None:
        with file_lock(tmp_path / "locks" / "write.lock"):
            events.append(("in", n))
            time.sleep(0.05)
            events.append(("out", n))

    threads = [threading.Thread(target=hold, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [kind for kind, _ in events] == ["in", "out"] * 4
    assert all(events[i][1] == events[i + 1][1] for i in range(0, 8, 2))
