"""Row-parallel generation over a real gloo group equals the single-process stream."""

from __future__ import annotations

import dataclasses

import numpy as np
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
            split, mine, total = torch.load(f"{out}.{case}.{rank}", weights_only=True)
            # Same math; a row alone vs rows batched can differ in float summation order.
            torch.testing.assert_close(split, single, rtol=0, atol=1e-5, msg=f"{case} rank {rank}")
            computed.append(mine)
        assert sum(computed) == total  # every row ran exactly once, on one rank
        if case.startswith("stream_batch"):  # 4 rows per forward: every rank takes a share
            assert min(computed) >= total // (3 * world), (case, computed, total)


def test_generate_under_torchrun_writes_the_single_process_video(tmp_path):
    """`torchrun --nproc_per_node=2 -m streamrt.apps.cli generate --parallel steps` (rank 0
    writes) gives the frames of a one-process stream-batch `streamrt generate`."""
    import os
    import subprocess
    import sys

    from streamrt.io.sources import open_source
    from streamrt.parallel.launch import free_port

    common = ["--prompt", PROMPT, "--model", "tiny-random", "--frames", "12"]
    common += ["--size", "32x32", "--policy-args"]
    common += ["sink_blocks=1,window_blocks=14"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2"]
    torchrun += ["--master_port", str(free_port()), "-m", "streamrt.apps.cli", "generate"]
    split, one = tmp_path / "split.mp4", tmp_path / "one.mp4"
    single = [sys.executable, "-m", "streamrt.apps.cli", "generate", "--sampler", "stream_batch"]
    for cmd in (
        [*torchrun, *common, "--parallel", "steps", "-o", str(split)],
        [*single, *common, "-o", str(one)],
    ):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    a = np.stack(list(open_source(str(split))))
    b = np.stack(list(open_source(str(one))))
    assert a.shape == b.shape == (12, 32, 32, 3)
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 2  # same frames, same encoder


def test_parallel_without_a_process_group_says_how_to_launch(tmp_path, capsys, monkeypatch):
    from streamrt.apps.cli import main

    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    args = ["generate", "--prompt", PROMPT, "--model", "tiny-random", "--parallel", "rows"]
    assert main([*args, "-o", str(tmp_path / "o.mp4")]) == 2
    assert "torchrun --nproc_per_node" in capsys.readouterr().err
    assert not (tmp_path / "o.mp4").exists()


def test_bench_pipeline_compares_ranks_with_one_process(tmp_path):
    import json

    from streamrt.apps.cli import main

    out = tmp_path / "p.json"
    args = ["bench", "pipeline", "--model", "tiny-random", "--size", "32x32", "--chunks", "1"]
    args += ["--warmup", "1", "--samplers", "stream_batch", "--json", str(out)]
    assert main(args) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert row["sampler"] == "stream_batch" and row["ranks fps"] > 0
    assert row["max |diff|"] < 1e-4 and 0.01 < row["vs 1 thread"] < 100
