"""First contact with streaming video QA: every bad input gets a clear error, nothing lost.

Bad input through `streamrt ask` (exit code 2 and one line saying what to fix), the
`VideoQA` API (`InputError` and the cache's errors, with the fix in the message) and the
disk tier; then the behaviours those errors protect: a saved session survives SIGKILL, a
full disk at close loses nothing, a block deleted from disk costs one frame, frames of any
size are resized, interactive questions wait for the feed.
"""

from __future__ import annotations

import errno
import io
import json
import math
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch

from streamrt.apps.cli import main
from streamrt.cache import CacheError, CorruptBlockError, DiskTierError, SpecMismatchError
from streamrt.cache import disk_store as disk_store_module
from streamrt.cache.disk_store import DiskStore, write_file_atomically
from streamrt.errors import InputError, StreamrtError
from streamrt.models.vlm_tiny import IMAGE_SIZE, save_tiny_vlm
from streamrt.qa import VideoQA
from streamrt.world import make_clip

pytestmark = pytest.mark.usefixtures("one_thread_quiet")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return save_tiny_vlm(tmp_path_factory.mktemp("model") / "smolvlm", "smolvlm")


@pytest.fixture(scope="module")
def other_model(tmp_path_factory):
    return save_tiny_vlm(tmp_path_factory.mktemp("model") / "qwen2_vl", "qwen2_vl")


def clip_frames(n: int) -> torch.Tensor:
    frames = make_clip(0, n).frames[:, :: 64 // IMAGE_SIZE, :: 64 // IMAGE_SIZE]
    return torch.as_tensor(frames.copy())


def ask_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["ask", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def error_lines(err: str) -> list[str]:
    """The lines a failed command printed for the user (progress bars aside)."""
    assert "Traceback" not in err
    return [line for line in err.splitlines() if line.startswith("error:")]


def disk_full(*args):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def files(root: Path, pattern: str) -> set[str]:
    return {p.name for p in root.rglob(pattern)}


# ---------------------------------------------------------------------- streamrt ask


CLI_CASES = {
    "no question": ([], "--interactive"),
    "at nan": (["--at", "nan", "q"], "--at must be a number of seconds >= 0, got nan"),
    "at inf": (["--at", "inf", "q"], "--at must be a number of seconds >= 0, got inf"),
    "at negative": (["--at", "-1", "q"], "--at must be a number of seconds >= 0"),
    "fps nan": (["--sample-fps", "nan", "q"], "--sample-fps must be a number"),
    "fps inf": (["--sample-fps", "inf", "q"], "--sample-fps must be a number"),
    "fps zero": (["--sample-fps", "0", "q"], "frames per second > 0, got 0.0"),
    "fps negative": (["--sample-fps", "-2", "q"], "frames per second > 0, got -2.0"),
    "no tokens": (["--max-new-tokens", "0", "q"], "--max-new-tokens must be >= 1"),
    "no window": (["--window", "0", "q"], "--window must be >= 1"),
    "no retrieval": (["--retrieve", "0", "q"], "--retrieve must be >= 1"),
    "argv not utf-8": ([os.fsdecode(b"what \xff color ?")], "not valid UTF-8"),
}


@pytest.mark.parametrize("case", CLI_CASES)
def test_ask_refuses_bad_flags_in_one_line_before_loading_the_model(
    case, video, capsys, monkeypatch
):
    argv, message = CLI_CASES[case]
    monkeypatch.setattr(VideoQA, "from_pretrained", None)  # never reached
    code, out, err = ask_cli(capsys, "--video", str(video), "--model", "tiny-random", *argv)
    assert code == 2 and out == ""
    assert len(error_lines(err)) == 1 and message in error_lines(err)[0]


def test_ask_refuses_missing_unreadable_and_malformed_videos(tmp_path, capsys):
    not_video = tmp_path / "notes.mp4"
    not_video.write_text("not a video")
    cases = {
        str(tmp_path / "missing.mp4"): "does not exist: pass a video file or world://seed=N",
        str(not_video): "as a video",
        "world://seed=x": "seed must be an integer >= 0",
        "world://colour=red": "unknown key 'colour'",
    }
    for video, message in cases.items():
        code, _, err = ask_cli(capsys, "--video", video, "--model", "tiny-random", "q ?")
        assert code == 2 and message in error_lines(err)[0], video


def test_ask_refuses_a_directory_without_a_model(video, tmp_path, capsys):
    code, _, err = ask_cli(capsys, "--video", str(video), "--model", str(tmp_path), "q ?")
    assert code == 2 and "no Video-LLM" in error_lines(err)[0]
    assert "--model tiny-random" in error_lines(err)[0]


def test_ask_memory_dir_that_is_a_file_read_only_or_from_another_model(
    video, model, other_model, tmp_path, capsys, monkeypatch
):
    base = ["--video", str(video), "--at", "1", "--max-new-tokens", "1"]
    blocker = tmp_path / "file"
    blocker.write_text("a file")
    code, _, err = ask_cli(capsys, *base, "--model", str(model), "--memory-dir", str(blocker), "q")
    assert code == 2
    assert f"memory_dir {blocker} is a file, not a directory: choose another" in err

    mem = tmp_path / "mem"
    assert (
        ask_cli(capsys, *base, "--model", str(other_model), "--memory-dir", str(mem), "q")[0] == 0
    )
    code, _, err = ask_cli(capsys, *base, "--model", str(model), "--memory-dir", str(mem), "q")
    assert code == 2 and len(error_lines(err)) == 1
    assert f"the memory in {mem} was written by another model" in err
    assert f"choose another memory_dir, or delete {mem}" in err

    # As root a chmod does not stop writes: a read-only mount answers every write so.
    def read_only(self, data):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))

    monkeypatch.setattr(Path, "write_bytes", read_only)
    ro = tmp_path / "ro"
    code, _, err = ask_cli(capsys, *base, "--model", str(model), "--memory-dir", str(ro), "q")
    assert code == 2 and len(error_lines(err)) == 1
    assert f"memory_dir {ro} is not a writable directory" in err
    assert "Read-only file system" in err and "choose another memory_dir" in err


