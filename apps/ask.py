"""`streamrt ask`: questions about a video file, once or interactively while it plays.

    streamrt ask --video clip.mp4 --at 12.5 "what color was the circle?"
    streamrt ask --video clip.mp4 --interactive      # questions from stdin while it plays
    streamrt ask --video world://seed=3 "what color was the circle?"   # a procedural clip

Frames are sampled at `--sample-fps` (default: the rate the model was trained for; ReKV feeds
large models 0.5-1 fps), resized to the model's input size and fed to a `VideoQA` session;
a question is answered from the frames fed so far. The default model is the embedded tiny
one (assets/tiny-vqa), which knows the procedural world's clips only (words it does not
know are named in a warning). Every problem the user can fix ends in one `error:` line and
exit code 2; in `--interactive` mode a bad question costs that question only.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.markup import escape

from streamrt.embedded import VQA_MODEL
from streamrt.errors import InputError, StreamrtError
from streamrt.io.sources import SourceError

console = Console(stderr=True, soft_wrap=True)
TINY_RANDOM = "tiny-random"
WORLD = "world://"
DEFAULT_MODEL = VQA_MODEL


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("question", nargs="?", help="question (omit with --interactive)")
    p.add_argument(
        "--video",
        required=True,
        help="video file to read (anything FFmpeg reads), or a procedural world stream "
        "world://seed=N[&frames=F] (default: one clip, or up to --at)",
    )
    p.add_argument(
        "--at", type=float, help="answer as if the video had played up to SECONDS (default: all)"
    )
    p.add_argument(
        "--interactive",
        action="store_true",
        help="play the file in the background and answer questions read from stdin",
    )
    p.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help="Video-LLM directory (SmolVLM, LLaVA-OneVision, Qwen2-VL; default the embedded "
        f"tiny model {DEFAULT_MODEL}); "
        f"'{TINY_RANDOM}' builds an untrained tiny model for smoke tests",
    )
    p.add_argument("--memory-dir", help="keep the session's memory here (restored next time)")
    p.add_argument("--config", help="YAML preset filling the qa: section")
    p.add_argument(
        "--sample-fps",
        type=float,
        help="frames fed per second of video (default: the model's rate, `qa.fps`; 2 for "
        "the embedded model, which was trained on 8-frame world clips at 2 fps)",
    )
    p.add_argument("--realtime", action="store_true", help="interactive: play at the video's pace")
    p.add_argument("--max-new-tokens", type=int, help="answer length in tokens")
    p.add_argument("--window", type=int, help="frames in the local window")
    p.add_argument("--retrieve", type=int, help="frames retrieved per layer for a question")
    p.add_argument("--json", action="store_true", help="print answers as JSON lines")


def run(args: argparse.Namespace) -> int:
    """Run `streamrt ask`; a problem the user can fix prints one line and returns 2."""
    try:
        return _run(args)
    except StreamrtError as exc:
        console.print(f"[red]error:[/] {escape(str(exc))}")
        return 2


def _run(args: argparse.Namespace) -> int:
    # 1. Check inputs before loading anything.
    _check_args(args)
    qa = _open_session(args)
    try:
        if args.sample_fps is None:
            args.sample_fps = qa.config.fps
        if args.interactive:
            return _interactive(qa, args)
        # 2. Feed the video up to --at, then answer.
        qa.check_question(args.question)  # before the feed, not after it
        fed = 0
        for t, frame in sample_frames(args.video, args.sample_fps, until=args.at):
            qa.feed(frame, timestamp=t)
            fed += 1
        console.print(f"fed {fed} frames from {escape(args.video)}")
        _print_answer(qa.ask(args.question, args.max_new_tokens), args)
        return 0
    finally:
        qa.close()


def _check_args(args: argparse.Namespace) -> None:
    """Refuse flag values that cannot work, with the flag's name and what to give."""
    if not args.interactive and not args.question:
        raise InputError('give a question ("what color ...?") or --interactive')
    if args.question is not None:
        _check_text(args.question)
    if args.at is not None and not (math.isfinite(args.at) and args.at >= 0):
        raise InputError(f"--at must be a number of seconds >= 0, got {args.at}")
    if args.sample_fps is not None and not (math.isfinite(args.sample_fps) and args.sample_fps > 0):
        raise InputError(
            f"--sample-fps must be a number of frames per second > 0, got {args.sample_fps}"
        )
    for flag, value in (
        ("--max-new-tokens", args.max_new_tokens),
        ("--window", args.window),
        ("--retrieve", args.retrieve),
    ):
        if value is not None and value < 1:
            raise InputError(f"{flag} must be >= 1, got {value}")
    if args.video.startswith(WORLD):
        _world_source(args.video)  # a malformed URL fails here, before the model loads
    elif not Path(args.video).is_file():
        raise InputError(
            f"video file {args.video} does not exist: pass a video file or {WORLD}seed=N"
        )


