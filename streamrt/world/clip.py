"""`Clip` and `make_clip`: one seeded sample of the world (frames, caption, questions)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from streamrt.world.caption import build_scene, caption_for, parse_caption, sample_description
from streamrt.world.config import WorldConfig
from streamrt.world.qa import QA, make_qa
from streamrt.world.scene import Scene


@dataclass
class Clip:
    """A rendered clip with its description and questions."""

    frames: np.ndarray
    """`[T, H, W, 3]` uint8 RGB."""
    caption: str
    """The scene in the caption grammar (`caption_for(scene)`)."""
    qa: list[QA]
    """Questions about the frames, answered from the scene's states."""
    scene: Scene
    """The scene the frames were rendered from (states of any frame are available)."""


def make_clip(
    seed: int,
    num_frames: int | None = None,
    config: WorldConfig | None = None,
    caption: str | None = None,
) -> Clip:
    """Render a clip; the same arguments always give the same clip.

    Args:
        seed: Seeds every random choice (scene, placement, timing, questions).
        num_frames: Clip length; defaults to `config.num_frames`.
        config: World settings; defaults to `WorldConfig()`.
        caption: Scene to show; None samples one from the seed. With the default
            `num_frames` the scene equals `scene_from_caption(caption, seed, config)`.

    Raises:
        ValueError: `caption` has unknown words or does not follow the grammar.
    """
    config = config or WorldConfig()
    num_frames = config.num_frames if num_frames is None else num_frames
    rng = np.random.default_rng(seed)
    description = parse_caption(caption) if caption else sample_description(rng, config)
    scene = build_scene(description, rng, config, horizon=num_frames)
    qa = make_qa(scene, num_frames, rng, per_kind=config.qa_per_kind)
    return Clip(scene.render_frames(num_frames), caption_for(scene), qa, scene)
