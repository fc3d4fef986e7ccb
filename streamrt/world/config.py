"""`WorldConfig`: resolution, timing, object counts and dynamics of the procedural world."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from streamrt.errors import InputError

BOUNDARIES = ("wrap", "bounce")


@dataclass
class WorldConfig:
    """How scenes of the procedural world are drawn and how their objects move."""

    height: int = 64
    """Frame height in pixels (a multiple of 8, at least 32)."""

    width: int = 64
    """Frame width in pixels (a multiple of 8, at least 32)."""

    fps: float = 8.0
    """Frame rate the clip stands for; object speeds are in pixels per second, so a higher
    rate means smaller steps per frame."""

    num_frames: int = 32
    """Default clip length, and the horizon within which late entries and early exits fall."""

    min_objects: int = 1
    """Fewest objects in a sampled scene."""

    max_objects: int = 3
    """Most objects in a sampled scene (at most 4)."""

    boundary: Literal["wrap", "bounce", "random"] = "random"
    """What happens at the frame edge: "wrap" (leave, then re-enter from the opposite side),
    "bounce" (reflect off the wall), or "random" (chosen per scene from the seed)."""

    late_entry_prob: float = 0.3
    """Chance that an object other than the first pops in after frame 0."""

    early_exit_prob: float = 0.2
    """Chance that an object vanishes for good before the clip ends."""

    speed_in_captions: bool = False
    """Captions name each object's pace ("a fast red circle ..."); sampled captions too."""

    qa_per_kind: int = 1
    """Question/answer pairs drawn per question kind and clip (fewer when a kind is ambiguous)."""

    object_size: tuple[int, int] = (4, 7)
    """Range of an object's half-extent in pixels of a 64-pixel frame (shapes 9 to 15 pixels
    across by default); scaled with the frame like speeds."""

    def __post_init__(self) -> None:
        for name in ("height", "width"):
            value = getattr(self, name)
            if value < 32 or value % 8:
                raise InputError(f"world.{name} must be a multiple of 8 and >= 32, got {value}")
        if self.fps <= 0:
            raise InputError(f"world.fps must be > 0, got {self.fps}")
        if self.num_frames < 1:
            raise InputError(f"world.num_frames must be >= 1, got {self.num_frames}")
        if not 1 <= self.min_objects <= self.max_objects <= 4:
            raise InputError(
                "world needs 1 <= min_objects <= max_objects <= 4, got "
                f"{self.min_objects}..{self.max_objects}"
            )
        if self.boundary not in (*BOUNDARIES, "random"):
            raise InputError(
                f"world.boundary must be 'wrap', 'bounce' or 'random', got {self.boundary!r}"
            )
        for name in ("late_entry_prob", "early_exit_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise InputError(f"world.{name} must lie in [0, 1], got {getattr(self, name)}")
        lo, hi = self.object_size
        if not 1 <= lo <= hi <= 16:
            raise InputError(
                f"world.object_size must be LO,HI with 1 <= LO <= HI <= 16, got {lo},{hi}"
            )
        if self.qa_per_kind < 0:
            raise InputError(f"world.qa_per_kind must be >= 0, got {self.qa_per_kind}")

    @property
    def scale(self) -> float:
        """Size of one "64x64 pixel" in this resolution: sizes and speeds scale with it."""
        return min(self.height, self.width) / 64.0
