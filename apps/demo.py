"""`streamrt demo`: the Gradio live demo — text-to-video, webcam stylization, video QA.

    streamrt demo                          # http://127.0.0.1:7860, embedded tiny models
    streamrt demo --model DIR --port 8000  # a real generator directory
    streamrt demo --config PRESET.yaml     # its gen:, cache: and runtime: sections

Every browser tab is served at once by the one `Runtime` (`streamrt.runtime`): a tab's
Generate is a stream on it (the runtime batches the forwards of tabs due together), with
a QA session attached that is fed that stream's frames, so the tab can ask about what is
being generated; "Ask the video" is a QA session on the same runtime. Every tab's KV lives
in the runtime's one cache manager. A bad prompt, a broken frame or a full runtime fails
that tab's request with a message; other tabs keep going. A tab that stops or goes away
closes its stream and sessions.

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
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from streamrt.apps.generate import TINY_RANDOM, generator_path
from streamrt.errors import InputError, UnknownNameError
from streamrt.threads import thread_target

if TYPE_CHECKING:
    from streamrt.config import RuntimeConfig
    from streamrt.qa.video_qa import Answer
    from streamrt.runtime import QAHandle, StreamHandle

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


def answer_text(answer: Answer) -> str:
    """An answer as the demo shows it: the text, the timestamps of the frames it used and
    its latency, then any warnings (one line each)."""
    stamps = ", ".join(f"{t:.1f}s" for t in answer.timestamps[:8])
    if len(answer.timestamps) > 8:
        stamps += f" … ({len(answer.timestamps)} frames)"
    text = f"{answer.text}  (frames at {stamps}; {answer.latency_s * 1000:.0f} ms)"
    return "\n\n".join([text, *(f"⚠ {w}" for w in answer.warnings)])


@dataclass
class Session:
    """One browser tab's live state (kept in a `gr.State`)."""

    stream: StreamHandle | None = None
    """The tab's Generate stream on the runtime (None: not generating)."""
    watch: QAHandle | None = None
    """The QA session fed `stream`'s frames. It outlives a stopped stream (the user can
    still ask about it) until the next Start or the tab goes away."""
    frames: int = 0
    """Frames the Generate panel showed of the current stream."""
    stylizer: LiveStylizer | None = None
    qa: QAHandle | None = None
    """This tab's "Ask the video" session on the runtime (opened on the first feed)."""
    fed: float = 0.0
    """Seconds of video in the "Ask the video" memory."""


class LiveStylizer:
    """Push-based video-to-video for frame callbacks (a webcam in a browser).

    `push(frame)` hands a frame to a worker thread that runs `VideoToVideo` over the
    frames pushed so far; `latest()` is the newest styled frame (None until the first
    chunk is done). One output per input frame, in order, as the engine makes them.

    The stream is on `generator`'s engine. Its KV lives in the engine's cache manager,
    which is not thread-safe: every call into the stream holds `lock` (the runtime's
    lock when the engine is a runtime's), let go only while the worker waits for frames.
    """

    def __init__(self, generator, prompt: str, idle_s: float = 10.0, lock: Any = None) -> None:
        from streamrt.gen.v2v import VideoToVideo

        self.idle_s = idle_s
        """The stream ends (and frees its cache) when no frame came for this long."""
        self.lock = lock if lock is not None else threading.RLock()
        with self.lock:
            self.stream = generator.engine.open_stream(prompt)  # PromptError here, not later
        cfg = generator.engine.config
        self.size = (cfg.width, cfg.height)
        self.inputs: queue.Queue[np.ndarray | None] = queue.Queue(maxsize=64)
        self.outputs: list[np.ndarray] = []
        self.error: Exception | None = None
        self._v2v = VideoToVideo(self.stream)
        self._worker = threading.Thread(target=thread_target(self._run), daemon=True)
        self._worker.start()

    def _frames(self) -> Iterator[np.ndarray]:
        """Input frames; called with `lock` held (from inside the stream), which it lets
        go while it waits, so the runtime's streams run meanwhile."""
        while True:
            self.lock.release()
            try:
                frame = self.inputs.get(timeout=self.idle_s)
            except queue.Empty:  # the camera stopped (tab closed, recording ended)
                frame = None
            finally:
                self.lock.acquire()
            if frame is None:
                return
            yield frame

    @property
    def alive(self) -> bool:
        return self._worker.is_alive()

    def _run(self) -> None:
        with self.lock:
            try:
                for out in self._v2v.run(self._frames()):
                    self.outputs.append(out)
                    del self.outputs[:-4]  # a viewer only needs the newest
            except Exception as exc:  # reported to this session; the engine serves others
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


def _close(handle: StreamHandle | QAHandle | None) -> None:
    """Close a stream or QA session that may have ended or been closed already."""
    if handle is not None:
        with contextlib.suppress(UnknownNameError):
            handle.close()