def test_ask_refuses_an_overlong_question_before_feeding(video, model, capsys, monkeypatch):
    monkeypatch.setattr(VideoQA, "feed", None)  # refused before any frame is fed
    for question, length in (
        ("what color " * 20_000, "220000 characters"),
        ("red " * 513, "513 tokens"),
    ):
        code, _, err = ask_cli(capsys, "--video", str(video), "--model", str(model), question)
        assert code == 2
        assert f"is {length} long, over the limit of 512 tokens (max_question_tokens)" in err


def test_ask_warns_about_words_the_model_does_not_know(video, model, capsys):
    argv = ["--video", str(video), "--model", str(model), "--at", "1", "--max-new-tokens", "1"]
    code, out, err = ask_cli(capsys, *argv, "--json", "what colour is the zebra ?")
    assert code == 0
    warning = "the model does not know the word(s) 'colour', 'zebra'"
    assert warning in err
    assert warning in json.loads(out)["warnings"][0]
    code, out, err = ask_cli(capsys, *argv, "--json", "what color is the circle ?")
    assert code == 0 and "does not know" not in err
    assert json.loads(out)["warnings"] == []


def test_ask_accepts_world_urls(model, capsys):
    argv = ["--model", str(model), "--json", "--retrieve", "64", "--max-new-tokens", "1"]
    code, out, _ = ask_cli(capsys, "--video", "world://seed=3", *argv, "what color ?")
    assert code == 0  # one 32-frame clip at 8 fps, sampled at the model's 1 fps
    assert json.loads(out)["timestamps"] == [0.0, 1.0, 2.0, 3.0]
    code, out, _ = ask_cli(
        capsys, "--video", "world://seed=3&frames=80", "--at", "6", *argv, "what color ?"
    )
    assert code == 0
    assert json.loads(out)["timestamps"] == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0]


def test_interactive_waits_for_the_feed_and_survives_bad_bytes(video, model, capsys, monkeypatch):
    feed = VideoQA.feed

    def slow_feed(self, *args, **kw):  # a model slower than the questions arrive
        time.sleep(0.05)
        return feed(self, *args, **kw)

    monkeypatch.setattr(VideoQA, "feed", slow_feed)
    lines = b"what color ?\nwhat \xff color ?\nwhat shape ?\n"
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(lines)))
    argv = ["--video", str(video), "--model", str(model), "--interactive", "--json"]
    argv += ["--sample-fps", "2", "--retrieve", "64", "--max-new-tokens", "1"]
    code, out, err = ask_cli(capsys, *argv)
    assert code == 0
    answers = [json.loads(line) for line in out.splitlines()]
    every = [t / 2 for t in range(8)]  # 4 s at 2 fps: all fed before the first answer
    assert [a["timestamps"] for a in answers] == [every, every]
    assert [a["at"] for a in answers] == [3.5, 3.5]
    assert "question 2 is not valid UTF-8 (byte 0xff at position 5)" in err


# ---------------------------------------------------------------------- VideoQA


