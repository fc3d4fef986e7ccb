"""Tier moves of the `CacheManager`: offload and fetch between device, host and disk.

Kept apart from the allocator so each file stays readable; `CacheManager` inherits these
methods and provides the bookkeeping they call (`_take`, `_release`, `_reclaim`, ...).

    device pool  --offload-->  host pool  --offload-->  disk store
                 <---fetch---              <---fetch---

A block fetched from disk keeps its file as a clean backing copy: offloading it again
writes nothing, until a writable view (`kv(..., writable=True)`, `write_layer`) dirties it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from streamrt.cache.block import DEVICE, DISK, HOST, KVBlock
from streamrt.cache.errors import CacheError, CorruptBlockError, OutOfBlocksError
from streamrt.cache.sequence import Sequence
from streamrt.cache.transfer import Transfer
from streamrt.errors import InputError

if TYPE_CHECKING:
    from streamrt.cache.disk_store import DiskStore


class TierMoves:
    """Mixin of `CacheManager` holding the moves between tiers and restart recovery."""

    disk: DiskStore | None

    def offload(self, seq: Sequence, indices: int | list[int], tier: str = HOST) -> list[Transfer]:
        """Move blocks down to `tier` ("host" or "disk"). Bit-exact; async device->host on CUDA."""
        return self._move_many(seq, indices, tier, down=True)

    def evict(self, seq: Sequence, indices: list[int]) -> None:
        """Let device blocks `indices` leave as the ring would evict them: the policy's
        hooks, then offloaded (if the consumer offloads) or dropped."""
        with self._lock:
            for index in indices:
                self._evict(seq, index, protect=())

    def can_take(self, seq: Sequence, pages: int) -> bool:
        """Whether `pages` free device pages are there for `seq` now (within its quota),
        without taking any from another block."""
        with self._lock:
            pool = self._pool(DEVICE)
            quota = seq.consumer.quotas.get(DEVICE)
            used = seq.consumer.used_blocks[DEVICE] + pages
            return pool.num_free >= pages and (quota is None or used * pool.page_bytes <= quota)

    def fetch(self, seq: Sequence, indices: int | list[int], tier: str = DEVICE) -> list[Transfer]:
        """Move blocks up to `tier` (default the device), so a plan can attend to them.

        Blocks fetched together protect each other from the room-making they trigger.
        Raises `CorruptBlockError` for a disk block that fails its checksum; that block is
        dropped from the sequence (never served) and the rest of the call is not done.
        """
        return self._move_many(seq, indices, tier, down=False)

    def _move_many(
        self, seq: Sequence, indices: int | list[int], tier: str, down: bool
    ) -> list[Transfer]:
        order = {DEVICE: 0, HOST: 1, DISK: 2}
        if tier not in order:
            raise InputError(f"unknown tier {tier!r}; tiers are device, host, disk")
        if tier == DISK and self.disk is None:
            raise CacheError("no disk tier: set cache.disk_dir to offload to disk")
        idx = [indices] if isinstance(indices, int) else list(indices)
        with self._lock:
            self._check_open(seq)
            missing = [i for i in idx if i not in seq.table]
            if missing:
                raise KeyError(f"sequence {seq.seq_id!r} has no live block(s) {missing}")
            # Updated in place as blocks move (rebuilding it from the table after each
            # move made a sequence's move quadratic in its length).
            protect = [seq.table[i] for i in idx]
            transfers = []
            for k, i in enumerate(idx):
                src = seq.table[i].tier
                if (order[src] < order[tier]) != down or src == tier:
                    continue  # already there (or above it, for a fetch)
                transfers.append(self._move(seq, i, tier, tuple(protect)))
                protect[k] = seq.table[i]
            return transfers

    def _move(self, seq: Sequence, index: int, tier: str, protect: tuple[KVBlock, ...]) -> Transfer:
        """Copy block `index` of `seq` into `tier`, swap it into the table, free the old page."""
        old = seq.table[index]
        consumer, spec = seq.consumer, seq.spec
        if old.tier == HOST:
            self.copier.sync_host(old.block_id)
        if tier == DISK:
            new, transfer = self._write_disk(seq, index, old)
        else:
            new = self._take(consumer, tier, (*protect, old))
            dst = self.pools[tier].view(new, spec)
            try:
                if old.tier == DISK:
                    transfer = self._read_disk(seq, index, old, dst)
                else:
                    src = self.pools[old.tier].view(old, spec)
                    transfer = self.copier.copy(dst, src, new.block_id if tier == HOST else None)
            except CacheError:
                self._release(consumer, new)
                raise
        new.copy_meta_from(old)
        new.owner = consumer.name
        # A disk file stays as the clean backing copy of a fetched block: it moves with the
        # block, so offloading it again writes nothing (until a writable view dirties it).
        new.disk_key = new.disk_key or old.disk_key
        seq._put(index, new)
        if old.tier == DISK:
            old.ref_cnt -= 1
        else:
            old.disk_key = None
            self._release(consumer, old)
        kind = "offload" if tier != DEVICE and (old.tier == DEVICE or tier == DISK) else "fetch"
        self.counters[f"{kind}s_to_{tier}"] += 1
        self.counters[f"{kind}_bytes"] += spec.block_bytes
        return transfer

    def _write_disk(self, seq: Sequence, index: int, old: KVBlock) -> tuple[KVBlock, Transfer]:
        assert self.disk is not None
        consumer, spec = seq.consumer, seq.spec
        quota = consumer.quotas.get(DISK)
        while quota is not None and (consumer.used_blocks[DISK] + 1) * spec.block_bytes > quota:
            if not self._reclaim(DISK, consumer, (old,)):
                raise OutOfBlocksError(
                    f"consumer {consumer.name!r} is at its disk quota of {quota} bytes"
                )
        new = KVBlock(-1, DISK)
        new.ref_cnt = 1
        if old.disk_key is not None:  # a clean copy is already on disk
            new.disk_key = old.disk_key
            self.counters["disk_writes_skipped"] += 1
            return new, Transfer(None, 0)
        key = f"{consumer.name}.{seq.seq_id}.{index}"
        meta = {
            "spec": spec.describe(),
            "index": index,
            "position": old.position,
            "num_tokens": old.num_tokens,
            "importance": old.importance,
        }
        self.disk.put(key, self.pools[old.tier].view(old, spec), meta)
        new.disk_key = key
        consumer.used_blocks[DISK] += 1
        return new, Transfer(None, spec.block_bytes)

    def _read_disk(self, seq: Sequence, index: int, block: KVBlock, dst: torch.Tensor) -> Transfer:
        assert self.disk is not None and block.disk_key is not None
        try:
            if dst.is_cuda:
                return self.copier.copy(dst, self.disk.get(block.disk_key))
            self.disk.get(block.disk_key, out=dst)
            return Transfer(None, dst.numel() * dst.element_size())
        except CorruptBlockError:
            # The store already quarantined the file; the block is gone from this sequence.
            seq._pop(index)
            seq.consumer.used_blocks[DISK] -= 1
            seq.num_dropped += 1
            self.counters["corrupt_blocks"] += 1
            raise

    def _restore(self, seq: Sequence) -> None:
        """Put the disk blocks an earlier process wrote for this sequence back in its table."""
        if self.disk is None:
            raise CacheError("restore=True needs the disk tier: set cache.disk_dir")
        prefix = f"{seq.consumer.name}.{seq.seq_id}."
        keys = [k for k in self.disk.keys() if k.startswith(prefix)]  # noqa: SIM118
        entries = sorted((self.disk.entry(k) for k in keys), key=lambda e: e.meta["index"])
        for entry in entries:
            seq.spec.check_compatible(entry.meta["spec"], f"disk block {entry.key}")
            block = KVBlock(-1, DISK)
            block.ref_cnt, block.disk_key = 1, entry.key
            block.owner, block.seq_id, block.index = (
                seq.consumer.name,
                seq.seq_id,
                entry.meta["index"],
            )
            block.position, block.num_tokens = entry.meta["position"], entry.meta["num_tokens"]
            block.importance = entry.meta.get("importance", 0.0)
            seq._put(block.index, block)
            seq.consumer.used_blocks[DISK] += 1
            seq.next_index = max(seq.next_index, block.index + 1)
            seq.next_position = max(seq.next_position, block.position + block.num_tokens)
