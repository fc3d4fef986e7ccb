"""QA sessions on the runtime: a bounded feed queue, encoding batched across sessions,
questions ahead of encoding, and a stated rule under memory pressure.

    feed(frame)   never blocks: the frame joins the session's queue (`qa_queue_frames`);
                  a full queue drops by `runtime.qa_drop` (oldest: the memory follows the
                  live edge; newest: it keeps every frame up to a gap) and counts the drop.
    step loop     with time to spare before the most urgent stream's deadline, the queued
                  frames of every session are encoded in one vision batch and stored.
    ask(q)        takes the runtime's lock at once (ahead of queued encoding) and answers
                  from the frames stored so far. If the device tier has no room for the
                  retrieved blocks, it retries with half as many (down to one frame) and the
                  answer says so in its warnings; only then does it fail.
"""

from __future__ import annotations

import dataclasses
import time
from collections import deque
from typing import TYPE_CHECKING, Any

import numpy as np

from streamrt.cache import OutOfBlocksError
from streamrt.config import QAConfig, RuntimeConfig
from streamrt.errors import InputError, StreamrtError, UnknownNameError
from streamrt.qa.video_qa import Answer, VideoQA
from streamrt.runtime.live import quota_bytes
from streamrt.runtime.overload import AdmissionError

if TYPE_CHECKING:
    from streamrt.cache import CacheManager
    from streamrt.runtime.runtime import Runtime


