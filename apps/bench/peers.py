"""`streamrt bench peers`: streamrt against diffusers' own long-video pipelines, with the
same tiny random weights (built in the run, nothing downloaded).

Every method gets one Wan transformer (4 layers x 4 heads x 32, 16 latent channels, patch
1x2x2), diffusers' test-size `AutoencoderKLWan` (8x spatial, 4x temporal compression), the
same prompt embeddings, 64x64 frames and 4 denoising steps:

    streamrt      `GenEngine` chunk-wise: 5 latent frames per chunk through the KV cache
                  (a window of 25 latent frames, the peers' own context), frames decoded
                  and handed out chunk by chunk
    wan           diffusers `WanPipeline`: the whole video at once (full attention)
    df sync       diffusers `SkyReelsV2DiffusionForcingPipeline`, ar_step 0: windows of 97
                  frames, each re-denoising a 17-frame overlap of history (the sliding-
                  window long-video mode; no KV cache)
    df async      the same with ar_step 5, causal_block_size 5 (chunk-wise diffusion
                  forcing, no KV cache)

Each run is its own process (`spawn`), one after another, interleaved by length, so its
peak memory is its own: reported as the resident-set peak above the process's size
before the run. ms per frame and time to first frame (the peers hand out nothing before
their last window is decoded); the growth exponent is the slope of log(time) against
log(frames) from the shortest to the longest length. Also the streamrt forward's achieved
GFLOP/s (FLOPs counted by `torch.utils.flop_counter`) as a share of this CPU's measured
float32 matmul throughput.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import resource
import time
from typing import Any

import torch

from streamrt.apps.bench import print_table, write_json
from streamrt.apps.bench.flops import (
    SQUARE,
    count_cpu_flash_attention,
    matmul_peak_gflops,
    model_widths,
)

PROMPT = "a red circle moving right on a dark background"
METHODS = ("streamrt", "wan", "df sync", "df async")
SIZE = 64
STEPS = 4
CHUNK = 5  # latent frames per streamrt chunk and per async causal block
BASE_FRAMES = 97  # the peers' window (25 latent frames)
OVERLAP = 17  # frames of history a window re-denoises (SkyReels-V2's recommended value)
AIMS = {
    "per frame vs df sync": 0.7,
    "per frame vs df async": 0.25,
    "first frame s": 0.2,
    "forward share of matmul peak": 0.7,
}


def tiny_parts(seed: int = 0):
    """The shared transformer, text encoder and VAE (deterministic for `seed`)."""
    from streamrt.apps.bench.decode import small_wan_vae
    from streamrt.models.generator_files import tiny_random_parts
    from streamrt.world import VOCAB

    transformer, text, _ = tiny_random_parts(
        VOCAB,
        seed=seed,
        num_layers=4,
        num_attention_heads=4,
        attention_head_dim=32,
        ffn_dim=256,
        in_channels=16,
        out_channels=16,
        patch_size=(1, 2, 2),
        rope_max_seq_len=1024,  # Wan's own: the whole-video peer holds 255 latent frames
    )
    return transformer, text, small_wan_vae(seed + 1)


def _components(text, transformer, vae) -> dict:
    """A diffusers Wan-family pipeline's parts: the shared weights, Wan's UniPC scheduler."""
    from diffusers import UniPCMultistepScheduler

    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=5.0
    )
    return {
        "tokenizer": text.tokenizer,
        "text_encoder": text.model,
        "transformer": transformer,
        "vae": vae,
        "scheduler": scheduler,
    }


def _streamrt(parts, frames: int, compile_mode: str = "off") -> tuple[float, float]:
    from streamrt.config import GenConfig
    from streamrt.gen.decoding import stream_frames
    from streamrt.gen.engine import GenEngine
    from streamrt.models.codec import WanVAECodec

    transformer, text, vae = parts
    cfg = GenConfig(
        height=SIZE,
        width=SIZE,
        chunk_frames=CHUNK,
        timesteps=[1000, 750, 500, 250][:STEPS],
        policy="sink_window",
        policy_args={"sink_blocks": 0, "window_blocks": (BASE_FRAMES + 3) // 4},
        compile=compile_mode,
    )
    engine = GenEngine(transformer, text, WanVAECodec(vae), cfg)
    stream = engine.open_stream(PROMPT, cfg)
    t0 = time.perf_counter()
    first, count = None, 0
    with torch.no_grad():
        for _frame in stream_frames(stream, frames):
            first = first or time.perf_counter() - t0
            count += 1
    stream.close()
    assert count == frames, (count, frames)
    return time.perf_counter() - t0, first


def _peer(method: str, parts, frames: int) -> tuple[float, float]:
    from diffusers import SkyReelsV2DiffusionForcingPipeline, WanPipeline

    transformer, text, vae = parts
    embeds = text.encode([PROMPT])
    common = dict(
        height=SIZE,
        width=SIZE,
        num_frames=frames,
        num_inference_steps=STEPS,
        guidance_scale=1.0,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    )
    if method == "wan":
        pipe = WanPipeline(**_components(text, transformer, vae))
        run = lambda: pipe(prompt_embeds=embeds, **common)  # noqa: E731
    else:
        sky = _skyreels_transformer(transformer)
        pipe = SkyReelsV2DiffusionForcingPipeline(**_components(text, sky, vae))
        asynchronous = method == "df async"
        run = lambda: pipe(  # noqa: E731
            None,
            prompt_embeds=embeds,
            base_num_frames=min(BASE_FRAMES, frames),
            overlap_history=OVERLAP if frames > BASE_FRAMES else None,
            ar_step=CHUNK if asynchronous else 0,
            causal_block_size=CHUNK if asynchronous else None,
            **common,
        )
    pipe.set_progress_bar_config(disable=True)
    t0 = time.perf_counter()
    out = run().frames[0]
    total = time.perf_counter() - t0
    assert len(out) >= frames, (method, len(out), frames)
    return total, total  # nothing is handed out before the whole video is decoded


def _skyreels_transformer(wan: torch.nn.Module) -> torch.nn.Module:
    """`SkyReelsV2Transformer3DModel` with the Wan transformer's weights (same names)."""
    import inspect

    from diffusers import SkyReelsV2Transformer3DModel

    names = inspect.signature(SkyReelsV2Transformer3DModel.__init__).parameters
    sky = SkyReelsV2Transformer3DModel(**{k: v for k, v in wan.config.items() if k in names})
    sky.load_state_dict(wan.state_dict(), strict=True)
    return sky.eval()


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _one(method: str, frames: int, threads: int, compile_mode: str = "off") -> dict[str, float]:
    """One measurement, in its own process."""
    torch.set_num_threads(threads)
    parts = tiny_parts()
    before = _rss_mb()
    if method == "streamrt":
        _streamrt(parts, min(frames, 2 * CHUNK * 4), compile_mode)  # warm-up, same process
    total, first = (
        _streamrt(parts, frames, compile_mode)
        if method == "streamrt"
        else _peer(method, parts, frames)
    )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"total s": total, "first frame s": first, "peak MB": max(0.0, peak - before)}


