"""Server hygiene: the optional API key of the write endpoints, and the defaults that keep a
fresh ``waldo serve`` private (loopback only).

Upload size and pixel limits (checked before decoding) and images served only by id from the
index are tested in tests/serve/test_api.py (``test_uploads_over_the_size_limit_*``,
``test_search_refuses_bad_images``, ``test_images_are_only_reachable_by_id``).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from waldo import cli
from waldo.serve import ServeSettings, create_app
from waldo.serve.process import start_server

KEY = "s3cret-key-for-tests"

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def upload(path: Path) -> dict:
    return {"image": (path.name, path.read_bytes(), "image/jpeg")}


@pytest.fixture(scope="module")
def keyed(small_index, tmp_path_factory):
    """The app with an API key, over a private copy of the small index."""
    root = tmp_path_factory.mktemp("keyed") / "index"
    shutil.copytree(small_index.root, root)
    with TestClient(create_app(root, ServeSettings(api_key=KEY))) as client:
        yield client, root


@pytest.mark.parametrize("headers", [{}, {"X-API-Key": ""}, {"X-API-Key": "wrong"}, {"X-API-Key": KEY + "x"},
                                     {"X-API-Key": KEY[:-1]}, {"Authorization": f"Bearer {KEY}"},
                                     {"X-API-Key": KEY.upper()}])
def test_writes_without_the_right_key_are_refused(keyed, small_index, headers):
    client, root = keyed
    live_id = client.post("/search?k=1", files=upload(small_index.queries[0])).json()["results"][0]["id"]
    before = client.get("/healthz").json()["images"]
    uploads = sorted((root / "uploads").glob("*")) if (root / "uploads").exists() else []
    add = client.post("/images", files=upload(small_index.queries[0]), headers=headers)
    assert add.status_code == 401, add.text
    assert "X-API-Key" in add.json()["detail"] and KEY not in add.text
    remove = client.delete(f"/images/{live_id}", headers=headers)
    assert remove.status_code == 401, remove.text
    # Nothing was written: neither the index nor the uploads folder changed.
    assert client.get("/healthz").json()["images"] == before
    assert client.get(f"/images/{live_id}").status_code == 200
    assert (sorted((root / "uploads").glob("*")) if (root / "uploads").exists() else []) == uploads


def test_the_key_is_checked_before_the_request_is_validated(keyed):
    """A write without the key learns nothing about what else is wrong with it."""
    client, _ = keyed
    assert client.post("/images").status_code == 401  # no image field: still 401, not 422
    assert client.delete("/images/abc").status_code == 401  # bad id: still 401
    assert client.delete("/images/999999").status_code == 401  # unknown id: still 401, not 404


def test_writes_with_the_key_work_and_reads_stay_open(keyed, small_index):
    client, _ = keyed
    query = small_index.queries[1]
    found = client.post("/search?k=3", files=upload(query))  # reads need no key
    assert found.status_code == 200 and len(found.json()["results"]) == 3
    assert client.get("/healthz").status_code == client.get("/stats").status_code == 200
    top = found.json()["results"][0]["id"]
    assert client.get(f"/images/{top}").status_code == client.get(f"/thumbnails/{top}").status_code == 200
    assert client.post(f"/match/{top}", files=upload(query)).status_code == 200
    added = client.post("/images", files=upload(query), data={"identity": "q"}, headers={"X-API-Key": KEY})
    assert added.status_code == 201, added.text
    image_id = added.json()["images"][0]["id"]
    assert client.delete(f"/images/{image_id}", headers={"X-API-Key": KEY}).status_code == 200
    assert client.get(f"/images/{image_id}").status_code == 404


def test_the_schema_documents_the_key(keyed):
    client, _ = keyed
    schema = client.get("/openapi.json").json()
    assert schema["components"]["securitySchemes"]["APIKeyHeader"] == {
        "type": "apiKey", "in": "header", "name": "X-API-Key",
        "description": schema["components"]["securitySchemes"]["APIKeyHeader"]["description"]}
    for path, method in (("/images", "post"), ("/images/{image_id}", "delete")):
        operation = schema["paths"][path][method]
        assert operation["security"] == [{"APIKeyHeader": []}] and "401" in operation["responses"]
    assert "security" not in schema["paths"]["/search"]["post"]


def test_without_a_key_writes_are_open(small_index, tmp_path):
    root = tmp_path / "index"
    shutil.copytree(small_index.root, root)
    with TestClient(create_app(root)) as client:
        added = client.post("/images", files=upload(small_index.queries[2]))
        assert added.status_code == 201, added.text
        assert client.delete(f"/images/{added.json()['images'][0]['id']}").status_code == 200


def test_an_empty_key_is_refused_at_start_up():
    with pytest.raises(ValueError, match="api_key"):
        ServeSettings(api_key="  ")
    assert KEY not in repr(ServeSettings(api_key=KEY))  # settings may be logged; the key is not


# ----------------------------------------------------------------------------- the CLI
@pytest.fixture
def served_settings(monkeypatch, small_index):
    """Run ``cmd_serve`` with uvicorn replaced: returns (settings, host) it would serve with."""
    captured = {}

    def fake_run(app, host, port, **kwargs):
        captured.update(settings=app.state.settings, host=host, port=port)

    import uvicorn

    monkeypatch.setattr(uvicorn, "run", fake_run)
    monkeypatch.delenv("WALDO_API_KEY", raising=False)

    def serve(*args: str):
        captured.clear()
        code = cli.main(["serve", "--index", str(small_index.root), *args])
        return code, captured.get("settings"), captured.get("host")

    return serve


def test_cli_key_from_flag_or_environment(served_settings, monkeypatch, capsys):
    code, settings, host = served_settings()
    assert code == 0 and settings.api_key is None
    assert host == "127.0.0.1"  # private by default
    assert settings.max_inflight_uploads == 64
    assert served_settings("--max-inflight-uploads", "32")[1].max_inflight_uploads == 32
    code, settings, _ = served_settings("--api-key", KEY)
    assert code == 0 and settings.api_key == KEY
    monkeypatch.setenv("WALDO_API_KEY", "from-env")
    assert served_settings()[1].api_key == "from-env"
    assert served_settings("--api-key", KEY)[1].api_key == KEY  # the flag wins
    monkeypatch.setenv("WALDO_API_KEY", "")
    assert served_settings()[1].api_key is None  # an empty variable means no key
    code, settings, _ = served_settings("--api-key", "")
    assert code != 0 and settings is None  # an empty flag is a mistake, not "no key"
    assert KEY not in capsys.readouterr().out  # the key is never printed


def test_live_server_with_the_key_from_the_environment(small_index, tmp_path, monkeypatch):
    """End to end: ``waldo serve`` started as a user would, with $WALDO_API_KEY, on loopback."""
    root = tmp_path / "index"
    shutil.copytree(small_index.root, root)
    monkeypatch.setenv("WALDO_API_KEY", KEY)
    with start_server(root, tmp_path / "server.log") as server:
        photo = small_index.queries[0]
        with httpx.Client(base_url=server.url, timeout=60) as client:
            assert client.post("/images", files=upload(photo)).status_code == 401
            assert client.post("/images", files=upload(photo), headers={"X-API-Key": "nope"}).status_code == 401
            assert client.post("/search", files=upload(photo)).status_code == 200
            added = client.post("/images", files=upload(photo), headers={"X-API-Key": KEY})
            assert added.status_code == 201, added.text
            image_id = added.json()["images"][0]["id"]
            assert client.delete(f"/images/{image_id}").status_code == 401
            assert client.delete(f"/images/{image_id}", headers={"X-API-Key": KEY}).status_code == 200
        log = server.log_text()
    assert "X-API-Key" in log and KEY not in log
