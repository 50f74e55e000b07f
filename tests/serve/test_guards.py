"""The service's guards of issue 19: identities stored as given, no server paths in answers,
Host/Origin checks, slow bodies cut off, writes that never wait inside a query slot, one image
per query, a schema that states the limits, and a 405 that names every allowed method.

Through FastAPI's TestClient (one app per module over a private copy of the small grocery
index), and the body guard on its own where timing matters.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import shutil
import threading
import time

import pytest
from fastapi.testclient import TestClient

from waldo.serve import ServeSettings, create_app
from waldo.serve.limits import BodySizeLimit
from waldo.serve.origin import HostOriginGuard, default_allowed_hosts, host_name

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def served(grocery_index, tmp_path_factory):
    root = tmp_path_factory.mktemp("guards") / "index"
    shutil.copytree(grocery_index.root, root)
    settings = ServeSettings(max_k=40, max_files_per_add=3, write_wait_s=1.0)
    with TestClient(create_app(root, settings)) as client:
        yield client, root, grocery_index


def upload(data: bytes, name: str = "photo.jpg") -> dict:
    return {"image": (name, data, "application/octet-stream")}


# ----------------------------------------------------------------------------- identities
def test_identities_are_stored_exactly_as_given_and_a_relabel_is_refused(served, data_file):
    client, _, _ = served
    photo = data_file("abo_sample/B074M5HPBD/9ea6992d.jpg").read_bytes()
    response = client.post("/images", files=upload(photo), data={"identity": "brand/model 7"})
    assert response.status_code == 201, response.text
    (added,) = response.json()["images"]
    assert added["identity"] == "brand/model 7" and added["created"]
    found = client.post("/search?k=1&rerank=none", files=upload(photo)).json()["results"][0]
    assert found["id"] == added["id"] and found["identity"] == "brand/model 7"
    # The same bytes under another identity: refused, and the index keeps the first label.
    other = client.post("/images", files=upload(photo), data={"identity": "second"})
    assert other.status_code == 409 and "brand/model 7" in other.json()["detail"]
    assert "remove it first" in other.json()["detail"]
    # Without an identity (or with the same one) the answer names the stored identity.
    again = client.post("/images", files=upload(photo)).json()["images"][0]
    assert again == {**added, "created": False}
    assert client.delete(f"/images/{added['id']}").status_code == 200


@pytest.mark.parametrize(("identity", "words"), [
    ("   ", "white space"), ("a\x00b", "U+0000"), ("tab\there", "U+0009"), ("x" * 201, "at most 200"),
])
def test_bad_identities_are_refused_not_rewritten(served, data_file, identity, words):
    client, _, _ = served
    photo = data_file("abo_sample/B0799CK52K/25ffa37c.jpg").read_bytes()
    count = client.get("/healthz").json()["images"]
    response = client.post("/images", files=upload(photo), data={"identity": identity})
    assert response.status_code == 422 and words in response.json()["detail"], response.text
    assert client.get("/healthz").json()["images"] == count


# ----------------------------------------------------------------------------- no server paths
def test_answers_never_name_the_servers_absolute_paths(served, data_file):
    client, root, index = served
    photo = data_file("abo_sample/B0799CK52K/25ffa37c.jpg").read_bytes()
    added = client.post("/images", files=upload(photo), data={"identity": "lamp"}).json()["images"][0]
    query = next(iter(index.queries.values())).read_bytes()
    bodies = [client.post("/search?k=40&rerank=none", files=upload(query)).text,
              client.post("/search?k=5&rerank=gv", files=upload(photo)).text,
              client.get("/stats").text, str(added)]
    for body in bodies:
        assert str(root.resolve()) not in body and str(index.root.parent) not in body
        assert "/tmp/" not in body and "/work/" not in body
    hits = client.post("/search?k=40&rerank=none", files=upload(query)).json()["results"]
    assert hits and all(not hit["path"].startswith("/") for hit in hits)
    assert any(hit["path"].startswith("uploads/") for hit in
               client.post("/search?k=1&rerank=none", files=upload(photo)).json()["results"])
    assert client.delete(f"/images/{added['id']}").status_code == 200


# ----------------------------------------------------------------------------- one image, schema, 405
def test_a_query_with_two_images_is_refused(served):
    client, _, index = served
    query = next(iter(index.queries.values())).read_bytes()
    two = [("image", ("a.jpg", query)), ("image", ("b.jpg", query))]
    for path in ("/search", "/match/1"):
        response = client.post(path, files=two)
        assert response.status_code == 422 and "one photo per query" in response.json()["detail"]


def test_the_schema_states_the_limits_that_are_settings(served):
    client, _, _ = served
    schema = client.get("/openapi.json").json()
    (k,) = [p for p in schema["paths"]["/search"]["post"]["parameters"] if p["name"] == "k"]
    integer = next(option for option in k["schema"]["anyOf"] if option.get("type") == "integer")
    assert integer["minimum"] == 1 and integer["maximum"] == 40
    bodies = schema["components"]["schemas"]
    add_body = next(body for name, body in bodies.items() if name.startswith("Body_add_images"))
    assert add_body["properties"]["image"]["maxItems"] == 3 and add_body["properties"]["image"]["items"]["minLength"] == 1
    search_body = next(body for name, body in bodies.items() if name.startswith("Body_search"))
    assert search_body["properties"]["image"]["minLength"] == 1
    statuses = schema["paths"]["/images"]["post"]["responses"].keys()
    assert {"409", "503", "507"} <= set(statuses)


def test_405_names_every_method_the_path_allows(served):
    client, _, _ = served
    response = client.post("/images/1")
    assert response.status_code == 405
    assert {m.strip() for m in response.headers["allow"].split(",")} == {"GET", "DELETE"}


# ----------------------------------------------------------------------------- writes never stall searches
def test_a_held_write_lock_fails_writes_after_the_wait_and_searches_go_on(served, data_file):
    client, root, index = served
    photo = data_file("abo_sample/B0799CK52K/25ffa37c.jpg").read_bytes()
    query = next(iter(index.queries.values())).read_bytes()
    fd = os.open(root / "write.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # as `waldo index add` in another process would
    outcomes: dict[str, object] = {}

    def add() -> None:
        start = time.monotonic()
        outcomes["add"] = client.post("/images", files=upload(photo))
        outcomes["add_s"] = time.monotonic() - start

    try:
        writer = threading.Thread(target=add)
        writer.start()
        time.sleep(0.2)
        start = time.monotonic()
        searched = client.post("/search?k=3&rerank=none", files=upload(query))
        search_s = time.monotonic() - start
        writer.join(30)
    finally:
        os.close(fd)
    assert searched.status_code == 200 and search_s < 5
    response = outcomes["add"]
    assert response.status_code == 503, response.text
    assert "busy" in response.json()["detail"] and response.headers["retry-after"]
    assert outcomes["add_s"] < 15  # write_wait_s is 1 s here: bounded, not for ever
    # The lock is free again: the same add now succeeds.
    ok = client.post("/images", files=upload(photo))
    assert ok.status_code == 201, ok.text
    assert client.delete(f"/images/{ok.json()['images'][0]['id']}").status_code == 200


# ----------------------------------------------------------------------------- host and origin
def test_default_allowed_hosts_follow_the_binding():
    assert default_allowed_hosts("127.0.0.1") == ("localhost", "127.0.0.1", "::1")
    assert default_allowed_hosts("::1") == ("localhost", "127.0.0.1", "::1")
    assert "127.0.0.2" in default_allowed_hosts("127.0.0.2")
    assert default_allowed_hosts("0.0.0.0") == ("*",)
    assert host_name("[::1]:8000") == "::1" and host_name("Example.ORG:80") == "example.org"


def _run_guard(guard, method: str, headers: dict[str, str]) -> int:
    sent: list[dict] = []

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": method,
             "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()]}
    asyncio.run(guard(scope, None, send))
    return sent[0]["status"] if sent else 0


def test_host_and_origin_guard():
    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    loopback = HostOriginGuard(app, default_allowed_hosts("127.0.0.1"))
    assert _run_guard(loopback, "GET", {"host": "127.0.0.1:8000"}) == 200
    assert _run_guard(loopback, "GET", {"host": "localhost:8000"}) == 200
    assert _run_guard(loopback, "GET", {"host": "[::1]:8000"}) == 200
    # DNS rebinding: the page's own name arrives as Host.
    assert _run_guard(loopback, "GET", {"host": "evil.example:8000"}) == 400
    # Cross-site writes: a foreign Origin, a "null" origin, or a cross-site fetch without Origin.
    write = {"host": "127.0.0.1:8000"}
    assert _run_guard(loopback, "POST", {**write, "origin": "http://127.0.0.1:8000"}) == 200
    assert _run_guard(loopback, "POST", {**write, "origin": "http://evil.example"}) == 403
    assert _run_guard(loopback, "DELETE", {**write, "origin": "null"}) == 403
    assert _run_guard(loopback, "POST", {**write, "sec-fetch-site": "cross-site"}) == 403
    assert _run_guard(loopback, "POST", write) == 200  # curl, scripts: no Origin at all
    anywhere = HostOriginGuard(app, ("*",))
    assert _run_guard(anywhere, "GET", {"host": "search.example.org"}) == 200
    assert _run_guard(anywhere, "POST", {"host": "search.example.org", "origin": "https://search.example.org"}) == 200
    assert _run_guard(anywhere, "POST", {"host": "search.example.org", "origin": "https://evil.example"}) == 403


def test_the_cli_turns_host_checks_on_for_loopback(grocery_index, tmp_path):
    """Through the real `waldo serve` on 127.0.0.1: a foreign Host gets 400, a foreign Origin's
    write 403, and the page's own requests pass."""
    import json
    import urllib.error
    import urllib.request

    from waldo.serve.process import start_server

    index = tmp_path / "index"
    shutil.copytree(grocery_index.root, index)

    def status(url: str, method: str = "GET", headers: dict | None = None) -> int:
        request = urllib.request.Request(url, method=method, headers=headers or {}, data=b"" if method != "GET" else None)
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status
        except urllib.error.HTTPError as error:
            return error.code

    with start_server(index, tmp_path / "server.log", "--no-compile-rrt") as server:
        port = server.url.rsplit(":", 1)[1]
        assert status(f"{server.url}/stats") == 200
        assert json.loads(urllib.request.urlopen(f"{server.url}/stats", timeout=30).read())["images"] > 0
        assert status(f"{server.url}/stats", headers={"Host": f"rebind.example:{port}"}) == 400
        assert status(f"{server.url}/images/1", "DELETE", {"Origin": "http://evil.example"}) == 403
        assert status(f"{server.url}/images/999999", "DELETE", {"Origin": server.url}) == 404