@pytest.fixture(scope="module")
def qa(model):
    session = VideoQA.from_pretrained(model, retrieve_frames=64)
    session.feed(clip_frames(3))
    yield session
    session.close()


FRAME_CASES = {
    "two channels": (torch.zeros(32, 32, 2, dtype=torch.uint8), "3 channels last"),
    "one plane": (torch.zeros(32, 32, dtype=torch.uint8), "RGB [H, W, 3]"),
    "five dims": (torch.zeros(1, 1, 32, 32, 3, dtype=torch.uint8), "got shape (1, 1, 32, 32, 3)"),
    "empty": (torch.zeros(0, 32, 32, 3, dtype=torch.uint8), "got shape (0, 32, 32, 3)"),
    "int32": (torch.zeros(32, 32, 3, dtype=torch.int32), "uint8 or float in [0, 1]"),
    "nan": (torch.full((32, 32, 3), math.nan), "NaN or infinite"),
    "over one": (torch.full((32, 32, 3), 2.0), "divide uint8 pixels by 255"),
    "text": ("a frame", "array of RGB pixels"),
}


@pytest.mark.parametrize("case", FRAME_CASES)
def test_feed_refuses_frames_it_cannot_read(qa, case):
    frame, message = FRAME_CASES[case]
    with pytest.raises(InputError, match=re.escape(message)):
        qa.feed(frame)
    assert qa.stats()["frames"] == 3  # nothing half-stored


QUESTION_CASES = {
    "empty": ("   ", {}, "non-empty text"),
    "not text": (42, {}, "non-empty text"),
    "surrogates": (os.fsdecode(b"what \xff ?"), {}, "ask it again in UTF-8"),
    "too long": ("color " * 600, {}, "over the limit of 512 tokens"),
    "no tokens": ("what ?", {"max_new_tokens": 0}, "max_new_tokens must be an integer >= 1"),
    "float tokens": ("what ?", {"max_new_tokens": 2.5}, "max_new_tokens must be an integer"),
}


@pytest.mark.parametrize("case", QUESTION_CASES)
def test_ask_refuses_questions_it_cannot_take(qa, case):
    question, kw, message = QUESTION_CASES[case]
    with pytest.raises(InputError, match=message):
        qa.ask(question, **kw)


def test_timestamps_and_settings_that_cannot_work(qa, model):
    for stamp, message in ((math.nan, "finite numbers"), ("noon", "seconds"), ([0.0], "one per")):
        with pytest.raises(InputError, match=message):
            qa.feed(clip_frames(2), timestamp=stamp)
    for options, message in (
        ({"fps": math.nan}, "fps must be a finite number > 0"),
        ({"window_frames": 0}, "must be >= 1"),
        ({"max_question_tokens": 0}, "max_question_tokens must be >= 1"),
        ({"window": 3}, "unknown QA option"),
    ):
        with pytest.raises(InputError, match=message):
            VideoQA.from_pretrained(model, **options)
    empty = VideoQA.from_pretrained(model)
    with pytest.raises(InputError, match="feed at least one frame before asking"):
        empty.ask("what color ?")


def test_a_long_question_is_refused_without_waiting_for_the_session(qa):
    with qa._lock:  # another thread holds the session (a feed, a question)
        result = []
        t = threading.Thread(target=lambda: result.append(_refusal(qa, "color " * 20_000)))
        t.start()
        t.join(timeout=10)
        assert not t.is_alive()
    assert isinstance(result[0], InputError)
    assert "over the limit of 512 tokens" in str(result[0])


def _refusal(qa, question):
    try:
        qa.ask(question)
    except StreamrtError as exc:
        return exc


def test_unknown_words_are_named_on_the_answer(qa):
    answer = qa.ask("What colour is the ZEBRA ?", max_new_tokens=1)
    assert answer.unknown_words == ("colour", "ZEBRA")
    assert answer.warnings == (
        "the model does not know the word(s) 'colour', 'ZEBRA': the answer ignores them; "
        "rephrase with words it knows",
    )
    known = qa.ask("what color is the circle ?", max_new_tokens=1)
    assert known.unknown_words == () and known.warnings == ()


