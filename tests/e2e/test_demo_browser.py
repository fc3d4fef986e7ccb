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
def app_url():
    try:
        import gradio  # noqa: F401
    except ImportError:
        _missing("gradio is not installed")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    demo = build_demo(DemoBackend("tiny-random"))
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


@pytest.fixture
def page(browser, app_url):
    context = browser.new_context()
    context.grant_permissions(["camera"], origin=app_url.rstrip("/"))
    pg = context.new_page()
    pg.goto(app_url)
    pg.wait_for_selector("#start", timeout=30_000)
    yield pg
    context.close()


def _image_sources(page, selector: str, count: int, timeout: float = 60.0) -> list[str]:
    """The distinct `src` values `selector`'s <img> shows until `count` were seen."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while len(seen) < count and time.monotonic() < deadline:
        src = page.evaluate(
            "s => { const i = document.querySelector(s + ' img'); return i ? i.src : null }",
            selector,
        )
        if src and (not seen or src != seen[-1]):
            seen.append(src)
        time.sleep(0.05)
    return seen


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
