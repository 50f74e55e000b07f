"""The default reranker: the one RRT training chose on validation (``rrt.json``'s
``training["default_reranker"]``) runs when a request names none, through the API, the CLI and
HTTP; an explicit "none" stays the global ranking; a missing, unknown or unavailable default is
"none"; a stored chain (``default_fallbacks``) runs the first choice the index offers; and a
default withdrawn at the service's warm-up falls back along the chain, then to "none"."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from waldo.api import MODEL_FOLDER, Waldo
from waldo.cli import main
from waldo.serve import ServeSettings, create_app
from waldo.serve.service import SearchService

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
DEFAULT = "rrt-fusion"


def _ranking(hits) -> list[tuple[int, float]]:
    return [(hit.id, round(hit.score, 4)) for hit in hits]


def _json_ranking(hits: list[dict]) -> list[tuple[int, float]]:
    return [(hit["id"], round(hit["score"], 4)) for hit in hits]


def _copy_with_training(index: Path, tmp_path: Path, change) -> Path:
    """A copy of ``index`` whose ``rrt.json`` training section went through ``change``."""
    root = tmp_path / "index"
    shutil.copytree(index, root)
    path = root / MODEL_FOLDER / "rrt.json"
    info = json.loads(path.read_text())
    change(info["training"])
    path.write_text(json.dumps(info))
    return root


@pytest.fixture(scope="module")
def rankings(default_rrt_index) -> dict[str, list[tuple[int, float]]]:
    """The query's top 5 under each explicit mode, to tell which one a default ran."""
    root, paths = default_rrt_index
    engine = Waldo.open(root)
    found = {mode: _ranking(engine.search(paths[0], k=5, rerank=mode).hits) for mode in ("none", "rrt", DEFAULT)}
    # The modes must be told apart by their rankings, or the tests below prove nothing.
    assert found[DEFAULT] != found["none"] and found[DEFAULT] != found["rrt"]
    return found


def test_api_searches_with_the_stored_default(default_rrt_index, rankings):
    root, paths = default_rrt_index
    engine = Waldo.open(root)
    assert engine.stored_default_reranker == DEFAULT and engine.default_reranker == DEFAULT
    outcome = engine.search(paths[0], k=5)
    assert outcome.rerank == DEFAULT and _ranking(outcome.hits) == rankings[DEFAULT]
    assert len(outcome.global_hits) == 8  # the reranker's candidates, not just the top k
    explicit = engine.search(paths[0], k=5, rerank="none")
    assert explicit.rerank == "none" and _ranking(explicit.hits) == rankings["none"]
    other = engine.search(paths[0], k=5, rerank="rrt")
    assert other.rerank == "rrt" and _ranking(other.hits) == rankings["rrt"]


@pytest.mark.parametrize("case", ["missing key", "unknown name", "not offered"])
def test_no_usable_stored_default_means_none(default_rrt_index, rankings, tmp_path, case):
    root, paths = default_rrt_index
    if case == "missing key":  # an rrt.json from before training chose a default
        root = _copy_with_training(root, tmp_path, lambda training: training.pop("default_reranker"))
        stored = None
    elif case == "unknown name":
        root = _copy_with_training(root, tmp_path, lambda training: training.update(default_reranker="bogus"))
        stored = "bogus"
    else:  # the RRT weights are gone: the index offers no RRT reranker, whatever rrt.json says
        shutil.copytree(root, tmp_path / "index")
        root = tmp_path / "index"
        (root / MODEL_FOLDER / "rrt.safetensors").unlink()
        stored = DEFAULT
    engine = Waldo.open(root)
    assert engine.stored_default_reranker == stored
    assert engine.default_reranker == "none"
    outcome = engine.search(paths[0], k=5)
    assert outcome.rerank == "none" and _ranking(outcome.hits) == rankings["none"]


def test_no_reranker_folder_means_none(tmp_path, default_rrt_index, rankings):
    root, paths = default_rrt_index
    shutil.copytree(root, tmp_path / "index")
    for name in ("rrt.json", "rrt.safetensors"):
        (tmp_path / "index" / MODEL_FOLDER / name).unlink()
    engine = Waldo.open(tmp_path / "index")
    assert engine.stored_default_reranker is None and engine.default_reranker == "none"
    assert engine.search(paths[0], k=5).rerank == "none"


def test_cli_search_uses_the_default_and_says_which_ran(default_rrt_index, rankings, capsys):
    root, paths = default_rrt_index
    assert main(["search", paths[0], "--index", str(root), "-k", "5", "--json"]) == 0
    captured = capsys.readouterr()
    assert _json_ranking(json.loads(captured.out)["results"]) == rankings[DEFAULT]
    assert f"rerank: {DEFAULT}" in captured.err
    assert main(["search", paths[0], "--index", str(root), "-k", "5", "--rerank", "none", "--json"]) == 0
    captured = capsys.readouterr()
    assert _json_ranking(json.loads(captured.out)["results"]) == rankings["none"] and "rerank: none" in captured.err
    assert main(["search", paths[0], "--index", str(root), "-k", "5"]) == 0
    assert f"rerank {DEFAULT} " in capsys.readouterr().out.splitlines()[0]


