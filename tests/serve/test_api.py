"""Every endpoint of the service and every bad input, through FastAPI's TestClient.

One app (one model load) per module, over a private copy of a small real grocery index. Tests
that add or remove images clean up after themselves or use images no other test relies on.
"""

from __future__ import annotations

import io
import re
import struct
import zlib
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image, ImageOps

from waldo.serve import ServeSettings, create_app
from waldo.serve.settings import STATIC_DIR

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def served(grocery_index, tmp_path_factory):
    import shutil

    root = tmp_path_factory.mktemp("api") / "index"
    shutil.copytree(grocery_index.root, root)
    settings = ServeSettings(max_upload_bytes=2 * 1024 * 1024, max_k=40, max_files_per_add=3)
    with TestClient(create_app(root, settings)) as client:
        yield client, root, grocery_index


def stored_path(root: Path, image_id: int) -> Path:
    """The file the index holds for ``image_id`` (answers name it relative, not absolutely)."""
    from waldo.index import IndexStore

    with IndexStore.open(root) as store:
        return Path(store.get(image_id).path)


def upload(path: Path | bytes, name: str = "photo.jpg") -> dict:
    data = path if isinstance(path, bytes) else Path(path).read_bytes()
    return {"image": (name, data, "application/octet-stream")}


def png_declaring(width: int, height: int) -> bytes:
    """A valid 1x1 PNG whose header claims ``width x height`` (a decompression bomb's header)."""
    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    struct.pack_into(">II", data, 16, width, height)  # IHDR data starts at byte 16
    struct.pack_into(">I", data, 29, zlib.crc32(bytes(data[12:29])))
    return bytes(data)


# ----------------------------------------------------------------------------- search
def test_search_finds_the_same_product(served):
    client, _, grocery = served
    for identity, query in grocery.queries.items():
        response = client.post("/search?k=5", files=upload(query))
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["k"] == 5 and body["rerank"] == "none" and len(body["results"]) == 5
        top = body["results"][0]
        assert top["identity"] == identity and top["label"] == grocery.labels[identity]
        assert [r["rank"] for r in body["results"]] == [1, 2, 3, 4, 5]
        scores = [r["score"] for r in body["results"]]
        assert scores == sorted(scores, reverse=True)
        for result in body["results"]:
            assert {"id", "path", "identity", "score", "global_score", "rank_before_rerank"} <= result.keys()
            assert result["global_score"] == result["score"] and result["rank_before_rerank"] == result["rank"]
        assert {"decode", "extract", "search", "rerank", "total"} <= body["timings"].keys()
        assert body["timings"]["total"] >= body["timings"]["extract"] > 0


def test_search_default_k_and_k_limits(served):
    client, _, grocery = served
    query = next(iter(grocery.queries.values()))
    assert len(client.post("/search", files=upload(query)).json()["results"]) == 10
    assert len(client.post("/search?k=40", files=upload(query)).json()["results"]) == 40
    for bad in ("0", "-3", "41", "100000000000000000000", "abc", "2.5"):
        response = client.post(f"/search?k={bad}", files=upload(query))
        assert response.status_code == 422, (bad, response.text)
        assert "k" in response.json()["detail"]


def test_rerankers_come_from_the_engine(served):
    client, _, grocery = served
    rerankers = client.get("/stats").json()["rerankers"]
    assert rerankers[0] == "none"
    query = grocery.queries["29"]
    # Every hit's global figures are its place and score in the plain global ranking.
    global_hits = client.post("/search", params={"k": 40}, files=upload(query)).json()["results"]
    global_place = {r["id"]: (r["rank"], r["score"]) for r in global_hits}
    for mode in rerankers:
        response = client.post("/search", params={"k": 5, "rerank": mode}, files=upload(query))
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["rerank"] == mode and len(body["results"]) == 5
        for r in body["results"]:
            rank, score = global_place[r["id"]]
            assert r["rank_before_rerank"] == rank and r["global_score"] == pytest.approx(score, abs=1e-6), (mode, r)
    response = client.post("/search?rerank=magic", files=upload(query))
    assert response.status_code == 422 and "magic" in response.json()["detail"]


