"""Streaming attention for diffusers' `WanTransformer3DModel`, attached as processors.

The model stays the stock diffusers class. `attach_streaming(transformer)` swaps the
processors of every block (`blocks.{i}.attn1` / `attn2`) for the two below; they read
what one forward needs from a `ForwardContext` the sampler sets before calling the model:

    self-attention (attn1), per batch row:
        q, k, v of the new frames   -> q, k rotated at the frames' own (absolute) frame;
                                       k, v written into the row's cache blocks
        kept blocks of the plan     -> gathered K, V (includes the new frames)
        keys the policy re-positions (a re-aligned sink, a gap left by compression)
                                    -> turned on the frame axis by what changed
        softmax attention, block-causal by construction: a chunk sees itself + kept past

    RoPE makes attention depend only on the distance between query and key. A plan lays
    the kept blocks at positions of its own (bounded, contiguous), but in the usual case
    (a window) every kept block and the query move by the same offset from the frames
    they were written at, so keys rotated once at write are already right: per layer only
    the queries and the new keys are rotated, plus the few keys whose distance changed
    (`BatchLayout.shift_ids`). Positions are absolute frames, unbounded, computed in
    float64 (`WanKeyRope`); the sequence's `key_rotation` lets policies that fold or
    compare blocks (EMA sink, adaptive sink) turn keys where they need them.

    cross-attention (attn2): K/V of the prompt depend only on the prompt, so they are
    computed once per prompt (keyed per row by `ForwardContext.text_key`) and reused.

Rows may belong to different streams (the runtime batches streams into one forward): each
row has its own plan, positions, timesteps and prompt. Rows whose plans keep the same
number of tokens attend in one call; rows keeping different numbers (the chunks of a stream
batch, streams with windows of different sizes) attend in one call per distinct length,
over exactly their keys: one padded call with a mask computed the padding too (SDPA's
kernels do not skip masked keys), 2.5 ms against 1.6 for a stream batch's 4 rows keeping
768/576/384/192 keys (one CPU thread, `q` 192 tokens, 4 heads of 32).

A compiled forward (`gen.compile`, `streamrt.gen.compiled`) runs these same processors:
they read only tensors, the pool is written by one in-place custom op per layer, and rows
of different lengths attend in one masked call.

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
from streamrt.kernels import WanKeyRope, attend, rotate


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


@dataclass
class ForwardContext:
    """What the streaming processors read during one transformer forward."""

    rows: list[RowContext]
    grid: tuple[int, int]
    """Patches per frame `(height, width)`."""
    text_key: Any = None
    """Identity of each row's prompt embeddings (a list, one per row; or one key for every
    row): rows with the same key reuse the same cross-attention K/V; None: no caching."""
    scores: dict[int, list[torch.Tensor]] | None = None
    """If a dict, self-attention stores per layer, per row, the query-key importance of the
    row's kept tokens here (whole padded rows during the forward, cut after it by
    `finish_scores`)."""
    batch: BatchLayout | None = None
    """Index tensors, RoPE tables and mask shared by every layer (`prepare`)."""
    text_kv: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None
    """Per layer, the cross-attention K, V `[rows, text_len, heads, head_dim]` of every
    row's prompt (`prepare_prompts`); None: attn2 projects the prompt itself."""
    uniform: bool = False
    """The layout of a compiled forward (`prepare`)."""

    def prepare(self, rope: torch.nn.Module, tokens_per_frame: int, uniform: bool = False) -> None:
        """Everything the layers share, built once per forward (`BatchLayout`). `uniform`:
        for a compiled forward, one structure whatever the rows (`BatchLayout.build`; the
        prompt K/V always contiguous, `prepare_prompts`)."""
        self.uniform = uniform
        self.batch = BatchLayout.build(self, rope, tokens_per_frame, uniform)

    def finish_scores(self) -> None:
        """After the forward: each layer's importance `[rows, most kept]` as one tensor per
        row over its own kept tokens (the processors store whole rows: slicing them by
        each row's length inside a compiled forward would specialise it on the lengths;
        copies, so that a replayed CUDA graph cannot overwrite them)."""
        for layer, found in (self.scores or {}).items():
            if isinstance(found, torch.Tensor):
                self.scores[layer] = [s[:n].clone() for s, n in zip(found, self.batch.lengths)]

    def prepare_prompts(
        self, transformer: torch.nn.Module, state: StreamingState, embeds: torch.Tensor
    ) -> None:
        """Every layer's cross-attention K/V of the rows' prompts (`text_kv`), projected once
        per prompt key and kept in `state` (the prompt's K/V depend on the prompt only);
        rows without a key are projected every forward.

        `embeds` are the prompt embeddings the model takes `[rows, text_len, dim]`; they go
        through the model's own text projection (`condition_embedder.text_embedder`), as in
        its forward, every prompt not yet projected in one call. Done before the forward,
        so a compiled forward reads tensors only.
        """
        rows = embeds.shape[0]
        keys = self.text_key if isinstance(self.text_key, list) else [self.text_key] * rows
        names = [("row", r) if k is None else k for r, k in enumerate(keys)]
        blocks = transformer.blocks
        per_key: dict[Any, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
        missing: dict[Any, int] = {}  # prompt -> a row of it, for prompts not projected yet
        for row, (name, key) in enumerate(zip(names, keys)):
            if name not in per_key:
                per_key[name] = {} if key is None else state.prompt_kv(key)
                if len(per_key[name]) < len(blocks):
                    missing[name] = row
        if missing:
            text = transformer.condition_embedder.text_embedder(embeds[list(missing.values())])
            for i, block in enumerate(blocks):
                k, v = _project_prompt(block.attn2, text)
                for j, name in enumerate(missing):
                    one = slice(j, j + 1)
                    per_key[name][i] = (
                        (k[one], v[one])
                        if len(missing) == 1
                        else (
                            k[one].clone(),
                            v[one].clone(),
                        )
                    )
        if len(per_key) == 1 and not self.uniform:  # one prompt: a view, no copy
            (kept,) = per_key.values()
            self.text_kv = {
                i: (k.expand(rows, -1, -1, -1), v.expand(rows, -1, -1, -1))
                for i, (k, v) in kept.items()
            }
            return
        self.text_kv = {
            i: tuple(torch.cat([per_key[n][i][j] for n in names]) for j in (0, 1))
            for i in range(len(blocks))
        }


@dataclass
class BatchLayout:
    """What every layer of one forward reads: per layer, the K/V of all rows are written
    with one indexed write and the kept K/V of all rows read with one indexed read of the
    cache's device pool; rows keeping fewer blocks are padded (with a valid page) and
    masked. Queries and new keys are rotated at their absolute frames (`rope`); kept
    blocks whose distance to the query differs from the one they were written with are
    turned by the difference (`shift_ids`, `shift`)."""

    table: torch.Tensor
    """The device pool, `[pages, 2, layers, tokens_per_block, heads, head_dim]`."""
    write_ids: torch.Tensor
    """Pages receiving the forward's frames, every row's in row order `[rows * frames]`."""
    read_ids: torch.Tensor
    """Pages each computed row attends to, padded `[rows, most kept blocks]`."""
    lengths: list[int]
    """Kept tokens per computed row."""
    groups: list[tuple[slice | torch.Tensor, int]] | None
    """Rows keeping the same number of tokens (a slice when they are adjacent) and that
    number, one entry per distinct length; None when every row keeps the same number."""
    mask: torch.Tensor | None
    """With `groups` (and in a uniform layout): True where a row's key is kept, not
    padding, `[rows, 1, 1, keys]`. A compiled forward attends once with it (calls per
    length would specialise the graph on every length)."""
    rope: torch.Tensor
    """Rotation of the queries and new keys as real pairs (`rotate`),
    `[rows, q_tokens, 1, head_dim / 2, 2]`."""
    shift_ids: torch.Tensor | None
    """Kept blocks (flat over `[rows * most kept blocks]`) to turn; None: none."""
    shift: torch.Tensor | None
    """Their rotation on the frame axis as real pairs, `[len(shift_ids), 1, 1, head_dim / 2, 2]`."""

    @classmethod
    def build(
        cls, ctx: ForwardContext, rope: torch.nn.Module, tpf: int, uniform: bool = False
    ) -> BatchLayout:
        """The layout of `ctx`'s rows. `uniform` (a compiled forward): the same structure
        for every forward, so the graph is not specialised on it: a mask even when every
        row keeps as many tokens (all True; not on CUDA, below), and at least two turned
        blocks (block 0 by a zero angle, which leaves it exactly as it is, where none
        moved; a single one repeated)."""
        h, w = ctx.grid
        seq = ctx.rows[0].seq
        manager, spec = seq.manager, seq.spec
        if any(r.seq.spec != spec or r.seq.manager is not manager for r in ctx.rows):
            raise RuntimeError("rows of one forward must share a cache manager and KV layout")
        keys_rope = key_rope(rope)
        table = manager.device_table(spec)
        device = table.device
        write = [i for r in ctx.rows for i in manager.device_ids(r.seq, r.write, write=True)]
        reads, q_frames, shifts = [], [], []
        most = max(len(r.plan.indices) for r in ctx.rows)
        for n, row in enumerate(ctx.rows):
            plan, table_of = row.plan, row.seq.table
            if any(k != spec.tokens_per_block for k in plan.lengths):
                raise RuntimeError("generation blocks hold one whole latent frame each")
            _bind_rotation(row.seq, keys_rope, ctx.grid, tpf)
            reads.append(manager.device_ids(row.seq, plan.indices))
            frames = [table_of[i].position // tpf for i in row.write]
            offsets = set((row.query_frames - torch.tensor(frames)).tolist())
            if len(offsets) != 1:
                raise RuntimeError(
                    f"policy {row.seq.policy.name!r} placed the frames being written at "
                    "uneven distances from where they are written"
                )
            offset = offsets.pop()
            q_frames.append(frames)
            for j, (i, start) in enumerate(zip(plan.indices, plan.starts)):
                moved = (start - table_of[i].position) // tpf - offset
                if moved:
                    shifts.append((n * most + j, moved))
        read_ids = torch.tensor([r + [r[0]] * (most - len(r)) for r in reads], device=device)
        lengths = [len(r) * spec.tokens_per_block for r in reads]
        groups = mask = None
        if min(lengths) < most * spec.tokens_per_block:
            groups = [
                (_rows([n for n, length in enumerate(lengths) if length == kept], device), kept)
                for kept in sorted(set(lengths))
            ]
        # Uniform: a mask always on the CPU (it costs little there); on CUDA a mask rules
        # out SDPA's flash kernel, so there only rows of different lengths get one.
        if groups is not None or (uniform and device.type != "cuda"):
            keys = torch.arange(most * spec.tokens_per_block)
            mask = (keys < torch.tensor(lengths)[:, None]).to(device)[:, None, None, :]
        if uniform and len(shifts) < 2:  # repeats write the same value
            shifts += [shifts[-1] if shifts else (0, 0)] * (2 - len(shifts))
        frames = torch.tensor(q_frames, dtype=torch.long)
        q_rope = keys_rope.at(frames.flatten(), h, w).to(device)
        shift_ids = shift = None
        if shifts:
            shift_ids = torch.tensor([i for i, _ in shifts], device=device)
            deltas = torch.tensor([d for _, d in shifts], dtype=torch.long)
            shift = torch.view_as_real(keys_rope.shift(deltas).to(device)[:, None, None, :])
        return cls(
            table,
            torch.tensor(write, device=device),
            read_ids,
            lengths,
            groups,
            mask,
            torch.view_as_real(q_rope.view(len(ctx.rows), -1, 1, q_rope.shape[-1])),
            shift_ids,
            shift,
        )


def _rows(rows: list[int], device: torch.device) -> slice | torch.Tensor:
    """Row numbers as a slice when they are adjacent (a view, no copy), else an index."""
    if rows == list(range(rows[0], rows[-1] + 1)):
        return slice(rows[0], rows[-1] + 1)
    return torch.tensor(rows, device=device)


def key_rope(rope: torch.nn.Module) -> WanKeyRope:
    """The model's `WanKeyRope`, built once per RoPE module."""
    found = getattr(rope, "_streamrt_key_rope", None)
    if found is None:
        found = WanKeyRope(rope)
        rope._streamrt_key_rope = found
    return found


class FrameKeyRotation:
    """`KeyRotation` of a generation sequence: keys rotated at their block's frame."""

    def __init__(self, rope: WanKeyRope, grid: tuple[int, int], tokens_per_frame: int) -> None:
        self.rope, self.grid, self.tpf = rope, grid, tokens_per_frame

    def move(self, keys: torch.Tensor, src: int, dst: int | None) -> torch.Tensor:
        keys, src = keys.float(), src // self.tpf
        if dst is None:
            frame = torch.tensor([src])
            return rotate(keys, self.rope.at(frame, *self.grid).to(keys.device).conj())
        turn = self.rope.shift(torch.tensor([dst // self.tpf - src]))[0].to(keys.device)
        return rotate(keys, turn)


def _bind_rotation(seq: Sequence, rope: WanKeyRope, grid: tuple[int, int], tpf: int) -> None:
    """Mark `seq`'s keys as stored rotated (first forward); refuse a change of frame grid."""
    bound = seq.key_rotation
    if bound is None:
        seq.key_rotation = FrameKeyRotation(rope, grid, tpf)
    elif not isinstance(bound, FrameKeyRotation) or bound.grid != grid or bound.rope is not rope:
        raise RuntimeError(
            f"sequence {seq.seq_id!r} holds keys of another model or frame size {bound.grid}: "
            f"open a new stream for {grid}"
        )


@dataclass
class StreamingState:
    """Shared by all processors of one transformer; the sampler sets `current` per forward."""

    current: ForwardContext | None = None
    text_cache: OrderedDict = field(default_factory=OrderedDict)
    max_prompts: int = 32
    """Prompts whose cross-attention K/V stay cached (one per live stream is typical; a
    forward needs all of its rows' prompts)."""
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
        batch = ctx.batch
        query, key, value = _get_qkv_projections(attn, hidden_states, None)
        query = attn.norm_q(query).unflatten(2, (attn.heads, -1))
        key = attn.norm_k(key).unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        # Every row writes before any row reads: rows that share a sequence (stream batch)
        # all see the K/V this forward computed for the frames in flight.
        table = batch.table
        block = table.shape[3:]
        query = rotate(query, batch.rope)
        key = rotate(key, batch.rope)
        exchange = _exchange_op if torch.compiler.is_compiling() else _exchange
        k, v = exchange(table, self.layer, batch.write_ids, key, value, batch.read_ids)
        k, v = k.to(query.dtype), v.to(query.dtype)  # [rows * kept, T, H, D]
        if batch.shift_ids is not None:  # the gather is a fresh tensor: turned in place
            k[batch.shift_ids] = rotate(k[batch.shift_ids], batch.shift)
        rows = batch.read_ids.shape[0]
        k = k.view(rows, -1, *block[1:])
        v = v.view(rows, -1, *block[1:])
        if torch.compiler.is_compiling():  # one masked call (per-length calls specialise)
            out = attend(query, k, v, batch.mask)
        elif batch.groups is None:
            out = attend(query, k, v)
        else:  # one call per kept length, over exactly the kept keys (no padding computed)
            out = query.new_empty(query.shape)
            for rows_of, kept in batch.groups:
                out[rows_of] = attend(query[rows_of], k[rows_of, :kept], v[rows_of, :kept])
        if ctx.scores is not None:  # whole rows: `ForwardContext.finish_scores` cuts them
            ctx.scores[self.layer] = torch.einsum("bqhd,bkhd->bk", query.float(), k.float())
        out = out.flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))


def _exchange(
    table: torch.Tensor,
    layer: int,
    write_ids: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    read_ids: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Write the new K/V of `layer` to pages `write_ids`, then read pages `read_ids`: per
    layer one index_copy_ and one index_select per K and V on `[pages, T, H, D]` views of
    the pool (3x faster than advanced indexing of the 6-D pool on CPU). Returns K, V
    `[read_ids.numel(), T, H, D]` in the pool's dtype."""
    block = table.shape[3:]
    keys, values = _pages(table[:, 0, layer]), _pages(table[:, 1, layer])
    keys.index_copy_(0, write_ids, _pages(key.reshape(-1, *block).to(table.dtype)))
    values.index_copy_(0, write_ids, _pages(value.reshape(-1, *block).to(table.dtype)))
    reads = read_ids.view(-1)
    return (
        keys.index_select(0, reads).view(table.dtype),
        values.index_select(0, reads).view(table.dtype),
    )


# `_exchange` as one opaque op for torch.compile: the pool is written in place (a graph that
# wrote it with its own ops would copy the whole pool back after every forward).
_exchange_op = torch.library.custom_op(
    "streamrt::cache_exchange", _exchange, mutates_args=("table",)
)


@_exchange_op.register_fake
def _(table, layer, write_ids, key, value, read_ids):
    shape = (read_ids.numel(), *table.shape[3:])
    return table.new_empty(shape), table.new_empty(shape)


def _pages(t: torch.Tensor) -> torch.Tensor:
    """`t` as its pool moves it: float8 as bytes (CPU has no float8 index_copy_ kernels)."""
    return t.view(torch.uint8) if t.dtype in _FLOAT8 else t


_FLOAT8 = (torch.float8_e4m3fn, torch.float8_e5m2)


class CachedCrossAttention:
    """attn2: the prompt's K/V come from the forward's context (`prepare_prompts`: once per
    prompt, then reused); without them, projected here."""

    def __init__(self, layer: int, state: StreamingState) -> None:
        self.layer = layer
        self.state = state

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None
    ):
        if attn.add_k_proj is not None:
            raise NotImplementedError("image-conditioned Wan (I2V, added K/V) is not streamed yet")
        ctx = self.state.context()
        query = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))
        if ctx.text_kv is not None:
            k, v = ctx.text_kv[self.layer]
        else:
            k, v = _project_prompt(attn, encoder_hidden_states)
        out = attend(query, k, v).flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))


