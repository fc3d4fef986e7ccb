"""Frame sources: video files and network streams (PyAV), webcams (OpenCV), the procedural world.

    open_source("clip.mp4")            PyAV, any container FFmpeg reads
    open_source("rtmp://host/app/key") PyAV with low-delay options and a read timeout
    open_source("webcam:0")            OpenCV VideoCapture(0)
    open_source("world://seed=3")      streamrt.world.WorldSource

Every source yields RGB uint8 frames `[H, W, 3]` resized to the requested size. A stream
that breaks raises `SourceError` saying what failed; nothing else in the process stops.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np

from streamrt.errors import StreamrtError

# Low delay for live input (ALGORITHMS/DESIGN: probe little, no frame threading); never
# fflags=nobuffer, which drops the first GOP. A player sees no EOF when a publisher leaves
# nginx-rtmp, so reads time out instead of hanging.
LIVE_OPTIONS = {
    "probesize": "32",
    "analyzeduration": "0",
    "flags": "low_delay",
    "rw_timeout": "5000000",
}


class SourceError(StreamrtError, RuntimeError):
    """An input stream could not be opened or broke while reading."""


def _resize(frame: np.ndarray, size: tuple[int, int] | None) -> np.ndarray:
    if size is None or (frame.shape[1], frame.shape[0]) == size:
        return frame
    return cv2.resize(frame, size, interpolation=cv2.INTER_AREA)


def _pyav_frames(url: str, size: tuple[int, int] | None) -> Iterator[np.ndarray]:
    import av

    live = url.startswith(("rtmp://", "rtsp://", "srt://", "udp://", "tcp://"))
    try:
        container = av.open(
            url, options=LIVE_OPTIONS if live else {}, timeout=10.0 if live else None
        )
    except (OSError, av.error.FFmpegError) as exc:
        raise SourceError(f"cannot open input {url}: {exc}") from None
    with container:
        if not container.streams.video:
            kinds = sorted({s.type for s in container.streams}) or ["no streams"]
            raise SourceError(
                f"input {url} has no video stream (it holds {', '.join(kinds)}): pass a video"
            )
        stream = container.streams.video[0]
        stream.thread_type = "SLICE"  # frame threading adds ~2 frames of delay
        try:
            for frame in container.decode(stream):
                yield _resize(frame.to_ndarray(format="rgb24"), size)
        except (OSError, av.error.FFmpegError) as exc:
            raise SourceError(f"input {url} broke while reading: {exc}") from None


def _webcam_frames(index: int, size: tuple[int, int] | None) -> Iterator[np.ndarray]:
    cap = cv2.VideoCapture(index)
    if not cap.isOpened():
        raise SourceError(f"cannot open webcam {index}: no such device or it is busy")
    try:
        while True:
            ok, frame = cap.read()
            if not ok:
                raise SourceError(f"webcam {index} stopped delivering frames")
            yield _resize(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB), size)
    finally:
        cap.release()


def open_source(
    url: str, size: tuple[int, int] | None = None, max_frames: int | None = None
) -> Iterator[np.ndarray]:
    """Frames of `url` (file path, rtmp://..., webcam:N, world://...), resized to `size` (w, h)."""
    if url.startswith("world://"):
        from streamrt.world import WorldConfig, WorldSource

        cfg = WorldConfig(width=size[0], height=size[1]) if size else None
        frames: Iterator[np.ndarray] = iter(WorldSource(url, cfg))
    elif url.startswith("webcam:"):
        try:
            index = int(url.split(":", 1)[1])
        except ValueError:
            raise SourceError(f"webcam input must look like webcam:0, got {url!r}") from None
        frames = _webcam_frames(index, size)
    else:
        if "://" not in url and not Path(url).exists():
            raise SourceError(f"input file {url} does not exist")
        if "://" not in url and Path(url).is_file() and Path(url).stat().st_size == 0:
            raise SourceError(f"input file {url} is empty (0 bytes): pass a video file")
        frames = _pyav_frames(url, size)
    for i, frame in enumerate(frames):
        if max_frames is not None and i >= max_frames:
            return
        yield frame
