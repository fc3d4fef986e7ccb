"""`/v1/chat/completions`: OpenAI-compatible chat on the agent engine (see `streamrt.apps.serve`)."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio

from streamrt.errors import InputError, StreamrtError, UnknownNameError

# ---------------------------------------------------------------------- chat completions

CHAT_FIELDS = {
    "model", "messages", "max_tokens", "max_completion_tokens", "stream", "program_id",
    "tool", "tool_duration_s", "temperature", "top_p", "n", "stop", "seed", "user",
    "stream_options",
}  # fmt: skip
"""Accepted fields; sampling fields are accepted and ignored (decoding is greedy)."""
CHAT_TIMEOUT_S = 300.0


def chat_request(eng: Any, body: Any) -> dict[str, Any]:
    """Validate an OpenAI chat request; render its messages; open its call (400/404 if bad)."""
    if not isinstance(body, dict):
        raise InputError("the body must be a JSON object (OpenAI chat completions)")
    unknown = sorted(set(body) - CHAT_FIELDS)
    if unknown:
        raise InputError(f"unknown field(s) {', '.join(map(repr, unknown))}")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InputError("messages: a non-empty list of {role, content} objects")
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str)):
            raise InputError(f"messages[{i}]: an object with a string role")
        if not isinstance(m.get("content"), str):
            raise InputError(f"messages[{i}].content: a string")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    max_tokens = 16 if max_tokens is None else max_tokens
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise InputError(f"max_tokens: a whole number >= 1, got {max_tokens!r}")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise InputError("stream: true or false")
    program_id, tool = body.get("program_id"), body.get("tool")
    duration = body.get("tool_duration_s")
    if program_id is not None and not isinstance(program_id, str):
        raise InputError("program_id: a string (POST /v1/agents/programs makes one)")
    if tool is not None and not isinstance(tool, str):
        raise InputError("tool: the name of the tool this call ends in")
    if duration is not None and (
        isinstance(duration, bool)
        or not isinstance(duration, (int, float))
        or not (0 <= duration < 1e6)
    ):
        raise InputError("tool_duration_s: seconds >= 0")
    if duration is not None and tool is None:
        raise InputError("tool_duration_s needs tool")
    ids = eng.render([{"role": m["role"], "content": m["content"]} for m in messages])
    temporary = program_id is None
    agent_id = eng.open_agent().id if temporary else eng.agent(program_id).id
    try:
        call = eng.call(agent_id, ids, max_tokens, (tool, duration) if tool else None)
    except BaseException:
        if temporary:
            eng.close_agent(agent_id)
        raise
    return {
        "call": call,
        "agent": agent_id,
        "temporary": temporary,
        "stream": stream,
        "model": body.get("model") or "streamrt-agents",
        "prompt_tokens": len(ids),
        "id": f"chatcmpl-{agent_id}-{call.seq_no}",
        "created": int(time.time()),
    }


def _end(eng: Any, req: dict[str, Any]) -> None:
    """The call is over (or abandoned): stop it, free a one-off call's agent."""
    call = req["call"]
    if not call.done:
        eng.cancel(call, "the client went away")
    if req["temporary"]:
        with contextlib.suppress(UnknownNameError):
            eng.close_agent(req["agent"])


def chat_once(eng: Any, req: dict[str, Any]) -> dict[str, Any]:
    call = req["call"]
    try:
        out = call.wait(CHAT_TIMEOUT_S)
    finally:
        _end(eng, req)
    return {
        "id": req["id"],
        "object": "chat.completion",
        "created": req["created"],
        "model": req["model"],
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": eng.decode(out)},
                "finish_reason": call.finish_reason,
            }
        ],
        "usage": {
            "prompt_tokens": req["prompt_tokens"],
            "completion_tokens": len(out),
            "total_tokens": req["prompt_tokens"] + len(out),
        },
    }


async def chat_stream(eng: Any, req: dict[str, Any]) -> AsyncIterator[bytes]:
    """SSE `chat.completion.chunk`s: the role, one per token (text delta), the finish."""
    call = req["call"]

    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        data = {
            "id": req["id"],
            "object": "chat.completion.chunk",
            "created": req["created"],
            "model": req["model"],
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }
        return f"data: {json.dumps(data)}\n\n".encode()

    tokens = call.tokens(CHAT_TIMEOUT_S)
    out: list[int] = []
    text = ""
    try:
        yield chunk({"role": "assistant", "content": ""})
        while True:
            try:
                token = await anyio.to_thread.run_sync(next, tokens, None)
            except StreamrtError as exc:
                yield f"data: {json.dumps({'error': str(exc)})}\n\n".encode()
                return
            if token is None:
                break
            out.append(token)
            now = eng.decode(out)
            delta, text = now[len(text) :] if now.startswith(text) else now, now
            yield chunk({"content": delta})
        yield chunk({}, call.finish_reason)
        yield b"data: [DONE]\n\n"
    finally:
        _end(eng, req)


# ---------------------------------------------------------------------- the command
