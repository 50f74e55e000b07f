"""A real browser on the real page: Debian's Chromium driven by Playwright, against a live
``waldo serve`` on loopback. Uploads a held-out grocery photo and checks that the top result
shows the same product, that what the page shows says what it is (whole labels, bars of the score
that ordered the list, what each ranking does) and that a failed upload leaves nothing of the
previous search behind; saves screenshots to $WALDO_TEST_ARTIFACTS (default tests/artifacts/),
and one of the page whenever a test fails there (failed-<test>.png).

Chromium comes from apt (``.ci/run`` installs it); ``playwright install`` is never used. Without
Playwright or Chromium the test is skipped locally and fails in CI (``CI=true``).
"""

from __future__ import annotations

import base64
import re
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
def _page_shot_on_failure(browser, shot: Path, width: int, height: int) -> Iterator:
    """A new page, closed afterwards; if the block raises, a full-page screenshot goes to
    ``shot`` first (what the page showed is most of what a failed browser test can tell)."""
    page = browser.new_page(viewport={"width": width, "height": height})
    try:
        yield page
    except Exception:
        try:
            page.screenshot(path=str(shot), full_page=True)
        except Exception as error:  # a crashed page: keep the test's own error
            print(f"no screenshot of the failure: {error}")
        raise
    finally:
        page.close()


@pytest.fixture
def open_page(browser, artifacts_dir, request):
    """``with open_page(width, height) as page:``, a page that screenshots a failure to
    artifacts_dir/failed-<test name>.png."""
    shot = artifacts_dir / f"failed-{request.node.name.replace('/', '_')}.png"
    return lambda width=1280, height=900: _page_shot_on_failure(browser, shot, width, height)


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


def test_upload_shows_the_same_product_first(open_page, live_server, grocery_index, artifacts_dir):
    with open_page(1280, 900) as page:
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


def test_drop_and_paste_start_a_search(open_page, live_server, grocery_index):
    with open_page(900, 800) as page:
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


def test_a_reranker_registered_in_a_test_gets_a_button_on_the_page(open_page, grocery_index, tmp_path, monkeypatch):
    """The page offers what the registry holds: a reranker no other file knows of gets its button,
    and choosing it shows its order (the global ranks, reversed)."""
    import shutil

    from waldo.rerank import RERANKERS

    monkeypatch.setattr(RERANKERS, "_specs", dict(RERANKERS._specs))  # restored after the test
    RERANKERS.register("toy-reverse", description="the global order, backwards")(lambda setup: _Reverse())
    shutil.copytree(grocery_index.root, tmp_path / "index")
    with _in_process_server(tmp_path / "index") as url:
        with open_page(1280, 900) as page:
            page.goto(url)
            button = page.wait_for_selector("#mode-toggle button[data-mode='toy-reverse']")
            page.set_input_files("#file-input", str(grocery_index.queries["29"]))
            page.wait_for_selector("#results .card", timeout=60_000)
            button.click()
            moved = page.locator("#results[data-rerank='toy-reverse'] .card .move:not([hidden])")
            _wait(lambda: moved.count() == 20, "toy-reverse results")
            before = [int(badge.get_attribute("title").removeprefix("global rank #")) for badge in moved.all()]
            assert before == sorted(before, reverse=True) and before[0] > 20  # the global top-100, backwards


def test_the_default_chosen_on_validation_is_preselected_and_marked(open_page, default_rrt_index, artifacts_dir):
    """An index whose reranker folder stores a default (rrt-fusion): the page starts on it, marks
    its button, and the first search runs it; the global ranking stays one click away."""
    index, paths = default_rrt_index
    with _in_process_server(index) as url:
        with open_page(1280, 900) as page:
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
            # The choice was for that photo: the next one starts on the default again.
            page.set_input_files("#file-input", paths[1])
            page.wait_for_selector("#results[data-rerank='rrt-fusion'] .card", timeout=60_000)
            assert button.get_attribute("aria-checked") == "true"


def test_without_a_stored_default_the_page_starts_on_the_global_ranking(open_page, live_server):
    with open_page(900, 800) as page:
        page.goto(live_server.url)
        button = page.wait_for_selector("#mode-toggle button[data-mode='none']")
        assert button.get_attribute("aria-checked") == "true"
        assert page.locator("#mode-toggle button[data-default]").count() == 0


# ----------------------------------------------------------------------------- what the page says

def _sentence(description: str) -> str:
    """A registry description as the page shows it under the toggle (capital, final stop)."""
    text = description.strip()
    text = text[0].upper() + text[1:]
    return text if text.endswith((".", "!", "?")) else f"{text}."


