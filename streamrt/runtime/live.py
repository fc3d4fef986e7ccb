"""A generation stream as the runtime runs it: its schedule, playout clock and output queue.

The schedule (`LiveStream.schedule`) is the stream's whole life as one generator: at each
chunk boundary it applies a pending prompt switch (with KV re-cache), then yields the
forward requests of the next chunk, and emits the decoded frames when the chunk is done.
It yields None at a boundary, so the scheduler decides when the next chunk starts.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Generator, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from streamrt.errors import InputError, StreamrtError
from streamrt.runtime.playout import Playout

if TYPE_CHECKING:
    from streamrt.gen.stream import ForwardRequest, GenStream
    from streamrt.runtime.qa import QASession
    from streamrt.runtime.runtime import Runtime

_END = object()


class StreamFailed(StreamrtError):
    """A stream ended with an error (the message says why); other streams keep running."""


class Degradable:
    """The degrade order's quality step for a stream (`gen`, `full_sigmas`, `done`): fewer
    denoising steps, and back. Used by `LiveStream` and by a pipeline group's streams
    (`streamrt.parallel.serving`), which also tell their other ranks (`_schedule_changed`)."""

    gen: Any
    full_sigmas: list[float] | None
    done: bool

    def can_degrade(self, steps: int) -> bool:
        gen = self.gen
        return (
            gen is not None
            and self.full_sigmas is None
            and 0 < steps < len(gen.sigmas)
            and gen.config.sampler == "chunkwise"
            and gen.source is None
            and not self.done
        )

    def degrade(self, steps: int) -> None:
        """Run `steps` of its denoising steps from its next chunk (a chunk-wise stream reads
        its schedule when a chunk starts): the schedule thinned evenly, first step kept."""
        full = list(self.gen.sigmas)
        self.full_sigmas = full
        self.gen.sigmas = [full[i * len(full) // steps] for i in range(steps)]
        self._schedule_changed()

    def restore(self) -> None:
        """Its full schedule again, from its next chunk."""
        if self.full_sigmas is not None:
            self.gen.sigmas, self.full_sigmas = self.full_sigmas, None
            self._schedule_changed()

    def _schedule_changed(self) -> None:
        """`gen.sigmas` changed (a hook)."""


class LiveStream(Degradable):
    """Runtime-side state of one generation stream (see `StreamHandle` for its public face)."""

    def __init__(
        self,
        stream_id: str,
        gen: GenStream,
        num_frames: int | None,
        fps: float,
        ttff_s: float,
        priority: int,
        arrival: int,
    ) -> None:
        self.id = stream_id
        self.gen = gen
        self.num_frames = num_frames
        self.priority = priority
        self.arrival = arrival
        """Order of arrival (first come first served, ties)."""
        self.playout = Playout(fps, ttff_s)
        self.out: queue.Queue = queue.Queue()
        self.pending: ForwardRequest | None = None
        self.next_prompt: str | None = None
        self.done = False
        self.waiting = False
        """Queued by admission control until there is room (`RuntimeConfig.queue_s`)."""
        self.suspended = False
        """Set by the scheduler: no new chunk starts (see `RuntimeConfig.suspend_late_s`)."""
        self.offloaded = False
        """Its KV blocks are on the host tier (moved at the chunk boundary after suspension)."""
        self.full_sigmas: list[float] | None = None
        """Its own schedule while it runs fewer steps (`degrade`); None: not degraded."""
        self.error: BaseException | None = None
        self.forwards = 0
        self.chunks = 0
        self.frames_per_chunk: int | None = None
        self.watchers: list[QASession] = []
        """QA sessions fed this stream's frames (timestamps: frame index / fps)."""
        self._steps = self.schedule()
        next(self._steps)  # to the first chunk boundary

    # ------------------------------------------------------------------ schedule

    def schedule(self) -> Generator[ForwardRequest | None, torch.Tensor | None, None]:
        gen = self.gen
        while self.num_frames is None or self.playout.frames < self.num_frames:
            yield None  # chunk boundary: the scheduler starts the next chunk when it wants
            if self.next_prompt is not None:
                prompt, self.next_prompt = self.next_prompt, None
                yield from gen.prompt_steps(prompt)
            x0 = yield from gen.chunk_steps()
            self._emit(gen.decode(x0))

    def _emit(self, frames: np.ndarray) -> None:
        if self.num_frames is not None:
            frames = frames[: self.num_frames - self.playout.frames]
        self.chunks += 1
        self.frames_per_chunk = self.frames_per_chunk or len(frames)
        first = self.playout.frames
        self.playout.produced(len(frames), time.perf_counter())
        for frame in frames:
            self.out.put(frame)
        feed_watchers(self.watchers, frames, first, self.playout.fps)

    def start_chunk(self) -> None:
        """Leave the chunk boundary: `pending` becomes the next chunk's first forward."""
        self._step(lambda: next(self._steps))

    def deliver(self, v: torch.Tensor) -> None:
        """The velocity of `pending`; the schedule moves on to its next request (None at
        the next chunk boundary, after emitting the finished chunk's frames)."""
        self.forwards += 1
        self._step(lambda: self._steps.send(v))

    def _step(self, advance) -> None:
        try:
            self.pending = advance()
        except StopIteration:
            self.finish()

    @property
    def at_boundary(self) -> bool:
        return self.pending is None and not self.done

    # ------------------------------------------------------------------ ending

    def finish(self) -> None:
        if not self.done:
            self.done = True
            self.pending = None
            self.out.put(_END)

    def fail(self, error: BaseException) -> None:
        self.error = error
        self.finish()

    def frames(self, runtime: Runtime, timeout: float | None = None) -> Iterator[np.ndarray]:
        """Frames as they are produced; ends after `num_frames` or when the stream is
        closed; raises `StreamFailed` if the stream failed."""
        deadline = None if timeout is None else time.perf_counter() + timeout
        while True:
            try:
                item = self.out.get_nowait()
            except queue.Empty:
                wait = runtime.wait_for_work(self)
                if deadline is not None and time.perf_counter() > deadline:
                    raise TimeoutError(f"stream {self.id}: no frame within {timeout} s") from None
                try:
                    item = self.out.get(timeout=wait)
                except queue.Empty:
                    continue
            if item is _END:
                self.out.put(_END)  # later readers end too
                if self.error is not None:
                    raise StreamFailed(f"stream {self.id} failed: {self.error}") from self.error
                return
            yield item

    @property
    def state(self) -> str:
        """failed, done, suspended, waiting (for admission) or running."""
        for name, flag in (
            ("failed", self.error is not None),
            ("done", self.done),
            ("suspended", self.suspended),
            ("waiting", self.waiting),
        ):
            if flag:
                return name
        return "running"

    def stats(self, now: float) -> dict[str, Any]:
        out = self.playout.stats(now)
        out.update(
            prompt=self.gen.prompt,
            priority=self.priority,
            chunks=self.chunks,
            forwards=self.forwards,
            state=self.state,
            steps=len(self.gen.sigmas),
            degraded=self.full_sigmas is not None,
            kv_mb=sum(len(q.table) * q.spec.block_bytes for q in self.gen.seqs) / 1e6,
        )
        if self.error is not None:
            out["error"] = str(self.error)
        return out


