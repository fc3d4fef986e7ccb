"""The pipelines' command-line surfaces: `torchrun ... generate --parallel steps|layers`
writes what one process writes, a missing process group says how to launch, and
`streamrt bench pipeline` measures both pipelines against one process."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from streamrt.apps.generate_parallel import chunks_for

PROMPT = "a red circle moving right on a dark background"
COMMON = ["--prompt", PROMPT, "--model", "tiny-random", "--frames", "12", "--size", "32x32"]


def _generate(args: list[str], out, ranks: int = 0) -> np.ndarray:
    from streamrt.io.sources import open_source
    from streamrt.parallel.launch import free_port

    cmd = [sys.executable, "-m"]
    if ranks:
        cmd += ["torch.distributed.run", f"--nproc_per_node={ranks}"]
        cmd += ["--master_port", str(free_port()), "-m"]
    cmd += ["streamrt.apps.cli", "generate", *COMMON, *args, "-o", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return np.stack(list(open_source(str(out))))


def test_layers_under_torchrun_write_the_one_process_video(tmp_path):
    """The layer pipeline on 2 ranks (the last writes) gives the frames of a one-process
    stream-batch `streamrt generate` with the same settings."""
    args = ["--sampler", "stream_batch", "--policy-args", "sink_blocks=1,window_blocks=14"]
    split = _generate(
        [*args, "--parallel", "layers", "--rebalance-every", "1"], tmp_path / "split.mp4", ranks=2
    )
    one = _generate(args, tmp_path / "one.mp4")
    assert split.shape == one.shape == (12, 32, 32, 3)
    assert np.abs(split.astype(int) - one.astype(int)).max() <= 2  # same frames, same encoder


def test_steps_under_torchrun_write_a_video_and_refuse_other_samplers(tmp_path, capsys):
    frames = _generate(["--parallel", "steps"], tmp_path / "steps.mp4", ranks=2)
    assert frames.shape == (12, 32, 32, 3) and frames.std() > 1
    from streamrt.apps.cli import main

    bad = ["generate", *COMMON, "--parallel", "steps", "--sampler", "rolling"]
    assert main([*bad, "-o", str(tmp_path / "x.mp4")]) == 2
    assert "--sampler rolling applies to --parallel layers" in capsys.readouterr().err
    assert not (tmp_path / "x.mp4").exists()


def test_parallel_without_a_process_group_says_how_to_launch(tmp_path, capsys, monkeypatch):
    from streamrt.apps.cli import main

    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    args = ["generate", "--prompt", PROMPT, "--model", "tiny-random", "--parallel", "layers"]
    assert main([*args, "-o", str(tmp_path / "o.mp4")]) == 2
    assert "torchrun --nproc_per_node" in capsys.readouterr().err
    assert not (tmp_path / "o.mp4").exists()


@pytest.mark.parametrize(
    "frames,chunk,temporal,expected",
    [(12, 3, 1, 4), (13, 3, 1, 5), (1, 3, 1, 1), (5, 3, 2, 1), (6, 3, 2, 2), (11, 3, 2, 2)],
)
def test_chunks_for_covers_the_frames(frames, chunk, temporal, expected):
    assert chunks_for(frames, chunk, temporal) == expected


def test_bench_pipeline_measures_both_pipelines_against_one_process(tmp_path):
    import json

    from streamrt.apps.cli import main

    out = tmp_path / "p.json"
    args = ["bench", "pipeline", "--model", "tiny-random", "--size", "32x32", "--chunks", "2"]
    args += ["--warmup", "1", "--ranks", "1,2", "--json", str(out)]
    assert main(args) == 0
    payload = json.loads(out.read_text())
    rows = {(r["mode"], r["processes"]): r for r in payload["rows"]}
    assert set(rows) == {("steps", 1), ("steps", 2), ("layers", 1), ("layers", 2)}
    for (_mode, world), row in rows.items():
        assert row["fps"] > 0 and row["first frame s"] > 0 and row["gap p99 s"] >= 0
        assert row["max |diff|"] < 1e-4  # same latents on 2 processes as on 1
        assert (row["KB sent/chunk"] > 0) == (world > 1)
    # the layer pipeline sends hidden states, the step pipeline only latents
    assert rows[("layers", 2)]["KB sent/chunk"] > rows[("steps", 2)]["KB sent/chunk"]
    wan = {r["mode"]: r for r in payload["wan_1_3b"]}
    assert 1.0 < wan["steps"]["Wan-1.3B 480x832 MB/chunk/hop"] < 1.5


def test_bench_pipeline_rebalance_moves_blocks_off_a_slow_rank(tmp_path):
    import json

    from streamrt.apps.cli import main

    out = tmp_path / "r.json"
    args = ["bench", "pipeline", "--modes", "rebalance", "--ranks", "2", "--slowdown", "4"]
    args += ["--chunks", "3", "--warmup", "3", "--json", str(out)]
    assert main(args) == 0
    (row,) = json.loads(out.read_text())["rebalance"]
    assert row["processes"] == 2 and row["static fps"] > 0 and row["rebalanced fps"] > 0
    assert row["moves"] >= 1 and row["ranges after"] == "0-3 3-4"  # the slow rank keeps one
    assert row["max |diff|"] < 1e-5  # the same latents as with static ranges