def test_every_ranking_says_what_its_scores_are_and_fills_only_its_own_fields(served):
    """``score`` is the number that ordered the list, in the unit ``score_kind`` names (/stats
    explains each); verification's and the RRT's fields are set where they ran, null elsewhere,
    and never a made-up placeholder (no negative "unverified" scores)."""
    client, _, grocery = served
    stats = client.get("/stats").json()
    assert set(stats["reranker_info"]) == set(stats["rerankers"])  # "none" included, for the page
    assert stats["reranker_info"]["none"]["title"] == "Global only"
    assert all(info["title"] and info["description"] for info in stats["reranker_info"].values())
    for mode in stats["rerankers"]:
        body = client.post("/search", params={"k": 20, "rerank": mode}, files=upload(grocery.queries["29"])).json()
        kind, hits = body["score_kind"], body["results"]
        assert kind in stats["score_kinds"], (mode, kind)
        scores = [hit["score"] for hit in hits]
        assert scores == sorted(scores, reverse=True), mode  # the score is the ordering's own
        verifying, rrt = "gv" in mode.split("+"), mode.startswith("rrt")
        for hit in hits:
            assert (hit["inliers"] is not None) == verifying and (hit["verified"] is not None) == verifying, (mode, hit)
            assert (hit["rrt_score"] is not None) == rrt, (mode, hit)
            if rrt:
                assert 0.0 <= hit["rrt_score"] <= 1.0
        if kind == "similarity":
            assert all(hit["score"] == hit["global_score"] for hit in hits)
        elif kind == "inliers":
            assert all(hit["score"] == (hit["inliers"] if hit["score"] > 0 else 0) for hit in hits)
            assert all(hit["score"] >= 0 for hit in hits)
        elif kind == "RRT probability":
            assert all(hit["score"] == pytest.approx(hit["rrt_score"]) for hit in hits)
        elif kind == "similarity + geometry bonus":  # the bonus only where geometry matched
            for hit in hits:
                assert hit["score"] >= hit["global_score"] - 1e-6
                if hit["score"] > hit["global_score"] + 1e-6:
                    assert hit["inliers"] >= 8


def test_rrt_rankings_report_the_rrts_probability_beside_their_own_score(default_rrt_index):
    """On an index with a trained RRT and keypoints: rrt scores by the RRT's probability,
    rrt-fusion by its fused score with the probability beside it, rrt+gv by inliers (0 without
    a geometric match) with both the probability and the verification fields."""
    from waldo.api import Waldo

    root, paths = default_rrt_index
    engine = Waldo.open(root)
    assert {"rrt", "rrt-fusion", "rrt+gv"} <= set(engine.available_rerankers())
    expected_kind = {"none": "similarity", "rrt": "RRT probability", "rrt-fusion": "similarity + RRT probability",
                     "rrt+gv": "inliers", "gv": {"similarity + geometry bonus", "similarity"}}
    for mode in engine.available_rerankers():
        outcome = engine.search(paths[0], k=8, rerank=mode)
        kinds = expected_kind[mode] if isinstance(expected_kind[mode], set) else {expected_kind[mode]}
        assert outcome.score_kind in kinds, (mode, outcome.score_kind)
        scores = [hit.score for hit in outcome.hits]
        assert scores == sorted(scores, reverse=True), mode
        for hit in outcome.hits:
            assert (hit.rrt_score is not None) == mode.startswith("rrt"), (mode, hit)
            assert (hit.inliers is not None) == mode.endswith("gv"), (mode, hit)
            if mode == "rrt":
                assert hit.score == pytest.approx(hit.rrt_score)
            if mode == "rrt+gv":
                assert hit.score == (hit.inliers if hit.score > 0 else 0) and hit.score >= 0
    # What the registry says of each (index info, /stats) is what a search reports.
    from waldo.rerank import RERANKERS

    assert [RERANKERS.spec(m).score for m in ("rrt", "rrt-fusion", "rrt+gv")] == [
        "RRT probability", "similarity + RRT probability", "inliers"]
    # rrt+gv without a geometric match keeps the RRT's order: its probabilities then descend.
    combined = engine.search(paths[0], k=8, rerank="rrt+gv").hits
    unmatched = [hit.rrt_score for hit in combined if hit.score == 0]
    assert unmatched == sorted(unmatched, reverse=True)


