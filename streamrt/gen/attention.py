"""Streaming attention for diffusers' `WanTransformer3DModel`, attached as processors.

The model stays the stock diffusers class. `attach_streaming(transformer)` swaps the
processors of every block (`blocks.{i}.attn1` / `attn2`) for the two below; they read
what one forward needs from a `ForwardContext` the sampler sets before calling the model:

    self-attention (attn1), per batch row:
        q, k, v of the new frames   -> k, v written (pre-RoPE) into the row's cache blocks
        kept blocks of the plan     -> gathered K, V (includes the new frames)
        RoPE at the plan's positions (frame axis from the policy; h, w as usual)
        softmax attention, block-causal by construction: a chunk sees itself + kept past

    cross-attention (attn2): K/V of the prompt depend only on the prompt, so they are
    computed once per prompt (keyed by `ForwardContext.text_key`) and reused.

Why processors read a context object: the Wan block passes `attention_mask=None` and
RoPE counted from frame 0, and `attention_kwargs` never reaches processors.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.models.transformers.transformer_wan import _get_qkv_projections

from streamrt.cache import AttentionPlan, Sequence
from streamrt.kernels import apply_wan_rope, attend, wan_rope_cos_sin, wan_rope_halves


@dataclass
class RowContext:
    """One batch row of a forward: its cache sequence, where its new K/V go, what it sees."""

    seq: Sequence
    """The row's KV sequence (one block per latent frame)."""
    write: list[int]
    """Logical blocks receiving the K/V of the forward's frames, in frame order."""
    plan: AttentionPlan
    """Kept blocks (the written ones included) and their positions."""
    query_frames: torch.Tensor
    """RoPE frame position of each input frame, `[num_frames]`."""
    rope: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    """(q_cos, q_sin, k_cos, k_sin), filled by `ForwardContext.prepare`."""


@dataclass
class ForwardContext:
    """What the streaming processors read during one transformer forward."""

    rows: list[RowContext]
    grid: tuple[int, int]
    """Patches per frame `(height, width)`."""
    text_key: Any = None
    """Identity of the prompt embeddings (same key: reuse cross-attention K/V)."""
    scores: dict[int, torch.Tensor] | None = None
    """If a dict, self-attention stores per-layer query-key importance of kept tokens here."""
    parallel: Any = None
    """`streamrt.parallel.RowParallel` when the rows are split over ranks: the batch then
    holds only `local` rows, and every rank writes the K/V of all `rows`."""
    local: list[int] | None = None
    """Indices into `rows` of the batch's rows (parallel only; padded with dummies)."""

    def prepare(self, rope: torch.nn.Module, tokens_per_frame: int) -> None:
        """Build the RoPE tables once per forward (shared by every layer)."""
        h, w = self.grid
        for row in self.rows:
            frames = torch.tensor(
                [s // tokens_per_frame for s in row.plan.starts], dtype=torch.long
            )
            k_tab = wan_rope_halves(*wan_rope_cos_sin(rope, frames, h, w))
            q_tab = wan_rope_halves(*wan_rope_cos_sin(rope, row.query_frames, h, w))
            row.rope = (*q_tab, *k_tab)


@dataclass
class StreamingState:
    """Shared by all processors of one transformer; the sampler sets `current` per forward."""

    current: ForwardContext | None = None
    text_cache: OrderedDict = field(default_factory=OrderedDict)
    max_prompts: int = 8
    """Prompts whose cross-attention K/V stay cached (one per live stream is typical)."""
    lock: threading.RLock = field(default_factory=threading.RLock)
    """Held for a whole forward: processors read one context at a time."""

    def prompt_kv(self, text_key: Any) -> dict[int, tuple[torch.Tensor, torch.Tensor]] | None:
        """Per-layer cross-attention K/V of a prompt (LRU over `max_prompts`); None: no caching."""
        if text_key is None:
            return None
        if text_key in self.text_cache:
            self.text_cache.move_to_end(text_key)
        else:
            self.text_cache[text_key] = {}
            while len(self.text_cache) > self.max_prompts:
                self.text_cache.popitem(last=False)
        return self.text_cache[text_key]

    def context(self) -> ForwardContext:
        if self.current is None:
            raise RuntimeError(
                "this transformer streams through a KV cache: call it through a streamrt "
                "sampler (ForwardContext not set), or detach_streaming() it first"
            )
        return self.current


class StreamingSelfAttention:
    """attn1 of block `layer`: K/V through the cache manager, RoPE at assigned positions."""

    def __init__(self, layer: int, state: StreamingState) -> None:
        self.layer = layer
        self.state = state

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None
    ):
        ctx = self.state.context()
        query, key, value = _get_qkv_projections(attn, hidden_states, None)
        query = attn.norm_q(query).unflatten(2, (attn.heads, -1))
        key = attn.norm_k(key).unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        keys, values, queries = [], [], []
        rows = ctx.rows
        all_keys, all_values = key, value
        if ctx.parallel is not None:  # this rank holds rows ctx.local; share their K/V
            all_keys = ctx.parallel.gather(key, len(rows))
            all_values = ctx.parallel.gather(value, len(rows))
            rows = [ctx.rows[j] for j in ctx.local]
        # Every row writes before any row reads: rows that share a sequence (stream batch)
        # all see the K/V this forward computed for the frames in flight.
        for b, row in enumerate(ctx.rows):
            if row.write:
                row.seq.write_layer(row.write, self.layer, all_keys[b], all_values[b])
        for b, row in enumerate(rows):
            k, v = row.seq.gather(self.layer, row.plan)
            q_cos, q_sin, k_cos, k_sin = row.rope
            queries.append(apply_wan_rope(query[b], q_cos, q_sin, halves=True))
            keys.append(apply_wan_rope(k.to(query.dtype), k_cos, k_sin, halves=True))
            values.append(v.to(query.dtype))
        if len({k.shape[0] for k in keys}) == 1:  # same layout: one batched call
            out = attend(torch.stack(queries), torch.stack(keys), torch.stack(values))
        else:
            out = torch.stack([attend(q, k, v) for q, k, v in zip(queries, keys, values)])
        if ctx.scores is not None:
            importance = _key_importance(queries, keys)
            if ctx.parallel is not None:
                importance = ctx.parallel.gather(importance, len(ctx.rows))
            ctx.scores[self.layer] = importance
        out = out.flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))