def test_frames_of_any_size_are_resized_by_default(model):
    session = VideoQA.from_pretrained(model, retrieve_frames=64)
    big = torch.as_tensor(make_clip(0, 2).frames.copy())  # 64x64
    session.feed(
        torch.nn.functional.interpolate(  # 128x128 and 48x40 too
            big.permute(0, 3, 1, 2).float(), size=(128, 128)
        )
        .permute(0, 2, 3, 1)
        .byte()
    )
    session.feed(torch.zeros(48, 40, 3, dtype=torch.uint8))
    assert session.stats()["frames"] == 3
    assert session.ask("what color ?", max_new_tokens=1).timestamps == (0.0, 1.0, 2.0)
    # Resizing is the image processors' bilinear + antialias: a frame fed at 64x64 is
    # stored exactly as the same frame resized to the model's 32x32 beforehand.
    pre = (
        torch.nn.functional.interpolate(
            big[:1].permute(0, 3, 1, 2).float() / 255,
            size=(IMAGE_SIZE, IMAGE_SIZE),
            mode="bilinear",
            antialias=True,
        )
        .permute(0, 2, 3, 1)
        .clamp(0, 1)
    )
    a, b = (VideoQA.from_pretrained(model) for _ in range(2))
    a.feed(big[0])
    b.feed(pre)
    last = a.memory.seq.next_index - 1
    assert torch.equal(a.memory.seq.kv(last, writable=False), b.memory.seq.kv(last, writable=False))
    strict = VideoQA.from_pretrained(model, resize=False)
    with pytest.raises(InputError, match="64x64 but the model takes 32x32: resize them"):
        strict.feed(big[0])


# ---------------------------------------------------------------------- the disk tier


