"""Live re-balancing of the layer pipeline: block ranges move between ranks while streams
run, with the moved blocks' weights and KV (ALGORITHMS.md 1.10, StreamDiffusionV2's
rebalancer).

    measure   `BlockTimer`: forward hooks time each of the rank's blocks per unit; the rest
              of a unit (conditioning, the embedding on the first rank, the head on the
              last) is the unit's time minus its blocks'.
    plan      `plan_live`: every rank's numbers (all-gathered, so every rank plans the same)
              give each rank a speed (its seconds per block) and a fixed cost; the ranges
              minimising the slowest rank (`plan_ranges`) are taken when they beat the
              current ones by `min_gain`.
    migrate   `migrate`, on every rank at the same round boundary (every launched forward
              computed on every rank; velocities still on their way are not touched):
              a block leaving rank a for rank b goes point-to-point with its weights and,
              for every open sequence, its layer of every live KV block; the ranks'
              cache managers change layout in place (`CacheManager.relayout`), so block
              tables, positions and policy state stay as they were, and the streaming
              processors are numbered again.

Exactness: a migrated pipeline computes what the one-process run does (the same blocks
over the same K/V), so streams stay equal to their solo runs within float32 summation
order (tests/unit/test_layer_pipeline.py).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import torch
import torch.distributed as dist

from streamrt.gen.attention import renumber_streaming
from streamrt.parallel.launch import wait_for

MIGRATE = 3
"""Message tag of migrated weights and KV."""


class BlockTimer:
    """Seconds spent in each of a rank's blocks, and in the rest of its units, since the
    last `reset` (forward hooks on the blocks; the unit times are the pipeline's log)."""

    def __init__(self, pipe) -> None:
        self.pipe = pipe
        self.handles: list[Any] = []
        self.spent: list[float] = []
        self.mark = 0
        self._t0 = 0.0
        self.reset()

    def reset(self) -> None:
        """Hook the rank's current blocks and start counting from now."""
        for h in self.handles:
            h.remove()
        blocks = list(self.pipe.engine.transformer.blocks)
        self.handles, self.spent = [], [0.0] * len(blocks)
        for i, block in enumerate(blocks):
            self.handles.append(block.register_forward_pre_hook(self._start))
            self.handles.append(block.register_forward_hook(self._stop(i)))
        self.mark = len(self.pipe.log)

    def _start(self, *_: Any) -> None:
        self._t0 = time.perf_counter()

    def _stop(self, i: int):
        def hook(*_: Any) -> None:
            self.spent[i] += time.perf_counter() - self._t0

        return hook

    def measured(self) -> dict[str, Any]:
        """Per unit since `reset`: each block's seconds and the rest of the unit's."""
        units = self.pipe.log[self.mark :]
        n = max(1, len(units))
        total = sum(end - start for _, start, end in units)
        return {
            "units": len(units),
            "block_s": [t / n for t in self.spent],
            "rest_s": max(0.0, total - sum(self.spent)) / n,
        }


def _slowest(work: list[float], ranges: list[range], speed: list[float], fixed: list[float]):
    return max(sum(work[b] for b in rg) * speed[r] + fixed[r] for r, rg in enumerate(ranges))


def plan_live(
    measured: list[dict[str, Any]], ranges: list[range], min_gain: float = 0.1
) -> tuple[list[range] | None, float, float]:
    """`(new ranges or None, slowest rank's seconds per unit now, after)` from every rank's
    `BlockTimer.measured()`: None when no plan beats the current ranges by `min_gain`."""
    from streamrt.parallel.layers import plan_ranges

    speed = [sum(m["block_s"]) / max(1, len(m["block_s"])) for m in measured]
    if min(m["units"] for m in measured) == 0 or min(speed) <= 0:
        return None, 0.0, 0.0
    work = [0.0] * sum(len(rg) for rg in ranges)
    for rg, m, s in zip(ranges, measured, speed):
        for b, t in zip(rg, m["block_s"]):
            work[b] = t / s  # each block's share of its rank's time per block (Wan's: ~1)
    fixed = [m["rest_s"] for m in measured]
    planned = plan_ranges(work, len(ranges), speed=speed, fixed=fixed)
    before, after = _slowest(work, ranges, speed, fixed), _slowest(work, planned, speed, fixed)
    if planned == ranges or after > before * (1 - min_gain):
        return None, before, before
    return planned, before, after


def _empty_block(tr) -> torch.nn.Module:
    """A block of `tr`'s architecture, dtypes and device, to receive a moved block's weights
    (diffusers' constructor, with the arguments `WanTransformer3DModel` passes it)."""
    c = tr.config
    first = tr.blocks[0]
    block = type(first)(
        c.num_attention_heads * c.attention_head_dim,
        c.ffn_dim,
        c.num_attention_heads,
        c.qk_norm,
        c.cross_attn_norm,
        c.eps,
        c.added_kv_proj_dim,
    )
    # each tensor as the rank's own blocks hold it (a bf16 model keeps some in float32)
    like = {k: torch.empty_like(v) for k, v in first.state_dict().items()}
    block.load_state_dict(like, assign=True)
    return block.eval()


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """A tensor's bytes as a flat uint8 view (gloo and NCCL move any dtype this way)."""
    return t.contiguous().reshape(-1).view(torch.uint8)


def migrate(pipe, ranges: list[range]) -> int:
    """Move `pipe`'s rank to `ranges` (called on every rank at the same round boundary);
    returns the bytes this rank sent."""
    rank, old = pipe.rank, pipe.ranges
    was = {b: r for r, rg in enumerate(old) for b in rg}
    will = {b: r for r, rg in enumerate(ranges) for b in rg}
    mine, new = pipe.blocks, ranges[rank]
    engine = pipe.engine
    tr = engine.transformer
    seqs = sorted(engine.sequences(), key=lambda s: s.seq_id)  # the same ids on every rank
    spec = engine.spec
    sends, recvs, sent = [], [], 0

    def post(op, tensor: torch.Tensor, peer: int, into: list) -> None:
        into.append((op(tensor, pipe._peer(peer), group=pipe.group, tag=MIGRATE), peer))

    # Velocities the last rank sent may still wait for their receiver's next round: the
    # moves go beside them (their own tag), without waiting for them.
    with torch.no_grad(), engine.lock:
        for b in [b for b in mine if will[b] != rank]:
            local = b - mine.start
            for t in tr.blocks[local].state_dict().values():
                payload = _bytes(t)
                post(dist.isend, payload, will[b], sends)
                sent += payload.numel()
            for seq in seqs:
                kv = torch.stack([seq.kv(i, writable=False)[:, local] for i in seq.indices()])
                payload = _bytes(kv)
                post(dist.isend, payload, will[b], sends)
                sent += payload.numel()
        arrived: dict[int, torch.nn.Module] = {}
        arrived_kv: dict[tuple[int, str], torch.Tensor] = {}
        for b in [b for b in new if was[b] != rank]:
            block = arrived[b] = _empty_block(tr)
            for t in block.state_dict().values():
                if not t.is_contiguous():  # `_bytes` would copy it: received bytes lost
                    raise RuntimeError(f"block parameter of shape {tuple(t.shape)} is strided")
                post(dist.irecv, _bytes(t), was[b], recvs)
            for seq in seqs:
                n = len(seq.indices())
                shape = (n, 2, seq.spec.tokens_per_block, spec.num_kv_heads, spec.head_dim)
                buf = torch.empty(shape, dtype=spec.dtype, device=engine.device)
                arrived_kv[(b, seq.seq_id)] = buf
                post(dist.irecv, _bytes(buf), was[b], recvs)
        for work, peer in recvs:
            wait_for(work, pipe.timeout, f"rank {rank}: receiving moved blocks from", rank, peer)
        rows = {seq.seq_id: {i: n for n, i in enumerate(seq.indices())} for seq in seqs}

        def convert(seq, index: int, kv: torch.Tensor) -> torch.Tensor:
            at = rows[seq.seq_id][index]
            layers = [
                kv[:, b - mine.start] if b in mine else arrived_kv[(b, seq.seq_id)][at] for b in new
            ]
            return torch.stack(layers, dim=1)

        engine.spec = dataclasses.replace(spec, num_layers=len(new))
        if engine.consumer is not None:
            consumer = engine.cache.consumers[engine.consumer]
            layout = dataclasses.replace(consumer.spec, num_layers=len(new))
            engine.cache.relayout(engine.consumer, layout, convert)
        tr.blocks = torch.nn.ModuleList(
            [tr.blocks[b - mine.start] if b in mine else arrived[b] for b in new]
        )
        renumber_streaming(tr)
        for work, peer in sends:
            wait_for(work, pipe.timeout, f"rank {rank}: sending moved blocks to", rank, peer)
    pipe.ranges, pipe.blocks = list(ranges), new
    return sent
