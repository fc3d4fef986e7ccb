"""`WorldSource`: an endless live stream of world frames, opened from a `world://` URL.

    world://seed=3
    world://seed=3&fps=8&size=64x64&frames=100&caption=a red circle moving right on a dark background

Keys: seed (int, default 0), fps (frames per second the stream stands for; it sets the
per-frame step, not a wall-clock pace), size (WIDTHxHEIGHT), frames (stop after this many;
default endless), caption (the scene; default sampled from the seed). Values may be
percent- or plus-encoded. Streams always wrap at the edges and never lose objects, so
they keep showing the scene forever.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterator
from urllib.parse import unquote_plus

import numpy as np

from streamrt.errors import InputError
from streamrt.world.caption import build_scene, caption_for, parse_caption, sample_description
from streamrt.world.config import WorldConfig
from streamrt.world.scene import Scene

SCHEME = "world://"
URL_KEYS = ("seed", "fps", "size", "frames", "caption")


def _int(key: str, value: str, minimum: int) -> int:
    if not re.fullmatch(r"[0-9]+", value) or int(value) < minimum:
        raise InputError(f"world URL: {key} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def parse_world_url(url: str) -> dict[str, object]:
    """Read a `world://` URL into {"seed", "fps", "width", "height", "frames", "caption"}.

    Only the keys present in the URL are returned.

    Raises:
        ValueError: Wrong scheme, a malformed or repeated key=value pair, an unknown key or
            a bad value; the message names it.
    """
    if not url.startswith(SCHEME):
        raise InputError(f"world URL must start with {SCHEME!r}, got {url!r}")
    out: dict[str, object] = {}
    body = url[len(SCHEME) :]
    for pair in body.split("&") if body else []:
        key, eq, raw = pair.partition("=")
        if not eq or not key:
            raise InputError(f"world URL: {pair!r} is not key=value (in {url!r})")
        if key not in URL_KEYS:
            raise InputError(f"world URL: unknown key {key!r}; known keys: {', '.join(URL_KEYS)}")
        if key in out or (key == "size" and "width" in out):
            raise InputError(f"world URL: {key!r} given twice")
        value = unquote_plus(raw).strip()
        if key == "seed":
            out["seed"] = _int(key, value, 0)
        elif key == "frames":
            out["frames"] = _int(key, value, 1)
        elif key == "fps":
            try:
                fps = float(value)
            except ValueError:
                fps = math.nan
            if not (math.isfinite(fps) and fps > 0):
                raise InputError(f"world URL: fps must be a number > 0, got {value!r}")
            out["fps"] = fps
        elif key == "size":
            m = re.fullmatch(r"([0-9]+)x([0-9]+)", value)
            if not m:
                raise InputError(f"world URL: size must be WIDTHxHEIGHT like 64x64, got {value!r}")
            out["width"], out["height"] = int(m.group(1)), int(m.group(2))
        else:
            out["caption"] = value
    return out


class WorldSource:
    """Iterable of RGB uint8 `[H, W, 3]` frames of one world scene, endless by default.

    Each `iter()` starts again at frame 0 and yields the same frames.
    """

    def __init__(
        self,
        url_or_seed: str | int,
        config: WorldConfig | None = None,
        max_frames: int | None = None,
    ) -> None:
        """Open a stream.

        Args:
            url_or_seed: A `world://` URL or a seed.
            config: Base settings; the URL's fps and size override it.
            max_frames: Stop after this many frames (the URL's `frames` wins); None: endless.

        Raises:
            ValueError: A bad URL, caption or size; the message says which.
        """
        if isinstance(url_or_seed, bool) or not isinstance(url_or_seed, (int, str)):
            raise InputError(
                f"WorldSource needs a world:// URL or an int seed, got {url_or_seed!r}"
            )
        opts = parse_world_url(url_or_seed) if isinstance(url_or_seed, str) else {}
        seed = int(url_or_seed) if isinstance(url_or_seed, int) else int(opts.get("seed", 0))
        if seed < 0:
            raise InputError(f"seed must be >= 0, got {seed}")
        overrides = {k: opts[k] for k in ("fps", "width", "height") if k in opts}
        # Endless streams: wrap so objects keep coming back, and nobody enters late or exits.
        self.config = dataclasses.replace(
            config or WorldConfig(),
            **overrides,
            boundary="wrap",
            late_entry_prob=0.0,
            early_exit_prob=0.0,
        )
        self.max_frames = opts.get("frames", max_frames)
        if self.max_frames is not None and self.max_frames < 0:
            raise InputError(f"max_frames must be >= 0, got {self.max_frames}")
        rng = np.random.default_rng(seed)
        caption = opts.get("caption")
        description = parse_caption(caption) if caption else sample_description(rng, self.config)
        self.scene: Scene = build_scene(description, rng, self.config, horizon=0)
        self.caption = caption_for(self.scene)

    @property
    def fps(self) -> float:
        """Frames per second the stream stands for."""
        return self.config.fps

    def __iter__(self) -> Iterator[np.ndarray]:
        t = 0
        while self.max_frames is None or t < self.max_frames:
            yield self.scene.render(t)
            t += 1
