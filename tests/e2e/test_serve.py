"""`streamrt serve` over real HTTP and WebSocket: a uvicorn server on 127.0.0.1 (in a thread
for most tests, `streamrt serve` as a subprocess for the command line), httpx and websockets
clients.

The server's preset turns admission control off: whether 8 streams at 24 fps fit this
shared 2-core CPU is a measurement, not something a test can rely on (the 503 path is
tested through `runtime.max_streams` instead). Every test leaves the cache manager as it
found it, and checks that through `/v1/stats`.
"""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import av
import cv2
import httpx
import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

BIN = Path(sys.executable).parent
PROMPT = "a red circle moving right on a dark background"
OTHER = "a blue square moving up on a light background"
MAX_STREAMS = 9
PRESET = f"runtime:\n  admission: false\n  max_streams: {MAX_STREAMS}\n"


@pytest.fixture(scope="module")
def preset(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("serve") / "serve.yaml"
    path.write_text(PRESET)
    return path


@pytest.fixture(scope="module")
def server(preset) -> Iterator[str]:
    """`create_app(Runtime(...))` served by uvicorn in a thread on a free port; its base URL.
    Stopping it must close the runtime (every block back)."""
    import uvicorn

    from streamrt.apps.serve import create_app
    from streamrt.runtime import Runtime

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the CLI does
    rt = Runtime(config=preset)
    sock = socket.create_server(("127.0.0.1", 0))
    config = uvicorn.Config(create_app(rt), log_level="warning", timeout_graceful_shutdown=2)
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    wait_for(lambda: srv.started, 30, "the server did not start")
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        srv.should_exit = True
        thread.join(30)
        sock.close()
        torch.set_num_threads(threads)
    assert not thread.is_alive()
    assert rt._thread is None, "shutdown did not stop the runtime's loop"
    assert rt.cache.stats()["tiers"]["device"]["used_blocks"] == 0
    assert not rt.streams and not rt.sessions


@pytest.fixture
def client(server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server, timeout=60) as c:
        before = cache_use(c)
        yield c
        # every test frees what it opened
        wait_for(lambda: cache_use(c) == before, 20, lambda: f"{cache_use(c)} != {before}")


# ---------------------------------------------------------------------- helpers


def wait_for(cond: Callable[[], bool], timeout: float, message) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(message() if callable(message) else message)
        time.sleep(0.05)


def cache_use(c: httpx.Client) -> tuple[int, int, int]:
    """(device blocks, host blocks, sequences) in use in the runtime's cache manager."""
    cache = c.get("/v1/stats").json()["cache"]
    tiers = cache["tiers"]
    return tiers["device"]["used_blocks"], tiers["host"]["used_blocks"], cache["sequences"]


def open_stream(c: httpx.Client, **body) -> str:
    r = c.post("/v1/streams", json={"prompt": PROMPT, **body})
    assert r.status_code == 201, r.text
    assert set(r.json()) == {"id"}
    return r.json()["id"]


def stream_stats(c: httpx.Client, stream_id: str) -> dict:
    stats = c.get("/v1/stats").json()
    return {**stats["finished"], **stats["streams"]}[stream_id]


def mjpeg_parts(response: httpx.Response) -> Iterator[bytes]:
    """The JPEG bodies of a multipart/x-mixed-replace response, as they arrive; asserts the
    response ends with the closing boundary."""
    kind = response.headers["content-type"]
    assert kind.startswith("multipart/x-mixed-replace"), kind
    boundary = kind.split("boundary=")[1].encode()
    buf = b""
    chunks = response.iter_bytes()
    while True:
        while b"\r\n\r\n" not in buf and not buf.startswith(b"--" + boundary + b"--"):
            buf += next(chunks)
        if buf.startswith(b"--" + boundary + b"--"):
            return
        head, buf = buf.split(b"\r\n\r\n", 1)
        lines = head.decode().split("\r\n")
        assert lines[0] == "--" + boundary.decode(), lines
        headers = dict(line.split(": ", 1) for line in lines[1:])
        assert headers["Content-Type"] == "image/jpeg"
        size = int(headers["Content-Length"])
        while len(buf) < size + 2:
            buf += next(chunks)
        assert buf[size : size + 2] == b"\r\n"
        yield buf[:size]
        buf = buf[size + 2 :]


def decode(jpeg: bytes) -> np.ndarray:
    image = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    assert image is not None, "not a JPEG"
    return image


def read_all(c: httpx.Client, stream_id: str) -> list[np.ndarray]:
    with c.stream("GET", f"/v1/streams/{stream_id}/frames.mjpeg") as r:
        assert r.status_code == 200
        return [decode(part) for part in mjpeg_parts(r)]


def read_into(c: httpx.Client, stream_id: str, frames: list[np.ndarray]) -> None:
    """`read_all` with a client of its own (for a thread), into `frames` as they arrive."""
    with (
        httpx.Client(base_url=str(c.base_url), timeout=60) as own,
        own.stream("GET", f"/v1/streams/{stream_id}/frames.mjpeg") as r,
    ):
        assert r.status_code == 200
        frames.extend(decode(part) for part in mjpeg_parts(r))


def world_frames(n: int, size: tuple[int, int] | None = None) -> list[np.ndarray]:
    from streamrt.world import make_clip

    frames = list(make_clip(3, n).frames)
    return [cv2.resize(f, size) if size else f for f in frames]


def image_bytes(frame: np.ndarray, ext: str) -> bytes:
    ok, data = cv2.imencode(ext, np.ascontiguousarray(frame[..., ::-1]))
    assert ok
    return data.tobytes()


def video_bytes(frames: list[np.ndarray], fps: int) -> bytes:
    """An mp4 of `frames`, written with PyAV."""
    out = io.BytesIO()
    with av.open(out, mode="w", format="mp4") as box:
        stream = box.add_stream("mpeg4", rate=fps)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            box.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        box.mux(stream.encode())
    return out.getvalue()


def error_of(r: httpx.Response) -> str:
    body = r.json()
    assert set(body) == {"error"}, body
    assert "Traceback" not in r.text
    return body["error"]


# ---------------------------------------------------------------------- streams


def test_eight_concurrent_streams(client):
    ids = [open_stream(client, num_frames=12, fps=24, seed=i) for i in range(8)]
    assert len(set(ids)) == 8
    got: dict[str, list[np.ndarray]] = {}
    errors: list[BaseException] = []

    def read(stream_id: str) -> None:
        try:
            read_into(client, stream_id, got.setdefault(stream_id, []))
        except BaseException as exc:
            errors.append(exc)

    readers = [threading.Thread(target=read, args=(i,)) for i in ids]
    for t in readers:
        t.start()
    stats = client.get("/v1/stats").json()
    assert set(ids) <= {*stats["streams"], *stats["finished"]}
    for t in readers:
        t.join(120)
    assert not errors, errors
    for stream_id in ids:
        frames = got[stream_id]
        assert len(frames) == 12, (stream_id, len(frames))
        assert all(f.shape == (64, 64, 3) for f in frames)
        s = stream_stats(client, stream_id)
        assert s["frames"] == 12 and s["state"] == "done" and s["target_fps"] == 24
        assert s["slo_attainment"] is not None and s["gap_p50_s"] is not None
    # different seeds: different videos
    assert not np.array_equal(got[ids[0]][-1], got[ids[1]][-1])
    stats = client.get("/v1/stats").json()
    assert stats["scheduler"]["forwards"] > 0 and stats["scheduler"]["rows"] >= 8


def test_a_client_that_disconnects_frees_its_stream(client):
    before = cache_use(client)
    stream_id = open_stream(client)  # endless
    with client.stream("GET", f"/v1/streams/{stream_id}/frames.mjpeg") as r:
        parts = mjpeg_parts(r)
        for _ in range(3):
            assert decode(next(parts)).shape == (64, 64, 3)
        assert stream_stats(client, stream_id)["state"] == "running"
        assert cache_use(client)[0] > before[0], "a running stream holds device blocks"
    # the response is closed mid-stream: the server closes the stream
    wait_for(lambda: stream_stats(client, stream_id)["state"] == "done", 20, "not closed")
    wait_for(lambda: cache_use(client) == before, 20, "its blocks were not freed")


def test_prompt_switch_and_delete(client):
    stream_id = open_stream(client)  # endless
    frames: list[np.ndarray] = []
    reader = threading.Thread(target=read_into, args=(client, stream_id, frames))
    reader.start()
    wait_for(lambda: len(frames) >= 4, 30, "no frames")
    r = client.post(f"/v1/streams/{stream_id}/prompt", json={"prompt": OTHER})
    assert r.status_code == 200, r.text
    wait_for(lambda: stream_stats(client, stream_id)["prompt"] == OTHER, 30, "no switch")
    # a prompt the model cannot read fails alone: the stream keeps the one it has
    r = client.post(f"/v1/streams/{stream_id}/prompt", json={"prompt": "a zebra"})
    assert r.status_code == 400 and "zebra" in error_of(r)
    assert stream_stats(client, stream_id)["state"] == "running"
    r = client.delete(f"/v1/streams/{stream_id}")
    assert r.status_code == 200, r.text
    reader.join(30)
    assert not reader.is_alive(), "DELETE did not end the MJPEG response"
    assert stream_stats(client, stream_id)["state"] == "done"
    assert len(frames) >= 4
    r = client.post(f"/v1/streams/{stream_id}/prompt", json={"prompt": PROMPT})
    assert r.status_code == 400 and "ended" in error_of(r)


def test_at_capacity_answers_503(client):
    ids = [open_stream(client, fps=1) for _ in range(MAX_STREAMS)]
    try:
        r = client.post("/v1/streams", json={"prompt": PROMPT})
        assert r.status_code == 503 and "max_streams" in error_of(r)
    finally:
        for stream_id in ids:
            assert client.delete(f"/v1/streams/{stream_id}").status_code == 200
    open_stream(client, num_frames=1)  # room again


BAD_REQUESTS = [
    # (method, path, request keywords, status, words the message must hold)
    ("POST", "/v1/streams", {"json": {"prompt": PROMPT, "frames": 12}}, 400, ["'frames'", "num_frames"]),
    ("POST", "/v1/streams", {"json": {"prompt": PROMPT, "num_frames": "12"}}, 400, ["num_frames", "integer"]),
    ("POST", "/v1/streams", {"json": {"prompt": PROMPT, "seed": 1.5}}, 400, ["seed"]),
    ("POST", "/v1/streams", {"json": {"prompt": 7}}, 400, ["prompt"]),
    ("POST", "/v1/streams", {"json": {"num_frames": 12}}, 400, ["prompt", "required"]),
    ("POST", "/v1/streams", {"json": {"prompt": "  "}}, 400, ["prompt", "empty"]),
    ("POST", "/v1/streams", {"json": {"prompt": PROMPT, "num_frames": 0}}, 400, ["num_frames", "greater than or equal to 1"]),
    ("POST", "/v1/streams", {"json": {"prompt": PROMPT, "fps": -2}}, 400, ["fps"]),
    ("POST", "/v1/streams", {"json": {"prompt": "a zebra"}}, 400, ["zebra"]),
    ("POST", "/v1/streams", {"json": {"prompt": PROMPT, "kv_quota_mb": 0.001}}, 400, ["kv_quota_mb", "frames"]),
    ("POST", "/v1/streams", {"json": {"prompt": PROMPT, "kv_quota_mb": -1}}, 400, ["kv_quota_mb"]),
    ("POST", "/v1/streams", {"json": {"prompt": PROMPT, "priority": "high"}}, 400, ["priority"]),
    ("POST", "/v1/streams", {"content": b'{"prompt": ', "headers": {"content-type": "application/json"}}, 400, ["JSON"]),
    ("POST", "/v1/streams", {"json": [PROMPT]}, 400, ["JSON object"]),
    ("POST", "/v1/streams", {}, 400, ["JSON object"]),
    ("GET", "/v1/streams/s999/frames.mjpeg", {}, 404, ["s999"]),
    ("POST", "/v1/streams/s999/prompt", {"json": {"prompt": PROMPT}}, 404, ["s999"]),
    ("DELETE", "/v1/streams/s999", {}, 404, ["s999"]),
    ("POST", "/v1/qa/sessions", {"json": {"stream_id": "s999"}}, 404, ["s999"]),
    ("POST", "/v1/qa/sessions", {"json": {"stream": "s1"}}, 400, ["'stream'", "stream_id"]),
    ("POST", "/v1/qa/sessions", {"json": {"kv_quota_mb": 0.001}}, 400, ["kv_quota_mb", "window_frames"]),
    ("POST", "/v1/qa/sessions/q999/ask", {"json": {"question": "what?"}}, 404, ["q999"]),
    ("POST", "/v1/qa/sessions/q999/frames", {"content": b"\xff\xd8\xff"}, 404, ["q999"]),
    ("DELETE", "/v1/qa/sessions/q999", {}, 404, ["q999"]),
    ("GET", "/v1/nothing", {}, 404, ["/v1/nothing"]),
    ("PUT", "/v1/stats", {}, 405, ["PUT"]),
]  # fmt: skip


def test_bad_requests_name_what_to_fix_and_the_server_keeps_serving(client):
    running = open_stream(client, num_frames=24, fps=12)
    for method, path, kwargs, status, words in BAD_REQUESTS:
        r = client.request(method, path, **kwargs)
        assert r.status_code == status, (method, path, kwargs, r.status_code, r.text)
        message = error_of(r)
        for word in words:
            assert word in message, (method, path, kwargs, message)
    # the stream that was running meanwhile is whole, and new requests are served
    assert len(read_all(client, running)) == 24
    assert len(read_all(client, open_stream(client, num_frames=4))) == 4


# ---------------------------------------------------------------------- QA


def ask(c: httpx.Client, session_id: str, question: str) -> dict:
    r = c.post(f"/v1/qa/sessions/{session_id}/ask", json={"question": question})
    assert r.status_code == 200, r.text
    answer = r.json()
    assert set(answer) == {"text", "timestamps", "latency_s", "warnings"}
    assert answer["text"].strip() and answer["latency_s"] > 0
    return answer


def test_qa_session_watching_a_stream(client):
    stream_id = open_stream(client, num_frames=24, fps=24)
    r = client.post("/v1/qa/sessions", json={"stream_id": stream_id})
    assert r.status_code == 201, r.text
    session_id = r.json()["id"]
    assert len(read_all(client, stream_id)) == 24
    answer = ask(client, session_id, "what color was the first shape?")
    assert answer["timestamps"] and all(0 <= t <= 23 / 24 + 1e-6 for t in answer["timestamps"])
    qa = client.get("/v1/stats").json()["qa"][session_id]
    # ask waited for the queued frames (the first ones may have come before the session)
    assert qa["stream_id"] == stream_id and qa["queued"] == 0 and qa["fed"] > 0
    assert qa["fed"] + qa["dropped"] <= 24
    r = client.post(f"/v1/qa/sessions/{session_id}/ask", json={"question": " "})
    assert r.status_code == 400 and "question" in error_of(r)
    assert client.delete(f"/v1/qa/sessions/{session_id}").status_code == 200
    assert session_id not in client.get("/v1/stats").json()["qa"]


def test_qa_session_fed_images_and_a_video(client):
    r = client.post("/v1/qa/sessions")
    assert r.status_code == 201, r.text
    session_id = r.json()["id"]
    url = f"/v1/qa/sessions/{session_id}/frames"
    r = client.post(f"/v1/qa/sessions/{session_id}/ask", json={"question": "what color?"})
    assert r.status_code == 400 and "no frames" in error_of(r)
    frames = world_frames(16, (96, 72))  # not the model's size: resized
    # 16 frames at 4 fps: 4 s, sampled at the QA model's 2 fps, from 10 s on
    r = client.post(url, content=video_bytes(frames, fps=4), params={"timestamp": 10})
    assert r.status_code == 202, r.text
    assert r.json() == {"frames": 8, "queued": 8, "dropped": 0}
    # asked at once: the answer waits for the frames posted before it
    answer = ask(client, session_id, "what color was the first shape?")
    assert answer["timestamps"] and all(10 <= t <= 13.5 for t in answer["timestamps"])
    assert client.get("/v1/stats").json()["qa"][session_id]["frames"] == 8
    r = client.post(url, content=image_bytes(frames[0], ".png"), params={"timestamp": 14})
    assert r.status_code == 202 and r.json() == {"frames": 1, "queued": 1, "dropped": 0}
    r = client.post(url, content=image_bytes(frames[1], ".jpg"))  # next on the clock: 14.5 s
    assert r.status_code == 202 and r.json()["frames"] == 1
    answer = ask(client, session_id, "what color was the first shape?")
    assert all(10 <= t <= 14.5 for t in answer["timestamps"])
    assert client.get("/v1/stats").json()["qa"][session_id]["frames"] == 10
    for body, words in [
        (b"", ["empty", "JPEG or PNG"]),
        (b"not a picture, not a video", ["JPEG or PNG", "video file"]),
        (image_bytes(frames[0], ".png")[:40], ["broken", "JPEG or PNG"]),
    ]:
        r = client.post(url, content=body)
        assert r.status_code == 400, r.text
        assert all(w in error_of(r) for w in words), error_of(r)
    r = client.post(url, content=b"\xff\xd8\xff", params={"timestamp": "soon"})
    assert r.status_code == 400 and "timestamp" in error_of(r)
    assert client.delete(f"/v1/qa/sessions/{session_id}").status_code == 200


# ---------------------------------------------------------------------- video-to-video


def ws_url(client: httpx.Client) -> str:
    return str(client.base_url).replace("http://", "ws://") + "/v1/v2v"


def v2v_round_trip(client: httpx.Client, frames: list[np.ndarray]) -> list[np.ndarray]:
    """`/v1/v2v`: the prompt, the frames as JPEG, the end; the styled frames back."""
    from websockets.sync.client import connect

    with connect(ws_url(client), max_size=None) as ws:
        ws.send(json.dumps({"prompt": OTHER}))
        assert json.loads(ws.recv(timeout=30)) == {"width": 64, "height": 64}
        for frame in frames:
            ws.send(image_bytes(frame, ".jpg"))
        ws.send(json.dumps({"end": True}))
        styled = []
        while isinstance(message := ws.recv(timeout=60), bytes):
            styled.append(decode(message))
        assert json.loads(message) == {"done": True, "frames": len(frames)}
    return styled


def test_v2v_round_trip(client):
    frames = world_frames(20, (80, 60))
    styled = v2v_round_trip(client, frames)
    assert len(styled) == len(frames)
    assert all(f.shape == (64, 64, 3) for f in styled)


def test_v2v_errors_and_disconnect(client):
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    before = cache_use(client)
    with connect(ws_url(client)) as ws:  # a prompt the model cannot read
        ws.send(json.dumps({"prompt": "a zebra"}))
        assert "zebra" in json.loads(ws.recv(timeout=30))["error"]
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=10)
    with connect(ws_url(client)) as ws:  # a frame that is not an image
        ws.send(json.dumps({"prompt": PROMPT}))
        ws.recv(timeout=30)
        ws.send(b"not a jpeg")
        assert "JPEG" in json.loads(ws.recv(timeout=30))["error"]
    with connect(ws_url(client)) as ws:  # the client leaves mid-stream
        ws.send(json.dumps({"prompt": PROMPT}))
        ws.recv(timeout=30)
        for frame in world_frames(12):
            ws.send(image_bytes(frame, ".jpg"))
        assert cache_use(client) != before  # its stream holds blocks...
    wait_for(lambda: cache_use(client) == before, 20, "...until the socket closes")


