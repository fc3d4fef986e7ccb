"""`torchrun ... streamrt serve --parallel layers` over real HTTP: two ranks (gloo), rank 0
serves; streams equal the one-process stream of the same prompt and seed; switch, delete,
a QA session on rank 0 watching a pipeline stream, live video-to-video over the WebSocket,
a clean Ctrl+C, and a killed rank that
ends the server non-zero naming it."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from test_serve import (
    OTHER,
    PROMPT,
    decode,
    error_of,
    free_port,
    mjpeg_parts,
    v2v_round_trip,
    wait_for,
    world_frames,
    ws_url,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

BIN = Path(sys.executable).parent


def _start(tmp_path: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        str(BIN / "torchrun"),
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        "-m",
        "streamrt.apps.cli",
        "serve",
        "--parallel",
        "layers",
        "--rebalance-every",
        "3",  # blocks may move (with their KV) while streams run: frames stay the same
        "--agents",  # LLM agents on rank 0, beside the streams
        "--port",
        str(port),
    ]
    log = open(tmp_path / "serve.log", "w")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen(
        cmd, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
        try:
            return httpx.get(f"{url}/v1/stats", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(up, 120, "the pipeline server did not start")
    return proc, url


def _workers(proc: subprocess.Popen, url: str) -> list[int]:
    """The ranks' processes (torchrun starts each in a session of its own)."""
    port = url.rsplit(":", 1)[1]
    found = subprocess.run(
        ["pgrep", "-f", f"streamrt.apps.cli serve --parallel layers .*--port {port}$"],
        capture_output=True,
        text=True,
    ).stdout.split()
    return [int(p) for p in found if int(p) != proc.pid]


def _stop(proc: subprocess.Popen, url: str) -> None:
    for pid in [*_workers(proc, url), proc.pid]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait(30)


def _read(c: httpx.Client, stream_id: str) -> list[np.ndarray]:
    with c.stream("GET", f"/v1/streams/{stream_id}/frames.mjpeg") as r:
        return [decode(part)[..., ::-1] for part in mjpeg_parts(r)]  # BGR -> RGB


def _solo(prompt: str, seed: int, frames: int) -> list[np.ndarray]:
    from streamrt.embedded import GEN_MODEL, resolve_model
    from streamrt.gen.generator import StreamGenerator

    gen = StreamGenerator.from_pretrained(resolve_model(GEN_MODEL))
    return list(gen.stream(prompt, num_frames=frames, seed=seed))


