"""Attention sink + sliding window (StreamingLLM, StreamDiffusionV2, LongLive)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from streamrt.cache.block import DEVICE
from streamrt.cache.policies.base import CachePolicy, contiguous_plan

if TYPE_CHECKING:
    from streamrt.cache.sequence import AttentionPlan, Sequence


class SinkWindowPolicy(CachePolicy):
    """The first `sink_blocks` blocks stay forever; after them a window of the most recent.

        blocks kept:   [ sink 0..S-1 | recent window of W ]      capacity = S + W
        positions:     contiguous from 0 ("relative")  or  original ("absolute")

    With "relative" positions (keys stored before RoPE) the largest position ever used
    is `(S + W) * tokens_per_block`, so a stream can run forever inside the model's RoPE
    table; "absolute" keeps the positions the blocks were written at.
    """

    name = "sink_window"

    def __init__(
        self,
        sink_blocks: int = 1,
        window_blocks: int = 8,
        positions: Literal["relative", "absolute"] = "relative",
    ) -> None:
        if sink_blocks < 0 or window_blocks < 1:
            raise ValueError(
                f"sink_window needs sink_blocks >= 0 and window_blocks >= 1, got {sink_blocks}, {window_blocks}"
            )
        if positions not in ("relative", "absolute"):
            raise ValueError(f"positions must be 'relative' or 'absolute', got {positions!r}")
        self.sink_blocks = sink_blocks
        self.window_blocks = window_blocks
        self.positions = positions
        self.capacity = sink_blocks + window_blocks

    def select_victims(self, seq: Sequence, n: int) -> list[int]:
        # Sink blocks are the first S ever written; they are never victims.
        return [i for i in seq.indices(DEVICE) if i >= self.sink_blocks][:n]

    def plan(self, seq: Sequence) -> AttentionPlan:
        if self.positions == "absolute":
            return super().plan(seq)
        return contiguous_plan(seq, seq.indices(DEVICE))
