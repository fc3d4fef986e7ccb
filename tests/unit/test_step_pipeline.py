"""The denoising-step pipeline (timestep forcing, one cache per step) on real gloo ranks
equals its one-process reference, and differs from the chunk-wise sampler."""

from __future__ import annotations

import dataclasses
import time

import pytest
import torch

from streamrt.config import GenConfig
from streamrt.errors import InputError
from streamrt.gen.engine import GenEngine
from streamrt.models.generator_files import tiny_random_parts
from streamrt.parallel.steps import (
    PipelineError,
    StepPipeline,
    StepPipelineReference,
    run_pipeline_local,
    steps_of_rank,
)
from streamrt.world import VOCAB

PROMPT = "a red circle moving right on a dark background"
SMALL = {"height": 32, "width": 32, "policy_args": {"sink_blocks": 1, "window_blocks": 9}}
CHUNKS = 5  # 15 frames: the window of 9 evicts at every step cache


def engine(**overrides) -> GenEngine:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    cfg = dataclasses.replace(GenConfig(**SMALL), **overrides)  # 4 steps, 3-frame chunks
    return GenEngine(*tiny_random_parts(VOCAB), cfg)


SWITCH = "a green triangle moving left on a striped background"


def reference(chunks: int = CHUNKS, switches=None, **overrides) -> list[torch.Tensor]:
    e = engine(**overrides)
    ref = StepPipelineReference(e, PROMPT)
    out = [ref.next_latents((switches or {}).get(c)) for c in range(chunks)]
    ref.close()
    e.cache.check_invariants()
    return out


def chunkwise(chunks: int = CHUNKS, **overrides) -> list[torch.Tensor]:
    e = engine(sampler="chunkwise", **overrides)
    stream = e.open_stream(PROMPT, e.config)
    out = [stream.next_latents() for _ in range(chunks)]
    stream.close()
    return out


def _ranks(rank: int, world: int, out: str, overrides: dict, switches: dict) -> None:
    e = engine(**overrides)
    pipe = StepPipeline(e, PROMPT, timeout=60)
    got = list(pipe.chunks(CHUNKS, switches))
    pipe.close()
    e.cache.check_invariants()
    forwards = sum(s.forwards for s in pipe.stages)
    torch.save((got, list(pipe.steps), forwards, pipe.log), f"{out}.{rank}")


PARTICIPATIVE = {"policy": "participative", "policy_args": {}}


@pytest.mark.parametrize(
    "world,overrides,switches",
    [
        (4, {}, {}),
        (2, {}, {}),
        (2, {"renoise": "predicted"}, {}),
        (2, {"guidance_scale": 3.0}, {2: SWITCH}),
        (3, PARTICIPATIVE, {3: SWITCH}),
        (2, {"policy": "ema_sink", "policy_args": {}}, {}),
    ],
    ids=[
        "4ranks",
        "2ranks-2steps-each",
        "2ranks-predicted",
        "2ranks-guided-switch",
        "3ranks-participative-switch",
        "2ranks-ema-sink",
    ],
)
def test_ranks_equal_the_one_process_reference(world, overrides, switches, tmp_path):
    out = str(tmp_path / "latents")
    run_pipeline_local(_ranks, world, out, overrides, switches, timeout=120)
    ref = reference(switches=switches, **overrides)
    steps, logs = [], []
    for rank in range(world):
        got, mine, forwards, log = torch.load(f"{out}.{rank}", weights_only=True)
        logs.append(log)
        steps += mine
        assert forwards == CHUNKS * len(mine)  # one forward per chunk per owned step
        if rank < world - 1:
            assert got == []  # only the last rank emits chunks
    assert steps == [0, 1, 2, 3]  # every step on exactly one rank, consecutive
    assert len(got) == CHUNKS
    if switches:  # the switch changes what comes after it, and nothing before
        plain = reference(**overrides)
        c = min(switches)
        torch.testing.assert_close(ref[c - 1], plain[c - 1], rtol=0, atol=1e-6)
        assert (ref[c] - plain[c]).abs().max() > 1e-3
    # Pipelined: rank 0 starts chunk 1 before the last rank has finished chunk 0.
    assert logs[0][1][1] < logs[-1][0][2]
    for c, (a, b) in enumerate(zip(got, ref)):
        assert a.dtype == torch.float32 and a.shape == b.shape and a.shape[2] == 3
        assert b.abs().max() > 0.1
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5, msg=f"chunk {c}")


