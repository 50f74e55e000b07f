"""Fixtures for the reliability tests: a small real grocery index, built once per session.

Tests that damage it (the crafted-pickle tests) or write to it (the API-key and fuzzing tests)
work on their own copy (``index_copy``).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis.configuration import set_hypothesis_home_dir

from waldo.api import Waldo
from waldo.data.datasets import read_labels_csv

# Hypothesis (here and inside schemathesis) caches under ./.hypothesis by default: keep that
# out of the working tree.
set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "waldo-hypothesis")

# Banana, Bravo orange juice, Oatly oat milk: three products that do not look alike.
CLASSES = ("6", "29", "45")
PER_CLASS = 3


@dataclass(frozen=True)
class SmallIndex:
    root: Path
    photos: list[Path]  # the indexed photos
    queries: list[Path]  # held-out test photos of the same classes


@pytest.fixture(scope="session")
def small_index(grocery_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> SmallIndex:
    records = read_labels_csv(grocery_dir).records
    photos, queries = [], []
    for identity in CLASSES:
        of_class = [r for r in records if r.identity == identity]
        photos += [Path(r.path) for r in of_class if r.attrs.get("split") == "train"][:PER_CLASS]
        queries += [Path(r.path) for r in of_class if r.attrs.get("split") == "test"][:1]
    root = tmp_path_factory.mktemp("reliability") / "index"
    # A random projection (no fitting pass) and the default verification keypoints, so that the
    # index has every kind of file an index can have.
    engine = Waldo.create(root, backbone="efficientnet_lite0", projection="random", progress=False)
    report = engine.add([str(p) for p in photos], progress=False, num_workers=0)
    assert len(report.added) == len(photos) and not report.errors
    engine.store.close()
    return SmallIndex(root, photos, queries)


@pytest.fixture
def index_copy(small_index: SmallIndex, tmp_path: Path) -> Callable[[], Path]:
    """``index_copy() -> Path``: a fresh private copy of the small index."""
    count = 0

    def copy() -> Path:
        nonlocal count
        count += 1
        target = tmp_path / f"index-{count}"
        shutil.copytree(small_index.root, target)
        return target

    return copy
