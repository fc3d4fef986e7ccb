"""What the seeds' cache policies claim to fix, measured on frames of the procedural world.

    adherence  the prompted colours are on screen and move the prompted way
    dynamics   optical-flow magnitude over time (lost motion -> 0)
    drift      distance of a frame's colour statistics from the world's own frames
    copying    similarity of late frames to the first one (first-frame copying -> 1)
    shape      the prompted colour's object is the prompted shape (contour classifier)

All take uint8 RGB frames `[N, H, W, 3]`. Colours are matched to the world's palette.
"""

from __future__ import annotations

import itertools
from typing import Any

import cv2
import numpy as np

from streamrt.world import COLORS, SHAPES, parse_caption

_AXIS = {"right": (0, 1), "left": (0, -1), "down": (1, 1), "up": (1, -1)}


def color_mask(frames: np.ndarray, color: str, tol: float = 60.0) -> np.ndarray:
    """Boolean `[N, H, W]`: pixels within `tol` (RGB distance) of a palette colour."""
    rgb = np.array(COLORS[color], dtype=np.float32)
    return np.linalg.norm(frames.astype(np.float32) - rgb, axis=-1) < tol


def _blob_centroids(mask: np.ndarray, min_pixels: int) -> list[tuple[float, float] | None]:
    """Centroid of each frame's largest connected blob of the colour (None if too small).

    A blob, not all matching pixels: scattered noise of the right hue is not an object.
    """
    out = []
    for m in mask:
        n, _, stats, cents = cv2.connectedComponentsWithStats(m.astype(np.uint8), connectivity=8)
        if n <= 1:
            out.append(None)
            continue
        best = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
        out.append(tuple(cents[best]) if stats[best, cv2.CC_STAT_AREA] >= min_pixels else None)
    return out


def _moves_as_prompted(cents: list, direction: str, size: tuple[int, int]) -> bool | None:
    """Median per-frame centroid step along the prompted axis has the prompted sign.

    Steps longer than half the frame are wraps (an object leaving and re-entering) and
    are ignored. None when the colour was seen in fewer than 3 consecutive pairs.
    """
    axis, sign = _AXIS[direction]
    limit = size[axis] / 2
    steps = [
        b[axis] - a[axis]
        for a, b in itertools.pairwise(cents)
        if a is not None and b is not None and abs(b[axis] - a[axis]) < limit
    ]
    if len(steps) < 3:
        return None
    return float(np.median(steps)) * sign > 0


def adherence(frames: np.ndarray, caption: str, min_pixels: int = 20) -> dict[str, Any]:
    """Per prompted object: fraction of frames showing its colour, and whether it moves the
    prompted way. `score` = mean over objects of (present in >= half the frames, which a
    wrapping object leaving and re-entering still is, and moving the prompted way)."""
    desc = parse_caption(caption)
    h, w = frames.shape[1:3]
    objects, passed = [], 0
    for obj in desc.objects:
        cents = _blob_centroids(color_mask(frames, obj.color), min_pixels)
        present = float(np.mean([c is not None for c in cents]))
        moving = _moves_as_prompted(cents, obj.direction, (w, h))
        ok = present >= 0.5 and moving is True
        passed += ok
        objects.append(
            {
                "color": obj.color,
                "direction": obj.direction,
                "present": present,
                "moving": moving,
                "ok": ok,
            }
        )
    return {"score": passed / len(desc.objects), "objects": objects}


SHAPE_PROTOTYPES: dict[str, tuple[float, float]] = {
    "circle": (np.pi / 4, np.pi / (3 * np.sqrt(3))),
    "square": (1.0, 0.5),
    "triangle": (0.5, 1.0),
}
"""Shape -> (extent, triangle fill) of the ideal continuous shape: a disc fills pi/4 of its
bounding square and pi/(3 sqrt 3) of its smallest enclosing (equilateral) triangle; a
square fills its rectangle and half its smallest triangle; a triangle fills half of its
smallest rectangle and all of its triangle. Theory, not fitted to any frames."""


def _shape_features(contour: np.ndarray) -> tuple[float, float]:
    """(extent, triangle fill): contour area over its minimum-area rotated rectangle's, and
    over its minimum enclosing triangle's (both rotation invariant)."""
    area = cv2.contourArea(contour)
    w, h = cv2.minAreaRect(contour)[1]
    triangle, _ = cv2.minEnclosingTriangle(contour.astype(np.float32))
    return area / max(w * h, 1e-6), area / max(triangle, 1e-6)


def _nearest_shape(features: tuple[float, float]) -> str:
    """The shape of `SHAPE_PROTOTYPES` nearest to `features` (Euclidean)."""
    x = np.array(features)
    return min(SHAPES, key=lambda s: float(np.linalg.norm(x - SHAPE_PROTOTYPES[s])))


