"""Scoring the trained tiny generator: rollouts through the real engine, prompt scores, and
the sampler sweep whose winner `streamrt train gen --tune-only` writes into the manifest.

Kept apart from `train_gen.py` (the training loop) so each file reads on its own.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from streamrt.gen.schedule import even_timesteps
from streamrt.metrics import adherence, color_mask, shape_share
from streamrt.models.train_gen import TrainGenConfig, world_config
from streamrt.models.train_gen_export import small_cache
from streamrt.world import make_clip, parse_caption, render_background

EVAL_PROMPTS: tuple[str, ...] = (
    "a red circle moving right on a dark background",
    "a blue square moving up on a light background",
    "a green triangle moving left on a striped background",
    "a yellow circle moving down on a checkered background",
    "an orange square moving right on a light background",
    "a purple triangle moving up on a dark background",
    "a cyan circle moving left on a dark background",
    "a red square moving down on a striped background",
)
"""One object each: every colour, direction, shape and background at least once."""

EVAL_SEEDS: tuple[int, ...] = (0, 1, 2)
"""Stream seeds of the scores the tests and TRAINING.md report (24 rollouts)."""
TUNE_SEEDS: tuple[int, ...] = (10, 11, 12)
"""Stream seeds `tune_sampler` picks settings on: not the reported ones."""


def colour_mask(frames: np.ndarray, color: str, tol: float = 60.0) -> np.ndarray:
    """`[T, H, W]` bool: pixels within RGB distance `tol` of the palette colour `color`,
    opened with a 3x3 square so isolated specks (noise) do not count."""
    import cv2

    near = color_mask(frames, color, tol).astype(np.uint8)
    kernel = np.ones((3, 3), np.uint8)
    return np.stack([cv2.morphologyEx(m, cv2.MORPH_OPEN, kernel) for m in near]).astype(bool)


def prompt_scores(frames: np.ndarray, caption: str, min_pixels: int = 12) -> dict[str, float]:
    """How well `frames` `[T, H, W, 3]` show the caption's first object.

    present: fraction of frames with >= `min_pixels` pixels of its colour.
    area: mean fraction of pixels of its colour (a 9-15 px shape covers 1.5-4 %).
    direction: fraction of consecutive present frames whose colour centroid moves the
        captioned way (circular means, so wrapping at the edge is no jump).
    speed: mean centroid step along the captioned axis, pixels per frame, signed.
    background: distance of the frames' mean colour from the captioned background's,
        mean over RGB, 0..1 (0: right brightness and tint; dark vs light is 0.8).
    shape: share of the frames the contour classifier (`streamrt.metrics.classify_shapes`)
        answers for its colour that show the captioned shape (0 if it answers on none).
    """
    description = parse_caption(caption)
    obj = description.objects[0]
    mask = colour_mask(frames, obj.color)
    t, h, w = mask.shape
    counts = mask.reshape(t, -1).sum(axis=1)
    present = counts >= min_pixels
    horizontal = obj.direction in ("left", "right")
    sign = 1.0 if obj.direction in ("right", "down") else -1.0
    extent = w if horizontal else h
    profiles = mask.sum(axis=1 if horizontal else 2)  # [T, extent]: pixels per column / row
    angles = np.arange(extent) * 2 * np.pi / extent
    centre = np.arctan2(profiles @ np.sin(angles), profiles @ np.cos(angles)) * extent / (2 * np.pi)
    both = present[1:] & present[:-1]
    steps = ((np.diff(centre) + extent / 2) % extent - extent / 2)[both] * sign
    background = render_background(description.background, h, w).reshape(-1, 3).mean(axis=0)
    tint = frames.reshape(-1, 3).mean(axis=0)
    return {
        "present": float(present.mean()),
        "area": float(counts.mean() / (h * w)),
        "direction": float((steps > 0).mean()) if steps.size else 0.0,
        "speed": float(steps.mean()) if steps.size else 0.0,
        "background": float(np.abs(tint - background).mean() / 255.0),
        "shape": shape_share(frames, obj.color, obj.shape),
    }


def score_generator(
    generator,
    prompts: tuple[str, ...] = EVAL_PROMPTS,
    num_frames: int = 48,
    seeds: tuple[int, ...] = EVAL_SEEDS,
    **overrides: Any,
) -> dict[str, float]:
    """Mean `prompt_scores` over `prompts` x `seeds` of `num_frames`-frame streams; "score"
    is the mean of present * direction (colour shown and moving the captioned way) less the
    background error (so specks from strong guidance do not beat a clean frame)."""
    rows = []
    for seed in seeds:
        for prompt in prompts:
            stream = generator.stream(prompt, num_frames=num_frames, seed=seed, **overrides)
            frames = np.stack(list(stream))
            rows.append(
                {**prompt_scores(frames, prompt), "adherence": adherence(frames, prompt)["score"]}
            )
    return _summary(rows)


def _summary(rows: list[dict[str, float]]) -> dict[str, float]:
    out = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
    out["score"] = float(np.mean([r["present"] * r["direction"] for r in rows]))
    out["score"] -= out["background"]
    return out


def reference_scores(prompts: tuple[str, ...] = EVAL_PROMPTS, num_frames: int = 48):
    """`score_generator`'s numbers on the world's own clips (the ceiling of the metric)."""
    world = world_config(TrainGenConfig())
    rows = []
    for i, p in enumerate(prompts):
        frames = make_clip(i, num_frames, world, p).frames
        rows.append({**prompt_scores(frames, p), "adherence": adherence(frames, p)["score"]})
    return _summary(rows)


SWEEP: tuple[dict[str, Any], ...] = (
    *(
        {"renoise": "predicted", "timesteps": even_timesteps(n), "shift": s, "noise_drift": d}
        for n in (4, 8)
        for s in (1.0, 3.0)
        for d in (0.0, 1.0)
    ),
    {"renoise": "fresh", "timesteps": even_timesteps(8), "shift": 3.0},
)
"""First stage of `tune_sampler`: the deterministic step at step count x shift, with and
without drifting noise, and Self-Forcing's fresh re-noise as a control (the model is not
distilled)."""


def tune_sampler(
    path: str | Path,
    prompts: tuple[str, ...] = EVAL_PROMPTS,
    num_frames: int = 48,
    sweep: tuple[dict[str, Any], ...] = SWEEP,
    log: Callable = print,
    seeds: tuple[int, ...] = TUNE_SEEDS,
) -> dict[str, Any]:
    """Pick the stream settings that score best on `prompts` x `seeds` and write them to the
    manifest: the highest adherence (`streamrt.metrics`), ties broken by `score`.

    Stage 1 sweeps `SWEEP`; stage 2 tries other drift speeds, guidance and the attention
    sink on the winner. Returns the chosen overrides (also written into
    `path/streamrt.json`).
    """
    from streamrt.gen.generator import StreamGenerator

    gen = StreamGenerator.from_pretrained(path, cache=small_cache())
    log(f"reference (world clips): {_fmt(reference_scores(prompts, num_frames))}")
    args = gen.engine.config.policy_args
    kept = args.get("sink_blocks", 0) + args["window_blocks"]  # frames seen in training
    # Every candidate starts from the untuned settings, whatever an earlier tuning wrote.
    base = {
        "guidance_scale": 1.0,
        "noise_drift": 0.0,
        "policy_args": {"sink_blocks": 0, "window_blocks": kept},
    }

    def run(settings: dict[str, Any]) -> tuple[float, float]:
        scores = score_generator(gen, prompts, num_frames, seeds, **{**base, **settings})
        log(f"{settings}: {_fmt(scores)}")
        return scores["adherence"], scores["score"]

    best = max(sweep, key=run)
    drifts = [0.5, 1.5] if best.get("noise_drift") else []
    stage2 = [
        best,
        *({**best, "noise_drift": d} for d in drifts),
        {**best, "guidance_scale": 2.0},
        {**best, "policy_args": {"sink_blocks": 3, "window_blocks": kept - 3}},
    ]
    best = {**base, **max(stage2, key=run)}
    StreamGenerator.from_pretrained(path, cache=small_cache(), **best).save_pretrained(path)
    return best


def _fmt(scores: dict[str, float]) -> str:
    return " ".join(f"{k} {v:.3f}" for k, v in scores.items())


ROLLOUT_LENGTHS: tuple[int, ...] = (9, 24, 48, 90)
"""Stream lengths of TRAINING.md's rollout table: 1x the training clip, and the long ones
where a model fed its own output drifts."""


def rollout_table(
    path: str | Path, lengths: tuple[int, ...] = ROLLOUT_LENGTHS, log: Callable = print
) -> dict[int, dict[str, float]]:
    """`score_generator` of the generator directory `path`, with its own settings, on
    `EVAL_PROMPTS` x `EVAL_SEEDS` at each of `lengths` frames."""
    from streamrt.gen.generator import StreamGenerator

    gen = StreamGenerator.from_pretrained(path, cache=small_cache())
    table = {}
    for n in lengths:
        table[n] = score_generator(gen, num_frames=n)
        log(f"{path} {n} frames: {_fmt(table[n])}")
    return table


def contact_sheet(
    paths: dict[str, str | Path],
    out: str | Path,
    runs: tuple[tuple[str, int], ...] = tuple((p, 0) for p in EVAL_PROMPTS[:4]),
    num_frames: int = 90,
    every: int = 10,
    scale: int = 2,
) -> None:
    """A PNG of rollouts: for each (prompt, seed) of `runs`, one row per model of `paths`
    (label -> generator directory) showing every `every`-th frame, `scale`x enlarged."""
    from streamrt.gen.generator import StreamGenerator
    from streamrt.metrics.sheet import draw_sheet, prompt_lines

    gens = {k: StreamGenerator.from_pretrained(p, cache=small_cache()) for k, p in paths.items()}
    rows: list = []
    for prompt, seed in runs:
        for name, gen in gens.items():
            frames = np.stack(list(gen.stream(prompt, num_frames=num_frames, seed=seed)))
            rows.append(([f"{name}, seed {seed}", *prompt_lines(prompt)], frames))
        rows.append(None)
    draw_sheet(rows, out, every=every, scale=scale)


WORD_SWAPS: dict[str, tuple[str, str]] = {
    "shape": ("circle", "square"),
    "colour": ("red", "blue"),
    "direction": ("right", "left"),
    "background": ("dark", "light"),
}
"""One swap per caption word kind: `conditioning` compares the model's output across it."""


