"""`streamrt bench pipeline`: the denoising-step and layer pipelines on 1, 2, 3 local gloo
processes (one torch thread each), same model, same run.

    steps     `streamrt.parallel.steps`: consecutive denoising steps per rank, each with its
              own cache (timestep forcing); 1 process runs the same schedule alone.
    layers    `streamrt.parallel.layers`: a range of transformer blocks per rank; a
              stream-batch stream (one row per denoising step in flight, StreamDiffusionV2)
              whose forwards are split into chunk units that fill the pipeline; 1 process
              runs the same stream with the whole model.

Measured on the last rank, which decodes: frames per second after `--warmup` chunks, time
to first frame (from the moment every rank is ready), p99 of the gap between consecutive
chunks' frames (what a player waits), the bytes each rank sends per chunk, and the largest
latent difference from the 1-process run. The bytes per chunk are also turned, by
arithmetic, into what Wan-1.3B at 480x832 would send and how long that takes over NVLink
and PCIe.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from streamrt.apps.bench import print_table, write_json

PROMPT = "a red circle moving right on a dark background"
LINKS_GBPS = {"NVLink 4 (H100, ~400 GB/s)": 400.0, "PCIe 4.0 x16 (~25 GB/s)": 25.0}
"""Achievable point-to-point bandwidth assumed for the arithmetic (GB/s)."""


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    from streamrt.apps.generate import overrides_from

    given = argparse.Namespace(
        policy=None, policy_args=None, sampler=None, steps=args.steps, seed=0, size=args.size
    )
    return overrides_from(given)


def _rank(rank: int, world: int, args: argparse.Namespace, mode: str, out: str) -> None:
    from streamrt.apps.generate import load_generator

    torch.set_num_threads(1)
    gen = load_generator(args.model, None, _overrides(args))
    engine = gen.engine
    total = args.warmup + args.chunks
    if mode == "steps":
        from streamrt.parallel.steps import StepPipeline

        pipe = StepPipeline(engine, PROMPT)
        chunks, decoder = pipe.chunks(total), pipe.stages[-1].stream
    else:
        from streamrt.parallel.layers import LayerPipeline, even_ranges, stage_engine

        ranges = even_ranges(len(engine.transformer.blocks), world)
        stage = stage_engine(engine, ranges[rank])
        every = None
        if mode.startswith("slow"):
            if rank == world - 1:
                _slow_blocks(args.slowdown)
            every = args.rebalance_every if mode == "slow-rebalanced" else None
        pipe = LayerPipeline(stage, ranges, microbatches=args.microbatches, rebalance_every=every)
        cfg = stage.config
        window = (len(cfg.timesteps) + 4) * cfg.chunk_frames  # every chunk in flight + 4
        streams = [
            pipe.open_stream(
                PROMPT,
                cfg,
                seed=i,
                sampler="stream_batch",
                policy="sink_window",
                policy_args={"sink_blocks": 3, "window_blocks": window},
            )
            for i in range(args.streams)
        ]
        decoder = streams[0]
        chunks = (x for i, x in pipe.run(streams, total) if i == 0)
    dist.barrier()
    t0 = time.perf_counter()
    times, latents = [], []
    with torch.no_grad():
        for x0 in chunks:
            decoder.decode(x0)
            times.append(time.perf_counter() - t0)
            latents.append(x0)
    sent = pipe.bytes_sent
    # latent frames per chunk (pixel codec: 1:1), of every stream
    frames = (latents[0].shape[2] if latents else 0) * (args.streams if mode != "steps" else 1)
    if rank == world - 1:
        moves = getattr(pipe, "moves", [])
        torch.save((times, torch.cat(latents, dim=2), frames, moves), f"{out}.last")
    torch.save(sent / total, f"{out}.{rank}")


def _measure(args: argparse.Namespace, mode: str, world: int) -> dict[str, Any]:
    from streamrt.parallel.launch import run_pipeline_local

    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "r")
        run_pipeline_local(_rank, world, args, mode, out, timeout=300)
        times, latents, frames, moves = torch.load(f"{out}.last", weights_only=False)
        sent = [torch.load(f"{out}.{r}", weights_only=True) for r in range(world)]
    timed = times[args.warmup :]
    span = timed[-1] - times[args.warmup - 1] if args.warmup else timed[-1]
    gaps = np.diff([0.0, *times])
    return {
        "fps": len(timed) * frames / span,
        "first frame s": times[0],
        "gap p99 s": float(np.percentile(gaps[1:] if len(gaps) > 1 else gaps, 99)),
        "KB sent/chunk": max(sent) / 1024,
        "latents": latents,
        "moves": moves,
    }


def _slow_blocks(factor: float) -> None:
    """Make this process a `factor` x slower device for the transformer's blocks (whichever
    blocks it holds, moved ones too): each block's forward is followed by a sleep of
    (factor - 1) x its own time (a process-wide module hook)."""
    from diffusers.models.transformers.transformer_wan import WanTransformerBlock

    started: dict[int, float] = {}

    def pre(module, _args):
        if isinstance(module, WanTransformerBlock):
            started[id(module)] = time.perf_counter()

    def post(module, _args, _out):
        if isinstance(module, WanTransformerBlock):
            time.sleep((factor - 1) * (time.perf_counter() - started.pop(id(module))))

    torch.nn.modules.module.register_module_forward_pre_hook(pre)
    torch.nn.modules.module.register_module_forward_hook(post)


def wan_bytes_per_chunk(mode: str, steps: int = 4, chunk_frames: int = 3) -> float:
    """Bytes one rank sends per chunk for Wan-1.3B at 480x832 (bf16, 16 latent channels,
    60x104 latents, 1560 tokens per latent frame, hidden size 1536), by arithmetic."""
    latent = 16 * chunk_frames * 60 * 104 * 2
    if mode == "steps":
        return 2 * latent  # latents + eps to the next rank
    hidden = 1560 * chunk_frames * 1536 * 2
    return (steps + 1) * hidden  # each chunk passes every hop once per step + clean refresh


def _rebalance_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The layer pipeline with its last rank `args.slowdown` x slower: static block ranges
    against live re-balancing, same run."""
    rows = []
    for world in [w for w in args.ranks if w > 1]:
        static = _measure(args, "slow-static", world)
        moved = _measure(args, "slow-rebalanced", world)
        n = min(static["latents"].shape[2], moved["latents"].shape[2])
        diff = (static["latents"][:, :, :n] - moved["latents"][:, :, :n]).abs().max()
        last = moved["moves"][-1]["to"] if moved["moves"] else None
        rows.append(
            {
                "processes": world,
                "last rank": f"{args.slowdown:g}x slower",
                "static fps": static["fps"],
                "rebalanced fps": moved["fps"],
                "vs static": moved["fps"] / static["fps"],
                "moves": len(moved["moves"]),
                "ranges after": " ".join(f"{r.start}-{r.stop}" for r in last) if last else "-",
                "max |diff|": float(diff),
            }
        )
        print(f"  rebalance on {world} processes: {rows[-1]['vs static']:.2f}x", flush=True)
    return rows


