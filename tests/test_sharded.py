"""A sharded index searched as one (waldo/sharded.py): the same global top-k as a single index
built with the same model, add and remove routed to the owning shard, reshard without extracting
again, and the command line on both kinds of index."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from waldo.api import Waldo
from waldo.cli import EXIT_USAGE, main
from waldo.data.datasets import read_labels_csv
from waldo.index import IndexStore, RaggedKeypoints, UnknownIdError
from waldo.index.shards import is_sharded, read_layout, shard_of, split_id
from waldo.models.checkpoint import save_model
from waldo.models.descriptor import DescriptorModel
from waldo.rerank import RERANKERS, RerankCandidates, RerankQuery, RerankResult
from waldo.sharded import ShardedWaldo, check_sharded, open_index, reshard

CLASSES = ("6", "29", "23", "45", "62", "0", "12", "33")  # 8 grocery products, 5 photos each
PER_CLASS = 5
SHARDS = 3
K = 10


def _ranking(outcome) -> list[tuple[str, float]]:
    return [(hit.path, hit.score) for hit in outcome.hits]


@pytest.fixture(scope="module")
def grocery(grocery_dir, tmp_path_factory):
    """A tiny model (64 px, random projection), ~40 grocery photos indexed into a single index
    and into a 3-shard index with that model (no keypoints), and a few held-out queries."""
    from waldo.models.untrained import untrained_model

    photos = read_labels_csv(grocery_dir)
    chosen, queries = [], []
    for identity in CLASSES:
        of_class = [r for r in photos.records if r.identity == identity]
        chosen += [r for r in of_class if r.attrs.get("split") == "train"][:PER_CLASS]
        queries.append([r.path for r in of_class if r.attrs.get("split") == "test"][0])
    folder = tmp_path_factory.mktemp("sharded")
    model, config = untrained_model("efficientnet_lite0", dim=32, projection="random", image_size=64, progress=False)
    save_model(model, config, folder / "model")
    paths, identities = [r.path for r in chosen], [r.identity for r in chosen]
    attrs = [dict(r.attrs) for r in chosen]
    single = Waldo.create(folder / "single", model_dir=folder / "model", gv_features=False, progress=False)
    single.add(paths, identities, attrs, num_workers=0, progress=False)
    sharded = ShardedWaldo.create(folder / "sharded", shards=SHARDS, model_dir=folder / "model", gv_features=False,
                                  progress=False)
    report = sharded.add(paths, identities, attrs, num_workers=0, progress=False)
    return {"folder": folder, "single": single, "sharded": sharded, "report": report, "paths": paths,
            "queries": queries[:3]}


def test_sharded_global_top_k_is_exactly_the_single_index_top_k(grocery):
    single, sharded = grocery["single"], grocery["sharded"]
    assert len(single) == len(sharded) == len(grocery["paths"]) == 40
    for query in grocery["queries"]:
        one, many = single.search(query, k=K, rerank="none"), sharded.search(query, k=K, rerank="none")
        assert _ranking(many) == _ranking(one)  # same paths, same float scores, same order
        assert [h.rank for h in many.hits] == list(range(1, K + 1))
        assert [(h.path, h.global_score) for h in many.global_hits] == [(h.path, h.global_score) for h in one.global_hits]
        # Each id names the shard that holds the image, and ids are unique across shards.
        for hit in many.hits:
            shard, local_id = split_id(hit.id, SHARDS)
            assert shard == shard_of(hit.path, SHARDS)
            assert sharded.shards[shard].store.get(local_id).path == hit.path
        assert len({h.id for h in many.hits}) == K
        assert {"decode", "extract", "search", "rerank"} <= many.timings_ms.keys()


class _LeastSimilarFirst:
    """A toy reranker whose score belongs to each candidate alone (minus its similarity), so a
    merge by score must reproduce a single index's order."""

    name = "toy-least-similar"

    def rerank(self, query: RerankQuery, candidates: RerankCandidates) -> RerankResult:
        scores = -np.asarray(candidates.global_scores, np.float32)
        order = np.argsort(-scores, kind="stable")
        return RerankResult(order, scores[order])