def conditioning(
    path: str | Path,
    caption: str = EVAL_PROMPTS[0],
    levels: tuple[float, ...] = (999.0, 750.0, 500.0, 250.0),
    seeds: tuple[int, ...] = (0, 1, 2),
) -> dict[str, dict[float, float]]:
    """How much the caption's words move the transformer's velocity: per word kind and
    timestep, |v(caption with the word swapped) - v(caption)| / |v(caption)| on the same
    input (a 3-frame chunk of noise given that timestep, full attention, no cache),
    averaged over `seeds`. A word the model ignores moves it little whatever
    the training data say (the shipped model: shape 0.01-0.03, colour 0.09-0.43)."""
    import torch

    from streamrt.gen.attention import detach_streaming
    from streamrt.gen.generator import StreamGenerator

    gen = StreamGenerator.from_pretrained(path, cache=small_cache())
    engine = gen.engine
    tr = engine.transformer
    detach_streaming(tr)  # this engine is not streamed again
    cfg = engine.config
    c, h, w = engine.latent_shape(cfg.height, cfg.width)
    swapped = {k: caption.replace(f" {a} ", f" {b} ", 1) for k, (a, b) in WORD_SWAPS.items()}
    if any(text == caption for text in swapped.values()):
        raise ValueError(f"{caption!r} lacks one of the words {WORD_SWAPS}")
    captions = [caption, *swapped.values()]
    with torch.no_grad():
        emb = engine.text_encoder.encode(captions).to(engine.device, engine.dtype)
        out: dict[str, dict[float, float]] = {k: {} for k in WORD_SWAPS}
        for level in levels:
            moved = dict.fromkeys(WORD_SWAPS, 0.0)
            for seed in seeds:
                g = torch.Generator().manual_seed(seed)
                x = torch.randn(1, c, 3, h, w, generator=g).to(engine.device, engine.dtype)
                t = torch.tensor([level], device=engine.device)
                vs = [tr(x, t, emb[i : i + 1], return_dict=False)[0] for i in range(len(captions))]
                for kind, v in zip(WORD_SWAPS, vs[1:]):
                    moved[kind] += float((v - vs[0]).norm() / vs[0].norm()) / len(seeds)
            for kind in WORD_SWAPS:
                out[kind][level] = moved[kind]
    return out


