"""A real browser on the real page: Debian's Chromium driven by Playwright, against a live
``waldo serve`` on loopback. Uploads a held-out grocery photo and checks that the top result
shows the same product; saves screenshots to $WALDO_TEST_ARTIFACTS (default tests/artifacts/).

Chromium comes from apt (``.ci/run`` installs it); ``playwright install`` is never used. Without
Playwright or Chromium the test is skipped locally and fails in CI (``CI=true``).
"""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def _wait(predicate, what: str, timeout: float = 60.0) -> None:
    """Poll ``predicate`` (page.wait_for_function evaluates strings, which the page's CSP forbids)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@contextmanager
def _in_process_server(index: Path) -> Iterator[str]:
    """``waldo serve``'s app under uvicorn in a thread of this process (so a test's registry or
    monkeypatches hold there too), on a free loopback port; yields its URL."""
    import socket
    import threading

    import uvicorn

    from waldo.serve.app import create_app
    from waldo.serve.settings import ServeSettings

    with socket.socket() as probe:  # a free loopback port
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    app = create_app(index, ServeSettings(compile_rrt=False))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        _wait(lambda: server.started, "the in-process server", timeout=120)
        yield f"http://127.0.0.1:{port}/"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="module")
def browser(require_module, missing_dependency):
    sync_api = require_module("playwright.sync_api", "make setup installs it")
    if not CHROMIUM.exists():
        missing_dependency(f"{CHROMIUM} is missing (apt-get install -y chromium)")
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            yield chromium
        finally:
            chromium.close()


def test_upload_shows_the_same_product_first(browser, live_server, grocery_index, artifacts_dir):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    problems: list[str] = []
    page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
    page.on("console", lambda message: problems.append(f"console: {message.text}") if message.type == "error" else None)
    page.on("request", lambda request: problems.append(f"off-site request: {request.url}")
            if not request.url.startswith((live_server.url, "blob:", "data:")) else None)
    page.goto(live_server.url)
    page.wait_for_selector("#mode-toggle button[data-mode='none']")
    assert "images" in page.locator("#index-info").inner_text()

    identity = "29"  # Bravo orange juice: a packaged product, the page must find that very carton
    page.set_input_files("#file-input", str(grocery_index.queries[identity]))
    _wait(lambda: page.locator("#query-preview").is_visible(), "the query preview")
    page.wait_for_selector("#results .card", timeout=60_000)
    cards = page.locator("#results .card")
    assert cards.count() == 20
    first = cards.first
    assert first.get_attribute("data-identity") == identity
    assert first.locator(".label").inner_text() == grocery_index.labels[identity]
    assert first.locator(".rank-badge").inner_text() == "#1"
    _wait(lambda: page.locator("#results img").evaluate_all(
        "images => images.every(image => image.complete && image.naturalWidth > 0)"), "thumbnails")
    for stage in ("extract", "search", "rerank", "total"):
        assert page.locator(f"#timing-legend dd[data-stage='{stage}']").inner_text().endswith("ms")
    page.screenshot(path=str(artifacts_dir / "search_page.png"))

    first.locator("button").click()
    page.wait_for_selector("#pair-dialog[open]")
    _wait(lambda: page.locator("#pair-note").inner_text() != "Verifying…", "the match")
    assert page.locator("#pair-canvas").evaluate("canvas => canvas.width") > 100
    page.screenshot(path=str(artifacts_dir / "pair_view.png"))
    page.keyboard.press("Escape")

    rerankers = [b.get_attribute("data-mode") for b in page.locator("#mode-toggle button").all()]
    for mode in rerankers[1:]:  # each reranker the server offers: ranks move, old rank shown
        page.click(f"#mode-toggle button[data-mode='{mode}']")
        moved = page.locator(f"#results[data-rerank='{mode}'] .card .move:not([hidden])")
        _wait(lambda moved=moved: moved.count() == 20, f"{mode} results")
        # Every card names its global rank; together they are distinct ranks of the global list.
        before = [int(badge.get_attribute("title").removeprefix("global rank #")) for badge in moved.all()]
        assert len(set(before)) == 20
        page.screenshot(path=str(artifacts_dir / f"search_page_{mode.replace('+', '_')}.png"))
    assert problems == []


def test_drop_and_paste_start_a_search(browser, live_server, grocery_index):
    page = browser.new_page(viewport={"width": 900, "height": 800})
    page.goto(live_server.url)
    page.wait_for_selector("#mode-toggle button")
    for event, identity in (("drop", "45"), ("paste", "23")):
        data = base64.b64encode(grocery_index.queries[identity].read_bytes()).decode()
        page.evaluate("""([event, data]) => {
            const bytes = Uint8Array.from(atob(data), c => c.charCodeAt(0));
            const transfer = new DataTransfer();
            transfer.items.add(new File([bytes], "photo.jpg", { type: "image/jpeg" }));
            const target = event === "drop" ? window : document;
            const init = { bubbles: true, cancelable: true };
            target.dispatchEvent(event === "drop" ? new DragEvent("drop", { ...init, dataTransfer: transfer })
                                                  : new ClipboardEvent("paste", { ...init, clipboardData: transfer }));
        }""", [event, data])
        cards = page.locator(f"#results .card[data-identity='{identity}'][data-rank='1']")
        _wait(lambda cards=cards: cards.count() == 1, f"{identity} first after the {event}")


class _Reverse:
    """A toy reranker registered by this test alone: the global order, backwards."""

    name = "toy-reverse"

    def rerank(self, query, candidates):
        from waldo.rerank import RerankResult

        n = len(candidates)
        return RerankResult(np.arange(n)[::-1].copy(), np.arange(n, 0, -1).astype(np.float32))


def test_a_reranker_registered_in_a_test_gets_a_button_on_the_page(browser, grocery_index, tmp_path, monkeypatch):
    """The page offers what the registry holds: a reranker no other file knows of gets its button,
    and choosing it shows its order (the global ranks, reversed)."""
    import shutil

    from waldo.rerank import RERANKERS

    monkeypatch.setattr(RERANKERS, "_specs", dict(RERANKERS._specs))  # restored after the test
    RERANKERS.register("toy-reverse", description="the global order, backwards")(lambda setup: _Reverse())
    shutil.copytree(grocery_index.root, tmp_path / "index")
    with _in_process_server(tmp_path / "index") as url:
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(url)
        button = page.wait_for_selector("#mode-toggle button[data-mode='toy-reverse']")
        page.set_input_files("#file-input", str(grocery_index.queries["29"]))
        page.wait_for_selector("#results .card", timeout=60_000)
        button.click()
        moved = page.locator("#results[data-rerank='toy-reverse'] .card .move:not([hidden])")
        _wait(lambda: moved.count() == 20, "toy-reverse results")
        before = [int(badge.get_attribute("title").removeprefix("global rank #")) for badge in moved.all()]
        assert before == sorted(before, reverse=True) and before[0] > 20  # the global top-100, backwards


def test_the_default_chosen_on_validation_is_preselected_and_marked(browser, default_rrt_index, artifacts_dir):
    """An index whose reranker folder stores a default (rrt-fusion): the page starts on it, marks
    its button, and the first search runs it; the global ranking stays one click away."""
    index, paths = default_rrt_index
    with _in_process_server(index) as url:
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(url)
        button = page.wait_for_selector("#mode-toggle button[data-mode='rrt-fusion']")
        assert button.get_attribute("aria-checked") == "true" and button.get_attribute("data-default") == "true"
        assert "default (chosen on validation)" in button.inner_text()
        assert page.locator("#mode-toggle button[aria-checked='true']").count() == 1
        assert page.locator("#mode-toggle button[data-default]").count() == 1
        page.set_input_files("#file-input", paths[0])
        page.wait_for_selector("#results[data-rerank='rrt-fusion'] .card", timeout=60_000)
        assert "the default" in page.locator("#results-note").inner_text()
        page.screenshot(path=str(artifacts_dir / "search_page_default_reranker.png"))
        page.click("#mode-toggle button[data-mode='none']")
        page.wait_for_selector("#results[data-rerank='none'] .card", timeout=60_000)
        assert page.locator("#mode-toggle button[data-mode='none']").get_attribute("aria-checked") == "true"


def test_without_a_stored_default_the_page_starts_on_the_global_ranking(browser, live_server):
    page = browser.new_page(viewport={"width": 900, "height": 800})
    page.goto(live_server.url)
    button = page.wait_for_selector("#mode-toggle button[data-mode='none']")
    assert button.get_attribute("aria-checked") == "true"
    assert page.locator("#mode-toggle button[data-default]").count() == 0
