"""Crash consistency, short: benchmarks/crash_kill.py with 5 SIGKILLs instead of 100.

Three kills of ``waldo index add`` (the last one as soon as its new segment folder appears,
inside its commit) and two of ``waldo serve`` while a client adds and removes photos; after each, the index must open, pass ``waldo index check``, answer a query with an
indexed photo, and hold exactly the acknowledged images; one more server start deletes the
upload files that no indexed image names.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

_SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "crash_kill.py"


def _crash_kill_module():
    spec = importlib.util.spec_from_file_location("waldo_crash_kill", _SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def test_sigkilled_writers_lose_nothing_acknowledged(grocery_dir, tmp_path):
    crash = _crash_kill_module()
    report = crash.run_crash_kill(tmp_path, cli_kills=3, commit_kills=1, server_kills=2, seed=8,
                                  server_window=4.0, grocery=grocery_dir)
    cli, server = report.modes
    failures = cli.failures + server.failures
    assert (cli.kills, server.kills) == (3, 2), failures
    assert report.survived == report.kills == 5, failures
    for mode in report.modes:
        assert mode.lost_images == mode.unexpected_images == mode.partial_operations == 0, failures
        assert mode.corrupt_opens == mode.failed_checks == mode.failed_queries == mode.writer_errors == 0, failures
        assert mode.inflight_committed + mode.inflight_not_committed == mode.kills
    # A kill landed inside a commit (rows written, not committed) and the index survived it.
    assert cli.kills_mid_commit >= 1, failures
    # The server acknowledged adds, so "nothing lost" was tested on real adds (and removes); the
    # index holds the 8 starting photos and every acknowledged add not removed since.
    assert server.images_acknowledged >= 1
    acknowledged = 8 + cli.images_acknowledged + server.images_acknowledged - server.removes_acknowledged
    assert report.images_in_index >= acknowledged
    # Files of adds the kills cut short are deleted when the server starts again, all of them.
    assert server.orphan_uploads_cleaned == server.leftover_before_restart, failures
    assert server.leftover_upload_files == 0, failures
