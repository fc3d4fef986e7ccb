"""The embedded generator's training data: world clips with their captions and object
masks, per-chunk noise levels, and the noise (independent, or drifting along the caption's
direction as streams draw it). Split from `train_gen` (the config, loss and loop)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from streamrt.gen.noise import DriftingNoise
from streamrt.models.train_gen_masks import shape_difference
from streamrt.world import COLORS, WorldConfig, make_clip

if TYPE_CHECKING:
    from streamrt.models.train_gen import TrainGenConfig


def world_config(cfg: TrainGenConfig) -> WorldConfig:
    """Scenes for text-to-video: every object visible all clip long, wrapping at the edges."""
    return WorldConfig(
        fps=cfg.world_fps,
        late_entry_prob=0.0,
        early_exit_prob=0.0,
        boundary="wrap",
        max_objects=cfg.max_objects,
        qa_per_kind=0,
        object_size=tuple(cfg.object_size),
    )


def sample_batch(cfg: TrainGenConfig, step: int) -> tuple[torch.Tensor, list[str], torch.Tensor]:
    """Clips of step `step`: frames `[B, 3, F, 64, 64]` in [-1, 1], captions, and masks
    `[B, 2, F, 64, 64]`: objects (1 where a pixel shows a palette colour) and, with
    `cfg.shape_weight`, where their shapes differ from the other shapes (else 0).

    Seeds depend only on (`cfg.seed`, `step`), so a resumed run sees the same data.
    """
    rng = np.random.default_rng((cfg.seed, step))
    world = world_config(cfg)
    frames, captions, objects = [], [], []
    for seed in rng.integers(0, 2**31, size=cfg.batch_size):
        clip = make_clip(int(seed), cfg.num_frames, world)
        frames.append(torch.from_numpy(clip.frames))
        mask = object_pixels(clip.frames)
        differ = np.zeros_like(mask)
        if cfg.shape_weight:
            differ = shape_difference(clip.scene, cfg.num_frames, mask.shape[-1])
        objects.append(torch.from_numpy(np.stack([mask, differ])))
        drop = rng.random() < cfg.caption_dropout
        captions.append("" if drop else clip.caption)
    x = torch.stack(frames).permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0
    return x, captions, torch.stack(objects).float()


def object_pixels(frames: np.ndarray) -> np.ndarray:
    """`[..., H, W]` True where a pixel of `frames` `[..., H, W, 3]` shows a palette colour
    (the objects; backgrounds are grey)."""
    palette = np.array([_pack(np.asarray(c)) for c in COLORS.values()])
    return np.isin(_pack(frames), palette)


def _pack(rgb: np.ndarray) -> np.ndarray:
    rgb = rgb.astype(np.int64)
    return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]


def sample_sigmas(cfg: TrainGenConfig, batch: int, gen: torch.Generator) -> torch.Tensor:
    """Per-frame noise levels `[B, F]`, constant within a chunk; 0 marks clean context.

    Any chunk, the first included, is clean with probability `clean_prob`; every clip
    keeps at least one noisy chunk (its last, if the draw left none).
    """
    chunks = cfg.num_frames // cfg.chunk_frames
    u = torch.rand(batch, chunks, generator=gen)
    s = cfg.sigma_shift
    sigma = s * u / (1 + (s - 1) * u)
    clean = torch.rand(batch, chunks, generator=gen) < cfg.clean_prob
    clean[clean.all(dim=1), -1] = False
    sigma = sigma.masked_fill(clean, 0.0)
    frames = sigma.repeat_interleave(cfg.chunk_frames, dim=1)
    if cfg.progressive_prob <= 0:
        return frames
    # Progressive chunks (`TrainGenConfig.progressive_prob`), frame j of C.
    rising = (torch.rand(batch, chunks, generator=gen) < cfg.progressive_prob) & ~clean
    lag = torch.rand(batch, chunks, generator=gen) * cfg.progressive_lag
    top = cfg.chunk_frames - 1
    start = torch.rand(batch, chunks, generator=gen) * (1 + top * lag) - top * lag
    j = torch.arange(cfg.chunk_frames, dtype=torch.float32)
    ramp = (start[..., None] + lag[..., None] * j).clamp(0.0, 1.0).flatten(1)
    return torch.where(rising.repeat_interleave(cfg.chunk_frames, dim=1), ramp, frames)


def sample_noise(
    cfg: TrainGenConfig, shape: tuple[int, ...], captions: list[str], gen: torch.Generator
) -> torch.Tensor:
    """Noise `[B, C, F, h, w]`: independent, or (with `drift_prob`) drifting along the
    caption's direction exactly as a stream's `DriftingNoise` draws it."""
    eps = torch.randn(shape, generator=gen)
    if cfg.drift_prob <= 0:
        return eps
    drifting = torch.rand(len(captions), generator=gen) < cfg.drift_prob
    for b, caption in enumerate(captions):
        if drifting[b]:
            noise = DriftingNoise(cfg.noise_drift, None, lambda s: torch.randn(s, generator=gen))
            noise.set_prompt(caption)
            if noise.direction is not None:
                eps[b] = noise.chunk((1, *shape[1:]))[0]
    return eps
