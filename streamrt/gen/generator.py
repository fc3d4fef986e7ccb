"""`StreamGenerator`: the public face of streaming generation.

gen = StreamGenerator.from_pretrained("assets/tiny-world")
for frame in gen.stream("a red circle moving right on a dark background"): ...
gen.set_prompt("a blue square moving up on a light background")
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from streamrt.cache import CacheManager
from streamrt.config import CacheConfig, GenConfig, from_dict, read_preset
from streamrt.embedded import resolve_model
from streamrt.errors import InputError
from streamrt.gen.decoding import stream_frames
from streamrt.gen.engine import GenEngine
from streamrt.gen.settings import apply_changes
from streamrt.gen.stream import GenStream, check_num_frames

MANIFEST = "streamrt.json"
FORMAT = "streamrt-generator"


class StreamGenerator:
    """Endless frame streams from a causal video diffusion model."""

    def __init__(self, engine: GenEngine) -> None:
        self.engine = engine
        self.active: GenStream | None = None

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        config: str | Path | None = None,
        cache: CacheConfig | None = None,
        checkpoint: str | Path | None = None,
        manager: CacheManager | None = None,
        tiny_decoder: str | Path | None = None,
        **overrides: Any,
    ) -> StreamGenerator:
        """Load a generator; `overrides` set `GenConfig` fields.

        Settings: the directory's own (`streamrt.json`), then the preset's `gen:` keys,
        then `overrides`; the policy's window is sized for the sampler unless given
        (`streamrt.gen.settings`).

        Args:
            path: A streamrt generator directory (`streamrt.json`, see `save_pretrained`) or a
                diffusers Wan pipeline directory (`model_index.json`: transformer/,
                text_encoder/, tokenizer/, vae/), e.g. Wan2.1-T2V-1.3B-Diffusers.
            config: Optional YAML preset (e.g. configs/wan-1.3b-self-forcing.yaml): every
                key of its `gen:` section overrides the directory's setting, its `cache:`
                section sets the cache budgets.
            cache: Cache budgets of a manager of its own, overriding the preset's; with
                neither, the generator's streams share the process's cache manager with
                every other model of the process opened without a manager
                (`streamrt.cache.process`).
            checkpoint: Causal generator weights replacing the directory's transformer
                (Self-Forcing / CausVid / Rolling / Reward Forcing / StreamDiffusionV2 `.pt`).
            manager: A cache manager to share (a `streamrt.runtime.Runtime`'s); None: the
                generator makes its own from `cache`.
            tiny_decoder: A TAEHV-style tiny decoder checkpoint (e.g. taew2_1.pth) that
                decodes instead of the model's Wan VAE (`streamrt.models.taehv`).
        """
        from streamrt.models.generator_files import PIPELINE_MANIFEST, load_generator_parts

        path = resolve_model(path)
        if not (path / MANIFEST).exists() and (path / "model_index.json").exists():
            manifest = PIPELINE_MANIFEST
        else:
            manifest = _read_manifest(path)
        base = from_dict(GenConfig, manifest.get("gen", {}), str(path / MANIFEST))
        gen_cfg, given, cache = _settings(base, config, cache, overrides)
        ckpt = Path(checkpoint) if checkpoint is not None else None
        tiny = Path(tiny_decoder) if tiny_decoder is not None else None
        transformer, text_encoder, codec = load_generator_parts(path, manifest, gen_cfg, ckpt, tiny)
        return cls(GenEngine(transformer, text_encoder, codec, gen_cfg, manager, cache, given))

    @classmethod
    def tiny_random(
        cls,
        config: str | Path | None = None,
        cache: CacheConfig | None = None,
        manager: CacheManager | None = None,
        **overrides: Any,
    ) -> StreamGenerator:
        """An untrained tiny generator for smoke tests (`streamrt generate --model tiny-random`):
        `GenConfig` defaults, then the preset (`gen:` and `cache:`), then `overrides`."""
        from streamrt.models.generator_files import tiny_random_parts
        from streamrt.models.wan_checkpoints import cast_like_diffusers
        from streamrt.world import VOCAB

        gen_cfg, given, cache = _settings(GenConfig(), config, cache, overrides)
        transformer, text_encoder, codec = tiny_random_parts(VOCAB)
        cast_like_diffusers(transformer, gen_cfg.dtype)
        return cls(GenEngine(transformer, text_encoder, codec, gen_cfg, manager, cache, given))

    def save_pretrained(self, path: str | Path) -> None:
        from streamrt.models.generator_files import save_generator_parts

        save_generator_parts(Path(path), self.engine, MANIFEST, FORMAT)

    # ------------------------------------------------------------------ streaming

    def stream(
        self, prompt: str, num_frames: int | None = None, **overrides: Any
    ) -> Iterator[np.ndarray]:
        """Frames (`[H, W, 3]` uint8) for `prompt`, endless unless `num_frames` is given
        (then no chunk is computed that those frames do not need).

        The stream becomes the generator's active one: `set_prompt` switches it mid-stream.
        With `overlap_decode` (`GenConfig`), chunk k is decoded while chunk k+1 is denoised
        (`streamrt.gen.decoding`).
        """
        check_num_frames(num_frames)
        stream = self.engine.open_stream(prompt, **overrides)
        self.active = stream
        try:
            yield from stream_frames(stream, num_frames, stream.config.overlap_decode)
        finally:
            stream.close()
            if self.active is stream:
                self.active = None

    def set_prompt(self, prompt: str) -> None:
        """Switch the active stream's prompt (with KV re-cache of the kept frames)."""
        if self.active is None:
            raise InputError("no active stream: start one with stream() or stylize() first")
        self.active.set_prompt(prompt)

    def stylize(
        self, frames: Iterable[np.ndarray], prompt: str, **overrides: Any
    ) -> Iterator[np.ndarray]:
        """Live video-to-video: restyle `frames` (`[H, W, 3]` uint8) by `prompt`, as they come."""
        from streamrt.gen.v2v import VideoToVideo

        stream = self.engine.open_stream(prompt, **overrides)
        self.active = stream
        try:
            yield from VideoToVideo(stream).run(frames)
        finally:
            stream.close()
            if self.active is stream:
                self.active = None

    def stats(self) -> dict[str, Any]:
        """The active stream's counters and the cache manager's stats."""
        out: dict[str, Any] = {"cache": self.engine.cache.stats()}
        if self.active is not None:
            s = dict(self.active.stats)
            s["fps"] = s["frames"] / s["seconds"] if s["seconds"] else 0.0
            out["stream"] = s
        return out


def _read_manifest(path: Path) -> dict[str, Any]:
    file = path / MANIFEST
    if not file.exists():
        raise FileNotFoundError(
            f"{path} is neither a streamrt generator directory (no {MANIFEST}) nor a diffusers "
            "Wan pipeline (no model_index.json): check the path (the embedded model is "
            "'assets/tiny-world', shipped with streamrt)"
        )
    try:
        manifest = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(f"{file} is not valid JSON ({exc}); rebuild or restore it") from None
    if manifest.get("format") != FORMAT:
        raise InputError(f"{file}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


def _settings(
    base: GenConfig,
    config: str | Path | None,
    cache: CacheConfig | None,
    overrides: dict[str, Any],
) -> tuple[GenConfig, frozenset[str], CacheConfig | None]:
    """Requested generation settings, the policy arguments the user gave, cache budgets."""
    given: frozenset[str] = frozenset()
    if config is not None:
        preset, keys = read_preset(config)
        base, given = apply_changes(base, given, keys.get("gen", {}))
        if "cache" in keys:  # budgets of its own; without them, the process's manager
            cache = cache or preset.cache
    base, given = apply_changes(base, given, overrides)
    return base, given, cache


__all__ = ["StreamGenerator"]
