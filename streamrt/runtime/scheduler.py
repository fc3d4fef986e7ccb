"""Which streams run in the next forward, and whether a new stream fits.

    deadline  Ready streams: those mid-chunk, and those at a chunk boundary whose next frame
              is due within `ahead_s` (a stream far ahead of its viewer waits). The most
              urgent (least slack; then higher priority; then earlier arrival) runs, batched
              with the next most urgent streams whose requests have the same shape, as
              long as the batch's predicted time fits the most urgent stream's slack (or
              twice its solo time when it is already late). New streams are admitted
              while the predicted load stays under `headroom` of the machine.
    fcfs      Every stream as fast as it goes, in arrival order, the first `max_batch`
              of one shape per forward; every stream admitted (the baseline).

The cost model is measured: seconds of a forward of n rows, `a + c * n` by least squares
over the last forwards, and seconds of a chunk's decode.
"""

from __future__ import annotations

import time
from collections import deque
from typing import TYPE_CHECKING, Any

import numpy as np

from streamrt.config import RuntimeConfig

if TYPE_CHECKING:
    from streamrt.runtime.live import LiveStream

CALIBRATION_PROMPT = "a red circle moving right on a dark background"


class CostModel:
    """Measured forward and decode times."""

    def __init__(self, window: int = 128) -> None:
        self.samples: deque[tuple[int, float]] = deque(maxlen=window)
        self.decode_s: float | None = None

    def observe(self, rows: int, seconds: float) -> None:
        self.samples.append((rows, seconds))

    def observe_decode(self, seconds: float) -> None:
        self.decode_s = seconds if self.decode_s is None else 0.8 * self.decode_s + 0.2 * seconds

    @property
    def ready(self) -> bool:
        return len({r for r, _ in self.samples}) >= 2 and self.decode_s is not None

    def coefficients(self) -> tuple[float, float]:
        """`(a, c)`: fixed seconds per forward, seconds per row."""
        if not self.samples:
            return 0.0, 0.0
        rows = np.array([r for r, _ in self.samples], dtype=float)
        secs = np.array([s for _, s in self.samples], dtype=float)
        if len(set(rows.tolist())) < 2:
            return 0.0, float(secs.mean() / rows.mean())
        c, a = np.polyfit(rows, secs, 1)
        c = max(float(c), 1e-6)
        a = max(float(a), 0.0)
        return a, c

    def forward_s(self, rows: int) -> float:
        a, c = self.coefficients()
        return a + c * rows


def demand(stream: LiveStream) -> tuple[float, float, float]:
    """`(forwards/s, row-forwards/s, chunks/s)` a stream needs at its playout rate."""
    gen = stream.gen
    cfg = gen.config
    steps = len(gen.sigmas)
    rows = 2 if gen.guided else 1
    refresh = 1 if cfg.clean_refresh else 0
    if cfg.sampler == "chunkwise":  # a folded refresh adds rows, not a forward
        forwards = steps + (0 if gen.folds() else refresh)
        row_forwards = (steps + refresh) * rows
    else:  # rolling / stream_batch: one forward of `steps` chunks' worth finishes a chunk
        forwards, row_forwards = 1 + refresh, (steps + refresh) * rows
    frames = stream.frames_per_chunk or cfg.chunk_frames * gen.engine.codec.temporal
    chunks = stream.playout.fps / frames
    return forwards * chunks, row_forwards * chunks, chunks


class Scheduler:
    """Picks the next batch; decides admission. `RuntimeConfig.scheduler` names the kind."""

    def __init__(self, config: RuntimeConfig) -> None:
        self.config = config
        self.cost = CostModel()

    # ------------------------------------------------------------------ per step

    def ready(self, streams: list[LiveStream], now: float) -> list[LiveStream]:
        # A suspended stream still finishes the chunk it is in (then its KV can move).
        live = [s for s in streams if not s.done and (not s.suspended or s.pending is not None)]
        if self.config.scheduler == "fcfs":
            return live
        return [
            s for s in live if s.pending is not None or s.playout.slack(now) <= self.config.ahead_s
        ]

    def pick(self, ready: list[LiveStream], now: float) -> list[LiveStream]:
        """The streams whose pending requests share the next forward (most urgent first)."""
        ready = [s for s in ready if s.pending is not None]
        if not ready:
            return []
        if self.config.scheduler == "fcfs":
            order = sorted(ready, key=lambda s: s.arrival)
            key = order[0].pending.shape_key
            same = [s for s in order if s.pending.shape_key == key]
            return same[: self.config.max_batch]
        order = sorted(ready, key=lambda s: (s.playout.slack(now), -s.priority, s.arrival))
        head = order[0]
        key = head.pending.shape_key
        rows = len(head.pending.rows)
        slack = head.playout.slack(now)
        allowed = max(slack, 2 * self.cost.forward_s(rows)) if self.cost.samples else None
        batch = [head]
        for s in order[1:]:
            if len(batch) == self.config.max_batch:
                break
            if s.pending.shape_key != key:
                continue
            more = rows + len(s.pending.rows)
            # Late streams (the head among them) have no deadline left to protect: they all
            # join, each at a row's marginal cost (one forward for all of them drains an
            # overload fastest). Streams still on time join as the head's deadline allows.
            both_late = slack <= 0 and s.playout.slack(now) <= 0
            if not both_late and allowed is not None and self.cost.forward_s(more) > allowed:
                break
            batch.append(s)
            rows = more
        return batch

    # ------------------------------------------------------------------ admission

    def load(self, streams: list[LiveStream]) -> float:
        """Predicted share of each second the streams need (1.0: the machine is full)."""
        if not streams:
            return 0.0
        a, c = self.cost.coefficients()
        needs = [demand(s) for s in streams]
        batches = -(-len(streams) // self.config.max_batch)
        step_rate = max(f for f, _, _ in needs) * batches
        row_rate = sum(r for _, r, _ in needs)
        chunk_rate = sum(ch for _, _, ch in needs)
        return a * step_rate + c * row_rate + (self.cost.decode_s or 0.0) * chunk_rate

    def admits(self, running: list[LiveStream], new: LiveStream) -> tuple[bool, float]:
        """Whether `new` fits next to `running`, and the load with it."""
        if self.config.scheduler == "fcfs" or not self.config.admission:
            return True, self.load([*running, new]) if self.cost.samples else 0.0
        load = self.load([*running, new])
        return load <= self.config.headroom, load


def calibrate(engine: Any, cost: CostModel, max_batch: int) -> None:
    """Measure forwards of 1 and of up to 4 rows (twice each) and one decode, on scratch
    streams of `engine` (a `GenEngine`; freed after), into `cost`."""
    from streamrt.gen.forward import run_requests

    scratch = [
        engine.open_stream(CALIBRATION_PROMPT, seed=i) for i in range(max(2, min(max_batch, 4)))
    ]
    try:
        for group in (scratch[:1], scratch, scratch[:1], scratch):
            requests = []
            for gen in group:
                blocks = gen.append_chunk()
                x, _sigmas, eps = gen.initial_latents()
                t = x.new_full((1, x.shape[2]), 500.0)
                requests.append(gen.request([blocks], x, t, noise=eps))
            t0 = time.perf_counter()
            outs = run_requests(engine, requests)
            cost.observe(sum(len(r.rows) for r in requests), time.perf_counter() - t0)
        t0 = time.perf_counter()
        scratch[0].decode(outs[0])
        cost.observe_decode(time.perf_counter() - t0)
    finally:
        for gen in scratch:
            gen.close()
