"""EMA-Sink (Reward Forcing): sink slots that absorb every frame leaving the window."""

from __future__ import annotations

from typing import TYPE_CHECKING

from streamrt.cache.block import DEVICE
from streamrt.cache.policies.base import CachePolicy, contiguous_plan
from streamrt.errors import InputError

if TYPE_CHECKING:
    from streamrt.cache.sequence import AttentionPlan, Sequence


class EmaSinkPolicy(CachePolicy):
    """`sink_blocks` sink slots, then a window of the `window_blocks` most recent frames.

        kept:       [ S_0 .. S_{S-1} | window of W ] [query]     capacity = S + W
        positions:  0 ..................... (S+W)*T   (S+W)*T    contiguous from 0

    The sink slots are the first S frames' own blocks (their pages, their logical
    indices 0..S-1), so they start as the first frames. Each time a window frame `e` is
    evicted, just before its page is reused (`before_evict`), it is folded into one slot:

        slot = e mod S:   S_K <- alpha * S_K + (1 - alpha) * K_e,   same for V

    Reward Forcing's sink is one chunk and a whole evicted chunk is folded into it token by
    token, frame f of the chunk into sink frame f. With chunks of S frames starting at
    frame 0, `e mod S` is exactly that frame-in-chunk; with other chunk sizes it is a
    round-robin over the slots. Keys stored rotated at their own frame are turned to the
    slot's frame before the fold (`Sequence.kv_at`), so the slot holds what folding keys
    stored before RoPE would give. The fold is computed in float32 and stored in the cache
    dtype; the sink's pages are updated in place, nothing else moves.

    Args:
        sink_blocks: Sink slots (>= 1). Paper: 3 (one chunk).
        window_blocks: Recent frames after the sink (>= 1, and at least one chunk).
        alpha: EMA weight of the old sink, in [0, 1] (paper: 0.99 .. 0.999; 1 never
            changes the sink, 0 makes each slot the last frame evicted into it).
    """

    name = "ema_sink"
    window_arg = "window_blocks"
    fold_safe = False  # an eviction folds into the sink the next chunk reads

    def __init__(self, sink_blocks: int = 3, window_blocks: int = 9, alpha: float = 0.99) -> None:
        if sink_blocks < 1:
            raise InputError(f"ema_sink needs sink_blocks >= 1, got {sink_blocks}")
        if window_blocks < 1:
            raise InputError(f"ema_sink needs window_blocks >= 1, got {window_blocks}")
        if not 0.0 <= alpha <= 1.0:
            raise InputError(f"ema_sink needs alpha in [0, 1], got {alpha}")
        self.sink_blocks = sink_blocks
        self.window_blocks = window_blocks
        self.alpha = alpha
        self.capacity = sink_blocks + window_blocks

    def sink_slot(self, index: int) -> int:
        """Logical index of the sink slot a frame evicted from the window is folded into."""
        return index % self.sink_blocks

    def select_victims(self, seq: Sequence, n: int) -> list[int]:
        return [i for i in seq.indices(DEVICE) if i >= self.sink_blocks][:n]

    def before_evict(self, seq: Sequence, index: int) -> None:
        slot = self.sink_slot(index)
        sink = seq.table.get(slot)
        if index < self.sink_blocks or sink is None or sink.tier != DEVICE:
            return
        evicted = seq.kv_at(index, slot)
        view = seq.kv(slot)
        view.copy_(self.alpha * view.float() + (1.0 - self.alpha) * evicted)

    def plan(self, seq: Sequence) -> AttentionPlan:
        return contiguous_plan(seq, seq.indices(DEVICE))
