"""One live generation stream: its cache sequences, prompt, noise, sampler and decoder."""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from streamrt.config import GenConfig
from streamrt.errors import InputError, NonFiniteError
from streamrt.gen.attention import RowContext
from streamrt.gen.forward import chunk_rows, run_requests
from streamrt.gen.noise import DriftingNoise
from streamrt.gen.samplers import Steps, drive, make_sampler
from streamrt.gen.schedule import shifted_sigmas
from streamrt.gen.settings import fit_window
from streamrt.models.codec import tensor_to_frames
from streamrt.models.text import PromptError

if TYPE_CHECKING:
    from streamrt.gen.engine import GenEngine


@dataclass
class ForwardRequest:
    """One forward a stream's schedule asks for: its batch rows, inputs and what to keep.

    The runtime concatenates requests of several streams into one transformer forward
    (`streamrt.gen.forward.run_requests`); each stream then gets its own rows back.
    """

    stream: GenStream
    rows: list[RowContext]
    """One per batch row (guided streams: conditional rows, then unconditional ones)."""
    x: torch.Tensor
    """Latents `[len(rows), C, F, h, w]`."""
    t: torch.Tensor
    """Per-frame timesteps `[len(rows), F]`."""
    embeds: torch.Tensor
    """Prompt embeddings `[len(rows), text_len, dim]`."""
    text_keys: list
    """Per row, the identity of its prompt (cross-attention K/V are cached per key)."""
    scores: dict | None = None
    """A dict to receive per-layer key importance of each row (participative policies)."""
    noise: torch.Tensor | None = None
    """The eps that made `x` (residual CFG)."""

    @property
    def shape_key(self) -> tuple:
        """Requests with equal keys can share one forward."""
        return (tuple(self.x.shape[1:]), self.x.dtype, tuple(self.embeds.shape[1:]))


def check_prompt(prompt: str) -> str:
    """`prompt` if it is non-empty text, else a `PromptError` saying what to pass."""
    if not isinstance(prompt, str):
        raise PromptError(f"the prompt must be text, got {type(prompt).__name__}")
    if not prompt.strip():
        raise PromptError(
            "the prompt is empty: describe the video, e.g. 'a red circle moving right on a "
            "dark background'"
        )
    return prompt


def check_num_frames(num_frames: int | None) -> int | None:
    """`num_frames` if it is a whole number >= 1 or None (endless), else an `InputError`."""
    if num_frames is not None and (
        isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1
    ):
        raise InputError(
            f"num_frames must be a whole number >= 1 or None (null: endless), got {num_frames!r}"
        )
    return num_frames


