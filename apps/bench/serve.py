"""`streamrt bench serve`: the runtime serving many streams, against baselines in the same run.

    concurrency  1, 2, 4 and 8 streams at once on one runtime (their forwards batched),
                 against the same streams run one after another: aggregate and per-stream
                 fps. Aim: 8 batched streams >= 2x the aggregate fps of one stream.
    deadlines    a bursty arrival trace (replayable from JSON) served by the deadline
                 scheduler (admission control, most urgent first, streams ahead of playout
                 wait) and by first-come-first-served: SLO attainment (share of frames ready
                 by their playout time) and p99 inter-frame gap as a viewer sees them.
                 Aim: where FCFS meets < 50% of deadlines, the scheduler meets >= 90% for
                 the streams it admits. A plot shows each stream's slack over time.

The trace is sized from the machine: the best aggregate fps of the concurrency part over
the trace's fps says how many streams the machine can carry at once (`capacity`); the first
burst brings `--overload` times that many, two later bursts `capacity` each.
"""

from __future__ import annotations

import argparse
import json
import math
import threading
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from streamrt.apps.bench import print_table, write_json

PROMPTS = [
    "a red circle moving right on a dark background",
    "a blue square moving up on a light background",
    "a green triangle moving left on a striped background",
    "a yellow circle moving down on a checkered background",
]
console = Console(stderr=True)


def _runtime(args: argparse.Namespace, **runtime: Any):
    from streamrt.apps.arguments import parse_size
    from streamrt.config import RuntimeConfig
    from streamrt.runtime import Runtime

    width, height = parse_size(args.size)
    return Runtime(
        args.model,
        config=args.config,
        runtime=RuntimeConfig(**runtime),
        qa=False,
        height=height,
        width=width,
    )


# ---------------------------------------------------------------------- concurrency


def _concurrency(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, float]]:
    # Full quality for every stream: no degrade (fewer steps) or suspension under load.
    rt = _runtime(args, admission=False, ahead_s=1e9, suspend_late_s=0, max_batch=max(args.streams))
    rows = []
    try:
        ceiling = _ceiling(rt, args.frames)
        list(rt.open_stream(PROMPTS[0], num_frames=args.frames).frames())  # warm-up
        for n in args.streams:
            console.print(f"concurrency: {n} stream(s) batched, then one after another")
            batched, per_stream = _batched(rt, n, args.frames)
            sequential = _sequential(rt, n, args.frames)
            rows.append(
                {
                    "streams": n,
                    "batched fps (all)": batched,
                    "per-stream fps": per_stream,
                    "one after another fps (all)": sequential,
                    "batched / sequential": batched / sequential,
                }
            )
    finally:
        rt.close()
    base = rows[0]["batched fps (all)"]
    for row in rows:
        row["vs 1 stream"] = row["batched fps (all)"] / base
        row["share of ceiling"] = row["batched fps (all)"] / ceiling["ceiling fps"]
    ceiling["ceiling / 1 stream"] = ceiling["ceiling fps"] / base
    return rows, ceiling


def _ceiling(rt, frames: int) -> dict[str, float]:
    """The FLOP ceiling of the runtime's model on this CPU's threads (module docstring)."""
    import torch

    from streamrt.apps.bench.flops import matmul_peak_gflops, model_widths, stream_flops_per_frame

    console.print("ceiling: the model's FLOPs per frame, this CPU's matmul peak")
    per_frame = stream_flops_per_frame(rt.generator, PROMPTS[0], frames)
    threads = torch.get_num_threads()
    peak = matmul_peak_gflops(threads, *model_widths(rt.engine.transformer))
    return {
        "threads": threads,
        "GFLOP per frame": per_frame / 1e9,
        "matmul peak GFLOP/s": peak,
        "ceiling fps": peak * 1e9 / per_frame,
    }


