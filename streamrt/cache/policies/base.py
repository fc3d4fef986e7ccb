"""The policy interface: which blocks stay on the device, and at which positions they attend."""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Collection
from typing import TYPE_CHECKING, Any, ClassVar

from streamrt.cache.block import DEVICE
from streamrt.cache.sequence import AttentionPlan
from streamrt.errors import InputError

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

    fold_safe: bool = True
    """Whether a chunk's clean refresh may run inside the next chunk's first forward
    (`streamrt.gen.fold`): False when the policy acts on a write (`after_write`, attention
    scores) or on an eviction (`before_evict`) in a way the next chunk would see."""

    window_arg: ClassVar[str | None] = None
    """Constructor argument counting the newest blocks, which the policy never evicts while
    they are the newest. Every frame a sampler keeps in flight (one chunk; or every chunk of
    a rolling / stream-batch window) is written there, so it must hold them all. None: the
    policy itself never evicts (only memory pressure does)."""

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """The constructor's default arguments."""
        params = inspect.signature(cls.__init__).parameters.values()
        return {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}

    @classmethod
    def fit_args(
        cls, args: dict[str, Any], in_flight: int, given: Collection[str], why: str
    ) -> dict[str, Any]:
        """`args` with the window (`window_arg`) large enough for `in_flight` frames.

        Arguments named in `given` (set by the user) are never changed: too small, they
        raise `InputError` naming the smallest value that works. The others (the policy's
        or the model's defaults) grow to `in_flight`.

        Args:
            args: Constructor arguments (missing ones take the policy's defaults).
            in_flight: Frames the sampler writes before the oldest of them is finished.
            given: Names of the arguments the user set.
            why: What keeps the frames in flight, for the message
                (e.g. "the rolling sampler with 4 steps x 3 frames in flight").
        """
        key = cls.window_arg
        window = {**cls.defaults(), **args}.get(key) if key else None
        if not isinstance(window, int) or window >= in_flight:
            return dict(args)
        if key in given:
            raise InputError(
                f"{key}={window} is too small for {why}: use {key} >= {in_flight} "
                f"(cache policy {cls.name!r})"
            )
        return {**args, key: in_flight}

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

    This is how positions stay bounded however long a stream runs:
    a kept set is always re-positioned as if it were one contiguous sequence.
    """
    starts, lengths, pos = [], [], start
    for i in indices:
        n = seq.table[i].num_tokens
        starts.append(pos)
        lengths.append(n)
        pos += n
    return AttentionPlan(tuple(indices), tuple(starts), tuple(lengths), pos)
