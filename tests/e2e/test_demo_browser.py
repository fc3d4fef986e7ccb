"""The Gradio demo in a real headless Chromium (Playwright driving the system browser).

Without gradio, playwright or a Chromium binary the tests skip, unless
STREAMRT_REQUIRE_E2E=1 (set by `.ci/run`, which installs them), where that is a failure.
"""

from __future__ import annotations

import os
import shutil
import socket
import time

import pytest

from streamrt.apps.demo import CSS, DemoBackend, build_demo
from streamrt.config import RuntimeConfig

RED = "a red circle moving right on a dark background"
BLUE = "a blue square moving up on a light background"


def _missing(reason: str):
    if os.environ.get("STREAMRT_REQUIRE_E2E") == "1":
        pytest.fail(f"{reason} (STREAMRT_REQUIRE_E2E=1: the e2e tools must be installed)")
    pytest.skip(reason)


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    _missing("no Chromium binary (apt: chromium)")


@pytest.fixture(scope="module")
def backend():
    try:
        import gradio  # noqa: F401
    except ImportError:
        _missing("gradio is not installed")
    # Admission control measures this (shared, loaded) machine and could refuse a tab at
    # random; the tests need every tab served.
    b = DemoBackend("tiny-random", runtime=RuntimeConfig(admission=False))
    yield b
    b.close()


@pytest.fixture(scope="module")
def app_url(backend):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo = build_demo(backend)
    demo.queue().launch(
        server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, css=CSS
    )
    yield f"http://127.0.0.1:{port}/"
    demo.close()


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("playwright is not installed (pip install playwright; no browser download)")
    executable = _chromium()
    with sync_playwright() as p:
        b = p.chromium.launch(
            executable_path=executable,
            args=[
                "--no-sandbox",
                "--use-fake-device-for-media-stream",  # a synthetic webcam
                "--use-fake-ui-for-media-stream",  # camera permission granted
            ],
        )
        yield b
        b.close()


def _open(browser, app_url):
    context = browser.new_context()
    context.grant_permissions(["camera"], origin=app_url.rstrip("/"))
    pg = context.new_page()
    pg.goto(app_url)
    pg.wait_for_selector("#start", timeout=30_000)
    return pg


@pytest.fixture
def page(browser, app_url):
    pg = _open(browser, app_url)
    yield pg
    pg.context.close()


@pytest.fixture
def two_pages(browser, app_url):
    """Two browser tabs of the demo (each its own Gradio session)."""
    pages = [_open(browser, app_url) for _ in range(2)]
    yield pages
    for pg in pages:
        pg.context.close()


SHOWN_SRC = (  # the <img>'s src once it is loaded, in one call (it reads 0 px while it loads)
    "s => { const i = document.querySelector(s + ' img');"
    " return i && i.complete && i.naturalWidth > 0 ? i.src : null }"
)


def _shown_frames(pages, selector: str, count: int, timeout: float = 60.0) -> list[list[str]]:
    """Per page, the distinct frames `selector`'s <img> showed (loaded), polled round the
    pages until each showed `count` or `timeout` passed."""
    seen: list[list[str]] = [[] for _ in pages]
    deadline = time.monotonic() + timeout
    while min(map(len, seen)) < count and time.monotonic() < deadline:
        for pg, frames in zip(pages, seen):
            src = pg.evaluate(SHOWN_SRC, selector)
            if src and (not frames or src != frames[-1]):
                frames.append(src)
        time.sleep(0.05)
    return seen


def _image_sources(page, selector: str, count: int, timeout: float = 60.0) -> list[str]:
    """The distinct frames `selector`'s <img> showed (loaded) until `count` were seen."""
    return _shown_frames([page], selector, count, timeout)[0]


