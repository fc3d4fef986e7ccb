"""The one `CacheManager` of a process: every KV byte of every consumer, in three tiers.

    device pool  --offload-->  host pool  --offload-->  disk store
                 <---fetch---              <---fetch---

Consumers (a generation engine, a QA memory, an agent server) register a `KVSpec`;
their sequences own block tables; a policy per sequence decides which blocks stay on
the device and at which positions they attend. The manager does the bookkeeping:
allocation, quotas and priorities, tier moves, sharing, stats and invariants.
"""

from __future__ import annotations

import itertools
import re
import threading
import time
import warnings
from collections import Counter
from collections.abc import Sequence as SequenceABC
from typing import Any

import torch

from streamrt.cache.block import DEVICE, DISK, HOST, KVBlock
from streamrt.cache.block_pool import BlockPool
from streamrt.cache.errors import BudgetError, CacheError, OutOfBlocksError
from streamrt.cache.policies import CachePolicy, make_policy
from streamrt.cache.relayout import PAGE_ALIGN as _PAGE_ALIGN
from streamrt.cache.relayout import Relayout
from streamrt.cache.sequence import AttentionPlan, Sequence
from streamrt.cache.spec import Consumer, KVSpec
from streamrt.cache.tiers import TierMoves
from streamrt.cache.transfer import Copier
from streamrt.config import CacheConfig
from streamrt.errors import InputError, UnknownNameError

_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_LOWER = {DEVICE: HOST, HOST: DISK}


def _check_name(kind: str, name: str) -> None:
    if not _NAME.match(name):
        raise InputError(f"{kind} name {name!r} must be 1-64 characters of A-Z a-z 0-9 _ -")


