"""`streamrt ask`: questions about a video file, once or interactively while it plays.

    streamrt ask --video clip.mp4 --at 12.5 "what color was the circle?"
    streamrt ask --video clip.mp4 --interactive      # questions from stdin while it plays

Frames are sampled at `--sample-fps` (default: the rate the model was trained for; ReKV feeds
large models 0.5-1 fps), resized to the model's input size and fed to a `VideoQA` session;
a question is answered from the frames fed so far. The default model is the embedded tiny
one (assets/tiny-vqa), which knows the procedural world's clips only.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from rich.console import Console

from streamrt.embedded import VQA_MODEL

console = Console(stderr=True, soft_wrap=True)
TINY_RANDOM = "tiny-random"
DEFAULT_MODEL = VQA_MODEL


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("question", nargs="?", help="question (omit with --interactive)")
    p.add_argument("--video", required=True, help="video file to read (anything FFmpeg reads)")
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
    if args.sample_fps is not None and args.sample_fps <= 0:
        console.print("[red]error:[/] --sample-fps must be > 0")
        return 2
    if not args.interactive and not args.question:
        console.print('[red]error:[/] give a question ("what color ...?") or --interactive')
        return 2
    try:
        qa = _open_session(args)
    except (FileNotFoundError, ValueError, OSError) as exc:
        console.print(f"[red]error:[/] {exc}")
        return 2
    if args.sample_fps is None:
        args.sample_fps = qa.config.fps
    try:
        if args.interactive:
            return _interactive(qa, args)
        fed = 0
        for t, frame in sample_frames(args.video, args.sample_fps, until=args.at):
            qa.feed(frame, timestamp=t)
            fed += 1
        console.print(f"fed {fed} frames from {args.video}")
        _print_answer(qa.ask(args.question, args.max_new_tokens), args)
        return 0
    except (FileNotFoundError, ValueError, OSError) as exc:
        console.print(f"[red]error:[/] {exc}")
        return 2
    finally:
        qa.close()


def sample_frames(
    path: str | Path, fps: float, until: float | None = None
) -> Iterator[tuple[float, np.ndarray]]:
    """`(seconds, RGB uint8 frame)` from a video file, at most `fps` per second, up to `until`."""
    import av

    if not Path(path).is_file():
        raise FileNotFoundError(f"video file {path} does not exist")
    try:
        container = av.open(str(path))
    except av.error.FFmpegError as exc:
        raise ValueError(f"cannot read {path} as a video: {exc}") from None
    with container:
        next_t = 0.0
        for index, frame in enumerate(container.decode(video=0)):
            rate = float(container.streams.video[0].average_rate or 25)
            t = float(frame.time) if frame.time is not None else index / rate
            if until is not None and t > until:
                break
            if t + 1e-9 >= next_t:
                next_t = t + 1.0 / fps
                yield t, frame.to_ndarray(format="rgb24")


def _open_session(args: argparse.Namespace):
    from streamrt.config import QAConfig, load_config
    from streamrt.qa import VideoQA

    base = load_config(args.config).qa if args.config else QAConfig()
    # Only what the preset or the flags set: the rest comes from the model's streamrt.json.
    defaults = dataclasses.asdict(QAConfig())
    options = {k: v for k, v in dataclasses.asdict(base).items() if v != defaults[k]}
    options["resize"] = True
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
            raise FileNotFoundError(
                f"no Video-LLM at {model} (no config.json): pass --model DIR (a SmolVLM, "
                f"LLaVA-OneVision or Qwen2-VL directory), --model {TINY_RANDOM} for an untrained "
                f"smoke test, or {REBUILD_HINT}"
            )
    return VideoQA.from_pretrained(model, args.memory_dir, **options)


def _interactive(qa, args: argparse.Namespace) -> int:
    """Feed the file from a background thread; answer each stdin line as it comes."""
    state = {"t": 0.0, "error": None, "done": False}

    def play() -> None:
        start = time.perf_counter()
        try:
            for t, frame in sample_frames(args.video, args.sample_fps, until=args.at):
                if args.realtime:
                    time.sleep(max(0.0, t - (time.perf_counter() - start)))
                qa.feed(frame, timestamp=t)
                state["t"] = t
        except Exception as exc:  # reported to the user below; questions keep working
            state["error"] = exc
        state["done"] = True

    player = threading.Thread(target=play, daemon=True)
    player.start()
    while qa.stats()["frames"] == 0 and not state["done"]:  # a question needs a frame
        time.sleep(0.01)
    console.print("ask questions, one per line (Ctrl-D to stop)")
    for line in sys.stdin:
        question = line.strip()
        if not question:
            continue
        try:
            _print_answer(qa.ask(question, args.max_new_tokens), args, at=state["t"])
        except ValueError as exc:
            console.print(f"[yellow]{exc}[/]")
    player.join()
    if state["error"] is not None:
        console.print(f"[red]error while playing {args.video}:[/] {state['error']}")
        return 2
    return 0


def _print_answer(answer, args: argparse.Namespace, at: float | None = None) -> None:
    if args.json:
        print(
            json.dumps(
                {
                    "answer": answer.text,
                    "timestamps": list(answer.timestamps),
                    "latency_s": round(answer.latency_s, 4),
                    **({"at": at} if at is not None else {}),
                }
            ),
            flush=True,
        )
        return
    used = ", ".join(f"{t:.1f}" for t in answer.timestamps)
    print(answer.text, flush=True)
    console.print(f"  frames at [{used}] s, {answer.latency_s * 1000:.0f} ms")
