"""Samplers: how a stream turns noise into finished chunks.

A sampler is a schedule: `chunk_steps()` is a generator that yields one `ForwardRequest`
per transformer forward it needs and receives that forward's velocity, returning the
finished chunk. Whoever drives it decides how the forward runs: alone (`drive`, the
one-stream path) or batched with other streams' requests in the runtime's step loop
(`streamrt.runtime`). Both give the same numbers.

    chunkwise     Self-Forcing: per chunk, n steps of denoise -> re-noise, then a t=0
                  pass rewrites the chunk's K/V with clean frames (by default inside the
                  next chunk's first forward, `streamrt.gen.fold`).
    rolling       Rolling Forcing: a window of n chunks at staggered noise levels (oldest
                  least noisy), denoised jointly in one forward; the oldest leaves each call.
    stream_batch  StreamDiffusion(V2): the same n chunks in flight, as n batch rows with a
                  causal view each; one batched forward finishes one chunk.

Every sampler is deterministic for a seed: all noise comes from the stream's generator.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Generator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from streamrt.errors import InputError
from streamrt.gen.fold import begin_fold, end_fold, folded_request
from streamrt.gen.schedule import predict_x0, renoise

if TYPE_CHECKING:
    from streamrt.gen.stream import ForwardRequest, GenStream

Steps = Generator["ForwardRequest", torch.Tensor, torch.Tensor]
"""A schedule: yields forward requests, is sent each one's velocity, returns clean latents."""


def drive(steps: Generator[ForwardRequest, torch.Tensor, object]):
    """Run a schedule alone: every request is one forward of its own stream."""
    try:
        request = next(steps)
        while True:
            request = steps.send(request.stream.run_alone(request))
    except StopIteration as stop:
        return stop.value


@dataclass
class _InFlight:
    x: torch.Tensor
    """Current latents `[1, C, F, h, w]`."""
    level: int
    """Index into the stream's sigmas of the noise level `x` sits at."""
    blocks: list[int]
    """Cache blocks of its frames."""
    sigmas: list[float]
    """This chunk's own schedule (video-to-video chunks start lower)."""
    noise: torch.Tensor
    """The eps that made `x` (residual CFG uses it as the unconditional prediction)."""


class Sampler(ABC):
    """Turns a stream's noise into finished (clean) latent chunks."""

    name: str

    def __init__(self, stream: GenStream) -> None:
        self.stream = stream

    @abstractmethod
    def chunk_steps(self) -> Steps:
        """The schedule of the next finished chunk."""

    def _finish(self, chunk: _InFlight, x0: torch.Tensor) -> Steps:
        yield from self.stream.finish_steps(chunk.blocks, x0)
        return x0


class ChunkwiseSampler(Sampler):
    """Self-Forcing's loop: one chunk at a time."""

    name = "chunkwise"

    def chunk_steps(self) -> Steps:
        s = self.stream
        x, sigmas, eps = s.initial_latents()
        fold = yield from begin_fold(s)  # the last chunk's deferred refresh, if any
        chunk = _InFlight(x, 0, fold.blocks if fold else s.append_chunk(), sigmas, eps)
        for i, sigma in enumerate(sigmas):
            t = torch.full((1, x.shape[2]), sigma * 1000.0)
            if i == 0 and fold is not None:  # one forward: that refresh, then this step
                v = (yield folded_request(s, fold, x, t, eps))[1:]
                end_fold(s, fold)
            else:
                v = yield s.request([chunk.blocks], x, t, noise=eps)
            x0 = predict_x0(x, v, sigma)
            if i + 1 < len(sigmas):
                eps = s.next_noise(x0, v)
                x = renoise(x0, eps, sigmas[i + 1])
        return (yield from self._finish(chunk, x0))