def classify_shapes(
    frames: np.ndarray,
    color: str,
    tol: float = 60.0,
    min_fraction: float = 0.005,
    max_fraction: float = 0.25,
) -> list[str | None]:
    """Per frame: "circle", "square" or "triangle" for the largest blob of `color`, or None.

    The colour mask (`color_mask`) of each frame `[T, H, W, 3]` is traced with
    `cv2.findContours` (outer contours); the largest one by area decides. Two features of
    it decide the label: its extent (area / minimum-area rectangle, rotation invariant;
    1 for a square, pi/4 for a disc, 1/2 for a triangle) and its triangle fill (area /
    `cv2.minEnclosingTriangle`; 1 for a triangle, about 0.6 for a disc, 1/2 for a square).
    The label is the nearest ideal shape (`SHAPE_PROTOTYPES`) in that plane. Any blob of
    a sensible size gets one of the three labels (a shapeless blob is mostly a "circle").

    None when the largest contour is smaller than `min_fraction` or larger than
    `max_fraction` of the frame (the world's shapes cover 1.2-5.5 % of it), or when its
    bounding box touches the frame border (a shape partly off-screen, as in a wrapping
    scene, would be misread). Deterministic: no randomness, no learned weights.
    """
    masks = color_mask(frames, color, tol).astype(np.uint8)
    h, w = masks.shape[1:]
    labels: list[str | None] = []
    for m in masks:
        contours, _ = cv2.findContours(m, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        if not contours:
            labels.append(None)
            continue
        best = max(contours, key=cv2.contourArea)
        x, y, bw, bh = cv2.boundingRect(best)
        area = cv2.contourArea(best)
        on_border = x == 0 or y == 0 or x + bw >= w or y + bh >= h
        if on_border or not min_fraction * h * w <= area <= max_fraction * h * w:
            labels.append(None)
            continue
        labels.append(_nearest_shape(_shape_features(best)))
    return labels


def shape_share(frames: np.ndarray, color: str, shape: str) -> float:
    """Share of the frames `classify_shapes` answers for `color` that it labels `shape`;
    0 when it answers on none (the colour absent, too small, too big, or always at the
    border): the frames did not show the shape."""
    seen = [s for s in classify_shapes(frames, color) if s is not None]
    return float(np.mean([s == shape for s in seen])) if seen else 0.0


def shape_match(frames: np.ndarray, caption: str) -> float:
    """Mean over the caption's objects of `shape_share` of its colour and shape word."""
    objects = parse_caption(caption).objects
    return float(np.mean([shape_share(frames, o.color, o.shape) for o in objects]))


def dynamics(frames: np.ndarray) -> np.ndarray:
    """Mean Farneback optical-flow magnitude (pixels/frame) between consecutive frames."""
    gray = [cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in frames]
    mags = []
    for a, b in itertools.pairwise(gray):
        flow = cv2.calcOpticalFlowFarneback(a, b, None, 0.5, 2, 9, 3, 5, 1.1, 0)
        mags.append(float(np.linalg.norm(flow, axis=-1).mean()))
    return np.array(mags)


def _color_stats(frames: np.ndarray) -> np.ndarray:
    x = frames.reshape(len(frames), -1, 3).astype(np.float32) / 255.0
    return np.concatenate([x.mean(axis=1), x.std(axis=1)], axis=1)  # [N, 6]


def drift(frames: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Per frame: L1 distance of (mean, std) per channel from the reference frames' average."""
    ref = _color_stats(reference).mean(axis=0)
    return np.abs(_color_stats(frames) - ref).sum(axis=1)


def copying(frames: np.ndarray) -> np.ndarray:
    """Per frame: correlation with the first frame (1 = a copy of it)."""
    first = frames[0].astype(np.float32).ravel()
    first = first - first.mean()
    out = []
    for f in frames:
        x = f.astype(np.float32).ravel()
        x = x - x.mean()
        out.append(float(x @ first / (np.linalg.norm(x) * np.linalg.norm(first) + 1e-6)))
    return np.array(out)


def summarize_rollout(
    frames: np.ndarray, caption: str, reference: np.ndarray, tail: float = 0.25
) -> dict[str, Any]:
    """All five metrics; drift and copying are averaged over the last `tail` of the rollout,
    shape (`shape_match`) is over all frames."""
    n = max(2, int(len(frames) * tail))
    late = frames[-n:]
    dyn = dynamics(frames)
    return {
        "adherence": adherence(frames, caption)["score"],
        "late_adherence": adherence(late, caption)["score"],
        "dynamics": float(dyn.mean()),
        "late_dynamics": float(dyn[-(n - 1) :].mean()),
        "drift": float(drift(late, reference).mean()),
        "copying": float(copying(frames)[-n:].mean()),
        "shape": shape_match(frames, caption),
    }