def _eventually(check, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def _box(page, selector: str) -> dict:
    return page.evaluate(
        "s => { const r = document.querySelector(s).getBoundingClientRect();"
        " return {y: r.y, height: r.height, width: r.width} }",
        selector,
    )


def test_generate_streams_live_frames_and_switches_prompt(page):
    page.fill("#prompt textarea", RED)
    before = _box(page, "#video")
    page.click("#start")
    frames = _image_sources(page, "#video", 4)
    assert len(frames) >= 4, f"the stream showed {len(frames)} distinct frames"
    after = _box(page, "#video")
    assert abs(after["height"] - before["height"]) <= 1, (before, after)  # no jump
    assert abs(after["y"] - before["y"]) <= 1, (before, after)
    natural = page.wait_for_function(  # a frame's <img> reads 0 px wide while it loads
        "() => { const i = document.querySelector('#video img');"
        " return i && i.complete && i.naturalWidth > 0 ? i.naturalWidth : false }",
        timeout=30_000,
    ).json_value()
    assert natural >= 384, f"frames are shown {natural} px wide: too small to see"
    rendering = page.evaluate(
        "() => getComputedStyle(document.querySelector('#video img')).imageRendering"
    )
    assert rendering == "pixelated"  # fitted to the panel without smoothing
    page.wait_for_function(
        "() => document.querySelector('#status').innerText.includes('frame')", timeout=30_000
    )
    page.fill("#prompt textarea", BLUE)
    page.click("#switch")
    page.wait_for_function(
        f"() => document.querySelector('#status').innerText.includes('{BLUE}')", timeout=30_000
    )
    page.click("#stop")
    time.sleep(1.0)
    settled = page.evaluate("() => document.querySelector('#video img').src")
    time.sleep(1.5)
    assert page.evaluate("() => document.querySelector('#video img').src") == settled


def test_two_tabs_generate_at_the_same_time(two_pages, backend):
    before = set(backend.rt.stats()["streams"])
    for pg, prompt in zip(two_pages, (RED, BLUE)):
        pg.fill("#prompt textarea", prompt)
        pg.click("#start")
    frames = _shown_frames(two_pages, "#video", 6, timeout=90.0)
    streams = backend.rt.stats()["streams"]
    ours = {k: v for k, v in streams.items() if k not in before}
    assert [len(f) for f in frames] >= [6, 6] and min(map(len, frames)) >= 6, (
        f"distinct frames each tab showed: {[len(f) for f in frames]} (a tab that waits for "
        "the other's stream shows none)"
    )
    assert len(ours) == 2 and {s["state"] for s in ours.values()} == {"running"}, ours
    assert {s["prompt"] for s in ours.values()} == {RED, BLUE}
    for pg in two_pages:
        pg.click("#stop")
    assert _eventually(lambda: not set(ours) & set(backend.rt.stats()["streams"])), (
        "Stop did not close the tabs' streams"
    )


def test_ask_about_the_generated_video(page):
    page.fill("#prompt textarea", RED)
    page.click("#start")
    assert len(_image_sources(page, "#video", 3)) >= 3
    page.click("#gen_ask")
    page.wait_for_function(
        "() => document.querySelector('#gen_answer').innerText.includes('ms)')", timeout=60_000
    )
    text = page.inner_text("#gen_answer")
    assert "frames at " in text and text.split("(")[0].strip(), text  # an answer, its times
    page.click("#stop")


def test_a_closed_tab_frees_its_stream_and_sessions(browser, app_url, backend):
    before = backend.rt.stats()
    pg = _open(browser, app_url)
    pg.click("#start")
    assert len(_image_sources(pg, "#video", 2)) >= 2
    stats = backend.rt.stats()
    streams = set(stats["streams"]) - set(before["streams"])
    sessions = set(stats["qa"]) - set(before["qa"])
    assert len(streams) == 1 and len(sessions) == 1  # the stream and the QA session on it
    pg.context.close()  # the tab goes away without pressing Stop

    def freed() -> bool:
        now = backend.rt.stats()
        return not streams & set(now["streams"]) and not sessions & set(now["qa"])

    assert _eventually(freed), "a closed tab's stream or QA session is still open"


def test_bad_prompt_shows_the_vocabulary_and_the_app_keeps_working(page):
    page.fill("#prompt textarea", "a pink elephant")
    page.click("#start")
    page.wait_for_selector("text=outside this model's vocabulary", timeout=30_000)
    page.fill("#prompt textarea", RED)
    page.click("#start")
    assert len(_image_sources(page, "#video", 2)) >= 2
    page.click("#stop")


def test_webcam_is_stylized_live(page):
    page.get_by_role("tab", name="Stylize webcam").click()
    page.wait_for_selector("#cam", timeout=30_000)
    # Gradio's webcam: grant access (Chromium's fake camera), then start recording.
    page.click("#cam [title='grant webcam access'] button", timeout=30_000)
    page.click("#cam button:has-text('Record')", timeout=30_000)
    styled = _image_sources(page, "#styled", 3, timeout=90.0)
    assert len(styled) >= 3, f"{len(styled)} styled frames came back"


def test_ask_the_video_feeds_and_answers(page):
    page.get_by_role("tab", name="Ask the video").click()
    page.click("#feed")
    page.wait_for_selector("text=frames of world://seed=3", timeout=60_000)
    page.fill("#question textarea", "what color was the first shape?")
    page.click("#ask")
    page.wait_for_function(
        "() => document.querySelector('#answer').innerText.includes('ms)')", timeout=60_000
    )
    text = page.inner_text("#answer")
    from streamrt.world import COLORS

    assert any(c in text.split("(")[0] for c in COLORS), text  # a colour word answers it
