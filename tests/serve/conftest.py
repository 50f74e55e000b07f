"""Fixtures for the service tests: a small real grocery index, and a live ``waldo serve``.

The index (the train photos of a few visually distinct grocery classes) is built once per
session and copied for each consumer that changes it: the API tests remove grocery images.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from waldo.api import Waldo
from waldo.data.datasets import read_labels_csv
from waldo.serve.process import ServerProcess, start_server

# Banana, Bravo orange juice, Pineapple, Oatly oat milk, Carrots: fruit, a carton, a packet and
# a vegetable, so "the same product" is unambiguous to check.
CLASSES = ("6", "29", "23", "45", "62")
PER_CLASS = 10
QUERY_INDEX = 2


@dataclass(frozen=True)
class GroceryIndex:
    root: Path
    queries: dict[str, Path]  # instance_id -> a held-out test photo of that class
    labels: dict[str, str]  # instance_id -> class_name


@pytest.fixture(scope="session")
def grocery_index(grocery_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> GroceryIndex:
    photos = read_labels_csv(grocery_dir)
    chosen, queries, labels = [], {}, {}
    for identity in CLASSES:
        of_class = [r for r in photos.records if r.identity == identity]
        chosen += [r for r in of_class if r.attrs.get("split") == "train"][:PER_CLASS]
        # A fixed held-out photo (the third test photo: the first few of a class are often
        # shot from unusual angles); the untrained model finds its class with this index.
        queries[identity] = Path([r.path for r in of_class if r.attrs.get("split") == "test"][QUERY_INDEX])
        labels[identity] = of_class[0].attrs["class_name"]
    root = tmp_path_factory.mktemp("serve") / "grocery-index"
    paths = [r.path for r in chosen]
    # A random projection: no fitting pass, so the fixture extracts each photo once.
    engine = Waldo.create(root, backbone="efficientnet_lite0", projection="random", progress=False)
    report = engine.add(paths, [r.identity for r in chosen], [dict(r.attrs) for r in chosen],
                        progress=False, num_workers=0)
    assert len(report.added) == len(chosen) and not report.errors
    engine.store.close()
    return GroceryIndex(root, queries, labels)


@pytest.fixture(scope="session")
def default_rrt_index(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """A small index whose reranker folder stores a default chosen on validation: a (random,
    tiny) RRT beside a 64-pixel model, ``rrt.json``'s training naming ``rrt-fusion``, keypoints
    for gv, and 8 abo_sample photos (returned with the index folder). Copy it before changing it."""
    import torch

    from waldo.models.untrained import untrained_model
    from waldo.rerank import RerankingTransformer, RRTConfig, save_reranker

    folder = tmp_path_factory.mktemp("default-rrt")
    model, config = untrained_model("efficientnet_lite0", dim=32, projection="random", image_size=64, progress=False)
    torch.manual_seed(0)
    rrt = RerankingTransformer(RRTConfig(d_model=32, n_layers=1, n_heads=4, ff_dim=32))
    save_reranker(folder / "reranker", model, config, rrt, grid=(2, 2),
                  training={"fusion_weight": 0.5, "default_reranker": "rrt-fusion"})
    images = read_labels_csv(data_root / "abo_sample")
    engine = Waldo.create(folder / "index", model_dir=folder / "reranker", progress=False)
    engine.add(images.paths[:8], images.identities[:8], num_workers=0, progress=False)
    engine.store.close()
    return folder / "index", images.paths[:8]


@pytest.fixture(scope="session")
def live_server(grocery_index: GroceryIndex, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A live ``waldo serve`` over a private copy of the grocery index, shared by the browser
    and load tests (the load test only adds non-grocery photos, so the browser's query still
    finds its product first)."""
    folder = tmp_path_factory.mktemp("live")
    index = folder / "index"
    shutil.copytree(grocery_index.root, index)
    with start_server(index, folder / "server.log") as server:
        yield server


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    """Where tests leave files for people to look at (screenshots): $WALDO_TEST_ARTIFACTS or
    tests/artifacts/ (git-ignored)."""
    folder = Path(os.environ.get("WALDO_TEST_ARTIFACTS") or Path(__file__).resolve().parents[1] / "artifacts")
    folder.mkdir(parents=True, exist_ok=True)
    return folder
