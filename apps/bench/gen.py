"""`streamrt bench gen`: streaming generation speed against baselines measured in the same run.

rolling cache vs recompute   per chunk, the no-cache baseline re-runs the model over the
                             kept window (clean, t=0) plus the new chunk at every step
stream batch vs sequential   the same denoising work batched across chunks in flight
frame 20k vs frame 200       per-chunk cost late in an endless stream vs early
decode                       Wan VAE decode vs diffusers', overlapped vs sequential decode
                             (`streamrt.apps.bench.decode`)
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from typing import Any

import numpy as np
import torch

from streamrt.apps.arguments import parse_size
from streamrt.apps.bench import print_table, write_json
from streamrt.config import GenConfig


def _generator(args: argparse.Namespace, **overrides: Any):
    from streamrt.apps.generate import load_generator

    base = {
        "policy": "sink_window",
        "policy_args": {"sink_blocks": 3, "window_blocks": args.window - 3},
    }
    return load_generator(args.model, args.config, {**base, **overrides})


def _time_chunks(stream, n: int) -> list[float]:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        stream.next_latents()
        times.append(time.perf_counter() - t0)
    return times


def _cached(args: argparse.Namespace) -> dict[str, Any]:
    # FPS and first frame with the model's own settings (what `streamrt generate` runs);
    # the comparisons below use the --window cache.
    from streamrt.apps.generate import load_generator

    gen = load_generator(args.model, args.config, {})
    cfg = gen.engine.config
    say = f"{cfg.policy} {cfg.policy_args}, {len(cfg.timesteps)} steps, renoise {cfg.renoise}"
    t0 = time.perf_counter()
    stream = gen.engine.open_stream("a red circle moving right on a dark background", cfg)
    first = stream.next_frames()
    ttff = time.perf_counter() - t0
    times = _time_chunks(stream, args.chunks)  # window is full after the first few chunks
    per_frame = np.array(times) / cfg.chunk_frames
    t1 = time.perf_counter()
    frames = sum(len(stream.next_frames()) for _ in range(args.chunks))
    fps = frames / (time.perf_counter() - t1)
    stream.close()
    return {
        "settings": say,
        "ttff": ttff,
        "fps": fps,
        "p50": np.percentile(per_frame, 50),
        "p99": np.percentile(per_frame, 99),
        "first": first,
    }


def _window_chunk_seconds(gen) -> float:
    """Median seconds per chunk through the cache with the --window policy, window full."""
    cfg = gen.engine.config
    stream = gen.engine.open_stream("a red circle moving right on a dark background", cfg)
    _time_chunks(stream, cfg.policy_args["window_blocks"] // cfg.chunk_frames + 2)
    seconds = float(np.median(_time_chunks(stream, 5)))
    stream.close()
    return seconds


def _recompute_chunk_seconds(gen, args: argparse.Namespace) -> float:
    """No KV cache: every step re-runs the model over [window frames (t=0) | chunk (t)]."""
    from streamrt.models.wan import apply_block_causal

    engine = gen.engine
    cfg = engine.config
    model = engine.transformer
    c, h, w = engine.latent_shape(cfg.height, cfg.width)
    f = cfg.chunk_frames
    window = args.window - f
    p = model.config.patch_size
    tpf = (h // p[1]) * (w // p[2])
    chunk_of = torch.cat(
        [torch.zeros(window * tpf, dtype=torch.long), torch.ones(f * tpf, dtype=torch.long)]
    )
    mask = chunk_of[:, None] >= chunk_of[None, :]  # block-causal: the window never sees the chunk

    saved = dict(model.attn_processors)
    apply_block_causal(model, mask)
    x = torch.randn(1, c, window + f, h, w)
    text = engine.encode_prompt("a red circle moving right on a dark background")
    steps = len(cfg.timesteps)
    t = torch.zeros(1, (window + f) * tpf)
    try:
        with torch.no_grad():
            model(x, t, text, return_dict=False)  # warm-up
            times = []
            for _ in range(args.chunks):
                t0 = time.perf_counter()
                for _ in range(steps):
                    model(x, t, text, return_dict=False)
                times.append(time.perf_counter() - t0)
    finally:
        model.set_attn_processor(saved)
    return float(np.median(times))


def _flop_ratio(cfg: GenConfig, window: int) -> float:
    """Token-linear work of recompute over cached per chunk (attention cost aside)."""
    f, steps = cfg.chunk_frames, len(cfg.timesteps)
    cached = (steps + (1 if cfg.clean_refresh else 0)) * f
    return steps * (window) / cached


def _batch_vs_sequential(args: argparse.Namespace, cfg: GenConfig) -> tuple[float, float]:
    # Stream batch keeps a chunk per step in flight: the window must hold them all plus
    # one finished chunk of context; both samplers run with that same window.
    in_flight = cfg.chunk_frames * len(cfg.timesteps)
    window = max(args.window - 3, in_flight + cfg.chunk_frames)
    pargs = {"sink_blocks": 3, "window_blocks": window}
    out = []
    for sampler in ("chunkwise", "stream_batch"):
        gen = _generator(args, sampler=sampler, clean_refresh=False, policy_args=pargs)
        stream = gen.engine.open_stream(
            "a red circle moving right on a dark background", gen.engine.config
        )
        _time_chunks(stream, len(gen.engine.config.timesteps) + 2)  # warm-up fills the window
        out.append(float(np.median(_time_chunks(stream, args.chunks))))
        stream.close()
    return out[0], out[1]


def _late_vs_early(args: argparse.Namespace) -> tuple[float, float]:
    # Reaching frame 20,000 means generating every frame before it; a smaller frame keeps
    # that affordable here. The early stream is opened once the late one is there, and
    # their chunks are timed in turns: minutes apart, this machine's drift alone moved the
    # ratio by 20 %.
    w, h = parse_size(args.long_size, "--long-size")
    gen = _generator(args, width=w, height=h)
    cfg = gen.engine.config
    prompt = "a red circle moving right on a dark background"
    late_stream = gen.engine.open_stream(prompt, cfg)
    while late_stream.seqs[0].next_index < args.long_frames:
        late_stream.next_latents()
    early_stream = gen.engine.open_stream(prompt, cfg)
    while early_stream.seqs[0].next_index < 200:
        early_stream.next_latents()
    early, late = [], []
    for _ in range(args.chunks):
        early += _time_chunks(early_stream, 1)
        late += _time_chunks(late_stream, 1)
    early_stream.close()
    late_stream.close()
    return float(np.median(early)), float(np.median(late))


def bench_gen(args: argparse.Namespace) -> int:
    from rich.console import Console

    say = Console(stderr=True).print
    torch.manual_seed(0)
    cached = _cached(args)
    say(f"cached: {cached['fps']:.1f} fps, first frame {cached['ttff']:.2f} s")
    gen = _generator(args)
    cfg = gen.engine.config
    chunk_s = _window_chunk_seconds(gen)
    recompute = _recompute_chunk_seconds(gen, args)
    speedup = recompute / chunk_s
    flops = _flop_ratio(cfg, args.window)
    say(f"recompute: {recompute * 1e3:.1f} ms/chunk vs cached {chunk_s * 1e3:.1f} ms")
    seq_s, batch_s = _batch_vs_sequential(args, cfg)
    say(f"sequential {seq_s * 1e3:.1f} ms/chunk, stream batch {batch_s * 1e3:.1f} ms/chunk")
    early, late = _late_vs_early(args)
    say(
        f"frame 200: {early * 1e3:.1f} ms/chunk, frame {args.long_frames}: {late * 1e3:.1f} ms/chunk"
    )
    from streamrt.apps.bench.decode import decode_rows
    from streamrt.apps.generate import load_generator

    decoding = decode_rows(load_generator(args.model, args.config, {}))
    say(f"Wan VAE decode {decoding[0]['value']:.2f} ms/frame, {decoding[0]['aim']}")
    rows = [
        {"measure": f"FPS ({cached['settings']})", "value": cached["fps"], "aim": ">= 30"},
        {"measure": "time to first frame (s)", "value": cached["ttff"], "aim": "<= 0.3"},
        {
            "measure": "per-frame p50 / p99 (ms)",
            "value": f"{cached['p50'] * 1e3:.1f} / {cached['p99'] * 1e3:.1f}",
        },
        {
            "measure": "cache vs recompute speedup",
            "value": speedup,
            "aim": f">= {0.8 * flops:.2f} (0.8 x FLOP ratio {flops:.2f})",
        },
        {"measure": "stream batch vs sequential", "value": seq_s / batch_s, "aim": ">= 1.3"},
        {
            "measure": f"cost at frame {args.long_frames} / frame 200",
            "value": late / early,
            "aim": "<= 1.05",
        },
        *decoding,
    ]
    device = str(gen.engine.device) + (
        f" ({torch.cuda.get_device_name()})" if gen.engine.device.type == "cuda" else ""
    )
    print_table(
        f"bench gen: {args.model} {cfg.width}x{cfg.height}, chunk {cfg.chunk_frames}, "
        f"{len(cfg.timesteps)} steps, window {args.window}, {device}",
        rows,
        ["measure", "value", "aim"],
    )
    write_json(
        args.json,
        {
            "suite": "gen",
            "model": args.model,
            "device": device,
            "config": dataclasses.asdict(cfg),
            "window": args.window,
            "rows": [
                {k: (float(v) if isinstance(v, np.floating) else v) for k, v in r.items()}
                for r in rows
            ],
        },
    )
    return 0
