"""`streamrt bench agents`: agent programs under the KV policies, real and simulated.

    real run     one trace of agent programs (`streamrt.agents.workload`, default
                 "tool-heavy": a shared system prompt, many turns, most tools back within
                 a second, a slow tail) replayed under baseline, ttl and offload with the
                 same engine settings: real greedy forwards of the tiny LM on the CPU (one
                 thread), real waits for the tools. Token counts and durations are scaled
                 down (--token-scale, --time-scale) so the run takes a minute or two.
    simulation   a larger trace of the same shape at full scale on `SimEngine`: the
                 engine's own scheduling and `AgentKV` decisions with simulated time and
                 a cost model of Llama-3-8B on one H100 (`streamrt.agents.sim`).

    shared       (--shared-runtime) the real trace on `Runtime(agents=True)` beside two
                 live generation streams: the agents' JCT and the streams' SLO attainment.

Per policy: mean and p95 job completion time (arrival to the end of the last LLM call),
time to first token per call, device KV utilisation (time-weighted share of the device
blocks held by live KV; "active": held by the calls in the batch; "queued": only while
calls wait, the share that compares policies clearing the same trace at different speeds),
preemptions and recomputed tokens (K/V an agent had and lost).
Aim: on the tool-heavy trace, mean JCT of ttl and offload <= 0.5x baseline, with a higher
KV utilisation.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from streamrt.apps.bench import print_table, write_json

console = Console(stderr=True)
STREAM_PROMPT = "a red circle moving right on a dark background"
POLICIES = ("baseline", "ttl", "offload")
COLUMNS = {
    "policy": "policy",
    "jct_mean_s": "JCT mean s",
    "jct_p95_s": "JCT p95 s",
    "ttft_mean_s": "TTFT mean s",
    "ttft_p95_s": "TTFT p95 s",
    "kv_util": "KV held",
    "kv_active": "KV active",
    "kv_held_contended": "held, queued",
    "kv_active_contended": "active, queued",
    "preempted": "preempt",
    "recomputed_tokens": "recomp tok",
    "resumes_kept": "kept",
    "finished": "done",
}


# ---------------------------------------------------------------------- traces


def _traces(args: argparse.Namespace, vocab_size: int):
    """The real run's and the simulation's traces: read from --trace, else made (and
    written there when --trace names a new file)."""
    import json

    from streamrt.agents.workload import Trace, make_trace

    path = Path(args.trace) if args.trace else None
    if path is not None and path.exists():
        raw = json.loads(path.read_text())
        console.print(f"trace: replaying {path}")
        real = Trace.from_json(json.dumps(raw["real"]))
        sim = raw.get("sim") and args.sim_programs and Trace.from_json(json.dumps(raw["sim"]))
        return real, sim
    real = make_trace(
        args.workload,
        args.programs,
        args.seed,
        vocab_size=vocab_size,
        token_scale=args.token_scale,
        time_scale=args.time_scale,
        max_context=args.max_context,
    )
    sim = make_trace(args.workload, args.sim_programs, args.seed) if args.sim_programs else None
    if path is not None:
        payload = {"real": json.loads(real.to_json()), "sim": sim and json.loads(sim.to_json())}
        path.write_text(json.dumps(payload))
        console.print(f"wrote the traces to {path}")
    return real, sim


# ---------------------------------------------------------------------- the real run


def _prefill_rate(engine, tokens: int) -> float:
    """Measured prefill tokens/s of one `tokens`-long prompt (also warms the model up)."""
    from streamrt.agents.engine import LLM, Program

    prompt = [3 + i % (engine.vocab_size - 3) for i in range(tokens)]
    engine.submit(Program(prompt, [LLM(1, stop=False)])).result()
    t0 = time.perf_counter()
    engine.submit(Program(prompt[::-1], [LLM(1, stop=False)])).result()
    return tokens / (time.perf_counter() - t0)


def run_real(trace, policy: str, lm, args: argparse.Namespace, prefill_rate: float) -> dict:
    """Replay `trace` in real time on an `AgentEngine` with `policy` (the engine's clock)."""
    from streamrt.agents.engine import AgentEngine, lm_spec
    from streamrt.agents.kv import ToolDurations
    from streamrt.agents.workload import KVSampler, due, summarize
    from streamrt.cache import CacheManager

    model, tokenizer = lm
    block = lm_spec(model, args.tokens_per_block).block_bytes
    manager = CacheManager(
        device_bytes=block * args.kv_blocks, host_bytes=block * args.kv_blocks * 4, device="cpu"
    )
    engine = AgentEngine(
        model,
        tokenizer,
        manager,
        policy=policy,
        max_batch=args.max_batch,
        step_tokens=args.step_tokens,
        tokens_per_block=args.tokens_per_block,
    )
    # The engine's time constants live in the trace's (scaled) seconds, like the tools.
    engine.kv.durations = ToolDurations(cold_mean_s=trace.time_scale)
    engine.kv.queue_delay_s *= trace.time_scale
    engine.kv.prefill_tokens_per_s = prefill_rate
    pending = sorted(trace.programs, key=lambda spec: spec.arrival_s)
    programs = {spec.id: trace.program(spec) for spec in pending}  # built before the clock
    sampler = KVSampler(
        manager,
        every_s=0.05,
        running=engine.running_sequences,
        waiting=lambda: len(engine.waiting),
    )
    runs, limit = [], args.limit_s
    t0 = last = time.monotonic()
    while pending or engine.busy:
        now = time.monotonic()
        for group in due(pending, now - t0):
            handles = engine.submit_all([programs[spec.id] for spec in group])
            runs += [(spec, h.agent) for spec, h in zip(group, handles)]
        stepped = engine.step()
        now = time.monotonic()
        sampler.add(now - last)
        last = now
        if now - t0 > limit:
            console.print(f"[red]{policy}: stopped at the {limit:g} s limit[/red]")
            break
        if not stepped:
            time.sleep(0.0005)
    out = summarize(runs, t0, engine, sampler)
    out["wall_s"] = time.monotonic() - t0
    manager.check_invariants()
    return out


# ---------------------------------------------------------------------- shared runtime


def run_shared(trace, policy: str, args: argparse.Namespace) -> dict:
    """The trace's programs on `Runtime(agents=True)` beside two endless live generation
    streams (closed when the last program ends): the agents' JCT and each stream's SLO
    attainment (share of frames ready by their playout time)."""
    import threading

    from streamrt.agents.kv import ToolDurations
    from streamrt.agents.workload import due
    from streamrt.runtime import Runtime

    rt = Runtime(
        args.stream_model,
        qa=False,
        agents=args.model or True,
        agent_policy=policy,
        height=32,
        width=32,
    )
    try:
        rt.agents.kv.durations = ToolDurations(cold_mean_s=trace.time_scale)
        rt.agents.kv.queue_delay_s *= trace.time_scale
        rt.start()
        streams = [rt.open_stream(STREAM_PROMPT, fps=args.stream_fps, seed=i) for i in range(2)]
        readers = [
            threading.Thread(target=lambda h=h: sum(1 for _ in h.frames()), daemon=True)
            for h in streams
        ]
        for r in readers:
            r.start()
        pending = sorted(trace.programs, key=lambda s: s.arrival_s)
        t0, handles = time.monotonic(), []
        while pending:
            time.sleep(max(0.0, t0 + pending[0].arrival_s - time.monotonic()))
            for group in due(pending, time.monotonic() - t0):
                submitted = rt.agents.submit_all([trace.program(spec) for spec in group])
                handles += list(zip(group, submitted))
        jct = []
        for spec, h in handles:
            h.result(timeout=args.limit_s)
            jct.append(h.agent.done_s - (t0 + spec.arrival_s))
        for h in streams:
            h.close()
        for r in readers:
            r.join(30)
        stats = rt.stats()
    finally:
        rt.close()
    live = {**stats["finished"], **stats["streams"]}
    jct.sort()
    return {
        "agents_jct_mean_s": sum(jct) / len(jct),
        "agents_jct_p95_s": jct[min(len(jct) - 1, math.ceil(0.95 * len(jct)) - 1)],
        "stream_slo": [live.get(h.id, {}).get("slo_attainment") for h in streams],
        "stream_frames": [live.get(h.id, {}).get("frames") for h in streams],
    }


# ---------------------------------------------------------------------- tables, plot


def _rows(results: dict[str, dict]) -> list[dict[str, Any]]:
    return [
        {COLUMNS[k]: (policy if k == "policy" else r[k]) for k in COLUMNS}
        for policy, r in results.items()
    ]


def _aims(label: str, results: dict[str, dict]) -> list[dict[str, Any]]:
    base = results.get("baseline")
    aims = []
    for policy, r in results.items():
        if base is None or policy == "baseline":
            continue
        ratio = r["jct_mean_s"] / base["jct_mean_s"]
        aims.append(
            {
                "measure": f"{label}: {policy} mean JCT / baseline",
                "value": ratio,
                "aim": "<= 0.5",
                "met": "yes" if ratio <= 0.5 else "NO",
            }
        )
        for key, name in (
            ("kv_util", "KV held"),
            ("kv_active", "KV active"),
            ("kv_held_contended", "KV held while calls queue"),
            ("kv_active_contended", "KV active while calls queue"),
        ):
            if r[key] is None or base[key] is None:  # no call ever waited
                continue
            util = r[key] - base[key]
            aims.append(
                {
                    "measure": f"{label}: {policy} {name} - baseline",
                    "value": util,
                    "aim": "> 0",
                    "met": "yes" if util > 0 else "NO",
                }
            )
    return aims


def _plot(path: str, parts: dict[str, dict[str, dict]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(parts), figsize=(6 * len(parts), 7), squeeze=False)
    for col, (label, results) in enumerate(parts.items()):
        top, bottom = axes[0][col], axes[1][col]
        for policy, r in results.items():
            jct = r["jct_s"]
            top.step(jct, [(i + 1) / len(jct) for i in range(len(jct))], label=policy, where="post")
            tl = r["kv_timeline"]
            bottom.plot([t for t, _ in tl], [u for _, u in tl], lw=1, label=policy)
        top.set_title(f"{label}: job completion time CDF")
        top.set_xlabel("JCT (s)")
        top.legend()
        bottom.set_title(f"{label}: device KV blocks held")
        bottom.set_xlabel("time (s)")
        bottom.set_ylim(0, 1.02)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    console.print(f"wrote {path}")


# ---------------------------------------------------------------------- the suite


def bench_agents(args: argparse.Namespace) -> int:
    import torch

    from streamrt.agents.engine import AgentEngine, load_causal_lm
    from streamrt.agents.sim import LINKS, SimConfig, simulate

    policies = args.policies
    lm = load_causal_lm(args.model)
    real_trace, sim_trace = _traces(args, lm[0].config.vocab_size)
    payload: dict[str, Any] = {
        "workload": real_trace.shape,
        "real": {"trace": real_trace.summary(), "results": {}},
    }
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        probe = AgentEngine(*lm, tokens_per_block=args.tokens_per_block)
        rate = _prefill_rate(probe, min(args.step_tokens, 256))
        payload["real"]["prefill_tokens_per_s"] = rate
        real: dict[str, dict] = {}
        for policy in policies:
            s = real_trace.summary()
            console.print(
                f"real run: {policy}, {s['programs']} programs, {s['llm_calls']} LLM calls, "
                f"{s['tool_calls']} tool calls"
            )
            real[policy] = run_real(real_trace, policy, lm, args, rate)
            console.print(
                f"  mean JCT {real[policy]['jct_mean_s']:.3f} s in {real[policy]['wall_s']:.1f} s"
            )
    finally:
        torch.set_num_threads(threads)
    payload["real"]["results"] = real
    payload["real"]["settings"] = {
        k: getattr(args, k)
        for k in ("kv_blocks", "max_batch", "step_tokens", "tokens_per_block", "model")
    }
    print_table(
        f"REAL run, {real_trace.shape} trace: {len(real_trace.programs)} programs, tiny LM on "
        f"the CPU (1 thread), tokens x{real_trace.token_scale:g}, tool durations and arrivals "
        f"x{real_trace.time_scale:g}, {args.kv_blocks} device KV blocks of "
        f"{args.tokens_per_block} tokens",
        _rows(real),
        list(COLUMNS.values()),
    )
    aims = _aims("real", real)
    parts = {"real": real}
    if sim_trace:
        config = SimConfig(
            device_kv_bytes=args.sim_kv_gib * 2**30,
            link=args.sim_link,
            max_batch=args.sim_max_batch,
        )
        sim: dict[str, dict] = {}
        for policy in policies:
            console.print(f"simulation: {policy}, {len(sim_trace.programs)} programs")
            t0 = time.perf_counter()
            sim[policy] = simulate(sim_trace, policy, config)
            console.print(
                f"  simulated {sim[policy]['simulated_s']:.0f} s in "
                f"{time.perf_counter() - t0:.1f} s"
            )
        payload["sim"] = {
            "trace": sim_trace.summary(),
            "config": {
                "model": "Llama-3-8B bf16 (cost model)",
                "gpu": "H100 SXM (cost model)",
                "device_kv_gib": args.sim_kv_gib,
                "device_blocks": next(iter(sim.values()))["device_blocks"],
                "link": f"{args.sim_link} {LINKS[args.sim_link] / 1e9:g} GB/s",
                "max_batch": config.max_batch,
                "step_tokens": config.step_tokens,
            },
            "results": sim,
        }
        print_table(
            f"SIMULATION (not measured), {sim_trace.shape} trace: {len(sim_trace.programs)} "
            f"programs, Llama-3-8B on one H100 (cost model), {args.sim_kv_gib:g} GiB device "
            f"KV, {args.sim_link}",
            _rows(sim),
            list(COLUMNS.values()),
        )
        aims += _aims("simulation", sim)
        parts["simulation"] = sim
    if args.shared_runtime:
        shared = {}
        for policy in policies:
            console.print(f"shared runtime: {policy}, agents beside 2 live streams")
            shared[policy] = run_shared(real_trace, policy, args)
        payload["shared_runtime"] = shared
        print_table(
            f"REAL run on one Runtime: the same agent trace beside 2 live {args.stream_fps:g} fps "
            f"streams of {args.stream_model} (32x32)",
            [
                {
                    "policy": p,
                    "agents JCT mean s": r["agents_jct_mean_s"],
                    "agents JCT p95 s": r["agents_jct_p95_s"],
                    "stream SLO": " / ".join(f"{x:.2f}" for x in r["stream_slo"] if x is not None),
                    "frames": " / ".join(str(x) for x in r["stream_frames"]),
                }
                for p, r in shared.items()
            ],
            ["policy", "agents JCT mean s", "agents JCT p95 s", "stream SLO", "frames"],
        )
    payload["aims"] = aims
    if aims:
        print_table("aims", aims, ["measure", "value", "aim", "met"])
    if args.plot:
        _plot(args.plot, parts)
    write_json(args.json, payload)
    return 0