def test_a_browser_img_plays_the_mjpeg_and_closing_the_page_frees_the_stream(client):
    """Headless Chromium (the system one, as tests/e2e/test_demo_browser.py) shows the MJPEG
    in an `<img>`; closing the page disconnects, which closes the stream."""
    import shutil

    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing("playwright is not installed (pip install playwright; no browser download)")
    chromium = next(filter(None, map(shutil.which, ("chromium", "chromium-browser"))), None)
    if chromium is None:
        missing("no Chromium binary (apt: chromium)")
    before = cache_use(client)
    stream_id = open_stream(client)  # endless
    src = f"{client.base_url}/v1/streams/{stream_id}/frames.mjpeg"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.set_content(f'<img id="v" src="{src}">')
            page.wait_for_function(
                "document.getElementById('v').naturalWidth === 64", timeout=30_000
            )
            wait_for(lambda: stream_stats(client, stream_id)["frames"] >= 8, 30, "no frames")
            assert stream_stats(client, stream_id)["state"] == "running"
            page.close()
        finally:
            browser.close()
    wait_for(lambda: stream_stats(client, stream_id)["state"] == "done", 20, "not closed")
    wait_for(lambda: cache_use(client) == before, 20, "its blocks were not freed")


def missing(reason: str) -> None:
    if os.environ.get("STREAMRT_REQUIRE_E2E") == "1":
        pytest.fail(f"{reason} (STREAMRT_REQUIRE_E2E=1: the e2e tools must be installed)")
    pytest.skip(reason)