def test_http_search_without_rerank_runs_the_default(default_rrt_index, rankings):
    root, paths = default_rrt_index
    query = {"image": ("q.jpg", Path(paths[0]).read_bytes())}
    with TestClient(create_app(root, ServeSettings(compile_rrt=False))) as client:
        stats = client.get("/stats").json()
        assert stats["default_reranker"] == DEFAULT and stats["default_reranker_source"] == "validation"
        assert DEFAULT in stats["rerankers"]
        body = client.post("/search", params={"k": 5}, files=query).json()
        assert body["rerank"] == DEFAULT and _json_ranking(body["results"]) == rankings[DEFAULT]
        body = client.post("/search", params={"k": 5, "rerank": "none"}, files=query).json()
        assert body["rerank"] == "none" and _json_ranking(body["results"]) == rankings["none"]
        body = client.post("/search", params={"k": 5, "rerank": "rrt"}, files=query).json()
        assert body["rerank"] == "rrt" and _json_ranking(body["results"]) == rankings["rrt"]
        # The latency counters are kept under the reranker that ran.
        latency = client.get("/stats").json()["query_latency"]
        assert latency[DEFAULT]["n"] == 1 and latency["none"]["n"] == 1
        schema = client.get("/openapi.json").json()
        rerank = next(p for p in schema["paths"]["/search"]["post"]["parameters"] if p["name"] == "rerank")
        assert not rerank["required"] and "default" in rerank["description"]


def test_http_without_a_stored_default_stays_global(default_rrt_index, rankings, tmp_path):
    root, paths = default_rrt_index
    root = _copy_with_training(root, tmp_path, lambda training: training.pop("default_reranker"))
    with TestClient(create_app(root, ServeSettings(compile_rrt=False))) as client:
        stats = client.get("/stats").json()
        assert stats["default_reranker"] == "none" and stats["default_reranker_source"] == "fallback"
        body = client.post("/search", params={"k": 5}, files={"image": ("q.jpg", Path(paths[0]).read_bytes())}).json()
        assert body["rerank"] == "none" and _json_ranking(body["results"]) == rankings["none"]


def test_a_default_withdrawn_at_warm_up_falls_back_to_none(default_rrt_index, rankings):
    root, paths = default_rrt_index
    engine = Waldo.open(root)
    service = SearchService(engine, ServeSettings(compile_rrt=False))
    assert service.default_reranker == DEFAULT

    def failing(image, k=10, rerank=None):
        if rerank == DEFAULT:
            raise RuntimeError("this reranker cannot run here")
        return Waldo.search(engine, image, k, rerank)

    engine.search = failing  # this engine only, for the warm-up
    service.warm_up()
    del engine.search
    assert DEFAULT not in service.rerankers and "rrt" in service.rerankers
    assert service.default_reranker == "none"
    stats = service.stats()
    assert stats["default_reranker"] == "none" and stats["default_reranker_source"] == "fallback"
    answer = service.search(Path(paths[0]).read_bytes(), "q.jpg", 5)
    assert answer.rerank == "none" and _json_ranking(answer.model_dump()["results"]) == rankings["none"]


def test_a_chain_runs_the_first_choice_the_index_offers(default_rrt_index, rankings, tmp_path):
    """``training["default_fallbacks"]``: the validated choices for an index that cannot offer
    the first (make demo's model: rrt-consensus+gv, then rrt-consensus where no keypoints)."""
    root, paths = default_rrt_index
    root = _copy_with_training(root, tmp_path, lambda training: training.update(
        default_reranker="local-match", default_fallbacks=["bogus", DEFAULT, "rrt"]))
    engine = Waldo.open(root)
    assert "local-match" not in engine.available_rerankers()  # registered, but this index has no finer cells
    assert engine.default_chain == ("local-match", "bogus", DEFAULT, "rrt")
    assert engine.stored_default_reranker == DEFAULT and engine.default_reranker == DEFAULT
    outcome = engine.search(paths[0], k=5)
    assert outcome.rerank == DEFAULT and _ranking(outcome.hits) == rankings[DEFAULT]
    with TestClient(create_app(root, ServeSettings(compile_rrt=False))) as client:
        stats = client.get("/stats").json()
        assert stats["default_reranker"] == DEFAULT and stats["default_reranker_source"] == "validation"
    assert main(["search", paths[0], "--index", str(root), "-k", "5", "--json"]) == 0


@pytest.mark.parametrize("fallbacks", ["rrt", [3, None], None])
def test_malformed_fallbacks_are_ignored(default_rrt_index, tmp_path, fallbacks):
    root, _ = default_rrt_index
    root = _copy_with_training(root, tmp_path, lambda training: training.update(default_fallbacks=fallbacks))
    engine = Waldo.open(root)
    assert engine.default_chain == (DEFAULT,) and engine.default_reranker == DEFAULT


def test_a_default_withdrawn_at_warm_up_falls_back_along_the_chain(default_rrt_index, rankings, tmp_path):
    root, paths = default_rrt_index
    root = _copy_with_training(root, tmp_path, lambda training: training.update(default_fallbacks=["rrt"]))
    engine = Waldo.open(root)
    service = SearchService(engine, ServeSettings(compile_rrt=False))

    def failing(image, k=10, rerank=None):
        if rerank == DEFAULT:
            raise RuntimeError("this reranker cannot run here")
        return Waldo.search(engine, image, k, rerank)

    engine.search = failing
    service.warm_up()
    del engine.search
    assert DEFAULT not in service.rerankers and service.default_reranker == "rrt"
    stats = service.stats()
    assert stats["default_reranker"] == "rrt" and stats["default_reranker_source"] == "validation"
    answer = service.search(Path(paths[0]).read_bytes(), "q.jpg", 5)
    assert answer.rerank == "rrt" and _json_ranking(answer.model_dump()["results"]) == rankings["rrt"]