def bench_pipeline(args: argparse.Namespace) -> int:
    rows, payload = [], {"model": args.model, "size": args.size, "ranks": args.ranks}
    if "rebalance" in args.modes:
        payload["rebalance"] = _rebalance_rows(args)
        print_table(
            "layer pipeline with one slow rank: static ranges vs live re-balancing "
            f"(every {args.rebalance_every} rounds; aim: faster than static)",
            payload["rebalance"],
            list(payload["rebalance"][0]),
        )
    for mode in [m for m in args.modes if m != "rebalance"]:
        base = None
        for world in args.ranks:
            m = _measure(args, mode, world)
            latents = m.pop("latents")
            m.pop("moves")
            base = base or {**m, "latents": latents}
            n = min(latents.shape[2], base["latents"].shape[2])
            diff = float((latents[:, :, :n] - base["latents"][:, :, :n]).abs().max())
            rows.append(
                {
                    "mode": mode,
                    "streams": args.streams if mode == "layers" else 1,
                    "processes": world,
                    **m,
                    "vs 1 proc fps": m["fps"] / base["fps"],
                    "vs 1 proc first frame": m["first frame s"] / base["first frame s"],
                    "max |diff|": diff,
                }
            )
            print(f"  {mode} on {world} process(es): {m['fps']:.1f} fps", flush=True)
    payload["rows"] = rows
    aims = {"steps": "2 procs >= 1.85x fps, first frame <= 1.2x", "layers": "2 procs >= 1.6x"}
    if rows:
        print_table(
            "pipelines on local gloo processes, 1 torch thread each (aims: "
            + "; ".join(f"{k}: {v}" for k, v in aims.items() if k in args.modes)
            + ")",
            rows,
            list(rows[0]),
        )
    wan = []
    for mode in [m for m in args.modes if m in ("steps", "layers")]:
        b = wan_bytes_per_chunk(mode)
        row = {"mode": mode, "Wan-1.3B 480x832 MB/chunk/hop": b / 1e6}
        row.update({f"ms over {k}": b / (gbps * 1e9) * 1e3 for k, gbps in LINKS_GBPS.items()})
        wan.append(row)
    if wan:
        title = "what a chunk would send for Wan-1.3B at 480x832 (arithmetic)"
        print_table(title, wan, list(wan[0]))
    payload["wan_1_3b"] = wan
    write_json(args.json, payload)
    return 0