# ----------------------------------------------------------------------------- slow bodies
def _body_guard_status(receive_delays: list[float], *, idle: float, total: float) -> tuple[int, float]:
    """Status and time of a body guard fed chunks after ``receive_delays`` seconds each; the
    app behind it reads the whole body as FastAPI would and answers 200."""
    from fastapi import HTTPException

    async def app(scope, receive, send):
        try:
            while True:
                message = await receive()
                if not message.get("more_body"):
                    break
        except HTTPException as error:
            await send({"type": "http.response.start", "status": error.status_code, "headers": []})
            await send({"type": "http.response.body", "body": error.detail.encode()})
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    delays = list(receive_delays)

    async def receive():
        await asyncio.sleep(delays.pop(0))
        return {"type": "http.request", "body": b"x", "more_body": bool(delays)}

    sent: list[dict] = []

    async def send(message):
        sent.append(message)

    guard = BodySizeLimit(app, max_body_bytes=1000, max_inflight=4, max_buffered_bytes=10_000,
                          idle_timeout=idle, total_timeout=total)
    scope = {"type": "http", "method": "POST", "headers": [(b"content-length", b"100")]}
    start = time.monotonic()
    asyncio.run(guard(scope, receive, send))
    assert guard.inflight == 0 and guard.buffered == 0  # everything given back
    return sent[0]["status"], time.monotonic() - start