class StreamHandle:
    """A live generation stream on a `Runtime` (thread-safe).

    `frames()` yields frames `[H, W, 3]` uint8 as the runtime produces them; `set_prompt`
    switches the prompt at the next chunk boundary (with KV re-cache); `close()` ends it
    and frees its KV blocks.
    """

    def __init__(self, runtime: Runtime, live: LiveStream) -> None:
        self._runtime = runtime
        self._live = live
        self.id = live.id

    def frames(self, timeout: float | None = None) -> Iterator[np.ndarray]:
        return self._live.frames(self._runtime, timeout)

    def set_prompt(self, prompt: str) -> None:
        self._runtime.set_prompt(self.id, prompt)

    def close(self) -> None:
        self._runtime.close_stream(self.id)

    def stats(self) -> dict[str, Any]:
        return self._runtime.stream_stats(self.id)

    @property
    def done(self) -> bool:
        return self._live.done

    @property
    def num_frames(self) -> int | None:
        return self._live.num_frames

    @property
    def fps(self) -> float:
        return self._live.playout.fps

    def __iter__(self) -> Iterator[np.ndarray]:
        return self.frames()


def quota_bytes(quota_mb: float | None) -> float | None:
    """A `kv_quota_mb` argument in bytes (None: no quota), or an `InputError`."""
    if quota_mb is None:
        return None
    if isinstance(quota_mb, bool) or not isinstance(quota_mb, (int, float)) or not quota_mb > 0:
        raise InputError(f"kv_quota_mb must be a number > 0 or null, got {quota_mb!r}")
    return quota_mb * 1e6


def check_kv_quota(gen: Any, quota_mb: float | None) -> None:
    """Refuse a stream (`GenStream`) whose policy keeps more KV than `quota_mb` holds,
    naming how many frames fit."""
    quota = quota_bytes(quota_mb)
    if quota is None:
        return
    policy = gen.seqs[0].policy
    per_frame = gen.seqs[0].spec.block_bytes * len(gen.seqs)  # one block per frame and sequence
    fits = int(quota // per_frame)
    if policy.capacity is None:
        raise InputError(
            f"cache policy {policy.name!r} keeps every frame, so no quota can hold it: use a "
            f"bounded policy (sink_window, deep_sink, ...) keeping at most {fits} frames"
        )
    need = policy.capacity * per_frame
    if need > quota:
        raise InputError(
            f"this stream's KV needs {need / 1e6:.2f} MB ({policy.name!r} keeps "
            f"{policy.capacity} frames x {len(gen.seqs)} sequence(s) x "
            f"{gen.seqs[0].spec.block_bytes / 1e6:.3f} MB) but kv_quota_mb is {quota_mb:g}: "
            f"keep at most {fits} frames (policy_args) or raise the quota"
        )


def feed_watchers(watchers: list[QASession], frames, first: int, fps: float) -> None:
    """Queue a stream's new frames (`first`: the index of the first) for the QA sessions
    watching it: each session gets every `stride`-th frame, stamped index / `fps`."""
    for i, frame in enumerate(frames):
        for session in watchers:
            if (first + i) % session.stride == 0:
                session.push(frame, (first + i) / fps)