def forward_gflops(
    threads: int, chunks: int = 8, compile_mode: str = "off", model: str | None = None
) -> tuple[float, float, float]:
    """Achieved GFLOP/s of streamrt's forwards on a stream, the FLOPs of one chunk, and this
    CPU's matmul peak for the model's widths: of the peers' shared model, or of the
    generator directory `model` (or `tiny-random`) at its own settings."""
    from torch.utils.flop_counter import FlopCounterMode

    from streamrt.apps.generate import load_generator
    from streamrt.config import GenConfig
    from streamrt.gen.engine import GenEngine
    from streamrt.models.codec import WanVAECodec

    torch.set_num_threads(threads)
    if model is None:
        transformer, text, vae = tiny_parts()
    else:
        engine = load_generator(model, None, {}).engine
        transformer = engine.transformer

    def warm_stream(mode: str):
        if model is None:
            cfg = GenConfig(height=SIZE, width=SIZE, chunk_frames=CHUNK, compile=mode)
            stream = GenEngine(transformer, text, WanVAECodec(vae), cfg).open_stream(PROMPT, cfg)
        else:
            stream = engine.open_stream(PROMPT, compile=mode)
        # the window fills (and a compiled forward's graphs are built)
        for _ in range(4 if model is None else 6):
            stream.next_latents()
        return stream

    count_cpu_flash_attention()
    with torch.no_grad():
        stream = warm_stream("off")
        counter = FlopCounterMode(display=False)  # counted eager: the same FLOPs compiled
        with counter:
            stream.next_latents()
        flops = counter.get_total_flops()
        if compile_mode != "off":
            stream.close()
            stream = warm_stream(compile_mode)
        t0 = time.perf_counter()
        for _ in range(chunks):
            stream.next_latents()
        seconds = (time.perf_counter() - t0) / chunks
    stream.close()
    return flops / seconds / 1e9, flops, matmul_peak_gflops(threads, *model_widths(transformer))


