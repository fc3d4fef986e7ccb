"""Live streams served on a layer-pipeline group (`streamrt serve --parallel layers`).

Rank 0 takes requests (the HTTP server runs there); every rank runs the same rounds:

    rank 0                                   every rank
    ------                                   ----------
    requests -> commands (open, switch,      broadcast_object_list(commands)
    close, which streams advance)     ---->  apply them to its streams (same order, same ids)
                                             LayerPipeline.run(advancing streams, 1 chunk)
    decode each finished chunk, hand            (its blocks' share of every forward;
    out its frames                               every rank gets every velocity)

Every rank steps the same samplers with the same seeds, so every rank holds every stream's
clean latents: rank 0 decodes them itself. A stream advances while fewer than
`buffer_chunks` of its chunks wait for its reader (a slow viewer holds its stream back,
not the others); with no work rank 0 still broadcasts an empty round every `idle_s`, so
the other ranks never sit in a collective long enough to time out. A rank that fails or
stalls ends every stream with the pipeline's error naming the rank.

Deadlines (rank 0, `Playout` as in `streamrt.runtime`): streams advance least slack first;
one more than `ahead_s` ahead of its playout waits (the round thread sleeps until the
first is due); a new stream is refused (`AdmissionError`) when the streams' chunks per
second times the measured seconds per stream-chunk would pass `headroom`.

QA sessions and LLM agents run on rank 0 (`streamrt.parallel.serving_side`), on its cache
manager; a QA session may watch a pipeline stream.

Live video-to-video (`open_v2v`, the `/v1/v2v` socket): rank 0 runs the similarity filter
and cuts the input into chunks (`VideoToVideo`); each chunk of pixels goes to every rank
with the round's commands, every rank's stream takes it through its own `VideoToVideo`
source (the same motion-aware noise everywhere: same pixels, same seed), the chunk runs
through the pipeline ahead of the generation streams, and rank 0 decodes the styled
frames. A window sampler still filling up asks for more input (`NeedInput`): that
stream's chunk starts again when the next input arrives, as it does on one process.
Overload (rank 0 decides between rounds, every rank applies): the runtime's degrade order
(`streamrt.runtime.overload`, the same code): when the most urgent stream is
`suspend_late_s` late, the lowest-priority chunk-wise stream at full quality runs
`degrade_steps` steps (its new schedule goes to every rank), then the lowest-priority
stream is suspended (every rank moves its blocks' share of the stream's KV to the host);
with room again they resume, then get their steps back. A new stream beyond capacity first
suspends lower-priority streams. Every round ends at every stream's chunk boundary, so a
change applies from each stream's next chunk. Video-to-video streams are paced by their
input and take no part.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from streamrt.config import RuntimeConfig
from streamrt.errors import InputError, UnknownNameError, UnsupportedError
from streamrt.gen.stream import GenStream, check_num_frames
from streamrt.gen.v2v import VideoToVideo
from streamrt.parallel.launch import PipelineError
from streamrt.parallel.serving_overload import (
    PipelineLoad,
    PipelineOverload,
    forwards_per_chunk,
)
from streamrt.parallel.serving_side import PipelineSideWork
from streamrt.runtime.live import Degradable, StreamFailed
from streamrt.runtime.overload import move_kv
from streamrt.runtime.playout import Playout

_END = object()
NOT_HERE = (
    "not served on a pipeline group yet (this server runs --parallel layers): run "
    "`streamrt serve` without --parallel for per-stream KV quotas"
)


class PipelineFailed(StreamFailed):
    """The pipeline group failed (a rank died or stalled); every stream ended."""


@dataclass
class _Stream(Degradable):
    id: str
    prompt: str
    num_frames: int | None
    seed: int | None
    playout: Playout | None = None
    """Its deadlines and delivery statistics (rank 0): frame i is due `ttff_s + i / fps`
    after it opened."""
    out: queue.Queue = field(default_factory=queue.Queue)
    stream: GenStream | None = None
    pending: int = 0
    """Chunks decoded and not yet read (rank 0)."""
    done: bool = False
    error: BaseException | None = None
    watchers: list = field(default_factory=list)
    """QA sessions fed this stream's frames (rank 0)."""
    is_v2v: bool = False
    v2v: VideoToVideo | None = None
    """Live video-to-video: its input side (every rank; rank 0's also cuts the chunks)."""
    v2v_asked: bool = False
    """Rank 0: an input chunk waits for its round."""
    v2v_results: queue.Queue = field(default_factory=queue.Queue)
    """Rank 0: each input chunk's styled frames (none while a window fills up)."""
    opened: threading.Event = field(default_factory=threading.Event)
    priority: int = 0
    arrival: int = 0
    """Order of arrival (ties of priority: the latest is degraded and suspended first)."""
    suspended: bool = False
    offloaded: bool = False
    full_sigmas: list[float] | None = None
    """Its own schedule while it runs fewer steps (`Degradable.degrade`)."""
    sync: Callable[[tuple], None] | None = None
    """Rank 0: hands a command to the next round (a changed schedule for the other ranks)."""

    @property
    def gen(self) -> GenStream | None:
        return self.stream

    @property
    def at_boundary(self) -> bool:
        return self.stream is not None and not self.done  # rounds end at chunk boundaries

    def _schedule_changed(self) -> None:
        if self.sync is not None and self.stream is not None:
            self.sync(("sigmas", self.id, list(self.stream.sigmas)))


