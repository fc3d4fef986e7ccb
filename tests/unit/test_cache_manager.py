"""The cache manager: exact bookkeeping, tiers, consumers, sharing, restarts, bad input."""

import pytest
import torch

from conftest import SMALL, fill, make_manager
from streamrt.cache import (
    DEVICE,
    DISK,
    HOST,
    BudgetError,
    CacheError,
    CacheManager,
    CorruptBlockError,
    DiskTierError,
    KVSpec,
    OutOfBlocksError,
    SpecMismatchError,
    hash_chain,
)


def test_append_free_exact_state():
    mgr = make_manager(device_blocks=4)
    mgr.register("a", SMALL)
    seq = mgr.open_sequence("a", "full")
    idx = [seq.append() for _ in range(3)]
    assert idx == [0, 1, 2]
    assert [seq.table[i].block_id for i in idx] == [0, 1, 2]
    pool = mgr.pools[DEVICE]
    assert pool.free_queue.block_ids() == [3]
    seq.free(1)
    seq.free(0)
    assert pool.free_queue.block_ids() == [3, 1, 0]
    assert mgr.consumers["a"].used_blocks[DEVICE] == 1
    assert seq.append() == 3 and seq.table[3].block_id == 3  # head of the free queue
    assert seq.next_position == 4 * SMALL.tokens_per_block
    mgr.check_invariants()
    with pytest.raises(CacheError, match="freed once"):
        seq.free(0)
    mgr.check_invariants()


def test_partial_blocks_and_positions():
    mgr = make_manager()
    mgr.register("lm", SMALL)
    seq = mgr.open_sequence("lm")
    seq.append(num_tokens=3)
    mgr.extend_last(seq, 1)
    seq.append(num_tokens=2)
    plan = seq.plan()
    assert plan.starts == (0, 4) and plan.lengths == (4, 2) and plan.query_start == 6
    assert plan.token_positions().tolist() == [0, 1, 2, 3, 4, 5]
    with pytest.raises(ValueError, match="cannot add"):
        mgr.extend_last(seq, 3)
    with pytest.raises(ValueError, match="num_tokens"):
        seq.append(num_tokens=5)
    k, _v = seq.gather(0)
    assert k.shape == (6, SMALL.num_kv_heads, SMALL.head_dim)
    mgr.check_invariants()


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float8_e4m3fn]
)
def test_round_trip_device_host_disk_is_bit_exact(tmp_path, dtype):
    spec = KVSpec(3, 2, 16, 8, dtype)
    mgr = CacheManager(
        device_bytes=spec.block_bytes * 4, host_bytes=spec.block_bytes * 4, disk_dir=str(tmp_path)
    )
    mgr.register("gen", spec)
    seq = mgr.open_sequence("gen")
    idx = [seq.append() for _ in range(3)]
    ref = [fill(seq, i) for i in idx]
    mgr.offload(seq, idx, HOST)
    assert seq.counts == {DEVICE: 0, HOST: 3, DISK: 0}
    assert all(torch.equal(seq.kv(i), r) for i, r in zip(idx, ref))
    mgr.offload(seq, idx, DISK)
    assert seq.counts == {DEVICE: 0, HOST: 0, DISK: 3}
    assert mgr.pools[HOST].num_free == 4
    mgr.fetch(seq, idx)
    assert seq.counts == {DEVICE: 3, HOST: 0, DISK: 0}
    assert all(torch.equal(seq.kv(i, writable=False), r) for i, r in zip(idx, ref))
    c = mgr.stats()["counters"]
    assert c["offloads_to_host"] == 3 and c["offloads_to_disk"] == 3 and c["fetchs_to_device"] == 3
    mgr.check_invariants()


def test_fetched_blocks_keep_a_clean_disk_copy_until_written(tmp_path):
    mgr = make_manager(disk_dir=str(tmp_path))
    mgr.register("qa", SMALL)
    seq = mgr.open_sequence("qa")
    for i in range(3):
        seq.append()
        fill(seq, i, float(i))
    mgr.offload(seq, [0, 1, 2], DISK)
    mgr.fetch(seq, [0, 1, 2])
    assert len(mgr.disk) == 3 and mgr.consumers["qa"].used_blocks[DISK] == 3
    mgr.check_invariants()
    # Reading keeps the copy; offloading again writes nothing.
    assert seq.kv(1, writable=False).eq(1.0).all()
    writes = mgr.disk.stats()["writes"]
    mgr.offload(seq, [0, 1], DISK)
    assert mgr.disk.stats()["writes"] == writes
    assert mgr.stats()["counters"]["disk_writes_skipped"] == 2
    mgr.fetch(seq, [1])
    assert seq.kv(1, writable=False).eq(1.0).all()
    # A writable view dirties the block: its disk copy is deleted, the next offload rewrites.
    seq.kv(2).fill_(7.0)
    assert len(mgr.disk) == 2 and seq.table[2].disk_key is None
    mgr.check_invariants()
    mgr.offload(seq, [2], DISK)
    mgr.fetch(seq, [2])
    assert seq.kv(2, writable=False).eq(7.0).all()
    mgr.check_invariants()
    # Closing with keep_disk leaves every file for a restart; without, nothing remains.
    mgr.close_sequence(seq, keep_disk=True)
    assert len(mgr.disk) == 3 and mgr.consumers["qa"].used_blocks == {DEVICE: 0, HOST: 0, DISK: 0}
    mgr.check_invariants()
    again = mgr.open_sequence("qa", seq_id=seq.seq_id, restore=True)
    assert again.indices(DISK) == [0, 1, 2]
    mgr.close_sequence(again)
    assert len(mgr.disk) == 0
    mgr.check_invariants()


