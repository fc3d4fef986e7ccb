"""Attention sink + sliding window (StreamingLLM, StreamDiffusionV2, LongLive)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import torch

from streamrt.cache.block import DEVICE
from streamrt.cache.policies.base import CachePolicy, contiguous_plan
from streamrt.errors import InputError

if TYPE_CHECKING:
    from streamrt.cache.sequence import AttentionPlan, Sequence


class SinkWindowPolicy(CachePolicy):
    """The first `sink_blocks` blocks stay forever; after them a window of the most recent.

        blocks kept:   [ sink 0..S-1 | recent window of W ]      capacity = S + W
        positions:     contiguous from 0 ("relative")  or  original ("absolute")

    With "relative" positions the largest position ever used
    is `(S + W) * tokens_per_block`, so a stream can run forever inside the model's RoPE
    table; "absolute" keeps the positions the blocks were written at.

    Adaptive sink (StreamDiffusionV2), on when `adaptive_tau` is set: after each chunk's
    clean K/V are written (`after_write`), every new frame is compared with each sink
    slot; if the lowest similarity is below `tau`, that one slot takes the new frame's
    K/V. Similarity, as in StreamDiffusionV2's code: per layer, the cosine between the
    token-mean K of the two blocks (heads x dims as one vector), likewise for V; the K and
    V cosines are averaged, then averaged over layers (one decision for all layers, since
    a block holds every layer; that code also averages the V cosine over all sink slots,
    here each slot uses its own).

    The slot is refreshed by copying one block of K/V into the sink's page (`seq.kv`):
    the sink keeps its logical index, page and position, so nothing else in the cache
    moves and the ring of window slots is undisturbed. The new frame also stays in the
    window (as in StreamDiffusionV2, where it is appended as usual).

    Args:
        sink_blocks: Blocks pinned as sink (>= 0; >= 1 with `adaptive_tau`).
        window_blocks: Most recent blocks kept after the sink (>= 1).
        positions: "relative" (contiguous from 0) or "absolute" (as written).
        adaptive_tau: Similarity threshold in [-1, 1] (paper: 0.2); None turns it off.
    """

    name = "sink_window"
    window_arg = "window_blocks"

    def __init__(
        self,
        sink_blocks: int = 1,
        window_blocks: int = 8,
        positions: Literal["relative", "absolute"] = "relative",
        adaptive_tau: float | None = None,
    ) -> None:
        if sink_blocks < 0 or window_blocks < 1:
            raise InputError(
                f"sink_window needs sink_blocks >= 0 and window_blocks >= 1, got {sink_blocks}, {window_blocks}"
            )
        if positions not in ("relative", "absolute"):
            raise InputError(f"positions must be 'relative' or 'absolute', got {positions!r}")
        if adaptive_tau is not None:
            if not -1.0 <= adaptive_tau <= 1.0:
                raise InputError(
                    f"adaptive_tau is a cosine similarity threshold in [-1, 1], got {adaptive_tau}"
                )
            if sink_blocks < 1:
                raise InputError("adaptive_tau needs a sink to refresh: sink_blocks >= 1, got 0")
        self.sink_blocks = sink_blocks
        self.window_blocks = window_blocks
        self.positions = positions
        self.adaptive_tau = adaptive_tau
        self.capacity = sink_blocks + window_blocks
        self.fold_safe = adaptive_tau is None  # the adaptive sink acts on each write
        self.sink_refreshes = 0
        """Sink slots replaced by a new frame so far (adaptive sink)."""

    def select_victims(self, seq: Sequence, n: int) -> list[int]:
        # Sink blocks are the first S ever written; they are never victims.
        return [i for i in seq.indices(DEVICE) if i >= self.sink_blocks][:n]

    def plan(self, seq: Sequence) -> AttentionPlan:
        if self.positions == "absolute":
            return super().plan(seq)
        return contiguous_plan(seq, seq.indices(DEVICE))

    def after_write(self, seq: Sequence, indices: list[int]) -> None:
        if self.adaptive_tau is None:
            return
        sinks = [i for i in seq.indices(DEVICE) if i < self.sink_blocks]
        if len(sinks) < self.sink_blocks:
            return  # the sink itself is still being written
        full = seq.spec.tokens_per_block
        for index in indices:
            block = seq.table[index]
            if index < self.sink_blocks or block.num_tokens != full:
                continue
            new = seq.kv_at(index, None)
            sims = [mean_kv_similarity(seq.kv_at(s, None), new) for s in sinks]
            worst = min(range(len(sinks)), key=sims.__getitem__)
            if sims[worst] < self.adaptive_tau:
                seq.kv(sinks[worst]).copy_(seq.kv_at(index, sinks[worst]))
                self.sink_refreshes += 1


def mean_kv_similarity(a: torch.Tensor, b: torch.Tensor) -> float:
    """StreamDiffusionV2's sink test between two blocks `[2, L, T, H, D]`: per layer, cosine
    of the token-mean K (and of V) with heads x dims flattened; mean over K/V and layers."""
    ma = a.float().mean(dim=2).flatten(2)  # [2, L, H * D]
    mb = b.float().mean(dim=2).flatten(2)
    return torch.nn.functional.cosine_similarity(ma, mb, dim=-1).mean().item()