class CacheManager(TierMoves, Relayout):
    """Owns all KV memory of a process, for all consumers.

    Args:
        config: Budgets and options; keyword overrides update a copy of it.
    """

    def __init__(self, config: CacheConfig | None = None, **overrides: Any) -> None:
        base = config or CacheConfig()
        self.config = CacheConfig(**{**base.__dict__, **overrides})
        cfg = self.config
        self.device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.budgets = {DEVICE: int(cfg.device_bytes), HOST: int(cfg.host_bytes)}
        self.pools: dict[str, BlockPool] = {}
        self.page_bytes = int(cfg.page_bytes)
        self.consumers: dict[str, Consumer] = {}
        self.sequences: dict[tuple[str, str], Sequence] = {}
        self.counters: Counter[str] = Counter()
        self.copier = Copier(self.device)
        self.disk = None
        if cfg.disk_dir is not None:
            from streamrt.cache.disk_store import DiskStore

            self.disk = DiskStore(cfg.disk_dir, budget_bytes=cfg.disk_bytes)
        self._lock = threading.RLock()
        self._tick = itertools.count(1)
        self._seq_ids = itertools.count()
        self._orphans: list[Sequence | str] = []
        """Sequences whose owner was garbage-collected (`release_later`)."""

    # ------------------------------------------------------------------ consumers

    def register(
        self,
        name: str,
        spec: KVSpec,
        *,
        priority: int = 0,
        quotas: dict[str, int | None] | None = None,
        offload: bool = True,
    ) -> Consumer:
        """Register a consumer. Raises `BudgetError` if a budget or quota cannot hold one block."""
        _check_name("consumer", name)
        with self._lock:
            self._close_orphans()
            if name in self.consumers:
                raise InputError(f"consumer {name!r} is already registered")
            quotas = dict(quotas or {})
            unknown = set(quotas) - {DEVICE, HOST, DISK}
            if unknown:
                raise InputError(
                    f"unknown tier(s) in quotas: {sorted(unknown)}; tiers are device, host, disk"
                )
            page = self._page_for(spec)
            for tier, budget in self.budgets.items():
                if budget < page:
                    raise BudgetError(
                        f"{tier} budget of {budget} bytes is smaller than one block of consumer "
                        f"{name!r} ({page} bytes per page): raise cache.{tier}_bytes or lower tokens_per_block"
                    )
            for tier, quota in quotas.items():
                if quota is not None and quota < (page if tier != DISK else spec.block_bytes):
                    raise BudgetError(
                        f"{tier} quota of {quota} bytes for consumer {name!r} is smaller than one block "
                        f"({page} bytes): raise the quota or lower tokens_per_block"
                    )
            consumer = Consumer(name, spec, priority, quotas, offload)
            self.consumers[name] = consumer
            return consumer

    def _page_for(self, spec: KVSpec) -> int:
        """Page size this spec will occupy; fixes the page size once a pool exists. A
        larger block re-sizes the pages while no block is in use (the pools are dropped
        and allocated again at the next allocation; cached prefixes are forgotten)."""
        if self.pools and spec.block_bytes > self.page_bytes and self._idle():
            self.pools = {}
            self.page_bytes = int(self.config.page_bytes)
            self.counters["repaged"] += 1
        if self.pools:
            if spec.block_bytes > self.page_bytes:
                raise BudgetError(
                    f"a block of {spec.block_bytes} bytes does not fit the {self.page_bytes}-byte pages "
                    "fixed at the first allocation: set cache.page_bytes, or register every consumer "
                    "before the first allocation"
                )
            return self.page_bytes
        largest = max([spec.block_bytes] + [c.spec.block_bytes for c in self.consumers.values()])
        return max(self.page_bytes, -(-largest // _PAGE_ALIGN) * _PAGE_ALIGN)

    def _idle(self) -> bool:
        """No block of any pool is referenced (cached, unreferenced ones may be)."""
        return all(pool.num_free == pool.num_blocks for pool in self.pools.values())

    def _pool(self, tier: str) -> BlockPool:
        pool = self.pools.get(tier)
        if pool is None:
            if not self.pools:
                self.page_bytes = max(self._page_for(c.spec) for c in self.consumers.values())
            pin = tier == HOST and self.config.pin_host_memory and torch.cuda.is_available()
            device = self.device if tier == DEVICE else torch.device("cpu")
            pool = BlockPool(
                tier, self.budgets[tier] // self.page_bytes, self.page_bytes, device, pin
            )
            self.pools[tier] = pool
        return pool

    # ------------------------------------------------------------------ sequences

    def open_sequence(
        self,
        consumer: str | Consumer,
        policy: str | CachePolicy = "full",
        *,
        seq_id: str | None = None,
        restore: bool = False,
        **policy_args: Any,
    ) -> Sequence:
        """Open a block table for `consumer` under `policy` (a name from `POLICIES` or an instance).

        With `restore=True` the sequence's blocks written to the disk tier by an earlier
        process (same consumer name and `seq_id`) are put back in its table, on disk.
        """
        with self._lock:
            self._close_orphans()
            c = self._consumer(consumer)
            seq_id = seq_id or f"s{next(self._seq_ids)}"
            _check_name("sequence", seq_id)
            if (c.name, seq_id) in self.sequences:
                raise InputError(f"sequence {seq_id!r} of consumer {c.name!r} is already open")
            seq = Sequence(self, seq_id, c, make_policy(policy, **policy_args))
            if restore:
                self._restore(seq)
            self.sequences[(c.name, seq_id)] = seq
            return seq

    def close_sequence(self, seq: Sequence, *, keep_disk: bool = False) -> None:
        """Free every block of `seq`. Its disk files are deleted unless `keep_disk`, in which
        case a later `open_sequence(..., restore=True)` finds them again."""
        with self._lock:
            for index in list(seq.table):
                block = seq._pop(index)
                if keep_disk and block.tier == DISK:
                    block.ref_cnt -= 1
                    seq.consumer.used_blocks[DISK] -= 1
                else:
                    self._release(seq.consumer, block, keep_file=keep_disk)
            seq.closed = True
            self.sequences.pop((seq.consumer.name, seq.seq_id), None)

    def release_later(self, seqs: list[Sequence], consumer: str | None = None) -> None:
        """Close `seqs` (and unregister `consumer` if it then has no sequence) at the
        manager's next `open_sequence` or `register`: for a finalizer of their owner (a
        stream or model dropped without `close()`), which may run inside another manager
        call, where closing at once would change state mid-call."""
        self._orphans.extend(seqs)  # list.extend is atomic: no lock taken in a finalizer
        if consumer is not None:
            self._orphans.append(consumer)

    def _close_orphans(self) -> None:
        while self._orphans:
            item = self._orphans.pop(0)  # in order: a consumer after its sequences
            if isinstance(item, str):
                if not self.sequences_of(item):
                    self.unregister(item)
            elif not item.closed:
                self.close_sequence(item)

    def sequences_of(self, consumer: str) -> list[Sequence]:
        """The open sequences of `consumer` (a shared manager holds others' too)."""
        return [seq for (name, _), seq in self.sequences.items() if name == consumer]

    def unregister(self, name: str) -> None:
        """Forget a consumer that has no open sequence (its cached blocks are dropped)."""
        with self._lock:
            consumer = self._consumer(name)
            if self.sequences_of(name):
                raise InputError(f"consumer {name!r} still has open sequences: close them first")
            self._drop_cached(name)
            del self.consumers[consumer.name]

    def _drop_cached(self, name: str) -> None:
        """Forget the cached free blocks of consumer `name` (no prefix hit finds them)."""
        for pool in self.pools.values():
            for key in [k for k in pool.cached if k[0] == name]:
                if pool.cached[key].ref_cnt == 0:
                    pool._drop_hash(pool.cached[key])

    def _consumer(self, consumer: str | Consumer) -> Consumer:
        name = consumer.name if isinstance(consumer, Consumer) else consumer
        if name not in self.consumers:
            raise UnknownNameError(
                f"unknown consumer {name!r}; register it first (known: {sorted(self.consumers)})"
            )
        return self.consumers[name]

    # ------------------------------------------------------------------ allocation

    def append(self, seq: Sequence, num_tokens: int | None = None, ring: bool = True) -> int:
        """Add a device block at the end of `seq` and return its logical index.

        If the policy's capacity is reached, its first victim leaves the device (offloaded
        or dropped) and the new block takes over the victim's page in place: a ring,
        with no copy of the rest of the cache. `ring=False`: a fresh page instead, the
        victims staying until `evict` (a forward still reads them, `streamrt.gen.fold`).
        """
        tpb = seq.spec.tokens_per_block
        n = tpb if num_tokens is None else num_tokens
        if not 1 <= n <= tpb:
            raise InputError(f"num_tokens must be in 1..{tpb} (tokens_per_block), got {n}")
        with self._lock:
            self._check_open(seq)
            cap = seq.policy.capacity
            block = None
            if ring and cap is not None and seq.counts[DEVICE] >= cap:
                block = self._evict_for_ring(seq)
            if block is None:
                block = self._take(seq.consumer, DEVICE, protect=())
            index = seq.next_index
            block.owner, block.seq_id, block.index = seq.consumer.name, seq.seq_id, index
            block.position, block.num_tokens = seq.next_position, n
            block.last_access = seq.last_access = next(self._tick)
            seq._put(index, block)
            seq.next_index += 1
            seq.next_position += n
            self.counters["appends"] += 1
            return index

    def extend_last(self, seq: Sequence, num_tokens: int) -> None:
        """Account `num_tokens` more tokens written into the last (partial) block."""
        with self._lock:
            block = seq.table[seq.next_index - 1]
            if block.num_tokens + num_tokens > seq.spec.tokens_per_block:
                raise InputError(
                    f"block {block.index} holds {block.num_tokens} of {seq.spec.tokens_per_block} tokens; "
                    f"cannot add {num_tokens}: append a new block"
                )
            block.num_tokens += num_tokens
            seq.next_position += num_tokens

    def _evict_for_ring(self, seq: Sequence) -> KVBlock | None:
        """Move the policy's first movable victim off the device; return its page to reuse."""
        for index in seq.policy.select_victims(seq, seq.counts[DEVICE]):
            block = seq.table[index]
            if block.tier == DEVICE and self._movable(block):
                self._evict(seq, index, protect=(block,))
                self.counters["ring_evictions"] += 1
                return self._retake(seq.consumer, block)
        return None

    def _retake(self, consumer: Consumer, block: KVBlock) -> KVBlock:
        """Take a just-freed page back out of the free queue (the ring slot is overwritten)."""
        pool = self.pools[block.tier]
        pool.free_queue.remove(block)
        pool._drop_hash(block)
        block.reset()
        block.ref_cnt = 1
        block.owner = consumer.name
        consumer.used_blocks[block.tier] += 1
        return block

    def _take(self, consumer: Consumer, tier: str, protect: tuple[KVBlock, ...]) -> KVBlock:
        """A fresh page in `tier` for `consumer`: quota first, then free pages, then priority."""
        pool = self._pool(tier)
        quota = consumer.quotas.get(tier)
        if quota is not None:
            while (consumer.used_blocks[tier] + 1) * pool.page_bytes > quota:
                if not self._reclaim(tier, consumer, protect):
                    raise OutOfBlocksError(
                        f"consumer {consumer.name!r} is at its {tier} quota of {quota} bytes and none of "
                        "its blocks can leave (pinned, shared or in use): raise the quota or unpin"
                    )
        if pool.num_free == 0:
            self._make_room(consumer, tier, protect)
        block = pool.take()
        block.owner = consumer.name
        consumer.used_blocks[tier] += 1
        return block

    def _make_room(self, consumer: Consumer, tier: str, protect: tuple[KVBlock, ...]) -> None:
        """Free one page of a full tier: lowest-priority consumers give first, then `consumer`."""
        lower = sorted(
            (c for c in self.consumers.values() if c.priority < consumer.priority),
            key=lambda c: c.priority,
        )
        for victim in [*lower, consumer]:
            if self._reclaim(tier, victim, protect):
                if victim is not consumer:
                    self.counters["preemptions"] += 1
                return
        pool = self.pools[tier]
        raise OutOfBlocksError(
            f"the {tier} tier is full ({pool.num_blocks} blocks of {pool.page_bytes} bytes) and no block "
            f"of {consumer.name!r} or of a lower-priority consumer can leave it (pinned, shared or in "
            f"use): raise cache.{tier}_bytes, shrink the window, or let the consumer offload"
        )

    def _reclaim(self, tier: str, consumer: Consumer, protect: tuple[KVBlock, ...]) -> bool:
        """Move one block of `consumer` out of `tier` (down a tier, or dropped)."""
        seqs = [s for s in self.sequences.values() if s.consumer is consumer and s.counts[tier]]
        for seq in sorted(seqs, key=lambda s: s.last_access):
            if tier == DEVICE:
                candidates = seq.policy.select_victims(seq, seq.counts[DEVICE])
            else:
                items = sorted(seq.items(tier), key=lambda ib: (ib[1].last_access, ib[0]))
                candidates = [i for i, _ in items]
            for index in candidates:
                block = seq.table[index]
                if block.tier == tier and block not in protect and self._movable(block):
                    self._evict(seq, index, protect)
                    return True
        return False

    def _movable(self, block: KVBlock) -> bool:
        return block.ref_cnt == 1 and (
            block.pin_deadline is None or block.pin_deadline < time.monotonic()
        )

    def _evict(self, seq: Sequence, index: int, protect: tuple[KVBlock, ...]) -> None:
        """Offload a block one tier down if the consumer wants that and it fits, else drop it."""
        block = seq.table[index]
        if block.tier == DEVICE:
            seq.policy.before_evict(seq, index)
        lower = _LOWER.get(block.tier)
        if seq.consumer.offload and lower is not None and (lower != DISK or self.disk is not None):
            try:
                self._move(seq, index, lower, protect)
                seq.policy.on_evict(seq, index)
                return
            except CacheError as exc:  # the lower tier could not take it: say so, then drop
                self.counters["offload_failures"] += 1
                warnings.warn(
                    f"offload of {seq.seq_id}[{index}] to {lower} failed, dropped: {exc}",
                    stacklevel=3,
                )
        self._unlink(seq, index)
        seq.num_dropped += 1
        self.counters["dropped"] += 1
        seq.policy.on_evict(seq, index)

    def _unlink(self, seq: Sequence, index: int) -> None:
        """Remove a block from `seq`'s table and give its memory back."""
        block = seq._pop(index)
        self._release(seq.consumer, block)

    def _release(self, consumer: Consumer, block: KVBlock, keep_file: bool = False) -> None:
        """Drop one reference; a block nobody holds gives back its page and its disk file."""
        key = block.disk_key
        if block.tier == DISK:
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self._drop_file(consumer, key, keep_file)
            return
        if block.tier == HOST:
            self.copier.sync_host(block.block_id)
        if self.pools[block.tier].release(block):
            consumer.used_blocks[block.tier] -= 1
            if key is not None:
                block.disk_key = None
                self._drop_file(consumer, key, keep_file)

    def _drop_file(self, consumer: Consumer, key: str | None, keep_file: bool) -> None:
        assert self.disk is not None and key is not None
        consumer.used_blocks[DISK] -= 1
        if not keep_file:
            self.disk.delete(key)

    def _check_open(self, seq: Sequence) -> None:
        if seq.closed:
            raise CacheError(f"sequence {seq.seq_id!r} is closed")

    # ------------------------------------------------------------------ data access

    def kv(self, block: KVBlock, writable: bool = True) -> torch.Tensor:
        """`[2, L, T, H, D]` view of a device or host block; writes land in the pool.

        A writable view invalidates the block's clean copy on disk (if it was fetched from
        there); pass `writable=False` to only read.
        """
        if block.tier == DISK or block.ref_cnt == 0:
            raise CacheError(f"{block!r} is not resident in memory; fetch it first")
        if block.tier == HOST:
            self.copier.sync_host(block.block_id)
        if writable and block.disk_key is not None:
            key, block.disk_key = block.disk_key, None
            with self._lock:
                self._drop_file(self.consumers[block.owner], key, keep_file=False)
        return self.pools[block.tier].view(block, self.consumers[block.owner].spec)

    def gather(
        self, seq: Sequence, layer: int, plan: AttentionPlan
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of `layer` over the plan's blocks: `[tokens, H, D]` each, in plan order.

        One indexed read of the pool per call; the cache itself is never shifted or copied.
        """
        blocks = [seq.table[i] for i in plan.indices]
        off = [i for i, b in zip(plan.indices, blocks) if b.tier != DEVICE]
        if off:
            raise CacheError(
                f"plan blocks {off} of {seq.seq_id!r} are not on the device; fetch them first"
            )
        spec = seq.spec
        pool = self._pool(DEVICE)
        ids = torch.tensor([b.block_id for b in blocks], dtype=torch.long, device=pool.device)
        typed = pool.typed(spec)
        k, v = typed[ids, 0, layer], typed[ids, 1, layer]  # [n, T, H, D]
        shape = (-1, spec.num_kv_heads, spec.head_dim)
        if all(n == spec.tokens_per_block for n in plan.lengths):
            return k.reshape(shape), v.reshape(shape)
        lengths = torch.tensor(plan.lengths, device=pool.device)
        valid = torch.arange(spec.tokens_per_block, device=pool.device)[None, :] < lengths[:, None]
        return k[valid].reshape(shape), v[valid].reshape(shape)

    def device_ids(
        self, seq: Sequence, indices: SequenceABC[int], write: bool = False
    ) -> list[int]:
        """Pool page ids of device blocks `indices` of `seq`, for indexed reads and writes
        of many sequences' blocks at once (`device_table`). With `write`, stale disk copies
        of those blocks are dropped first (as `kv` does)."""
        blocks = [seq.table[i] for i in indices]
        off = [b.index for b in blocks if b.tier != DEVICE]
        if off:
            raise CacheError(
                f"blocks {off} of {seq.seq_id!r} are not on the device; fetch them first"
            )
        if write:
            for b in blocks:
                if b.disk_key is not None:
                    self.kv(b)
        return [b.block_id for b in blocks]

    def device_table(self, spec: KVSpec) -> torch.Tensor:
        """The device pool seen as `[pages, 2, layers, tokens, heads, head_dim]` of `spec`:
        index it with `device_ids` (one read or write for every row of a batch)."""
        return self._pool(DEVICE).typed(spec)

    def write_layer(
        self, seq: Sequence, indices: list[int], layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> None:
        """Write K and V of one layer for device blocks `indices`: `[len(indices) * T, H, D]` each.

        One indexed write into the pool (the hot path of a model adapter).
        """
        blocks = [seq.table[i] for i in indices]
        for b in blocks:
            if b.tier != DEVICE:
                raise CacheError(f"block {b.index} of {seq.seq_id!r} is not on the device")
            if b.disk_key is not None:
                self.kv(b)  # drops the now stale disk copy
        spec = seq.spec
        pool = self.pools[DEVICE]
        ids = torch.tensor([b.block_id for b in blocks], dtype=torch.long, device=pool.device)
        shape = (len(blocks), spec.tokens_per_block, spec.num_kv_heads, spec.head_dim)
        typed = pool.typed(spec)
        typed[ids, 0, layer] = k.reshape(shape).to(spec.dtype)
        typed[ids, 1, layer] = v.reshape(shape).to(spec.dtype)

    def touch(self, seq: Sequence, indices: list[int] | tuple[int, ...]) -> None:
        """Mark blocks (and the sequence) as just used, for LRU victim choice."""
        tick = next(self._tick)
        seq.last_access = tick
        for i in indices:
            seq.table[i].last_access = tick

    def summarize(self, seq: Sequence, index: int) -> torch.Tensor:
        """Store and return the block's summary key: per layer, the mean key over its tokens,
        heads concatenated (`[L, H * D]`, float32, on the host)."""
        block = seq.table[index]
        keys = self.kv(block, writable=False)[0, :, : block.num_tokens]  # [L, t, H, D]
        block.summary = keys.float().mean(dim=1).flatten(1).cpu()
        return block.summary

    # ------------------------------------------------------------------ sharing, pins

    def commit_hash(self, seq: Sequence, index: int, block_hash: bytes) -> None:
        """Make a full device block findable by content hash (prefix sharing)."""
        with self._lock:
            block = seq.table[index]
            if block.tier != DEVICE:
                raise CacheError("only device blocks can be shared by hash")
            self.pools[DEVICE].set_hash(block, block_hash)

    def match_prefix(self, consumer: str | Consumer, hashes: list[bytes]) -> list[KVBlock]:
        """Longest run of cached device blocks for the chained `hashes` (hits and misses counted)."""
        with self._lock:
            c = self._consumer(consumer)
            found: list[KVBlock] = []
            pool = self.pools.get(DEVICE)
            for h in hashes:
                block = pool.lookup(c.name, h) if pool else None
                if block is None:
                    break
                found.append(block)
            self.counters["prefix_hits"] += len(found)
            self.counters["prefix_misses"] += len(hashes) - len(found)
            return found

    def append_shared(self, seq: Sequence, block: KVBlock) -> int:
        """Append an existing device block of the same consumer to `seq` (ref count +1)."""
        with self._lock:
            self._check_open(seq)
            if block.owner != seq.consumer.name or block.tier != DEVICE:
                raise CacheError(
                    f"{block!r} cannot be shared into {seq!r}: other consumer or not on device"
                )
            pool = self.pools[DEVICE]
            if block.ref_cnt == 0:
                seq.consumer.used_blocks[DEVICE] += 1
            pool.touch(block)
            index = seq.next_index
            seq._put(index, block)
            seq.next_index += 1
            seq.next_position += block.num_tokens
            return index

    def free(self, seq: Sequence, index: int) -> None:
        """Give one block of `seq` back (its memory is reused once no sequence holds it)."""
        with self._lock:
            if index not in seq.table:
                raise CacheError(
                    f"block {index} of sequence {seq.seq_id!r} is not live (already freed or never "
                    "allocated); each block is freed once"
                )
            self._unlink(seq, index)

    def pin(self, seq: Sequence, seconds: float | None) -> None:
        """Keep `seq`'s blocks where they are for `seconds` (None: unpin)."""
        with self._lock:
            deadline = None if seconds is None else time.monotonic() + seconds
            for block in seq.table.values():
                block.pin_deadline = deadline

    # ------------------------------------------------------------------ stats, invariants

    def stats(self) -> dict[str, Any]:
        """Blocks and bytes per tier and consumer, and move/hit counters."""
        from streamrt.cache.accounting import collect_stats

        with self._lock:
            return collect_stats(self)

    def check_invariants(self) -> None:
        """Raise `CacheError` if the bookkeeping is inconsistent (tests call this a lot)."""
        from streamrt.cache.accounting import check_invariants

        with self._lock:
            check_invariants(self)
