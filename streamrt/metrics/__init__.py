"""Video quality metrics computed on frames with OpenCV (used by bench and tests)."""

from streamrt.metrics.quality import (
    SHAPE_PROTOTYPES,
    adherence,
    classify_shapes,
    color_mask,
    copying,
    drift,
    dynamics,
    shape_match,
    shape_share,
    summarize_rollout,
)

__all__ = [
    "SHAPE_PROTOTYPES",
    "adherence",
    "classify_shapes",
    "color_mask",
    "copying",
    "drift",
    "dynamics",
    "shape_match",
    "shape_share",
    "summarize_rollout",
]