def test_streams_on_two_ranks_equal_the_one_process_streams(tmp_path):
    proc, url = _start(tmp_path)
    try:
        with httpx.Client(base_url=url, timeout=60) as c:
            stats = c.get("/v1/stats").json()
            assert stats["ranks"] == 2 and stats["block_ranges"] == [[0, 2], [2, 4]]
            assert stats["rebalances"] == 0
            ids = [
                c.post("/v1/streams", json={"prompt": p, "num_frames": 9, "seed": s}).json()["id"]
                for p, s in ((PROMPT, 1), (OTHER, 2))
            ]
            got: dict[str, list] = {}
            readers = [
                threading.Thread(target=lambda i=i: got.__setitem__(i, _read(c, i))) for i in ids
            ]
            for t in readers:
                t.start()
            for t in readers:
                t.join(120)
            for sid, (prompt, seed) in zip(ids, ((PROMPT, 1), (OTHER, 2))):
                want = _solo(prompt, seed, 9)
                assert len(got[sid]) == 9
                diffs = [
                    np.abs(a.astype(int) - b.astype(int)).mean() for a, b in zip(got[sid], want)
                ]
                assert max(diffs) < 2.0, diffs  # JPEG's rounding; another seed differs by far more
            other = _solo(PROMPT, 2, 9)
            assert np.abs(got[ids[0]][-1].astype(int) - other[-1].astype(int)).mean() > 4.0

            # an endless stream: switch its prompt, read on, delete it
            sid = c.post("/v1/streams", json={"prompt": PROMPT}).json()["id"]
            with c.stream("GET", f"/v1/streams/{sid}/frames.mjpeg") as r:
                parts = mjpeg_parts(r)
                first = [next(parts) for _ in range(3)]
                assert (
                    c.post(f"/v1/streams/{sid}/prompt", json={"prompt": OTHER}).status_code == 200
                )
                later = [next(parts) for _ in range(9)]
                assert len(first) == 3 and len(later) == 9
                assert c.delete(f"/v1/streams/{sid}").status_code == 200
            wait_for(
                lambda: c.get("/v1/stats").json()["streams"][sid]["state"] == "done",
                30,
                "the deleted stream did not end",
            )
            assert c.get("/v1/stats").json()["streams"][sid]["prompt"] == OTHER

            # QA on rank 0: a session watching a pipeline stream (every 4th frame: 8 fps
            # streams, a 2 fps Video-LLM)
            body = {"prompt": PROMPT, "num_frames": 16, "seed": 1}
            sid = c.post("/v1/streams", json=body).json()["id"]
            r = c.post("/v1/qa/sessions", json={"stream_id": sid})
            assert r.status_code == 201, r.text
            qid = r.json()["id"]
            assert len(_read(c, sid)) == 16
            q = {"question": "what color is the shape?"}
            answer = c.post(f"/v1/qa/sessions/{qid}/ask", json=q).json()
            assert "red" in answer["text"], answer
            qa = c.get("/v1/stats").json()["qa"][qid]
            # frames 0, 4, 8, 12; the stream may have made its first two chunks (frames
            # 0-5, its read-ahead) before the session attached, never more
            assert qa["stream_id"] == sid and 2 <= qa["fed"] <= 4 and qa["dropped"] == 0, qa
            assert c.delete(f"/v1/qa/sessions/{qid}").status_code == 200

            # deadlines: a 6 fps stream is made as its playout needs it (at most 1 s ahead),
            # not as fast as the pipeline goes; a stream beyond capacity is refused
            t0 = time.perf_counter()
            body = {"prompt": OTHER, "num_frames": 12, "fps": 6, "seed": 3}
            sid = c.post("/v1/streams", json=body).json()["id"]
            assert len(_read(c, sid)) == 12
            assert time.perf_counter() - t0 > 1.2  # frame 9 is not made before 1.5 s
            st = c.get("/v1/stats").json()["streams"][sid]
            assert st["target_fps"] == 6 and st["slo_attainment"] >= 0.9, st
            # beside a running stream (alone, a stream has nobody to slow down: admitted)
            endless = c.post("/v1/streams", json={"prompt": OTHER}).json()["id"]
            r = c.post("/v1/streams", json={"prompt": PROMPT, "fps": 100000})
            assert r.status_code == 503 and "at capacity" in error_of(r), r.text
            assert c.delete(f"/v1/streams/{endless}").status_code == 200

            # an agent's chat completion on rank 0, on the same cache manager
            chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}
            r = c.post("/v1/chat/completions", json={**chat, "max_tokens": 4})
            assert r.status_code == 200, r.text
            reply = r.json()["choices"][0]
            assert reply["message"]["content"] and reply["finish_reason"] in ("length", "stop")
            stats = c.get("/v1/stats").json()
            assert "agents" in stats["cache"]["consumers"] and stats["agents"] is not None

            # live video-to-video over the WebSocket: the pipeline's ranks style each chunk
            from websockets.sync.client import connect

            styled = v2v_round_trip(c, world_frames(10, (80, 60)))
            assert len(styled) == 10 and styled[0].shape == (64, 64, 3)
            with connect(ws_url(c)) as ws:  # a prompt the model cannot read
                ws.send(json.dumps({"prompt": "a zebra"}))
                assert "zebra" in json.loads(ws.recv(timeout=30))["error"]

            # bad requests
            with c.stream("GET", "/v1/streams/nope/frames.mjpeg") as r:
                assert r.status_code == 404
            r = c.post("/v1/streams", json={"prompt": "a pink elephant"})
            assert r.status_code == 400
            assert c.get("/v1/streams/nope/frames.mjpeg").status_code == 404
        workers = _workers(proc, url)
        assert len(workers) == 2
        proc.send_signal(signal.SIGINT)  # Ctrl+C: rank 0 tells rank 1 to stop; both exit
        proc.wait(60)
        log = (tmp_path / "serve.log").read_text()
        assert "Application shutdown complete" in log, log[-3000:]
        wait_for(lambda: not _workers(proc, url), 30, "a rank outlived Ctrl+C")
    finally:
        _stop(proc, url)


def test_a_killed_rank_ends_the_server_naming_it(tmp_path):
    proc, url = _start(tmp_path)
    try:
        with httpx.Client(base_url=url, timeout=60) as c:
            sid = c.post("/v1/streams", json={"prompt": PROMPT}).json()["id"]
            with c.stream("GET", f"/v1/streams/{sid}/frames.mjpeg") as r:
                parts = mjpeg_parts(r)
                next(parts)
                rank0 = c.get("/v1/stats").json()["pid"]
                others = [p for p in _workers(proc, url) if p != rank0]
                assert len(others) == 1, others
                os.kill(others[0], signal.SIGKILL)  # rank 1
                with contextlib.suppress(RuntimeError):  # cut short: no closing boundary
                    for _ in parts:  # the MJPEG ends instead of hanging
                        pass
        start = time.monotonic()
        code = proc.wait(180)
        assert code != 0
        log = (tmp_path / "serve.log").read_text()
        # the stream ended with the pipeline's error; torchrun names the rank that died
        assert "stream s0 failed" in log, log[-3000:]
        assert re.search(r"Root Cause[\s\S]*rank\s*: 1 \(local_rank: 1\)", log), log[-3000:]
        assert time.monotonic() - start < 180
    finally:
        _stop(proc, url)
