"""Changing a consumer's block layout while its sequences live, and growing the pages.

A layer pipeline that moves transformer blocks between ranks (`streamrt.parallel.rebalance`)
changes how many layers each rank's blocks hold. Its sequences keep their tables, logical
indices, positions and policy state; only the bytes of every block change:

    relayout(consumer, spec, convert)
        1. read every block of the consumer's sequences: convert(seq, index, kv) -> new kv
        2. forget the consumer's cached free blocks (their bytes have the old layout)
        3. grow the pages if a block of `spec` no longer fits one (`_grow_pages`)
        4. the consumer takes `spec`; the new bytes are written into its blocks

`_grow_pages` copies every block in use into new pools of larger pages (budgets permitting)
and puts the new blocks into the tables in place of the old ones, so a consumer with larger
blocks can join a manager whose blocks are in use.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from streamrt.cache.block import DISK, HOST, KVBlock
from streamrt.cache.block_pool import BlockPool
from streamrt.cache.errors import BudgetError, CacheError
from streamrt.cache.sequence import Sequence
from streamrt.cache.spec import KVSpec

PAGE_ALIGN = 64

Convert = Callable[[Sequence, int, torch.Tensor], torch.Tensor]


class Relayout:
    """Mixin of `CacheManager`: `relayout` and `_grow_pages`."""

    def relayout(self, consumer: str, spec: KVSpec, convert: Convert) -> int:
        """Give `consumer` the block layout `spec`, converting every block of its open
        sequences with `convert(seq, index, kv) -> kv'` (`kv`: a read-only view of the old
        `[2, L, T, H, D]`; `kv'`: a tensor of `spec`'s block shape). A block shared by several
        sequences is converted once. Returns the number of blocks converted.

        Raises:
            CacheError: a block of the consumer is on disk (fetch it first).
            BudgetError: larger blocks need larger pages and the budget cannot hold the
                blocks in use in them (nothing is changed then).
        """
        with self._lock:
            c = self._consumer(consumer)
            seen: dict[int, tuple[Sequence, int]] = {}
            for seq in self.sequences_of(c.name):
                for index, block in seq.items():
                    if block.tier == DISK:
                        raise CacheError(
                            f"relayout of {c.name!r}: block {index} of {seq.seq_id!r} is on "
                            "disk; fetch it first"
                        )
                    seen.setdefault(id(block), (seq, index))
            new = {}
            for key, (seq, index) in seen.items():
                kv = convert(seq, index, self.kv(seq.table[index], writable=False))
                spec.check_tensor(kv, f"relayout of block {index} of {seq.seq_id!r}")
                new[key] = kv
            if spec.block_bytes > self.page_bytes and self.pools:
                self._grow_pages(-(-spec.block_bytes // PAGE_ALIGN) * PAGE_ALIGN)
            self._drop_cached(c.name)  # free cached blocks keep the old layout's bytes
            c.spec = spec
            for key, (seq, index) in seen.items():
                block = seq.table[index]
                self.kv(block).copy_(new[key])  # writable: a stale disk copy is dropped
                block.summary = None  # per-layer summaries of the old layers
            self.counters["relayouts"] += 1
            return len(seen)

    def _grow_pages(self, page_bytes: int) -> None:
        """New pools of `page_bytes`-byte pages holding every block in use (cached free
        blocks are forgotten); the sequences' tables get the new blocks in place."""
        in_use = {
            tier: [b for b in pool.blocks if b.ref_cnt > 0] for tier, pool in self.pools.items()
        }
        for tier, blocks in in_use.items():
            capacity = self.budgets[tier] // page_bytes
            if len(blocks) > capacity:
                raise BudgetError(
                    f"blocks of {page_bytes} bytes need larger pages: the {tier} budget of "
                    f"{self.budgets[tier]} bytes holds {capacity} of them but {len(blocks)} "
                    f"blocks are in use: raise cache.{tier}_bytes (or set cache.page_bytes "
                    "for the largest block before the first allocation)"
                )
        moved: dict[int, KVBlock] = {}
        for tier, old_pool in list(self.pools.items()):
            if tier == HOST:
                for block in in_use[tier]:
                    self.copier.sync_host(block.block_id)
            pinned = old_pool.arena.device.type == "cpu" and old_pool.arena.is_pinned()
            pool = BlockPool(
                tier, self.budgets[tier] // page_bytes, page_bytes, old_pool.device, pinned
            )
            for old in in_use[tier]:
                block = pool.take()
                block.copy_meta_from(old)
                block.block_hash = None
                block.ref_cnt, block.disk_key = old.ref_cnt, old.disk_key
                if old.block_hash is not None:
                    pool.set_hash(block, old.block_hash)
                pool.arena[block.block_id, : old_pool.page_bytes].copy_(
                    old_pool.arena[old.block_id]
                )
                moved[id(old)] = block
            self.pools[tier] = pool
        for seq in self.sequences.values():
            for index, block in list(seq.table.items()):
                if id(block) in moved:
                    seq.table[index] = moved[id(block)]  # same tier: counts stay right
        self.page_bytes = page_bytes
        self.counters["repaged"] += 1