class _WindowSampler(Sampler):
    """Shared by rolling and stream batch: n chunks in flight, one finished per forward."""

    causal_rows: bool

    def __init__(self, stream: GenStream) -> None:
        super().__init__(stream)
        self.window: list[_InFlight] = []

    def chunk_steps(self) -> Steps:
        s = self.stream
        while True:
            x, sigmas, eps = s.initial_latents()
            self.window.append(_InFlight(x, 0, s.append_chunk(), sigmas, eps))
            outs = yield from self._denoise_window()
            finished = None
            for chunk, (x0, vel) in zip(list(self.window), outs):
                if chunk.level + 1 == len(chunk.sigmas):
                    finished = (chunk, x0)
                    self.window.remove(chunk)
                else:
                    chunk.level += 1
                    chunk.noise = s.next_noise(x0, vel)
                    chunk.x = renoise(x0, chunk.noise, chunk.sigmas[chunk.level])
            if finished is not None:
                return (yield from self._finish(*finished))

    @abstractmethod
    def _denoise_window(self) -> Generator[ForwardRequest, torch.Tensor, list]:
        """One forward over every chunk in flight; (x0 estimate, velocity) of each, oldest first."""

    def _sigmas(self) -> list[float]:
        return [c.sigmas[c.level] for c in self.window]


class RollingSampler(_WindowSampler):
    """Rolling Forcing: the window's chunks in one sequence, attending to each other."""

    name = "rolling"

    def _denoise_window(self) -> Generator[ForwardRequest, torch.Tensor, list]:
        s = self.stream
        x = torch.cat([c.x for c in self.window], dim=2)
        f = self.window[0].x.shape[2]
        sig = torch.tensor(self._sigmas()).repeat_interleave(f)
        blocks = [b for c in self.window for b in c.blocks]
        noise = torch.cat([c.noise for c in self.window], dim=2)
        v = yield s.request([blocks], x, (sig * 1000.0)[None], noise=noise)
        x0 = predict_x0(x, v, sig.view(1, 1, -1, 1, 1).to(x))
        return list(zip(x0.split(f, dim=2), v.split(f, dim=2)))


class StreamBatchSampler(_WindowSampler):
    """Stream batch: chunks in flight as batch rows, each seeing only older chunks."""

    name = "stream_batch"

    def _denoise_window(self) -> Generator[ForwardRequest, torch.Tensor, list]:
        s = self.stream
        x = torch.cat([c.x for c in self.window], dim=0)
        f = x.shape[2]
        sig = torch.tensor(self._sigmas())
        t = (sig * 1000.0)[:, None].expand(-1, f)
        noise = torch.cat([c.noise for c in self.window], dim=0)
        v = yield s.request([c.blocks for c in self.window], x, t, causal=True, noise=noise)
        x0 = predict_x0(x, v, sig.view(-1, 1, 1, 1, 1).to(x))
        return list(zip(x0.split(1, dim=0), v.split(1, dim=0)))


SAMPLERS: dict[str, type[Sampler]] = {
    ChunkwiseSampler.name: ChunkwiseSampler,
    RollingSampler.name: RollingSampler,
    StreamBatchSampler.name: StreamBatchSampler,
}


def frames_in_flight(sampler: str, steps: int, chunk_frames: int) -> tuple[int, str]:
    """Frames a sampler writes to the cache before the oldest of them is finished, and a
    description of why, for messages.

        chunkwise                 one chunk:                  chunk_frames
        rolling, stream_batch     one chunk per step:  steps x chunk_frames
    """
    if sampler not in SAMPLERS:
        raise InputError(f"unknown sampler {sampler!r}; choose one of: {', '.join(SAMPLERS)}")
    if sampler == ChunkwiseSampler.name:
        return (
            chunk_frames,
            f"the {sampler} sampler with one chunk of {chunk_frames} frames in flight",
        )
    n = steps * chunk_frames
    return n, f"the {sampler} sampler with {steps} steps x {chunk_frames} frames in flight"


def make_sampler(name: str, stream: GenStream) -> Sampler:
    if name not in SAMPLERS:
        raise InputError(f"unknown sampler {name!r}; choose one of: {', '.join(SAMPLERS)}")
    return SAMPLERS[name](stream)