class DemoBackend:
    """The runtime behind the demo's buttons: every tab's streams and QA sessions on it.

    Args:
        model: Generator directory, or "tiny-random".
        qa_model: Video-LLM directory (None: the embedded one).
        realtime: Show generated frames at the stream's fps (a video, not chunk bursts).
        config: A YAML preset (its gen:, cache: and runtime: sections).
        runtime: Scheduler settings, over the preset's (admission control, max_streams...).
    """

    def __init__(
        self,
        model: str = "assets/tiny-world",
        qa_model: str | None = None,
        realtime: bool = True,
        *,
        config: str | None = None,
        runtime: RuntimeConfig | None = None,
    ) -> None:
        from streamrt.runtime import Runtime

        path = model if model == TINY_RANDOM else generator_path(model)
        self.rt = Runtime(path, qa_model, config, runtime=runtime)
        self.rt.start()
        self.realtime = realtime
        self.tabs: dict[str, Session] = {}
        """Open browser tabs by Gradio session id (`open_tab`), closed when they go away."""
        self._lock = threading.Lock()

    @property
    def fps(self) -> float:
        """Playout rate of a generated stream."""
        return float(self.rt.config.fps or self.rt.engine.config.fps)

    # ------------------------------------------------------------------ Generate

    def generate(
        self, prompt: str, session: Session, max_frames: int | None = None
    ) -> Iterator[tuple[np.ndarray, str]]:
        """Frames of an endless stream of `prompt` on the runtime, each with a status line,
        as the runtime makes them. The stream is the tab's (a new Start replaces it) and
        has a QA session attached (`ask_generated`); `stop_generate` ends it.

        Raises `PromptError` (words the model does not know) and `AdmissionError` (the
        runtime is full) at the first frame.
        """
        with self._lock:  # a new Start replaces the tab's stream (first: it takes room)
            old = (session.stream, session.watch)
            session.stream = session.watch = None
        for previous in old:
            _close(previous)
        handle = self.rt.open_stream(prompt)
        try:
            watch = self.rt.open_qa(stream_id=handle.id, resize=True)
        except BaseException:
            handle.close()
            raise
        with self._lock:
            session.stream, session.watch, session.frames = handle, watch, 0
        start = time.monotonic()
        try:
            for frame in handle.frames():
                if session.stream is not handle:  # replaced by a newer Start
                    return
                session.frames += 1
                if self.realtime:
                    due = start + session.frames / handle.fps
                    time.sleep(max(0.0, due - time.monotonic()))
                yield frame, self.status(handle, session.frames)
                if max_frames is not None and session.frames >= max_frames:
                    return
        finally:
            self._end_stream(session, handle)

    @staticmethod
    def status(handle: StreamHandle, shown_frames: int) -> str:
        s = handle.stats()
        return f"frame {shown_frames} | {s['fps']:.0f} fps | {s['prompt']}"

    def _end_stream(self, session: Session, handle: StreamHandle) -> None:
        with self._lock:
            if session.stream is handle:
                session.stream = None
        _close(handle)

    def stop_generate(self, session: Session) -> str:
        """End the tab's stream (its QA session stays: ask about what was generated)."""
        handle = session.stream
        if handle is None:
            return "stopped"
        self._end_stream(session, handle)
        return f"stopped after {session.frames} frames"

    def switch_prompt(self, prompt: str, session: Session) -> str:
        """Switch the tab's stream to `prompt` at its next chunk (with KV re-cache)."""
        self.rt.engine.text_encoder.check(prompt)  # PromptError, also with no stream
        handle = session.stream
        if handle is None or handle.done:
            raise InputError("no stream is running in this tab: press Start first")
        handle.set_prompt(prompt)
        return f"switching to: {prompt}"

    def ask_generated(self, question: str, session: Session) -> Answer:
        """Answer `question` about the video this tab's stream generated so far."""
        watch = session.watch
        if watch is None:
            raise InputError("press Start first: the question is about the generated video")
        with contextlib.suppress(TimeoutError):  # frames still queued: answer from the rest
            watch.flush(timeout=2.0)
        if not watch.stats()["frames"]:
            raise InputError("no generated frame is in the memory yet: ask again in a moment")
        return watch.ask(question)

    # ------------------------------------------------------------------ Stylize webcam

    def stylize(self, frame: np.ndarray | None, prompt: str, session: Session) -> np.ndarray | None:
        """One webcam frame in, the newest styled frame out (None before the first chunk)."""
        if frame is None:
            return None
        if session.stylizer is not None and not session.stylizer.alive:
            self.stop_stylize(session)  # it ended idle: a new recording starts a new stream
        if session.stylizer is None:
            session.stylizer = LiveStylizer(self.rt.generator, prompt, lock=self.rt.lock)
        session.stylizer.push(frame)
        return session.stylizer.latest()

    def stop_stylize(self, session: Session) -> None:
        if session.stylizer is not None:
            session.stylizer.close()
            session.stylizer = None

    # ------------------------------------------------------------------ Ask the video

    def feed(self, source: str, seconds: float, session: Session) -> str:
        """Feed the first `seconds` of `source` (a video file or world://seed=N), at the
        frame rate the QA model was trained for, into the tab's QA session (after what was
        fed before); returns when they are encoded."""
        if session.qa is None:
            session.qa = self.rt.open_qa(resize=True)
        qa = session.qa
        fps = qa.config.fps
        timed = list(_sampled(source, float(seconds), fps))
        if not timed:
            raise InputError(f"{source} gave no frames in its first {seconds} s")
        start = session.fed
        room = self.rt.config.qa_queue_frames  # the session's feed queue drops beyond this
        for i, (t, frame) in enumerate(timed):
            qa.feed(frame, timestamp=start + t)
            if (i + 1) % room == 0:
                qa.flush()
        qa.flush()
        session.fed = start + timed[-1][0] + 1.0 / fps
        return f"fed {len(timed)} frames of {source} ({session.fed:.1f} s of video in memory)"

    def ask(self, question: str, session: Session) -> Answer:
        if session.qa is None:
            raise InputError("feed a video first: the memory is empty")
        return session.qa.ask(question)

    # ------------------------------------------------------------------ tabs

    def open_tab(self, key: str, session: Session) -> None:
        """A browser tab opened (`key`: its Gradio session id); `close_tab` ends it."""
        with self._lock:
            self.tabs[key] = session

    def close_tab(self, key: str) -> None:
        with self._lock:
            session = self.tabs.pop(key, None)
        if session is not None:
            self.close_session(session)

    def close_session(self, session: Session) -> None:
        """A tab went away: end its stream, its stylizer and its QA sessions."""
        with self._lock:
            handles = (session.stream, session.watch, session.qa)
            session.stream = session.watch = session.qa = None
        for handle in handles:
            _close(handle)
        self.stop_stylize(session)

    def close(self) -> None:
        """End every tab and free the runtime."""
        for key in list(self.tabs):
            self.close_tab(key)
        self.rt.close()


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

    from streamrt.errors import StreamrtError

    refused = (StreamrtError, ValueError, OSError, RuntimeError)
    """What a request can fail with that the user can act on (a message, not a traceback):
    a bad prompt (PromptError), a full runtime (AdmissionError), a failed stream..."""

    def guarded(fn):
        """Turn a bad request into a message in the browser (the app keeps running)."""

        def run(*args):
            try:
                return fn(*args)
            except refused as exc:
                raise gr.Error(str(exc)) from None

        return run

    def start(prompt: str, session: Session):
        try:
            for frame, status in backend.generate(prompt, session):
                yield shown(frame), status
        except refused as exc:  # a bad prompt; the runtime is full (AdmissionError)
            raise gr.Error(str(exc)) from None

    def opened(session: Session, request: gr.Request) -> None:
        backend.open_tab(request.session_hash, session)

    def closed(request: gr.Request) -> None:
        backend.close_tab(request.session_hash)

    # Gradio passes the request to a parameter typed gr.Request; the hints must resolve
    # (this module's annotations are strings, and `gr` is not one of its globals).
    opened.__annotations__ = {"session": Session, "request": gr.Request}
    closed.__annotations__ = {"request": gr.Request}

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
            with gr.Row():
                gen_question = gr.Textbox(
                    QUESTION, label="ask about the generated video", elem_id="gen_question", scale=4
                )
                gen_ask = gr.Button("Ask", elem_id="gen_ask", scale=1)
            gen_answer = gr.Markdown(elem_id="gen_answer")
            # every tab streams at once: the runtime admits or refuses (runtime.max_streams)
            running = go.click(start, [prompt, session], [video, status], concurrency_limit=None)
            switch.click(guarded(backend.switch_prompt), [prompt, session], [status])
            stop.click(guarded(backend.stop_generate), [session], [status], cancels=[running])
            gen_ask.click(
                guarded(lambda q, s: answer_text(backend.ask_generated(q, s))),
                [gen_question, session],
                [gen_answer],
            )
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
                stream_every=1.0 / max(1.0, backend.fps),
                time_limit=600,
                concurrency_limit=None,
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
            ask.click(
                guarded(lambda q, s: answer_text(backend.ask(q, s))), [question, session], [answer]
            )
        demo.load(opened, [session], None)
        demo.unload(closed)  # the tab closed or reloaded: its stream and sessions end now
    return demo


def add_arguments(p: argparse.ArgumentParser) -> None:
    from streamrt.apps.arguments import count

    p.add_argument("--model", default="assets/tiny-world", help="generator dir or tiny-random")
    p.add_argument("--qa-model", help="Video-LLM directory (default: assets/tiny-vqa)")
    p.add_argument("--config", help="YAML preset: its gen:, cache: and runtime: sections")
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0: all)")
    p.add_argument("--port", type=count(1, 65535), default=7860)


def run(args: argparse.Namespace) -> int:
    try:
        import gradio  # noqa: F401
    except ImportError:
        from streamrt.errors import InputError

        raise InputError("the demo needs gradio: pip install 'streamrt[demo]'") from None
    backend = DemoBackend(args.model, args.qa_model, config=args.config)  # bad: one line
    build_demo(backend).queue().launch(server_name=args.host, server_port=args.port, css=CSS)
    return 0


def main(argv: list[str] | None = None) -> int:
    """`streamrt demo ...` with the CLI's error handling and `--threads`."""
    import sys

    from streamrt.apps.cli import main as cli_main

    return cli_main(["demo", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
