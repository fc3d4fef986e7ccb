"""RTMP in and out against a real nginx-rtmp server (Debian: nginx + libnginx-mod-rtmp).

The server runs unprivileged on a free local port with its own prefix under tmp. Without
nginx or the module the tests skip, unless STREAMRT_REQUIRE_E2E=1 (set by `.ci/run`,
which installs both), where a missing server is a failure.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from streamrt.io.sinks import VideoSink, read_video
from streamrt.io.sources import SourceError, open_source
from streamrt.world import make_clip

MODULE_GLOBS = ("/usr/lib/nginx/modules/ngx_rtmp_module.so", "/usr/lib*/nginx/modules/*rtmp*.so")


def _missing(reason: str):
    if os.environ.get("STREAMRT_REQUIRE_E2E") == "1":
        pytest.fail(f"{reason} (STREAMRT_REQUIRE_E2E=1: the e2e servers must be installed)")
    pytest.skip(reason)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def rtmp_server(tmp_path_factory):
    """`rtmp://127.0.0.1:PORT/live` served by nginx-rtmp for the module's tests."""
    nginx = shutil.which("nginx") or next(iter(glob.glob("/usr/sbin/nginx")), None)
    module = next((m for g in MODULE_GLOBS for m in sorted(glob.glob(g))), None)
    if nginx is None or module is None:
        _missing("nginx with the RTMP module is not installed (apt: nginx libnginx-mod-rtmp)")
    prefix = tmp_path_factory.mktemp("nginx")
    (prefix / "logs").mkdir()
    port = _free_port()
    conf = prefix / "nginx.conf"
    conf.write_text(
        f"load_module {module};\n"
        "daemon off;\nmaster_process off;\n"
        f"pid {prefix}/nginx.pid;\nerror_log {prefix}/error.log info;\n"
        "events { worker_connections 64; }\n"
        f"rtmp {{ server {{ listen 127.0.0.1:{port}; "
        "application live { live on; record off; } } }\n"
    )
    proc = subprocess.Popen(
        [nginx, "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"nginx exited: {proc.stdout.read().decode()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.05)
    else:
        proc.kill()
        pytest.fail("nginx-rtmp did not start listening within 10 s")
    yield f"rtmp://127.0.0.1:{port}/live"
    proc.terminate()
    proc.wait(timeout=10)


class _Publisher(threading.Thread):
    """Publishes `frames` to `url` (paced at `fps` by the live sink), `loops` times over
    or until `stop()`."""

    def __init__(self, url: str, frames: np.ndarray, fps: int, loops: int = 1) -> None:
        super().__init__(daemon=True)
        self.url, self.frames, self.fps, self.loops = url, frames, fps, loops
        self.stopped = threading.Event()
        self.start()

    def run(self) -> None:
        with VideoSink(self.url, self.fps, self.frames.shape[2], self.frames.shape[1]) as sink:
            for _ in range(self.loops):
                for frame in self.frames:
                    if self.stopped.is_set():
                        return
                    sink.write(frame)

    def stop(self) -> None:
        self.stopped.set()
        self.join(timeout=30)


def _read_until_stopped(url: str) -> tuple[list[np.ndarray], Exception | None]:
    """Every frame a live reader of `url` gets, and how the reading ended."""
    got: list[np.ndarray] = []
    try:
        for frame in open_source(url, (64, 64)):
            got.append(frame)
    except SourceError as exc:
        return got, exc
    return got, None


def _psnr_to_nearest(frame: np.ndarray, candidates: np.ndarray) -> float:
    mse = ((candidates.astype(np.float64) - frame) ** 2).mean(axis=(1, 2, 3)).min()
    return float(10 * np.log10(255.0**2 / max(mse, 1e-9)))


def test_frames_published_to_nginx_come_back_through_a_live_source(rtmp_server):
    """VideoSink -> nginx-rtmp -> open_source: a viewer that joins late gets the stream
    from the next keyframe (one per second), every frame close to one that was sent."""
    url = f"{rtmp_server}/roundtrip"
    clip = make_clip(3, 48).frames
    fps = 16
    publisher = _Publisher(url, clip, fps)
    time.sleep(0.5)  # join after the publisher started: a live viewer, not a file reader
    got, ended = _read_until_stopped(url)
    publisher.stop()
    assert len(got) >= 24, f"only {len(got)} of {len(clip)} frames arrived"
    assert all(f.shape == (64, 64, 3) for f in got)
    worst = min(_psnr_to_nearest(f, clip) for f in got)
    assert worst > 26.0, worst  # H.264 crf 18 at 64x64; a wrong frame is < 15 dB
    # nginx-rtmp sends no EOF when a publisher leaves: the read times out with a message.
    assert ended is not None and "broke while reading" in str(ended)


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "streamrt.apps.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )


def test_cli_generate_publishes_to_rtmp_at_the_stream_rate(rtmp_server):
    url = f"{rtmp_server}/generated"
    prompt = "a red circle moving right on a dark background"
    cli = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "streamrt.apps.cli",
            "generate",
            "--model",
            "tiny-random",
            "--prompt",
            prompt,
            "--frames",
            "40",
            "-o",
            url,
        ],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    got: list[np.ndarray] = []
    while cli.poll() is None and not got:  # a viewer waits for the stream to start
        got, _ = _read_until_stopped(url)
    stderr = cli.communicate(timeout=120)[1]
    assert cli.returncode == 0, stderr
    # 40 frames at 8 fps take 5 s of wall time however fast the model is; a viewer joining
    # while it runs misses at most the frames before the next keyframe (one per second).
    assert len(got) >= 20, f"{len(got)} frames arrived of 40 published"
    assert all(f.shape == (64, 64, 3) for f in got)


def test_cli_stream_reads_rtmp_input(rtmp_server, tmp_path):
    url = f"{rtmp_server}/camera"
    clip = make_clip(5, 32).frames
    publisher = _Publisher(url, clip, 16, loops=20)  # a camera: on until the test ends
    out = tmp_path / "styled.mp4"
    done = _cli(
        "stream",
        "--input",
        url,
        "--output",
        str(out),
        "--model",
        "tiny-random",
        "--prompt",
        "a red circle moving right on a dark background",
        "--frames",
        "24",
    )
    publisher.stop()
    assert done.returncode == 0, done.stderr
    frames = read_video(out)
    assert frames.shape[1:] == (64, 64, 3) and len(frames) >= 20, frames.shape


def test_missing_stream_and_unreachable_server_fail_with_clear_messages(rtmp_server, tmp_path):
    done = _cli(
        "stream",
        "--input",
        f"{rtmp_server}/nobody-publishes-here",
        "--output",
        str(tmp_path / "x.mp4"),
        "--model",
        "tiny-random",
        "--prompt",
        "a red circle moving right on a dark background",
    )
    assert done.returncode == 2, done.stderr
    assert "cannot open input" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "x.mp4").exists()
    closed = f"rtmp://127.0.0.1:{_free_port()}/live/x"
    sink = VideoSink(closed, 8, 64, 64)
    with pytest.raises(OSError, match=r"cannot write to rtmp://.*Connection refused"):
        sink.write(np.zeros((64, 64, 3), np.uint8))  # FFmpeg connects at the first packet
    done = _cli("generate", "--model", "tiny-random", "--prompt", "a red circle", "-o", closed)
    assert done.returncode == 2, done.stderr
    assert f"cannot write to {closed}" in done.stderr and "Traceback" not in done.stderr
