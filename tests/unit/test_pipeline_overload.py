"""The degrade order on a layer-pipeline group (`PipelineRuntime`, real gloo ranks): rank 0
decides with the runtime's own `Overload` code, every rank applies each change at the same
round: fewer steps for the lowest-priority streams, then suspension (every rank's share of
the KV on the host), then resume and the full steps back. A stream only suspended and
resumed equals its one-process run exactly; a new higher-priority stream beyond capacity
suspends a lower one instead of being refused."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from streamrt.config import GenConfig, RuntimeConfig
from streamrt.gen.engine import GenEngine
from streamrt.models.generator_files import tiny_random_parts
from streamrt.parallel.launch import run_pipeline_local
from streamrt.parallel.layers import LayerPipeline, even_ranges, stage_engine
from streamrt.world import VOCAB

PROMPTS = [
    "a red circle moving right on a dark background",
    "a blue square moving up on a light background",
    "a green triangle moving left on a striped background",
]
SMALL = {"height": 32, "width": 32, "policy_args": {"sink_blocks": 1, "window_blocks": 21}}


def _engine() -> GenEngine:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    return GenEngine(*tiny_random_parts(VOCAB, num_layers=4), GenConfig(**SMALL))


def _runtime(rank: int, world: int, config: RuntimeConfig):
    from streamrt.parallel.serving import PipelineRuntime

    whole = _engine()
    ranges = even_ranges(len(whole.transformer.blocks), world)
    pipe = LayerPipeline(stage_engine(whole, ranges[rank]), ranges, timeout=60)
    return PipelineRuntime(pipe, runtime=config)


def _tiers(rt, sid: str) -> set[str]:
    stream = rt.streams[sid].stream
    return {b.tier for seq in stream.seqs for b in seq.table.values()}


def _degrade_ranks(rank: int, world: int, out: str) -> None:
    # a change at most every 30 s: only the test's clock moves (a round may take seconds)
    rt = _runtime(rank, world, RuntimeConfig(admission=False, suspend_late_s=30))
    log = []
    if rank != 0:
        apply = rt._round

        def watched(commands):  # what this rank applied, and where its KV was after
            ok = apply(commands)
            for sid, live in rt.streams.items():
                if live.stream is not None:
                    log.append((rt.rounds, sid, len(live.stream.sigmas), _tiers(rt, sid)))
            return ok

        rt._round = watched
        rt.follow()
        torch.save(log, f"{out}.{rank}")
        return
    # 1 fps each: once caught up, all three fit the pipeline's measured speed again
    handles = [rt.open_stream(p, fps=1, priority=pr) for p, pr in zip(PROMPTS, (1, 0, 0))]
    rt._lead_round()  # opens them and runs their first chunk
    for h in handles:
        h._live.playout.opened -= 100  # 100 seconds behind

    def states():
        return [(rt.stream_stats(h.id)["state"], rt.stream_stats(h.id)["steps"]) for h in handles]

    rt._lead_round()
    log.append(states())
    rt._lead_round()  # at most one change per suspend_late_s
    log.append(states())
    for _ in range(3):
        rt._last_change -= 31
        rt._lead_round()
        log.append(states())
    rt._lead_round()  # the next round boundary: the suspended stream's KV leaves
    log.append(_tiers(rt, handles[2].id))
    for h in handles:
        h._live.playout.opened += 1e6  # caught up
    for _ in range(3):
        rt._last_change -= 31
        rt._lead_round()
        log.append(states())
    log.append(_tiers(rt, handles[2].id))
    log.append(dict(rt.counters))
    with rt._cond:
        rt._stopping = True
    rt._lead_round()
    torch.save(log, f"{out}.0")


def test_the_degrade_order_runs_on_every_rank(tmp_path):
    out = str(tmp_path / "log")
    run_pipeline_local(_degrade_ranks, 2, out, timeout=120)
    log = torch.load(f"{out}.0", weights_only=False)
    assert log[:5] == [
        [("running", 4), ("running", 4), ("running", 2)],  # the latest lowest first
        [("running", 4), ("running", 4), ("running", 2)],
        [("running", 4), ("running", 2), ("running", 2)],
        [("running", 2), ("running", 2), ("running", 2)],
        [("running", 2), ("running", 2), ("suspended", 2)],
    ]
    assert log[5] == {"host"}  # rank 0's share of the suspended stream's KV
    assert log[6:9] == [  # resumed first, then the full steps back, highest priority first
        [("running", 2), ("running", 2), ("running", 2)],
        [("running", 4), ("running", 2), ("running", 2)],
        [("running", 4), ("running", 4), ("running", 2)],
    ]
    assert log[9] == {"device"}
    assert log[10] == {"degraded": 3, "suspended": 1, "resumed": 1, "restored": 2}
    # rank 1 applied the same schedules, and moved its share of the KV out and back
    other = torch.load(f"{out}.1", weights_only=False)
    steps = {(sid, n) for _, sid, n, _ in other}
    assert {("s0", 2), ("s1", 2), ("s2", 2), ("s0", 4), ("s1", 4)} <= steps
    tiers = [t for _, sid, _, t in other if sid == "s2"]
    assert {"host"} in tiers and tiers[-1] == {"device"}


def _priority_ranks(rank: int, world: int, out: str) -> None:
    config = RuntimeConfig(headroom=0.5, suspend_late_s=0.2, degrade_steps=0)
    rt = _runtime(rank, world, config)
    if rank != 0:
        rt.follow()
        return
    rt.start()
    try:
        low = rt.open_stream(PROMPTS[0], num_frames=12, seed=0, priority=0)
        frames = low.frames(timeout=60)
        first = [next(frames) for _ in range(3)]
        while rt.forward_s is None:  # the round that made them measures the pipeline
            time.sleep(0.01)
        fps = 0.4 / (rt.forward_s * 5 / 3)  # 40 % of the pipeline at 5 forwards a chunk
        with rt._cond:
            rt.streams[low.id].playout.fps = fps
        high = rt.open_stream(PROMPTS[1], num_frames=6, seed=1, fps=fps, priority=1)
        suspended = rt.stream_stats(low.id)["state"]
        assert len(list(high.frames(timeout=60))) == 6
        rest = list(frames)
        stats = rt.stats()
    finally:
        rt.close()
    torch.save({"suspended": suspended, "frames": np.stack(first + rest), "stats": stats}, out)


def test_a_higher_priority_stream_suspends_a_lower_one_which_resumes_exactly(tmp_path):
    out = str(tmp_path / "log")
    run_pipeline_local(_priority_ranks, 2, out, timeout=120)
    got = torch.load(out, weights_only=False)
    assert got["suspended"] == "suspended" and len(got["frames"]) == 12
    assert got["stats"]["suspended"] == 1 and got["stats"]["resumed"] == 1
    e = _engine()
    s = e.open_stream(PROMPTS[0], e.config, seed=0)
    solo = np.concatenate([s.next_frames() for _ in range(4)])
    # float32 through another split of the blocks: at most one grey level apart
    assert np.abs(got["frames"].astype(int) - solo.astype(int)).max() <= 1


pytestmark = pytest.mark.timeout(300)