def test_memory_dir_errors_name_the_dir_and_the_fix(model, other_model, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(DiskTierError, match="is a file, not a directory: choose another"):
        VideoQA.from_pretrained(model, blocker)
    with pytest.raises(DiskTierError, match="not a writable directory"):
        VideoQA.from_pretrained(model, blocker / "mem")
    mem = tmp_path / "mem"
    with VideoQA.from_pretrained(other_model, mem) as first:
        first.feed(clip_frames(2))
    with pytest.raises(SpecMismatchError, match=f"the memory in {mem} was written by another"):
        VideoQA.from_pretrained(model, mem)


def test_an_unreadable_index_refuses_the_reopen_and_deletes_nothing(model, tmp_path):
    with VideoQA.from_pretrained(model, tmp_path) as first:
        first.feed(clip_frames(4))
    (tmp_path / "default.index.pt").write_bytes(b"\x80 not an index")
    before = files(tmp_path, "*.kv")
    with pytest.raises(CacheError, match=r"cannot read the QA index .* delete .* to start afresh"):
        VideoQA.from_pretrained(model, tmp_path)
    assert files(tmp_path, "*.kv") == before and len(before) == 4


def test_disk_full_at_close_is_a_clear_error_and_loses_nothing(model, tmp_path, monkeypatch):
    opts = {"retrieve_frames": 64, "host_bytes": 2048}  # 2 frames on the host
    with VideoQA.from_pretrained(model, tmp_path, **opts) as first:
        first.feed(clip_frames(6))
    session = VideoQA.from_pretrained(model, tmp_path, **opts)
    session.feed(clip_frames(12), timestamp=6.0)  # the first new ones reach the disk
    blocks = files(tmp_path, "*.kv")
    assert len(blocks) > 6
    monkeypatch.setattr(disk_store_module, "_write_all", disk_full)
    with pytest.raises(DiskTierError, match=r"disk full: writing .*default\.index\.pt") as err:
        session.close()
    assert "Free space on that volume or choose a directory on a larger one" in str(err.value)
    assert files(tmp_path, "*.tmp") == set()
    # The process dies here: a reopen serves the last index, and deletes no block.
    session.manager.disk = None
    with pytest.warns(UserWarning, match="written after the index was last saved"):
        again = VideoQA.from_pretrained(model, tmp_path, **opts)
    assert [r.timestamp for r in again.memory.records.values()] == [0.0, 1, 2, 3, 4, 5]
    assert again.ask("what color ?", max_new_tokens=1).timestamps == (0.0, 1, 2, 3, 4, 5)
    assert blocks <= files(tmp_path, "*.kv")
    again.manager.check_invariants()


def test_disk_full_at_close_can_be_retried_after_freeing_space(model, tmp_path, monkeypatch):
    session = VideoQA.from_pretrained(model, tmp_path, retrieve_frames=64)
    session.feed(clip_frames(5))
    monkeypatch.setattr(disk_store_module, "_write_all", disk_full)
    with pytest.raises(DiskTierError, match="disk full"):
        session.close()
    assert session.stats()["frames"] == 5  # still open, still answering
    monkeypatch.undo()  # space was freed
    session.close()
    again = VideoQA.from_pretrained(model, tmp_path, retrieve_frames=64)
    assert again.ask("what color ?", max_new_tokens=1).timestamps == (0.0, 1, 2, 3, 4)


def test_a_block_deleted_from_disk_costs_one_frame_not_every_question(model, tmp_path):
    session = VideoQA.from_pretrained(model, tmp_path, retrieve_frames=64, host_bytes=1024)
    session.feed(clip_frames(12))  # a window of 8 on the device, 1 on the host, 3 on disk
    assert session.memory.seq.table[1].tier == "disk"
    (tmp_path / "blocks" / "qa.default.1.kv").unlink()  # the frame at t = 1
    with (
        pytest.warns(RuntimeWarning, match="was removed outside the store"),
        pytest.warns(UserWarning, match=r"skipped corrupt frame block\(s\) \[1\]"),
    ):
        answer = session.ask("what color ?", max_new_tokens=1)
    assert answer.timestamps == (0.0, *map(float, range(2, 12)))
    stats = session.stats()
    assert stats["corrupt_skipped"] == 1 and stats["frames"] == 11
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert session.ask("what shape ?", max_new_tokens=1).timestamps == answer.timestamps
    session.manager.check_invariants()


def test_disk_store_reports_a_removed_file_like_a_corrupt_block(tmp_path):
    store = DiskStore(tmp_path)
    store.put("gone", torch.ones(4))
    store.put("kept", torch.zeros(4))
    (tmp_path / "gone.kv").unlink()
    with (
        pytest.warns(RuntimeWarning, match="removed outside the store"),
        pytest.raises(CorruptBlockError, match="block 'gone' is missing: its file"),
    ):
        store.get("gone")
    assert store.keys() == ["kept"] and store.stats()["missing"] == 1
    store.put("gone2", torch.ones(4))
    (tmp_path / "gone2.kv").unlink()
    with pytest.warns(RuntimeWarning, match="removed outside the store"):
        assert store.verify() == ["gone2"]
    assert torch.equal(store.get("kept"), torch.zeros(4))


def test_atomic_file_write_on_a_full_disk_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "index.pt"
    write_file_atomically(target, b"old")
    monkeypatch.setattr(disk_store_module, "_write_all", disk_full)
    with pytest.raises(DiskTierError, match=r"disk full: writing .*index\.pt \(3 bytes\) failed"):
        write_file_atomically(target, b"new")
    assert target.read_bytes() == b"old" and files(tmp_path, "*.tmp") == set()


CHILD = textwrap.dedent(
    """
    import json, sys, time
    import torch
    from streamrt.qa import VideoQA
    from streamrt.world import make_clip

    torch.set_num_threads(1)
    model, mem = sys.argv[1:3]
    qa = VideoQA.from_pretrained(model, mem, retrieve_frames=64)  # default budgets
    frames = torch.as_tensor(make_clip(0, 50).frames[:, ::2, ::2].copy())
    qa.feed(frames)
    qa.save()
    a = qa.ask("what color is the circle ?", max_new_tokens=3)
    print(json.dumps({"text": a.text, "timestamps": a.timestamps}), flush=True)
    time.sleep(600)  # killed here, never closed
    """
)


def test_saved_frames_survive_sigkill(model, tmp_path):
    mem = tmp_path / "mem"
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(model), str(mem)],
        stdout=subprocess.PIPE,
        env={**os.environ, "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error"},
    )
    try:
        line = child.stdout.readline()
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=60)
        child.stdout.close()
    assert child.returncode == -signal.SIGKILL
    before = json.loads(line)
    assert len(before["timestamps"]) == 50

    again = VideoQA.from_pretrained(model, mem, retrieve_frames=64)
    assert again.stats()["frames"] == 50 and again.stats()["missing_on_restore"] == 0
    assert sorted(again.memory.records) == list(range(50))
    answer = again.ask("what color is the circle ?", max_new_tokens=3)
    assert answer.timestamps == tuple(float(t) for t in range(50))
    assert answer.text == before["text"]
    again.manager.check_invariants()
    again.close()


def test_frames_over_the_disk_budget_at_close_are_dropped_with_a_warning(model, tmp_path):
    session = VideoQA.from_pretrained(model, tmp_path, retrieve_frames=64, disk_bytes=3 * 1024)
    session.feed(clip_frames(6))
    with pytest.warns(UserWarning, match="not saved to disk: .*over the disk tier budget"):
        session.close()  # a budget is the user's choice: no retry, the session closes
    assert session.memory.counters["lost_on_close"] == 3 and session.memory.seq.closed
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the index lists exactly the saved frames
        again = VideoQA.from_pretrained(model, tmp_path, retrieve_frames=64)
    assert again.ask("what color ?", max_new_tokens=1).timestamps == (0.0, 1.0, 2.0)
