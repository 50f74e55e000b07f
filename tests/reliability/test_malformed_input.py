"""Malformed input, short: benchmarks/malformed_corpus.py with 200 files instead of 1000.

Every mutation kind is in the corpus; each file goes through ``load_image``, ``Waldo.add`` and
``POST /search``. No stage may crash or answer 5xx, and every stage must agree with what the
file is: valid files decode (at the right size), invalid ones are refused with a clear message.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

_SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "malformed_corpus.py"


def _corpus_module():
    spec = importlib.util.spec_from_file_location("waldo_malformed_corpus", _SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def test_malformed_corpus_is_refused_or_processed_never_crashes(data_root, tmp_path):
    corpus = _corpus_module()
    sources = corpus.source_photos(data_root)
    report = corpus.run_corpus(tmp_path, 200, seed=11, sources=sources)
    problems = report.loader.problems + report.index.problems + report.search.problems
    assert report.files == 200 and set(report.kinds) == set(corpus.MUTATIONS)
    assert report.crashes == 0 and report.server_errors == 0, problems
    assert report.unexpected == 0, problems
    for stage in (report.loader, report.index, report.search):
        assert stage.processed + stage.refused == 200
        assert stage.processed >= report.expect["ok"] and stage.refused >= report.expect["refuse"]
    # 422 too: a service may answer it for what decodes but cannot be used (a 1-pixel strip)
    assert set(report.search.statuses) <= {"200", "400", "413", "415", "422"}
    assert {"413", "415", "400"} <= set(report.search.statuses)  # bombs, non-images and damage all seen


def test_the_corpus_is_never_written_into_the_repository():
    corpus = _corpus_module()
    inside = Path(__file__).resolve().parents[2] / "malformed-corpus-tmp"
    with pytest.raises(SystemExit):
        corpus.main(["--files", "1", "--workdir", str(inside)])
    assert not inside.exists()