def _project_prompt(attn, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-attention K, V `[B, text_len, heads, head_dim]` of projected prompt tokens."""
    k = attn.norm_k(attn.to_k(text)).unflatten(2, (attn.heads, -1))
    return k, attn.to_v(text).unflatten(2, (attn.heads, -1))


def attach_streaming(transformer: torch.nn.Module) -> StreamingState:
    """Swap every block's attention processors for streaming ones; return their shared state.

    Attaching twice returns the existing state, so engines sharing one model share it too
    (and its lock serialises their forwards).
    """
    existing = getattr(transformer, "_streamrt_state", None)
    if existing is not None:
        return existing
    transformer._streamrt_state = StreamingState()
    renumber_streaming(transformer)
    return transformer._streamrt_state


def renumber_streaming(transformer: torch.nn.Module) -> None:
    """Attach the streaming processors again after `transformer.blocks` changed (a layer
    pipeline's rank gained or lost blocks): block i reads and writes cache layer i. Cached
    prompt K/V are dropped (they are kept per layer number)."""
    state = transformer._streamrt_state
    processors = {}
    for i in range(len(transformer.blocks)):
        processors[f"blocks.{i}.attn1.processor"] = StreamingSelfAttention(i, state)
        processors[f"blocks.{i}.attn2.processor"] = CachedCrossAttention(i, state)
    transformer.set_attn_processor(processors)
    state.text_cache.clear()


def detach_streaming(transformer: torch.nn.Module) -> None:
    """Restore diffusers' default processors (plain full-sequence attention)."""
    from diffusers.models.transformers.transformer_wan import WanAttnProcessor

    transformer.set_attn_processor(WanAttnProcessor())
    transformer.__dict__.pop("_streamrt_state", None)
