"""`streamrt generate --parallel steps|layers` under `torchrun`: one stream over a pipeline
group; every rank runs its share, the last rank decodes and writes the video."""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator

import numpy as np
import torch
import torch.distributed as dist

from streamrt.errors import InputError


def chunks_for(frames: int, chunk_frames: int, temporal: int) -> int:
    """Chunks whose decoded frames cover `frames` (a codec with temporal compression `t`
    gives `1 + t * (F - 1)` frames for the first chunk of F latent frames, `t * F` after)."""
    first = 1 + temporal * (chunk_frames - 1)
    if frames <= first:
        return 1
    return 1 + -(-(frames - first) // (temporal * chunk_frames))


def pipeline_latents(args: argparse.Namespace, engine, rank: int, world: int):
    """(this rank's iterator of finished latent chunks, the stream that decodes them)."""
    cfg = engine.config
    n = chunks_for(args.frames, cfg.chunk_frames, engine.codec.temporal)
    if args.parallel == "steps":
        from streamrt.parallel.steps import StepPipeline

        pipe = StepPipeline(engine, args.prompt)
        return pipe.chunks(n), pipe.stages[-1].stream, pipe
    from streamrt.parallel.layers import (
        LayerPipeline,
        even_ranges,
        measure_parts,
        plan_ranges,
        stage_engine,
    )

    blocks = len(engine.transformer.blocks)
    if world > blocks:
        raise InputError(f"--parallel layers needs at most {blocks} ranks (one block each)")
    ranges = even_ranges(blocks, world)
    if args.balance:
        parts = [measure_parts(engine, args.prompt)]
        dist.broadcast_object_list(parts, src=0)  # every rank takes rank 0's measurement
        ranges = plan_ranges(parts[0]["block_s"], world, parts[0]["embed_s"], parts[0]["head_s"])
    stage = stage_engine(engine, ranges[rank])
    pipe = LayerPipeline(stage, ranges, rebalance_every=args.rebalance_every)
    stream = pipe.open_stream(args.prompt)
    return (x for _, x in pipe.run([stream], n)), stream, pipe


def run_parallel(args: argparse.Namespace, gen) -> int:
    from streamrt.apps.generate import write_frames
    from streamrt.parallel.launch import init_from_env

    if args.parallel == "steps" and args.sampler not in (None, "chunkwise"):
        raise InputError(
            "--parallel steps runs its own schedule (one cache per denoising step); "
            f"--sampler {args.sampler} applies to --parallel layers"
        )
    init_from_env(str(gen.engine.device))
    rank, world = dist.get_rank(), dist.get_world_size()
    latents, stream, pipe = pipeline_latents(args, gen.engine, rank, world)
    if rank != world - 1:  # every rank runs its share; the last one decodes and writes
        for _ in latents:
            pass
        return 0
    stats = {"frames": 0, "seconds": 0.0, "first_frame_s": None}
    start = time.perf_counter()

    def frames() -> Iterator[np.ndarray]:
        for x0 in latents:
            decoded = stream.decode(x0)
            for frame in decoded:
                if stats["frames"] >= args.frames:
                    break
                stats["frames"] += 1
                stats["seconds"] = time.perf_counter() - start
                if stats["first_frame_s"] is None:
                    stats["first_frame_s"] = stats["seconds"]
                yield frame
        pipe.flush()

    it = frames()
    with torch.no_grad():
        write_frames(args, stream.config, next(it), it, stats)
    return 0
