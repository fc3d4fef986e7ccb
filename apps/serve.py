"""`streamrt serve`: the runtime over HTTP and WebSocket (FastAPI + uvicorn).

    streamrt serve                              # http://127.0.0.1:8000, embedded tiny models
    streamrt serve --model DIR --config FILE    # a real generator, a preset's budgets

One `Runtime` serves every client: its step loop batches the forwards of all generation
streams, QA sessions share its cache manager. The contract (README, "Server"):

    POST   /v1/streams                     {"prompt", "num_frames", "fps", "seed"} -> 201 {"id"}
    GET    /v1/streams/{id}/frames.mjpeg   multipart/x-mixed-replace JPEG frames as produced
    POST   /v1/streams/{id}/prompt         {"prompt"}: switch at the next chunk (KV re-cache)
    DELETE /v1/streams/{id}                end the stream, free its KV blocks
    POST   /v1/qa/sessions                 {"stream_id"} (optional: watch that stream) -> 201 {"id"}
    POST   /v1/qa/sessions/{id}/frames     body: a JPEG/PNG image or a video file
    POST   /v1/qa/sessions/{id}/ask        {"question"} -> {"text", "timestamps", "latency_s", "warnings"}
    DELETE /v1/qa/sessions/{id}            end the session, free its memory
    POST   /v1/agents/programs             {} -> 201 {"id"}: an agent program (KV kept between calls)
    DELETE /v1/agents/programs/{id}        end the program, free its KV
    POST   /v1/chat/completions            OpenAI chat completions (stream or not) on the agent
                                           engine; extra fields program_id, tool, tool_duration_s
    GET    /v1/stats                       the runtime's stats
    WS     /v1/v2v                         {"prompt"}, then JPEG frames in, styled JPEG frames out

Every error is JSON `{"error": "<what to fix>"}`: 400 a bad request (the message names the
field), 404 an unknown id or route, 413 a body over `MAX_BODY_BYTES`, 503 the runtime is at
capacity, 500 a failure on the server's side (the server log has the traceback; a client
never gets one). A failing request fails alone: the other streams keep running.

`create_app(runtime)` builds the app (tests serve it with uvicorn in a thread); the app
owns the runtime: it starts its step loop on startup and closes it on shutdown.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import math
import socket
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import anyio
import numpy as np
from fastapi import FastAPI, Request, WebSocket
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from streamrt.apps.arguments import compile_overrides
from streamrt.errors import InputError, StreamrtError, UnknownNameError, UnsupportedError
from streamrt.runtime import AdmissionError, QAHandle, StreamFailed

if TYPE_CHECKING:
    from streamrt.runtime import Runtime, StreamHandle

log = logging.getLogger("streamrt.serve")

BOUNDARY = "frame"
"""The MJPEG multipart boundary."""
MAX_BODY_BYTES = 64 << 20
"""Largest frames body (an image or a video file) a QA session takes."""
ASK_FLUSH_S = 10.0
"""`ask` first waits this long at most for the session's queued frames to be encoded."""
GRACE_S = 3.0
"""On shutdown, open responses (an endless MJPEG stream) get this long before they are cut."""
FRAMES_HINT = (
    "send one JPEG or PNG image, or a video file (mp4, webm, mkv, ...), as the request body"
)


# ---------------------------------------------------------------------- request bodies


