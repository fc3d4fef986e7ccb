"""The degrade order of a `PipelineRuntime` (rank 0): the runtime's own `Overload` code
(`streamrt.runtime.overload`) over the pipeline's streams, with a load model from the
pipeline's measured seconds per stream-forward.

Kept apart from the rounds so each file stays readable; `PipelineRuntime` inherits these
methods and provides the state they read (`config`, `streams`, `forward_s`, `pipe`,
`_commands`, `counters`, `_last_change`). Rank 0 decides between rounds (`_rebalance`,
holding `_cond`) and changes its own streams at once; the round's commands carry each
change to the other ranks: a stream's new schedule (`Degradable._schedule_changed`), its
KV to the host or back (`_move_kv`).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from streamrt.runtime.overload import AdmissionError, Overload, _lowest, move_kv

if TYPE_CHECKING:
    from streamrt.gen.stream import GenStream
    from streamrt.parallel.serving import PipelineRuntime, _Stream


class PipelineOverload(Overload):
    """Mixin of `PipelineRuntime`: admission with suspension, and the degrade order."""

    def _check_capacity(self, live: _Stream) -> None:
        """Refuse a stream whose frames the pipeline cannot add at its measured speed
        (`headroom` of its capacity, as `Runtime` admits), after suspending lower-priority
        streams (lowest first) if that makes room."""
        if not self.config.admission or self.forward_s is None:
            return
        running = self._running()
        fits, load = self.scheduler.admits(running, live)
        lower = sorted((s for s in running if s.priority < live.priority), key=_lowest)
        for i in range(len(lower)):
            if fits:
                break
            rest = [s for s in running if s not in lower[: i + 1]]
            if self.scheduler.admits(rest, live)[0]:
                now = time.perf_counter()
                for victim in lower[: i + 1]:
                    self._suspend(victim, now)
                return
        if not fits and running:
            raise AdmissionError(
                f"the pipeline is at capacity: with this stream it would need {load:.0%} of "
                f"its time ({self.forward_s * 1e3:.1f} ms per stream-forward, "
                f"{len(running)} streams running): ask for a lower fps or retry later"
            )

    # ------------------------------------------------------------------ overload (rank 0)

    def _running(self) -> list[_Stream]:
        """Generation streams admitted (opened on the ranks or about to be), neither
        suspended nor ended: what the load weighs."""
        return [s for s in self.streams.values() if not s.done and not s.suspended and not s.is_v2v]

    def _queue(self, command: tuple) -> None:
        """A command for the next round (rank 0, holding `_cond`)."""
        self._commands.append(command)

    def _move_kv(self, live: _Stream, to_host: bool) -> None:
        """Rank 0's share of a stream's KV to the host (or back) now, the other ranks'
        in the next round."""
        move_kv(self.pipe.engine.cache, live.stream.seqs, to_host)
        self._commands.append(("move_kv", live.id, to_host))
        live.offloaded = to_host


class PipelineLoad:
    """The load model `Overload` asks (`admits`): a stream costs its chunks per second times
    its forwards per chunk times the measured seconds per stream-forward."""

    def __init__(self, runtime: PipelineRuntime) -> None:
        self.runtime = runtime

    def admits(self, running: list[_Stream], live: _Stream) -> tuple[bool, float]:
        rt = self.runtime
        if rt.forward_s is None:
            return True, 0.0
        engine = rt.pipe.engine
        per_chunk = engine.config.chunk_frames * engine.codec.temporal
        load = sum(
            s.playout.fps / per_chunk * forwards_per_chunk(s.stream, engine) * rt.forward_s
            for s in [*running, live]
        )
        return load <= rt.config.headroom, load


def forwards_per_chunk(stream: GenStream | None, engine=None) -> int:
    """Forwards per chunk: its denoising steps and the clean refresh (a stream not opened
    yet: the engine's full schedule)."""
    if stream is None:
        return len(engine.config.timesteps) + 1
    return len(stream.sigmas) + 1