def _check_text(question: str) -> None:
    try:
        question.encode("utf-8")
    except UnicodeEncodeError:  # argv bytes that are not UTF-8 arrive as lone surrogates
        raise InputError(
            "the question holds bytes that are not valid UTF-8: type it again in UTF-8"
        ) from None


def sample_frames(
    path: str | Path, fps: float, until: float | None = None
) -> Iterator[tuple[float, np.ndarray]]:
    """`(seconds, RGB uint8 frame)` from a video file or a `world://` URL, at most `fps`
    per second, up to `until` seconds."""
    if str(path).startswith(WORLD):
        frames = _world_frames(str(path), until)
    else:
        frames = _file_frames(path)
    next_t = 0.0
    for t, frame in frames:
        if until is not None and t > until:
            break
        if t + 1e-9 >= next_t:
            next_t = t + 1.0 / fps
            yield t, frame


def _file_frames(path: str | Path) -> Iterator[tuple[float, np.ndarray]]:
    import av

    if not Path(path).is_file():
        raise InputError(f"video file {path} does not exist: pass a video file or {WORLD}seed=N")
    try:
        container = av.open(str(path))
    except (OSError, av.error.FFmpegError) as exc:
        raise InputError(f"cannot read {path} as a video ({exc}): pass a video file") from None
    with container:
        if not container.streams.video:
            raise InputError(f"{path} has no video stream: pass a video file")
        rate = float(container.streams.video[0].average_rate or 25)
        try:
            for index, frame in enumerate(container.decode(video=0)):
                t = float(frame.time) if frame.time is not None else index / rate
                yield t, frame.to_ndarray(format="rgb24")
        except (OSError, av.error.FFmpegError) as exc:
            raise SourceError(f"{path} broke while decoding: {exc}") from None


def _world_source(url: str):
    from streamrt.world import WorldSource

    try:
        return WorldSource(url)
    except ValueError as exc:
        raise InputError(f"{exc}: e.g. {WORLD}seed=3 or {WORLD}seed=3&frames=32") from None


def _world_frames(url: str, until: float | None) -> Iterator[tuple[float, np.ndarray]]:
    """A world:// stream is endless: it stops at its `frames=`, else at `until`, else
    after one clip (`WorldConfig.num_frames` frames)."""
    source = _world_source(url)
    if source.max_frames is None:
        last = until * source.fps if until is not None else source.config.num_frames - 1
        source.max_frames = math.floor(last + 1e-9) + 1
    for index, frame in enumerate(source):
        yield index / source.fps, frame


def _open_session(args: argparse.Namespace):
    from streamrt.config import QAConfig, load_config
    from streamrt.qa import VideoQA

    base = load_config(args.config).qa if args.config else QAConfig()
    # Only what the preset or the flags set: the rest comes from the model's streamrt.json.
    defaults = dataclasses.asdict(QAConfig())
    options = {k: v for k, v in dataclasses.asdict(base).items() if v != defaults[k]}
    for field, value in (
        ("max_new_tokens", args.max_new_tokens),
        ("window_frames", args.window),
        ("retrieve_frames", args.retrieve),
    ):
        if value is not None:
            options[field] = value
    model = args.model
    if model == TINY_RANDOM:
        from streamrt.models.vlm_tiny import save_tiny_vlm

        model = save_tiny_vlm(Path(tempfile.mkdtemp(prefix="streamrt-tiny-vqa-")), "smolvlm")
    else:
        from streamrt.models.vlm import REBUILD_HINT, resolve_model_dir

        model = resolve_model_dir(model)
        if not (model / "config.json").is_file():
            raise InputError(
                f"no Video-LLM at {model} (no config.json): pass --model DIR (a SmolVLM, "
                f"LLaVA-OneVision or Qwen2-VL directory), --model {TINY_RANDOM} for an untrained "
                f"smoke test, or {REBUILD_HINT}"
            )
    return VideoQA.from_pretrained(model, args.memory_dir, **options)


