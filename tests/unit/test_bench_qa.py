"""`streamrt bench qa` end to end on the tiny random model, at tiny sizes."""

from __future__ import annotations

import json

import torch

from streamrt.apps.cli import main


def test_bench_qa_writes_rows_and_retrieval_beats_the_window(tmp_path, capsys):
    out = tmp_path / "qa.json"
    argv = ["bench", "qa", "--max-frames", "90", "--window", "4", "--repeats", "1"]
    argv += ["--baseline-max-frames", "60", "--trials", "4", "--needle-scales", "1,6"]
    argv += ["--json", str(out)]
    threads = torch.get_num_threads()
    assert main(argv) == 0
    assert torch.get_num_threads() == threads  # the bench restores the caller's setting
    assert "mechanics benchmark of the memory" in capsys.readouterr().out

    data = json.loads(out.read_text())
    assert data["suite"] == "qa" and data["window_frames"] == 4 and data["retrieve_frames"] == 4
    measures = [r["measure"] for r in data["rows"]]
    assert measures[0] == "encode FPS" and len(measures) == 6
    assert [p["frames"] for p in data["points"]] == [60, 90]
    for point in data["points"]:
        assert point["encode fps"] > 0 and point["answer ms"] > 0 and point["re-prefill ms"] > 0
        assert point["speedup"] == point["re-prefill ms"] / point["answer ms"]
        assert 0 < point["device KiB"] < point["re-prefill KV KiB"]
    first, second = data["points"]
    assert (first["baseline"], second["baseline"]) == ("measured", "linear from 60")
    assert second["re-prefill ms"] == first["re-prefill ms"] * 90 / 60
    # sink + window on the device, whatever the stream's length
    assert first["device KiB"] == second["device KiB"]
    assert second["host KiB"] > first["host KiB"]

    near, far = data["needle"]
    assert (near["frames"], far["frames"], far["trials"]) == (4, 24, 4)
    assert near["window-only"] == near["retrieval"] == 1.0  # the whole stream is in the window
    assert far["retrieval"] >= far["window-only"]
    assert far["retrieval"] == 1.0  # the hand-set layer 0 always finds the needle