def _expected_bars(scores: list[float], kind: str) -> list[float]:
    """Bar widths in percent for scores of ``kind``, the page's rule: probabilities as they are,
    inliers relative to the most, anything else relative to the top score (from 0, or from the
    lowest score if negative); never below 4%."""
    if kind == "RRT probability":
        shares = scores
    elif kind == "inliers":
        most = max(scores)
        shares = [s / most if most > 0 else 0.0 for s in scores]
    else:
        top, floor = max(scores), min(0.0, *scores)
        shares = [(s - floor) / (top - floor) if top > floor else 1.0 for s in scores]
    return [100 * max(0.04, min(1.0, share)) for share in shares]


def test_labels_are_whole_and_bars_follow_the_score_that_ordered_the_list(open_page, live_server, grocery_index,
                                                                        artifacts_dir):
    """Products often differ only at the end of their label: cards show it whole. The bar is the
    score the list was ordered by (not the global similarity), so it shrinks with rank in every
    mode, and the dialog names that score with its unit."""
    long_label = "Tropicana-Juice-Mandarin-Smooth-Without-Pulp-1-Litre-Carton"
    photo = grocery_index.queries["29"]
    answers: dict[str, dict] = {}

    def lengthen_a_label(route):
        """Answer the page's search with the server's answer for the same photo (kept for the
        checks), one label made as long as real ones get. Re-posted from here: an intercepted
        request does not carry the File part of the page's form, so route.fetch() sends none."""
        response = page.request.post(route.request.url, multipart={
            "image": {"name": photo.name, "mimeType": "image/jpeg", "buffer": photo.read_bytes()}})
        body = response.json()
        assert response.ok, body
        body["results"][1]["label"] = long_label
        answers[body["rerank"]] = body
        route.fulfill(response=response, json=body)

    with open_page(1000, 900) as page:  # about three narrow cards a row
        page.route(re.compile(r"/search\?"), lengthen_a_label)
        page.goto(live_server.url)
        page.wait_for_selector("#mode-toggle button[data-mode='gv']")
        page.set_input_files("#file-input", str(photo))
        for mode in ("none", "gv"):
            page.click(f"#mode-toggle button[data-mode='{mode}']")
            cards = page.locator(f"#results[data-rerank='{mode}'] .card")
            _wait(lambda cards=cards: cards.count() == 20, f"{mode} results")
            body = answers[mode]
            hits = {str(hit["id"]): hit for hit in body["results"]}

            labels = page.locator("#results .card .label")
            shown = labels.evaluate_all("""labels => labels.map(label => ({
                text: label.innerText, overflow: getComputedStyle(label).textOverflow,
                fits: label.scrollWidth <= label.clientWidth && label.scrollHeight <= label.clientHeight + 1}))""")
            for card, label in zip(cards.all(), shown, strict=True):
                assert label["text"] == hits[card.get_attribute("data-id")]["label"]
                assert label["fits"] and label["overflow"] != "ellipsis", label
            assert long_label in [label["text"] for label in shown]
            tooltip = page.locator(f"#results .card[data-label='{long_label}'] .card-button").get_attribute("title")
            assert tooltip.startswith(long_label)

            ranks = [int(card.get_attribute("data-rank")) for card in cards.all()]
            assert ranks == sorted(ranks)
            widths = [float(width.rstrip("%")) for width in
                      page.locator("#results .card .score-bar i").evaluate_all("bars => bars.map(bar => bar.style.width)")]
            assert widths == sorted(widths, reverse=True), (mode, widths)  # never longer further down
            ordered = [hits[card.get_attribute("data-id")] for card in cards.all()]
            expected = _expected_bars([hit["score"] for hit in ordered], body["score_kind"])
            assert widths == pytest.approx(expected, abs=0.06), (mode, body["score_kind"])
            assert body["score_kind"] in page.locator("#score-legend").inner_text()
        page.screenshot(path=str(artifacts_dir / "search_page_long_label.png"))
        # Geometric verification reorders this carton's photos: the global similarity would
        # give a longer bar below #1 (what the bars used to show).
        gv_hits = answers["gv"]["results"]
        assert [hit["rank_before_rerank"] for hit in gv_hits] != list(range(1, 21))
        assert max(hit["global_score"] for hit in gv_hits[1:]) > gv_hits[0]["global_score"]

        page.locator("#results .card").first.locator("button").click()
        page.wait_for_selector("#pair-dialog[open]")
        facts = dict(zip(page.locator("#pair-facts dt").all_inner_texts(),
                         page.locator("#pair-facts dd").all_inner_texts(), strict=True))
        first = gv_hits[0]
        assert facts["label"].startswith(first["label"])
        kind = answers["gv"]["score_kind"]
        assert kind in facts["ranked by"] and "global similarity" in facts
        assert facts["global similarity"] == f"{first['global_score']:.3f}"
        assert facts["rank"].startswith("#1")
        assert "inliers" in facts["geometric verification"]
        assert not [term for term in facts if term in ("score", "identity", "id")]  # no unexplained numbers
        page.keyboard.press("Escape")


