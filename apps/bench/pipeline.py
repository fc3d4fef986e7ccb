"""`streamrt bench pipeline`: row-parallel generation on N local ranks against one process,
measured in the same run, with the frames compared.

    ranks        the rows of every forward split over N gloo processes, one torch thread
                 each (`streamrt.parallel`); stream batch has one row per denoising step
    1 process    the same stream in this process, with 1 thread and with N threads (the
                 same cores as the N ranks)
    max |diff|   largest latent difference between the ranks' stream and one process's
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from streamrt.apps.bench import print_table, write_json

PROMPT = "a red circle moving right on a dark background"


def _overrides(args: argparse.Namespace, sampler: str) -> dict[str, Any]:
    """`streamrt generate`'s overrides for --size / --steps, plus the sampler and seed 0."""
    from streamrt.apps.generate import overrides_from

    given = argparse.Namespace(
        policy=None, policy_args=None, sampler=sampler, steps=args.steps, seed=0, size=args.size
    )
    return overrides_from(given)


def run_stream(args: argparse.Namespace, sampler: str, threads: int, parallel=None):
    """(frames per second over `args.chunks` chunks after warm-up, their latents)."""
    from streamrt.apps.generate import load_generator
    from streamrt.parallel.launch import parallelize

    torch.set_num_threads(threads)
    gen = load_generator(args.model, None, _overrides(args, sampler))
    if parallel is not None:
        parallelize(gen, parallel)
    cfg = gen.engine.config
    if sampler != "chunkwise":  # room for every chunk in flight plus 4 chunks of context
        window = (len(cfg.timesteps) + 4) * cfg.chunk_frames
        policy = {
            "policy": "sink_window",
            "policy_args": {"sink_blocks": 3, "window_blocks": window},
        }
        stream = gen.engine.open_stream(PROMPT, cfg, **policy)
    else:
        stream = gen.engine.open_stream(PROMPT, cfg)
    out = [stream.next_latents() for _ in range(args.warmup)]
    if parallel is not None:
        torch.distributed.barrier()
    t0 = time.perf_counter()
    out += [stream.next_latents() for _ in range(args.chunks)]
    seconds = time.perf_counter() - t0
    frames = args.chunks * cfg.chunk_frames
    stream.close()
    return frames / seconds, torch.cat(out, dim=2)


def _rank(rank: int, world: int, args: argparse.Namespace, sampler: str, out: str) -> None:
    from streamrt.parallel import RowParallel

    fps, latents = run_stream(args, sampler, 1, RowParallel())
    torch.save((fps, latents), f"{out}.{rank}")


def bench_pipeline(args: argparse.Namespace) -> int:
    from streamrt.parallel.launch import run_local

    rows, payload = [], {"ranks": args.ranks, "model": args.model, "size": args.size}
    for sampler in args.samplers:
        one, reference = run_stream(args, sampler, 1)
        same, _ = run_stream(args, sampler, args.ranks)
        with tempfile.TemporaryDirectory() as tmp:
            out = str(Path(tmp) / "rank")
            run_local(_rank, args.ranks, args, sampler, out)
            results = [torch.load(f"{out}.{r}", weights_only=True) for r in range(args.ranks)]
        fps = min(r[0] for r in results)  # the slowest rank sets the stream's pace
        diff = max(float((r[1] - reference).abs().max()) for r in results)
        row = {
            "sampler": sampler,
            "ranks fps": fps,
            "1 proc 1 thread fps": one,
            f"1 proc {args.ranks} threads fps": same,
            "vs 1 thread": fps / one,
            f"vs {args.ranks} threads": fps / same,
            "max |diff|": diff,
        }
        rows.append(row)
    payload["rows"] = rows
    print_table(
        f"row-parallel generation on {args.ranks} local gloo ranks (1 thread each) vs one process",
        rows,
        list(rows[0]),
    )
    write_json(args.json, payload)
    return 0