def test_each_shard_reranks_its_own_candidates_and_the_merge_follows_the_reranker_score(grocery, monkeypatch):
    monkeypatch.setattr(RERANKERS, "_specs", dict(RERANKERS._specs))  # restored after the test
    built = []
    RERANKERS.register("toy-least-similar", description="least similar first")(
        lambda setup: built.append(setup.folder) or _LeastSimilarFirst())
    single, sharded = grocery["single"], grocery["sharded"]
    assert "toy-least-similar" in sharded.available_rerankers()
    query = grocery["queries"][0]
    # 40 images: every shard's top-100 holds all it has, as the single index's does, so the lists agree.
    one, many = single.search(query, k=K, rerank="toy-least-similar"), sharded.search(query, k=K,
                                                                                     rerank="toy-least-similar")
    assert many.rerank == "toy-least-similar" and len(built) == 2  # one for the single index, one for all shards
    assert _ranking(many) == _ranking(one)
    assert [h.rank_before_rerank for h in many.hits] == [h.rank_before_rerank for h in one.hits]
    assert [h.score for h in many.hits] == sorted((h.score for h in many.hits), reverse=True)
    assert len(many.global_hits) == len(one.global_hits) == 40
    with pytest.raises(ValueError, match="cannot rerank with 'gv'"):  # no keypoints stored: fails before work
        sharded.search(b"not even an image", k=K, rerank="gv")


def test_add_routes_each_image_to_the_shard_of_its_path(grocery):
    sharded, report = grocery["sharded"], grocery["report"]
    paths = [str(Path(p).resolve()) for p in grocery["paths"]]
    assert len(report.added) == len(paths) and not report.errors and not report.already_indexed
    for path, image_id in zip(paths, report.added):  # ids in input order
        shard, local_id = split_id(image_id, SHARDS)
        assert shard == shard_of(path, SHARDS) and sharded.shards[shard].store.get(local_id).path == path
    stored = [{r.path for r in shard.store.records()} for shard in sharded.shards]
    for i, held in enumerate(stored):
        assert held and all(shard_of(p, SHARDS) == i for p in held)
    assert set().union(*stored) == set(paths)
    again = sharded.add(grocery["paths"][:5], num_workers=0, progress=False)
    assert again.added == [] and len(again.already_indexed) == 5


def test_remove_by_a_hit_id_removes_it_from_its_shard(grocery, tmp_path):
    shutil.copytree(grocery["sharded"].root, tmp_path / "copy")
    engine = ShardedWaldo.open(tmp_path / "copy")
    query = grocery["queries"][1]
    hit = engine.search(query, k=3, rerank="none").hits[1]
    shard, local_id = split_id(hit.id, SHARDS)
    before = len(engine.shards[shard])
    other = engine.search(query, k=3, rerank="none").hits[2]
    with pytest.raises(UnknownIdError) as caught:  # one unknown id: nothing is removed
        engine.remove(ids=[other.id, 10**6 * SHARDS + shard])
    assert caught.value.missing == [10**6 * SHARDS + shard] and len(engine) == 40
    assert engine.remove(ids=[hit.id]) == 1
    assert len(engine.shards[shard]) == before - 1 and len(engine) == 39
    assert hit.path not in {r.path for r in engine.shards[shard].store.records()}
    assert hit.path not in [h.path for h in engine.search(query, k=K, rerank="none").hits]
    assert engine.remove(paths=[other.path]) == 1 and len(engine) == 38