class PipelineStreamHandle:
    """A stream on a `PipelineRuntime` (rank 0): the `StreamHandle` surface the server uses."""

    def __init__(self, runtime: PipelineRuntime, live: _Stream) -> None:
        self._runtime, self._live, self.id = runtime, live, live.id

    def frames(self, timeout: float | None = None) -> Iterator[np.ndarray]:
        live = self._live
        while True:
            try:
                item = live.out.get(timeout=timeout)
            except queue.Empty:
                raise TimeoutError(f"stream {self.id}: no frame within {timeout} s") from None
            if item is _END:
                live.out.put(_END)
                if live.error is not None:
                    raise PipelineFailed(f"stream {self.id} failed: {live.error}")
                return
            with self._runtime._cond:
                live.pending -= 1
                self._runtime._cond.notify_all()
            yield from item

    def close(self) -> None:
        self._runtime.close_stream(self.id)

    @property
    def done(self) -> bool:
        return self._live.done


class PipelineRuntime(PipelineSideWork, PipelineOverload):
    """The stream part of `streamrt.runtime.Runtime` on a layer-pipeline group.

    Build it on every rank over the rank's `LayerPipeline`; rank 0 calls `start()` (the
    rounds run in a thread) and serves requests, the other ranks call `follow()`, which
    returns when rank 0 stops.
    """

    def __init__(
        self,
        pipe,
        max_streams: int = 8,
        buffer_chunks: int = 2,
        idle_s: float = 1.0,
        qa_model: str | None = None,
        runtime: RuntimeConfig | None = None,
        agents: bool | str = False,
        agent_policy: str = "baseline",
    ) -> None:
        """`qa_model`: the Video-LLM of QA sessions (None: the embedded one), loaded on rank
        0 at the first session; `runtime`: its QA queue settings; `agents`: serve LLM
        agents on rank 0 (True: the embedded LM, or a causal-LM directory)."""
        self.pipe = pipe
        self.rank = pipe.rank
        self.config = dataclasses.replace(runtime or RuntimeConfig(), max_streams=max_streams)
        self.buffer_chunks = buffer_chunks
        self.forward_s: float | None = None
        """Measured seconds of pipeline time per stream-forward (what the load counts)."""
        self.scheduler = PipelineLoad(self)
        self.counters = {"degraded": 0, "suspended": 0, "resumed": 0, "restored": 0}
        self._last_change = 0.0
        self._arrivals = itertools.count()
        self.idle_s = idle_s
        self.lock = threading.RLock()
        self.streams: dict[str, _Stream] = {}
        self.error: BaseException | None = None
        self.rounds = 0
        self._commands: list[tuple] = []
        self._switches: dict[str, str] = {}
        """Prompt switches to apply at each stream's next chunk (every rank)."""
        self._cond = threading.Condition()
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._init_side(qa_model, self.config, agents, agent_policy)

    # ------------------------------------------------------------------ requests (rank 0)

    def open_stream(
        self,
        prompt: str,
        num_frames: int | None = None,
        fps: float | None = None,
        seed: int | None = None,
        priority: int = 0,
        kv_quota_mb: float | None = None,
    ) -> PipelineStreamHandle:
        check_num_frames(num_frames)
        if kv_quota_mb is not None:
            raise UnsupportedError(f"kv_quota_mb is {NOT_HERE}")
        self._check_open(prompt, seed)
        with self._cond:
            self._check_room()
            rate = float(fps or self.pipe.engine.config.fps)
            if not rate > 0:
                raise InputError(f"fps must be > 0, got {fps}")
            if isinstance(priority, bool) or not isinstance(priority, int):
                raise InputError(f"priority must be a whole number, got {priority!r}")
            live = _Stream(f"s{next(self._ids)}", prompt, num_frames, seed, priority=priority)
            live.playout = Playout(rate, self.config.ttff_s)
            self._check_capacity(live)
            live.arrival, live.sync = next(self._arrivals), self._queue
            self.streams[live.id] = live
            self._commands.append(("open", live.id, prompt, seed))
            self._cond.notify_all()
        return PipelineStreamHandle(self, live)

    def stream(self, stream_id: str) -> PipelineStreamHandle:
        return PipelineStreamHandle(self, self._get(stream_id))

    def set_prompt(self, stream_id: str, prompt: str) -> None:
        live = self._get(stream_id)
        self.pipe.engine.text_encoder.check(prompt)
        with self._cond:
            if not live.done:
                live.prompt = prompt
                self._commands.append(("switch", stream_id, prompt))
                self._cond.notify_all()

    def close_stream(self, stream_id: str) -> None:
        live = self._get(stream_id)
        with self._cond:
            if not live.done:
                self._end(live)
                self._commands.append(("close", stream_id))
                self._cond.notify_all()

    def stream_stats(self, stream_id: str) -> dict[str, Any]:
        live = self._get(stream_id)
        state = "failed" if live.error else "done" if live.done else "running"
        if state == "running" and live.suspended:
            state = "suspended"
        steps = None if live.stream is None else len(live.stream.sigmas)
        return {
            "prompt": live.prompt,
            **live.playout.stats(),
            "state": state,
            "priority": live.priority,
            "steps": steps,
            "degraded": live.full_sigmas is not None,
            "kind": "v2v" if live.is_v2v else "generate",
        }

    def stats(self) -> dict[str, Any]:
        pipe = self.pipe
        return {
            "parallel": "layers",
            "pid": os.getpid(),
            "ranks": pipe.world,
            "block_ranges": [[r.start, r.stop] for r in pipe.ranges],
            "rebalances": len(pipe.moves),
            "rounds": self.rounds,
            **self.counters,
            "bytes_sent_rank0": pipe.bytes_sent,
            "error": None if self.error is None else str(self.error),
            "streams": {i: self.stream_stats(i) for i in list(self.streams)},
            "qa": self.qa_stats(),
            "agents": self.agents.stats() if self.agents is not None else None,
            "cache": pipe.engine.cache.stats(),
        }

    def open_v2v(self, prompt: str, seed: int | None = None) -> tuple[VideoToVideo, Any]:
        """Rank 0: live video-to-video on the pipeline (module docstring): its
        `VideoToVideo` (`run(frames)` gives one styled frame per input frame; `close()`
        ends it) and the lock a caller holds around its calls."""
        self._check_open(prompt, seed)
        with self._cond:
            self._check_room()
            live = _Stream(f"s{next(self._ids)}", prompt, None, seed, is_v2v=True)
            live.playout = Playout(float(self.pipe.engine.config.fps), self.config.ttff_s)
            self.streams[live.id] = live
            self._commands.append(("open", live.id, prompt, seed, True))
            self._cond.notify_all()
        while not live.opened.wait(0.1):
            self._check_alive()
        assert live.v2v is not None
        return live.v2v, threading.Lock()

    def _v2v_step(self, live: _Stream, chunk: torch.Tensor) -> list[np.ndarray]:
        """Rank 0, the v2v session's thread: run one input chunk on every rank, wait for
        its styled frames."""
        with self._cond:
            self._check_alive()
            if live.done:
                raise InputError(f"video-to-video stream {live.id} was closed")
            live.v2v_asked = True
            self._commands.append(("v2v", live.id, chunk))
            self._cond.notify_all()
        while True:
            try:
                return live.v2v_results.get(timeout=0.1)
            except queue.Empty:
                self._check_alive()
                if live.done:
                    raise InputError(f"video-to-video stream {live.id} was closed") from None

    def _get(self, stream_id: str) -> _Stream:
        live = self.streams.get(stream_id)
        if live is None:
            raise UnknownNameError(f"no stream {stream_id!r}: open one with POST /v1/streams")
        return live

    def _check_open(self, prompt: str, seed: int | None) -> None:
        """A request's seed and prompt (a bad prompt fails here, not in a round)."""
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise InputError(f"seed must be a whole number or null, got {seed!r}")
        self.pipe.engine.text_encoder.check(prompt)

    def _check_room(self) -> None:
        """The group alive and a stream slot free (holding `_cond`)."""
        self._check_alive()
        if sum(not s.done for s in self.streams.values()) >= self.config.max_streams:
            raise InputError(
                f"the pipeline serves at most {self.config.max_streams} streams at once: "
                "retry when a stream ends"
            )

    def _check_alive(self) -> None:
        if self.error is not None:
            raise PipelineFailed(f"the pipeline group failed: {self.error}")

    def _end(self, live: _Stream, error: BaseException | None = None) -> None:
        if not live.done:
            live.done, live.error = True, error
            live.out.put(_END)

    # ------------------------------------------------------------------ rounds

    def start(self) -> None:
        """Rank 0: run the rounds in a thread."""
        self._thread = threading.Thread(target=self._lead, name="streamrt-pipeline", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Rank 0: end every stream, tell the other ranks to stop, wait for the rounds."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=max(30.0, self.pipe.timeout))
        self._close_side()

    def _lead(self) -> None:
        try:
            while self._lead_round():
                self._side_work()  # between rounds: QA and agents are rank 0's own work
        except BaseException as exc:
            self.error = exc
            with self._cond:
                for live in self.streams.values():
                    self._end(live, exc)

    def _lead_round(self) -> bool:
        """Rank 0: wait for work, decide the degrade order, run one round."""
        with self._cond:
            idle = not self._commands and not self._advancing()
            if not self._stopping and idle:
                self._cond.wait(0.002 if self._side_waiting() else self._next_due())
            if not self._stopping:
                self._rebalance(time.perf_counter())
            commands = self._commands
            self._commands = []
            if self._stopping:
                commands.append(("stop",))
            else:
                commands.append(("advance", self._advancing()))
        return self._round(commands)

    def follow(self) -> None:
        """Ranks > 0: run rank 0's rounds until it stops."""
        while self._round(None):
            pass

    def _advancing(self) -> list[str]:
        """Streams rank 0 wants another chunk of, most urgent (least playout slack) first:
        open, their reader keeping up, and not more than `ahead_s` ahead of their playout."""
        now = time.perf_counter()
        v2v = [s.id for s in self.streams.values() if s.v2v_asked and not s.done]
        due = [
            s
            for s in self.streams.values()
            if self._may_advance(s) and s.playout.slack(now) < self.config.ahead_s
        ]
        return v2v + [s.id for s in sorted(due, key=lambda s: s.playout.slack(now))]

    def _next_due(self) -> float:
        """Seconds until a stream ahead of its playout is due again (at most `idle_s`)."""
        now = time.perf_counter()
        waits = [
            s.playout.slack(now) - self.config.ahead_s
            for s in self.streams.values()
            if self._may_advance(s)
        ]
        return min(max(min(waits, default=self.idle_s), 0.001), self.idle_s)

    def _may_advance(self, s: _Stream) -> bool:
        """A generation stream running, not suspended, its reader keeping up (its playout
        decides when)."""
        return not s.done and not s.is_v2v and not s.suspended and s.pending < self.buffer_chunks

    def _round(self, commands: list[tuple] | None) -> bool:
        box = [commands]
        try:
            dist.broadcast_object_list(box, src=0, group=self.pipe.group)
        except (RuntimeError, dist.DistError) as exc:
            raise PipelineError(
                f"rank {self.rank}: a rank of the pipeline group died or stalled between "
                f"rounds ({exc})"
            ) from exc
        advance: list[str] = []
        for command in box[0]:
            kind = command[0]
            if kind == "stop":
                self._close_all()
                return False
            if kind == "open":
                _, sid, prompt, seed, *v2v = command
                live = self.streams.setdefault(sid, _Stream(sid, prompt, None, seed))
                overrides = {} if seed is None else {"seed": seed}
                live.stream = self.pipe.open_stream(prompt, **overrides)
                if v2v:
                    live.is_v2v = True
                    live.v2v = _PipelineV2V(live.stream, self, live)
                live.opened.set()
            elif kind == "sigmas" and self.rank != 0:  # rank 0 changed its own already
                live = self.streams.get(command[1])
                if live is not None and live.stream is not None:
                    live.stream.sigmas = list(command[2])
            elif kind == "move_kv" and self.rank != 0:
                live = self.streams.get(command[1])
                if live is not None and live.stream is not None:
                    move_kv(self.pipe.engine.cache, live.stream.seqs, command[2])
            elif kind == "v2v":
                live = self.streams.get(command[1])
                if live is not None and live.v2v is not None and live.stream is not None:
                    live.v2v.chunks.append(command[2])
            elif kind == "switch":
                self._switches[command[1]] = command[2]
            elif kind == "close":
                live = self.streams.get(command[1])
                if live is not None and live.stream is not None:
                    live.stream.close()
                    live.stream = None
                    if self.rank != 0:
                        del self.streams[command[1]]
            elif kind == "advance":
                advance = [sid for sid in command[1] if self.streams[sid].stream is not None]
        self.rounds += 1
        if not advance:
            return True
        lives = [self.streams[sid] for sid in advance]
        started = time.perf_counter()
        switches = {
            (i, 0): self._switches.pop(live.id)
            for i, live in enumerate(lives)
            if live.id in self._switches
        }
        styled: dict[int, list[np.ndarray]] = {}
        with torch.no_grad():
            for i, x0 in self.pipe.run([live.stream for live in lives], 1, switches):
                if self.rank == 0 and lives[i].is_v2v:
                    styled[i] = list(lives[i].stream.decode(x0))
                elif self.rank == 0:
                    self._emit(lives[i], x0)
        for i, live in enumerate(lives):
            if self.rank == 0 and live.is_v2v:
                live.playout.produced(len(styled.get(i, ())), time.perf_counter())
                with self._cond:
                    live.v2v_asked = False
                live.v2v_results.put(styled.get(i, []))
        elapsed = time.perf_counter() - started  # decode included
        per = elapsed / sum(forwards_per_chunk(live.stream) for live in lives)
        self.forward_s = per if self.forward_s is None else 0.8 * self.forward_s + 0.2 * per
        return True

    def _emit(self, live: _Stream, x0: torch.Tensor) -> None:
        frames = list(live.stream.decode(x0))
        if live.num_frames is not None:
            frames = frames[: live.num_frames - live.playout.frames]
        if live.watchers:
            self._feed_watchers(live, frames, live.playout.frames)
        with self._cond:
            if live.done:  # closed by its reader meanwhile
                return
            live.playout.produced(len(frames), time.perf_counter())
            live.pending += 1
            live.out.put(frames)
            if live.num_frames is not None and live.playout.frames >= live.num_frames:
                self._end(live)
                self._commands.append(("close", live.id))

    def _close_all(self) -> None:
        for live in self.streams.values():
            if live.stream is not None:
                live.stream.close()
                live.stream = None
            self._end(live)


class _PipelineV2V(VideoToVideo):
    """A v2v stream's input side on a pipeline rank: the rank's stream takes its chunks from
    `chunks` (filled by the round's commands); on rank 0 `run` also cuts the input into
    chunks and sends each through the pipeline (`PipelineRuntime._v2v_step`)."""

    def __init__(self, stream: GenStream, runtime: PipelineRuntime, live: _Stream) -> None:
        super().__init__(stream)
        self.runtime, self.live = runtime, live

    def step(self, chunk: torch.Tensor) -> list[np.ndarray]:
        return self.runtime._v2v_step(self.live, chunk)

    def close(self) -> None:
        self.runtime.close_stream(self.live.id)