def test_a_stalled_body_gets_408_after_the_idle_timeout():
    status, seconds = _body_guard_status([0.0, 0.0, 5.0], idle=0.3, total=10)
    assert status == 408 and seconds < 2


def test_a_trickling_body_gets_408_at_the_total_deadline():
    status, seconds = _body_guard_status([0.15] * 40, idle=0.5, total=1.0)
    assert status == 408 and 0.9 < seconds < 3


def test_a_steady_body_passes():
    assert _body_guard_status([0.01] * 10, idle=0.5, total=5)[0] == 200


def test_bodies_held_in_memory_are_bounded_as_bytes_arrive():
    async def scenario() -> tuple[int, int]:
        from fastapi import HTTPException

        statuses: list[int] = []

        async def app(scope, receive, send):
            try:
                while (await receive()).get("more_body"):
                    pass
            except HTTPException as error:
                statuses.append(error.status_code)
                return
            statuses.append(200)

        guard = BodySizeLimit(app, max_body_bytes=10_000, max_inflight=10, max_buffered_bytes=1500)
        gate = asyncio.Event()

        def receiver(chunks: int):
            left = [chunks]

            async def receive():
                left[0] -= 1
                if left[0] == 0:
                    await gate.wait()  # hold the body in memory until both have sent their bytes
                return {"type": "http.request", "body": b"x" * 500, "more_body": left[0] > 0}
            return receive

        scope = {"type": "http", "method": "POST", "headers": [(b"content-length", b"1500")]}
        first = asyncio.create_task(guard(scope, receiver(3), None))
        second = asyncio.create_task(guard(scope, receiver(3), None))
        await asyncio.sleep(0.05)
        gate.set()
        await asyncio.gather(first, second)
        return sorted(statuses), guard.buffered

    statuses, buffered = asyncio.run(scenario())
    assert statuses == [200, 429] and buffered == 0