class Body(BaseModel):
    """A JSON request body: exact types (no "12" for 12), no fields beyond the declared."""

    model_config = ConfigDict(extra="forbid", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _known_fields(cls, data: Any) -> Any:
        if isinstance(data, dict) and (unknown := sorted(set(data) - set(cls.model_fields))):
            raise ValueError(
                f"unknown field(s) {', '.join(map(repr, unknown))}: the fields are "
                f"{', '.join(cls.model_fields)}"
            )
        return data


class OpenStream(Body):
    prompt: str
    num_frames: int | None = Field(None, ge=1)
    fps: float | None = Field(None, gt=0, allow_inf_nan=False)
    seed: int | None = None
    priority: int = 0
    kv_quota_mb: float | None = Field(None, gt=0, allow_inf_nan=False)


class Prompt(Body):
    prompt: str


class OpenQA(Body):
    stream_id: str | None = None
    priority: int = 0
    kv_quota_mb: float | None = Field(None, gt=0, allow_inf_nan=False)


class Question(Body):
    question: str


class V2VStart(Body):
    prompt: str


def validation_message(errors: list[dict[str, Any]]) -> str:
    """pydantic's errors as one line that names each field and what to send."""
    parts = []
    for e in errors:
        field = ".".join(str(x) for x in e["loc"] if x not in ("body", "query", "path"))
        kind = e["type"]
        if kind == "json_invalid":
            return f"the body is not valid JSON ({e['ctx']['error']}): send a JSON object"
        if kind == "missing" and not field:
            return "the request needs a JSON object body"
        if kind in ("model_type", "model_attributes_type", "dict_type"):
            return f"the body must be a JSON object, got {_short(e['input'])}"
        msg = e["msg"].removeprefix("Value error, ")
        if kind == "missing":
            parts.append(f"{field}: required")
        elif kind == "value_error" and not field:
            parts.append(msg)
        else:
            parts.append(f"{field}: {msg[0].lower()}{msg[1:]}, got {_short(e['input'])}")
    return "; ".join(parts)


def _short(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (str, int, float, list, dict)) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# ---------------------------------------------------------------------- errors


def error_status(exc: BaseException) -> int:
    """The HTTP status of a streamrt error."""
    if isinstance(exc, UnknownNameError):
        return 404
    if isinstance(exc, AdmissionError):
        return 503
    if isinstance(exc, UnsupportedError):
        return 501
    if isinstance(exc, InputError):  # PromptError too
        return 400
    return 500  # the machine or the files (a full disk, a broken checkpoint): the operator's


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def json_safe(value: Any) -> Any:
    """`value` with tuples as lists, numpy scalars as numbers and non-finite floats as null."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, np.ndarray)):
        return [json_safe(v) for v in value]
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return str(value)


# ---------------------------------------------------------------------- images


def encode_jpeg(frame: np.ndarray, quality: int = 90) -> bytes:
    """An RGB uint8 frame `[H, W, 3]` as JPEG bytes."""
    import cv2

    ok, data = cv2.imencode(
        ".jpg", np.ascontiguousarray(frame[..., ::-1]), [cv2.IMWRITE_JPEG_QUALITY, quality]
    )
    if not ok:
        raise RuntimeError(f"opencv could not encode a {frame.shape} frame as JPEG")
    return data.tobytes()


def decode_image(data: bytes) -> np.ndarray | None:
    """An RGB uint8 frame from JPEG/PNG bytes, or None when they are not a readable image."""
    import cv2

    if not data:
        return None
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    return None if image is None else np.ascontiguousarray(image[..., ::-1])


def is_image(data: bytes) -> bool:
    return data.startswith((b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n"))


def decode_video(data: bytes, fps: float) -> list[tuple[float, np.ndarray]]:
    """`(seconds, RGB frame)` of a video file's bytes at most `fps` a second (as `streamrt
    ask` samples a file), or an `InputError` saying what to send."""
    import av

    try:
        box = av.open(io.BytesIO(data))
    except (OSError, av.error.FFmpegError, ValueError):
        raise InputError(
            f"the body is neither an image nor a readable video: {FRAMES_HINT}"
        ) from None
    out: list[tuple[float, np.ndarray]] = []
    with box:
        if not box.streams.video:
            raise InputError(f"the body holds no video stream: {FRAMES_HINT}")
        rate = float(box.streams.video[0].average_rate or 25)
        next_t = 0.0
        try:
            for index, frame in enumerate(box.decode(video=0)):
                t = float(frame.time) if frame.time is not None else index / rate
                if t + 1e-9 >= next_t:
                    next_t = t + 1.0 / fps
                    out.append((t, frame.to_ndarray(format="rgb24")))
        except (OSError, av.error.FFmpegError) as exc:
            raise InputError(f"the video in the body is broken ({exc}): {FRAMES_HINT}") from None
    if not out:
        raise InputError(f"the video in the body has no frames: {FRAMES_HINT}")
    return out


def body_frames(data: bytes, fps: float) -> list[tuple[float, np.ndarray]]:
    """The frames of a frames body (an image: one frame at 0 s), or an `InputError`."""
    if not data:
        raise InputError(f"the body is empty: {FRAMES_HINT}")
    if is_image(data):
        image = decode_image(data)
        if image is None:
            raise InputError(f"the body is a broken JPEG/PNG image: {FRAMES_HINT}")
        return [(0.0, image)]
    return decode_video(data, fps)


# ---------------------------------------------------------------------- MJPEG


def mjpeg_part(jpeg: bytes) -> bytes:
    head = f"--{BOUNDARY}\r\nContent-Type: image/jpeg\r\nContent-Length: {len(jpeg)}\r\n\r\n"
    return head.encode() + jpeg + b"\r\n"


class ClosingStreamingResponse(StreamingResponse):
    """A streaming response that always closes its body iterator when it ends: a client that
    disconnects runs the iterator's cleanup at once (not whenever it is garbage collected)."""

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()  # type: ignore[attr-defined]


async def mjpeg(handle: StreamHandle, readers: anyio.CapacityLimiter) -> AsyncIterator[bytes]:
    """The stream's frames as MJPEG parts; ends after its last frame. If the client goes away
    first, the stream is closed (its KV blocks go back to the cache manager)."""
    frames = handle.frames()
    try:
        while True:
            # A cancelled wait (the client left) abandons the thread; closing the stream
            # below ends its `frames()`, so the thread ends too.
            frame = await anyio.to_thread.run_sync(
                next, frames, None, abandon_on_cancel=True, limiter=readers
            )
            if frame is None:
                break
            yield mjpeg_part(await anyio.to_thread.run_sync(encode_jpeg, frame))
        yield f"--{BOUNDARY}--\r\n".encode()
    except StreamFailed as exc:  # the status line went out long ago: end the multipart
        log.warning("%s", exc)
    finally:
        if not handle.done:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(_close_quietly, handle)


def _close_quietly(handle: StreamHandle) -> None:
    with contextlib.suppress(StreamrtError):
        handle.close()


# ---------------------------------------------------------------------- QA


def feed_body(rt: Runtime, handle: QAHandle, data: bytes, timestamp: float | None) -> dict:
    """Queue a frames body's frames into a QA session. Never more than the session's queue
    holds at once: between pieces it waits for them to be encoded, so a long video is not
    dropped by the queue's drop policy (a live feed that posts faster than the model encodes
    still is)."""
    fps = rt.session(handle.id).qa.config.fps
    timed = body_frames(data, fps)
    room = rt.config.qa_queue_frames
    kept = 0
    for start in range(0, len(timed), room):
        if start:
            handle.flush(timeout=60.0)
        for t, frame in timed[start : start + room]:
            kept += handle.feed(frame, None if timestamp is None else timestamp + t)
    return {"frames": len(timed), "queued": kept, "dropped": len(timed) - kept}


def ask(handle: QAHandle, question: str, flush_s: float) -> dict:
    """Answer after the frames queued so far are encoded (waiting `flush_s` at most: the
    answer then says how many it could not see)."""
    warnings = []
    try:
        handle.flush(timeout=flush_s)
    except TimeoutError:
        queued = handle.stats()["queued"]
        warnings.append(
            f"{queued} frame(s) were still waiting to be encoded after {flush_s:g} s: this "
            "answer does not see them (the runtime is busy; ask again later)"
        )
    answer = handle.ask(question)
    return {
        "text": answer.text,
        "timestamps": [float(t) for t in answer.timestamps],
        "latency_s": answer.latency_s,
        "warnings": [*answer.warnings, *warnings],
    }


def error_message(exc: BaseException) -> str:
    if isinstance(exc, StreamrtError):
        return str(exc)
    return f"internal error ({type(exc).__name__}: {exc}); the server log has the traceback"


# ---------------------------------------------------------------------- the app


def create_app(runtime: Runtime, ask_flush_s: float = ASK_FLUSH_S) -> FastAPI:
    """The HTTP/WebSocket app over `runtime`, which it owns: `runtime.start()` on startup,
    `runtime.close()` on shutdown."""
    from streamrt.apps.serve_chat import chat_once, chat_request, chat_stream
    from streamrt.apps.serve_v2v import V2VSession, v2v_socket

    rt = runtime
    v2v_sessions: set[V2VSession] = set()
    # MJPEG readers wait in threads of their own: endless streams never starve the pool
    # that runs the other endpoints.
    readers = anyio.CapacityLimiter(rt.config.max_streams + 4)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        rt.start()
        try:
            yield
        finally:
            for session in list(v2v_sessions):
                session.abort()
            for session in list(v2v_sessions):
                await run_in_threadpool(session.join, 10.0)
            await run_in_threadpool(rt.close)

    app = FastAPI(title="streamrt", lifespan=lifespan, docs_url=None, redoc_url=None)

    @app.exception_handler(StreamrtError)
    async def streamrt_error(request: Request, exc: StreamrtError) -> JSONResponse:
        status = error_status(exc)
        if status == 500:
            log.error("%s %s failed: %s", request.method, request.url.path, exc)
        return _error(status, str(exc))

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(400, validation_message(list(exc.errors())))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        if exc.status_code == 404 and exc.detail == "Not Found":
            message = f"no route {request.url.path}: see the README's Server section"
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
        else:
            message = str(exc.detail)
        return _error(exc.status_code, message)

    @app.exception_handler(Exception)
    async def bug(request: Request, exc: Exception) -> JSONResponse:
        return _error(500, error_message(exc))

    # ------------------------------------------------------------------ streams

    @app.post("/v1/streams", status_code=201)
    def open_stream(body: OpenStream) -> dict:
        handle = rt.open_stream(
            body.prompt,
            body.num_frames,
            body.fps,
            body.seed,
            priority=body.priority,
            kv_quota_mb=body.kv_quota_mb,
        )
        return {"id": handle.id}

    @app.get("/v1/streams/{stream_id}/frames.mjpeg")
    def frames(stream_id: str) -> StreamingResponse:
        handle = rt.stream(stream_id)
        return ClosingStreamingResponse(
            mjpeg(handle, readers),
            media_type=f"multipart/x-mixed-replace; boundary={BOUNDARY}",
            headers={"Cache-Control": "no-store"},
        )

    @app.post("/v1/streams/{stream_id}/prompt")
    def set_prompt(stream_id: str, body: Prompt) -> dict:
        rt.set_prompt(stream_id, body.prompt)
        return {"id": stream_id, "prompt": body.prompt}

    @app.delete("/v1/streams/{stream_id}")
    def close_stream(stream_id: str) -> dict:
        rt.close_stream(stream_id)
        return {"id": stream_id, "frames": rt.stream_stats(stream_id)["frames"]}

    # ------------------------------------------------------------------ QA sessions

    @app.post("/v1/qa/sessions", status_code=201)
    def open_qa(body: OpenQA | None = None) -> dict:
        body = body or OpenQA()
        return {"id": rt.open_qa(body.stream_id, body.priority, body.kv_quota_mb).id}

    @app.post("/v1/qa/sessions/{session_id}/frames", status_code=202)
    async def post_frames(session_id: str, request: Request, timestamp: float | None = None):
        handle = QAHandle(rt, await run_in_threadpool(rt.session, session_id))
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > MAX_BODY_BYTES:
                return _error(
                    413,
                    f"the body is over {MAX_BODY_BYTES >> 20} MiB: send a shorter video, or "
                    "post it in parts",
                )
        return await run_in_threadpool(feed_body, rt, handle, bytes(data), timestamp)

    @app.post("/v1/qa/sessions/{session_id}/ask")
    def ask_question(session_id: str, body: Question) -> dict:
        return ask(QAHandle(rt, rt.session(session_id)), body.question, ask_flush_s)

    @app.delete("/v1/qa/sessions/{session_id}")
    def close_qa(session_id: str) -> dict:
        rt.close_qa(session_id)
        return {"id": session_id}

    # ------------------------------------------------------------------ agents

    def engine():
        if rt.agents is None:
            raise InputError("this server runs no agent engine (start it with --agents)")
        return rt.agents

    @app.post("/v1/agents/programs", status_code=201)
    def open_program() -> dict:
        return {"id": engine().open_agent().id}

    @app.delete("/v1/agents/programs/{program_id}")
    def close_program(program_id: str) -> dict:
        engine().close_agent(program_id)
        return {"id": program_id}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "the body must be a JSON object (OpenAI chat completions)")
        eng = engine()
        req = await run_in_threadpool(chat_request, eng, body)
        if req["stream"]:
            return StreamingResponse(chat_stream(eng, req), media_type="text/event-stream")
        return await run_in_threadpool(chat_once, eng, req)

    # ------------------------------------------------------------------ the rest

    @app.get("/v1/stats")
    def stats() -> dict:
        return json_safe(rt.stats())

    @app.websocket("/v1/v2v")
    async def v2v(ws: WebSocket) -> None:
        await v2v_socket(ws, rt, v2v_sessions)

    return app


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on `host:port`, or an `InputError` saying what to change."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        return socket.create_server((host, port), family=family, backlog=2048)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise InputError(
            f"cannot serve on {host}:{port} ({reason}): pass another --port or --host"
        ) from None


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from streamrt.runtime import Runtime

    if getattr(args, "parallel", None):
        from streamrt.apps.serve_parallel import run_parallel

        return run_parallel(args)
    sock = listen(args.host, args.port)  # before loading models: a taken port fails at once
    try:
        rt = Runtime(
            args.model,
            args.qa_model,
            args.config,
            agents=getattr(args, "agents", None) or False,
            agent_policy=getattr(args, "agent_policy", "baseline"),
            **compile_overrides(args),
        )
        config = uvicorn.Config(create_app(rt), log_level="info", timeout_graceful_shutdown=GRACE_S)
        host = f"[{args.host}]" if ":" in args.host else args.host
        print(f"streamrt serve: http://{host}:{args.port}/v1/stats (Ctrl+C stops)", flush=True)
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()
    return 0