def test_device_pressure_offloads_lru_then_host_pressure_drops():
    mgr = make_manager(device_blocks=2, host_blocks=2)
    mgr.register("a", SMALL)
    seq = mgr.open_sequence("a", "full")
    vals = {}
    for i in range(6):
        seq.append()
        vals[i] = fill(seq, i, float(i))
        mgr.check_invariants()
    # Device keeps the 2 newest, host the next 2, the 2 oldest were dropped (no disk tier).
    assert seq.indices(DEVICE) == [4, 5] and seq.indices(HOST) == [2, 3]
    assert sorted(seq.table) == [2, 3, 4, 5] and seq.num_dropped == 2
    mgr.fetch(seq, [2])
    assert torch.equal(seq.kv(2), vals[2])
    assert seq.indices(DEVICE) == [2, 5]  # block 4 was the least recently used


def test_two_specs_share_one_budget_with_quotas():
    big = KVSpec(2, 2, 8, 8)  # 2048 bytes; SMALL is 1024: pages are 2048
    mgr = CacheManager(device_bytes=2048 * 6, host_bytes=2048 * 6)
    mgr.register("gen", big, quotas={DEVICE: 2048 * 2})
    mgr.register("qa", SMALL)
    g, q = mgr.open_sequence("gen"), mgr.open_sequence("qa")
    for _ in range(4):
        g.append()
    assert g.counts[DEVICE] == 2 and g.counts[HOST] == 2  # quota held: own blocks offloaded
    for _ in range(4):
        q.append()
    assert q.counts[DEVICE] == 4  # the rest of the shared budget serves the other spec
    st = mgr.stats()
    assert st["consumers"]["gen"]["device"]["bytes"] == 4096
    assert st["consumers"]["qa"]["device"]["blocks"] == 4
    assert st["tiers"]["device"]["free_blocks"] == 0
    mgr.check_invariants()


def test_priority_takes_memory_from_lower_priority_consumer():
    mgr = make_manager(device_blocks=4, host_blocks=8)
    mgr.register("batch", SMALL, priority=0)
    mgr.register("live", SMALL, priority=10)
    low, high = mgr.open_sequence("batch"), mgr.open_sequence("live")
    for _ in range(4):
        low.append()
    for _ in range(3):
        high.append()
    assert high.counts[DEVICE] == 3 and low.counts[DEVICE] == 1 and low.counts[HOST] == 3
    assert mgr.stats()["counters"]["preemptions"] == 3
    # The lower-priority consumer cannot take anything back: it evicts its own block.
    low.append()
    assert high.counts[DEVICE] == 3 and low.counts[DEVICE] == 1
    mgr.check_invariants()


def test_pinned_and_shared_blocks_are_not_moved():
    mgr = make_manager(device_blocks=2, host_blocks=2)
    mgr.register("a", SMALL, offload=False)
    seq = mgr.open_sequence("a")
    seq.append()
    seq.append()
    mgr.pin(seq, 60.0)
    with pytest.raises(OutOfBlocksError, match="pinned, shared or in use"):
        seq.append()
    mgr.check_invariants()
    mgr.pin(seq, None)
    seq.append()
    assert seq.indices(DEVICE) == [1, 2] and seq.num_dropped == 1


def test_prefix_sharing_by_hash_chain():
    mgr = make_manager(device_blocks=4)
    mgr.register("lm", SMALL)
    tokens = list(range(10))  # 2 full blocks of 4 + a partial
    hashes = hash_chain(tokens, SMALL.tokens_per_block)
    assert len(hashes) == 2 and hash_chain(tokens, 4) == hashes  # deterministic
    a = mgr.open_sequence("lm")
    for i, h in enumerate(hashes):
        a.append()
        fill(a, i, float(i))
        mgr.commit_hash(a, i, h)
    b = mgr.open_sequence("lm")
    found = mgr.match_prefix("lm", hash_chain([*tokens[:8], 99, 98, 97, 96], 4))
    assert [blk.block_id for blk in found] == [0, 1][: len(found)] and len(found) == 2
    for blk in found:
        mgr.append_shared(b, blk)
    assert [blk.ref_cnt for blk in found] == [2, 2]
    assert torch.equal(b.kv(1), a.kv(1))
    mgr.close_sequence(a)
    assert [blk.ref_cnt for blk in found] == [1, 1]
    mgr.close_sequence(b)
    assert mgr.pools[DEVICE].num_free == 4
    # Freed but still cached: a new request hits without recomputation.
    assert len(mgr.match_prefix("lm", hashes)) == 2
    assert mgr.stats()["counters"]["prefix_hits"] == 4
    mgr.check_invariants()


