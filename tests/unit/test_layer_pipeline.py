"""The layer pipeline (block ranges per rank, hidden states point-to-point) on real gloo
ranks equals every stream's one-process run, and keeps every rank busy."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from streamrt.config import GenConfig
from streamrt.errors import InputError
from streamrt.gen.engine import GenEngine
from streamrt.models.generator_files import tiny_random_parts
from streamrt.parallel.launch import PipelineError, run_pipeline_local
from streamrt.parallel.layers import (
    LayerPipeline,
    even_ranges,
    plan_ranges,
    split_request,
    stage_engine,
)
from streamrt.world import VOCAB

PROMPTS = ["a red circle moving right on a dark background", "a blue square moving up"]
SWITCH = "a green triangle moving left on a striped background"
SMALL = {"height": 32, "width": 32, "policy_args": {"sink_blocks": 1, "window_blocks": 21}}
CHUNKS = 4
CASES = {
    # name: (world, streams, gen overrides, prompt switches {(stream, chunk): prompt})
    "batch-1stream-2ranks": (2, 1, {"sampler": "stream_batch"}, {}),
    "batch-guided-switch-3ranks": (
        3,
        1,
        {"sampler": "stream_batch", "guidance_scale": 3.0},
        {(0, 2): SWITCH},
    ),
    "chunkwise-2streams-2ranks": (2, 2, {"sampler": "chunkwise"}, {(1, 1): SWITCH}),
    "batch-4streams-grouped-2ranks": (2, 4, {"sampler": "stream_batch"}, {(3, 2): SWITCH}),
    "participative-guided-2streams-2ranks": (
        2,
        2,
        {
            "sampler": "chunkwise",
            "guidance_scale": 3.0,
            "policy": "participative",
            "policy_args": {},
        },
        {},
    ),
    # every rank's blocks through torch.compile (the one-process run compiles the whole model)
    "chunkwise-compiled-switch-2ranks": (
        2,
        1,
        {"sampler": "chunkwise", "compile": "default"},
        {(0, 2): SWITCH},
    ),
    "rolling-deep-sink-2streams-3ranks": (
        3,
        2,
        {"sampler": "rolling", "policy": "deep_sink", "policy_args": {}},
        {},
    ),
}


def engine(layers: int = 4, **overrides) -> GenEngine:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    cfg = dataclasses.replace(GenConfig(**SMALL), **overrides)  # 4 steps, 3-frame chunks
    return GenEngine(*tiny_random_parts(VOCAB, num_layers=layers), cfg)


def solo(case: str) -> list[list[torch.Tensor]]:
    """Every stream of `case` alone in one process with the whole model."""
    _world, streams, overrides, switches = CASES[case]
    e = engine(**overrides)
    out = []
    for i in range(streams):
        s = e.open_stream(PROMPTS[i % 2], e.config, seed=i)
        chunks = []
        for c in range(CHUNKS):
            if (i, c) in switches:
                s.set_prompt(switches[(i, c)])
            chunks.append(s.next_latents())
        s.close()
        out.append(chunks)
    return out


def _open(rank: int, world: int, case: str):
    """This rank's engine, pipeline (even ranges) and `case`'s streams."""
    _world, streams, overrides, _switches = CASES[case]
    whole = engine(**overrides)
    ranges = even_ranges(len(whole.transformer.blocks), world)
    e = stage_engine(whole, ranges[rank])
    pipe = LayerPipeline(e, ranges, timeout=60)
    opened = [pipe.open_stream(PROMPTS[i % 2], e.config, seed=i) for i in range(streams)]
    return e, pipe, opened


def _ranks(rank: int, world: int, case: str, out: str) -> None:
    switches = CASES[case][3]
    e, pipe, opened = _open(rank, world, case)
    got: list[list[torch.Tensor]] = [[] for _ in opened]
    for i, x0 in pipe.run(opened, CHUNKS, switches):
        got[i].append(x0)
    for s in opened:
        s.close()
    e.cache.check_invariants()
    info = (e.spec.num_layers, pipe.units, pipe.bytes_sent, pipe.log)
    torch.save((got, info), f"{out}.{rank}")


@pytest.mark.parametrize("case", list(CASES))
def test_ranks_equal_every_streams_one_process_run(case, tmp_path):
    world = CASES[case][0]
    out = str(tmp_path / "latents")
    run_pipeline_local(_ranks, world, case, out, timeout=120)
    ref = solo(case)
    atol = 1e-4 if "compile" in CASES[case][2] else 1e-5  # other graphs, other float order
    results = [torch.load(f"{out}.{r}", weights_only=True) for r in range(world)]
    layers = [info[0] for _, info in results]
    assert layers == [len(r) for r in even_ranges(4, world)]  # each cache: its blocks only
    units = {info[1] for _, info in results}
    assert len(units) == 1  # every rank ran every unit
    for rank, (got, _) in enumerate(results):  # every rank follows the same streams
        for i, (chunks, expected) in enumerate(zip(got, ref)):
            assert len(chunks) == CHUNKS
            for c, (a, b) in enumerate(zip(chunks, expected)):
                assert b.abs().max() > 0.1
                torch.testing.assert_close(
                    a, b, rtol=0, atol=atol, msg=f"{case}: rank {rank} stream {i} chunk {c}"
                )
    # Pipelined: rank 0 starts a unit before the last rank has finished the one before it.
    first, last = results[0][1][3], results[-1][1][3]
    assert any(first[k + 1][1] < last[k][2] for k in range(len(last) - 1))
    assert results[0][1][2] > 0 and results[-1][1][2] > 0  # hidden states out, velocities back


def test_plan_ranges_balances_measured_times():
    assert even_ranges(4, 2) == [range(0, 2), range(2, 4)]
    assert [len(r) for r in even_ranges(4, 3)] in ([2, 1, 1], [1, 2, 1], [1, 1, 2])
    # a slow embedding moves blocks off the first rank; a slow head off the last
    assert plan_ranges([1.0] * 4, 2, embed_s=2.0) == [range(0, 1), range(1, 4)]
    assert plan_ranges([1.0] * 4, 2, head_s=2.0) == [range(0, 3), range(3, 4)]
    assert plan_ranges([4.0, 1, 1, 1, 1], 2) == [range(0, 1), range(1, 5)]
    with pytest.raises(InputError, match=r"1\.\.4 ranks"):
        plan_ranges([1.0] * 4, 5)


def test_split_request_keeps_chunks_and_guidance_branches_together():
    e = engine(sampler="stream_batch", guidance_scale=3.0)
    s = e.open_stream(PROMPTS[0], e.config)
    steps = s.chunk_steps()
    req = next(steps)
    for _ in range(3):  # fill the window: 4 chunks in flight, 8 rows (cond + uncond)
        req = steps.send(s.run_alone(req))
    assert len(req.rows) == 8
    units = split_request(req, 2)
    assert [len(u.rows) for u in units] == [4, 4]
    seqs = [s.seqs[0], s.seqs[0], s.seqs[1], s.seqs[1]]
    assert [r.seq for r in units[0].rows] == seqs
    assert units[0].rows[0] is req.rows[0] and units[0].rows[2] is req.rows[4]
    assert torch.equal(units[1].x, req.x[[2, 3, 6, 7]])
    s.close()


def _fails(rank: int, world: int, bad: int, stall: bool) -> None:
    import time

    whole = engine(sampler="stream_batch")
    ranges = even_ranges(4, world)
    e = stage_engine(whole, ranges[rank])
    pipe = LayerPipeline(e, ranges, timeout=5)
    stream = pipe.open_stream(PROMPTS[0], e.config)
    for n, _ in enumerate(pipe.run([stream], 6)):
        if rank == bad and n == 1:
            if stall:
                time.sleep(60)  # alive but stuck: its peers must not wait forever
            raise ValueError(f"boom on rank {rank}")


@pytest.mark.parametrize("bad,stall", [(0, False), (2, False), (1, True)])
def test_a_failing_or_stalled_rank_ends_the_run_naming_it(bad, stall):
    import time

    t0 = time.perf_counter()
    pattern = f"rank {bad} failed: ValueError: boom on rank {bad}"
    if stall:  # a neighbour times out waiting on it, and names it
        pattern = f"rank \\d: (hidden states|velocity|sending).* rank {bad} (failed|did not)"
    with pytest.raises(PipelineError, match=pattern):
        run_pipeline_local(_fails, 3, bad, stall, timeout=30)
    assert time.perf_counter() - t0 < 50  # the others exit: no hang


MOVES = {
    # name: (case whose streams run, block ranges after chunk 1 and after chunk 2)
    "batch-4streams-grouped-2ranks": ([(0, 1), (1, 4)], [(0, 3), (3, 4)]),
    "participative-guided-2streams-2ranks": ([(0, 3), (3, 4)], [(0, 1), (1, 4)]),
    # compiled blocks: a rank's next forward builds graphs for its new range
    "chunkwise-compiled-switch-2ranks": ([(0, 1), (1, 4)], [(0, 3), (3, 4)]),
    "rolling-deep-sink-2streams-3ranks": ([(0, 2), (2, 3), (3, 4)], [(0, 1), (1, 3), (3, 4)]),
}


def _moved(rank: int, world: int, case: str, out: str) -> None:
    switches = CASES[case][3]
    e, pipe, opened = _open(rank, world, case)
    got: list[list[torch.Tensor]] = [[] for _ in opened]
    plan = [None, *MOVES[case], None]
    for c in range(CHUNKS):  # one chunk per run: the blocks move between runs
        if plan[c] is not None:
            pipe.rebalance([range(a, b) for a, b in plan[c]])
            e.cache.check_invariants()
        now = {i: p for (i, k), p in switches.items() if k == c}
        for i, x0 in pipe.run(opened, 1, {(i, 0): p for i, p in now.items()}):
            got[i].append(x0)
    for s in opened:
        s.close()
    torch.save((got, e.spec.num_layers, len(e.transformer.blocks), pipe.moves), f"{out}.{rank}")


@pytest.mark.parametrize("case", list(MOVES))
def test_moving_blocks_and_their_kv_between_chunks_keeps_every_stream_exact(case, tmp_path):
    """Blocks (weights and every live block's K/V of their layers) move between ranks
    while the streams run: the later chunks attend to moved K/V, and still equal the solo
    run."""
    world = CASES[case][0]
    out = str(tmp_path / "moved")
    run_pipeline_local(_moved, world, case, out, timeout=120)
    ref = solo(case)
    atol = 1e-4 if "compile" in CASES[case][2] else 1e-5
    final = MOVES[case][-1]
    for rank in range(world):
        got, layers, blocks, moves = torch.load(f"{out}.{rank}", weights_only=False)
        assert layers == blocks == final[rank][1] - final[rank][0]
        for i, (chunks, expected) in enumerate(zip(got, ref)):
            assert len(chunks) == CHUNKS
            for c, (a, b) in enumerate(zip(chunks, expected)):
                torch.testing.assert_close(
                    a, b, rtol=0, atol=atol, msg=f"{case}: rank {rank} stream {i} chunk {c}"
                )
        assert [m["to"] for m in moves] == [[range(a, b) for a, b in p] for p in MOVES[case]]
        assert sum(m["bytes"] for m in moves) > 0  # every rank gives a block away here


def _slow_rank(rank: int, world: int, out: str) -> None:
    import time

    whole = engine(sampler="stream_batch")
    ranges = even_ranges(4, world)
    e = stage_engine(whole, ranges[rank])
    if rank == 1:  # a slower device: every block of rank 1 takes 15 ms longer
        for block in e.transformer.blocks:
            block.register_forward_hook(lambda *_: time.sleep(0.015))
    pipe = LayerPipeline(e, ranges, timeout=60, rebalance_every=3)
    stream = pipe.open_stream(PROMPTS[0], e.config, seed=0)
    got = [x0 for _, x0 in pipe.run([stream], CHUNKS)]
    stream.close()
    e.cache.check_invariants()
    torch.save((got, pipe.ranges, pipe.moves, e.spec.num_layers), f"{out}.{rank}")


def test_a_slow_rank_gives_its_blocks_away_while_the_stream_runs(tmp_path):
    out = str(tmp_path / "slow")
    run_pipeline_local(_slow_rank, 2, out, timeout=120)
    ref = solo("batch-1stream-2ranks")[0]
    for rank in range(2):
        got, ranges, moves, layers = torch.load(f"{out}.{rank}", weights_only=False)
        assert ranges == [range(0, 3), range(3, 4)]  # the slow rank keeps one block
        assert len(moves) == 1 and moves[0]["from"] == [range(0, 2), range(2, 4)]
        before, after = moves[0]["planned_s"]
        assert after < 0.8 * before
        assert layers == len(ranges[rank])
        for c, (a, b) in enumerate(zip(got, ref)):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5, msg=f"rank {rank} chunk {c}")
