"""The policy interface: which blocks stay on the device, and at which positions they attend."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, ClassVar

from streamrt.cache.block import DEVICE
from streamrt.cache.sequence import AttentionPlan

if TYPE_CHECKING:
    from streamrt.cache.sequence import Sequence


class CachePolicy(ABC):
    """Decides, per sequence, what to keep and how kept blocks are positioned.

    The manager does all bookkeeping; a policy only answers two questions:
    `select_victims` (which device blocks should leave when room is needed) and
    `plan` (which device blocks a query attends to, at which RoPE positions).
    """

    name: ClassVar[str]

    capacity: int | None = None
    """Device blocks the sequence may hold before its own blocks are evicted (None: no limit)."""

    @abstractmethod
    def select_victims(self, seq: Sequence, n: int) -> list[int]:
        """Return up to `n` logical indices of device blocks to evict, best victim first."""

    def plan(self, seq: Sequence) -> AttentionPlan:
        """Default: every device block at its original (absolute) position."""
        items = seq.items(DEVICE)
        blocks = [b for _, b in items]
        return AttentionPlan(
            indices=tuple(i for i, _ in items),
            starts=tuple(b.position for b in blocks),
            lengths=tuple(b.num_tokens for b in blocks),
            query_start=seq.next_position,
        )

    def before_evict(self, seq: Sequence, index: int) -> None:  # noqa: B027 - optional hook
        """Called while device block `index` is still readable, just before it leaves
        (EMA sinks fold its K/V into the sink here)."""

    def on_evict(self, seq: Sequence, index: int) -> None:  # noqa: B027 - optional hook
        """Called after a block left the device (dropped or offloaded)."""

    def after_write(self, seq: Sequence, indices: list[int]) -> None:  # noqa: B027 - optional hook
        """Called by the engine once per chunk, after the final (clean, t = 0) K/V of device
        blocks `indices` are written and before the next append (adaptive sinks compare
        the new frames with the sink here). Never called for noisy intermediate writes."""

    needs_scores: bool = False
    """True if the engine should collect query-key importance for `observe_scores`."""

    def observe_scores(  # noqa: B027 - optional hook
        self, seq: Sequence, plan: AttentionPlan, scores: dict, row: int = 0
    ) -> None:
        """Receive per-layer `[rows, plan.num_tokens]` importance of one forward (row `row`)."""


def contiguous_plan(seq: Sequence, indices: list[int], start: int = 0) -> AttentionPlan:
    """Lay `indices` at consecutive positions from `start`; the query follows them.

    This is how pre-RoPE storage keeps positions bounded however long a stream runs:
    a kept set is always re-positioned as if it were one contiguous sequence.
    """
    starts, lengths, pos = [], [], start
    for i in indices:
        n = seq.table[i].num_tokens
        starts.append(pos)
        lengths.append(n)
        pos += n
    return AttentionPlan(tuple(indices), tuple(starts), tuple(lengths), pos)
