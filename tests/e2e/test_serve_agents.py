"""`/v1/chat/completions` with the `openai` client against a real server on 127.0.0.1:
greedy outputs equal to the engine's, SSE streaming, programs keeping KV between calls,
bad input answered 4xx, a client leaving mid-stream, every block back at the end."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
import torch

pytestmark = [pytest.mark.timeout(120)]

QUESTION = "a red circle moving right on a dark background . what color was the circle ?"


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[tuple[str, object]]:
    import uvicorn

    from streamrt.apps.serve import create_app
    from streamrt.runtime import Runtime

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    preset = tmp_path_factory.mktemp("agents") / "p.yaml"
    preset.write_text("runtime:\n  admission: false\n")
    rt = Runtime(config=preset, qa=False, agents=True, agent_policy="ttl")
    sock = socket.create_server(("127.0.0.1", 0))
    srv = uvicorn.Server(uvicorn.Config(create_app(rt), log_level="warning"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", rt
    finally:
        srv.should_exit = True
        thread.join(30)
        sock.close()
        torch.set_num_threads(threads)
    assert rt.cache.stats()["consumers"]["agents"]["device"]["blocks"] == 0
    rt.cache.check_invariants()


def client(url):
    from openai import OpenAI

    return OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)


def expected(rt, messages, n):
    """The same greedy decode on a private engine (same model, no server)."""
    from streamrt.agents.engine import AgentEngine

    eng = AgentEngine(rt.agents.model, rt.agents.tokenizer)
    ids = eng.render(messages)
    return eng.decode(eng.generate([ids], n)[0])


def test_completion_and_stream_match_the_engine(server):
    url, rt = server
    messages = [{"role": "user", "content": QUESTION}]
    reply = client(url).chat.completions.create(model="tiny", messages=messages, max_tokens=6)
    assert reply.object == "chat.completion" and reply.choices[0].finish_reason in (
        "stop",
        "length",
    )
    assert reply.choices[0].message.content == expected(rt, messages, 6)
    assert reply.usage.completion_tokens >= 1
    chunks = list(
        client(url).chat.completions.create(
            model="tiny", messages=messages, max_tokens=6, stream=True
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == reply.choices[0].finish_reason
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == reply.choices[0].message.content


def test_program_keeps_kv_between_calls(server):
    url, rt = server
    pid = httpx.post(url + "/v1/agents/programs").json()["id"]
    c = client(url)
    messages = [{"role": "user", "content": QUESTION}]
    first = c.chat.completions.create(
        model="tiny",
        messages=messages,
        max_tokens=4,
        extra_body={"program_id": pid, "tool": "search", "tool_duration_s": 0.1},
    )
    before = rt.agents.counters["prefill_tokens"]
    messages += [
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "tool", "content": "the circle was red ."},
    ]
    second = c.chat.completions.create(
        model="tiny", messages=messages, max_tokens=4, extra_body={"program_id": pid}
    )
    assert second.choices[0].message.content == expected(rt, messages, 4)
    # only the new turn was prefilled: the first call's context stayed in KV (pinned)
    assert rt.agents.counters["prefill_tokens"] - before < second.usage.prompt_tokens // 2
    assert httpx.delete(f"{url}/v1/agents/programs/{pid}").status_code == 200


def test_bad_input_is_4xx_and_the_engine_keeps_serving(server, monkeypatch):
    url, rt = server
    ok = {"model": "tiny", "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 3}
    cases = [
        ({"model": "tiny"}, 400, "messages"),
        ({**ok, "messages": [{"role": "user"}]}, 400, "content"),
        ({**ok, "max_tokens": 0}, 400, "max_tokens"),
        ({**ok, "program_id": "nope"}, 404, "nope"),
        ({**ok, "bogus": 1}, 400, "bogus"),
        ({**ok, "max_tokens": 5000}, 400, "positions"),
    ]
    for body, status, word in cases:
        r = httpx.post(url + "/v1/chat/completions", json=body)
        assert r.status_code == status, (body, r.text)
        assert word in r.json()["error"]
    r = httpx.post(url + "/v1/chat/completions", content=b"{not json")
    assert r.status_code == 400
    # a client leaving mid-stream: its call is cancelled and its KV freed. No EOS and a
    # slowed step keep the call running well past the disconnect (200 tokens >= 2 s).
    monkeypatch.setattr(rt.agents, "eos", set())
    step = rt.agents.step

    def slow_step():
        time.sleep(0.01)
        return step()

    monkeypatch.setattr(rt.agents, "step", slow_step)
    failed = rt.agents.counters["failed"]
    with httpx.stream(
        "POST", url + "/v1/chat/completions", json={**ok, "max_tokens": 200, "stream": True}
    ) as r:
        for _line in r.iter_lines():
            break
    deadline = time.monotonic() + 10
    while rt.agents.running or rt.agents.waiting or rt.agents.agents:
        assert time.monotonic() < deadline, rt.agents.stats()
        time.sleep(0.05)
    assert rt.agents.counters["failed"] == failed + 1  # cancelled, not run to 200 tokens
    assert rt.cache.stats()["consumers"]["agents"]["device"]["blocks"] == 0
    assert httpx.post(url + "/v1/chat/completions", json=ok).status_code == 200
