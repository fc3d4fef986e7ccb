"""A stream's playout clock: when each frame is due, how much slack the stream has, and
how well it kept its deadlines.

    due(i)      = opened + ttff_s + i / fps                 frame i's playout time
    slack       = due(frames produced) - now                 < 0: the viewer is waiting
    attainment  = share of frames ready by due(i)            (SLO attainment)
    shown(i)    = max(ready(i), shown(i-1) + 1 / fps)        a player that stalls when a
    gap(i)      = shown(i) - shown(i-1)                      frame is late, then goes on

The gap percentiles are what a viewer sees: 1 / fps when every frame is on time, longer
at each stall. A suspended stream's clock stops (its deadlines move by the pause).
"""

from __future__ import annotations

import time

import numpy as np


class Playout:
    """Deadlines and delivery statistics of one stream at `fps` frames per second."""

    def __init__(self, fps: float, ttff_s: float, now: float | None = None) -> None:
        self.fps = float(fps)
        self.ttff_s = float(ttff_s)
        self.opened = time.perf_counter() if now is None else now
        self.frames = 0
        self.on_time = 0
        self.first_frame_s: float | None = None
        self.shown: float | None = None
        self.gaps: list[float] = []
        self.paused_at: float | None = None

    def due(self, index: int) -> float:
        return self.opened + self.ttff_s + index / self.fps

    def slack(self, now: float) -> float:
        """Seconds until the next frame to produce is due (negative: late)."""
        return self.due(self.frames) - now

    def produced(self, count: int, now: float) -> None:
        """`count` frames became ready at `now`."""
        if self.first_frame_s is None and count:
            self.first_frame_s = now - self.opened
        period = 1.0 / self.fps
        for _ in range(count):
            if now <= self.due(self.frames) + 1e-9:
                self.on_time += 1
            shown = max(now, self.due(0)) if self.shown is None else max(now, self.shown + period)
            if self.shown is not None:
                self.gaps.append(shown - self.shown)
            self.shown = shown
            self.frames += 1

    def pause(self, now: float) -> None:
        if self.paused_at is None:
            self.paused_at = now

    def resume(self, now: float) -> None:
        """Move every later deadline by the pause (the viewer was told the stream paused)."""
        if self.paused_at is not None:
            shift = now - self.paused_at
            self.opened += shift
            if self.shown is not None:
                self.shown += shift
            self.paused_at = None

    def stats(self, now: float | None = None) -> dict[str, float | int | None]:
        now = time.perf_counter() if now is None else now
        elapsed = now - self.opened
        gaps = np.asarray(self.gaps) if self.gaps else None
        return {
            "frames": self.frames,
            "fps": self.frames / elapsed if elapsed > 0 else 0.0,
            "target_fps": self.fps,
            "slack_s": self.slack(now),
            "slo_attainment": self.on_time / self.frames if self.frames else None,
            "first_frame_s": self.first_frame_s,
            "gap_p50_s": float(np.percentile(gaps, 50)) if gaps is not None else None,
            "gap_p99_s": float(np.percentile(gaps, 99)) if gaps is not None else None,
        }