def shape_probe(
    path: str | Path,
    sigmas: tuple[float, ...] = (0.5, 0.25, 0.1),
    seeds: tuple[int, ...] = tuple(range(6)),
    prompts: tuple[str, ...] = EVAL_PROMPTS,
) -> dict[float, dict[str, tuple[int, int]]]:
    """Can the model draw each shape at all? For each world clip of `prompts` x `seeds`
    (3 frames), noise it to each sigma, let the model predict the clean chunk in one step
    (x0 = x_t - sigma v, full attention over the chunk, no context), decode, and classify
    (`classify_shapes`). Returns sigma -> shape -> (frames named right, frames answered).
    The shipped pixel model at 0.5 / 0.25 / 0.1: squares 1 / 11 / 44 of 54, circles 52 /
    51 / 49 of 54 (assets/tiny-world/TRAINING.md): the blob is its precision at mid noise."""
    import torch

    from streamrt.gen.attention import detach_streaming
    from streamrt.gen.generator import StreamGenerator
    from streamrt.metrics import classify_shapes
    from streamrt.models.codec import frames_to_tensor, tensor_to_frames

    gen = StreamGenerator.from_pretrained(path, cache=small_cache())
    engine = gen.engine
    detach_streaming(engine.transformer)  # this engine is not streamed again
    world = world_config(TrainGenConfig(num_frames=3))
    out: dict[float, dict[str, list[int]]] = {}
    with torch.no_grad():
        for sigma in sigmas:
            counts: dict[str, list[int]] = {}
            for seed in seeds:
                for prompt in prompts:
                    clip = make_clip(seed, 3, world, caption=prompt)
                    x0 = engine.codec.encoder().encode(frames_to_tensor(clip.frames))
                    g = torch.Generator().manual_seed(1000 + seed)
                    x_t = (1 - sigma) * x0 + sigma * torch.randn(x0.shape, generator=g)
                    emb = engine.text_encoder.encode([prompt])
                    t = torch.full((1,), sigma * 1000.0)
                    v = engine.transformer(x_t, t, emb, return_dict=False)[0]
                    frames = tensor_to_frames(engine.codec.decoder().decode(x_t - sigma * v))
                    desc = parse_caption(prompt).objects[0]
                    c = counts.setdefault(desc.shape, [0, 0])
                    for label in classify_shapes(frames, desc.color):
                        if label is not None:
                            c[1] += 1
                            c[0] += int(label == desc.shape)
            out[sigma] = {k: (v[0], v[1]) for k, v in counts.items()}
    return out
