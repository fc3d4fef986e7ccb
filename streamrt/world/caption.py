"""Caption grammar: describe a scene, read a caption back, and build a scene that fits one.

    caption     := object ("and" object)* "on a" BACKGROUND "background"
    object      := ("a" | "an") [PACE] COLOR SHAPE "moving" DIRECTION

e.g. "a red circle moving right and a fast blue square moving up on a light background".
The pace word appears only when `WorldConfig.speed_in_captions` is set; it is accepted
by the parser either way. A direction is the one an object has when it enters (bounce
scenes flip it later).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from streamrt.errors import InputError
from streamrt.world.config import BOUNDARIES, WorldConfig
from streamrt.world.scene import Scene, WorldObject
from streamrt.world.vocab import (
    BACKGROUNDS,
    CAPTION_WORDS,
    COLORS,
    DIRECTIONS,
    PACES,
    SHAPES,
    article,
)

T = TypeVar("T")

EXAMPLE = "a red circle moving right and a blue square moving up on a dark background"

_PACE_SPEED = {"slow": (4.0, 8.0), "fast": (12.0, 20.0)}
"""Pace -> range of speeds in pixels per second on a 64-pixel frame."""


@dataclass(frozen=True)
class ObjectDescription:
    """What a caption says about one object."""

    color: str
    shape: str
    direction: str
    pace: str | None = None
    """None: the caption does not say; the scene picks one."""


@dataclass(frozen=True)
class SceneDescription:
    """What a caption says about a scene: its objects, in order, and the background."""

    objects: tuple[ObjectDescription, ...]
    background: str


def format_caption(description: SceneDescription, with_pace: bool = False) -> str:
    """Write `description` in the caption grammar (pace words only if `with_pace`)."""
    parts = []
    for obj in description.objects:
        adjectives = f"{obj.pace} {obj.color}" if with_pace and obj.pace else obj.color
        parts.append(f"{article(adjectives)} {adjectives} {obj.shape} moving {obj.direction}")
    return f"{' and '.join(parts)} on a {description.background} background"


def _grammar_error(caption: str, what: str) -> InputError:
    return InputError(f"cannot read caption {caption!r}: {what}; write e.g. {EXAMPLE!r}")


def _parse_object(words: list[str], caption: str) -> ObjectDescription:
    pace = words[1] if len(words) == 6 and words[1] in PACES else None
    core = [w for i, w in enumerate(words) if not (i == 1 and pace)]
    if (
        len(core) != 5
        or core[0] not in ("a", "an")
        or core[1] not in COLORS
        or core[2] not in SHAPES
        or core[3] != "moving"
        or core[4] not in DIRECTIONS
    ):
        raise _grammar_error(
            caption, f"{' '.join(words)!r} is not 'a [pace] <color> <shape> moving <direction>'"
        )
    return ObjectDescription(core[1], core[2], core[4], pace)


def parse_caption(caption: str) -> SceneDescription:
    """Read a caption of the grammar above.

    Raises:
        ValueError: A word is outside the vocabulary (the message lists those words and the
            vocabulary), or the words do not follow the grammar.
    """
    words = caption.strip().rstrip(".").lower().split()
    unknown = list(dict.fromkeys(w for w in words if w not in CAPTION_WORDS))
    if unknown:
        raise InputError(
            f"caption {caption!r} has word(s) outside the world's vocabulary: "
            f"{', '.join(unknown)}. Captions use only: {' '.join(CAPTION_WORDS)}"
        )
    tail = words[-4:]
    if len(tail) < 4 or tail[:2] != ["on", "a"] or tail[2] not in BACKGROUNDS:
        raise _grammar_error(caption, "it must end with 'on a <background> background'")
    if tail[3] != "background":
        raise _grammar_error(caption, "it must end with 'on a <background> background'")
    chunks: list[list[str]] = [[]]
    for w in words[:-4]:
        if w == "and":
            chunks.append([])
        else:
            chunks[-1].append(w)
    objects = tuple(_parse_object(chunk, caption) for chunk in chunks)
    return SceneDescription(objects, tail[2])


def _pick(rng: np.random.Generator, options: Sequence[T]) -> T:
    return options[int(rng.integers(len(options)))]


def sample_description(
    rng: np.random.Generator, config: WorldConfig | None = None
) -> SceneDescription:
    """Draw objects (distinct colour/shape pairs), directions and a background from `rng`."""
    config = config or WorldConfig()
    count = int(rng.integers(config.min_objects, config.max_objects + 1))
    pairs = [(c, s) for c in COLORS for s in SHAPES]
    chosen = rng.choice(len(pairs), size=count, replace=False)
    objects = tuple(
        ObjectDescription(
            *pairs[int(i)],
            direction=_pick(rng, DIRECTIONS),
            pace=_pick(rng, PACES) if config.speed_in_captions else None,
        )
        for i in chosen
    )
    return SceneDescription(objects, _pick(rng, BACKGROUNDS))


def random_caption(rng: np.random.Generator, config: WorldConfig | None = None) -> str:
    """A valid caption drawn from `rng` (pace words if `config.speed_in_captions`)."""
    config = config or WorldConfig()
    return format_caption(sample_description(rng, config), config.speed_in_captions)


def _timing(
    rng: np.random.Generator, config: WorldConfig, horizon: int, first: bool
) -> tuple[int, int | None]:
    enter, exit_ = 0, None
    if horizon < 2:
        return enter, exit_
    if not first and rng.random() < config.late_entry_prob:
        enter = int(rng.integers(1, horizon // 2 + 1))
    lo = enter + max(1, horizon // 4)
    if rng.random() < config.early_exit_prob and lo < horizon:
        exit_ = int(rng.integers(lo, horizon))
    return enter, exit_


def _place(
    desc: ObjectDescription,
    rng: np.random.Generator,
    config: WorldConfig,
    boundary: str,
    timing: tuple[int, int | None],
) -> WorldObject:
    scale = config.scale
    lo, hi = config.object_size
    size = int(rng.integers(round(lo * scale), round(hi * scale) + 1))
    pace = desc.pace or _pick(rng, PACES)
    speed = float(rng.uniform(*_PACE_SPEED[pace])) * scale / config.fps
    horizontal = desc.direction in ("left", "right")
    along_extent, across_extent = (
        (config.width, config.height) if horizontal else (config.height, config.width)
    )
    across = float(rng.uniform(size, across_extent - 1 - size))
    # Centre inside the frame on entry (whole shape for bounce), so it is seen on arrival.
    margin = 0 if boundary == "wrap" else size
    along = float(rng.uniform(margin, along_extent - 1 - margin))
    x0, y0 = (along, across) if horizontal else (across, along)
    return WorldObject(desc.color, desc.shape, desc.direction, x0, y0, size, speed, pace, *timing)


def build_scene(
    description: SceneDescription,
    rng: np.random.Generator,
    config: WorldConfig | None = None,
    horizon: int | None = None,
) -> Scene:
    """A scene with exactly the described objects, placed, sized and timed from `rng`.

    Args:
        description: Objects (in drawing order) and background the scene must show.
        rng: Source of positions, sizes, speeds, entry/exit frames and the boundary rule.
        config: Resolution, frame rate, boundary rule and entry/exit probabilities.
        horizon: Frames the clip will last; late entries and early exits fall inside it.
            Defaults to `config.num_frames`; 0 disables them (endless streams).
    """
    config = config or WorldConfig()
    horizon = config.num_frames if horizon is None else horizon
    boundary = config.boundary if config.boundary != "random" else _pick(rng, BOUNDARIES)
    objects = [
        _place(desc, rng, config, boundary, _timing(rng, config, horizon, first=i == 0))
        for i, desc in enumerate(description.objects)
    ]
    return Scene(objects, description.background, boundary, config)


def scene_from_caption(caption: str, seed: int = 0, config: WorldConfig | None = None) -> Scene:
    """Build a scene that shows what `caption` says, with the rest drawn from `seed`.

    Raises:
        ValueError: The caption has unknown words or does not follow the grammar.
    """
    return build_scene(parse_caption(caption), np.random.default_rng(seed), config)


def caption_for(scene: Scene) -> str:
    """Describe `scene` in the caption grammar (directions on entry; pace per its config)."""
    description = SceneDescription(
        tuple(ObjectDescription(o.color, o.shape, o.direction, o.pace) for o in scene.objects),
        scene.background,
    )
    return format_caption(description, scene.config.speed_in_captions)
