"""One transformer forward over new frames, with K/V through the cache (used by every sampler)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from streamrt.cache import Sequence
from streamrt.errors import InputError
from streamrt.gen.attention import ForwardContext, RowContext, StreamingState
from streamrt.gen.compiled import mark_dynamic

if TYPE_CHECKING:
    from streamrt.gen.engine import GenEngine
    from streamrt.gen.stream import ForwardRequest


def chunk_rows(
    seqs: list[Sequence], write: list[list[int]], tokens_per_frame: int, causal: bool = False
) -> list[RowContext]:
    """Rows for a forward whose frames go to blocks `write[b]` of `seqs[b]` (already appended).

    The plan is taken now, so it includes the written blocks; their positions in the plan
    are the RoPE frame positions of the queries. `causal` cuts each row's plan after its
    last written block, hiding blocks of younger chunks still in flight.
    """
    rows = []
    for seq, blocks in zip(seqs, write):
        plan = seq.plan()
        if causal:
            plan = plan.upto(max(blocks))
        where = {i: s for i, s in zip(plan.indices, plan.starts)}
        missing = [i for i in blocks if i not in where]
        if missing:
            raise RuntimeError(
                f"policy {seq.policy.name!r} did not keep the blocks being written: {missing}"
            )
        frames = torch.tensor([where[i] // tokens_per_frame for i in blocks], dtype=torch.long)
        rows.append(RowContext(seq, list(blocks), plan, frames))
    return rows


def run_requests(engine: GenEngine, requests: list[ForwardRequest]) -> list[torch.Tensor]:
    """One transformer forward over the rows of every request (of one or several streams,
    with equal `shape_key`); each request's velocity, completed by its stream.

    Rows keep their own plan (kept blocks, positions), timesteps and prompt: a stream's
    result does not depend on what it was batched with (up to float rounding).
    """
    rows = [row for r in requests for row in r.rows]
    cat = (lambda ts: ts[0]) if len(requests) == 1 else torch.cat
    x = cat([r.x for r in requests])
    t = cat([r.t.to(x.device) for r in requests])
    embeds = cat([r.embeds for r in requests])
    keys = [k for r in requests for k in r.text_keys]
    scores: dict | None = {} if any(r.scores is not None for r in requests) else None
    with torch.no_grad(), engine.lock:
        v = streaming_forward(
            engine.transformer, engine.state, rows, x, t, embeds, keys, scores, engine.model
        )
    out, start = [], 0
    for r in requests:
        n = len(r.rows)
        if r.scores is not None:
            for layer, per_row in scores.items():
                r.scores[layer] = list(per_row[start : start + n])
        out.append(r.stream.complete(r, v[start : start + n]))
        start += n
    return out


def streaming_forward(
    transformer: torch.nn.Module,
    state: StreamingState,
    rows: list[RowContext],
    latents: torch.Tensor,
    frame_timesteps: torch.Tensor,
    prompt_embeds: torch.Tensor,
    text_key=None,
    scores: dict | None = None,
    model=None,
) -> torch.Tensor:
    """Run the model on `latents` `[B, C, F, H, W]` with per-frame timesteps `[B, F]`.

    `model` is what is called: `transformer` (None) or its compiled forward
    (`streamrt.gen.compiled`). Returns the model output (flow-matching velocity for Wan),
    same shape as `latents`.
    """
    _, _, _num_frames, height, width = latents.shape
    p_t, p_h, p_w = transformer.config.patch_size
    if p_t != 1:
        raise InputError(
            f"streaming needs a temporal patch size of 1 (one block per latent frame), got {p_t}"
        )
    grid = (height // p_h, width // p_w)
    _check_rope_range(transformer, rows, grid[0] * grid[1])
    compiled = model is not None and model is not transformer
    ctx = ForwardContext(rows, grid, text_key, scores)
    ctx.prepare(transformer.rope, grid[0] * grid[1], uniform=compiled)
    ctx.prepare_prompts(transformer, state, prompt_embeds)
    timestep = model_timestep(frame_timesteps.to(latents.device).float(), grid[0] * grid[1])
    if compiled:  # rows; frames; per-token timesteps: as many as the tokens
        steps = (0,) if timestep.dim() == 1 else (0, 1)
        mark_dynamic(ctx, (latents, (0, 2)), (timestep, steps), (prompt_embeds, (0,)))
    state.current = ctx
    try:
        out = (model if compiled else transformer)(
            latents, timestep, prompt_embeds, return_dict=False
        )[0]
    finally:
        state.current = None
    ctx.finish_scores()
    return out


def model_timestep(frame_timesteps: torch.Tensor, tokens_per_frame: int) -> torch.Tensor:
    """The timestep the model takes for per-frame timesteps `[B, F]`: one per row when every
    frame of a row shares its noise level (diffusers' 1-D path gives the same modulation,
    computed once instead of once per token), else one per token `[B, F * tokens]`."""
    if bool((frame_timesteps == frame_timesteps[:, :1]).all()):
        return frame_timesteps[:, 0]
    return frame_timesteps.repeat_interleave(tokens_per_frame, dim=1)


def _check_rope_range(transformer: torch.nn.Module, rows: list[RowContext], tpf: int) -> None:
    """Refuse frame positions past the model's RoPE table (an index error deep inside)."""
    limit = getattr(transformer.config, "rope_max_seq_len", None)
    if limit is None:
        return
    last = max(
        max(
            [int(r.query_frames.max())]
            + [(s + n - 1) // tpf for s, n in zip(r.plan.starts, r.plan.lengths)]
        )
        for r in rows
    )
    if last >= limit:
        name = rows[0].seq.policy.name
        raise InputError(
            f"frame position {last} is past this model's RoPE table of {limit} frames "
            f"(rope_max_seq_len): cache policy {name!r} places frames at positions that grow "
            "with the stream; for streams this long use one that keeps them bounded "
            "(sink_window with relative positions, deep_sink, ema_sink, participative)"
        )
