"""Row-parallel generation over a real gloo group equals the single-process stream."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from streamrt.config import GenConfig
from streamrt.gen.engine import GenEngine
from streamrt.gen.generator import StreamGenerator
from streamrt.models.generator_files import tiny_random_parts
from streamrt.parallel import RowParallel
from streamrt.parallel.launch import parallelize, run_local
from streamrt.world import VOCAB

PROMPT = "a red circle moving right on a dark background"
SMALL = {"height": 32, "width": 32, "policy_args": {"sink_blocks": 1, "window_blocks": 14}}
CASES = {
    "stream_batch": {"sampler": "stream_batch", "clean_refresh": False},
    "stream_batch_refresh": {"sampler": "stream_batch", "clean_refresh": True},
    "guided_chunkwise": {"sampler": "chunkwise", "guidance_scale": 3.0},
    "rolling": {"sampler": "rolling"},
    "chunkwise": {"sampler": "chunkwise"},
}
"""Forwards of 4, 4 (+1 at t=0), 2, 1 and 1 rows."""
FRAMES = 27  # 9 chunks: past warm-up, and the window of 15 frames evicts


def latents(case: str, parallel: RowParallel | None = None) -> torch.Tensor:
    """The first `FRAMES` frames' latents of a tiny random generator's stream."""
    torch.manual_seed(0)
    torch.set_num_threads(1)
    cfg = dataclasses.replace(GenConfig(**SMALL), **CASES[case])
    gen = StreamGenerator(GenEngine(*tiny_random_parts(VOCAB), cfg))
    if parallel is not None:
        parallelize(gen, parallel)
    stream = gen.engine.open_stream(PROMPT, cfg)
    out = torch.cat([stream.next_latents() for _ in range(FRAMES // cfg.chunk_frames)], dim=2)
    stream.close()
    gen.engine.cache.check_invariants()
    return out


def _ranks(rank: int, world: int, cases: list[str], out: str) -> None:
    for case in cases:
        parallel = RowParallel()
        x = latents(case, parallel)
        torch.save((x, parallel.rows_computed, parallel.rows_total), f"{out}.{case}.{rank}")


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_equal_one_process(world, tmp_path):
    """Every sampler's stream, its rows split over 2 or 3 gloo ranks (more ranks than rows
    in most forwards: the spare ranks run dummies in step), equals one process's."""
    out = str(tmp_path / "latents")
    run_local(_ranks, world, list(CASES), out)
    for case in CASES:
        single = latents(case)
        assert single.abs().max() > 0.1
        computed = []
        for rank in range(world):
            split, mine, total = torch.load(f"{out}.{case}.{rank}")
            # Same math; a row alone vs rows batched can differ in float summation order.
            torch.testing.assert_close(split, single, rtol=0, atol=1e-5, msg=f"{case} rank {rank}")
            computed.append(mine)
        assert sum(computed) == total  # every row ran exactly once, on one rank
        if case.startswith("stream_batch"):  # 4 rows per forward: every rank takes a share
            assert min(computed) >= total // (3 * world), (case, computed, total)
