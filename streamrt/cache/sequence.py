"""A sequence (a generation stream, a QA session, an agent request) and its block table."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

from streamrt.cache.block import DEVICE, DISK, HOST, KVBlock
from streamrt.errors import UnknownNameError

if TYPE_CHECKING:
    from streamrt.cache.manager import CacheManager
    from streamrt.cache.policies.base import CachePolicy
    from streamrt.cache.spec import Consumer


@dataclass(frozen=True)
class AttentionPlan:
    """Which device blocks a new query attends to, and at which RoPE positions.

    The only thing a model adapter needs from a policy: the adapter attends as if block
    `indices[i]`'s tokens sat at positions `starts[i] .. starts[i] + lengths[i] - 1` and
    the new tokens at `query_start` (keys stored before RoPE are rotated there; keys stored
    rotated at their own position are turned only by what changed, see `KeyRotation`).
    """

    indices: tuple[int, ...]
    """Logical block indices, in attention (time) order."""
    starts: tuple[int, ...]
    """RoPE position of each block's first token."""
    lengths: tuple[int, ...]
    """Valid tokens in each block."""
    query_start: int
    """RoPE position of the next token written to the sequence."""

    def upto(self, index: int) -> AttentionPlan:
        """The plan cut after logical block `index` (causal view for a block being finished)."""
        keep = [k for k, i in enumerate(self.indices) if i <= index]
        last = keep[-1] if keep else -1
        return AttentionPlan(
            tuple(self.indices[k] for k in keep),
            tuple(self.starts[k] for k in keep),
            tuple(self.lengths[k] for k in keep),
            self.starts[last] + self.lengths[last] if keep else 0,
        )

    @property
    def num_tokens(self) -> int:
        return sum(self.lengths)

    def token_positions(self) -> torch.Tensor:
        """Per-token positions of the kept keys, `[num_tokens]` int64."""
        if not self.indices:
            return torch.zeros(0, dtype=torch.long)
        return torch.cat(
            [torch.arange(s, s + n, dtype=torch.long) for s, n in zip(self.starts, self.lengths)]
        )


class KeyRotation(Protocol):
    """How a sequence's stored keys are rotated, for policies that mix or compare blocks.

    A writer that stores keys already rotated (at the position each block was written at)
    sets `Sequence.key_rotation`; policies read blocks through `Sequence.kv_at`, which
    turns keys to where they are needed. None (the default): keys are stored before RoPE.
    """

    def move(self, keys: torch.Tensor, src: int, dst: int | None) -> torch.Tensor:
        """Keys `[..., tokens, heads, dim]` of a block written at position `src`, turned as
        if written at `dst` (None: before RoPE). Returns a new float32 tensor."""


