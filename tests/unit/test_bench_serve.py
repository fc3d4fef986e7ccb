"""`streamrt bench serve` runs end to end, writes its JSON, plot and a replayable trace."""

from __future__ import annotations

import json

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
