"""Stats and invariant checks of a `CacheManager` (kept apart so the manager stays readable)."""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any

from streamrt.cache.block import DEVICE, DISK, HOST, TIERS
from streamrt.cache.errors import CacheError

if TYPE_CHECKING:
    from streamrt.cache.manager import CacheManager


def collect_stats(mgr: CacheManager) -> dict[str, Any]:
    tiers: dict[str, Any] = {}
    for tier in (DEVICE, HOST):
        pool = mgr.pools.get(tier)
        total = pool.num_blocks if pool else mgr.budgets[tier] // max(mgr.page_bytes, 1)
        free = pool.num_free if pool else total
        tiers[tier] = {
            "total_blocks": total,
            "free_blocks": free,
            "used_blocks": total - free,
            "page_bytes": mgr.page_bytes,
            "total_bytes": total * mgr.page_bytes,
            "used_bytes": (total - free) * mgr.page_bytes,
            "cached_blocks": len(pool.cached) if pool else 0,
        }
    if mgr.disk is not None:
        tiers[DISK] = {
            "used_blocks": len(mgr.disk),
            "used_bytes": mgr.disk.used_bytes,
            **mgr.disk.stats(),
        }
    consumers = {}
    for c in mgr.consumers.values():
        per_tier = {}
        for tier in TIERS:
            unit = c.spec.block_bytes if tier == DISK else mgr.page_bytes
            per_tier[tier] = {"blocks": c.used_blocks[tier], "bytes": c.used_blocks[tier] * unit}
        consumers[c.name] = {"priority": c.priority, "block_bytes": c.spec.block_bytes, **per_tier}
    return {
        "tiers": tiers,
        "consumers": consumers,
        "sequences": len(mgr.sequences),
        "counters": dict(mgr.counters),
    }


def check_invariants(mgr: CacheManager) -> None:
    problems: list[str] = []
    refs: Counter[int] = Counter()
    for seq in mgr.sequences.values():
        counts = Counter(b.tier for b in seq.table.values())
        for tier in TIERS:
            if counts[tier] != seq.counts[tier]:
                problems.append(
                    f"{seq.seq_id}: {tier} count {seq.counts[tier]} != {counts[tier]} in table"
                )
        device = {i for i, b in seq.table.items() if b.tier == DEVICE}
        if device != seq._device:
            problems.append(f"{seq.seq_id}: device index set out of date")
        for index, block in seq.table.items():
            refs[id(block)] += 1
            if block.owner != seq.consumer.name:
                problems.append(f"{seq.seq_id}[{index}] owned by {block.owner!r}")
            if block.ref_cnt < 1:
                problems.append(f"{seq.seq_id}[{index}] in a table with ref count {block.ref_cnt}")
    for tier in (DEVICE, HOST):
        pool = mgr.pools.get(tier)
        if pool is None:
            continue
        queued = list(pool.free_queue)
        zero = [b for b in pool.blocks if b.ref_cnt == 0]
        if len(queued) != pool.num_free or len(zero) != pool.num_free:
            problems.append(
                f"{tier}: free queue holds {len(queued)}, counter says {pool.num_free}, "
                f"{len(zero)} blocks have ref 0"
            )
        if {id(b) for b in queued} != {id(b) for b in zero}:
            problems.append(f"{tier}: free queue and ref-0 blocks differ")
        if any(b.ref_cnt < 0 for b in pool.blocks):
            problems.append(f"{tier}: negative ref count")
        for b in pool.blocks:
            if b.ref_cnt > 0 and refs[id(b)] != b.ref_cnt:
                problems.append(
                    f"{tier} block {b.block_id}: ref count {b.ref_cnt}, referenced {refs[id(b)]}x"
                )
        for (owner, h), b in pool.cached.items():
            if b.block_hash != h or b.owner != owner:
                problems.append(
                    f"{tier}: cached hash entry points at block {b.block_id} with another hash"
                )
        used = Counter(b.owner for b in pool.blocks if b.ref_cnt > 0)
        for c in mgr.consumers.values():
            if used[c.name] != c.used_blocks[tier]:
                problems.append(
                    f"{c.name}: {tier} used {c.used_blocks[tier]} != {used[c.name]} in pool"
                )
    disk_used: Counter[str] = Counter()
    files = {}  # a disk file belongs to one block: on disk, or the clean copy of a fetched one
    for seq in mgr.sequences.values():
        for b in seq.table.values():
            if b.disk_key is None or id(b) in files:
                continue
            files[id(b)] = b.disk_key
            disk_used[seq.consumer.name] += 1
            if mgr.disk is None or b.disk_key not in mgr.disk:
                problems.append(f"{seq.seq_id}[{b.index}]: disk key {b.disk_key} missing")
            if b.tier == DISK and b.block_id != -1:
                problems.append(f"{seq.seq_id}[{b.index}]: disk block with pool id {b.block_id}")
    if len(set(files.values())) != len(files):
        problems.append("two blocks claim the same disk file")
    for c in mgr.consumers.values():
        if disk_used[c.name] != c.used_blocks[DISK]:
            problems.append(
                f"{c.name}: disk used {c.used_blocks[DISK]} != {disk_used[c.name]} in tables"
            )
    if problems:
        raise CacheError("cache invariants violated: " + "; ".join(problems[:10]))