def _key_importance(queries: list[torch.Tensor], keys: list[torch.Tensor]) -> torch.Tensor:
    """Per kept token `j`: `sum_r q_r . k_j` over the forward's queries and heads (Deep Forcing)."""
    return torch.stack(
        [torch.einsum("qhd,khd->k", q.float(), k.float()) for q, k in zip(queries, keys)]
    )


class CachedCrossAttention:
    """attn2: prompt K/V computed once per `ForwardContext.text_key`, then reused."""

    def __init__(self, layer: int, state: StreamingState) -> None:
        self.layer = layer
        self.state = state

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None
    ):
        if attn.add_k_proj is not None:
            raise NotImplementedError("image-conditioned Wan (I2V, added K/V) is not streamed yet")
        ctx = self.state.context()
        per_layer = self.state.prompt_kv(ctx.text_key)
        kv = per_layer.get(self.layer) if per_layer is not None else None
        if kv is None:
            key = attn.norm_k(attn.to_k(encoder_hidden_states)).unflatten(2, (attn.heads, -1))
            value = attn.to_v(encoder_hidden_states).unflatten(2, (attn.heads, -1))
            kv = (key, value)
            if per_layer is not None:
                per_layer[self.layer] = kv
        query = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))
        out = attend(query, *kv).flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))


def attach_streaming(transformer: torch.nn.Module) -> StreamingState:
    """Swap every block's attention processors for streaming ones; return their shared state.

    Attaching twice returns the existing state, so engines sharing one model share it too
    (and its lock serialises their forwards).
    """
    existing = getattr(transformer, "_streamrt_state", None)
    if existing is not None:
        return existing
    state = StreamingState()
    processors = {}
    for i in range(len(transformer.blocks)):
        processors[f"blocks.{i}.attn1.processor"] = StreamingSelfAttention(i, state)
        processors[f"blocks.{i}.attn2.processor"] = CachedCrossAttention(i, state)
    transformer.set_attn_processor(processors)
    transformer._streamrt_state = state
    return state


def detach_streaming(transformer: torch.nn.Module) -> None:
    """Restore diffusers' default processors (plain full-sequence attention)."""
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    transformer.set_attn_processor(WanAttnProcessor())
    transformer.__dict__.pop("_streamrt_state", None)
