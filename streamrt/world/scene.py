"""Objects, their dynamics, and the per-frame state and pixels of a scene.

Every object moves at a constant speed along one axis. Its position at frame t is a
closed-form function of t (no simulation), so any frame of an endless stream costs the
same and two renders of one frame are identical.

Along its axis an object of size r on a frame of extent E (pixels 0..E-1) travels:

    wrap:    |<- m ->|<------- frame: 0 .. E-1 ------->|<- m ->|     m = 2r
             -m      0                                 E-1     E-1+m, then back to -m
             the object is wholly outside while its centre is in the margins
             beyond r, so it leaves and later re-enters from the opposite side.

    bounce:  r ............................................ E-1-r
             the centre reflects between these, so the shape always stays inside
             and its direction flips at each wall.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from streamrt.errors import InputError
from streamrt.world.config import BOUNDARIES, WorldConfig
from streamrt.world.render import draw_shape, render_background
from streamrt.world.vocab import BACKGROUNDS, COLORS, DIRECTIONS, PACES, SHAPES

# direction -> (axis: 0 = x / 1 = y, sign in image coordinates; y grows downwards)
_MOTION = {"right": (0, 1), "left": (0, -1), "down": (1, 1), "up": (1, -1)}
_NAME = {motion: name for name, motion in _MOTION.items()}


@dataclass(frozen=True)
class WorldObject:
    """One moving shape: what it is, how it moves, and when it is on stage."""

    color: str
    """Palette name (a key of `COLORS`)."""
    shape: str
    """"circle", "square" or "triangle"."""
    direction: str
    """Direction of motion when it enters ("left", "right", "up", "down")."""
    x0: float
    """Centre column at `enter_frame`."""
    y0: float
    """Centre row at `enter_frame`."""
    size: int
    """Half-extent in pixels: the shape spans 2 * size + 1 pixels."""
    speed: float
    """Pixels per frame."""
    pace: str = "slow"
    """"slow" or "fast": the speed class captions may name."""
    enter_frame: int = 0
    """First frame the object is on stage."""
    exit_frame: int | None = None
    """First frame it is gone for good; None: it never leaves."""

    def __post_init__(self) -> None:
        for value, allowed in (
            (self.color, tuple(COLORS)),
            (self.shape, SHAPES),
            (self.direction, DIRECTIONS),
            (self.pace, PACES),
        ):
            if value not in allowed:
                raise InputError(f"{value!r} is not one of {', '.join(allowed)}")
        if self.size < 1 or self.speed < 0 or self.enter_frame < 0:
            raise InputError(f"bad object geometry or timing: {self}")
        if self.exit_frame is not None and self.exit_frame <= self.enter_frame:
            raise InputError(f"exit_frame must come after enter_frame: {self}")

    def on_stage(self, t: int) -> bool:
        """Whether frame `t` lies in [enter_frame, exit_frame)."""
        return t >= self.enter_frame and (self.exit_frame is None or t < self.exit_frame)


@dataclass(frozen=True, slots=True)
class ObjectState:
    """Where one object is at one frame, and whether any of it is drawn."""

    index: int
    """Position of the object in `Scene.objects` (its identity across frames)."""
    color: str
    shape: str
    x: float
    """Centre column (may lie outside the frame in wrap scenes)."""
    y: float
    """Centre row."""
    size: int
    visible: bool
    """On stage and at least partly inside the frame (another shape may still cover it)."""
    direction: str
    """Direction it moves from this frame to the next."""

    @property
    def center(self) -> tuple[int, int]:
        """The pixel (column, row) the shape is drawn around."""
        return _round(self.x), _round(self.y)

    @property
    def box(self) -> tuple[int, int, int, int]:
        """Inclusive pixel box (x0, y0, x1, y1) the shape may cover."""
        cx, cy = self.center
        return cx - self.size, cy - self.size, cx + self.size, cy + self.size


def _round(v: float) -> int:
    # Half-up, not Python's half-to-even, so a shape moving 0.5 px/frame steps regularly.
    return math.floor(v + 0.5)


def travel(
    p0: float, sign: int, dist: float, size: int, extent: int, boundary: str
) -> tuple[float, int]:
    """Position and direction sign after moving `dist` pixels from `p0` (see module diagram).

    `dist` may be negative (where the object was before it entered).
    """
    if boundary == "wrap":
        margin = 2 * size
        period = extent + 2 * margin
        return (p0 + margin + sign * dist) % period - margin, sign
    lo, hi = size, extent - 1 - size
    span = hi - lo
    if span <= 0:
        return p0, sign
    # Unfold the reflections: distance from the wall the object moves away from, mod 2*span.
    anchor = lo if sign > 0 else hi
    u = (sign * (p0 - anchor) + dist) % (2 * span)
    if u < span:
        return anchor + sign * u, sign
    return anchor + sign * (2 * span - u), -sign


@dataclass
class Scene:
    """Objects on a background with one boundary rule; frames are rendered on demand."""

    objects: list[WorldObject]
    background: str
    boundary: str
    config: WorldConfig = field(default_factory=WorldConfig)
    _backdrop: np.ndarray | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.background not in BACKGROUNDS:
            raise InputError(f"background must be one of {', '.join(BACKGROUNDS)}")
        if self.boundary not in BOUNDARIES:
            raise InputError(f"boundary must be one of {', '.join(BOUNDARIES)}")

    @property
    def height(self) -> int:
        """Frame height in pixels."""
        return self.config.height

    @property
    def width(self) -> int:
        """Frame width in pixels."""
        return self.config.width

    def object_state(self, index: int, t: int) -> ObjectState:
        """State of `objects[index]` at frame `t`."""
        obj = self.objects[index]
        axis, sign = _MOTION[obj.direction]
        pos = [obj.x0, obj.y0]
        extent = self.width if axis == 0 else self.height
        dist = obj.speed * (t - obj.enter_frame)
        pos[axis], sign = travel(pos[axis], sign, dist, obj.size, extent, self.boundary)
        cx, cy = _round(pos[0]), _round(pos[1])
        inside = (
            cx + obj.size >= 0
            and cx - obj.size <= self.width - 1
            and cy + obj.size >= 0
            and cy - obj.size <= self.height - 1
        )
        return ObjectState(
            index=index,
            color=obj.color,
            shape=obj.shape,
            x=pos[0],
            y=pos[1],
            size=obj.size,
            visible=obj.on_stage(t) and inside,
            direction=_NAME[(axis, sign)],
        )

    def state(self, t: int) -> list[ObjectState]:
        """States of all objects at frame `t`, in drawing order (later ones on top)."""
        return [self.object_state(i, t) for i in range(len(self.objects))]

    def render(self, t: int) -> np.ndarray:
        """Frame `t` as a `[height, width, 3]` uint8 RGB array."""
        if self._backdrop is None:
            self._backdrop = render_background(self.background, self.height, self.width)
        frame = self._backdrop.copy()
        for s in self.state(t):
            if s.visible:
                draw_shape(frame, s.shape, *s.center, s.size, COLORS[s.color])
        return frame

    def render_frames(self, num_frames: int, start: int = 0) -> np.ndarray:
        """Frames `start .. start + num_frames - 1` as a `[T, height, width, 3]` uint8 array."""
        frames = np.empty((num_frames, self.height, self.width, 3), dtype=np.uint8)
        for i in range(num_frames):
            frames[i] = self.render(start + i)
        return frames
