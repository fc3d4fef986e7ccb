"""Live video-to-video (StreamDiffusionV2): motion-aware noise and a similarity filter.

motion   d   = clip(max_f sqrt(mean((x_f - x_{f-1})^2)) / 0.2, 0, 1)    pixels in [-1, 1]
strength s_t = 0.9 * (s0 - 0.1 * d) + 0.1 * s_{t-1}
latents  z   = s_t * eps + (1 - s_t) * encode(chunk)
schedule: start at sigma = s_t, then the stream's sigmas below it

similarity filter (StreamDiffusion): skip an input frame with probability
max(0, 1 - (1 - cos) / (1 - threshold)), cos against the last processed frame;
process one anyway after `max_skipped_frames` skips. A skipped frame repeats the last
output frame, so the output keeps the input's frame count and timing.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator

import numpy as np
import torch

from streamrt.errors import InputError
from streamrt.gen.stream import GenStream
from streamrt.models.codec import frames_to_tensor


def motion_level(pixels: torch.Tensor, previous: torch.Tensor | None = None) -> float:
    """`d` in [0, 1] of a chunk `[1, 3, F, H, W]` in [-1, 1] (with the previous chunk's last frame)."""
    x = pixels if previous is None else torch.cat([previous, pixels], dim=2)
    if x.shape[2] < 2:
        return 0.0
    diff = (x[:, :, 1:] - x[:, :, :-1]).float()
    rms = diff.pow(2).mean(dim=(0, 1, 3, 4)).sqrt().max().item()
    return float(np.clip(rms / 0.2, 0.0, 1.0))


class SimilarityFilter:
    """Stochastic skip of near-duplicate input frames (deterministic for the stream's seed)."""

    def __init__(self, threshold: float, max_skipped: int, seed: int) -> None:
        self.threshold = threshold
        self.max_skipped = max_skipped
        self.rng = np.random.default_rng(seed)
        self.last: np.ndarray | None = None
        self.skipped = 0

    def skip(self, frame: np.ndarray) -> bool:
        vec = frame.astype(np.float32).ravel()
        if self.last is None or self.skipped >= self.max_skipped:
            return self._keep(vec)
        cos = float(vec @ self.last / (np.linalg.norm(vec) * np.linalg.norm(self.last) + 1e-8))
        p_skip = max(0.0, 1.0 - (1.0 - cos) / (1.0 - self.threshold))
        if self.rng.random() < p_skip:
            self.skipped += 1
            return True
        return self._keep(vec)

    def _keep(self, vec: np.ndarray) -> bool:
        self.last, self.skipped = vec, 0
        return False


class NeedInput(Exception):
    """The sampler asked for the next chunk's latents before enough input frames arrived."""


class VideoToVideo:
    """Feeds a `GenStream` from input frames and yields one output frame per input frame."""

    def __init__(self, stream: GenStream) -> None:
        self.stream = stream
        cfg = stream.config
        self.filter = SimilarityFilter(cfg.similarity_threshold, cfg.max_skipped_frames, cfg.seed)
        self.strength = cfg.v2v_strength
        self.pending: list[np.ndarray] = []
        self.chunks: list[torch.Tensor] = []
        self.last_pixels: torch.Tensor | None = None
        self.encoder = stream.engine.codec.encoder()
        stream.source = self._source
        self.last_out: np.ndarray | None = None

    def _check(self, frame: np.ndarray, index: int) -> np.ndarray:
        frame = np.asarray(frame)
        want = (self.stream.config.height, self.stream.config.width, 3)
        if frame.shape != want:
            raise InputError(
                f"input frame {index} has shape {frame.shape}; expected {want} (H, W, RGB)"
            )
        if frame.dtype != np.uint8:
            if not np.issubdtype(frame.dtype, np.floating) or not np.isfinite(frame).all():
                raise InputError(
                    f"input frame {index} must be uint8 RGB (or finite floats in [0, 255])"
                )
            frame = np.clip(frame, 0, 255).astype(np.uint8)
        return frame

    def _source(self) -> tuple[torch.Tensor, list[float], torch.Tensor]:
        """Initial latents of the next chunk: the input, noised by the motion-aware strength."""
        s = self.stream
        if not self.chunks:
            # Samplers call this before changing any state, so the call can be retried.
            raise NeedInput
        pixels = self.chunks.pop(0)
        d = motion_level(pixels, self.last_pixels)
        self.last_pixels = pixels[:, :, -1:]
        cfg = s.config
        self.strength = 0.9 * (cfg.v2v_strength - 0.1 * d) + 0.1 * self.strength
        latents = self.encoder.encode(pixels.to(s.engine.device, s.engine.dtype))
        noise = s.noise(latents.shape)
        z = self.strength * noise + (1 - self.strength) * latents
        sigmas = [self.strength] + [x for x in s.sigmas if x < self.strength]
        return z, sigmas, noise

    def close(self) -> None:
        """End the stream (its KV blocks go back to the cache manager)."""
        self.stream.close()

    def _frames_for_next_chunk(self) -> int:
        f = self.stream.config.chunk_frames
        if not self.chunks:
            return self.encoder.frames_needed(f)
        return self.stream.engine.codec.temporal * f  # only the very first chunk is shorter

    def run(self, frames: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
        """One output frame per input frame, in input order.

        Each input takes a slot: "gen" (its restyled frame, which arrives a chunk later) or
        "repeat" (skipped by the similarity filter: the output before it is shown again).
        When the input ends, the last frame is repeated to complete the open chunks, and
        the extra outputs are dropped.
        """
        slots: deque[str] = deque()
        produced: deque[np.ndarray] = deque()
        last_in: np.ndarray | None = None
        for i, frame in enumerate(frames):
            frame = self._check(frame, i)
            if last_in is not None and self.filter.skip(frame):
                slots.append("repeat")
            else:
                slots.append("gen")
                last_in = frame
                self._push(frame, produced)
            yield from self._drain(slots, produced)
        # Pad with the last frame; window samplers need several chunks to finish theirs.
        for _ in range(self._flush_limit()):
            if "gen" not in slots or last_in is None:
                break
            self._push(last_in, produced)
            yield from self._drain(slots, produced)

    def _push(self, frame: np.ndarray, produced: deque[np.ndarray]) -> None:
        self.pending.append(frame)
        # Chunks the sampler has not taken yet count too (window samplers fill up first).
        if len(self.pending) < self._frames_for_next_chunk():
            return
        chunk = frames_to_tensor(np.stack(self.pending))
        self.pending = []
        produced.extend(self.step(chunk))

    def step(self, chunk: torch.Tensor) -> Iterable[np.ndarray]:
        """One more chunk of input pixels `[1, 3, F, H, W]`: the stream's next output frames
        (none while a window sampler fills up). A layer pipeline overrides this to run the
        chunk on its ranks (`streamrt.parallel.serving`)."""
        self.chunks.append(chunk)
        try:
            return self.stream.next_frames()
        except NeedInput:
            return ()

    def _drain(self, slots: deque[str], produced: deque[np.ndarray]) -> Iterator[np.ndarray]:
        while slots:
            if slots[0] == "gen":
                if not produced:
                    return
                self.last_out = produced.popleft()
            elif self.last_out is None:
                return
            slots.popleft()
            yield self.last_out

    def _flush_limit(self) -> int:
        cfg = self.stream.config
        chunk = cfg.chunk_frames * self.stream.engine.codec.temporal
        return chunk * (len(self.stream.sigmas) + 2)
