"""Layer pipeline (StreamDiffusionV2, ALGORITHMS.md 1.10): contiguous ranges of transformer
blocks per rank, hidden states passed point-to-point, chunks of several streams (and the
rows of one stream-batch forward) in flight so that every rank is busy.

    rank r      owns blocks [a_r, b_r) of the model; its engine's cache manager holds the
                K/V of those blocks only (its KV spec has b_r - a_r layers).
    a forward   rank 0: patch embedding + its blocks -> isend hidden states to rank 1;
                rank r: irecv hidden from r - 1, its blocks, isend on; the last rank: its
                blocks + the output head -> velocity, isent to every other rank.
    samplers    every rank runs the same streams with the same seeds (replicated, cheap:
                noise, x0, re-noise), so their plans, block tables and evictions agree
                without messages beyond the velocity; only the caller decides which rank
                decodes (the CLI: the last).
    in flight   units are launched in one order every rank computes the same way: the
                streams form G = min(S, P) groups (one group in one process), each group's
                next forwards batched into one (as the runtime batches streams), in rounds
                over the groups; each forward is split into M units of whole chunks,
                oldest chunks first (M = ceil(2P / G): two units per rank per round leave
                slack for the velocity's round trip). A stream-batch row sees only older
                chunks, so a later unit reads at layer l what an earlier unit of the same
                forward wrote at layer l, on the same rank, already done. Rank 0 needs a
                group's velocities only when its next forward is due: with G = P groups no
                rank waits; one stream (G = 1) leaves a bubble of (P - 1) / (M + P - 1) of
                every forward, and its clean-refresh forward (one chunk, one unit) is one.

Exactness: every stream's latents equal the one-process run up to float summation order
(tests/unit/test_layer_pipeline.py, max |diff| <= 1e-5). `plan_ranges` places the block
ranges from measured per-block times (the embedding on the first rank, the head on the
last) when the pipeline starts.

Cache policies that need attention scores (participative) get every layer's: each rank
computes its layers' scores and the ranks all-gather them when the forward's velocity is
consumed (where every rank waits for that velocity anyway).

Live re-balancing (`rebalance_every`, `streamrt.parallel.rebalance`): between rounds the
ranks re-plan the ranges from their measured per-block times and move blocks, with their
weights and their K/V, point-to-point.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

from streamrt.errors import InputError
from streamrt.gen.attention import ForwardContext, detach_streaming
from streamrt.gen.compiled import compiled_blocks, mark_dynamic
from streamrt.gen.forward import _check_rope_range, model_timestep
from streamrt.gen.stream import ForwardRequest, GenStream
from streamrt.gen.v2v import NeedInput
from streamrt.parallel.launch import DEFAULT_TIMEOUT_S, check_same, wait_for

HIDDEN, VELOCITY = 1, 2
"""Message tags: hidden states to the next rank, velocities from the last rank."""


def plan_ranges(
    block_s: list[float],
    world: int,
    embed_s: float = 0.0,
    head_s: float = 0.0,
    speed: list[float] | None = None,
    fixed: list[float] | None = None,
) -> list[range]:
    """Contiguous block ranges for `world` ranks minimising the slowest rank's time, given
    each block's measured seconds, the embedding's (first rank) and the head's (last).

    Ranks of unequal speed (`streamrt.parallel.rebalance`): a block costs `block_s[b] *
    speed[r]` on rank r, and rank r spends `fixed[r]` per forward whatever it holds."""
    n = len(block_s)
    if not 1 <= world <= n:
        raise InputError(
            f"the layer pipeline needs 1..{n} ranks for a model of {n} blocks, got {world}"
        )
    speed = speed or [1.0] * world
    fixed = fixed or [0.0] * world
    prefix = [0.0]
    for s in block_s:
        prefix.append(prefix[-1] + s)

    def cost(r: int, a: int, b: int) -> float:
        ends = (embed_s if r == 0 else 0) + (head_s if r == world - 1 else 0)
        return (prefix[b] - prefix[a]) * speed[r] + fixed[r] + ends

    # best[r][b]: the least slowest-rank time placing blocks [0, b) on ranks 0..r
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(world)]
    cut = [[0] * (n + 1) for _ in range(world)]
    for b in range(1, n + 1):
        best[0][b] = cost(0, 0, b)
    for r in range(1, world):
        for b in range(r + 1, n + 1):
            for a in range(r, b):
                t = max(best[r - 1][a], cost(r, a, b))
                if t < best[r][b]:
                    best[r][b], cut[r][b] = t, a
    bounds, b = [n], n
    for r in range(world - 1, 0, -1):
        b = cut[r][b]
        bounds.append(b)
    bounds.append(0)
    bounds.reverse()
    return [range(bounds[r], bounds[r + 1]) for r in range(world)]


def even_ranges(blocks: int, world: int) -> list[range]:
    return plan_ranges([1.0] * blocks, world)


def measure_parts(engine, prompt: str, config=None, forwards: int = 3) -> dict[str, Any]:
    """Seconds per forward of each block, of the embedding and of the head, measured on a
    short chunk-wise stream of this (whole) model with forward hooks."""
    tr = engine.transformer
    spent: dict[str, float] = {}
    starts: dict[str, float] = {}
    handles = []

    def timed(name: str, module: torch.nn.Module) -> None:
        def pre(*_):
            starts[name] = time.perf_counter()

        def post(*_):
            spent[name] = spent.get(name, 0.0) + time.perf_counter() - starts[name]

        handles.extend([module.register_forward_pre_hook(pre), module.register_forward_hook(post)])

    for i, block in enumerate(tr.blocks):
        timed(f"block{i}", block)
    timed("embed", tr.patch_embedding)
    timed("head", tr.proj_out)
    stream = engine.open_stream(prompt, config, sampler="chunkwise")
    try:
        stream.next_latents()  # warm-up
        spent.clear()
        done = stream.stats["forwards"]
        while stream.stats["forwards"] - done < forwards:
            stream.next_latents()
        n = stream.stats["forwards"] - done
    finally:
        stream.close()
        for h in handles:
            h.remove()
    return {
        "block_s": [spent[f"block{i}"] / n for i in range(len(tr.blocks))],
        "embed_s": spent["embed"] / n,
        "head_s": spent["head"] / n,
    }


def stage_engine(engine, blocks: range):
    """A new engine on `engine`'s model holding only `blocks` (its cache: their K/V only).

    The transformer's `blocks` ModuleList is cut to the range (a documented module swap: the
    diffusers model has no API to run part of its blocks) and the streaming processors are
    attached again with local layer numbers.
    """
    from streamrt.gen.engine import GenEngine

    tr = engine.transformer
    if not (0 <= blocks.start < blocks.stop <= len(tr.blocks)):
        raise InputError(f"block range {blocks} is outside the model's {len(tr.blocks)} blocks")
    detach_streaming(tr)
    tr.blocks = torch.nn.ModuleList(list(tr.blocks)[blocks.start : blocks.stop])
    return GenEngine(
        tr, engine.text_encoder, engine.codec, engine.requested, None, None, engine.given
    )


class WanStage:
    """Runs one rank's share of a diffusers `WanTransformer3DModel` forward: the patch
    embedding (first rank), its blocks, the output head (last rank). The parts are those of
    `WanTransformer3DModel.forward`, in its order, so the ranks together compute the
    one-process forward."""

    def __init__(self, engine, first: bool, last: bool) -> None:
        self.engine = engine
        self.tr = engine.transformer
        self.first, self.last = first, last
        cfg = self.tr.config
        self.dim = cfg.num_attention_heads * cfg.attention_head_dim
        self.compiled = engine.config.compile != "off"
        self.run_blocks = compiled_blocks(engine.config.compile)
        """This rank's blocks, compiled with `gen.compile`."""

    def hidden_shape(self, x: torch.Tensor) -> tuple[int, int, int]:
        _, _, f, h, w = x.shape
        _, p_h, p_w = self.tr.config.patch_size
        return (x.shape[0], f * (h // p_h) * (w // p_w), self.dim)

    def __call__(self, unit: ForwardRequest, hidden: torch.Tensor | None) -> torch.Tensor:
        tr, state = self.tr, self.engine.state
        x = unit.x
        batch, _, frames, height, width = x.shape
        p_t, p_h, p_w = tr.config.patch_size
        grid = (height // p_h, width // p_w)
        tpf = grid[0] * grid[1]
        _check_rope_range(tr, unit.rows, tpf)
        ctx = ForwardContext(unit.rows, grid, unit.text_keys, unit.scores)
        ctx.prepare(tr.rope, tpf, uniform=self.compiled)
        ctx.prepare_prompts(tr, state, unit.embeds)
        timestep = model_timestep(unit.t.to(x.device).float(), tpf)
        seq_len = None
        if timestep.ndim == 2:
            seq_len, timestep = timestep.shape[1], timestep.flatten()
        temb, proj, text, _ = tr.condition_embedder(
            timestep, unit.embeds, None, timestep_seq_len=seq_len
        )
        proj = proj.unflatten(2 if seq_len is not None else 1, (6, -1))
        if self.first:
            hidden = tr.patch_embedding(x).flatten(2).transpose(1, 2).contiguous()
        if self.compiled:  # rows; tokens; per-token modulation: as many as the tokens
            per_token = (0, 1) if proj.dim() == 4 else (0,)
            mark_dynamic(ctx, (hidden, (0, 1)), (text, (0,)), (proj, per_token))
        state.current = ctx
        try:
            hidden = self.run_blocks(tr.blocks, hidden, text, proj)
        finally:
            state.current = None
        ctx.finish_scores()
        if not self.last:
            return hidden
        if temb.ndim == 3:
            shift, scale = (tr.scale_shift_table.unsqueeze(0) + temb.unsqueeze(2)).chunk(2, dim=2)
            shift, scale = shift.squeeze(2), scale.squeeze(2)
        else:
            shift, scale = (tr.scale_shift_table + temb.unsqueeze(1)).chunk(2, dim=1)
        hidden = (tr.norm_out(hidden.float()) * (1 + scale) + shift).type_as(hidden)
        hidden = tr.proj_out(hidden)
        hidden = hidden.reshape(batch, frames, grid[0], grid[1], p_t, p_h, p_w, -1)
        return hidden.permute(0, 7, 1, 4, 2, 5, 3, 6).flatten(6, 7).flatten(4, 5).flatten(2, 3)


def split_request(request: ForwardRequest, parts: int) -> list[ForwardRequest]:
    """`request`'s rows in up to `parts` units of whole chunks, oldest chunks first (a
    guided stream's conditional and unconditional rows of a chunk stay together)."""
    n = len(request.rows)
    branches = len(request.stream.seqs)
    chunks = n // branches
    parts = max(1, min(parts, chunks))
    if parts == 1:
        return [request]
    out = []
    for p in range(parts):
        mine = range(p * chunks // parts, (p + 1) * chunks // parts)
        idx = [b * chunks + c for b in range(branches) for c in mine]
        pick = torch.tensor(idx)
        out.append(
            ForwardRequest(
                request.stream,
                [request.rows[i] for i in idx],
                request.x[pick],
                request.t[pick],
                request.embeds[pick.to(request.embeds.device)],
                [request.text_keys[i] for i in idx],
                None,
                None,
            )
        )
    return out


def _concat(requests: list[ForwardRequest]) -> ForwardRequest:
    """Several streams' (sub-)requests as one batch (rows in order)."""
    if len(requests) == 1:
        return requests[0]
    first = requests[0]
    return ForwardRequest(
        first.stream,
        [row for r in requests for row in r.rows],
        torch.cat([r.x for r in requests]),
        torch.cat([r.t for r in requests]),
        torch.cat([r.embeds for r in requests]),
        [k for r in requests for k in r.text_keys],
        {} if any(r.scores is not None for r in requests) else None,
    )


def _merge(request: ForwardRequest, units: list[ForwardRequest], outs: list[torch.Tensor]):
    """The units' outputs back in `request`'s row order."""
    if len(units) == 1:
        return outs[0]
    rows = {id(row): i for i, row in enumerate(request.rows)}
    order = [rows[id(row)] for u in units for row in u.rows]
    v = torch.cat(outs)
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(len(order))
    return v[inverse]


@dataclasses.dataclass
class _Flow:
    """One stream's schedule as the pipeline drives it."""

    stream: GenStream
    chunks: int
    done: int = 0
    steps: Any = None
    waiting: ForwardRequest | None = None
    """The launched forward whose velocity the schedule waits for."""
    pending: list = dataclasses.field(default_factory=list)
    """Prompt switches `(before chunk, prompt)` still to come."""
    starved: bool = False
    """A video-to-video stream asked for input it does not have yet (`NeedInput`): it
    stops here for this `run` and starts its chunk again in the next."""


class LayerPipeline:
    """This rank's block range of the layer pipeline over a `torch.distributed` group.

    Build it on every rank with an engine made by `stage_engine` for `ranges[rank]`; open
    the same streams on every rank (`open_stream`), then iterate `run(...)` on every rank.
    """

    def __init__(
        self,
        engine,
        ranges: list[range],
        group: dist.ProcessGroup | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
        microbatches: int | None = None,
        rebalance_every: int | None = None,
        min_gain: float = 0.1,
    ) -> None:
        """`rebalance_every`: every this many rounds of `run`, the ranks re-plan the block
        ranges from their measured times and move blocks (with their KV) when that cuts
        the slowest rank's time by `min_gain` (`streamrt.parallel.rebalance`)."""
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        if len(ranges) != self.world:
            raise InputError(f"{len(ranges)} block ranges for {self.world} ranks")
        self.ranges = ranges
        self.blocks = ranges[self.rank]
        if len(engine.transformer.blocks) != len(self.blocks):
            raise InputError(
                f"rank {self.rank} owns blocks {self.blocks} but its engine holds "
                f"{len(engine.transformer.blocks)}: build it with stage_engine(engine, range)"
            )
        self.engine = engine
        self.stage = WanStage(engine, self.rank == 0, self.rank == self.world - 1)
        self.timeout = timeout
        self.microbatches = microbatches
        self.sent: list = []
        self.bytes_sent = 0
        self.units = 0
        self.log: list[tuple[int, float, float]] = []
        """(unit, start, end) wall-clock times (`time.time()`) of this rank's compute."""
        check_same(
            self.rank, self.world, [(r.start, r.stop) for r in ranges], group, "block ranges"
        )
        self.rebalance_every, self.min_gain = rebalance_every, min_gain
        self.rounds = 0
        self.moves: list[dict[str, Any]] = []
        """Every re-balance: round, old and new ranges, planned seconds per unit, bytes."""
        self.timer = None
        if rebalance_every:
            from streamrt.parallel.rebalance import BlockTimer

            self.timer = BlockTimer(self)

    @property
    def last(self) -> bool:
        return self.rank == self.world - 1

    def open_stream(self, prompt: str, config=None, **overrides) -> GenStream:
        stream = self.engine.open_stream(prompt, config, **overrides)
        seed = stream.config.seed
        check_same(self.rank, self.world, (prompt, seed), self.group, "prompt and seed")
        return stream

    def _peer(self, r: int) -> int:
        return r if self.group is None else dist.get_global_rank(self.group, r)

    def _send(self, tensor: torch.Tensor, to: int, tag: int) -> None:
        tensor = tensor.contiguous()
        self.sent.append((dist.isend(tensor, self._peer(to), group=self.group, tag=tag), to))
        self.bytes_sent += tensor.numel() * tensor.element_size()
        while len(self.sent) > 4 * self.world:  # keep a few in flight; wait for the oldest
            work, peer = self.sent.pop(0)
            wait_for(work, self.timeout, f"rank {self.rank}: sending to", self.rank, peer)

    def _recv(self, shape, frm: int, tag: int, what: str) -> torch.Tensor:
        dtype = next(self.engine.transformer.parameters()).dtype
        buf = torch.empty(shape, dtype=dtype, device=self.engine.device)
        work = dist.irecv(buf, self._peer(frm), group=self.group, tag=tag)
        wait_for(work, self.timeout, f"rank {self.rank}: {what}", self.rank, frm)
        return buf

    def _launch(self, requests: list[ForwardRequest], parts: int) -> list[torch.Tensor | None]:
        """Run this rank's share of `requests` (streams batched into one forward per unit,
        each request split into `parts` units of whole chunks); the last rank returns each
        request's output and sends it to the other ranks."""
        subs = [split_request(r, parts) for r in requests]
        outs: list[list[torch.Tensor]] = [[] for _ in requests]
        for u in range(max(len(s) for s in subs)):
            members = [(j, s[u]) for j, s in enumerate(subs) if u < len(s)]
            unit = _concat([m for _, m in members])
            hidden = None
            if self.rank > 0:
                hidden = self._recv(
                    self.stage.hidden_shape(unit.x), self.rank - 1, HIDDEN, "hidden states from"
                )
            start = time.time()
            with torch.no_grad(), self.engine.lock:
                out = self.stage(unit, hidden)
            self.log.append((self.units, start, time.time()))
            self.units += 1
            self._share_scores(unit, [m for _, m in members])
            if not self.last:
                self._send(out, self.rank + 1, HIDDEN)
                continue
            sizes = [len(m.rows) for _, m in members]
            for (j, _), part in zip(members, out.split(sizes)):
                outs[j].append(part)
        if not self.last:
            return [None] * len(requests)
        vs = [_merge(r, s, o) for r, s, o in zip(requests, subs, outs)]
        for v in vs:
            for r in range(self.world - 1):
                self._send(v, r, VELOCITY)
        return vs

    def _share_scores(self, unit: ForwardRequest, members: list[ForwardRequest]) -> None:
        """The unit's attention scores (this rank's layers) to each member request, under
        the model's layer numbers; `_gather_scores` adds the other ranks' layers."""
        if unit.scores is None:
            return
        local = dict(unit.scores)
        unit.scores.clear()
        start = 0
        for m in members:
            n = len(m.rows)
            if m.scores is not None:
                for layer, per_row in local.items():
                    m.scores[self.blocks.start + layer] = list(per_row[start : start + n])
            start += n

    def _gather_scores(self, request: ForwardRequest) -> None:
        """Every rank's layers of `request`'s scores, on every rank (a policy such as
        participative sums them over all layers). Called by every rank at the same point:
        when the request's velocity is consumed."""
        every: list[Any] = [None] * self.world
        dist.all_gather_object(every, dict(request.scores), group=self.group)
        request.scores.clear()
        for layer, per_row in sorted((k, v) for part in every for k, v in part.items()):
            request.scores[layer] = per_row

    def _velocity(self, flow: _Flow, v: torch.Tensor | None) -> torch.Tensor:
        if v is not None:
            return v
        return self._recv(flow.waiting.x.shape, self.world - 1, VELOCITY, "velocity from")

    def run(
        self,
        streams: list[GenStream],
        chunks: int | list[int],
        switches: dict[tuple[int, int], str] | None = None,
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """Drive `streams` for `chunks` finished chunks each (same on every rank); yields
        `(stream index, clean latents)` of every finished chunk, in finishing order, on
        every rank. `switches[(i, c)]`: stream i switches to that prompt (with KV re-cache)
        before its chunk c, on every rank at the same point."""
        counts = chunks if isinstance(chunks, list) else [chunks] * len(streams)
        flows = [_Flow(s, n) for s, n in zip(streams, counts)]
        for (i, c), prompt in sorted((switches or {}).items()):
            flows[i].pending.append((c, prompt))
        # Streams in flight: G groups (the ranks' count, or fewer streams), each batched
        # into one forward, split into units of whole chunks.
        groups = 1 if self.world == 1 else min(len(flows), self.world)
        # Two units per rank per round leave slack for the velocity's round trip (one
        # unit per group left the ranks 70% busy on 2 ranks, two units 84%).
        parts = self.microbatches or (1 if self.world == 1 else -(-2 * self.world // groups))
        outstanding: dict[int, torch.Tensor | None] = {}
        try:
            while any(f.done < f.chunks and not f.starved for f in flows):
                for g in range(groups):
                    launched = []
                    for i in range(g, len(flows), groups):
                        flow = flows[i]
                        if flow.done >= flow.chunks or flow.starved:
                            continue
                        request, finished = self._advance(flow, outstanding.pop(i, None))
                        if finished is not None:
                            yield i, finished
                        if request is not None:
                            flow.waiting = request
                            launched.append(i)
                    if launched:
                        vs = self._launch([flows[i].waiting for i in launched], parts)
                        outstanding.update(zip(launched, vs))
                self.rounds += 1
                if self.rebalance_every and self.rounds % self.rebalance_every == 0:
                    self._auto_rebalance()
        finally:
            self.flush()

    def _advance(self, flow: _Flow, v_mine: torch.Tensor | None):
        """Feed `flow`'s launched forward its velocity and take its next request: (request
        or None, finished chunk or None)."""
        finished = None
        while True:
            if flow.steps is None:
                if flow.pending and flow.pending[0][0] <= flow.done:
                    _, prompt = flow.pending.pop(0)
                    flow.steps = _prompt_then_chunk(flow.stream, prompt)
                else:
                    flow.steps = flow.stream.chunk_steps()
                try:
                    return next(flow.steps), finished
                except StopIteration:
                    flow.steps = None
                    continue
                except NeedInput:  # asked before changing any state: retried next run
                    flow.steps, flow.starved = None, True
                    return None, finished
            raw = self._velocity(flow, v_mine)
            if flow.waiting.scores is not None:
                self._gather_scores(flow.waiting)
            v = flow.stream.complete(flow.waiting, raw)
            flow.waiting = None
            try:
                return flow.steps.send(v), finished
            except NeedInput:  # a window sampler's next input (its window moved on already)
                flow.steps, flow.starved = None, True
                return None, finished
            except StopIteration as stop:
                flow.steps = None
                if stop.value is not None:
                    finished = stop.value
                    flow.done += 1
                    if flow.done >= flow.chunks:
                        return None, finished
                v_mine = None

    def rebalance(self, ranges: list[range], planned: tuple[float, float] = (0.0, 0.0)):
        """Move to block ranges `ranges`, with the moved blocks' weights and KV. Call it on
        every rank at the same point: between `run`s, or where `run` calls it (between
        rounds, every launched forward computed)."""
        from streamrt.parallel.rebalance import migrate

        ranges = [range(r.start, r.stop) for r in ranges]
        if (
            len(ranges) != self.world
            or [b for r in ranges for b in r] != list(range(sum(len(r) for r in self.ranges)))
            or any(len(r) == 0 for r in ranges)
        ):
            raise InputError(
                f"block ranges {ranges} must cover the model's blocks in order, one or more "
                f"per rank, for {self.world} ranks"
            )
        check_same(
            self.rank, self.world, [(r.start, r.stop) for r in ranges], self.group, "block ranges"
        )
        if ranges == self.ranges:
            return
        old = self.ranges
        sent = migrate(self, ranges)
        self.moves.append(
            {"round": self.rounds, "from": old, "to": ranges, "planned_s": planned, "bytes": sent}
        )
        if self.timer is not None:
            self.timer.reset()

    def _auto_rebalance(self) -> None:
        from streamrt.parallel.rebalance import plan_live

        every: list[Any] = [None] * self.world
        dist.all_gather_object(every, self.timer.measured(), group=self.group)
        ranges, before, after = plan_live(every, self.ranges, self.min_gain)
        if ranges is None:
            self.timer.reset()
            return
        self.rebalance(ranges, (before, after))

    def flush(self) -> None:
        while self.sent:
            work, peer = self.sent.pop(0)
            wait_for(work, self.timeout, f"rank {self.rank}: sending to", self.rank, peer)


def _prompt_then_chunk(stream: GenStream, prompt: str):
    """The re-cache forwards of a prompt switch, then the next chunk."""
    yield from stream.prompt_steps(prompt, recache=True)
    return (yield from stream.chunk_steps())
