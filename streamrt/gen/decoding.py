"""A stream's frames in order, its decode optionally overlapped with the next chunk's denoising.

Sequential (`overlap_decode: false`): denoise chunk k, decode it, hand out its frames.
Overlapped: a decode thread decodes chunk k while the caller's thread denoises chunk k+1
(torch ops release the GIL, so on two cores both run at once; each keeps one intra-op
thread). The first chunk is decoded at once, so the first frame comes as early as before;
after it, a chunk's frames come out once the next chunk is denoised:

    caller   | denoise 0 | decode 0 |>0 | denoise 1 | denoise 2 |>1 | denoise 3 |>2 ...
    decoder                                        | decode 1 |     | decode 2 |

(`>k`: chunk k's frames handed out). One decode thread per stream decodes its chunks in
submission order, so the decoder's temporal context and the frame order are those of the
sequential path, and the frames are identical. Either way no chunk is computed whose
frames `num_frames` does not need, and an error in the decode thread is raised in the
caller's thread, from the chunk it belongs to.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from streamrt.gen.stream import GenStream


def stream_frames(
    stream: GenStream, num_frames: int | None = None, overlap: bool = False
) -> Iterator[np.ndarray]:
    """Frames `[H, W, 3]` uint8 of `stream` in order: endless with None, else exactly
    `num_frames`, computing only the chunks they need."""
    budget = _FrameBudget(stream, num_frames)
    chunks = _overlapped(stream, budget) if overlap else _sequential(stream, budget)
    if num_frames is None:
        yield from chunks
        return
    for i, frame in enumerate(chunks, 1):
        yield frame
        if i >= num_frames:  # asking for one more would start a chunk nobody sees
            return


class _FrameBudget:
    """Frames still to compute: another chunk is started only while some are missing."""

    def __init__(self, stream: GenStream, num_frames: int | None) -> None:
        self.codec = stream.engine.codec
        self.left = num_frames
        self.first = True

    def more(self) -> bool:
        return self.left is None or self.left > 0

    def spend(self, x0: torch.Tensor) -> None:
        """A chunk of latents `x0` `[B, C, F, h, w]` was computed."""
        if self.left is not None:
            self.left -= self.codec.decoded_frames(x0.shape[2], self.first)
        self.first = False


def _sequential(stream: GenStream, budget: _FrameBudget) -> Iterator[np.ndarray]:
    while budget.more():
        x0 = stream.next_latents()
        budget.spend(x0)
        yield from stream.decode(x0)


def _overlapped(stream: GenStream, budget: _FrameBudget) -> Iterator[np.ndarray]:
    worker = DecodeWorker(stream)
    pending: Future | None = None
    try:
        while budget.more():
            first = budget.first
            x0 = stream.next_latents()  # runs while the decode thread decodes `pending`
            budget.spend(x0)
            if first:
                yield from stream.decode(x0)  # the first frame as early as sequential
                continue
            job = worker.submit(x0)
            if pending is not None:
                yield from worker.collect(pending)
            pending = job
        if pending is not None:
            yield from worker.collect(pending)
    finally:
        worker.close()


class DecodeWorker:
    """One thread that decodes a stream's chunks, in the order they are submitted."""

    def __init__(self, stream: GenStream) -> None:
        self.stream = stream
        # OpenMP's thread count is per OS thread: a new thread would run every op on one
        # thread per core (torch.get_num_threads() still says the caller's count), and two
        # such threads on 2 cores ran 3.7x slower than one after the other (measured).
        self.pool = ThreadPoolExecutor(
            1,
            thread_name_prefix=f"streamrt-decode-{stream.stream_id}",
            initializer=torch.set_num_threads,
            initargs=(torch.get_num_threads(),),
        )

    def submit(self, x0: torch.Tensor) -> Future:
        return self.pool.submit(self.stream.decode_frames, x0, False)

    def collect(self, job: Future) -> np.ndarray:
        """The frames of `job`, waiting for them; its exception if the decode failed."""
        t0 = time.perf_counter()
        try:
            frames = job.result()
        except Exception as exc:
            exc.add_note(f"raised in the decode thread of stream {self.stream.stream_id}")
            raise
        self.stream.count_frames(len(frames), time.perf_counter() - t0)
        return frames

    def close(self) -> None:
        """Drop queued decodes, wait for the running one (at most one chunk)."""
        self.pool.shutdown(wait=True, cancel_futures=True)