def test_a_failed_upload_leaves_nothing_of_the_previous_search(open_page, live_server, grocery_index):
    """A photo, then a file that is no image: the earlier results, note and timings go, the
    error shows where the photo was put, and no broken-image icon is left there."""
    broken = {"name": "broken.jpg", "mimeType": "image/jpeg", "buffer": b"not an image"}
    with open_page(1280, 900) as page:
        page.goto(live_server.url)
        page.wait_for_selector("#mode-toggle button[data-mode='gv']")
        page.set_input_files("#file-input", str(grocery_index.queries["29"]))
        page.wait_for_selector("#results[data-rerank='none'] .card", timeout=60_000)
        page.click("#mode-toggle button[data-mode='gv']")
        page.wait_for_selector("#results[data-rerank='gv'] .card", timeout=60_000)
        assert page.locator("#timings").is_visible() and "Geometric" in page.locator("#results-note").inner_text()

        page.set_input_files("#file-input", files=[broken])
        error = page.locator("#dropzone [role='alert']")
        _wait(lambda: error.is_visible(), "the error in the drop zone")
        answer = page.request.post(f"{live_server.url}/search", multipart={"image": broken})
        assert answer.status in (400, 415, 422)
        assert answer.json()["detail"] in error.inner_text()
        grid = page.locator("#results")
        assert grid.locator(".card").count() == 0 or "stale" in (grid.get_attribute("class") or "")
        assert not page.locator("#timings").is_visible()
        note = page.locator("#results-note").inner_text()
        assert "Geometric" not in note and "verified" not in note
        preview = page.locator("#query-preview")  # hidden, or a picture that really decoded
        assert preview.evaluate("img => img.hidden || (img.complete && img.naturalWidth > 0)")

        # The next good photo searches again and the error goes.
        page.set_input_files("#file-input", str(grocery_index.queries["45"]))
        page.wait_for_selector("#results .card[data-rank='1'][data-identity='45']", timeout=60_000)
        assert not error.is_visible() and page.locator("#timings").is_visible()
        assert preview.is_visible()


def test_the_page_explains_itself_and_each_photo_starts_on_the_default(open_page, live_server, grocery_index):
    """What the page does and what the chosen ranking does are on the page, not in tooltips; a
    ranking chosen for one photo does not stick to the next."""
    with open_page(1280, 900) as page:
        page.goto(live_server.url)
        page.wait_for_selector("#mode-toggle button[data-mode='gv']")
        stats = page.request.get(f"{live_server.url}/stats").json()
        info, default = stats["reranker_info"], stats["default_reranker"]
        assert f"{stats['images']} indexed images" in page.locator("#intro").inner_text()
        # One sentence, not one row per text node.
        assert " ".join(page.locator("#dropzone-hint").inner_text().split()) == "Drop a photo, paste one, or choose a file"
        for mode in stats["rerankers"]:
            assert page.locator(f"#mode-toggle button[data-mode='{mode}']").inner_text().startswith(info[mode]["title"])
        explanation = page.locator("#mode-explanation")
        assert explanation.is_visible() and _sentence(info[default]["description"]) in explanation.inner_text()

        page.set_input_files("#file-input", str(grocery_index.queries["29"]))
        page.wait_for_selector(f"#results[data-rerank='{default}'] .card", timeout=60_000)
        other = next(mode for mode in stats["rerankers"] if mode != default)
        page.click(f"#mode-toggle button[data-mode='{other}']")
        page.wait_for_selector(f"#results[data-rerank='{other}'] .card", timeout=60_000)
        assert _sentence(info[other]["description"]) in explanation.inner_text()

        page.set_input_files("#file-input", str(grocery_index.queries["45"]))
        page.wait_for_selector(f"#results[data-rerank='{default}'] .card[data-rank='1'][data-identity='45']",
                               timeout=60_000)
        checked = page.locator("#mode-toggle button[aria-checked='true']")
        assert checked.count() == 1 and checked.get_attribute("data-mode") == default
        assert _sentence(info[default]["description"]) in explanation.inner_text()
        # Back on the other ranking for this photo: a click still works.
        page.click(f"#mode-toggle button[data-mode='{other}']")
        page.wait_for_selector(f"#results[data-rerank='{other}'] .card", timeout=60_000)
