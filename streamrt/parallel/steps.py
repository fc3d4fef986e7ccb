"""Denoising-step pipeline: Live Avatar's timestep-forcing pipeline parallelism
(ALGORITHMS.md 1.10), one process per group of denoising steps, each with its own cache.

Semantics (the same in `StepPipelineReference`, one process, and `StepPipeline`, P ranks):

    steps        t_0 > t_1 > ... > t_{n-1} from the config (`GenConfig.timesteps`, shifted
                 as every sampler shifts them); step k runs at sigma_k.
    step caches  one KV cache per step k (its own cache sequence; on P ranks, on the cache
                 manager of the rank that owns step k). Step k of chunk c runs one forward
                 of chunk c's latents at sigma_k that WRITES the K/V of chunk c as it sees
                 it (at noise level sigma_k: timestep forcing) into cache k, and attends to
                 cache k: the chunks before c at that same step (noise level sigma_k), plus
                 chunk c itself. No clean (t=0) refresh: no cache ever holds clean K/V.
    chunk c      x = noise (step 0's stream draws it) -> step 0 -> x0_0, re-noise to sigma_1
                 (noise drawn by step 0's own generator, or the model's `x0 + v` with
                 `renoise: predicted`) -> step 1 -> ... -> step n-1 -> x0: the finished chunk.
    ranks        rank r owns the consecutive steps [r*n//P, (r+1)*n//P) (P <= n; P = n: one
                 step per rank). The latents of chunk c (with the eps that made them, for
                 residual CFG) go from rank r to rank r+1 by `isend`/`irecv`; the next
                 chunk's `irecv` is posted before this chunk is computed and a send is only
                 waited on before its buffer is reused, so transfers overlap compute. The
                 last rank emits the finished chunks in order; the others emit None.
                 Steady state: rank r works on chunk c while rank r+1 works on chunk c-1, ...,
                 every rank busy on a different chunk, one finished chunk per step-forward.
    noise        step k draws its re-noise from its own generator, seeded `seed + k`, in
                 chunk order, so the result does not depend on P (2 ranks x 2 steps equals
                 4 ranks x 1 step equals one process).

How this differs from the one-process chunk-wise sampler (`samplers.ChunkwiseSampler`):
there, ONE cache holds each finished chunk's K/V (rewritten at t=0 from the clean x0 with
`clean_refresh`, else as written by its last step), and every step of chunk c attends to
those same clean (or last-step) K/V of the chunks before it; all steps of chunk c run
before chunk c+1 starts, and all noise comes from one generator. Here step k of chunk c
attends to the chunks before c as they looked at step k (noisy, sigma_k), so no step
waits for a later step of an older chunk: that is what lets the steps run concurrently on
different ranks. With `renoise: predicted` (no random re-noise) the first chunk equals the
chunk-wise sampler's first chunk, and later chunks differ (tests/unit/test_step_pipeline.py).

Prompt switch: at a chunk boundary given to every rank (`chunks(n, switches)`), each step
cache re-runs the chunks it keeps at its own noise level under the new prompt (its inputs
are kept for that), so every rank switches at the same chunk. Cache policies: all; one that
needs attention scores (participative) gets those of each step's own forward (there is no
clean refresh to take them from). Decoding is the caller's (the CLI decodes on the last
rank, which emits the chunks).

Partial, on purpose: text-to-video only (no video-to-video source, whose chunks start at a
lower step); the runtime and `streamrt serve` do not run on a pipeline group yet.
Faults: every wait is bounded by `timeout`; a rank whose peer died or stalls raises
`PipelineError` naming both ranks; `run_pipeline_local` stops the other ranks (no hang)
and raises `PipelineError` naming the rank that raised (or, when every failure is a
timeout, the lowest rank that timed out, whose message names the peer it waited on).
Tested on gloo (CPU) only: the NCCL path is the same code but has not been run here.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

from streamrt.config import GenConfig
from streamrt.errors import InputError
from streamrt.gen.samplers import drive
from streamrt.gen.schedule import predict_x0, renoise
from streamrt.parallel.launch import (  # noqa: F401 (re-exported for callers of steps)
    DEFAULT_TIMEOUT_S,
    PipelineError,
    check_same,
    run_pipeline_local,
    wait_for,
)


def steps_of_rank(rank: int, world: int, steps: int) -> range:
    """The consecutive denoising steps rank `rank` of `world` owns."""
    if not 1 <= world <= steps:
        raise InputError(
            f"the step pipeline needs 1..{steps} ranks for {steps} denoising steps, got {world}: "
            "use at most one rank per step (gen.timesteps sets the steps)"
        )
    return range(rank * steps // world, (rank + 1) * steps // world)


class StepStage:
    """Denoising step `k` with its own cache: a `GenStream` used only for its sequences,
    prompt, forward and noise generator (seeded `seed + k`)."""

    def __init__(self, engine, prompt: str, config: GenConfig, k: int) -> None:
        cfg = dataclasses.replace(
            config, sampler="chunkwise", clean_refresh=False, seed=config.seed + k
        )
        self.stream = engine.open_stream(prompt, cfg)
        self.k = k
        self.sigmas = self.stream.sigmas
        self.forwards = 0
        self.kept: list[tuple[list[int], torch.Tensor]] = []

    def initial(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Pure-noise latents of the next chunk and the eps that made them (step 0 only)."""
        x, _sigmas, eps = self.stream.initial_latents()
        return x, eps

    def step(self, x: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One forward of the chunk at this step, writing its K/V (at this noise level) into
        this step's cache. Returns the latents re-noised to the next step and their eps, or
        for the last step the finished x0 (and the velocity). A policy that needs attention
        scores (participative) gets those of this forward."""
        s = self.stream
        sigma = self.sigmas[self.k]
        blocks = s.append_chunk()
        t = torch.full((1, x.shape[2]), sigma * 1000.0)
        scores: dict | None = {} if any(q.policy.needs_scores for q in s.seqs) else None
        request = s.request([blocks], x, t, scores=scores, noise=eps)
        v = s.run_alone(request)
        self.forwards += 1
        for r, seq in enumerate(s.seqs):
            if scores is not None:
                seq.policy.observe_scores(seq, request.rows[r].plan, scores, row=r)
            seq.policy.after_write(seq, blocks)
        self._keep(blocks, x)
        x0 = predict_x0(x, v, sigma)
        if self.k + 1 == len(self.sigmas):
            return x0, v
        eps = s.next_noise(x0, v)
        return renoise(x0, eps, self.sigmas[self.k + 1]), eps

    def _keep(self, blocks: list[int] | None = None, x: torch.Tensor | None = None) -> None:
        """Keep this step's input latents of the chunks still cached (for a prompt
        re-cache), with chunk `blocks` (latents `x`) added."""
        if blocks is not None:
            self.kept.append((blocks, x))
        live = set(self.stream.seqs[0].table)
        self.kept = [(b, y) for b, y in self.kept if all(i in live for i in b)]

    def set_prompt(self, prompt: str) -> None:
        """Switch the prompt; the chunks this step still caches are re-run at this step's
        noise level under the new prompt (LongLive's re-cache, per step cache)."""
        s = self.stream
        drive(s.prompt_steps(prompt, recache=False))
        self._keep()
        t_k = self.sigmas[self.k] * 1000.0
        for blocks, x in self.kept:
            s.run_alone(s.request([blocks], x, torch.full((1, x.shape[2]), t_k), causal=True))

    def close(self) -> None:
        self.stream.close()


class StepPipelineReference:
    """The step pipeline in one process: one cache per step, each chunk through the step
    caches in order. `next_latents()` is the next finished chunk `[1, C, F, h, w]`."""

    def __init__(self, engine, prompt: str, config: GenConfig | None = None) -> None:
        config = config or engine.config
        self.stages = [StepStage(engine, prompt, config, k) for k in range(len(config.timesteps))]

    def next_latents(self, prompt: str | None = None) -> torch.Tensor:
        """The next finished chunk; `prompt`: switch to it first (every step cache)."""
        if prompt is not None:
            for stage in self.stages:
                stage.set_prompt(prompt)
        x, eps = self.stages[0].initial()
        for stage in self.stages:
            x, eps = stage.step(x, eps)
        return x

    def close(self) -> None:
        for stage in self.stages:
            stage.close()


class StepPipeline:
    """The step pipeline over a `torch.distributed` group (gloo on CPU, NCCL on GPU): this
    rank's steps, each with its own cache on this rank's engine. Every rank builds the same
    model and calls `chunks(n)` (or `next_latents()` n times, then `close()`)."""

    def __init__(
        self,
        engine,
        prompt: str,
        config: GenConfig | None = None,
        group: dist.ProcessGroup | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        config = config or engine.config
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.timeout = timeout
        self.steps = steps_of_rank(self.rank, self.world, len(config.timesteps))
        self._check_same_setup(prompt, config)
        self.stages = [StepStage(engine, prompt, config, k) for k in self.steps]
        c, h, w = self.stages[0].stream.latent_shape
        self.shape = (2, c, config.chunk_frames, h, w)  # latents and their eps, stacked
        self.device, self.dtype = engine.device, engine.dtype
        self.chunk = 0
        self._recv: tuple[Any, torch.Tensor] | None = None
        self._send: tuple[Any, torch.Tensor] | None = None
        self.bytes_sent = 0
        """Bytes this rank has sent on (latents and their eps of every chunk)."""
        self.log: list[tuple[int, float, float]] = []
        """(chunk, start, end) wall-clock times (`time.time()`) of this rank's compute."""

    def _check_same_setup(self, prompt: str, config: GenConfig) -> None:
        """Every rank must run the same prompt and schedule (else the chunks would mix)."""
        mine = (prompt, config.timesteps, config.shift, config.chunk_frames, config.seed)
        mine += (config.height, config.width, config.guidance_scale, config.renoise)
        check_same(self.rank, self.world, mine, self.group, "prompt and gen settings")

    @property
    def first(self) -> bool:
        return self.rank == 0

    @property
    def last(self) -> bool:
        return self.rank == self.world - 1

    def _peer(self, offset: int) -> int:
        r = self.rank + offset
        return r if self.group is None else dist.get_global_rank(self.group, r)

    def _post_recv(self) -> None:
        buf = torch.empty(self.shape, device=self.device, dtype=self.dtype)
        self._recv = (dist.irecv(buf, self._peer(-1), group=self.group), buf)

    def _wait(self, work, what: str, peer: int) -> None:
        where = f" at chunk {self.chunk}"
        wait_for(work, self.timeout, f"rank {self.rank}: {what}", self.rank, peer, where)

    def next_latents(self, prefetch: bool = True, prompt: str | None = None) -> torch.Tensor | None:
        """Run this rank's steps on the next chunk. The last rank returns the finished chunk;
        the others send their result on and return None. `prefetch`: post the receive of
        the following chunk before computing this one (False for the final chunk).
        `prompt`: switch this rank's step caches to it first (call with the same prompt
        at the same chunk on every rank: the switch lands at one chunk boundary)."""
        if prompt is not None:
            for stage in self.stages:
                stage.set_prompt(prompt)
        if self.first:
            x, eps = self.stages[0].initial()
        else:
            if self._recv is None:
                self._post_recv()
            work, buf = self._recv
            self._recv = None
            self._wait(work, "receiving latents from", self.rank - 1)
            x, eps = buf[0:1], buf[1:2]
            if prefetch:
                self._post_recv()  # overlaps the next chunk's transfer with this compute
        start = time.time()
        for stage in self.stages:
            x, eps = stage.step(x, eps)
        self.log.append((self.chunk, start, time.time()))
        self.chunk += 1
        if self.last:
            return x
        if self._send is not None:  # its buffer is about to be reused
            self._wait(self._send[0], "sending latents to", self.rank + 1)
        payload = torch.cat([x, eps]).contiguous()
        self._send = (dist.isend(payload, self._peer(1), group=self.group), payload)
        self.bytes_sent += payload.numel() * payload.element_size()
        return None

    def chunks(self, n: int, switches: dict[int, str] | None = None) -> Iterator[torch.Tensor]:
        """`n` chunks: yields each finished chunk on the last rank, nothing elsewhere.
        `switches[c]`: the prompt from chunk c on (every rank passes the same)."""
        switches = switches or {}
        for i in range(n):
            x = self.next_latents(prefetch=i + 1 < n, prompt=switches.get(i))
            if x is not None:
                yield x
        self.flush()

    def flush(self) -> None:
        """Wait for this rank's last send (call before leaving the group)."""
        if self._send is not None:
            self._wait(self._send[0], "sending latents to", self.rank + 1)
            self._send = None

    def close(self) -> None:
        self.flush()
        for stage in self.stages:
            stage.close()
