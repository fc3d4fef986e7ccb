"""Admission and overload of a `Runtime`: who gets in, and the degrade order under load.

Kept apart from the step loop so each file stays readable; `Runtime` inherits these
methods and provides the state they read (`config`, `scheduler`, `streams`, `_waiting`,
`cache`, `counters`, `_running`, `calibrate`, `_fail`).

    admission   a new stream is admitted when the measured cost of every running stream
                plus its own fits `runtime.headroom` (making room by suspending
                lower-priority streams first); otherwise it waits up to `runtime.queue_s`,
                or is refused with `AdmissionError`
    overload    when the most urgent stream is `runtime.suspend_late_s` late: the
                lowest-priority stream at full quality runs fewer steps, then the
                lowest-priority stream is suspended (its KV moved to the host); with room
                again they resume, then get their steps back
"""

from __future__ import annotations

import time

from streamrt.errors import StreamrtError
from streamrt.runtime.live import LiveStream


class AdmissionError(StreamrtError):
    """The runtime is at capacity: the stream was refused (retry later, or ask for less)."""


class Overload:
    """Mixin of `Runtime`: admission control, suspension and the degrade order."""

    def _admit(self, live: LiveStream) -> None:
        needs_room = self.config.scheduler == "deadline" and self.config.admission
        if needs_room and not self.scheduler.cost.ready:
            self.calibrate()
        running = self._running()
        fits, load = self.scheduler.admits(running, live)
        if not fits and needs_room:  # room from lower-priority streams, lowest first
            lower = sorted(
                (s for s in running if s.priority < live.priority),
                key=lambda s: (s.priority, -s.arrival),
            )
            make_room = []
            for victim in lower:
                make_room.append(victim)
                rest = [s for s in running if s not in make_room]
                if self.scheduler.admits(rest, live)[0]:
                    now = time.perf_counter()
                    for s in make_room:
                        self._suspend(s, now)
                    running, fits = rest, True
                    break
        if fits or not running:  # alone it has nobody to slow down: always admitted
            self.streams[live.id] = live
            return
        if self.config.queue_s > 0:
            live.waiting = True
            live.playout.pause(time.perf_counter())
            self._waiting.append((live, time.perf_counter() + self.config.queue_s))
            return
        self.counters["refused"] += 1
        raise AdmissionError(
            f"the runtime is at capacity: with this stream its streams would need {load:.0%} "
            f"of the measured compute (admission limit runtime.headroom = "
            f"{self.config.headroom:.0%}); retry when a stream ends, or ask for a lower fps"
        )

    def _admit_waiting(self, now: float) -> None:
        for live, until in list(self._waiting):
            running = self._running()
            if not running or self.scheduler.admits(running, live)[0]:
                self._waiting.remove((live, until))
                live.waiting = False
                live.playout.resume(now)
                self.streams[live.id] = live
            elif now > until:
                self._waiting.remove((live, until))
                self.counters["refused"] += 1
                self._fail(
                    live,
                    AdmissionError(f"no room within runtime.queue_s = {self.config.queue_s} s"),
                )

    # ------------------------------------------------------------------ overload

    def _suspend(self, live: LiveStream, now: float) -> None:
        live.suspended = True
        live.playout.pause(now)
        self._changed("suspended", now)

    def _move_kv(self, live: LiveStream, to_host: bool) -> None:
        move_kv(self.cache, live.gen.seqs, to_host)
        live.offloaded = to_host

    def _resume(self, live: LiveStream, now: float) -> None:
        if live.offloaded:
            self._move_kv(live, to_host=False)
        live.suspended = False
        live.playout.resume(now)
        self._changed("resumed", now)

    def _rebalance(self, now: float) -> None:
        """Overload's degrade order (`RuntimeConfig.suspend_late_s`): when the most urgent
        stream is `suspend_late_s` late, the lowest-priority stream at full quality runs
        fewer steps, or when none can, the lowest-priority stream is suspended; with room
        again (admission control), suspended streams resume, then degraded ones get their
        steps back. A suspended stream's KV moves to the host at its chunk boundary."""
        for live in self.streams.values():
            if live.suspended and not live.offloaded and live.at_boundary:
                self._move_kv(live, to_host=True)
        late_s = self.config.suspend_late_s
        if self.config.scheduler != "deadline" or not late_s or now - self._last_change < late_s:
            return
        running = self._running()
        if running and min(s.playout.slack(now) for s in running) < -late_s:
            steps = self.config.degrade_steps
            full = [s for s in running if s.can_degrade(steps)]
            if full:
                min(full, key=_lowest).degrade(steps)
                self._changed("degraded", now)
            elif len(running) > 1:
                self._suspend(min(running, key=_lowest), now)
            return
        waiting = sorted(
            (s for s in self.streams.values() if s.suspended and not s.done),
            key=lambda s: (-s.priority, s.arrival),
        )
        for live in waiting:
            if not running or self.scheduler.admits(running, live)[0]:
                self._resume(live, now)
                return
        if waiting:
            return
        for live in sorted(running, key=lambda s: (-s.priority, s.arrival)):
            if live.full_sigmas is None:
                continue
            thinned = live.gen.sigmas
            live.restore()
            others = [s for s in running if s is not live]
            if self.scheduler.admits(others, live)[0]:
                self._changed("restored", now)
                return
            live.degrade(len(thinned))  # no room for its full steps yet

    def _changed(self, counter: str, now: float) -> None:
        self._last_change = now
        self.counters[counter] += 1


def move_kv(cache, seqs, to_host: bool) -> None:
    """Every KV block of a stream's sequences to the host tier, or back to the device;
    waited for."""
    move = cache.offload if to_host else cache.fetch
    for seq in seqs:
        for transfer in move(seq, list(seq.table)):
            transfer.wait()


def _lowest(live: LiveStream) -> tuple[int, int]:
    """Sort key: the lowest priority first, the latest arrival among equals."""
    return live.priority, -live.arrival
