"""Video sinks through PyAV: H.264 MP4 files (and any container/URL FFmpeg can write)."""

from __future__ import annotations

import contextlib
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from streamrt.errors import InputError, StreamrtError

LIVE_PREFIXES = ("rtmp://", "rtsp://", "srt://")
FILE_SUFFIXES = (".mp4", ".mkv", ".mov", ".avi")
"""Containers that hold the H.264 stream a `VideoSink` writes (.webm, .gif, ... do not)."""


class SinkError(StreamrtError, OSError):
    """The output could not be opened or broke while writing (path, server, disk)."""


def check_target(target: str | Path) -> str:
    """`target` as text if a `VideoSink` can write it, else an `InputError` naming the choices."""
    text = str(target)
    if text.startswith(LIVE_PREFIXES) or Path(text).suffix.lower() in FILE_SUFFIXES:
        return text
    raise InputError(
        f"cannot write video to {text!r}: name a file ending in {', '.join(FILE_SUFFIXES)} "
        f"(H.264) or a {', '.join(p + '...' for p in LIVE_PREFIXES)} URL"
    )


class VideoSink:
    """Writes RGB uint8 frames `[H, W, 3]` as H.264 (yuv420p) to a file or URL."""

    def __init__(
        self, target: str | Path, fps: int, width: int, height: int, fmt: str | None = None
    ) -> None:
        self.target = check_target(target) if fmt is None else str(target)
        if fmt is None and self.target.startswith("rtmp://"):
            fmt = "flv"
        try:
            self.container = av.open(self.target, mode="w", format=fmt)
        except (OSError, av.error.FFmpegError) as exc:
            raise SinkError(f"cannot open {self.target} for writing: {exc}") from None
        self.stream = self.container.add_stream("libx264", rate=Fraction(fps))
        self.stream.width, self.stream.height = width, height
        self.stream.pix_fmt = "yuv420p"
        self.stream.options = {"preset": "veryfast", "tune": "zerolatency", "crf": "18"}
        self.live = self.target.startswith(LIVE_PREFIXES)
        if self.live:
            # A viewer joining a live stream starts at the next keyframe: one per second
            # (x264's default is one per 250 frames, half a minute of waiting at 8 fps).
            self.stream.codec_context.gop_size = max(1, int(fps))
        self.fps = fps
        self._start: float | None = None
        self.frames = 0

    def write(self, frame: np.ndarray) -> None:
        """Encode one frame. A live target is paced at `fps` (like `ffmpeg -re`): a model
        faster than real time waits, so viewers see the stream at its own rate."""
        if self.live:
            now = time.monotonic()
            if self._start is None:
                self._start = now
            due = self._start + self.frames / self.fps
            if due > now:
                time.sleep(due - now)
        vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
        try:
            for packet in self.stream.encode(vf):
                self.container.mux(packet)
        except (OSError, av.error.FFmpegError) as exc:
            # FFmpeg connects to a URL when it writes the header, i.e. at the first packet.
            raise SinkError(f"cannot write to {self.target}: {exc}") from None
        self.frames += 1

    def close(self) -> None:
        try:
            for packet in self.stream.encode():
                self.container.mux(packet)
        except (OSError, av.error.FFmpegError) as exc:
            raise SinkError(f"cannot write to {self.target}: {exc}") from None
        finally:
            self.container.close()

    def __enter__(self) -> VideoSink:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.close()
            return
        with contextlib.suppress(OSError):  # keep the first error, not one from flushing
            self.close()


def open_sink(target: str | Path, fps: int, width: int, height: int) -> VideoSink:
    """A sink for `target` (a path such as out.mp4, or rtmp://host/app/key)."""
    check_target(target)
    if not str(target).startswith(LIVE_PREFIXES):
        Path(target).parent.mkdir(parents=True, exist_ok=True)
    return VideoSink(target, fps, width, height)


def read_video(path: str | Path) -> np.ndarray:
    """All frames of a video file as uint8 RGB `[F, H, W, 3]` (for tests and small clips)."""
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