def _interactive(qa, args: argparse.Namespace) -> int:
    """Feed the file from a background thread; answer each stdin line as it comes.

    A question is about the video up to its time: with `--realtime` the seconds since
    playing began, else the end of the video (or `--at`); it waits until the feed has
    reached that time, so piped questions never see a half-fed video.
    """
    feed = _Feed(qa, args)
    feed.start()
    console.print("ask questions, one per line (Ctrl-D to stop)")
    for number, line in enumerate(_stdin_lines(), 1):
        try:
            question = _decode(line, number).strip()
            if not question:
                continue
            at = feed.wait_for(feed.elapsed() if args.realtime else math.inf)
            _print_answer(qa.ask(question, args.max_new_tokens), args, at=at)
        except (StreamrtError, ValueError) as exc:  # this question only; keep the session
            console.print(f"[yellow]{escape(str(exc))}[/]")
    feed.join()
    if feed.error is not None:
        console.print(
            f"[red]error while playing {escape(args.video)}:[/] {escape(str(feed.error))}"
        )
        return 2
    return 0


class _Feed(threading.Thread):
    """Plays the video into the session; `wait_for(t)` blocks until it has fed time t."""

    def __init__(self, qa, args: argparse.Namespace) -> None:
        super().__init__(daemon=True)
        self.qa, self.args = qa, args
        self.fed_until = -math.inf  # the feed has passed every frame up to this time
        self.last_t = 0.0  # timestamp of the last frame fed
        self.error: BaseException | None = None
        self.done = threading.Event()
        self._progress = threading.Condition()
        self._start = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self._start

    def run(self) -> None:
        step = 1.0 / self.args.sample_fps
        try:
            for t, frame in sample_frames(self.args.video, self.args.sample_fps, self.args.at):
                if self.args.realtime:
                    time.sleep(max(0.0, t - self.elapsed()))
                self.qa.feed(frame, timestamp=t)
                with self._progress:
                    # The next sampled frame is at least one step later.
                    self.last_t, self.fed_until = t, t + step - 1e-9
                    self._progress.notify_all()
        except Exception as exc:  # reported when the session ends; questions keep working
            self.error = exc
        with self._progress:
            self.fed_until = math.inf
            self.done.set()
            self._progress.notify_all()

    def wait_for(self, t: float) -> float:
        """Block until the feed reached `t` seconds (or the video ended); returns the
        timestamp of the last frame fed."""
        with self._progress:
            self._progress.wait_for(lambda: self.fed_until >= t)
            return self.last_t


def _stdin_lines() -> Iterator[bytes | str]:
    """Lines of stdin as bytes when it has a binary buffer (so a bad byte costs one line,
    not the session), else as the text stream gives them."""
    buffer = getattr(sys.stdin, "buffer", None)
    return iter(buffer.readline, b"") if buffer is not None else iter(sys.stdin)


def _decode(line: bytes | str, number: int) -> str:
    if isinstance(line, str):
        _check_text(line)
        return line
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(
            f"question {number} is not valid UTF-8 (byte {line[exc.start]:#04x} at "
            f"position {exc.start}): type it again in UTF-8"
        ) from None


def _print_answer(answer, args: argparse.Namespace, at: float | None = None) -> None:
    for warning in answer.warnings:
        console.print(f"[yellow]warning:[/] {escape(warning)}")
    if args.json:
        print(
            json.dumps(
                {
                    "answer": answer.text,
                    "timestamps": list(answer.timestamps),
                    "latency_s": round(answer.latency_s, 4),
                    "warnings": list(answer.warnings),
                    **({"at": at} if at is not None else {}),
                }
            ),
            flush=True,
        )
        return
    used = ", ".join(f"{t:.1f}" for t in answer.timestamps)
    print(answer.text, flush=True)
    console.print(f"  frames at [{used}] s, {answer.latency_s * 1000:.0f} ms")