def test_waldo_serve_serves_a_sharded_index_in_one_process(grocery, tmp_path):
    """The service on a sharded index (engine "local"): searches give ShardedWaldo's answer,
    an upload is stored by the shard that owns its path, a delete goes to the shard its id names."""
    from fastapi.testclient import TestClient

    from waldo.serve import ServeSettings, create_app

    shutil.copytree(grocery["sharded"].root, tmp_path / "copy")
    query = grocery["queries"][0]
    from waldo.data.images import load_image
    from waldo.serve.service import _query_max_side

    # The service decodes a query no larger than the model needs: the same decode here.
    picture = load_image(query, max_side=_query_max_side(grocery["sharded"]))
    expected = grocery["sharded"].search(picture, k=K, rerank="none")
    with TestClient(create_app(tmp_path / "copy", ServeSettings(compile_rrt=False))) as client:
        stats = client.get("/stats").json()
        assert stats["images"] == 40 and stats["identities"] == 8
        body = client.post("/search", params={"k": K, "rerank": "none"},
                           files={"image": ("q.jpg", Path(query).read_bytes(), "image/jpeg")}).json()
        assert [(h["id"], round(h["score"], 5)) for h in body["results"]] == \
            [(h.id, round(h.score, 5)) for h in expected.hits]
        assert body["partial"] is False
        added = client.post("/images", data={"identity": "new"},
                            files={"image": ("q.jpg", Path(query).read_bytes(), "image/jpeg")})
        assert added.status_code == 201 and added.json()["count"] == 41
        image = added.json()["images"][0]
        stored = str(tmp_path / "copy" / image["path"])
        shard, local_id = split_id(image["id"], SHARDS)
        assert shard == shard_of(stored, SHARDS)
        with IndexStore.open(tmp_path / "copy" / f"shard-{shard:03d}") as store:
            assert store.get(local_id).path == stored
        assert client.get(f"/thumbnails/{image['id']}").status_code == 200
        assert client.delete(f"/images/{image['id']}").json() == {"removed": 1, "count": 40}
        assert not Path(stored).exists()


def test_waldo_serve_engine_ray_refuses_a_single_index(grocery, capsys):
    assert main(["serve", "--engine", "ray", "--index", str(grocery["single"].root)]) == EXIT_USAGE
    assert "serves sharded indexes" in capsys.readouterr().err


def test_reshard_copies_rows_without_extracting_again(grocery, tmp_path, monkeypatch):
    single = grocery["single"]

    def no_model(*args, **kwargs):
        raise AssertionError("reshard ran the model")

    with monkeypatch.context() as patch:
        patch.setattr(DescriptorModel, "forward", no_model)
        result = reshard(single.root, tmp_path / "two", 2, progress=False)
        back = reshard(tmp_path / "two", tmp_path / "one", 1, progress=False)  # sharded -> single
    assert result["images"] == back["images"] == 40 and sum(result["per_shard"]) == 40
    assert is_sharded(tmp_path / "two") and not is_sharded(tmp_path / "one")
    assert check_sharded(tmp_path / "two") == []
    two, one = open_index(tmp_path / "two"), open_index(tmp_path / "one")
    assert isinstance(two, ShardedWaldo) and isinstance(one, Waldo)
    for query in grocery["queries"][:2]:
        expected = _ranking(single.search(query, k=K, rerank="none"))
        assert _ranking(two.search(query, k=K, rerank="none")) == expected
        assert _ranking(one.search(query, k=K, rerank="none")) == expected
    with pytest.raises(FileExistsError):
        reshard(single.root, tmp_path / "two", 3, progress=False)


def _int8_index_with_keypoints(root: Path, n: int = 30) -> None:
    """A model-less int8 index with keypoints and attrs, and a stand-in model folder (reshard
    copies the folder as files; it never loads the model)."""
    rng = np.random.default_rng(0)
    with IndexStore.create(root, manifest={"backbone": "toy", "model_hash": "h"}, global_dim=8, local_shape=(3, 16),
                           local_dtype="int8") as store:
        g = rng.standard_normal((n, 8)).astype(np.float32)
        g /= np.linalg.norm(g, axis=1, keepdims=True)
        counts = rng.integers(0, 5, n)
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        keypoints = RaggedKeypoints(rng.random((offsets[-1], 2)).astype(np.float32),
                                    rng.integers(0, 255, (offsets[-1], 32)).astype(np.uint8), offsets)
        store.add([f"/photos/{i}.jpg" for i in range(n)], [str(i % 4) for i in range(n)], g,
                  (rng.standard_normal((n, 3, 16)) * 0.5).astype(np.float32),
                  attrs=[{"n": i} for i in range(n)], verification=keypoints)
        store.remove([3, 7])  # removed images are not copied
    (root / "model").mkdir()
    (root / "model" / "config.json").write_text("{}")


