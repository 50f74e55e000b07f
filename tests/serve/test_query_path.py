"""One query, once through: every front end (API, CLI, HTTP) decodes the query once and searches
the index once, renders the same hits, and offers exactly the rerankers the registry lists."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

import waldo.api
import waldo.serve.uploads
from waldo.api import Waldo
from waldo.cli import main
from waldo.data.datasets import read_labels_csv
from waldo.index.snapshot import Snapshot
from waldo.index.store import IndexStore
from waldo.rerank import RERANKERS, RerankCandidates, RerankQuery, RerankResult
from waldo.serve import ServeSettings, create_app

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
MODES = ("none", "gv", "rrt", "rrt+gv")


@pytest.fixture(scope="module")
def index(data_root, tmp_path_factory) -> tuple[Path, list[str]]:
    """A small index that supports every reranker: keypoints, and a (random, tiny) RRT beside
    a 64-pixel model."""
    from waldo.models.untrained import untrained_model
    from waldo.rerank import RerankingTransformer, RRTConfig, save_reranker

    folder = tmp_path_factory.mktemp("query-path")
    model, config = untrained_model("efficientnet_lite0", dim=32, projection="random", image_size=64, progress=False)
    torch.manual_seed(0)
    rrt = RerankingTransformer(RRTConfig(d_model=32, n_layers=1, n_heads=4, ff_dim=32))
    save_reranker(folder / "reranker", model, config, rrt, grid=(2, 2), training={"fusion_weight": 0.5})
    images = read_labels_csv(data_root / "abo_sample")
    engine = Waldo.create(folder / "index", model_dir=folder / "reranker", progress=False)
    engine.add(images.paths[:8], images.identities[:8], num_workers=0, progress=False)
    engine.store.close()
    return folder / "index", images.paths[:8]


@pytest.fixture
def counted(monkeypatch) -> Counter:
    """Counts image decodes (the upload check's and the engine's), kNN searches and metadata reads."""
    calls: Counter = Counter()

    def counting(name: str, function):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return function(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(waldo.api, "load_image", counting("decode", waldo.api.load_image))
    monkeypatch.setattr(waldo.serve.uploads, "load_image", counting("decode", waldo.serve.uploads.load_image))
    monkeypatch.setattr(Snapshot, "search", counting("knn", Snapshot.search))
    monkeypatch.setattr(IndexStore, "records", counting("records", IndexStore.records))
    return calls


@pytest.fixture(scope="module")
def client(index):
    with TestClient(create_app(index[0], ServeSettings(compile_rrt=False))) as client:
        yield client


@pytest.mark.parametrize("mode", MODES)
def test_one_decode_one_knn_one_metadata_read_per_request(index, client, counted, capsys, mode):
    root, paths = index
    engine = Waldo.open(root)
    counted.clear()
    outcome = engine.search(paths[0], k=3, rerank=mode)
    assert counted == {"decode": 1, "knn": 1, "records": 1}, "API"
    assert {"decode", "extract", "search", "rerank"} <= outcome.timings_ms.keys()
    assert len(outcome.hits) == 3 and len(outcome.global_hits) == (3 if mode == "none" else 8)
    counted.clear()
    assert main(["search", paths[0], "--index", str(root), "-k", "3", "--rerank", mode, "--json"]) == 0
    assert counted == {"decode": 1, "knn": 1, "records": 1}, "CLI"
    printed = json.loads(capsys.readouterr().out)["results"]  # the CLI prints POST /search's whole body
    counted.clear()
    response = client.post("/search", params={"k": 3, "rerank": mode},
                           files={"image": ("q.jpg", Path(paths[0]).read_bytes())})
    assert response.status_code == 200, response.text
    assert counted == {"decode": 1, "knn": 1, "records": 1}, "POST /search"
    # `waldo search --json` prints what the service answers under "results".
    served = response.json()["results"]
    assert [sorted(hit) for hit in printed] == [sorted(hit) for hit in served]
    for cli_hit, http_hit in zip(printed, served):
        # The one difference: the service names files relative to the collection (never the
        # server's absolute path); the CLI, run by the machine's own user, prints them whole.
        assert cli_hit["path"].endswith("/" + http_hit["path"]) and not http_hit["path"].startswith("/")
        same = {"score": 0, "global_score": 0, "path": ""}
        assert {**cli_hit, **same} == {**http_hit, **same}
        assert cli_hit["score"] == pytest.approx(http_hit["score"], abs=1e-4)


class _Reverse:
    """A toy reranker: the global order, backwards."""

    name = "toy-reverse"

    def rerank(self, query: RerankQuery, candidates: RerankCandidates) -> RerankResult:
        order = np.arange(len(candidates))[::-1].copy()
        return RerankResult(order, np.arange(len(candidates), 0, -1).astype(np.float32))


def test_a_reranker_registered_anywhere_is_offered_everywhere(index, monkeypatch, capsys):
    monkeypatch.setattr(RERANKERS, "_specs", dict(RERANKERS._specs))  # restored after the test
    RERANKERS.register("toy-reverse", description="the global order, backwards")(lambda setup: _Reverse())
    with pytest.raises(SystemExit):
        main(["search", "--help"])
    assert "toy-reverse: the global order, backwards" in " ".join(capsys.readouterr().out.split())
    root, paths = index
    assert "toy-reverse" in Waldo.open(root).available_rerankers()
    with TestClient(create_app(root, ServeSettings(compile_rrt=False))) as client:
        stats = client.get("/stats").json()
        assert "toy-reverse" in stats["rerankers"]
        assert stats["reranker_info"]["toy-reverse"]["description"] == "the global order, backwards"
        body = client.post("/search", params={"k": 8, "rerank": "toy-reverse"},
                           files={"image": ("q.jpg", Path(paths[0]).read_bytes())}).json()
        assert [hit["rank_before_rerank"] for hit in body["results"]] == list(range(8, 0, -1))
        # The page builds its ranking buttons from /stats and names no reranker itself.
        script = client.get("/static/app.js").text
        assert 'fetch("/stats")' in script and "renderModes(rerankers)" in script
        assert not [name for name in RERANKERS.names() if f'"{name}"' in script or f"'{name}'" in script]