class GenStream:
    """A stream of frames from one prompt (switchable), deterministic for its seed.

    Create through `GenEngine.open_stream`. `next_frames()` returns the next decoded chunk.
    """

    def __init__(self, engine: GenEngine, stream_id: str, prompt: str, config: GenConfig) -> None:
        # Refuse a window that cannot hold the sampler's frames in flight before opening
        # anything (every argument counts as the user's: `open_stream` sized the others).
        config = fit_window(config, given=config.policy_args)
        self.engine = engine
        self.config = config
        self.stream_id = stream_id
        engine.encode_prompt(check_prompt(prompt))  # a bad prompt fails before any allocation
        c, h, w = engine.latent_shape(config.height, config.width)
        self.latent_shape = (c, h, w)
        p = engine.transformer.config.patch_size
        self.tokens_per_frame = (h // p[1]) * (w // p[2])
        self.sigmas = shifted_sigmas(config.timesteps, config.shift)
        self.generator = torch.Generator().manual_seed(config.seed)
        # Two-branch CFG runs a second (unconditional) sequence; RCFG needs none.
        self.rcfg = config.guidance_scale != 1.0 and config.rcfg
        self.guided = config.guidance_scale != 1.0 and not config.rcfg
        self.seqs = [engine.open_sequence(f"{stream_id}-c", config)]
        try:  # a refused stream gives its blocks back: the other streams keep their room
            if self.guided:
                self.seqs.append(engine.open_sequence(f"{stream_id}-u", config))
        except Exception:
            self.close()
            raise
        # A stream dropped without close() gives its blocks back (at the manager's next
        # open or register: a finalizer may run inside a manager call).
        self._finalizer = weakref.finalize(self, engine.cache.release_later, self.seqs)
        self.sampler = make_sampler(config.sampler, self)
        self.decoder = engine.codec.decoder()
        self.source: Callable[[], tuple[torch.Tensor, list[float], torch.Tensor]] | None = None
        self.drifting = DriftingNoise(config.noise_drift, config.noise_drift_frames, self.noise)
        self.clean: list[tuple[list[int], torch.Tensor]] = []
        self.deferred: tuple[list[int], torch.Tensor] | None = None
        """A finished chunk whose clean refresh waits for the next chunk (`streamrt.gen.fold`)."""
        self.batched = False
        """Set by the runtime when this stream's last forward was shared with other streams:
        then its refresh stays a forward of its own, since batching already shares each
        forward's fixed cost (8 batched streams ran 4 % slower folded, 1 stream 5 % faster)."""
        self.stats = {
            "chunks": 0,
            "frames": 0,
            "forwards": 0,
            "seconds": 0.0,
            "first_frame_s": None,
        }
        self._opened = time.perf_counter()
        self.prompt = ""
        self.set_prompt(prompt, recache=False)

    # ------------------------------------------------------------------ setup

    def set_prompt(self, prompt: str, recache: bool = True) -> None:
        """Switch the prompt. With `recache`, the kept clean frames are re-run at t=0 under
        the new prompt so the self-attention cache follows it (LongLive's KV re-cache)."""
        drive(self.prompt_steps(prompt, recache))

    def prompt_steps(self, prompt: str, recache: bool = True) -> Generator:
        """`set_prompt` as a schedule (its re-cache forwards are requests)."""
        engine = self.engine
        check_prompt(prompt)
        yield from self.flush_deferred()  # a deferred refresh runs under its own prompt
        self.embeds = engine.encode_prompt(prompt)
        self.text_key = engine.text_key(prompt)
        if self.guided:
            self.uncond = engine.encode_prompt(self.config.negative_prompt)
            self.uncond_key = engine.text_key(self.config.negative_prompt)
        self.prompt = prompt
        self.drifting.set_prompt(prompt)
        if recache:
            live = set(self.seqs[0].table)
            self.clean = [(b, x0) for b, x0 in self.clean if all(i in live for i in b)]
            for blocks, x0 in self.clean:
                yield self.request([blocks], x0, torch.zeros(1, x0.shape[2]), causal=True)

    # ------------------------------------------------------------------ used by samplers

    def noise(self, shape) -> torch.Tensor:
        return torch.randn(shape, generator=self.generator).to(
            self.engine.device, self.engine.dtype
        )

    def next_noise(self, x0: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Noise for the next re-noise: fresh, or the model's own estimate `x0 + v`."""
        if self.config.renoise == "predicted":
            return x0 + v
        return self.noise(x0.shape)

    def initial_latents(self) -> tuple[torch.Tensor, list[float], torch.Tensor]:
        """`(latents, schedule, eps)`: pure noise and the full schedule (text-to-video), or
        the video-to-video source's noised input."""
        if self.source is not None:
            return self.source()
        eps = self.drifting.chunk((1, *self._chunk_shape()))
        return eps, self.sigmas, eps

    def _chunk_shape(self) -> tuple[int, ...]:
        c, h, w = self.latent_shape
        return (c, self.config.chunk_frames, h, w)

    def append_chunk(self) -> list[int]:
        """Allocate the next chunk's blocks in every sequence (the policy evicts first)."""
        blocks = [[seq.append() for _ in range(self.config.chunk_frames)] for seq in self.seqs]
        return blocks[0]

    def request(
        self,
        write: list[list[int]],
        x: torch.Tensor,
        t: torch.Tensor,
        causal: bool = False,
        scores: dict | None = None,
        noise: torch.Tensor | None = None,
    ) -> ForwardRequest:
        """The forward that gives the velocity for latents `x` `[B, C, F, h, w]` whose
        frames go to blocks `write[b]` (see `complete` for what is done with its output).

        With guidance, every row runs twice (conditional, unconditional sequence) in one
        batch. The plan of each row is taken now: the blocks are already appended.
        """
        b = x.shape[0]
        seqs = [s for s in self.seqs for _ in range(b)]
        rows = chunk_rows(seqs, write * len(self.seqs), self.tokens_per_frame, causal)
        embeds = [self.embeds.expand(b, -1, -1)]
        keys = [self.text_key] * b
        if self.guided:
            embeds.append(self.uncond.expand(b, -1, -1))
            keys += [self.uncond_key] * b
            x, t = torch.cat([x, x]), torch.cat([t, t])
        return ForwardRequest(self, rows, x, t, torch.cat(embeds), keys, scores, noise)

    def run_alone(self, request: ForwardRequest) -> torch.Tensor:
        """The velocity of `request`, in a forward of its own."""
        return run_requests(self.engine, [request])[0]

    def complete(self, request: ForwardRequest, v: torch.Tensor) -> torch.Tensor:
        """The velocity the schedule gets from the model output `v` of `request`'s rows:
        with guidance `v_u + g * (v_c - v_u)`; with RCFG, `noise` (the eps that made `x`)
        is the unconditional prediction instead (see `_rcfg`)."""
        self.stats["forwards"] += 1
        if self.guided:
            v_c, v_u = v.chunk(2)
            return v_u + self.config.guidance_scale * (v_c - v_u)
        if self.rcfg and request.noise is not None:
            return self._rcfg(request.x, request.t, v, request.noise)
        return v

    def _rcfg(
        self, x: torch.Tensor, t: torch.Tensor, v: torch.Tensor, noise: torch.Tensor
    ) -> torch.Tensor:
        """Self-negative residual CFG in noise space, mapped back to a velocity.

        eps_c = x + (1 - sigma) v          (the model's noise estimate)
        eps_g = noise + g (eps_c - noise)  (the stored noise as "unconditional")
        v_g   = eps_g - x0_c,  x0_c = x - sigma v
        """
        sigma = (t.to(x) / 1000.0)[:, None, :, None, None]
        eps_c = x + (1 - sigma) * v
        eps_g = noise + self.config.guidance_scale * (eps_c - noise)
        return eps_g - (x - sigma * v)

    def folds(self) -> bool:
        """Whether this stream's clean refresh runs in the next chunk's first forward."""
        cfg = self.config
        return (
            cfg.clean_refresh
            and cfg.fold_refresh
            and cfg.sampler == "chunkwise"
            and not self.batched
            and all(seq.policy.fold_safe for seq in self.seqs)
        )

    def finish_steps(self, blocks: list[int], x0: torch.Tensor) -> Generator:
        """A chunk is done: clean t=0 refresh of its K/V (if configured; deferred to the
        next chunk's first forward when it folds), policy hooks."""
        if self.folds():
            self.deferred = (blocks, x0)
            self.remember_clean(blocks, x0)
            return
        policies = [seq.policy for seq in self.seqs]
        scores: dict | None = {} if any(p.needs_scores for p in policies) else None
        if self.config.clean_refresh:
            refresh = self.refresh_request(blocks, x0, scores)
            yield refresh
            if scores is not None:
                for r, seq in enumerate(self.seqs):
                    seq.policy.observe_scores(seq, refresh.rows[r].plan, scores, row=r)
        self.refreshed(blocks)
        self.remember_clean(blocks, x0)

    def refresh_request(
        self, blocks: list[int], x0: torch.Tensor, scores: dict | None = None
    ) -> ForwardRequest:
        """The clean t=0 forward that rewrites a finished chunk's K/V (block-causal)."""
        return self.request([blocks], x0, torch.zeros(1, x0.shape[2]), True, scores)

    def flush_deferred(self) -> Generator:
        """A deferred refresh (`streamrt.gen.fold`) as a forward of its own, if there is one."""
        if self.deferred is not None:
            blocks, x0 = self.deferred
            self.deferred = None
            yield self.refresh_request(blocks, x0)
            self.refreshed(blocks)

    def refreshed(self, blocks: list[int]) -> None:
        """The policies' write hooks, once a chunk's clean K/V are in place."""
        for seq in self.seqs:
            seq.policy.after_write(seq, blocks)

    def remember_clean(self, blocks: list[int], x0: torch.Tensor) -> None:
        """Keep a finished chunk's clean latents while its blocks are cached (for re-cache)."""
        live = set(self.seqs[0].table)
        self.clean = [(b, x) for b, x in self.clean if all(i in live for i in b)]
        self.clean.append((blocks, x0))

    # ------------------------------------------------------------------ output

    def next_latents(self) -> torch.Tensor:
        """The next finished chunk's clean latents, its forwards run alone."""
        t0 = time.perf_counter()
        x0 = drive(self.chunk_steps())
        self.stats["seconds"] += time.perf_counter() - t0
        return x0

    def chunk_steps(self) -> Steps:
        """The schedule of the next finished chunk (the sampler's, checked for NaN/inf)."""
        x0 = yield from self.sampler.chunk_steps()
        if self.stats["chunks"] == 0 and not bool(torch.isfinite(x0).all()):
            raise NonFiniteError(
                "the model produced NaN/inf latents in its first chunk: its weights hold "
                "non-finite values or the settings overflow (guidance_scale, shift, float16); "
                "check the checkpoint and the gen: settings"
            )
        self.stats["chunks"] += 1
        return x0

    def next_frames(self) -> np.ndarray:
        """Decode the next chunk: uint8 frames `[n, H, W, 3]`."""
        return self.decode(self.next_latents())

    def decode(self, x0: torch.Tensor) -> np.ndarray:
        """uint8 frames `[n, H, W, 3]` of a finished chunk's clean latents (in stream order:
        the decoder keeps the previous chunk's temporal context)."""
        t0 = time.perf_counter()
        frames = self.decode_frames(x0, check=self.stats["first_frame_s"] is None)
        self.count_frames(len(frames), time.perf_counter() - t0)
        return frames

    def decode_frames(self, x0: torch.Tensor, check: bool) -> np.ndarray:
        """`decode` without the bookkeeping: it touches only the decoder, so it may run in
        a decode thread (`streamrt.gen.decoding`), one chunk at a time, in stream order.
        `check`: refuse NaN/inf pixels (done on the first chunk)."""
        with torch.no_grad():
            pixels = self.decoder.decode(x0.float())
        if check and not bool(torch.isfinite(pixels).all()):
            raise NonFiniteError(
                "the codec (VAE) decoded NaN/inf pixels from finite latents: its weights hold "
                "non-finite values; restore the model directory's vae/"
            )
        return tensor_to_frames(pixels)

    def count_frames(self, frames: int, seconds: float) -> None:
        """Count `frames` delivered after `seconds` of decoding (or waiting for it)."""
        self.stats["seconds"] += seconds
        if self.stats["first_frame_s"] is None:
            self.stats["first_frame_s"] = time.perf_counter() - self._opened
        self.stats["frames"] += frames

    def close(self) -> None:
        if hasattr(self, "_finalizer"):
            self._finalizer.detach()
        for seq in self.seqs:
            self.engine.cache.close_sequence(seq)
