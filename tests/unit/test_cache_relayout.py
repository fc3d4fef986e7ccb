"""`CacheManager.relayout`: a consumer's blocks change layout in place (a rank of the layer
pipeline gaining or losing transformer blocks), keeping tables, sharing and tiers."""

from __future__ import annotations

import pytest
import torch

from streamrt.cache import CacheManager, KVSpec
from streamrt.cache.errors import BudgetError, CacheError

SPEC = KVSpec(num_layers=2, num_kv_heads=2, head_dim=8, tokens_per_block=4)


def _filled(mgr: CacheManager):
    mgr.register("gen", SPEC)
    a = mgr.open_sequence("gen", "full", seq_id="a")
    b = mgr.open_sequence("gen", "full", seq_id="b")
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        i = a.append()
        a.write(i, torch.randn(SPEC.block_shape, generator=g))
    mgr.commit_hash(a, 0, b"prefix")
    mgr.append_shared(b, mgr.match_prefix("gen", [b"prefix"])[0])  # b starts with a's block 0
    i = b.append()
    b.write(i, torch.randn(SPEC.block_shape, generator=g))
    mgr.offload(a, 1)  # one block on the host tier
    before = {(s.seq_id, i): s.kv(i, writable=False).clone() for s in (a, b) for i in s.table}
    return a, b, before


def test_relayout_grows_pages_and_converts_every_block_once():
    mgr = CacheManager(device_bytes=SPEC.block_bytes * 8, host_bytes=SPEC.block_bytes * 8)
    a, b, before = _filled(mgr)
    tables = {s.seq_id: dict(s.table) for s in (a, b)}
    calls = []
    extra = torch.full((2, 1, 4, 2, 8), 7.0)

    def convert(seq, index, kv):  # layers [1, new, 0]
        calls.append((seq.seq_id, index))
        return torch.cat([kv[:, 1:2], extra, kv[:, 0:1]], dim=1)

    grown = KVSpec(num_layers=3, num_kv_heads=2, head_dim=8, tokens_per_block=4)
    assert mgr.relayout("gen", grown, convert) == 4  # a's 3 blocks + b's own; b[0] is a[0]
    assert len(calls) == 4 and mgr.counters["repaged"] == 1
    assert mgr.page_bytes >= grown.block_bytes
    assert a.spec == b.spec == grown
    for (sid, i), old in before.items():
        seq = a if sid == "a" else b
        kv = seq.kv(i, writable=False)
        torch.testing.assert_close(kv, torch.cat([old[:, 1:2], extra, old[:, 0:1]], dim=1))
        assert seq.table[i] is not tables[sid][i]  # new pages, same logical block
    assert a.table[0] is b.table[0] and a.table[0].ref_cnt == 2  # still shared
    assert a.table[1].tier == "host" and mgr.match_prefix("gen", [b"prefix"]) == [a.table[0]]
    mgr.fetch(a, 1)
    k, _ = a.gather(2, a.plan())  # the last layer is the old layer 0
    torch.testing.assert_close(k, torch.cat([before[("a", i)][0, 0] for i in range(3)]))
    mgr.check_invariants()

    shrunk = KVSpec(num_layers=1, num_kv_heads=2, head_dim=8, tokens_per_block=4)
    mgr.relayout("gen", shrunk, lambda seq, i, kv: kv[:, 2:3].clone())
    assert mgr.counters["repaged"] == 1  # smaller blocks fit the pages
    torch.testing.assert_close(a.kv(2, writable=False), before[("a", 2)][:, 0:1])
    mgr.check_invariants()


def test_relayout_refuses_what_it_cannot_do_and_changes_nothing(tmp_path):
    mgr = CacheManager(device_bytes=SPEC.block_bytes * 3, host_bytes=SPEC.block_bytes * 2)
    a, b, before = _filled(mgr)
    big = KVSpec(num_layers=4, num_kv_heads=2, head_dim=8, tokens_per_block=4)
    with pytest.raises(BudgetError, match=r"raise cache\.device_bytes"):
        mgr.relayout("gen", big, lambda seq, i, kv: torch.cat([kv, kv], dim=1))
    assert a.spec == SPEC and mgr.counters["relayouts"] == 0
    for (sid, i), old in before.items():
        torch.testing.assert_close((a if sid == "a" else b).kv(i, writable=False), old)
    mgr.check_invariants()

    disk = CacheManager(device_bytes=1 << 16, host_bytes=1 << 16, disk_dir=str(tmp_path))
    disk.register("gen", SPEC)
    s = disk.open_sequence("gen", "full", seq_id="s")
    s.append()
    disk.offload(s, 0, "disk")
    with pytest.raises(CacheError, match="on disk; fetch it first"):
        disk.relayout("gen", SPEC, lambda seq, i, kv: kv.clone())