def test_reshard_copies_int8_locals_keypoints_and_labels_exactly(tmp_path):
    _int8_index_with_keypoints(tmp_path / "src")
    reshard(tmp_path / "src", tmp_path / "dst", 3, progress=False)
    source = IndexStore.open(tmp_path / "src")
    snap = source.snapshot()
    layout = read_layout(tmp_path / "dst")
    copied = 0
    for i, folder in enumerate(layout.shard_dirs):
        assert (folder / "model" / "config.json").read_text() == "{}"
        with IndexStore.open(folder) as shard:
            assert shard.local_dtype == "int8" and shard.manifest["model_hash"] == "h"
            target = shard.snapshot()
            for record in shard.records():
                (original,) = source.records_for_paths([record.path])
                assert shard_of(record.path, 3) == i
                assert (record.identity, record.attrs) == (original.identity, original.attrs)
                for read in ("global_descriptors", "exact_local_descriptors"):
                    assert np.array_equal(getattr(target, read)([record.id]), getattr(snap, read)([original.id]))
                mine, theirs = target.verification_features([record.id]), snap.verification_features([original.id])
                assert np.array_equal(mine.keypoints, theirs.keypoints)
                assert np.array_equal(mine.descriptors, theirs.descriptors)
                copied += 1
    assert copied == len(source) == 28
    source.close()


def test_a_failed_reshard_leaves_no_index_and_no_staging_folder(tmp_path, monkeypatch):
    _int8_index_with_keypoints(tmp_path / "src")
    calls = []
    real_add = IndexStore.add

    def failing_add(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk gone")
        return real_add(self, *args, **kwargs)

    monkeypatch.setattr(IndexStore, "add", failing_add)
    with pytest.raises(OSError, match="disk gone"):
        reshard(tmp_path / "src", tmp_path / "dst", 3, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_the_command_line_builds_describes_searches_and_checks_a_sharded_index(capsys, tmp_path, data_root):
    index = tmp_path / "abo-sharded"
    code, out, err = _run(capsys, "index", "build", "--data", data_root / "abo_sample", "--out", index, "--shards", 2,
                          "--projection", "random", "--workers", "0", "--quiet")
    assert code == 0, err
    assert "indexed 12 images" in out and "(2 shards)" in out and read_layout(index).shards == 2
    code, out, _ = _run(capsys, "index", "info", "--index", index)
    assert code == 0 and "2 shards by blake2b-64 of the image path" in out
    assert "images      12 (3 identities)" in out and "shard-000" in out and "shard-001" in out
    code, out, _ = _run(capsys, "index", "info", "--index", index, "--json")
    info = json.loads(out)
    assert info["count"] == 12 and sum(row["count"] for row in info["per_shard"]) == 12 and info["shards"] == 2
    query = data_root / "abo_sample" / "B074M5HPBD" / "9ea6992d.jpg"
    code, out, _ = _run(capsys, "search", query, "--index", index, "-k", 3, "--json")
    hits = json.loads(out)["results"]
    assert code == 0 and hits[0]["path"] == str(query.resolve()) and [h["rank"] for h in hits] == [1, 2, 3]
    assert split_id(hits[0]["id"], 2)[0] == shard_of(hits[0]["path"], 2)
    # Keypoints were routed with their images: each shard verifies its own candidates.
    code, out, _ = _run(capsys, "search", query, "--index", index, "-k", 3, "--rerank", "gv", "--json")
    body = json.loads(out)
    assert code == 0 and body["rerank"] == "gv" and body["results"][0]["path"] == str(query.resolve())
    assert body["results"][0]["verified"] is True and body["results"][0]["id"] == hits[0]["id"]
    assert body["note"] == ""  # a shard without a geometric match does not speak for the query's shard
    code, out, _ = _run(capsys, "index", "check", "--index", index)
    assert code == 0 and out.strip().endswith("ok")
    code, out, _ = _run(capsys, "index", "remove", "--index", index, "--id", hits[0]["id"])
    assert code == 0 and out.startswith("removed 1 images; the index holds 11")
    (index / "shard-001" / "model" / "config.json").write_text("{}")  # a shard's model drifts
    code, out, _ = _run(capsys, "index", "check", "--index", index)
    assert code == 1 and "shard-001: its model folder differs from the first shard's in config.json" in out