class Sequence:
    """Block table of one stream. Entries are keyed by logical index, in time order.

    Only live blocks are in the table (dropped ones leave it), so an endless stream keeps
    a bounded table. Create through `CacheManager.open_sequence`.
    """

    def __init__(
        self, manager: CacheManager, seq_id: str, consumer: Consumer, policy: CachePolicy
    ) -> None:
        self.manager = manager
        self.seq_id = seq_id
        self.consumer = consumer
        self.policy = policy
        self.table: dict[int, KVBlock] = {}
        self.next_index = 0
        self.next_position = 0
        self.num_dropped = 0
        self.counts = {DEVICE: 0, HOST: 0, DISK: 0}
        # Device-resident indices, kept apart so the hot path never scans a long table
        # (a QA session keeps hours of frames on host and disk).
        self._device: set[int] = set()
        self.last_access = 0
        self.closed = False
        self.key_rotation: KeyRotation | None = None
        """Set by a writer that stores keys rotated at their own position (see `kv_at`)."""

    @property
    def spec(self):
        return self.consumer.spec

    def blocks(self, tier: str | None = None) -> list[KVBlock]:
        """Live blocks in time order, optionally only those in `tier`."""
        return [b for b in self.table.values() if tier is None or b.tier == tier]

    def items(self, tier: str | None = None) -> list[tuple[int, KVBlock]]:
        """`(logical index, block)` pairs in time order, optionally only those in `tier`."""
        if tier == DEVICE:
            return [(i, self.table[i]) for i in sorted(self._device)]
        return [(i, b) for i, b in self.table.items() if tier is None or b.tier == tier]

    def indices(self, tier: str | None = None) -> list[int]:
        """Logical indices in time order, optionally only those in `tier`."""
        if tier == DEVICE:
            return sorted(self._device)
        return [i for i, b in self.table.items() if tier is None or b.tier == tier]

    def _put(self, index: int, block: KVBlock) -> None:
        """Set table entry `index` (the manager's only way in; keeps counts exact)."""
        old = self.table.get(index)
        if old is not None:
            self._forget(index, old)
        self.table[index] = block
        self.counts[block.tier] += 1
        if block.tier == DEVICE:
            self._device.add(index)

    def _pop(self, index: int) -> KVBlock:
        block = self.table.pop(index)
        self._forget(index, block)
        return block

    def _forget(self, index: int, block: KVBlock) -> None:
        self.counts[block.tier] -= 1
        if block.tier == DEVICE:
            self._device.discard(index)

    @contextmanager
    def without(self, indices: list[int]) -> Iterator[Sequence]:
        """The sequence as if blocks `indices` had left it, for a plan taken before they are
        evicted (`streamrt.gen.fold`); they are back in place afterwards."""
        hidden = {i: self._pop(i) for i in indices}
        try:
            yield self
        finally:
            for i, block in hidden.items():
                self._put(i, block)
            self.table = dict(sorted(self.table.items()))  # back in time order

    def num_resident(self, tier: str = DEVICE) -> int:
        """Blocks of this sequence in `tier` (kept as a counter by the manager)."""
        return self.counts[tier]

    def append(self, num_tokens: int | None = None, ring: bool = True) -> int:
        """Allocate the next block on the device (the policy evicts first if full, unless
        `ring` is False: then a fresh page, past the policy's capacity until `evict`)."""
        return self.manager.append(self, num_tokens, ring)

    def free(self, index: int) -> None:
        """Give block `index` back to the manager."""
        self.manager.free(self, index)

    def kv(self, index: int, writable: bool = True) -> torch.Tensor:
        """`[2, L, T, H, D]` view of a block resident on device or host (see `CacheManager.kv`)."""
        if index not in self.table:
            raise UnknownNameError(
                f"block {index} is not in sequence {self.seq_id!r} (freed, evicted or never "
                f"appended); its blocks: {sorted(self.table)[:8]}{' ...' if len(self.table) > 8 else ''}"
            )
        return self.manager.kv(self.table[index], writable)

    def kv_at(self, index: int, at: int | None) -> torch.Tensor:
        """A float32 copy of block `index` `[2, L, T, H, D]` whose keys are as if the block
        had been written where block `at` was (None: before RoPE). Policies that fold or
        copy a block into another, or compare blocks, read through this: with keys stored
        before RoPE it is just the block."""
        kv = self.kv(index, writable=False).float()
        if self.key_rotation is None:
            return kv.clone()
        src = self.table[index].position
        dst = None if at is None else self.table[at].position
        return torch.stack([self.key_rotation.move(kv[0], src, dst), kv[1]])

    def write(self, index: int, kv: torch.Tensor) -> None:
        """Copy a whole block `[2, L, T, H, D]` into block `index` (shape and dtype checked)."""
        self.spec.check_tensor(kv, f"write to block {index} of {self.seq_id!r}")
        self.kv(index).copy_(kv)

    def write_layer(self, indices: list[int], layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write one layer's K/V `[n * T, H, D]` into device blocks `indices`."""
        self.manager.write_layer(self, indices, layer, k, v)

    def plan(self) -> AttentionPlan:
        """The policy's choice of kept blocks and positions for the next query."""
        return self.policy.plan(self)

    def gather(
        self, layer: int, plan: AttentionPlan | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of `layer` over the plan's blocks, each `[tokens, H, D]` (one gather, no shifting)."""
        return self.manager.gather(self, layer, plan or self.plan())

    def __repr__(self) -> str:
        return (
            f"Sequence({self.seq_id!r}, consumer={self.consumer.name!r}, blocks={len(self.table)})"
        )
