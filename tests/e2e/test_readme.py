"""Every code block of README.md runs as written: a documentation example that fails is a
failing test.

Python blocks run in order in one namespace (later examples use earlier ones' objects, as
a reader would), from a scratch directory so that nothing depends on the repository root.
Shell blocks run line by line through bash in that directory with this venv's `streamrt`
first on PATH. Two lines are not run as-is: the setup block's install commands (the CI
runs them verbatim, `.ci/run` is checked to hold the test line; here the installed venv
runs what follows the install), and the servers, `streamrt demo` and `streamrt serve`, which
are started, asked for a page over HTTP (the demo's page, the server's `/v1/stats`), and
stopped.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import av
import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
BIN = Path(sys.executable).parent
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
INSTALL = re.compile(r"^python3 -m venv \.venv && \.venv/bin/pip install (.+?) && (.+)$")


def blocks(lang: str) -> list[str]:
    return [body for tag, body in FENCE.findall(README.read_text()) if tag == lang]


def shell_lines() -> list[str]:
    lines = []
    for body in blocks("bash"):
        lines += [ln for ln in body.replace("\\\n", " ").splitlines() if ln.strip()]
    return lines


def test_every_block_is_tagged_and_known():
    tags = [tag for tag, _ in FENCE.findall(README.read_text())]
    assert tags and all(tag in ("bash", "python", "text") for tag in tags), tags
    assert len(blocks("python")) >= 4 and len(shell_lines()) >= 8


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    """A directory outside the repository, with this venv's scripts first on PATH."""
    where = tmp_path_factory.mktemp("readme")
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    env.setdefault("STREAMRT_THREADS", "1")
    return where, env


def test_python_blocks_run_in_order(scratch, monkeypatch):
    where, _ = scratch
    monkeypatch.chdir(where)
    namespace: dict = {"__name__": "readme"}
    for n, body in enumerate(blocks("python")):
        code = compile(body, f"README.md python block {n + 1}", "exec")
        exec(code, namespace)  # a failure names the block
    assert namespace["answer"].text  # the VideoQA example answered


def _frames(path: Path) -> int:
    with av.open(str(path)) as box:
        return sum(1 for _ in box.decode(video=0))


SERVERS = {
    # a command that serves: the page it is asked for, and what that page must hold
    "streamrt demo": ("/", lambda body: b"gradio" in body.lower()),
    "streamrt serve": ("/v1/stats", lambda body: {"streams", "cache"} <= set(json.loads(body))),
}


def _serve(line: str, cwd: Path, env: dict) -> None:
    path, looks_right = next(v for k, v in SERVERS.items() if line.startswith(k))
    port = int(re.search(r"--port (\d+)", line).group(1)) + 17  # a port no real server holds
    cmd = shlex.split(line.replace(f"--port {port - 17}", f"--port {port}"))
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as page:
                    assert page.status == 200 and looks_right(page.read())
                    return
            except OSError:
                assert time.monotonic() < deadline, f"{cmd[:2]} did not serve {path} in 120 s"
                time.sleep(1)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


@pytest.mark.slow
@pytest.mark.parametrize("n", range(len(shell_lines())))
def test_shell_line_runs(n, scratch):
    where, env = scratch
    line = shell_lines()[n]
    setup = INSTALL.match(line)
    if setup:
        # The install runs verbatim in CI (.ci/run ends with the test line); the venv this
        # test runs in was made by it, so run what follows the install.
        ci = (ROOT / ".ci" / "run").read_text()
        assert "-c constraints.txt" in setup.group(1) and "torch==2.13.0" in setup.group(1)
        rest = setup.group(2)
        if rest.endswith("-m pytest"):
            assert line in ci.splitlines(), "the README's test command is not what CI runs"
            return
        line = rest.replace(".venv/bin/", "")
    if line.startswith(tuple(SERVERS)):
        _serve(line, where, env)
        return
    proc = subprocess.run(
        ["bash", "-c", line], cwd=where, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, f"{line}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    written = re.search(r"(?:-o|--output) (\S+\.mp4)", line)
    if written:
        frames = re.search(r"--frames (\d+)", line)
        expected = int(frames.group(1)) if frames else 48
        assert _frames(where / written.group(1)) == expected
