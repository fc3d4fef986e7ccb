"""`streamrt ask` (apps/ask.py) on a real H.264 file written with PyAV."""

from __future__ import annotations

import argparse
import io
import json

import pytest

from streamrt.apps.ask import add_arguments, run, sample_frames
from streamrt.models.vlm_tiny import save_tiny_vlm

pytestmark = pytest.mark.usefixtures("one_thread_quiet")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return save_tiny_vlm(tmp_path_factory.mktemp("model"), "llava_onevision")


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(list(argv))


def test_sample_frames_follows_the_rate_and_the_cut(video):
    got = [(t, f.shape) for t, f in sample_frames(video, fps=2.0, until=2.9)]
    assert [t for t, _ in got] == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5]
    assert {shape for _, shape in got} == {(64, 64, 3)}


def test_ask_one_question_at_a_time_point(video, model, capsys, tmp_path):
    args = parse(
        "--video",
        str(video),
        "--model",
        str(model),
        "--at",
        "2",
        "--json",
        "--max-new-tokens",
        "2",
        "--memory-dir",
        str(tmp_path),
        "what color ?",
    )
    assert run(args) == 0
    answer = json.loads(capsys.readouterr().out.strip())
    assert answer["timestamps"] == [0.0, 1.0, 2.0]  # frames after --at are not fed
    assert (tmp_path / "default.index.pt").is_file()


def test_interactive_reads_questions_from_stdin(video, model, capsys, monkeypatch, tmp_path):
    monkeypatch.setattr("sys.stdin", io.StringIO("what color ?\n\nwhat shape ?\n"))
    preset = tmp_path / "qa.yaml"
    preset.write_text("qa:\n  host_bytes: 65536\n  window_frames: 4\n")
    args = parse(
        "--config",
        str(preset),
        "--video",
        str(video),
        "--model",
        str(model),
        "--interactive",
        "--json",
        "--max-new-tokens",
        "1",
        "--sample-fps",
        "4",
    )
    assert run(args) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    assert len(lines) == 2 and all(line["timestamps"] for line in lines)


def test_clear_errors(video, tmp_path, capsys):
    assert run(parse("--video", str(video), "--model", str(tmp_path), "q ?")) == 2
    assert "no Video-LLM" in capsys.readouterr().err
    assert run(parse("--video", str(tmp_path / "missing.mp4"), "--model", "tiny-random", "q")) == 2
    assert "does not exist" in capsys.readouterr().err
    assert run(parse("--video", str(video), "--model", "tiny-random")) == 2
    assert "--interactive" in capsys.readouterr().err
