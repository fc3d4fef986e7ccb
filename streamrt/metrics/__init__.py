"""Video quality metrics computed on frames with OpenCV (used by bench and tests)."""

from streamrt.metrics.quality import (
    adherence,
    color_mask,
    copying,
    drift,
    dynamics,
    summarize_rollout,
)

__all__ = ["adherence", "color_mask", "copying", "drift", "dynamics", "summarize_rollout"]