@pytest.mark.parametrize("payload, status, words", [
    (b"", 400, "empty"),
    (b"just some text, not an image", 415, "not a recognised image format"),
    (b"<svg xmlns='http://www.w3.org/2000/svg'></svg>", 415, "not a recognised image format"),
    (b"%!PS-Adobe-3.0 EPSF-3.0\n", 415, "not a recognised image format"),
    (png_declaring(50_000, 50_000), 413, "pixels"),  # over Pillow's own bomb guard
    (png_declaring(8_000, 6_000), 413, "exceeds the limit"),  # 48 MP: over Waldo's 40 MP limit
])
def test_search_refuses_bad_images(served, payload, status, words):
    client, _, _ = served
    response = client.post("/search", files=upload(payload, "evil.png"))
    assert response.status_code == status, response.text
    assert words in response.json()["detail"]


def test_search_refuses_truncated_corrupt_and_unsupported_files(served):
    client, _, grocery = served
    data = Path(grocery.queries["6"]).read_bytes()
    truncated = client.post("/search", files=upload(data[: len(data) // 3]))
    assert truncated.status_code == 400 and "truncated" in truncated.json()["detail"]
    corrupt = bytearray(data)
    corrupt[600:4000] = b"\x00" * 3400  # scan data destroyed, header intact
    assert client.post("/search", files=upload(bytes(corrupt))).status_code in (200, 400)  # never 5xx
    icon = io.BytesIO()
    Image.new("RGB", (32, 32)).save(icon, format="ICO")  # a real image in a format not on the allowlist
    assert client.post("/search", files=upload(icon.getvalue(), "x.ico")).status_code == 415


def test_search_requires_the_image_field(served):
    client, _, grocery = served
    assert client.post("/search").status_code == 422
    response = client.post("/search", files={"picture": ("a.jpg", Path(grocery.queries["6"]).read_bytes())})
    assert response.status_code == 422 and "image" in response.json()["detail"]
    assert client.post("/search", content=b"raw bytes", headers={"content-type": "image/jpeg"}).status_code == 422


def test_uploads_over_the_size_limit_are_refused_before_being_read(served):
    client, _, _ = served
    big = b"\xff\xd8" + b"\0" * (3 * 1024 * 1024)  # 3 MB > the 2 MB limit of this app
    response = client.post("/search", files=upload(big))
    assert response.status_code == 413 and "too large" in response.json()["detail"]

    def chunks():  # no Content-Length: the body is counted as it streams in
        for _ in range(48):
            yield b"x" * 65536

    streamed = client.post("/search", content=chunks(),
                           headers={"content-type": "multipart/form-data; boundary=zzz"})
    assert streamed.status_code == 413


def test_uploads_stay_in_memory_not_in_the_system_temp_folder(served, monkeypatch):
    import tempfile

    import numpy as np

    client, _, _ = served
    noise = np.random.default_rng(0).integers(0, 256, (700, 700, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, format="PNG")
    assert 1024 * 1024 < len(buffer.getvalue()) < 2 * 1024 * 1024  # over Starlette's 1 MB spool size
    rollovers = []  # SpooledTemporaryFile goes to disk through tempfile.TemporaryFile
    real = tempfile.TemporaryFile
    monkeypatch.setattr(tempfile, "TemporaryFile", lambda *a, **kw: rollovers.append(1) or real(*a, **kw))
    assert client.post("/search?k=1", files=upload(buffer.getvalue(), "noise.png")).status_code == 200
    assert rollovers == []


def test_too_many_uploads_at_once_get_429():
    import asyncio

    from waldo.serve.limits import BodySizeLimit

    async def never_called(scope, receive, send):  # pragma: no cover - must not be reached
        raise AssertionError("the guard let a request through")

    guard = BodySizeLimit(never_called, max_body_bytes=100, max_inflight=2)
    guard.inflight = 2
    sent = []

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "headers": [(b"content-length", b"10")]}
    asyncio.run(guard(scope, None, send))
    assert sent[0]["status"] == 429 and b"too many uploads" in sent[1]["body"]
    assert (b"retry-after", b"1") in sent[0]["headers"]  # clients are told to back off
    sent.clear()
    guard.inflight = 0
    asyncio.run(guard({**scope, "headers": [(b"content-length", b"101")]}, None, send))
    assert sent[0]["status"] == 413


# ----------------------------------------------------------------------------- images
def test_add_stores_inside_the_index_and_becomes_searchable(served, data_file, tmp_path):
    client, root, _ = served
    photo = data_file("abo_sample/B074M5HPBD/9ea6992d.jpg")
    before = client.get("/healthz").json()["images"]
    outside_before = sorted(p.name for p in root.parent.iterdir())
    response = client.post("/images", files=upload(photo, "../../../../tmp/evil.jpg"), data={"identity": "lamp"})
    assert response.status_code == 201, response.text
    (added,) = response.json()["images"]
    assert re.fullmatch(r"uploads/[0-9a-f]{64}\.jpg", added["path"])  # relative to the index, never absolute
    stored = root.resolve() / added["path"]
    assert stored.read_bytes() == photo.read_bytes() and added["created"] and added["name"] == "evil.jpg"
    assert sorted(p.name for p in root.parent.iterdir()) == outside_before  # nothing written beside the index
    assert response.json()["count"] == before + 1
    top = client.post("/search?k=1", files=upload(photo)).json()["results"][0]
    assert top["id"] == added["id"] and top["identity"] == "lamp" and top["score"] == pytest.approx(1, abs=1e-3)
    again = client.post("/images", files=upload(photo, "copy.jpg")).json()
    assert again["images"][0]["id"] == added["id"] and not again["images"][0]["created"]
    assert again["count"] == before + 1
    assert client.delete(f"/images/{added['id']}").status_code == 200
    assert not stored.exists()  # an uploaded file goes with its image


def test_add_is_all_or_nothing(served, data_file):
    client, root, _ = served
    good = data_file("abo_sample/B0799CK52K/25ffa37c.jpg").read_bytes()
    count = client.get("/healthz").json()["images"]
    uploads = root / "uploads"
    files_before = sorted(uploads.iterdir()) if uploads.exists() else []
    mixed = [("image", ("good.jpg", good)), ("image", ("bad.jpg", good[:2000]))]  # 2nd one truncated
    assert client.post("/images", files=mixed).status_code == 400
    four = [("image", (f"{i}.jpg", good)) for i in range(4)]  # this app allows 3 per request
    assert client.post("/images", files=four).status_code == 413
    assert client.post("/images", files=upload(png_declaring(9000, 9000))).status_code == 413
    assert client.post("/images", files=upload(good), data={"identity": "x" * 201}).status_code == 422
    assert client.post("/images").status_code == 422
    assert client.get("/healthz").json()["images"] == count
    assert (sorted(uploads.iterdir()) if uploads.exists() else []) == files_before


def test_get_image_and_thumbnail(served):
    client, root, _ = served
    top = client.post("/search?k=1", files=upload(served[2].queries["45"])).json()["results"][0]
    original = client.get(f"/images/{top['id']}")
    assert original.status_code == 200 and original.headers["content-type"] == "image/jpeg"
    assert original.content == stored_path(root, top["id"]).read_bytes()
    thumb = client.get(f"/thumbnails/{top['id']}")
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    assert max(Image.open(io.BytesIO(thumb.content)).size) <= 256
    assert client.get(f"/thumbnails/{top['id']}").content == thumb.content  # cached, identical


@pytest.mark.parametrize("path, status", [
    ("/images/999999", 404), ("/thumbnails/999999", 404), ("/images/-1", 422), ("/images/abc", 422),
    ("/images/99999999999999999999999", 422), ("/images/..%2F..%2F..%2Fetc%2Fpasswd", 404),
    ("/images/1%2F..%2F..%2Fmanifest.json", 404), ("/thumbnails/%2E%2E", 422), ("/static/../manifest.json", 404),
    ("/static/..%2F..%2Fapi.py", 404),
])
def test_images_are_only_reachable_by_id(served, path, status):
    client, _, _ = served
    response = client.get(path)
    assert response.status_code == status, (path, response.text[:200])
    assert b"root:" not in response.content and b"waldo_version" not in response.content


def test_delete(served, data_file):
    client, _, _ = served
    photo = data_file("abo_sample/B07GTFSCHB/3238d76f.jpg")
    added = client.post("/images", files=upload(photo)).json()["images"][0]
    response = client.delete(f"/images/{added['id']}")
    assert response.status_code == 200 and response.json()["removed"] == 1
    assert client.get(f"/images/{added['id']}").status_code == 404
    assert client.delete(f"/images/{added['id']}").status_code == 404
    assert all(r["id"] != added["id"] for r in client.post("/search?k=40", files=upload(photo)).json()["results"])
    assert client.delete("/images/abc").status_code == 422


def test_deleting_a_dataset_image_keeps_its_file(served):
    client, root, grocery = served
    victim = client.post("/search?k=40", files=upload(grocery.queries["62"])).json()["results"][-1]
    victim_file = stored_path(root, victim["id"])
    assert client.delete(f"/images/{victim['id']}").status_code == 200
    assert victim_file.is_file()  # the dataset is not the service's to delete


# ----------------------------------------------------------------------------- match, meta, page
def test_match_returns_inlier_lines(served):
    client, _, grocery = served
    query = grocery.queries["29"]
    top = client.post("/search?k=1", files=upload(query)).json()["results"][0]
    response = client.post(f"/match/{top['id']}", files=upload(query))
    assert response.status_code == 200, response.text
    match = response.json()
    assert match["id"] == top["id"] and match["available"]
    with Image.open(query) as decoded:
        assert match["query_size"] == list(ImageOps.exif_transpose(decoded).size)
    assert len(match["lines"]) == min(match["inliers"], 300) and all(len(line) == 4 for line in match["lines"])
    assert client.post("/match/999999", files=upload(query)).status_code == 404
    assert client.post(f"/match/{top['id']}", files=upload(b"nope")).status_code == 415


def test_match_verifies_the_same_product_only(served):
    """Orange juice cartons: the held-out photo against indexed photos of the same carton is
    verified for at least one of them (GV's claim: enough inliers spread over the carton, a sane
    model); against a banana photo it is not."""
    client, _, grocery = served
    query = grocery.queries["29"]
    indexed = client.post("/search?k=40", files=upload(query)).json()["results"]
    answers = [client.post(f"/match/{r['id']}", files=upload(query)).json() for r in indexed if r["identity"] == "29"]
    verified = next((a for a in answers if a["verified"]), None)
    assert verified is not None, [(a["inliers"], a["message"]) for a in answers]
    assert verified["inliers"] >= 6 and verified["message"].startswith("verified") and len(verified["outline"]) == 4
    assert "of the query's keypoints' extent and" in verified["message"]  # where the evidence lies, both sides
    for refused in answers:
        if not refused["verified"]:  # says why, draws no outline
            assert refused["message"].startswith("not verified") and refused["outline"] == []
    other = next(r for r in indexed if r["identity"] == "6")
    refused = client.post(f"/match/{other['id']}", files=upload(query)).json()
    assert not refused["verified"] and refused["outline"] == [], refused
    assert refused["message"].startswith("not verified")


def test_health_stats_and_schema(served):
    client, root, _ = served
    assert client.get("/healthz").json()["status"] == "ok"
    stats = client.get("/stats").json()
    assert stats["images"] > 0 and stats["index_name"] == root.name and "index_path" not in stats
    assert stats["limits"]["max_upload_bytes"] == 2 * 1024 * 1024 and stats["limits"]["max_k"] == 40
    assert stats["resident_memory_bytes"] > 50 * 1024 * 1024 and stats["queries"] > 0
    assert stats["query_latency"]["none"]["p50_ms"] > 0
    schema = client.get("/openapi.json").json()
    for path in ("/search", "/images", "/images/{image_id}", "/thumbnails/{image_id}", "/healthz", "/stats"):
        assert path in schema["paths"], path
    assert {"get", "delete"} <= schema["paths"]["/images/{image_id}"].keys()
    assert client.get("/docs").status_code == 404  # Swagger UI would load from a CDN


def test_page_and_assets_are_local(served):
    client, _, _ = served
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert page.headers["x-content-type-options"] == "nosniff"
    for asset in ("app.js", "style.css", "favicon.svg"):
        assert client.get(f"/static/{asset}").status_code == 200
    for file in STATIC_DIR.iterdir():  # no CDN: no absolute URL other than the SVG namespace
        urls = set(re.findall(r"https?://[^\s\"')]+", file.read_text()))
        assert urls <= {"http://www.w3.org/2000/svg"}, (file.name, urls)


def test_match_draws_local_match_cells_only_where_it_is_offered(served, data_root, tmp_path):
    client, _, grocery = served
    query = grocery.queries["29"]
    top = client.post("/search?k=1", files=upload(query)).json()["results"][0]
    refused = client.post(f"/match/{top['id']}?method=cells", files=upload(query))
    assert refused.status_code == 422 and "stage locals" in refused.json()["detail"]
    assert client.post(f"/match/{top['id']}?method=bogus", files=upload(query)).status_code == 422

    from waldo.api import Waldo
    from waldo.data.datasets import read_labels_csv

    abo = read_labels_csv(data_root / "abo_sample")
    engine = Waldo.create(tmp_path / "staged", projection="random", dim=32, local_stage=4, gv_features=False,
                          progress=False)
    engine.add(abo.paths, abo.identities, progress=False, num_workers=0)
    engine.store.close()
    with TestClient(create_app(tmp_path / "staged", ServeSettings())) as staged:
        photo = abo.paths[0]
        hit = staged.post("/search?k=1&rerank=local-match", files=upload(photo)).json()["results"][0]
        match = staged.post(f"/match/{hit['id']}?method=cells", files=upload(photo)).json()
        assert match["method"] == "cells" and match["available"] and not match["verified"]
        assert match["matches"] == 196 and 0 < match["inliers"] <= 196  # the photo against itself
        assert len(match["lines"]) == match["inliers"] and "mutual best match above cosine 0.7" in match["message"]
        width, height = match["query_size"]
        for xq, yq, xc, yc in match["lines"]:
            assert 0 <= xq <= width and 0 <= yq <= height
            assert (xq, yq) == (xc, yc)  # a cell of the same photo matches itself
        geometry = staged.post(f"/match/{hit['id']}", files=upload(photo)).json()
        assert geometry["method"] != "cells" and geometry["inliers"] > 0  # the default: the verifier's inliers