def test_restart_restores_disk_blocks(tmp_path):
    mgr = make_manager(disk_dir=str(tmp_path))
    mgr.register("qa", SMALL)
    seq = mgr.open_sequence("qa", seq_id="session1")
    ref = {}
    for i in range(3):
        seq.append()
        ref[i] = fill(seq, i)
    mgr.offload(seq, [0, 1, 2], DISK)
    del mgr, seq  # a new process:
    mgr2 = make_manager(disk_dir=str(tmp_path))
    mgr2.register("qa", SMALL)
    seq2 = mgr2.open_sequence("qa", seq_id="session1", restore=True)
    assert seq2.indices(DISK) == [0, 1, 2] and seq2.next_index == 3
    mgr2.fetch(seq2, [0, 1, 2])
    assert all(torch.equal(seq2.kv(i), ref[i]) for i in range(3))
    mgr2.check_invariants()
    # A different spec under the same name is refused, naming the field.
    mgr2.offload(seq2, [0], DISK)
    mgr3 = CacheManager(device_bytes=1 << 16, host_bytes=1 << 16, disk_dir=str(tmp_path))
    mgr3.register("qa", KVSpec(2, 2, 8, 4, torch.float16))
    with pytest.raises(SpecMismatchError, match="dtype"):
        mgr3.open_sequence("qa", seq_id="session1", restore=True)


def test_corrupt_disk_block_is_never_served(tmp_path):
    mgr = make_manager(disk_dir=str(tmp_path))
    mgr.register("qa", SMALL)
    seq = mgr.open_sequence("qa")
    for i in range(3):
        seq.append()
        fill(seq, i)
    good = seq.kv(2).clone()
    mgr.offload(seq, [0, 1, 2], DISK)
    path = mgr.disk.entry(seq.table[1].disk_key).path
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptBlockError):
        mgr.fetch(seq, 1)
    assert 1 not in seq.table and seq.num_dropped == 1
    assert mgr.stats()["counters"]["corrupt_blocks"] == 1
    mgr.check_invariants()
    mgr.fetch(seq, [0, 2])
    assert torch.equal(seq.kv(2), good)
    mgr.check_invariants()


def test_bad_input_messages():
    mgr = make_manager()
    with pytest.raises(KeyError, match="register it first"):
        mgr.open_sequence("nobody")
    mgr.register("a", SMALL)
    with pytest.raises(ValueError, match="already registered"):
        mgr.register("a", SMALL)
    with pytest.raises(
        ValueError, match=r"unknown cache policy 'lru2'; choose one of: .*full.*sink_window"
    ):
        mgr.open_sequence("a", "lru2")
    with pytest.raises(ValueError, match="bad arguments"):
        mgr.open_sequence("a", "sink_window", window=3)
    with pytest.raises(ValueError, match="consumer name"):
        mgr.register("bad name!", SMALL)
    seq = mgr.open_sequence("a")
    seq.append()
    with pytest.raises(SpecMismatchError, match="expected a block of shape"):
        seq.write(0, torch.zeros(2, 2, 4, 2, 9))
    with pytest.raises(CacheError, match="no disk tier"):
        mgr.offload(seq, [0], DISK)
    with pytest.raises(ValueError, match="unknown tier"):
        mgr.register("b", SMALL, quotas={"gpu": 10})
    mgr.check_invariants()


def test_budget_smaller_than_one_block():
    mgr = CacheManager(device_bytes=100, host_bytes=1 << 20)
    with pytest.raises(BudgetError, match="device budget of 100 bytes is smaller than one block"):
        mgr.register("a", SMALL)
    assert mgr.consumers == {}
    mgr = make_manager()
    with pytest.raises(BudgetError, match="quota"):
        mgr.register("a", SMALL, quotas={DEVICE: 10})
    mgr.register("a", SMALL)
    mgr.open_sequence("a").append()  # pages are now fixed at 512 bytes
    with pytest.raises(BudgetError, match="does not fit"):
        mgr.register("big", KVSpec(4, 4, 8, 4))
    mgr.check_invariants()


def test_unwritable_disk_dir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(DiskTierError, match=str(blocker)):
        make_manager(disk_dir=str(blocker / "kv"))
