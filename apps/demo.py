"""`streamrt demo`: the Gradio live demo — text-to-video, webcam stylization, video QA.

    streamrt demo                          # http://127.0.0.1:7860, embedded tiny models
    streamrt demo --model DIR --port 8000  # a real generator directory

Every browser session gets its own stream on the one shared engine (forwards are
serialised by the engine's lock, so sessions interleave chunk by chunk). A bad prompt or
a broken frame fails that session's request with a message; other sessions keep going.

`DemoBackend` holds everything that is not UI, so it is tested without a browser;
`build_demo` lays the Gradio blocks over it (tests/e2e drive those with headless Chromium).
"""

from __future__ import annotations

import argparse
import contextlib
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from streamrt.apps.generate import load_generator
from streamrt.errors import InputError

DEFAULT_PROMPT = "a red circle moving right on a dark background"
QUESTION = "what color was the first shape?"
DISPLAY_PX = 384
"""Side of the square the video panels show frames in: a 64x64 frame is 6x magnified."""


CSS = "#video img, #styled img { image-rendering: pixelated; }"
"""The browser fits frames to the panel without smoothing them (crisp model pixels)."""


def shown(frame: np.ndarray | None) -> np.ndarray | None:
    """`frame` magnified by the largest whole factor that fits `DISPLAY_PX`, nearest
    neighbour (each model pixel becomes a square of equal pixels: nothing is smoothed)."""
    if frame is None:
        return None
    k = max(1, DISPLAY_PX // max(frame.shape[0], frame.shape[1]))
    return frame.repeat(k, axis=0).repeat(k, axis=1) if k > 1 else frame


@dataclass
class Session:
    """One browser tab's live state (kept in a `gr.State`)."""

    prompt_switch: str | None = None
    """A prompt to switch the running stream to at its next chunk (LongLive re-cache)."""
    frames: int = 0
    stylizer: LiveStylizer | None = None
    qa: Any = None
    """This tab's `VideoQA` memory (opened on the first feed)."""
    fed: float = 0.0
    """Seconds of video in the QA memory."""
    errors: list[str] = field(default_factory=list)


class LiveStylizer:
    """Push-based video-to-video for frame callbacks (a webcam in a browser).

    `push(frame)` hands a frame to a worker thread that runs `VideoToVideo` over the
    frames pushed so far; `latest()` is the newest styled frame (None until the first
    chunk is done). One output per input frame, in order, as the engine makes them.
    """

    def __init__(self, generator, prompt: str, idle_s: float = 10.0) -> None:
        from streamrt.gen.v2v import VideoToVideo

        self.idle_s = idle_s
        """The stream ends (and frees its cache) when no frame came for this long."""
        self.stream = generator.engine.open_stream(prompt)  # PromptError here, not later
        cfg = generator.engine.config
        self.size = (cfg.width, cfg.height)
        self.inputs: queue.Queue[np.ndarray | None] = queue.Queue(maxsize=64)
        self.outputs: list[np.ndarray] = []
        self.error: Exception | None = None
        self._v2v = VideoToVideo(self.stream)
        self._worker = threading.Thread(target=self._run, daemon=True)
        self._worker.start()

    def _frames(self) -> Iterator[np.ndarray]:
        while True:
            try:
                frame = self.inputs.get(timeout=self.idle_s)
            except queue.Empty:  # the camera stopped (tab closed, recording ended)
                return
            if frame is None:
                return
            yield frame

    @property
    def alive(self) -> bool:
        return self._worker.is_alive()

    def _run(self) -> None:
        try:
            for out in self._v2v.run(self._frames()):
                self.outputs.append(out)
                del self.outputs[:-4]  # a viewer only needs the newest
        except Exception as exc:  # reported to this session; the engine keeps serving others
            self.error = exc
        finally:
            self.stream.close()

    def push(self, frame: np.ndarray) -> None:
        import cv2

        if self.error is not None:
            raise self.error
        frame = np.asarray(frame)
        if frame.ndim != 3 or frame.shape[2] not in (3, 4) or frame.dtype != np.uint8:
            raise InputError(
                f"a webcam frame must be uint8 [H, W, 3], got {frame.dtype} {frame.shape}"
            )
        frame = cv2.resize(frame[..., :3], self.size, interpolation=cv2.INTER_AREA)
        with contextlib.suppress(queue.Full):  # model slower than the camera: drop, stay live
            self.inputs.put_nowait(frame)

    def latest(self) -> np.ndarray | None:
        return self.outputs[-1] if self.outputs else None

    def close(self) -> None:
        self.inputs.put(None)
        self._worker.join(timeout=10)


class DemoBackend:
    """Models and per-session streams behind the demo's buttons."""

    def __init__(
        self, model: str = "assets/tiny-world", qa_model: str | None = None, realtime: bool = True
    ) -> None:
        self.generator = load_generator(model, None, {})
        self.qa_model = qa_model
        self.realtime = realtime
        """Pace generated frames at the model's fps (a video, not a burst)."""

    @property
    def fps(self) -> int:
        return self.generator.engine.config.fps

    def generate(
        self, prompt: str, session: Session, max_frames: int | None = None
    ) -> Iterator[tuple[np.ndarray, str]]:
        """Frames of an endless stream for `prompt` and a status line per frame.

        `session.prompt_switch` (set by another event) switches the prompt between chunks.
        """
        stream = self.generator.engine.open_stream(prompt)  # PromptError: bad words
        start, current = time.monotonic(), prompt
        session.frames = 0
        try:
            while max_frames is None or session.frames < max_frames:
                if session.prompt_switch:
                    current, session.prompt_switch = session.prompt_switch, None
                    stream.set_prompt(current)
                for frame in stream.next_frames():
                    session.frames += 1
                    if self.realtime:
                        due = start + session.frames / self.fps
                        time.sleep(max(0.0, due - time.monotonic()))
                    s = stream.stats
                    fps = s["frames"] / max(s["seconds"], 1e-9)
                    yield frame, f"frame {session.frames} | model {fps:.0f} fps | {current}"
                    if max_frames is not None and session.frames >= max_frames:
                        return
        finally:
            stream.close()

    def switch_prompt(self, prompt: str, session: Session) -> str:
        self.generator.engine.text_encoder.check(prompt)  # PromptError before the switch
        session.prompt_switch = prompt
        return f"switching to: {prompt}"

    def stylize(self, frame: np.ndarray | None, prompt: str, session: Session) -> np.ndarray | None:
        """One webcam frame in, the newest styled frame out (None before the first chunk)."""
        if frame is None:
            return None
        if session.stylizer is not None and not session.stylizer.alive:
            self.stop_stylize(session)  # it ended idle: a new recording starts a new stream
        if session.stylizer is None:
            session.stylizer = LiveStylizer(self.generator, prompt)
        session.stylizer.push(frame)
        return session.stylizer.latest()

    def stop_stylize(self, session: Session) -> None:
        if session.stylizer is not None:
            session.stylizer.close()
            session.stylizer = None

    def close_session(self, session: Session) -> None:
        """A tab went away: end its streams and its QA memory."""
        self.stop_stylize(session)
        if session.qa is not None:
            session.qa.close()
            session.qa = None

    def feed(self, source: str, seconds: float, session: Session) -> str:
        """Feed the first `seconds` of `source` (a video file or world://seed=N), at the
        frame rate the QA model was trained for, into the session's memory (after what
        was fed before)."""
        from streamrt.qa import VideoQA

        if session.qa is None:
            session.qa = VideoQA.from_pretrained(self.qa_model, resize=True)
        fps = session.qa.config.fps
        timed = list(_sampled(source, float(seconds), fps))
        if not timed:
            raise InputError(f"{source} gave no frames in its first {seconds} s")
        start = session.fed
        for t, frame in timed:
            session.qa.feed(frame, timestamp=start + t)
        session.fed = start + timed[-1][0] + 1.0 / fps
        return f"fed {len(timed)} frames of {source} ({session.fed:.1f} s of video in memory)"

    def ask(self, question: str, session: Session) -> str:
        if session.qa is None:
            raise InputError("feed a video first: the memory is empty")
        answer = session.qa.ask(question)
        used = ", ".join(f"{t:.0f}s" for t in answer.timestamps[:8])
        return f"{answer.text}  (frames {used}; {answer.latency_s * 1000:.0f} ms)"


def _sampled(source: str, seconds: float, fps: float) -> Iterator[tuple[float, np.ndarray]]:
    """`(seconds, frame)` of a file or world:// source at most `fps` a second, up to `seconds`."""
    if source.startswith("world://"):
        from streamrt.io.sources import open_source
        from streamrt.world import WorldConfig

        rate = WorldConfig().fps
        every = max(1, round(rate / fps))
        for i, frame in enumerate(open_source(source, max_frames=int(seconds * rate))):
            if i % every == 0:
                yield i / rate, frame
        return
    from streamrt.apps.ask import sample_frames

    yield from sample_frames(source, fps, until=seconds)


def build_demo(backend: DemoBackend):
    """The Gradio Blocks app over `backend`."""
    import gradio as gr

    from streamrt.models.text import PromptError

    def guarded(fn):
        """Turn a bad request into a message in the browser (the app keeps running)."""

        def run(*args):
            try:
                return fn(*args)
            except (PromptError, ValueError, OSError, RuntimeError) as exc:
                raise gr.Error(str(exc)) from None

        return run

    def start(prompt: str, session: Session):
        try:
            for frame, status in backend.generate(prompt, session):
                yield shown(frame), status
        except (PromptError, ValueError) as exc:
            raise gr.Error(str(exc)) from None

    panel = {"height": DISPLAY_PX + 40, "width": DISPLAY_PX}  # + the label's row
    with gr.Blocks(title="streamrt live demo") as demo:
        session = gr.State(Session(), time_to_live=3600, delete_callback=backend.close_session)
        gr.Markdown("# streamrt — live video generation, stylization and video QA")
        with gr.Tab("Generate"):
            prompt = gr.Textbox(DEFAULT_PROMPT, label="prompt", elem_id="prompt")
            with gr.Row():
                go = gr.Button("Start", variant="primary", elem_id="start")
                switch = gr.Button("Switch prompt", elem_id="switch")
                stop = gr.Button("Stop", elem_id="stop")
            # a fixed panel size: the page does not jump when the first frame arrives
            video = gr.Image(label="stream", type="numpy", elem_id="video", format="png", **panel)
            status = gr.Markdown(elem_id="status")
            running = go.click(start, [prompt, session], [video, status])
            switch.click(guarded(backend.switch_prompt), [prompt, session], [status])
            stop.click(None, None, None, cancels=[running])
        with gr.Tab("Stylize webcam"):
            style = gr.Textbox(DEFAULT_PROMPT, label="style prompt", elem_id="style")
            with gr.Row():
                cam = gr.Image(sources=["webcam"], type="numpy", label="webcam", elem_id="cam")
                styled = gr.Image(
                    label="styled", type="numpy", elem_id="styled", format="png", **panel
                )
            cam.stream(
                guarded(lambda *a: shown(backend.stylize(*a))),
                [cam, style, session],
                [styled],
                stream_every=1.0 / max(1, backend.fps),
                time_limit=600,
            )
            cam.clear(backend.stop_stylize, [session], None)
        with gr.Tab("Ask the video"):
            source = gr.Textbox("world://seed=3", label="video file or world://seed=N")
            seconds = gr.Number(4, label="seconds to feed (at the QA model's frame rate)")
            feed = gr.Button("Feed", elem_id="feed")
            question = gr.Textbox(QUESTION, label="question", elem_id="question")
            ask = gr.Button("Ask", variant="primary", elem_id="ask")
            answer = gr.Markdown(elem_id="answer")
            feed.click(guarded(backend.feed), [source, seconds, session], [answer])
            ask.click(guarded(backend.ask), [question, session], [answer])
    return demo


def add_arguments(p: argparse.ArgumentParser) -> None:
    from streamrt.apps.arguments import count

    p.add_argument("--model", default="assets/tiny-world", help="generator dir or tiny-random")
    p.add_argument("--qa-model", help="Video-LLM directory (default: assets/tiny-vqa)")
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0: all)")
    p.add_argument("--port", type=count(1, 65535), default=7860)


def run(args: argparse.Namespace) -> int:
    try:
        import gradio  # noqa: F401
    except ImportError:
        from streamrt.errors import InputError

        raise InputError("the demo needs gradio: pip install 'streamrt[demo]'") from None
    backend = DemoBackend(args.model, args.qa_model)  # bad models: one line from the CLI
    build_demo(backend).queue().launch(server_name=args.host, server_port=args.port, css=CSS)
    return 0


def main(argv: list[str] | None = None) -> int:
    """`streamrt demo ...` with the CLI's error handling and `--threads`."""
    import sys

    from streamrt.apps.cli import main as cli_main

    return cli_main(["demo", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
