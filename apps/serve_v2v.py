"""`/v1/v2v`: live video-to-video over a WebSocket (see `streamrt.apps.serve`)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import queue
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
from fastapi import WebSocket, WebSocketDisconnect
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from streamrt.apps.serve import (
    V2VStart,
    decode_image,
    encode_jpeg,
    error_message,
    is_image,
    validation_message,
)
from streamrt.errors import InputError, StreamrtError

# serve.py imports this module inside create_app, once it is itself loaded.
from streamrt.threads import thread_target

if TYPE_CHECKING:
    from streamrt.runtime import Runtime

log = logging.getLogger("streamrt.serve")

V2V_QUEUE = 16
"""Input frames a v2v socket buffers before it stops reading (the client is told by TCP)."""

# ---------------------------------------------------------------------- video-to-video


class _Aborted(Exception):
    """The socket went away (or sent a bad frame): the worker stops at the next input."""


_END = object()


class V2VSession:
    """One WebSocket's live video-to-video: a worker thread runs `VideoToVideo` over the
    frames the socket receives; styled frames go to `outputs` (an asyncio queue), then one
    last item: `_END`, the exception that ended it, or `_Aborted`.

    The cache manager is not thread-safe: the worker holds the lock `open_v2v` gives (a
    `Runtime`'s own) whenever it is in the stream or `VideoToVideo` (see `_inputs`), and
    closes the stream under it. On a pipeline group the rounds run the stream; that lock
    is the session's own.
    """

    def __init__(self, rt: Runtime, prompt: str, loop: asyncio.AbstractEventLoop) -> None:
        self.v2v, self.lock = rt.open_v2v(prompt)  # a bad prompt fails here
        cfg = self.v2v.stream.config
        self.size = (cfg.width, cfg.height)
        self.inputs: queue.Queue[np.ndarray | None] = queue.Queue(maxsize=V2V_QUEUE)
        self.outputs: asyncio.Queue[Any] = asyncio.Queue()
        self.received = 0
        self.sent = 0
        self._loop = loop
        self._abort: BaseException | None = None
        self._ended = threading.Event()
        self._worker = threading.Thread(
            target=thread_target(self._run), name="streamrt-v2v", daemon=True
        )
        self._worker.start()

    # ------------------------------------------------------------------ socket side

    def push_jpeg(self, data: bytes) -> None:
        """Decode, resize to the model's size and queue an input frame (blocks while the
        queue is full: call it in a thread)."""
        import cv2

        frame = decode_image(data) if is_image(data) else None
        if frame is None:
            raise InputError(
                f"input frame {self.received} is not a JPEG or PNG image: send each frame as "
                "one binary message of JPEG bytes"
            )
        if frame.shape[:2] != (self.size[1], self.size[0]):
            frame = cv2.resize(frame, self.size, interpolation=cv2.INTER_AREA)
        self.received += 1
        while not self._ended.is_set():
            with contextlib.suppress(queue.Full):
                self.inputs.put(frame, timeout=0.1)
                return

    def end(self) -> None:
        """No more input: the worker finishes the open chunks and sends `_END`."""
        while not self._ended.is_set():
            with contextlib.suppress(queue.Full):
                self.inputs.put(None, timeout=0.1)
                return

    def abort(self, error: BaseException | None = None) -> None:
        """Stop at the next input (the stream is closed by the worker)."""
        if self._abort is None:
            self._abort = error or _Aborted()

    def join(self, timeout: float) -> None:
        self._worker.join(timeout)

    # ------------------------------------------------------------------ worker

    def _inputs(self) -> Iterator[np.ndarray]:
        """The frames for `VideoToVideo.run`, which the worker drives holding the runtime's
        lock: this releases the lock while it waits for the socket and takes it back before
        it hands `run` the next frame, so every call `run` makes into the stream holds it."""
        while True:
            self.lock.release()
            try:
                frame = self._next_input()
            finally:
                self.lock.acquire()
            if frame is None:
                return
            yield frame

    def _next_input(self) -> np.ndarray | None:
        while True:
            if self._abort is not None:
                raise _Aborted
            with contextlib.suppress(queue.Empty):
                return self.inputs.get(timeout=0.1)

    def _run(self) -> None:
        last: Any = _END
        try:
            with self.lock:  # held once: `_inputs` may release it
                for out in self.v2v.run(self._inputs()):
                    self._emit(out)
        except _Aborted:
            last = self._abort
        except Exception as exc:  # this socket's failure; the runtime keeps serving
            last = exc
        finally:
            try:
                with self.lock:
                    self.v2v.close()
            finally:
                self._ended.set()
                self._emit(last)

    def _emit(self, item: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the event loop is gone (shutdown)
            self._loop.call_soon_threadsafe(self.outputs.put_nowait, item)


async def _v2v_receive(ws: WebSocket, session: V2VSession) -> None:
    """Input frames from the socket until `{"end": true}` (or the socket closes: abort)."""
    try:
        while True:
            message = await ws.receive()
            if message["type"] == "websocket.disconnect":
                session.abort()
                return
            if message.get("bytes") is not None:
                await run_in_threadpool(session.push_jpeg, message["bytes"])
                continue
            try:
                control = json.loads(message.get("text") or "")
            except json.JSONDecodeError:
                control = None
            if control != {"end": True}:
                raise InputError(
                    "after the first message, send frames as binary JPEG messages and "
                    '{"end": true} as text when the input ends'
                )
            await run_in_threadpool(session.end)
            return
    except InputError as exc:
        session.abort(exc)
    except Exception:  # the socket broke
        session.abort()


async def v2v_socket(ws: WebSocket, rt: Runtime, sessions: set[V2VSession]) -> None:
    """The `/v1/v2v` protocol (see the README's "Server" section)."""
    await ws.accept()
    try:
        start = V2VStart.model_validate(json.loads(await ws.receive_text()))
        session = await run_in_threadpool(V2VSession, rt, start.prompt, asyncio.get_running_loop())
    except WebSocketDisconnect:
        return
    except (json.JSONDecodeError, KeyError, ValidationError, StreamrtError) as exc:
        if isinstance(exc, ValidationError):
            text = validation_message(exc.errors())
        elif isinstance(exc, StreamrtError):
            text = str(exc)
        else:
            text = 'the first message must be a JSON text message like {"prompt": "..."}'
        await ws.send_json({"error": text})
        await ws.close(code=1008)
        return
    sessions.add(session)
    receiver = asyncio.create_task(_v2v_receive(ws, session))
    try:
        await ws.send_json({"width": session.size[0], "height": session.size[1]})
        while True:
            item = await session.outputs.get()
            if isinstance(item, np.ndarray):
                await ws.send_bytes(await run_in_threadpool(encode_jpeg, item))
                session.sent += 1
            elif item is _END:
                await ws.send_json({"done": True, "frames": session.sent})
                await ws.close()
                return
            elif isinstance(item, _Aborted):
                return  # the client left
            else:
                if not isinstance(item, StreamrtError):
                    log.error("v2v socket failed", exc_info=item)
                await ws.send_json({"error": error_message(item)})
                await ws.close(code=1003 if isinstance(item, InputError) else 1011)
                return
    except (WebSocketDisconnect, RuntimeError):  # the client left while we sent
        pass
    finally:
        receiver.cancel()
        session.abort()
        sessions.discard(session)
