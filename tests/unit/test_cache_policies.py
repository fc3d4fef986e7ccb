"""Every policy equals plain attention over exactly the tokens and positions it keeps."""

import pytest
import torch

from conftest import SMALL, make_manager
from streamrt.cache import DEVICE
from streamrt.kernels import apply_rope, sdpa

T = SMALL.tokens_per_block


def _attend_through_cache(seq, q, layer):
    plan = seq.plan()
    k, v = seq.gather(layer, plan)
    k = apply_rope(k, plan.token_positions())
    qpos = torch.arange(plan.query_start, plan.query_start + q.shape[0])
    return sdpa(apply_rope(q, qpos), k, v)


def _reference(history, kept, starts, q, layer):
    """Attention built from an independent copy of the written K/V, not from the pool."""
    k = torch.cat([history[i][0, layer] for i in kept])
    v = torch.cat([history[i][1, layer] for i in kept])
    pos = torch.cat([torch.arange(s, s + T) for s in starts])
    qpos = torch.arange(int(pos[-1]) + 1, int(pos[-1]) + 1 + q.shape[0])
    return sdpa(apply_rope(q, qpos), apply_rope(k, pos), v)


def _expected_sink_window(n, sink, window):
    kept = list(range(min(sink, n)))
    rest = list(range(sink, n))
    return kept + rest[-window:]


@pytest.mark.parametrize(
    ("policy", "args"),
    [
        ("full", {}),
        ("sink_window", {"sink_blocks": 2, "window_blocks": 3}),
        ("sink_window", {"sink_blocks": 0, "window_blocks": 2}),
        ("sink_window", {"sink_blocks": 1, "window_blocks": 2, "positions": "absolute"}),
    ],
)
def test_policy_matches_attention_over_its_kept_tokens(policy, args):
    mgr = make_manager(device_blocks=16, host_blocks=16)
    mgr.register("gen", SMALL, offload=False)
    seq = mgr.open_sequence("gen", policy, **args)
    history = []
    for n in range(1, 10):
        i = seq.append()
        history.append(torch.randn(SMALL.block_shape))
        seq.write(i, history[-1])
        if policy == "full":
            kept = list(range(n))
        else:
            kept = _expected_sink_window(n, args["sink_blocks"], args["window_blocks"])
        if args.get("positions") == "absolute" or policy == "full":
            starts = [i * T for i in kept]
        else:
            starts = [j * T for j in range(len(kept))]
        plan = seq.plan()
        assert list(plan.indices) == kept and list(plan.starts) == starts
        q = torch.randn(3, 4, SMALL.head_dim)  # 4 query heads over 2 KV heads (GQA)
        for layer in range(SMALL.num_layers):
            got = _attend_through_cache(seq, q, layer)
            want = _reference(history, kept, starts, q, layer)
            torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    mgr.check_invariants()


def test_ring_overwrites_one_slot_and_leaves_the_rest_untouched():
    mgr = make_manager(device_blocks=8, host_blocks=8)
    mgr.register("gen", SMALL, offload=False)
    seq = mgr.open_sequence("gen", "sink_window", sink_blocks=1, window_blocks=3)
    for _ in range(4):
        seq.write(seq.append(), torch.randn(SMALL.block_shape))
    pool = mgr.pools[DEVICE]
    ring = sorted(b.block_id for b in seq.blocks(DEVICE))
    sink_ptr = seq.kv(0).data_ptr()
    sink_val = seq.kv(0).clone()
    for step in range(20):
        before = pool.arena.clone()
        victim = seq.table[seq.plan().indices[1]].block_id  # oldest non-sink
        i = seq.append()
        seq.write(i, torch.randn(SMALL.block_shape))
        assert seq.table[i].block_id == victim, step  # the victim's slot is reused in place
        changed = (pool.arena != before).any(dim=1).nonzero().flatten().tolist()
        assert changed == [victim]  # nothing else moved or was rewritten
    assert sorted(b.block_id for b in seq.blocks(DEVICE)) == ring
    assert seq.kv(0).data_ptr() == sink_ptr and torch.equal(seq.kv(0), sink_val)
    assert pool.num_free == 8 - 4
    assert mgr.stats()["counters"]["ring_evictions"] == 20


def test_ten_thousand_block_stream_keeps_memory_and_positions_bounded():
    mgr = make_manager(device_blocks=8, host_blocks=8)
    mgr.register("gen", SMALL, offload=False)
    seq = mgr.open_sequence("gen", "sink_window", sink_blocks=2, window_blocks=4)
    arena_ptr = None
    for n in range(10_000):
        seq.append()
        if n == 10:
            arena_ptr = mgr.pools[DEVICE].arena.data_ptr()
    plan = seq.plan()
    assert len(seq.table) == 6 and seq.counts[DEVICE] == 6
    assert plan.indices == (0, 1, 9996, 9997, 9998, 9999)
    assert max(plan.starts) < 6 * T and plan.query_start == 6 * T
    assert seq.next_position == 10_000 * T  # the stream's own clock still counts
    assert mgr.pools[DEVICE].arena.data_ptr() == arena_ptr
    st = mgr.stats()
    assert st["tiers"]["device"]["used_blocks"] == 6 and st["counters"]["dropped"] == 9994
    mgr.check_invariants()
