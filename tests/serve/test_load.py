"""The load test, short: 4 clients for 5 s against a live server while photos are added (and,
with churn, removed and re-posted while a probe checks every answer's snapshot)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from waldo.data.datasets import read_labels_csv

_SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "load_test.py"


def _load_test_module():
    spec = importlib.util.spec_from_file_location("waldo_load_test", _SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def test_concurrent_queries_and_adds(live_server, grocery_index, data_root):
    load_test = _load_test_module()
    queries = sorted(grocery_index.queries.values())
    adds = [Path(p) for p in read_labels_csv(data_root / "abo_sample").paths]
    report = load_test.run_load(live_server.url, queries, clients=4, seconds=5, add_photos=adds)
    print(report)
    assert report.server_errors == 0 and report.transport_errors == 0, (report, live_server.log_text()[-3000:])
    assert report.queries >= 4 and set(report.statuses) <= {"200", "add-201"}
    assert report.adds_acknowledged >= 1 and report.lost_adds == 0
    assert report.p95_ms >= report.p50_ms > 0


@pytest.mark.parametrize("url", ["http://10.0.0.1:8000", "http://example.com", "http://192.168.1.2"])
def test_refuses_targets_off_this_machine(url):
    with pytest.raises(ValueError, match="loopback"):
        _load_test_module().check_loopback(url)


def test_concurrent_queries_adds_and_removes_stay_consistent(live_server, grocery_dir):
    """--churn, short: 4 clients for 6 s while photos are added in pairs, copies removed and
    photos re-posted; a probe checks every answer against what was acknowledged before it."""
    load_test = _load_test_module()
    test_photos = sorted((grocery_dir / "dataset" / "test").rglob("*.jpg"))
    # Held-out photos of many classes (none is in the index): every add is new.
    adds = test_photos[7::97][:12]
    queries = test_photos[3::211]
    report = load_test.run_load(live_server.url, queries, clients=4, seconds=6, add_photos=adds, churn=True)
    print(report)
    assert report.server_errors == 0 and report.transport_errors == 0, (report, live_server.log_text()[-3000:])
    assert report.adds_acknowledged >= 2 and report.removes_acknowledged >= 1, report
    assert report.lost_adds == report.duplicated_adds == report.resurrected_images == 0, report
    assert report.snapshot_checks >= 3 and report.snapshot_violations == 0, report.violations
    assert {s for s in report.statuses if not s.startswith(("add-", "remove-", "repost-", "probe-"))} <= {"200"}


def test_the_snapshot_probe_flags_what_it_must():
    """The probe's rules on made-up answers: it would catch half an add, a lost add and a
    removal still returned (so the test above can fail)."""
    load_test = _load_test_module()
    churn = load_test._Churn("http://127.0.0.1:1", [], deadline=0.0, k=3)
    pair = load_test._Pair(b"photo", b"copy", added_at=1.0, ids=(7, 8))
    photo, copy = pair.stems

    def answer(*stems):
        return [{"rank": i + 1, "id": i, "score": 1.0 - i / 10, "path": f"/x/uploads/{s}.jpg"}
                for i, s in enumerate(stems)]

    churn._check(pair, answer(photo, copy, "other"), sent=2.0, added=1.0, removed=None)
    assert churn.violations == []
    churn._check(pair, answer(copy, "other", "more"), sent=2.0, added=None, removed=None)
    assert "half an add" in churn.violations[-1]
    churn._check(pair, answer("other", "more", "most"), sent=2.0, added=1.0, removed=None)
    assert "acknowledged add is not found" in churn.violations[-1]
    churn._check(pair, answer(photo, copy, "other"), sent=2.0, added=1.0, removed=1.5)
    assert "removal is still returned" in churn.violations[-1] and churn.resurrected == 1
    churn._check(pair, answer(photo, "other"), sent=2.0, added=1.0, removed=None)
    assert "ranks" in churn.violations[-1]
    assert churn.checks == 5 and len(churn.violations) == 4
