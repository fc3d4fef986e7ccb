"""Block metadata and the O(1) free queue.

A `KVBlock` is bookkeeping only (vLLM v1 style): the K/V tensors of a block live in
its tier's pre-allocated pool, at row `block_id`. The free queue is a doubly linked
list threaded through the blocks themselves, so taking a block out of the middle
(a prefix-cache hit on a freed block) costs O(1) and no allocation.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import torch

DEVICE, HOST, DISK = "device", "host", "disk"
TIERS = (DEVICE, HOST, DISK)


class KVBlock:
    """Metadata of one KV block: `tokens_per_block` tokens of K and V for all layers.

    Attributes:
        block_id: Row of the tier's pool holding the tensors (-1 for disk blocks).
        tier: "device", "host" or "disk".
        ref_cnt: Sequences referencing the block; 0 means it sits in the free queue.
        owner: Name of the consumer the block belongs to (None while free).
        seq_id: Sequence that allocated it (None while free).
        index: Logical index of the block in its sequence (time order).
        block_hash: Content hash for prefix sharing (None if not hashed).
        position: Absolute token position of the block's first token in its stream.
        num_tokens: Tokens written into the block (<= tokens_per_block).
        summary: Per-layer summary key `[layers, kv_heads * head_dim]` (mean key), for retrieval.
        importance: Score a policy may set (participative compression, priorities).
        last_access: Manager tick of the last use (LRU order among resident blocks).
        pin_deadline: `time.monotonic()` until which pressure may not move it (None: unpinned).
        disk_key: File key while the block lives on disk.
    """

    __slots__ = (
        "block_hash",
        "block_id",
        "disk_key",
        "importance",
        "index",
        "last_access",
        "next_free",
        "num_tokens",
        "owner",
        "pin_deadline",
        "position",
        "prev_free",
        "ref_cnt",
        "seq_id",
        "summary",
        "tier",
    )

    def __init__(self, block_id: int, tier: str) -> None:
        self.block_id = block_id
        self.tier = tier
        self.ref_cnt = 0
        self.prev_free: KVBlock | None = None
        self.next_free: KVBlock | None = None
        self.block_hash: bytes | None = None
        self.reset()

    def reset(self) -> None:
        """Forget everything but identity, ref count, hash and free-list links."""
        self.owner: str | None = None
        self.seq_id: str | None = None
        self.index = -1
        self.position = 0
        self.num_tokens = 0
        self.summary: torch.Tensor | None = None
        self.importance = 0.0
        self.last_access = 0
        self.pin_deadline: float | None = None
        self.disk_key: str | None = None

    def copy_meta_from(self, other: KVBlock) -> None:
        """Take over the logical identity of `other` (used when a block changes tier)."""
        self.owner, self.seq_id, self.index = other.owner, other.seq_id, other.index
        self.position, self.num_tokens = other.position, other.num_tokens
        self.summary, self.importance = other.summary, other.importance
        self.last_access, self.pin_deadline = other.last_access, other.pin_deadline
        self.block_hash = other.block_hash

    def __repr__(self) -> str:
        return (
            f"KVBlock(id={self.block_id}, tier={self.tier}, ref={self.ref_cnt}, "
            f"owner={self.owner}, seq={self.seq_id}, index={self.index}, pos={self.position})"
        )


class FreeBlockQueue:
    """Doubly linked LRU queue of free blocks: pop from the head, append at the tail.

    The head is the block freed longest ago, so cached (hashed) blocks freed recently
    survive longest: eviction is lazy and least-recently-used.
    """

    def __init__(self, blocks: list[KVBlock]) -> None:
        self.num_free = len(blocks)
        for prev, nxt in itertools.pairwise(blocks):
            prev.next_free, nxt.prev_free = nxt, prev
        # Sentinels keep every operation branch-free at the ends.
        self._head = KVBlock(-1, "sentinel")
        self._tail = KVBlock(-1, "sentinel")
        if blocks:
            self._head.next_free, blocks[0].prev_free = blocks[0], self._head
            self._tail.prev_free, blocks[-1].next_free = blocks[-1], self._tail
        else:
            self._head.next_free, self._tail.prev_free = self._tail, self._head

    def popleft(self) -> KVBlock:
        """Remove and return the head (least recently freed) block."""
        block = self._head.next_free
        if block is self._tail or block is None:
            raise IndexError("no free blocks")
        self.remove(block)
        return block

    def remove(self, block: KVBlock) -> None:
        """Unlink `block` from anywhere in the queue in O(1)."""
        prev, nxt = block.prev_free, block.next_free
        if prev is None or nxt is None:
            raise RuntimeError(f"{block!r} is not in the free queue")
        prev.next_free, nxt.prev_free = nxt, prev
        block.prev_free = block.next_free = None
        self.num_free -= 1

    def append(self, block: KVBlock) -> None:
        """Put `block` at the tail (most recently freed)."""
        last = self._tail.prev_free
        assert last is not None
        last.next_free, block.prev_free = block, last
        block.next_free, self._tail.prev_free = self._tail, block
        self.num_free += 1

    def __iter__(self) -> Iterator[KVBlock]:
        block = self._head.next_free
        while block is not None and block is not self._tail:
            yield block
            block = block.next_free

    def block_ids(self) -> list[int]:
        """Ids in queue order, head first (for tests and debugging)."""
        return [b.block_id for b in self]
