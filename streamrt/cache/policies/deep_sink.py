"""Deep Sink (Deep Forcing): a sink of about half the cache, re-aligned to sit right before the tail."""

from __future__ import annotations

from typing import TYPE_CHECKING

from streamrt.cache.block import DEVICE
from streamrt.cache.policies.base import CachePolicy, contiguous_plan
from streamrt.errors import InputError

if TYPE_CHECKING:
    from streamrt.cache.sequence import AttentionPlan, Sequence


class DeepSinkPolicy(CachePolicy):
    """The first `sink_blocks` frames stay forever, the last `window_blocks` form the tail.

    Deep Forcing rotates the temporal RoPE phase of the sink by `delta` frames so that it
    follows the current timeline instead of sitting at frame 0 while the tail runs ahead.
    The re-alignment is a position assignment (the attention turns the sink's keys by the
    change, whether they are stored before RoPE or rotated at their own frame):

        after n frames (n > S + W), T tokens per frame, S sink, W tail:

        logical frame   0 ........ S-1    S ....... n-W-1    n-W ........ n-1     n
                        [   sink    ]     [  evicted  ]      [     tail     ]   [query]
        written at      frames 0 .. S-1                      frames n-W .. n-1   n
        attends at      frames 0 .. S-1                      frames S .. S+W-1   S+W
                        `-- sink ends right where the tail starts: no gap, no overlap

    Rule: the kept blocks `[sink | tail]` are laid contiguously from position 0 in time
    order, the query right after them. Relative to the frames they were written at, the
    tail and the query move by the same offset `-(n - W - S)` frames, which RoPE cannot
    see (attention depends only on position differences), and the sink moves by
    `delta = s_tail - s_sink - 1 = n - W - S` frames relative to them, where `s_tail = n - W`
    is the first tail frame and `s_sink = S - 1` the last sink frame: its last frame lands
    on the frame just before the tail's first. While nothing has been evicted
    (n <= S + W), delta is 0 and every frame attends where it was written.

    Positions are bounded for an endless stream: no key is ever placed at or beyond
    `(S + W) * T`, and the query always starts there.

    Args:
        sink_blocks: Sink frames (>= 1). Paper: 10 (40-60% of the cache works; 18 of 21
            made videos repeat).
        window_blocks: Tail frames after the sink (>= 1, and at least the frames of one
            chunk, which are written into the tail). Paper cache: 21 = 10 + 11.
    """

    name = "deep_sink"
    window_arg = "window_blocks"

    def __init__(self, sink_blocks: int = 10, window_blocks: int = 11) -> None:
        if sink_blocks < 1:
            raise InputError(f"deep_sink needs sink_blocks >= 1, got {sink_blocks}")
        if window_blocks < 1:
            raise InputError(f"deep_sink needs window_blocks >= 1, got {window_blocks}")
        self.sink_blocks = sink_blocks
        self.window_blocks = window_blocks
        self.capacity = sink_blocks + window_blocks

    def select_victims(self, seq: Sequence, n: int) -> list[int]:
        # Oldest tail frame first; the sink (the first S frames ever written) never leaves.
        return [i for i in seq.indices(DEVICE) if i >= self.sink_blocks][:n]

    def plan(self, seq: Sequence) -> AttentionPlan:
        kept = seq.indices(DEVICE)
        sink = [i for i in kept if i < self.sink_blocks]
        tail = [i for i in kept if i >= self.sink_blocks]
        return contiguous_plan(seq, sink + tail)