# ---------------------------------------------------------------------- the command


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_streamrt_serve_command(preset, tmp_path):
    port = free_port()
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    cmd = ["streamrt", "serve", "--port", str(port), "--threads", "1", "--config", str(preset)]
    proc = subprocess.Popen(
        cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as c:

            def up() -> bool:
                assert proc.poll() is None, proc.stdout.read()
                try:
                    return c.get("/v1/stats").status_code == 200
                except httpx.TransportError:
                    return False

            wait_for(up, 120, "streamrt serve did not answer in 120 s")
            frames = read_all(c, open_stream(c, num_frames=8))
            assert len(frames) == 8 and frames[0].shape == (64, 64, 3)
            # a second server on the same port: one line saying what to change, exit 2
            taken = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
            assert taken.returncode == 2, taken.stderr
            assert taken.stderr.startswith(f"error: cannot serve on 127.0.0.1:{port}")
            assert "--port" in taken.stderr and "Traceback" not in taken.stderr
            open_stream(c)  # an endless stream: shutdown ends it
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        out = proc.communicate(timeout=30)[0]
    assert "Traceback" not in out, out
    assert "Application shutdown complete" in out, out


# ---------------------------------------------------------------------- ask waits for frames


class FakeQA:
    """A `QAHandle` stand-in that records the order of calls."""

    def __init__(self, flush_times_out: bool = False) -> None:
        self.calls: list[str] = []
        self.flush_times_out = flush_times_out

    def flush(self, timeout: float) -> None:
        self.calls.append(f"flush {timeout:g}")
        if self.flush_times_out:
            raise TimeoutError

    def stats(self) -> dict:
        return {"queued": 5}

    def ask(self, question: str):
        from streamrt.qa.video_qa import Answer

        self.calls.append("ask")
        return Answer("red", (0.5, 1.0), 0.01, notes=("a note",))


def test_ask_waits_for_queued_frames_then_answers():
    from streamrt.apps.serve import ask as serve_ask

    qa = FakeQA()
    answer = serve_ask(qa, "what color?", flush_s=3)
    assert qa.calls == ["flush 3", "ask"]
    assert answer == {
        "text": "red", "timestamps": [0.5, 1.0], "latency_s": 0.01, "warnings": ["a note"]
    }  # fmt: skip
    qa = FakeQA(flush_times_out=True)  # the runtime is too busy: answer, and say so
    answer = serve_ask(qa, "what color?", flush_s=3)
    assert qa.calls == ["flush 3", "ask"] and answer["text"] == "red"
    assert answer["warnings"][0] == "a note" and "5 frame(s)" in answer["warnings"][1]
