"""A sharded index served on Ray Serve (waldo/serve/cluster.py), on a local Ray: the same answers
as a single index, adds and deletes routed to the owning shard through the service's API, a
replica killed under load, and a dead shard answered around with ``partial: true``.

One cluster for the module (starting Ray and five replicas takes a minute or two on two cores):
2 shards x 2 replicas and one query-model replica, over 40 grocery photos with keypoints.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from waldo.api import Waldo
from waldo.data.datasets import read_labels_csv
from waldo.index.shards import shard_of, split_id
from waldo.models.checkpoint import save_model
from waldo.serve import ServeSettings, create_app
from waldo.sharded import ShardedWaldo

CLASSES = ("6", "29", "23", "45", "62", "0", "12", "33")  # 8 grocery products
PER_CLASS = 5
SHARDS = 2
REPLICAS = 2
K = 10


@pytest.fixture(scope="module")
def cluster(require_module, grocery_dir, tmp_path_factory):
    """The same 40 photos in a single index and a 2-shard index (one tiny model, ORB+TEBLID
    keypoints), the sharded one deployed on a local Ray Serve; held-out queries and spare photos
    to upload."""
    require_module("ray.serve", "pip install -e '.[ray]'")
    import ray
    from ray import serve

    from waldo.models.untrained import untrained_model
    from waldo.serve.cluster import start_cluster

    photos = read_labels_csv(grocery_dir)
    chosen, queries, spare = [], [], []
    for identity in CLASSES:
        of_class = [r for r in photos.records if r.identity == identity]
        train = [r for r in of_class if r.attrs.get("split") == "train"]
        chosen += train[:PER_CLASS]
        spare += [r.path for r in train[PER_CLASS:PER_CLASS + 2]]
        queries.append([r.path for r in of_class if r.attrs.get("split") == "test"][2])
    folder = tmp_path_factory.mktemp("cluster")
    model, config = untrained_model("efficientnet_lite0", dim=32, projection="random", image_size=64, progress=False)
    save_model(model, config, folder / "model")
    paths, identities = [r.path for r in chosen], [r.identity for r in chosen]
    single = Waldo.create(folder / "single", model_dir=folder / "model", progress=False)
    single.add(paths, identities, num_workers=0, progress=False)
    sharded = ShardedWaldo.create(folder / "sharded", shards=SHARDS, model_dir=folder / "model", progress=False)
    sharded.add(paths, identities, num_workers=0, progress=False)
    sharded.close()
    started = not ray.is_initialized()
    if started:  # more logical CPUs than cores: the five replicas share this machine's two
        ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    engine = start_cluster(folder / "sharded", replicas_per_shard=REPLICAS, shard_cpus=1, model_cpus=1,
                           shard_timeout_s=30.0, lock_timeout=10.0)
    apps, engine.apps = engine.apps, []  # the service's close() must not tear the cluster down
    yield {"engine": engine, "single": single, "folder": folder, "queries": queries[:4], "spare": spare}
    single.store.close()
    for app in apps:
        serve.delete(app)
    if started:
        serve.shutdown()
        ray.shutdown()


def _same_ranking(many, one) -> bool:
    """The same images in the same order with the same scores. The cluster describes the query in
    its own model replica (another process, other thread counts), so a score may differ in the
    last float32 digits: rounding both to 5 decimals once split 0.721405 into 0.72141 / 0.7214."""
    return [hit.path for hit in many] == [hit.path for hit in one] and \
        np.allclose([hit.score for hit in many], [hit.score for hit in one], rtol=0, atol=1e-5)


def test_cluster_search_is_the_single_index_search(cluster):
    engine, single = cluster["engine"], cluster["single"]
    for query in cluster["queries"]:
        many, one = engine.search(query, k=K, rerank="none"), single.search(query, k=K, rerank="none")
        assert _same_ranking(many.hits, one.hits)  # exactly the single index's global top-k
        assert not many.partial and many.missing_shards == []
        for hit in many.hits:  # each id names the shard that owns the path
            assert split_id(hit.id, SHARDS)[0] == shard_of(hit.path, SHARDS)
    # Reranked: every shard verifies its own candidates; on 40 photos each shard's top-100 is
    # all of its images, as is the single index's, so the merged order is the single one's.
    query = cluster["queries"][0]
    many, one = engine.search(query, k=K, rerank="gv"), single.search(query, k=K, rerank="gv")
    assert many.rerank == "gv" and _same_ranking(many.hits, one.hits)
    assert [h.inliers for h in many.hits] == [h.inliers for h in one.hits]


def test_service_api_routes_adds_and_deletes_to_the_owning_shard(cluster):
    engine = cluster["engine"]
    settings = ServeSettings(max_files_per_add=4, compile_rrt=False)
    with TestClient(create_app(engine.root, settings, open_engine=lambda: engine)) as client:
        stats = client.get("/stats").json()
        assert stats["images"] == len(cluster["single"]) and stats["index_name"] == "sharded"
        assert set(stats["rerankers"]) >= {"none", "gv"}
        query = cluster["queries"][1]
        answer = client.post("/search", params={"k": K, "rerank": "none"},
                             files={"image": ("q.jpg", Path(query).read_bytes(), "image/jpeg")})
        assert answer.status_code == 200, answer.text
        body = answer.json()
        one = cluster["single"].search(query, k=K, rerank="none")
        assert [round(h["score"], 5) for h in body["results"]] == [round(h.score, 5) for h in one.hits]
        assert body["partial"] is False and not any(h["path"].startswith("/") for h in body["results"])

        spare = cluster["spare"][:3]
        added = client.post("/images", data={"identity": "spare"},
                            files=[("image", (Path(p).name, Path(p).read_bytes(), "image/jpeg")) for p in spare])
        assert added.status_code == 201, added.text
        images = added.json()["images"]
        assert added.json()["count"] == len(cluster["single"]) + 3
        for image in images:
            shard, local_id = split_id(image["id"], SHARDS)
            stored = str(engine.root / image["path"])
            assert shard == shard_of(stored, SHARDS)  # stored by the shard that owns its path ...
            assert engine._call(shard, "get", local_id).path == stored  # ... under the id it was given
            assert engine._call(1 - shard, "contains_paths", [stored]) == [False]
        # The added photo is found by itself (its own bytes as the query).
        found = client.post("/search", params={"k": 1, "rerank": "none"},
                            files={"image": ("s.jpg", Path(spare[0]).read_bytes(), "image/jpeg")}).json()
        assert found["results"][0]["id"] == images[0]["id"]
        assert client.get(f"/thumbnails/{images[0]['id']}").status_code == 200
        # Deletes go to the shard the id names; an unknown id is 404 and removes nothing.
        for image in images:
            gone = client.delete(f"/images/{image['id']}")
            assert gone.status_code == 200, gone.text
        assert client.delete(f"/images/{images[0]['id']}").status_code == 404
        assert client.get("/stats").json()["images"] == len(cluster["single"])
        assert not any((engine.root / "uploads").glob("*.jpg"))  # the service's own files went with them


def test_a_replica_killed_under_load_loses_no_request_and_no_acknowledged_add(cluster):
    """Searches and adds from four threads while one of shard 0's two replicas is killed
    (SIGKILL): calls that met the dead replica are retried on the other, so no request fails
    with a 5xx beyond those in flight on it, and every acknowledged add is in the index."""
    engine = cluster["engine"]
    settings = ServeSettings(max_files_per_add=1, compile_rrt=False)
    queries = cluster["queries"]
    uploads = [Path(p) for p in cluster["spare"][3:]]
    statuses: list[int] = []
    acknowledged: list[int] = []
    stop = threading.Event()
    with TestClient(create_app(engine.root, settings, open_engine=lambda: engine)) as client:
        def search_loop(offset: int) -> None:
            i = offset
            while not stop.is_set():
                data = Path(queries[i % len(queries)]).read_bytes()
                statuses.append(client.post("/search", params={"k": 5, "rerank": "none"},
                                            files={"image": ("q.jpg", data, "image/jpeg")}).status_code)
                i += 1

        def add_loop() -> None:
            for path in uploads:
                if stop.is_set():
                    return
                answer = client.post("/images", data={"identity": "load"},
                                     files={"image": (path.name, path.read_bytes(), "image/jpeg")})
                statuses.append(answer.status_code)
                if answer.status_code == 201:
                    acknowledged.extend(image["id"] for image in answer.json()["images"])

        threads = [threading.Thread(target=search_loop, args=(i,)) for i in range(3)]
        threads.append(threading.Thread(target=add_loop))
        for thread in threads:
            thread.start()
        time.sleep(3.0)
        pids = engine.replica_pids(0)
        assert len(pids) == REPLICAS  # both replicas answer calls
        os.kill(sorted(pids)[0], signal.SIGKILL)
        time.sleep(8.0)
        stop.set()
        for thread in threads:
            thread.join(120)
        # A request that never returns must fail here, not hang the client's shutdown waiting for it.
        assert not any(thread.is_alive() for thread in threads), "a request did not return within 120 s"
        server_errors = [s for s in statuses if s >= 500]
        assert len(statuses) > 10 and len(server_errors) <= 1, statuses  # at most the call in flight on it
        for image_id in acknowledged:  # acknowledged after the owning shard committed: still there
            shard, local_id = split_id(image_id, SHARDS)
            assert engine._call(shard, "get", local_id).identity == "load"
        for image_id in acknowledged:
            assert client.delete(f"/images/{image_id}").status_code == 200


def test_a_dead_shard_gives_the_others_results_marked_partial(cluster):
    """Every replica of shard 1 killed: a search answers within the shard timeout from shard 0
    alone, says ``partial`` and names the missing shard; it never hangs."""
    engine = cluster["engine"]
    query = cluster["queries"][2]
    whole = engine.search(query, k=K, rerank="none")
    pids = engine.replica_pids(1)
    engine.shard_timeout_s = 3.0
    try:
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        started = time.monotonic()
        answer = engine.search(query, k=K, rerank="none")
        elapsed = time.monotonic() - started
    finally:
        engine.shard_timeout_s = 30.0
    assert answer.partial and answer.missing_shards == [1] and "did not answer" in answer.note
    assert elapsed < 3.0 + 5.0
    assert answer.hits and all(split_id(hit.id, SHARDS)[0] == 0 for hit in answer.hits)
    # It begins with shard 0's part of the whole answer, in the same order.
    own = [h.id for h in whole.hits if split_id(h.id, SHARDS)[0] == 0]
    assert own and [h.id for h in answer.hits][:len(own)] == own