def _exponent(points: list[tuple[int, float]]) -> float | None:
    if len(points) < 2:
        return None
    (f0, t0), (f1, t1) = points[0], points[-1]
    return math.log(t1 / t0) / math.log(f1 / f0)


def bench_peers(args: argparse.Namespace) -> int:
    from streamrt.errors import InputError

    if min(args.lengths) < 4 * CHUNK - 3:
        raise InputError(
            f"--lengths must be >= {4 * CHUNK - 3} frames: the async peer needs one causal "
            f"block of {CHUNK} latent frames"
        )
    ctx = multiprocessing.get_context("spawn")
    rows, payload = [], {"lengths": args.lengths, "threads": args.thread_counts, "rows": []}
    for threads in args.thread_counts:
        results: dict[tuple[str, int], dict[str, float]] = {}
        for frames in args.lengths:
            for method in METHODS:
                print(f"  {threads} thread(s), {frames} frames: {method}", flush=True)
                best = None
                for _ in range(args.repeats):
                    with ctx.Pool(1, maxtasksperchild=1) as pool:
                        m = pool.apply(_one, (method, frames, threads, args.compile))
                    best = m if best is None or m["total s"] < best["total s"] else best
                results[method, frames] = best
        for frames in args.lengths:
            ours = results["streamrt", frames]
            row: dict[str, Any] = {"threads": threads, "frames": frames}
            for method in METHODS:
                row[method] = results[method, frames]["total s"] / frames * 1e3
            for method in METHODS[1:]:
                row[f"/ {method}"] = ours["total s"] / results[method, frames]["total s"]
            row["first frame s"] = ours["first frame s"]
            row["df sync first s"] = results["df sync", frames]["first frame s"]
            row.update({f"{m} MB": results[m, frames]["peak MB"] for m in METHODS})
            rows.append(row)
        for method in METHODS:
            pts = [(f, results[method, f]["total s"]) for f in args.lengths]
            payload.setdefault("growth exponent", {})[f"{method}, {threads} thread(s)"] = _exponent(
                pts
            )
    keys = ["threads", "frames"]
    if args.compile != "off":
        print(f"streamrt runs with gen.compile={args.compile}")
    print_table(
        "ms per frame (streamrt / a peer: the ratio of their times; aims: <= "
        f"{AIMS['per frame vs df sync']} of df sync, <= {AIMS['per frame vs df async']} of "
        "df async)",
        rows,
        [*keys, *METHODS, *[f"/ {m}" for m in METHODS[1:]]],
    )
    print_table(
        f"time to first frame, s (aim <= {AIMS['first frame s']} s; the peers hand out "
        "nothing before the whole video is decoded) and peak resident memory above the "
        "process's start, MB",
        rows,
        [*keys, "first frame s", "df sync first s", *[f"{m} MB" for m in METHODS]],
    )
    growth = [
        {"method, threads": k, "time ~ frames^": v} for k, v in payload["growth exponent"].items()
    ]
    print_table("growth of total time with length (1.0 = linear)", growth, list(growth[0]))
    util = []
    for threads in args.thread_counts:
        for name, model in (("peers' model", None), (args.model, args.model)):
            with ctx.Pool(1, maxtasksperchild=1) as pool:
                achieved, flops, peak = pool.apply(
                    forward_gflops, (threads, 8 if model is None else 16, args.compile, model)
                )
            util.append(
                {
                    "threads": threads,
                    "model": name,
                    "matmul peak GFLOP/s": peak,
                    "streamrt forwards GFLOP/s": achieved,
                    "share": achieved / peak,
                    "GFLOP per chunk": flops / 1e9,
                }
            )
    print_table(
        f"streamrt's forwards against this CPU's matmul peak (aim >= "
        f"{AIMS['forward share of matmul peak']:.0%}; the peak is the best of a "
        f"{SQUARE}-cube product and the models' own product shapes)",
        util,
        list(util[0]),
    )
    payload.update(rows=rows, utilisation=util, aims=AIMS, compile=args.compile)
    write_json(args.json, payload)
    return 0
