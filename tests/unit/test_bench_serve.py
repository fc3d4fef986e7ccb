"""`streamrt bench serve` runs end to end, writes its JSON, plot and a replayable trace."""

from __future__ import annotations

import json

import pytest

from streamrt.apps.cli import main


def test_bench_serve_small_run_writes_json_plot_and_replays_its_trace(tmp_path):
    out, trace, plot = tmp_path / "b.json", tmp_path / "trace.json", tmp_path / "slack.png"
    args = ["bench", "serve", "--model", "tiny-random", "--streams", "1,2", "--frames", "6"]
    args += ["--seconds", "2", "--size", "32x32", "--fps", "64", "--overload", "1"]
    args += ["--trace", str(trace), "--plot", str(plot)]
    assert main([*args, "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [r["streams"] for r in result["concurrency"]] == [1, 2]
    assert all(r["batched fps (all)"] > 0 for r in result["concurrency"])
    ceiling = result["ceiling"]
    assert ceiling["GFLOP per frame"] > 0 and ceiling["matmul peak GFLOP/s"] > 0
    assert ceiling["ceiling fps"] == pytest.approx(
        ceiling["matmul peak GFLOP/s"] / ceiling["GFLOP per frame"]
    )
    for r in result["concurrency"]:
        assert r["share of ceiling"] == pytest.approx(
            r["batched fps (all)"] / ceiling["ceiling fps"]
        )
    one = result["concurrency"][0]["batched fps (all)"]
    assert ceiling["ceiling / 1 stream"] == pytest.approx(ceiling["ceiling fps"] / one)
    aims = {a["measure"]: a["value"] for a in result["aims"]}
    assert aims["FLOP ceiling vs 1 stream (the most any batch could give)"] == pytest.approx(
        ceiling["ceiling / 1 stream"]
    )
    rows = {r["scheduler"]: r for r in result["deadlines"]["rows"]}
    assert set(rows) == {"fcfs", "deadline"}
    assert rows["fcfs"]["arrived"] <= 64  # runtime.max_streams: a trace FCFS can take whole
    assert rows["fcfs"]["admitted"] == rows["fcfs"]["arrived"]  # FCFS admits everyone
    assert rows["deadline"]["admitted"] + rows["deadline"]["refused"] == rows["deadline"]["arrived"]
    assert plot.stat().st_size > 0
    arrivals = json.loads(trace.read_text())
    assert len(arrivals) == rows["fcfs"]["arrived"]
    # The same trace again: replayed, not regenerated.
    assert main([*args, "--streams", "1", "--json", str(out)]) == 0
    again = json.loads(out.read_text())
    assert again["deadlines"]["trace"] == arrivals