class QASession:
    """Runtime-side state of one QA session."""

    def __init__(
        self,
        session_id: str,
        adapter: Any,
        tokenizer: Any,
        config: QAConfig,
        manager: CacheManager,
        runtime_config: RuntimeConfig,
        stream_id: str | None,
        priority: int,
        kv_quota_mb: float | None = None,
    ) -> None:
        self.id = session_id
        self.qa = VideoQA(adapter, tokenizer, config, manager=manager)
        try:
            self._check_quota(kv_quota_mb)
        except BaseException:
            self.qa.close()
            raise
        self.stream_id = stream_id
        self.priority = priority
        self.queue: deque[tuple[np.ndarray, float | None]] = deque()
        self.limit = runtime_config.qa_queue_frames
        self.drop = runtime_config.qa_drop
        self.dropped = 0
        self.fed = 0
        self.stride = 1
        """A watched stream's frames it is fed: every `stride`-th (near the QA model's fps)."""
        self.error: str | None = None
        """Why frames were last dropped at encoding (e.g. no room for their blocks)."""

    def device_blocks(self) -> int:
        """Most device blocks an answer holds: the system-prompt sink, the window, the
        retrieved frames, and the question and answer tokens."""
        cfg, memory = self.qa.config, self.qa.memory
        text = cfg.max_question_tokens + cfg.max_new_tokens
        tpb = memory.spec.tokens_per_block
        return memory.num_sink + cfg.window_frames + cfg.retrieve_frames + -(-text // tpb)

    def _check_quota(self, quota_mb: float | None) -> None:
        """Refuse a session whose answers would hold more device KV than `quota_mb`."""
        quota = quota_bytes(quota_mb)
        if quota is None:
            return
        block = self.qa.memory.spec.block_bytes
        need = self.device_blocks() * block
        if need > quota:
            cfg = self.qa.config
            raise InputError(
                f"this QA session's answers hold up to {need / 1e6:.2f} MB of KV on the device "
                f"({self.device_blocks()} blocks of {block / 1e6:.3f} MB: sink, "
                f"window_frames={cfg.window_frames}, retrieve_frames={cfg.retrieve_frames}, "
                f"question and answer tokens) but kv_quota_mb is {quota_mb:g}: lower "
                "window_frames / retrieve_frames / max_question_tokens or raise the quota"
            )

    def push(self, frame: np.ndarray, timestamp: float | None) -> bool:
        """Queue a frame; False if a frame was dropped to make room (or this one was)."""
        if len(self.queue) < self.limit:
            self.queue.append((frame, timestamp))
            return True
        self.dropped += 1
        if self.drop == "oldest":
            self.queue.popleft()
            self.queue.append((frame, timestamp))
        return False

    def take_queued(self, most: int = 16) -> list[tuple[np.ndarray, float | None]]:
        out = []
        while self.queue and len(out) < most:
            out.append(self.queue.popleft())
        return out

    def stats(self) -> dict[str, Any]:
        out = dict(self.qa.stats())
        out.update(
            stream_id=self.stream_id,
            queued=len(self.queue),
            dropped=self.dropped,
            fed=self.fed,
            priority=self.priority,
            error=self.error,
        )
        return out

    def close(self) -> None:
        self.queue.clear()
        self.qa.close()


def encode_together(work: list[tuple[QASession, list[tuple[np.ndarray, float | None]]]]) -> int:
    """Encode the queued frames of several sessions in one vision batch and store each
    session's share; returns the number of frames stored. A session whose frames are
    refused (wrong shape) drops them and counts them."""
    import torch

    prepared = []
    for session, items in work:
        frames = [f for f, _ in items]
        stamps = [t for _, t in items]
        given = None if any(t is None for t in stamps) else stamps
        try:
            pixels, times = session.qa.prepare(np.stack(frames), given)
        except (InputError, ValueError):
            session.dropped += len(frames)
            continue
        prepared.append((session, pixels, times))
    if not prepared:
        return 0
    adapter = prepared[0][0].qa.adapter
    with torch.no_grad():
        embeds = adapter.encode_frames(torch.cat([p for _, p, _ in prepared]))
    start = 0
    stored = 0
    for session, pixels, times in prepared:
        n = pixels.shape[0]
        try:
            session.qa.store(embeds[start : start + n], times)
            session.fed += n
            stored += n
        except StreamrtError as exc:  # e.g. no room for its blocks: this session drops them
            session.dropped += n
            session.error = str(exc)
        start += n
    return stored


class QASessions:
    """Mixin of `Runtime` and of the pipeline server (`streamrt.parallel.serving`): their QA
    sessions (`sessions`, under `lock`), each possibly watching one of their `streams`."""

    sessions: dict[str, QASession]

    def _open_session(
        self,
        parts: tuple[Any, Any, QAConfig],
        manager: CacheManager,
        config: RuntimeConfig,
        source: Any,
        stream_id: str | None,
        priority: int,
        kv_quota_mb: float | None,
        qa_config: dict[str, Any],
    ) -> QAHandle:
        """A new session (called under `lock`; refused at `config.max_streams` sessions);
        with `source` (a stream with a `playout` clock) it is fed every k-th frame of it,
        near the QA model's own fps."""
        if len(self.sessions) >= config.max_streams:
            raise AdmissionError(
                f"{len(self.sessions)} QA sessions are open, runtime.max_streams: close one"
            )
        if source is not None and source.done:
            raise InputError(f"stream {stream_id} has ended: there is nothing to watch")
        adapter, tokenizer, base = parts
        session_id = f"q{next(self._ids)}"
        session = QASession(
            session_id,
            adapter,
            tokenizer,
            dataclasses.replace(base, session=session_id, **qa_config),
            manager,
            config,
            stream_id,
            priority,
            kv_quota_mb,
        )
        self.sessions[session_id] = session
        if source is not None:
            session.stride = max(1, round(source.playout.fps / session.qa.config.fps))
            source.watchers.append(session)
        return QAHandle(self, session)

    def session(self, session_id: str) -> QASession:
        with self.lock:
            if session_id not in self.sessions:
                raise UnknownNameError(f"no QA session {session_id!r}")
            return self.sessions[session_id]

    def close_qa(self, session_id: str) -> None:
        with self.lock:
            session = self.session(session_id)
            del self.sessions[session_id]
            for live in self.streams.values():
                if session in live.watchers:
                    live.watchers.remove(session)
            session.close()


class QAHandle:
    """A QA session on a `Runtime` (thread-safe): `feed` frames, `ask` questions."""

    def __init__(self, runtime: Runtime, session: QASession) -> None:
        self._runtime = runtime
        self._session = session
        self.id = session.id
        self.stream_id = session.stream_id

    @property
    def config(self) -> QAConfig:
        """The session's settings (e.g. `fps`: the frame rate its model was trained for)."""
        return self._session.qa.config

    def feed(self, frames: Any, timestamp: float | None = None) -> int:
        """Queue one frame `[H, W, 3]` or several `[N, H, W, 3]` uint8; never blocks.
        Returns how many were queued without a drop (see `stats()["dropped"]`)."""
        array = np.asarray(frames)
        if array.ndim == 3:
            array = array[None]
        if array.ndim != 4 or array.shape[-1] != 3 or array.shape[0] == 0:
            raise InputError(
                f"frames must be [H, W, 3] or [N, H, W, 3] RGB, got shape {tuple(array.shape)}"
            )
        fps = self._session.qa.config.fps
        with self._runtime.lock:
            kept = 0
            for i, frame in enumerate(array):
                stamp = None if timestamp is None else timestamp + i / fps
                kept += self._session.push(frame, stamp)
        self._runtime._wake.set()
        return kept

    def ask(self, question: str, max_new_tokens: int | None = None) -> Answer:
        """Answer from the frames stored so far (queued frames not yet encoded are not
        seen; `flush()` first to wait for them)."""
        qa = self._session.qa
        qa.check_question(question)
        with self._runtime.lock:
            return _ask_degrading(qa, question, max_new_tokens)

    def flush(self, timeout: float = 60.0) -> None:
        """Wait until this session's queued frames are encoded."""
        deadline = time.perf_counter() + timeout
        while self._session.queue:
            if time.perf_counter() > deadline:
                raise TimeoutError(f"QA session {self.id}: frames still queued after {timeout} s")
            if self._runtime._thread is None:
                self._runtime.step()
            else:
                time.sleep(0.005)

    def stats(self) -> dict[str, Any]:
        with self._runtime.lock:
            return self._session.stats()

    def close(self) -> None:
        self._runtime.close_qa(self.id)


def _ask_degrading(qa: VideoQA, question: str, max_new_tokens: int | None) -> Answer:
    cfg = qa.config
    wanted = cfg.retrieve_frames
    tries = wanted
    while True:
        try:
            answer = qa.ask(question, max_new_tokens)
        except OutOfBlocksError:
            if tries <= 1:
                qa.config = cfg
                raise
            tries = max(1, tries // 2)
            qa.config = dataclasses.replace(cfg, retrieve_frames=tries)
            continue
        qa.config = cfg
        if tries < wanted:
            note = (
                f"memory is short: retrieved {tries} of {wanted} frames (runtime QA degrade rule)"
            )
            answer = dataclasses.replace(answer, notes=(*answer.notes, note))
        return answer
