"""Exporting a training run of the tiny generator (`train_gen.py`) as a generator directory:
its stream settings (the defaults matching training, a tuned manifest's, or those of the
run's `--init-from`), the averaged weights, and the loss curve."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from diffusers.models.transformers.transformer_wan import WanAttnProcessor

from streamrt.config import CacheConfig, GenConfig
from streamrt.gen.schedule import even_timesteps

if TYPE_CHECKING:
    from streamrt.models.train_gen import TrainGenConfig, TrainState


def default_gen_config(cfg: TrainGenConfig, **overrides: Any) -> GenConfig:
    """Stream settings matching training: chunks of `chunk_frames`, a sliding window of
    `num_frames` frames (the longest context seen in training), no attention sink."""
    base = GenConfig(
        chunk_frames=cfg.chunk_frames,
        fps=8,  # played at 8 fps, shapes trained at world_fps 4 move twice the captioned pace
        policy="sink_window",
        policy_args={"sink_blocks": 0, "window_blocks": cfg.num_frames},
        renoise="predicted",  # not distilled: the deterministic step (module docstring)
        timesteps=even_timesteps(12),
        noise_drift=cfg.noise_drift if cfg.drift_prob > 0 else 0.0,
    )
    return dataclasses.replace(base, **overrides)


def inherited_settings(cfg: TrainGenConfig) -> dict[str, Any] | None:
    """The stream settings of `cfg.init_from`'s manifest, its drift speed aside (the run's
    own, in its latent pixels): a run started from a tuned generator exports with its
    sampler, not the untuned default. None without `init_from` or a readable manifest."""
    from streamrt.gen.generator import MANIFEST

    if not cfg.init_from:
        return None
    try:
        saved = json.loads((Path(cfg.init_from) / MANIFEST).read_text()).get("gen", {})
    except (OSError, ValueError):
        return None
    saved = {k: v for k, v in saved.items() if k != "noise_drift"}
    return saved or None


def export_generator(
    state: TrainState,
    output: str | Path,
    gen_config: GenConfig | None = None,
    inherit: dict[str, Any] | None = None,
) -> None:
    """Write the averaged weights as a generator directory (`StreamGenerator.save_pretrained`).

    Without `gen_config`: an existing manifest's `gen` settings are kept (they are tuned
    after training); with none, `inherit`'s (`inherited_settings`) override the defaults.
    """
    from streamrt.gen.engine import GenEngine
    from streamrt.gen.generator import MANIFEST, StreamGenerator

    output = Path(output)
    if gen_config is None:
        gen_config = default_gen_config(state.cfg)
        manifest = output / MANIFEST
        if manifest.exists():
            saved = json.loads(manifest.read_text()).get("gen", {})
            gen_config = dataclasses.replace(gen_config, **saved)
        elif inherit:
            gen_config = dataclasses.replace(gen_config, **inherit)
    transformer = copy.deepcopy(state.transformer)
    text_encoder = copy.deepcopy(state.text_encoder)
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            p.copy_(state.ema["transformer." + name])
        for name, p in text_encoder.model.named_parameters():
            p.copy_(state.ema["text." + name])

    transformer.set_attn_processor(WanAttnProcessor())
    engine = GenEngine(
        transformer, text_encoder, state.codec, gen_config, cache_config=small_cache()
    )
    StreamGenerator(engine).save_pretrained(output)


def small_cache() -> CacheConfig:
    """Cache budgets for a tiny model at 64x64 (one block is 256 KiB)."""
    return CacheConfig(device_bytes="64MiB", host_bytes="4MiB", device="cpu")


def plot_losses(losses: list[float], path: Path, size: tuple[int, int] = (720, 420)) -> None:
    """Loss per step (grey) and its running average (blue) on a log axis, drawn with OpenCV."""
    import cv2

    if not losses:
        return
    w, h = size
    left, right, top, bottom = 70, 20, 30, 45
    img = np.full((h, w, 3), 255, np.uint8)
    y = np.log10(np.maximum(np.asarray(losses, dtype=np.float64), 1e-6))
    k = max(1, len(y) // 40)  # trailing mean over 2.5 % of the run
    csum = np.concatenate([[0.0], np.cumsum(y)])
    lo_idx = np.maximum(0, np.arange(len(y)) - k + 1)
    smooth = (csum[1:] - csum[lo_idx]) / (np.arange(len(y)) + 1 - lo_idx)
    lo, hi = math.floor(y.min() * 4) / 4, math.ceil(y.max() * 4) / 4
    hi = max(hi, lo + 0.25)

    def to_px(i: np.ndarray, v: np.ndarray) -> np.ndarray:
        px = left + (w - left - right) * i / max(1, len(y) - 1)
        py = top + (h - top - bottom) * (hi - v) / (hi - lo)
        return np.stack([px, py], axis=1).astype(np.int32)

    idx = np.arange(len(y))
    font = cv2.FONT_HERSHEY_SIMPLEX
    for tick in np.arange(lo, hi + 1e-9, 0.25):
        py = int(to_px(np.array([0]), np.array([tick]))[0, 1])
        cv2.line(img, (left, py), (w - right, py), (225, 225, 225), 1)
        cv2.putText(img, f"{10**tick:.3g}", (5, py + 4), font, 0.4, (60, 60, 60), 1)
    for frac in np.linspace(0, 1, 6):
        px = int(left + (w - left - right) * frac)
        cv2.putText(img, f"{round(frac * len(y))}", (px - 10, h - 25), font, 0.4, (60, 60, 60))
    cv2.polylines(img, [to_px(idx, y)], False, (200, 200, 200), 1, cv2.LINE_AA)
    cv2.polylines(img, [to_px(idx, smooth)], False, (200, 90, 20), 2, cv2.LINE_AA)
    cv2.rectangle(img, (left, top), (w - right, h - bottom), (0, 0, 0), 1)
    last = min(len(losses), 100)
    final = float(np.mean(losses[-last:]))
    title = f"flow-matching loss per step (mean of the last {last}: {final:.4f})"
    cv2.putText(img, title, (left, 20), font, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
    cv2.putText(img, "step", (w // 2, h - 8), font, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), img)
