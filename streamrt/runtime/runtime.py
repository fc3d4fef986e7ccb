"""`Runtime`: one engine that serves many live generation streams and QA sessions at once.

    rt = Runtime()                                   # the embedded models, one cache manager
    a = rt.open_stream("a red circle moving right on a dark background", num_frames=48)
    b = rt.open_stream("a blue square moving up on a light background", num_frames=48)
    for frame in a.frames(): ...                     # b advances in the same forwards

The runtime owns THE `CacheManager` (budgets from `cache`), the loaded generator and
Video-LLM, and a scheduler. Its step loop (`step`) is the home of every workload:

    1. admit streams waiting for room; start the chunks of streams that are due
    2. pick the batch: the most urgent stream and those that can share its forward
    3. one transformer forward over every picked stream's rows (`run_requests`)
    4. hand each stream its velocity; finished chunks are decoded and their frames queued
    5. with time to spare: encode queued QA frames of every session in one vision batch

`step()` runs in the caller's thread (a consumer of `frames()` drives it when no thread
does), or `start()` runs it in a background thread (the server). Every public method is
thread-safe: they take the runtime's lock, which a step holds from start to end.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from streamrt.cache import CacheManager
from streamrt.config import CacheConfig, RuntimeConfig, StreamrtConfig, read_preset
from streamrt.errors import InputError, UnknownNameError
from streamrt.gen.forward import run_requests
from streamrt.gen.stream import check_num_frames
from streamrt.runtime.live import LiveStream, StreamHandle, check_kv_quota
from streamrt.runtime.lock import FairLock
from streamrt.runtime.overload import AdmissionError, Overload
from streamrt.runtime.qa import QAHandle, QASession, QASessions
from streamrt.runtime.scheduler import Scheduler, calibrate
from streamrt.threads import thread_target

logger = logging.getLogger(__name__)


class Runtime(Overload, QASessions):
    """One engine for many streams and QA sessions, on one cache manager.

    Args:
        model: Generator directory (see `StreamGenerator.from_pretrained`); default the
            embedded `assets/tiny-world`; "tiny-random" an untrained one.
        qa_model: Video-LLM directory for QA sessions; None: the embedded `assets/tiny-vqa`
            (loaded at the first `open_qa`).
        config: A YAML preset: its `gen:` keys set the streams' defaults, `cache:` the
            cache manager's budgets, `runtime:` the scheduler.
        runtime: Scheduler settings, over the preset's.
        cache: Cache budgets, over the preset's.
        qa: Load the Video-LLM now (QA sessions need it; False: generation only).
        agents: Serve LLM agents (`streamrt.agents.AgentEngine`, `rt.agents`) on the same
            cache manager: True the language model of the embedded Video-LLM, or a
            transformers causal-LM directory. Its steps run when the streams' deadlines
            leave time, like QA encoding.
        agent_policy: The agents' KV policy across tool calls: baseline, ttl, offload,
            each optionally with "+reserve" (TokenCake's device reserve).
        gen_overrides: `GenConfig` fields, over the preset's.

    Every consumer of the cache manager is registered here, before the first block is
    allocated, so the pages fit the largest block of any of them.
    """

    def __init__(
        self,
        model: str | Path = "assets/tiny-world",
        qa_model: str | Path | None = None,
        config: str | Path | None = None,
        *,
        runtime: RuntimeConfig | None = None,
        cache: CacheConfig | None = None,
        checkpoint: str | Path | None = None,
        qa: bool = True,
        agents: bool | str | Path = False,
        agent_policy: str = "baseline",
        **gen_overrides: Any,
    ) -> None:
        from streamrt.gen.generator import StreamGenerator

        preset = read_preset(config)[0] if config is not None else StreamrtConfig()
        self.config = runtime or preset.runtime
        self.config.validate()
        cache = cache or preset.cache
        if cache.device is None:
            from streamrt.devices import resolve_device

            device = resolve_device(gen_overrides.get("device", preset.gen.device), "gen.device")
            cache = dataclasses.replace(cache, device=str(device))
        self.cache = CacheManager(cache)
        """THE cache manager: generation streams, QA sessions (and agents) hold their KV here."""
        if str(model) == "tiny-random":
            self.generator = StreamGenerator.tiny_random(
                config, manager=self.cache, **gen_overrides
            )
        else:
            self.generator = StreamGenerator.from_pretrained(
                model, config, checkpoint=checkpoint, manager=self.cache, **gen_overrides
            )
        self.engine = self.generator.engine
        cfg = self.engine.config
        self.engine.latent_shape(cfg.height, cfg.width)  # a bad size fails here
        self.engine.register_consumer(cfg)
        self._qa_parts: tuple[Any, Any, Any] | None = None
        if qa:
            from streamrt.qa.layout import kv_spec, load_qa_model
            from streamrt.qa.memory import CONSUMER

            self._qa_parts = load_qa_model(qa_model)
            self.cache.register(CONSUMER, kv_spec(self._qa_parts[0]))
        self.agents = None
        """The agent engine (`agents=`), registered on `self.cache` like every consumer."""
        if agents:
            from streamrt.agents.engine import AgentEngine

            self.agents = AgentEngine.from_pretrained(
                None if agents is True else agents, manager=self.cache, policy=agent_policy
            )
        self.scheduler = Scheduler(self.config)
        self.lock = FairLock()
        self.streams: dict[str, LiveStream] = {}
        self.finished: dict[str, LiveStream] = {}
        self.sessions: dict[str, QASession] = {}
        self._waiting: list[tuple[LiveStream, float]] = []
        self._ids = itertools.count()
        self._arrivals = itertools.count()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.counters = {
            "steps": 0,
            "forwards": 0,
            "rows": 0,
            "refused": 0,
            "degraded": 0,
            "restored": 0,
            "suspended": 0,
            "resumed": 0,
            "encoded": 0,
            "step_errors": 0,
        }
        self._last_change = 0.0
        self._side_s = 0.0
        """Measured seconds of one piece of side work (EMA), for `_spare`."""

    # ------------------------------------------------------------------ streams

    def open_v2v(self, prompt: str):
        """Live video-to-video on the runtime's generator (the `/v1/v2v` socket): a
        `VideoToVideo` and the lock every call into it holds (the runtime's: the cache
        manager is not thread-safe)."""
        from streamrt.gen.v2v import VideoToVideo

        with self.lock:
            stream = self.engine.open_stream(prompt)  # a bad prompt fails here
            try:
                return VideoToVideo(stream), self.lock
            except BaseException:
                stream.close()
                raise

    def open_stream(
        self,
        prompt: str,
        num_frames: int | None = None,
        fps: float | None = None,
        seed: int | None = None,
        priority: int = 0,
        kv_quota_mb: float | None = None,
        **gen_overrides: Any,
    ) -> StreamHandle:
        """A new live stream of `prompt` (raises `AdmissionError` when the runtime is full).

        Args:
            num_frames: Frames to produce; None: endless (until `close`).
            fps: Playout rate its deadlines follow; None: `runtime.fps`, else `gen.fps`.
            seed: Noise seed; None: the generator's.
            priority: Higher runs first among equally urgent streams and is suspended last.
            kv_quota_mb: Most device memory (MB) its KV cache may hold: a stream whose cache
                policy keeps more is refused with the window that fits (its policy bounds
                what it holds from then on). None: no quota.
            gen_overrides: `GenConfig` fields for this stream (same resolution as the others).
        """
        check_num_frames(num_frames)
        fps = self._check_fps(fps)
        if seed is not None:
            if isinstance(seed, bool) or not isinstance(seed, int):
                raise InputError(f"seed must be a whole number or null, got {seed!r}")
            gen_overrides["seed"] = seed
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise InputError(f"priority must be a whole number, got {priority!r}")
        with self.lock:
            if len(self.streams) + len(self._waiting) >= self.config.max_streams:
                self.counters["refused"] += 1
                raise AdmissionError(
                    f"the runtime already serves {self.config.max_streams} streams "
                    "(runtime.max_streams): close one or retry later"
                )
            stream_id = f"s{next(self._ids)}"
            gen = self.engine.open_stream(prompt, **gen_overrides)
            try:
                check_kv_quota(gen, kv_quota_mb)
            except BaseException:
                gen.close()
                raise
            live = LiveStream(
                stream_id, gen, num_frames, fps, self.config.ttff_s, priority, next(self._arrivals)
            )
            try:
                self._admit(live)
            except BaseException:
                gen.close()
                raise
        self._wake.set()
        return StreamHandle(self, live)

    def _check_fps(self, fps: float | None) -> float:
        if fps is None:
            return float(self.config.fps or self.engine.config.fps)
        if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not (0 < fps < 1e4):
            raise InputError(f"fps must be a number > 0 or null, got {fps!r}")
        return float(fps)

    def stream(self, stream_id: str) -> StreamHandle:
        return StreamHandle(self, self._live(stream_id))

    def _live(self, stream_id: str) -> LiveStream:
        with self.lock:
            for table in (self.streams, self.finished):
                if stream_id in table:
                    return table[stream_id]
            for live, _ in self._waiting:
                if live.id == stream_id:
                    return live
        raise UnknownNameError(f"no stream {stream_id!r}")

    def set_prompt(self, stream_id: str, prompt: str) -> None:
        """Switch a stream's prompt at its next chunk boundary (with KV re-cache)."""
        from streamrt.gen.stream import check_prompt

        check_prompt(prompt)
        with self.lock:
            live = self._live(stream_id)
            if live.done:
                raise InputError(f"stream {stream_id} has ended")
            self.engine.encode_prompt(prompt)  # a prompt the encoder refuses fails here
            live.next_prompt = prompt
        self._wake.set()

    def close_stream(self, stream_id: str) -> None:
        """End a stream and free its KV blocks (its reader's `frames()` ends)."""
        with self.lock:
            live = self._live(stream_id)
            self._waiting = [(s, u) for s, u in self._waiting if s is not live]
            live.finish()
            self._retire(live)
        self._wake.set()

    def _retire(self, live: LiveStream) -> None:
        """An ended stream: its KV blocks freed, its stats kept among the last 256."""
        live.gen.close()
        self.streams.pop(live.id, None)
        self.finished[live.id] = live
        while len(self.finished) > 256:
            self.finished.pop(next(iter(self.finished)))

    def stream_stats(self, stream_id: str) -> dict[str, Any]:
        with self.lock:
            return self._live(stream_id).stats(time.perf_counter())

    # ------------------------------------------------------------------ QA sessions

    def open_qa(
        self,
        stream_id: str | None = None,
        priority: int = 0,
        kv_quota_mb: float | None = None,
        **qa_config: Any,
    ) -> QAHandle:
        """A QA session on the runtime's cache manager; with `stream_id` it watches that
        generation stream (is fed its frames). `kv_quota_mb`: most device KV memory an
        answer may hold (sink, window, retrieved frames, question): a session whose
        settings need more is refused, naming them."""
        with self.lock:
            source = self._live(stream_id) if stream_id is not None else None
            return self._open_session(
                self._qa(),
                self.cache,
                self.config,
                source,
                stream_id,
                priority,
                kv_quota_mb,
                qa_config,
            )

    def _qa(self) -> tuple[Any, Any, Any]:
        if self._qa_parts is None:
            raise InputError("this runtime was made without a Video-LLM (qa=False)")
        return self._qa_parts

    # ------------------------------------------------------------------ the step loop

    def step(self) -> float:
        """One scheduling step. Returns 0.0 after running work, else the seconds until a
        stream may have work (the loop may sleep that long, or until woken)."""
        with self.lock:
            now = time.perf_counter()
            self._admit_waiting(now)
            self._rebalance(now)
            ready = self.scheduler.ready(list(self.streams.values()), now)
            for live in ready:
                if live.at_boundary:
                    self._guard(live, live.start_chunk)
            batch = self.scheduler.pick(ready, now)
            if self._spare(batch, now) and self._side_work():
                return 0.0
            if not batch:
                return self._idle_wait(now)
            self._run(batch)
            self.counters["steps"] += 1
            return 0.0

    def _running(self) -> list[LiveStream]:
        """Admitted streams that are neither suspended nor ended: what admission weighs."""
        return [s for s in self.streams.values() if not s.suspended and not s.done]

    def _slack(self, batch: list[LiveStream], now: float) -> float:
        return min(s.playout.slack(now) for s in batch)

    def _run(self, batch: list[LiveStream]) -> None:
        requests = [s.pending for s in batch]
        rows = sum(len(r.rows) for r in requests)
        t0 = time.perf_counter()
        try:
            outs = run_requests(self.engine, requests)
        except Exception as exc:
            if len(batch) == 1:
                self._fail(batch[0], exc)
                return
            for live in batch:  # find the stream that fails: each alone
                self._guard(live, lambda live=live: self._run([live]))
            return
        self.scheduler.cost.observe(rows, time.perf_counter() - t0)
        self.counters["forwards"] += 1
        self.counters["rows"] += rows
        for live, v in zip(batch, outs):
            live.gen.batched = len(batch) > 1  # a shared forward: no refresh folding
            chunks = live.chunks
            t1 = time.perf_counter()
            self._guard(live, lambda live=live, v=v: live.deliver(v))
            if live.chunks > chunks:
                self.scheduler.cost.observe_decode(time.perf_counter() - t1)
            if live.done and live.id in self.streams:
                self._retire(live)

    def _guard(self, live: LiveStream, fn) -> None:
        try:
            fn()
        except Exception as exc:
            self._fail(live, exc)

    def _fail(self, live: LiveStream, exc: BaseException) -> None:
        live.fail(exc)
        self._retire(live)

    def _idle_wait(self, now: float) -> float:
        waits = [s.playout.slack(now) - self.config.ahead_s for s in self._running()]
        if self._waiting or any(s.suspended for s in self.streams.values()):
            waits.append(0.05)  # look again for room
        if self.agents is not None and self.agents.busy:
            waits.append(0.002)  # agents in a tool call: their return is polled
        return max(min(waits, default=0.1), 0.001)

    def _spare(self, batch: list[LiveStream], now: float) -> bool:
        """Whether side work (QA encoding, an agent step) fits before the batch must run:
        the batch's slack covers the side work's measured time plus twice the batch's."""
        if not batch:
            return True
        rows = sum(len(s.pending.rows) for s in batch)
        need = self._side_s + 2 * self.scheduler.cost.forward_s(rows)
        return self._slack(batch, now) > need

    def _side_work(self) -> bool:
        """One piece of side work (QA frames first, then an agent step); False if none."""
        t0 = time.perf_counter()
        did = self._encode_qa() or (self.agents is not None and self.agents.step())
        if did:
            self._side_s = 0.8 * self._side_s + 0.2 * (time.perf_counter() - t0)
        return did

    def _encode_qa(self) -> bool:
        """Encode queued frames of every QA session in one vision batch; False if none."""
        work = [(s, s.take_queued()) for s in self.sessions.values()]
        work = [(s, frames) for s, frames in work if frames]
        if not work:
            return False
        from streamrt.runtime.qa import encode_together

        self.counters["encoded"] += encode_together(work)
        return True

    def calibrate(self) -> None:
        """Measure the forward and decode times admission control predicts from (on
        scratch streams, freed after; see `streamrt.runtime.scheduler.calibrate`)."""
        with self.lock:
            calibrate(self.engine, self.scheduler.cost, self.config.max_batch)

    def wait_for_work(self, live: LiveStream) -> float:
        """Called by a reader waiting for frames: runs a step here when no thread does;
        returns how long to wait for the queue."""
        if self._thread is not None:
            return 0.1
        wait = self.step()
        return min(wait, 0.05) if wait else 0.0

    # ------------------------------------------------------------------ thread

    def start(self) -> Runtime:
        """Run the step loop in a background thread (until `stop`)."""
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(
                target=thread_target(self._loop), name="streamrt-runtime", daemon=True
            )
            if self.agents is not None:
                self.agents.driver = self  # agent handles wait instead of stepping
            self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                wait = self.step()
            except Exception:
                logger.exception("runtime step failed; the loop goes on")
                self.counters["step_errors"] += 1
                wait = 0.05
            if wait > 0:
                self._wake.wait(min(wait, 0.05))
                self._wake.clear()
            elif self.lock.waiting:  # let callers in between steps
                time.sleep(0.0005)

    def stop(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._wake.set()
            self._thread.join()
            self._thread = None
            if self.agents is not None:
                self.agents.driver = None

    def close(self) -> None:
        """Stop the loop; end every stream and session and free their blocks."""
        self.stop()
        with self.lock:
            for stream_id in [*self.streams, *[s.id for s, _ in self._waiting]]:
                self.close_stream(stream_id)
            for session_id in list(self.sessions):
                self.close_qa(session_id)
            if self.agents is not None:
                for agent_id in list(self.agents.agents):
                    self.agents.close_agent(agent_id)

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ stats

    def stats(self) -> dict[str, Any]:
        """Per stream and session, the scheduler's counters and the cache manager's use."""
        with self.lock:
            now = time.perf_counter()
            a, c = self.scheduler.cost.coefficients()
            running = self._running()
            return {
                "streams": {
                    s.id: s.stats(now)
                    for s in [*self.streams.values(), *[w for w, _ in self._waiting]]
                },
                "finished": {s.id: s.stats(now) for s in list(self.finished.values())[-32:]},
                "qa": {s.id: s.stats() for s in self.sessions.values()},
                "agents": self.agents.stats() if self.agents is not None else None,
                "scheduler": {
                    "kind": self.config.scheduler,
                    "load": self.scheduler.load(running) if self.scheduler.cost.samples else None,
                    "forward_fixed_s": a,
                    "forward_per_row_s": c,
                    "decode_s": self.scheduler.cost.decode_s,
                    "waiting": len(self._waiting),
                    **self.counters,
                },
                "cache": self.cache.stats(),
            }


def serve_all(handles: Iterable[StreamHandle]) -> dict[str, list]:
    """Every frame of every handle, read round-robin (a helper for scripts and tests)."""
    iters = {h.id: h.frames() for h in handles}
    out: dict[str, list] = {k: [] for k in iters}
    while iters:
        for key in list(iters):
            try:
                out[key].append(next(iters[key]))
            except StopIteration:
                del iters[key]
    return out
