"""Exact-state tests of the block pool and free queue (vLLM block-manager style)."""

import pytest
import torch

from streamrt.cache.block import FreeBlockQueue, KVBlock
from streamrt.cache.block_pool import BlockPool
from streamrt.cache.errors import CacheError
from streamrt.cache.spec import KVSpec


def test_free_queue_order_and_middle_removal():
    blocks = [KVBlock(i, "device") for i in range(5)]
    q = FreeBlockQueue(blocks)
    assert q.block_ids() == [0, 1, 2, 3, 4] and q.num_free == 5
    q.remove(blocks[2])
    assert q.block_ids() == [0, 1, 3, 4] and q.num_free == 4
    assert q.popleft() is blocks[0]
    q.append(blocks[2])
    q.append(blocks[0])
    assert q.block_ids() == [1, 3, 4, 2, 0]
    with pytest.raises(RuntimeError):
        q.remove(KVBlock(9, "device"))
    for expected in [1, 3, 4, 2, 0]:
        assert q.popleft().block_id == expected
    with pytest.raises(IndexError):
        q.popleft()
    assert q.num_free == 0


def _pool(n=4):
    return BlockPool("device", n, page_bytes=1024, device=torch.device("cpu"))


def test_take_release_ref_counts_and_lru_reuse():
    pool = _pool()
    a, b, c = pool.take(), pool.take(), pool.take()
    assert [a.block_id, b.block_id, c.block_id] == [0, 1, 2]
    assert [x.ref_cnt for x in (a, b, c)] == [1, 1, 1]
    assert pool.free_queue.block_ids() == [3]
    pool.touch(b)  # shared by a second sequence
    assert b.ref_cnt == 2
    assert pool.release(b) is False and b.ref_cnt == 1
    assert pool.release(c) is True and pool.release(a) is True
    # Freed in order c, a: the queue reuses the longest-free first.
    assert pool.free_queue.block_ids() == [3, 2, 0]
    assert pool.take().block_id == 3
    assert pool.take().block_id == 2
    assert pool.num_free == 1


def test_double_free_raises_and_keeps_state():
    pool = _pool()
    a = pool.take()
    pool.release(a)
    before = pool.free_queue.block_ids()
    with pytest.raises(CacheError, match="double free"):
        pool.release(a)
    assert pool.free_queue.block_ids() == before and a.ref_cnt == 0


def test_cached_block_survives_free_until_reused():
    pool = _pool(2)
    a = pool.take()
    a.owner = "lm"
    pool.set_hash(a, b"h0")
    pool.release(a)
    assert pool.lookup("lm", b"h0") is a  # lazily evicted: still findable while free
    assert pool.lookup("other", b"h0") is None  # hashes never cross consumers
    pool.touch(a)  # a prefix hit revives it without a copy
    assert a.ref_cnt == 1 and pool.free_queue.block_ids() == [1]
    pool.release(a)
    assert pool.free_queue.block_ids() == [1, 0]
    pool.take()  # block 1
    pool.take()  # block 0: reuse evicts the hash
    assert pool.lookup("lm", b"h0") is None and a.block_hash is None


def test_views_alias_the_arena_for_any_spec():
    pool = _pool(3)
    s32 = KVSpec(2, 2, 8, 4, torch.float32)  # 512 bytes
    s16 = KVSpec(1, 1, 8, 4, torch.bfloat16)  # 128 bytes
    a, b = pool.take(), pool.take()
    pool.view(a, s32).fill_(1.5)
    pool.view(b, s16).fill_(-2.0)
    assert pool.view(a, s32).shape == (2, 2, 4, 2, 8)
    assert pool.view(b, s16).dtype == torch.bfloat16
    assert pool.arena[a.block_id, :512].view(torch.float32).eq(1.5).all()
    assert pool.arena[b.block_id, :128].view(torch.bfloat16).eq(-2.0).all()
    assert pool.typed(s32).data_ptr() == pool.arena.data_ptr()
