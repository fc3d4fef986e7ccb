"""The procedural world: seeded videos of coloured shapes with captions and questions.

It is the training data of the tiny text-to-video and video-QA models and a live source
(`world://seed=3`) for the CLI. numpy and OpenCV only; frames are RGB uint8.

    clip = make_clip(seed=3)                       # frames [T, 64, 64, 3], caption, qa
    scene = scene_from_caption("a red circle moving right on a dark background", seed=1)
    for frame in WorldSource("world://seed=3&frames=100"): ...
"""

from streamrt.world.caption import (
    ObjectDescription,
    SceneDescription,
    build_scene,
    caption_for,
    format_caption,
    parse_caption,
    random_caption,
    sample_description,
    scene_from_caption,
)
from streamrt.world.clip import Clip, make_clip
from streamrt.world.config import WorldConfig
from streamrt.world.qa import QA, QA_KINDS, make_qa
from streamrt.world.render import draw_shape, render_background
from streamrt.world.scene import ObjectState, Scene, WorldObject
from streamrt.world.source import WorldSource, parse_world_url
from streamrt.world.vocab import (
    BACKGROUNDS,
    CAPTION_WORDS,
    COLORS,
    DIRECTIONS,
    PACES,
    SHAPES,
    VOCAB,
    tokenize,
)

__all__ = [
    "BACKGROUNDS",
    "CAPTION_WORDS",
    "COLORS",
    "DIRECTIONS",
    "PACES",
    "QA",
    "QA_KINDS",
    "SHAPES",
    "VOCAB",
    "Clip",
    "ObjectDescription",
    "ObjectState",
    "Scene",
    "SceneDescription",
    "WorldConfig",
    "WorldObject",
    "WorldSource",
    "build_scene",
    "caption_for",
    "draw_shape",
    "format_caption",
    "make_clip",
    "make_qa",
    "parse_caption",
    "parse_world_url",
    "random_caption",
    "render_background",
    "sample_description",
    "scene_from_caption",
    "tokenize",
]
