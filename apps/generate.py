"""`streamrt generate`: a prompt to an H.264 video, with a live progress bar."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from streamrt.apps.arguments import (
    add_compile_argument,
    add_rebalance_argument,
    compile_overrides,
    count,
    finite,
    parse_size,
    size,
)
from streamrt.embedded import ASSET_DIRS, GEN_MODEL, resolve_model
from streamrt.errors import InputError

console = Console(stderr=True, soft_wrap=True)
TINY_RANDOM = "tiny-random"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt", required=True)
    p.add_argument("--frames", type=count(1), default=48, help="frames to write (default 48)")
    p.add_argument(
        "-o", "--output", type=output, default="out.mp4", help="file (.mp4) or rtmp:// URL"
    )
    p.add_argument(
        "--model",
        default=GEN_MODEL,
        help=f"generator directory (default {GEN_MODEL}); '{TINY_RANDOM}' builds an "
        "untrained tiny model for smoke tests",
    )
    p.add_argument(
        "--checkpoint",
        help="causal generator weights (.pt/.safetensors) replacing the model's transformer",
    )
    p.add_argument("--config", help="YAML preset (configs/*.yaml) filling the gen: section")
    p.add_argument("--policy", help="cache policy (full, sink_window, deep_sink, ema_sink, ...)")
    p.add_argument("--policy-args", help="e.g. sink_blocks=3,window_blocks=18")
    p.add_argument("--sampler", choices=["chunkwise", "rolling", "stream_batch"])
    p.add_argument(
        "--steps", type=count(1), help="denoising steps (timesteps evenly spaced from 1000)"
    )
    p.add_argument("--seed", type=int)
    p.add_argument("--size", type=size, help="WIDTHxHEIGHT in pixels")
    p.add_argument("--noise-drift", type=finite, help="latent pixels/frame of drifting noise")
    p.add_argument(
        "--parallel",
        choices=["steps", "layers"],
        help="under `torchrun --nproc_per_node=N -m streamrt.apps.cli generate ...` (the "
        "last rank writes): steps: the denoising-step pipeline (consecutive steps per rank, "
        "each with its own KV cache; timestep forcing); layers: the layer pipeline (a range "
        "of transformer blocks per rank, any sampler; stream_batch keeps every rank busy)",
    )
    p.add_argument(
        "--balance",
        action="store_true",
        help="--parallel layers: place the block ranges from measured per-block times",
    )
    add_rebalance_argument(p)
    add_compile_argument(p)


def overrides_from(args: argparse.Namespace) -> dict[str, Any]:
    from streamrt.gen.schedule import even_timesteps

    out: dict[str, Any] = {}
    if args.policy:
        out["policy"] = args.policy
    if args.policy_args:
        out["policy_args"] = parse_kv(args.policy_args)
    if args.sampler:
        out["sampler"] = args.sampler
    if args.steps is not None:
        if args.steps < 1:
            raise InputError(f"--steps must be >= 1, got {args.steps}")
        out["timesteps"] = even_timesteps(args.steps)
    if args.seed is not None:
        out["seed"] = args.seed
    if getattr(args, "noise_drift", None) is not None:
        out["noise_drift"] = args.noise_drift
    if args.size:
        out["width"], out["height"] = parse_size(args.size)
    return {**out, **compile_overrides(args)}


def parse_kv(text: str) -> dict[str, Any]:
    """`a=1,b=0.5,c=x` -> {"a": 1, "b": 0.5, "c": "x"}."""
    out: dict[str, Any] = {}
    for item in filter(None, text.split(",")):
        if "=" not in item:
            raise InputError(f"expected key=value in {text!r}, got {item!r}")
        k, v = item.split("=", 1)
        for cast in (int, float):
            try:
                out[k.strip()] = cast(v)
                break
            except ValueError:
                continue
        else:
            out[k.strip()] = v.strip()
    return out


def load_generator(
    model: str, config: str | None, overrides: dict[str, Any], checkpoint: str | None = None
):
    from streamrt.gen.generator import StreamGenerator

    if model == TINY_RANDOM:
        if checkpoint is not None:
            raise InputError(
                f"--checkpoint replaces a model directory's weights; --model {TINY_RANDOM} has "
                "none: pass --model DIR (with transformer/config.json) as well"
            )
        return StreamGenerator.tiny_random(config, **overrides)
    return StreamGenerator.from_pretrained(
        generator_path(model), config=config, checkpoint=checkpoint, **overrides
    )


def generator_path(model: str) -> Path:
    """The generator directory `model` names, or a FileNotFoundError that says what to pass."""
    path = resolve_model(model)
    if not (path / "streamrt.json").exists() and not (path / "model_index.json").exists():
        raise FileNotFoundError(
            f"{path} holds no streamrt generator (streamrt.json) and no diffusers Wan pipeline "
            f"(model_index.json). The embedded model ({GEN_MODEL}) ships with streamrt and "
            f"was looked for in {', '.join(str(d) for d in ASSET_DIRS)}: reinstall streamrt "
            "if it is missing there; or pass --model DIR (a generator or pipeline "
            f"directory), or --model {TINY_RANDOM} for an untrained smoke test."
        )
    return path


def run(args: argparse.Namespace) -> int:
    if not args.parallel:
        return _run(args)
    from streamrt.parallel.launch import leave_group

    try:
        return _run(args)
    finally:  # the last rank may still be writing when the others are done
        leave_group()


def _run(args: argparse.Namespace) -> int:
    # 1. Load and start the stream: a bad prompt, config or checkpoint fails here, before
    #    any file is written (the CLI prints the error as one line).
    gen = load_generator(args.model, args.config, overrides_from(args), args.checkpoint)
    if args.parallel:
        from streamrt.apps.generate_parallel import run_parallel

        return run_parallel(args, gen)
    frames = gen.stream(args.prompt, num_frames=args.frames)
    first = next(frames)
    stats = gen.active.stats
    write_frames(args, gen.engine.config, first, frames, stats)
    return 0


def write_frames(args: argparse.Namespace, cfg, first, frames, stats: dict) -> None:
    """Write `first` and then `frames` to `args.output` with a live progress bar; `stats`
    (a stream's counters, updated as it runs) gives the fps and first-frame time shown."""
    from streamrt.io.sinks import open_sink

    columns = (
        TextColumn("[bold]generate"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[fps]:.1f} fps"),
        TimeElapsedColumn(),
    )
    with (
        open_sink(args.output, cfg.fps, cfg.width, cfg.height) as sink,
        Progress(*columns, console=console) as bar,
    ):
        task = bar.add_task("frames", total=args.frames, fps=0.0)
        sink.write(first)
        bar.update(task, advance=1)
        for frame in frames:
            sink.write(frame)
            bar.update(task, advance=1, fps=stats["frames"] / max(stats["seconds"], 1e-9))
    console.print(
        f"wrote {sink.frames} frames to {args.output}: "
        f"{stats['frames'] / max(stats['seconds'], 1e-9):.1f} fps, first frame after {stats['first_frame_s']:.2f} s"
    )


def output(text: str) -> str:
    """Type of an output option: a file the sink can write or a live URL."""
    from streamrt.io.sinks import check_target

    try:
        return check_target(text)
    except InputError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
