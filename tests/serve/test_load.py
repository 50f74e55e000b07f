"""The load test, short: 4 clients for 5 s against a live server while photos are added."""

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
