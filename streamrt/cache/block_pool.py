"""One tier's memory: a pre-allocated arena of equal pages plus their block metadata."""

from __future__ import annotations

import torch

from streamrt.cache.block import FreeBlockQueue, KVBlock
from streamrt.cache.errors import CacheError
from streamrt.cache.spec import KVSpec


class BlockPool:
    """Pages of `page_bytes` bytes in one tensor, one `KVBlock` per page.

    Every consumer's block fits one page, whatever its spec, so memory freed by one
    consumer serves any other. Freed blocks that carry a hash stay findable
    (`cached`) until the free queue hands them out again: lazy eviction.

        arena  [num_blocks, page_bytes] uint8
        view   arena[i, :spec.block_bytes] as spec.dtype -> [2, L, T, H, D]
    """

    def __init__(
        self, tier: str, num_blocks: int, page_bytes: int, device: torch.device, pin: bool = False
    ) -> None:
        self.tier = tier
        self.page_bytes = page_bytes
        self.device = device
        self.arena = torch.empty((num_blocks, page_bytes), dtype=torch.uint8, device=device)
        if pin:
            self.arena = self.arena.pin_memory()
        self.blocks = [KVBlock(i, tier) for i in range(num_blocks)]
        self.free_queue = FreeBlockQueue(self.blocks)
        # (owner, hash) -> block, for freed-but-still-valid blocks and live ones alike.
        self.cached: dict[tuple[str, bytes], KVBlock] = {}
        self._views: dict[KVSpec, torch.Tensor] = {}

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free(self) -> int:
        return self.free_queue.num_free

    def take(self) -> KVBlock:
        """Pop the least recently freed block; evict its cached hash if it had one."""
        block = self.free_queue.popleft()
        self._drop_hash(block)
        block.reset()
        block.ref_cnt = 1
        return block

    def touch(self, block: KVBlock) -> None:
        """Add a reference; a free (cached) block leaves the free queue."""
        if block.ref_cnt == 0:
            self.free_queue.remove(block)
        block.ref_cnt += 1

    def release(self, block: KVBlock) -> bool:
        """Drop one reference; return True if the block became free."""
        if block.ref_cnt <= 0:
            raise CacheError(
                f"double free: {self.tier} block {block.block_id} has ref count {block.ref_cnt}; "
                "each allocation must be freed once"
            )
        block.ref_cnt -= 1
        if block.ref_cnt == 0:
            if block.block_hash is None:
                block.reset()
            self.free_queue.append(block)
            return True
        return False

    def set_hash(self, block: KVBlock, block_hash: bytes) -> None:
        self._drop_hash(block)
        block.block_hash = block_hash
        assert block.owner is not None
        self.cached.setdefault((block.owner, block_hash), block)

    def lookup(self, owner: str, block_hash: bytes) -> KVBlock | None:
        return self.cached.get((owner, block_hash))

    def _drop_hash(self, block: KVBlock) -> None:
        if block.block_hash is None:
            return
        key = (block.owner or "", block.block_hash)
        if self.cached.get(key) is block:
            del self.cached[key]
        block.block_hash = None

    def typed(self, spec: KVSpec) -> torch.Tensor:
        """The whole arena seen as `[num_blocks, 2, L, T, H, D]` of `spec` (a strided view)."""
        view = self._views.get(spec)
        if view is None:
            rows = self.arena[:, : spec.block_bytes].view(spec.dtype)
            view = rows.view(self.num_blocks, *spec.block_shape)
            self._views[spec] = view
        return view

    def view(self, block: KVBlock, spec: KVSpec) -> torch.Tensor:
        """K/V of one block, `[2, L, T, H, D]`, aliasing the arena (writes land in the pool)."""
        return self.typed(spec)[block.block_id]
