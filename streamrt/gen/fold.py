"""The clean refresh of chunk k folded into the first forward of chunk k+1 (`GenConfig.fold_refresh`).

The chunk-wise sampler rewrites a finished chunk's K/V at t=0 (the clean refresh) before
the next chunk starts. Folded, chunk k's frames leave as soon as its last step is done, and
its refresh runs as the first row of chunk k+1's first forward, block-causal (as stream
batch runs its chunks): at every layer the refresh row writes chunk k's clean K/V before
chunk k+1's row reads them. One forward fewer per chunk, and no refresh of a last chunk.

What each row sees is what it sees unfolded:

    refresh row   planned before chunk k+1's blocks exist (the blocks chunk k+1 will evict
                  are still kept, as they are when the refresh runs alone);
    chunk k+1     appended without evicting (fresh pages: the refresh row still reads the
                  victims' pages) and planned with the victims hidden;
    after         the policy's `after_write` of chunk k, then the victims leave, as the
                  ring would have evicted them.

So the folded stream equals the unfolded one (within float32 summation order,
tests/unit/test_fold_refresh.py). Policies whose hooks act on a write or an eviction
(`CachePolicy.fold_safe` False: attention scores, EMA sink folding, the adaptive sink) and
a device tier without room for the chunk's pages keep the separate refresh.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from streamrt.cache.block import DEVICE

if TYPE_CHECKING:
    from streamrt.gen.stream import ForwardRequest, GenStream


@dataclass
class Fold:
    refresh: ForwardRequest
    """The deferred refresh of the previous chunk, planned before this chunk's blocks."""
    refreshed: list[int]
    """The previous chunk's blocks."""
    blocks: list[int]
    """This chunk's blocks (appended without eviction)."""
    victims: list[list[int]]
    """Per sequence, the blocks the ring would have evicted for this chunk."""


def begin_fold(stream: GenStream):
    """A schedule step at a chunk's start: `Fold` when the previous chunk's refresh is
    deferred and can be folded, else None (a deferred refresh that cannot fold runs alone
    here, as it would have run unfolded)."""
    if stream.deferred is None:
        return None
    blocks, x0 = stream.deferred
    frames = stream.config.chunk_frames
    victims = []
    for seq in stream.seqs:
        cap = seq.policy.capacity
        over = 0 if cap is None else max(0, seq.counts[DEVICE] + frames - cap)
        victims.append(seq.policy.select_victims(seq, seq.counts[DEVICE])[:over])
    manager = stream.engine.cache
    pages = frames * len(stream.seqs)
    if any(set(v) & set(blocks) for v in victims) or not manager.can_take(stream.seqs[0], pages):
        yield from stream.flush_deferred()  # a one-chunk window, or no room: alone, then the ring
        return None
    stream.deferred = None
    refresh = stream.refresh_request(blocks, x0)  # planned before this chunk's blocks exist
    new = [[seq.append(ring=False) for _ in range(frames)] for seq in stream.seqs]
    return Fold(refresh, blocks, new[0], victims)


def folded_request(stream: GenStream, fold: Fold, x, t, noise) -> ForwardRequest:
    """One forward: the refresh rows, then this chunk's first-step rows, branch by branch
    (guided streams keep their conditional rows before their unconditional ones)."""
    from streamrt.gen.stream import ForwardRequest

    with ExitStack() as hidden:
        for seq, victims in zip(stream.seqs, fold.victims):
            hidden.enter_context(seq.without(victims))
        step = stream.request([fold.blocks], x, t, noise=noise)
    a, b = fold.refresh, step
    n = len(stream.seqs)

    def mix(ta: torch.Tensor, tb: torch.Tensor) -> torch.Tensor:
        return torch.cat([p for pair in zip(ta.chunk(n), tb.chunk(n)) for p in pair])

    rows = [r for j in range(n) for r in (a.rows[j], b.rows[j])]
    keys = [k for j in range(n) for k in (a.text_keys[j], b.text_keys[j])]
    eps = torch.cat([torch.zeros_like(a.x[:1]), noise]) if noise is not None else None
    return ForwardRequest(
        stream, rows, mix(a.x, b.x), mix(a.t, b.t), mix(a.embeds, b.embeds), keys, None, eps
    )


def end_fold(stream: GenStream, fold: Fold) -> None:
    """After the folded forward: the refreshed chunk's write hooks, then the ring's evictions."""
    stream.refreshed(fold.refreshed)
    for seq, victims in zip(stream.seqs, fold.victims):
        if victims:
            stream.engine.cache.evict(seq, victims)