def _batched(rt, n: int, frames: int) -> tuple[float, float]:
    t0 = time.perf_counter()
    handles = [rt.open_stream(PROMPTS[i % 4], num_frames=frames, seed=i) for i in range(n)]
    done: dict[str, float] = {}
    pending = {h.id: h.frames() for h in handles}
    while pending:  # read round-robin; the reader drives the runtime's steps
        for key in list(pending):
            try:
                next(pending[key])
            except StopIteration:
                done[key] = time.perf_counter() - t0
                del pending[key]
    total = time.perf_counter() - t0
    per_stream = sum(frames / s for s in done.values()) / n
    return n * frames / total, per_stream


def _sequential(rt, n: int, frames: int) -> float:
    t0 = time.perf_counter()
    for i in range(n):
        list(rt.open_stream(PROMPTS[i % 4], num_frames=frames, seed=i).frames())
    return n * frames / (time.perf_counter() - t0)


# ---------------------------------------------------------------------- deadlines


def make_trace(
    capacity: float, fps: float, seconds: float, overload: float = 2.5, seed: int = 0
) -> list[dict]:
    """Bursts of arrivals: at 0 s `overload` x what fits, then two bursts of what fits a
    third and two thirds into the run, each stream lasting half the run."""
    import random

    rng = random.Random(seed)
    per_burst = [max(2, round(overload * capacity))] + [max(1, round(capacity))] * 2
    trace = []
    for burst, count in enumerate(per_burst):
        start = burst * seconds / 3
        for _ in range(count):
            trace.append(
                {
                    "t": round(start + rng.uniform(0, 0.3), 3),
                    "prompt": PROMPTS[len(trace) % 4],
                    "seed": len(trace),
                    "fps": fps,
                    "num_frames": int(fps * seconds / 2),
                }
            )
    return sorted(trace, key=lambda a: a["t"])


def replay(rt, trace: list[dict], limit_s: float) -> dict[str, Any]:
    """Open the trace's streams at their times on a started runtime; sample every stream's
    slack; wait until every admitted stream ended (or `limit_s`)."""
    from streamrt.runtime import AdmissionError

    rt.start()
    t0 = time.perf_counter()
    handles, refused, samples = [], 0, []
    pending = list(trace)
    readers = []
    while time.perf_counter() - t0 < limit_s:
        now = time.perf_counter() - t0
        while pending and pending[0]["t"] <= now:
            a = pending.pop(0)
            try:
                h = rt.open_stream(
                    a["prompt"], num_frames=a["num_frames"], fps=a["fps"], seed=a["seed"]
                )
            except AdmissionError:
                refused += 1
                continue
            handles.append(h)
            reader = threading.Thread(target=lambda h=h: sum(1 for _ in h.frames()), daemon=True)
            reader.start()
            readers.append(reader)
        stats = rt.stats()
        live = {**stats["finished"], **stats["streams"]}
        samples.append(
            (
                now,
                {
                    h.id: live[h.id]["slack_s"]
                    for h in handles
                    if live.get(h.id, {}).get("state") == "running"
                },
            )
        )
        if not pending and all(h.done for h in handles):
            break
        time.sleep(0.1)
    counters = dict(rt.counters)
    rt.close()
    lives = [h._live for h in handles]
    frames = sum(s.playout.frames for s in lives)
    on_time = sum(s.playout.on_time for s in lives)
    gaps = sorted(g for s in lives for g in s.playout.gaps)
    p99 = gaps[min(len(gaps) - 1, math.ceil(0.99 * len(gaps)) - 1)] if gaps else float("nan")
    return {
        "arrived": len(trace),
        "admitted": len(handles),
        "refused": refused,
        "frames": frames,
        "slo_attainment": on_time / frames if frames else float("nan"),
        "gap_p99_s": p99,
        "degraded": counters["degraded"],
        "suspended": counters["suspended"],
        "wall_s": time.perf_counter() - t0,
        "samples": samples,
    }


