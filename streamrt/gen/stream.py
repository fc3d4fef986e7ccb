"""One live generation stream: its cache sequences, prompt, noise, sampler and decoder."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch

from streamrt.config import GenConfig
from streamrt.errors import NonFiniteError
from streamrt.gen.forward import chunk_rows, streaming_forward
from streamrt.gen.noise import DriftingNoise
from streamrt.gen.samplers import make_sampler
from streamrt.gen.schedule import shifted_sigmas
from streamrt.gen.settings import fit_window
from streamrt.models.codec import tensor_to_frames
from streamrt.models.text import PromptError

if TYPE_CHECKING:
    from streamrt.gen.engine import GenEngine

_PROMPT_IDS = itertools.count()


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
        self.sampler = make_sampler(config.sampler, self)
        self.decoder = engine.codec.decoder()
        self.source: Callable[[], tuple[torch.Tensor, list[float], torch.Tensor]] | None = None
        self.drifting = DriftingNoise(config.noise_drift, config.noise_drift_frames, self.noise)
        self.clean: list[tuple[list[int], torch.Tensor]] = []
        self.last_rows: list = []
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
        engine = self.engine
        cond = engine.encode_prompt(check_prompt(prompt))
        self.embeds = cond
        self.text_id = next(_PROMPT_IDS)
        if self.guided:
            self.uncond = engine.encode_prompt(self.config.negative_prompt)
        self.prompt = prompt
        self.drifting.set_prompt(prompt)
        if recache:
            self._recache()

    def _recache(self) -> None:
        live = set(self.seqs[0].table)
        self.clean = [(b, x0) for b, x0 in self.clean if all(i in live for i in b)]
        for blocks, x0 in self.clean:
            self.forward([blocks], x0, torch.zeros(1, x0.shape[2]), causal=True)

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

    def forward(
        self,
        write: list[list[int]],
        x: torch.Tensor,
        t: torch.Tensor,
        causal: bool = False,
        scores: dict | None = None,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Velocity for latents `x` `[B, C, F, h, w]` whose frames go to blocks `write[b]`.

        With guidance, every row runs twice (conditional, unconditional sequence) in one
        batch and the result is `v_u + g * (v_c - v_u)`. With RCFG, `noise` (the eps that
        made `x`) is the unconditional prediction instead (see `_rcfg`).
        """
        e = self.engine
        b = x.shape[0]
        seqs = [s for s in self.seqs for _ in range(b)]
        rows = chunk_rows(seqs, write * len(self.seqs), self.tokens_per_frame, causal)
        embeds = [self.embeds.expand(b, -1, -1)]
        if self.guided:
            embeds.append(self.uncond.expand(b, -1, -1))
            x, t = torch.cat([x, x]), torch.cat([t, t])
        key = (self.text_id, b, self.guided)
        with torch.no_grad(), e.lock:
            v = streaming_forward(
                e.transformer, e.state, rows, x, t, torch.cat(embeds), key, scores, e.parallel
            )
        self.stats["forwards"] += 1
        self.last_rows = rows
        if self.guided:
            v_c, v_u = v.chunk(2)
            v = v_u + self.config.guidance_scale * (v_c - v_u)
        elif self.rcfg and noise is not None:
            v = self._rcfg(x, t, v, noise)
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

    def finish_chunk(self, blocks: list[int], x0: torch.Tensor) -> None:
        """A chunk is done: clean t=0 refresh of its K/V (if configured), policy hooks."""
        policies = [seq.policy for seq in self.seqs]
        scores: dict | None = {} if any(p.needs_scores for p in policies) else None
        if self.config.clean_refresh:
            self.forward([blocks], x0, torch.zeros(1, x0.shape[2]), causal=True, scores=scores)
            if scores is not None:
                for r, seq in enumerate(self.seqs):
                    seq.policy.observe_scores(seq, self.last_rows[r].plan, scores, row=r)
        for seq in self.seqs:
            seq.policy.after_write(seq, blocks)
        self.remember_clean(blocks, x0)

    def remember_clean(self, blocks: list[int], x0: torch.Tensor) -> None:
        """Keep a finished chunk's clean latents while its blocks are cached (for re-cache)."""
        live = set(self.seqs[0].table)
        self.clean = [(b, x) for b, x in self.clean if all(i in live for i in b)]
        self.clean.append((blocks, x0))

    # ------------------------------------------------------------------ output

    def next_latents(self) -> torch.Tensor:
        t0 = time.perf_counter()
        x0 = self.sampler.next_chunk()
        self.stats["seconds"] += time.perf_counter() - t0
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
        x0 = self.next_latents()
        t0 = time.perf_counter()
        with torch.no_grad():
            pixels = self.decoder.decode(x0.float())
        if self.stats["first_frame_s"] is None and not bool(torch.isfinite(pixels).all()):
            raise NonFiniteError(
                "the codec (VAE) decoded NaN/inf pixels from finite latents: its weights hold "
                "non-finite values; restore the model directory's vae/"
            )
        frames = tensor_to_frames(pixels)
        self.stats["seconds"] += time.perf_counter() - t0
        if self.stats["first_frame_s"] is None:
            self.stats["first_frame_s"] = time.perf_counter() - self._opened
        self.stats["frames"] += len(frames)
        return frames

    def close(self) -> None:
        for seq in self.seqs:
            self.engine.cache.close_sequence(seq)
