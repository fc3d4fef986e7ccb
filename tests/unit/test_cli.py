"""The `streamrt` entry point."""

import json
import subprocess
import sys

import pytest

from streamrt.apps.cli import main


def test_generate_without_default_model_says_so(tmp_path, capsys):
    rc = main(
        [
            "generate",
            "--prompt",
            "a red circle",
            "--model",
            str(tmp_path),
            "-o",
            str(tmp_path / "o.mp4"),
        ]
    )
    assert rc == 2
    err = capsys.readouterr().err
    assert "holds no streamrt generator" in err and "--model tiny-random" in err
    assert "train gen" not in err  # a wrong path is a path, not a 195-minute retrain
    assert not (tmp_path / "o.mp4").exists()


def test_generate_finds_the_embedded_model_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "o.mp4"
    assert main(["generate", "--prompt", "a red circle", "--frames", "3", "-o", str(out)]) == 0
    assert out.stat().st_size > 0


def test_config_prints_effective_values(capsys):
    assert main(["config"]) == 0
    assert "device_bytes: 1073741824" in capsys.readouterr().out


def test_bench_cache_writes_json(tmp_path):
    out = tmp_path / "b.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "streamrt.apps.cli",
            "bench",
            "cache",
            "--ops",
            "2000",
            "--blocks",
            "4",
            "--block-mib",
            "0.25",
            "--repeats",
            "1",
            "--disk-dir",
            str(tmp_path),
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    assert {r["measure"] for r in data["allocation"]} == {
        "block pool take+release",
        "manager append+free",
    }
    assert all(r["bit-exact"] for r in data["moves"]) and len(data["moves"]) == 4
    assert all(r["GB/s"] > 0 and r["ratio"] > 0 for r in data["moves"])
    assert "block allocation" in proc.stdout


def test_stream_world_source_to_mp4_and_back(tmp_path, capsys):
    from streamrt.io.sinks import read_video

    out = tmp_path / "styled.mp4"
    rc = main(
        [
            "stream",
            "--input",
            "world://seed=3",
            "--output",
            str(out),
            "--prompt",
            "a purple triangle moving up on a light background",
            "--frames",
            "10",
            "--model",
            "tiny-random",
            "--size",
            "32x32",
            "--policy-args",
            "sink_blocks=1,window_blocks=12",
        ]
    )
    assert rc == 0
    video = read_video(out)
    assert video.shape == (10, 32, 32, 3)  # one output frame per input frame, flushed at the end
    rc = main(
        [
            "stream",
            "--input",
            str(out),
            "--output",
            str(tmp_path / "again.mp4"),
            "--prompt",
            "a red circle moving up on a light background",
            "--model",
            "tiny-random",
            "--size",
            "32x32",
            "--policy-args",
            "sink_blocks=1,window_blocks=12",
        ]
    )
    assert rc == 0 and read_video(tmp_path / "again.mp4").shape[0] == 10
    capsys.readouterr()
    assert (
        main(
            [
                "stream",
                "--input",
                str(tmp_path / "nope.mp4"),
                "--output",
                str(tmp_path / "x.mp4"),
                "--prompt",
                "a red circle",
                "--model",
                "tiny-random",
            ]
        )
        == 2
    )
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "x.mp4").exists()


def test_corrupt_input_file_fails_with_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"garbage" * 100)
    rc = main(
        [
            "stream",
            "--input",
            str(bad),
            "--output",
            str(tmp_path / "x.mp4"),
            "--prompt",
            "a red circle moving up on a light background",
            "--model",
            "tiny-random",
        ]
    )
    assert rc == 2
    assert "cannot open input" in capsys.readouterr().err


def test_bench_gen_reports_every_measure_against_its_baseline(tmp_path):
    out = tmp_path / "g.json"
    args = ["bench", "gen", "--model", "tiny-random", "--chunks", "2", "--threads", "1"]
    args += ["--long-frames", "240", "--long-size", "32x32", "--json", str(out)]
    assert main(args) == 0
    rows = {r["measure"].split(" (")[0]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {
        "FPS",
        "time to first frame",
        "per-frame p50 / p99",
        "cache vs recompute speedup",
        "stream batch vs sequential",
        "cost at frame 240 / frame 200",
        "Wan VAE decode ms/frame",
        "Wan VAE decode max |diff| vs diffusers",
        "stream() ms/frame, decode overlapped",
        "stream() first frame s, decode overlapped",
        "stream() ms/frame, decode overlapped, tiny Wan-VAE model",
        "stream() first frame s, decode overlapped, tiny Wan-VAE model",
    }
    assert rows["FPS"]["value"] > 0 and rows["time to first frame"]["value"] > 0
    assert rows["Wan VAE decode max |diff| vs diffusers"]["value"] <= 1e-5
    for name in ("cache vs recompute speedup", "stream batch vs sequential"):
        assert 0.05 < rows[name]["value"] < 50, rows[name]


def test_serve_takes_every_agent_policy_with_and_without_the_reserve():
    from streamrt.apps.cli import build_parser
    from streamrt.errors import InputError
    from streamrt.runtime import Runtime

    parser = build_parser()
    args = parser.parse_args(["serve", "--agents", "--agent-policy", "offload+reserve"])
    assert args.agent_policy == "offload+reserve"
    with pytest.raises(InputError, match=r"choose from .*'offload\+reserve'"):
        parser.parse_args(["serve", "--agents", "--agent-policy", "lru"])
    rt = Runtime("tiny-random", qa=False, agents=True, agent_policy=args.agent_policy)
    try:
        assert rt.agents.reserve is not None
    finally:
        rt.close()


def test_bench_gen_times_the_late_and_the_early_stream_in_turns(monkeypatch):
    """Early (frame 200) and late chunks alternate, so the machine's drift over the minutes
    it takes to reach the late frame does not enter their ratio."""
    import argparse

    from streamrt.apps.bench import gen as bench_gen

    timed = []

    def record(stream, n):
        timed.append(stream.seqs[0].next_index)
        stream.next_latents()
        return [1.0 if timed[-1] >= 240 else 0.5]

    monkeypatch.setattr(bench_gen, "_time_chunks", record)
    args = argparse.Namespace(
        model="tiny-random", config=None, window=15, chunks=3, long_frames=240, long_size="32x32"
    )
    early, late = bench_gen._late_vs_early(args)
    assert (early, late) == (0.5, 1.0)
    assert len(timed) == 6
    assert all(200 <= f < 240 for f in timed[0::2]) and all(f >= 240 for f in timed[1::2])
