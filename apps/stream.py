"""`streamrt stream`: live video-to-video from a file, RTMP stream, webcam or world:// source
to an MP4 file or an RTMP server."""

from __future__ import annotations

import argparse

from rich.console import Console

from streamrt.apps.arguments import add_compile_argument, count, size
from streamrt.apps.generate import load_generator, output, overrides_from
from streamrt.errors import InputError

console = Console(stderr=True, soft_wrap=True)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", required=True, help="file, rtmp://..., webcam:N or world://seed=N")
    p.add_argument(
        "--output", type=output, required=True, help="file (.mp4) or rtmp://host/app/key"
    )
    p.add_argument("--prompt", required=True, help="the style to apply")
    p.add_argument(
        "--frames", type=count(1), help="stop after N frames (default: until the input ends)"
    )
    p.add_argument(
        "--model", default="assets/tiny-world", help="generator directory or tiny-random"
    )
    p.add_argument(
        "--checkpoint", help="causal generator weights replacing the model's transformer"
    )
    p.add_argument("--config", help="YAML preset")
    p.add_argument("--policy")
    p.add_argument("--policy-args")
    p.add_argument("--sampler", choices=["chunkwise", "rolling", "stream_batch"])
    p.add_argument("--steps", type=count(1))
    p.add_argument("--seed", type=int)
    p.add_argument(
        "--size", type=size, help="WIDTHxHEIGHT of the output (input frames are resized)"
    )
    add_compile_argument(p)


def run(args: argparse.Namespace) -> int:
    from streamrt.io.sinks import open_sink
    from streamrt.io.sources import SourceError, open_source

    # A bad prompt, config, checkpoint or input fails here, before the output is opened.
    gen = load_generator(args.model, args.config, overrides_from(args), args.checkpoint)
    cfg = gen.engine.config
    source = open_source(args.input, (cfg.width, cfg.height), args.frames)
    frames = gen.stylize(source, args.prompt)
    try:
        first = next(frames)
    except StopIteration:
        raise InputError(
            f"{args.input} gave too few frames for one chunk ({cfg.chunk_frames} latent frames)"
        ) from None
    sink = open_sink(args.output, cfg.fps, cfg.width, cfg.height)
    try:
        with sink:
            sink.write(first)
            for frame in frames:
                sink.write(frame)
    except SourceError as exc:
        console.print(f"[red]input stopped:[/] {exc} (kept the {sink.frames} frames written)")
        return 1
    console.print(f"wrote {sink.frames} frames to {args.output}")
    return 0