def test_reference_is_not_the_chunkwise_sampler():
    """Without random re-noise the first chunk (empty caches) is the chunk-wise sampler's;
    later chunks attend to the older chunks at their own step's noise level instead of
    their clean (or last-step) K/V, and come out different."""
    for refresh in (True, False):
        ref = reference(renoise="predicted", clean_refresh=refresh)
        one = chunkwise(renoise="predicted", clean_refresh=refresh)
        torch.testing.assert_close(ref[0], one[0], rtol=0, atol=1e-5)
        for c in range(1, CHUNKS):
            assert (ref[c] - one[c]).abs().max() > 1e-3, (refresh, c)


def test_reference_is_deterministic_and_uses_every_step_cache():
    a, b = reference(3), reference(3)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert not torch.equal(reference(3, seed=1)[0], a[0])
    e = engine()
    ref = StepPipelineReference(e, PROMPT)
    for _ in range(2):
        ref.next_latents()
    # each step keeps its own sequence holding both chunks
    assert [len(s.stream.seqs[0].table) for s in ref.stages] == [6, 6, 6, 6]
    assert len({id(s.stream.seqs[0]) for s in ref.stages}) == 4
    ref.close()


def test_steps_of_rank():
    assert [list(steps_of_rank(r, 2, 4)) for r in range(2)] == [[0, 1], [2, 3]]
    assert [list(steps_of_rank(r, 3, 4)) for r in range(3)] == [[0], [1], [2, 3]]
    with pytest.raises(InputError, match="at most one rank per step"):
        steps_of_rank(0, 5, 4)


def _fails(rank: int, world: int, bad: int) -> None:
    e = engine()
    pipe = StepPipeline(e, PROMPT, timeout=20)
    for c in range(4):
        if rank == bad and c == 1:
            raise ValueError(f"boom on rank {rank}")
        pipe.next_latents(prefetch=c < 3)
    pipe.close()


@pytest.mark.parametrize("bad", [0, 1])
def test_a_failing_rank_ends_the_run_naming_it(bad):
    t0 = time.perf_counter()
    with pytest.raises(PipelineError, match=f"rank {bad} failed: ValueError: boom on rank {bad}"):
        run_pipeline_local(_fails, 3, bad, timeout=20)
    assert time.perf_counter() - t0 < 60  # the others exit: no hang


def _stalls(rank: int, world: int) -> None:
    e = engine()
    pipe = StepPipeline(e, PROMPT, timeout=3)
    for c in range(3):
        if rank == 1 and c == 1:
            time.sleep(60)  # alive but stuck: its peers must not wait forever
        pipe.next_latents(prefetch=c < 2)
    pipe.close()


def test_a_stalled_rank_times_its_peer_out():
    t0 = time.perf_counter()
    # both neighbours of rank 1 time out; the first reported names rank 1 as the one waited on
    pattern = "rank (0: sending latents to|2: receiving latents from) rank 1 failed at chunk"
    with pytest.raises(PipelineError, match=pattern):
        run_pipeline_local(_stalls, 3, timeout=3)
    assert time.perf_counter() - t0 < 45


def _mismatch(rank: int, world: int) -> None:
    StepPipeline(engine(), PROMPT if rank == 0 else "a blue square", timeout=20)


def test_ranks_with_different_prompts_are_refused():
    with pytest.raises(PipelineError, match="rank 1 runs different prompt"):
        run_pipeline_local(_mismatch, 2, timeout=20)
