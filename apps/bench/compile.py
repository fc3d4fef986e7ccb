"""`streamrt bench compile`: a compiled stream against an eager one, in the same run.

Two engines load the same model, one with `gen.compile` (`--mode`), and each opens a stream
of the same prompt and seed. The compiled stream first runs `--warmup` chunks: its graphs
are built while its window fills (that time is reported). Then both streams run
`--chunks` chunks interleaved (eager chunk, compiled chunk, ...: machine noise hits both),
timed per chunk without decoding. Reported: median ms per chunk of each, their ratio,
graphs built during the warm-up and after it (the aim: none after), and the largest
difference between the two streams' latents (the same computation in another order of
float operations).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from streamrt.apps.bench import print_table, write_json

PROMPT = "a red circle moving right on a dark background"


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def _chunk(stream) -> tuple[float, torch.Tensor]:
    t0 = time.perf_counter()
    x0 = stream.next_latents()
    return time.perf_counter() - t0, x0


def bench_compile(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import Progress

    from streamrt.apps.generate import load_generator

    say = Console(stderr=True).print
    eager = load_generator(args.model, args.config, {})
    compiled = load_generator(args.model, args.config, {"compile": args.mode})
    cfg = compiled.engine.config
    streams = {}
    for name, gen in (("eager", eager), ("compiled", compiled)):
        torch.manual_seed(0)
        streams[name] = gen.engine.open_stream(PROMPT, seed=0)
    before = _graphs()
    t0 = time.perf_counter()
    diff = 0.0
    for _ in range(args.warmup):
        _, a = _chunk(streams["eager"])
        _, b = _chunk(streams["compiled"])
        diff = max(diff, float((a - b).abs().max()))
    warm_s = time.perf_counter() - t0
    warm_graphs = _graphs() - before
    say(f"warm-up: {args.warmup} chunks, {warm_graphs} graph(s) built, {warm_s:.1f} s")
    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    with Progress(console=Console(stderr=True), transient=True) as progress:
        task = progress.add_task("chunks (eager, compiled interleaved)", total=args.chunks)
        for _ in range(args.chunks):
            out = {}
            for name, stream in streams.items():
                seconds, out[name] = _chunk(stream)
                times[name].append(seconds)
            diff = max(diff, float((out["eager"] - out["compiled"]).abs().max()))
            progress.advance(task)
    after = _graphs() - before - warm_graphs
    for stream in streams.values():
        stream.close()
    e_ms = statistics.median(times["eager"]) * 1e3
    c_ms = statistics.median(times["compiled"]) * 1e3
    rows = [
        {"measure": "eager ms/chunk (median)", "value": e_ms},
        {"measure": f"compiled ({args.mode}) ms/chunk (median)", "value": c_ms},
        {"measure": "eager / compiled", "value": e_ms / c_ms, "aim": ">= 1"},
        {"measure": f"graphs built in the {args.warmup}-chunk warm-up", "value": warm_graphs},
        {"measure": f"graphs built over the next {args.chunks} chunks", "value": after, "aim": "0"},
        {"measure": "warm-up seconds (compiled, incl. eager)", "value": warm_s},
        {"measure": "largest latent difference", "value": diff, "aim": "<= 1e-4"},
    ]
    device = str(compiled.engine.device)
    print_table(
        f"bench compile: {args.model} {cfg.width}x{cfg.height}, chunk {cfg.chunk_frames}, "
        f"{len(cfg.timesteps)} steps, {cfg.policy} {cfg.policy_args}, {device}, "
        f"{torch.get_num_threads()} thread(s)",
        rows,
        ["measure", "value", "aim"],
    )
    write_json(
        args.json,
        {"suite": "compile", "model": args.model, "mode": args.mode, "rows": rows},
    )
    return 0