def _deadlines(
    args: argparse.Namespace, best_fps: float
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    capacity = best_fps / args.fps
    if args.trace and Path(args.trace).exists():
        trace = json.loads(Path(args.trace).read_text())
        console.print(f"trace: {len(trace)} arrivals from {args.trace}")
    else:
        trace = make_trace(capacity, args.fps, args.seconds, args.overload)
        if args.trace:
            Path(args.trace).write_text(json.dumps(trace, indent=1))
            console.print(f"wrote the trace to {args.trace}")
    limit = max(a["t"] for a in trace) + 4 * args.seconds
    results = {}
    for kind in ("fcfs", "deadline"):
        console.print(f"deadlines: replaying {len(trace)} arrivals with the {kind} scheduler")
        results[kind] = replay(_runtime(args, scheduler=kind, queue_s=0), trace, limit)
    rows = [
        {
            "scheduler": kind,
            "arrived": r["arrived"],
            "admitted": r["admitted"],
            "refused": r["refused"],
            "SLO attainment (admitted)": r["slo_attainment"],
            "gap p99 (s)": r["gap_p99_s"],
            "frames": r["frames"],
            "degraded / suspended": f"{r['degraded']} / {r['suspended']}",
        }
        for kind, r in results.items()
    ]
    meta = {"capacity_streams": capacity, "fps": args.fps, "trace": trace, "results": results}
    return rows, meta


def _plot(path: str, results: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4), sharey=True)
    for ax, (kind, r) in zip(axes, results.items()):
        ids = sorted({k for _, s in r["samples"] for k in s}, key=lambda k: int(k[1:]))
        for k in ids:
            pts = [(t, s[k]) for t, s in r["samples"] if k in s]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], lw=1)
        ax.axhline(0, color="k", lw=0.8)
        ax.set_title(f"{kind}: slack per stream (< 0: late)")
        ax.set_xlabel("time (s)")
    axes[0].set_ylabel("slack (s)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    console.print(f"wrote {path}")


def bench_serve(args: argparse.Namespace) -> int:
    payload: dict[str, Any] = {"model": args.model, "size": args.size}
    conc, ceiling = _concurrency(args)
    payload["concurrency"], payload["ceiling"] = conc, ceiling
    print_table(
        f"{args.frames} frames per stream at {payload['size']}, batched on one runtime vs one "
        "after another (share of ceiling: of the FLOP ceiling below)",
        conc,
        list(conc[0]),
    )
    print_table(
        "the FLOP ceiling: this CPU's matmul peak over the model's FLOPs per frame (no "
        "schedule gives more frames per second)",
        [ceiling],
        list(ceiling),
    )
    rows, meta = _deadlines(args, max(r["batched fps (all)"] for r in conc))
    payload["deadlines"] = {k: v for k, v in meta.items() if k != "results"}
    payload["deadlines"]["rows"] = rows
    print_table(
        f"bursty arrivals at {args.fps:g} fps (the machine carries ~{meta['capacity_streams']:.1f}"
        " streams)",
        rows,
        list(rows[0]),
    )
    eight = next((r for r in conc if r["streams"] == max(args.streams)), conc[-1])
    fcfs, dl = (meta["results"][k] for k in ("fcfs", "deadline"))
    aims = [
        {
            "measure": f"{eight['streams']} batched streams vs 1 (aggregate fps)",
            "value": eight["vs 1 stream"],
            "aim": ">= 2",
        },
        {
            "measure": "FLOP ceiling vs 1 stream (the most any batch could give)",
            "value": ceiling["ceiling / 1 stream"],
            "aim": ">= 2 for the aim above to be reachable",
        },
        {
            "measure": "FCFS SLO attainment",
            "value": fcfs["slo_attainment"],
            "aim": "< 0.5 (overload)",
        },
        {
            "measure": "deadline scheduler SLO attainment (admitted)",
            "value": dl["slo_attainment"],
            "aim": ">= 0.9",
        },
    ]
    payload["aims"] = aims
    print_table("aims", aims, ["measure", "value", "aim"])
    if args.plot:
        _plot(args.plot, meta["results"])
    for r in meta["results"].values():
        r["samples"] = [(t, s) for t, s in r["samples"]]
    payload["deadlines"]["results"] = meta["results"]
    write_json(args.json, payload)
    return 0
