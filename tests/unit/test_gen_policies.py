"""Generation cache policies: pinned state, exact attention over what they keep, endless
streams, q.k-driven compression, adaptive sink, bad arguments, and the real model path."""

import itertools

import pytest
import test_gen_exactness as exactness
import torch
from test_cache_policies import _attend_through_cache
from test_gen_exactness import streamed_forward

from conftest import SMALL, make_manager
from streamrt.cache import DEVICE, make_policy
from streamrt.kernels import apply_rope, sdpa
from streamrt.models.wan import build_wan, tiny_wan_config

T = SMALL.tokens_per_block


def _open(policy, device_blocks=16, **args):
    mgr = make_manager(device_blocks=device_blocks, host_blocks=8)
    mgr.register("gen", SMALL, offload=False)
    return mgr, mgr.open_sequence("gen", policy, **args)


def _contiguous(n):
    return tuple(j * T for j in range(n))


def _reference_attention(blocks, q, layer):
    """Plain attention over independent copies of the kept blocks, laid out from position 0."""
    k = torch.cat([b[0, layer] for b in blocks])
    v = torch.cat([b[1, layer] for b in blocks])
    pos = torch.arange(k.shape[0])
    qpos = torch.arange(k.shape[0], k.shape[0] + q.shape[0])
    return sdpa(apply_rope(q, qpos), apply_rope(k, pos), v)


def _cos_of_means(a, b):
    """Adaptive-sink similarity, written independently: per (K/V, layer) cosine of token means."""
    ma = a.mean(dim=2).reshape(2, SMALL.num_layers, -1)
    mb = b.mean(dim=2).reshape(2, SMALL.num_layers, -1)
    cos = (ma * mb).sum(-1) / (ma.norm(dim=-1) * mb.norm(dim=-1))
    return cos.mean().item()


def _scores(per_token):
    """A `ForwardContext.scores`-shaped dict (one row) with the given per-token values per layer."""
    return {layer: per_token[layer][None] for layer in range(SMALL.num_layers)}


def _observe(seq, values):
    """Give block `i` total importance `values[i]` (spread evenly over its tokens and layers)."""
    plan = seq.plan()
    per_token = torch.cat(
        [torch.full((T,), values.get(i, 0.0) / (T * SMALL.num_layers)) for i in plan.indices]
    )
    seq.policy.observe_scores(seq, plan, _scores([per_token] * SMALL.num_layers))


class _Reference:
    """What each policy must keep and what the kept blocks must hold, from independent copies."""

    def __init__(self, policy, args):
        self.policy, self.args = policy, args
        self.sink = args["sink_blocks"]
        self.cap = args.get("budget_blocks") or self.sink + args["window_blocks"]
        self.kept, self.kv, self.importance = [], {}, {}
        self.refreshes = 0

    def append(self, i, kv):
        if len(self.kept) >= self.cap:
            victim = self._victim()
            if self.policy == "ema_sink":
                slot, a = victim % self.sink, self.args["alpha"]
                self.kv[slot] = a * self.kv[slot] + (1 - a) * self.kv[victim]
            self.kept.remove(victim)
        self.kept.append(i)
        self.kv[i] = kv.clone()

    def _victim(self):
        if "budget_blocks" in self.args:
            older = self.kept[: len(self.kept) - self.args["recent_blocks"]]
            cands = [i for i in older if i >= self.sink]
            return min(cands, key=lambda i: (self.importance.get(i, 0.0), i))
        return next(i for i in self.kept if i >= self.sink)

    def after_write(self, i):
        tau = self.args.get("adaptive_tau")
        if tau is None or i < self.sink:
            return
        sims = [_cos_of_means(self.kv[s], self.kv[i]) for s in range(self.sink)]
        worst = min(range(self.sink), key=sims.__getitem__)
        if sims[worst] < tau:
            self.kv[worst] = self.kv[i].clone()
            self.refreshes += 1

    def observe(self, plan, per_token):
        total = sum(per_token)
        for j, i in enumerate(plan.indices):
            self.importance[i] = total[j * T : (j + 1) * T].sum().item()


CASES = [
    ("sink_window", {"sink_blocks": 1, "window_blocks": 3, "adaptive_tau": 0.2}),
    ("sink_window", {"sink_blocks": 2, "window_blocks": 2, "adaptive_tau": 0.2}),
    ("deep_sink", {"sink_blocks": 3, "window_blocks": 2}),
    ("ema_sink", {"sink_blocks": 2, "window_blocks": 3, "alpha": 0.7}),
    ("participative", {"sink_blocks": 1, "budget_blocks": 5, "recent_blocks": 2}),
    ("deep_sink_participative", {"sink_blocks": 2, "budget_blocks": 5, "recent_blocks": 1}),
]


@pytest.mark.parametrize(("policy", "args"), CASES)
def test_policy_matches_attention_over_its_kept_tokens(policy, args):
    mgr, seq = _open(policy, **args)
    ref = _Reference(policy, args)
    base = torch.randn(SMALL.block_shape)
    for n in range(16):
        # A shared component whose sign flips now and then: frames are alike or opposite,
        # so the adaptive sink both keeps and replaces its slots along the way.
        kv = 0.5 * torch.randn(SMALL.block_shape) + (-1.0 if n % 5 == 3 else 1.0) * base
        i = seq.append()
        seq.write(i, kv)
        ref.append(i, kv)
        seq.policy.after_write(seq, [i])
        ref.after_write(i)
        plan = seq.plan()
        assert list(plan.indices) == ref.kept, n
        assert plan.starts == _contiguous(len(ref.kept)) and plan.query_start == len(ref.kept) * T
        q = torch.randn(3, 4, SMALL.head_dim)  # 4 query heads over 2 KV heads (GQA)
        for layer in range(SMALL.num_layers):
            got = _attend_through_cache(seq, q, layer)
            want = _reference_attention([ref.kv[i] for i in ref.kept], q, layer)
            torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
        if "budget_blocks" in args:
            per_token = [torch.randn(plan.num_tokens) for _ in range(SMALL.num_layers)]
            seq.policy.observe_scores(seq, plan, _scores(per_token))
            ref.observe(plan, per_token)
    if "adaptive_tau" in args:
        assert 0 < ref.refreshes < 16 - args["sink_blocks"]  # both branches were taken
        assert seq.policy.sink_refreshes == ref.refreshes
    mgr.check_invariants()


def test_deep_sink_sits_right_before_the_tail():
    mgr, seq = _open("deep_sink", sink_blocks=2, window_blocks=3)
    for _ in range(3):
        seq.append()
    plan = seq.plan()  # nothing evicted yet: delta = 0, positions as written
    assert plan.indices == (0, 1, 2) and plan.starts == (0, 4, 8) and plan.query_start == 12
    for _ in range(4):
        seq.append()
    plan = seq.plan()
    assert plan.indices == (0, 1, 4, 5, 6)
    assert [seq.table[i].position for i in plan.indices] == [0, 4, 16, 20, 24]  # as written
    # Tail (frames 4..6) and query move together by -2 frames; the sink's last frame (1)
    # lands right before the tail's first (2): delta = s_tail - s_sink - 1 = 4 - 1 - 1 = 2.
    assert plan.starts == (0, 4, 8, 12, 16) and plan.query_start == 20
    assert seq.policy.capacity == 5 and seq.counts[DEVICE] == 5
    assert make_policy("deep_sink").sink_blocks == 10 and make_policy("deep_sink").capacity == 21
    mgr.check_invariants()


def test_ema_sink_folds_each_evicted_frame_into_its_slot():
    mgr, seq = _open("ema_sink", sink_blocks=2, window_blocks=2, alpha=0.5)
    sink_pages = None
    for n in range(7):
        i = seq.append()
        seq.kv(i).fill_(float(n + 1))
        if n == 1:
            sink_pages = [seq.table[0].block_id, seq.table[1].block_id]
    # append 4 evicts frame 2 (=3) into slot 0: .5*1 + .5*3 = 2
    # append 5 evicts frame 3 (=4) into slot 1: .5*2 + .5*4 = 3
    # append 6 evicts frame 4 (=5) into slot 0: .5*2 + .5*5 = 3.5
    plan = seq.plan()
    assert plan.indices == (0, 1, 5, 6) and plan.starts == (0, 4, 8, 12) and plan.query_start == 16
    assert torch.all(seq.kv(0) == 3.5) and torch.all(seq.kv(1) == 3.0)
    assert torch.all(seq.kv(5) == 6.0) and torch.all(seq.kv(6) == 7.0)
    assert [seq.table[0].block_id, seq.table[1].block_id] == sink_pages  # updated in place
    assert seq.num_dropped == 3
    mgr.check_invariants()


def test_participative_keeps_sink_recent_and_most_important_in_time_order():
    mgr, seq = _open("participative", sink_blocks=1, budget_blocks=5, recent_blocks=2)
    for _ in range(5):
        seq.append()
    _observe(seq, {0: -50.0, 1: 5.0, 2: 1.0, 3: 9.0, 4: 0.0})
    evicted = []
    for _ in range(3):
        before = set(seq.table)
        i = seq.append()
        evicted += sorted(before - set(seq.table))
        assert i in seq.table
    # append 5: recent (3, 4), candidates 1 (5.0), 2 (1.0)        -> 2 leaves
    # append 6: recent (4, 5), candidates 1 (5.0), 3 (9.0)        -> 1 leaves
    # append 7: recent (5, 6), candidates 3 (9.0), 4 (0.0)        -> 4 leaves
    # the sink (importance -50) and unscored recent blocks (0.0) are never victims
    assert evicted == [2, 1, 4]
    plan = seq.plan()
    assert plan.indices == (0, 3, 5, 6, 7) and plan.starts == _contiguous(5)
    assert plan.query_start == 5 * T
    assert seq.policy.select_victims(seq, 5) == [5, 3]  # lowest importance first, recent excluded
    assert seq.table[3].importance == pytest.approx(9.0)
    mgr.check_invariants()


def test_participative_without_scores_is_sink_plus_fifo():
    _, seq = _open("participative", sink_blocks=1, budget_blocks=4, recent_blocks=1)
    for _ in range(9):
        seq.append()
    assert seq.plan().indices == (0, 6, 7, 8)  # all importances 0: ties go oldest first


@pytest.mark.parametrize(("target", "other"), [((2, 5), (1, 4)), ((1, 4), (2, 5))])
def test_participative_selection_follows_query_key_scores(target, other):
    """Same keys, different queries: the blocks whose keys the queries align with survive."""
    _, seq = _open("participative", sink_blocks=1, budget_blocks=6, recent_blocks=2)
    # Directions in the two lowest-frequency RoPE pairs, so rotation barely changes q.k.
    u, w = torch.zeros(SMALL.head_dim), torch.zeros(SMALL.head_dim)
    u[6], w[4] = 1.0, 1.0
    key_dir = {2: u, 5: u, 1: w, 4: w, 3: -u - w}
    query_dir = u if target == (2, 5) else w
    evicted = []
    for n in range(14):
        before = set(seq.table)
        i = seq.append()
        evicted += sorted(before - set(seq.table))
        kv = 0.1 * torch.randn(SMALL.block_shape)
        if n in key_dir:
            kv[0] += 3.0 * key_dir[n]
        seq.write(i, kv)
        plan = seq.plan()
        # What the streaming self-attention records: queries of the new frame at its position,
        # keys of every kept block at their plan positions, importance sum_r q_r . k_j.
        qpos = torch.arange(plan.starts[-1], plan.starts[-1] + T)
        q = apply_rope((3.0 * query_dir).expand(T, SMALL.num_kv_heads, -1), qpos)
        scores = {}
        for layer in range(SMALL.num_layers):
            k, _ = seq.gather(layer, plan)
            keys = apply_rope(k, plan.token_positions())
            scores[layer] = [torch.einsum("qhd,khd->k", q.float(), keys.float())]
        seq.policy.observe_scores(seq, plan, scores)
    kept = seq.plan().indices
    assert evicted[0] == 3  # anti-aligned keys: the first candidate to go
    assert set(target) <= set(kept) and not set(other) <= set(kept)
    assert list(kept) == sorted(kept) and kept[0] == 0 and kept[-2:] == (12, 13)


def test_adaptive_sink_replaces_a_dissimilar_slot_and_keeps_a_similar_one():
    u, w = torch.zeros(SMALL.block_shape), torch.zeros(SMALL.block_shape)
    u[..., 0], w[..., 1] = 1.0, 1.0
    _, seq = _open("sink_window", sink_blocks=1, window_blocks=2, adaptive_tau=0.2)
    seq.write(seq.append(), u)
    similar = u + 0.1 * torch.randn(SMALL.block_shape)
    i = seq.append()
    seq.write(i, similar)
    seq.policy.after_write(seq, [i])
    assert seq.policy.sink_refreshes == 0 and torch.equal(seq.kv(0), u)
    i = seq.append()
    seq.write(i, w)  # cosine 0 < 0.2: the sink slot takes this frame
    seq.policy.after_write(seq, [i])
    assert seq.policy.sink_refreshes == 1 and torch.equal(seq.kv(0), w)
    assert seq.plan().indices == (
        0,
        1,
        2,
    )  # same slot, same position; the frame stays in the window
    i = seq.append()
    seq.write(i, u)  # now unlike the (refreshed) sink again
    seq.policy.after_write(seq, [i])
    assert seq.policy.sink_refreshes == 2 and torch.equal(seq.kv(0), u)

    # Two slots: only the least similar one is replaced.
    _, seq = _open("sink_window", sink_blocks=2, window_blocks=2, adaptive_tau=0.2)
    seq.write(seq.append(), u)
    seq.write(seq.append(), w)
    new = u + 0.1 * w
    i = seq.append()
    seq.write(i, new)
    seq.policy.after_write(seq, [i])
    assert torch.equal(seq.kv(0), u) and torch.equal(seq.kv(1), new)
    # Without adaptive_tau the hook does nothing.
    _, seq = _open("sink_window", sink_blocks=1, window_blocks=2)
    seq.write(seq.append(), u)
    i = seq.append()
    seq.write(i, w)
    seq.policy.after_write(seq, [i])
    assert torch.equal(seq.kv(0), u)


STREAM_CASES = [
    ("sink_window", {"sink_blocks": 2, "window_blocks": 4, "adaptive_tau": 0.2}),
    ("deep_sink", {"sink_blocks": 3, "window_blocks": 3}),
    ("ema_sink", {"sink_blocks": 2, "window_blocks": 4, "alpha": 0.9}),
    ("participative", {"sink_blocks": 1, "budget_blocks": 6, "recent_blocks": 2}),
    ("deep_sink_participative", {"sink_blocks": 3, "budget_blocks": 6, "recent_blocks": 2}),
]


@pytest.mark.parametrize(("policy", "args"), STREAM_CASES)
def test_two_thousand_block_stream_keeps_memory_and_positions_bounded(policy, args):
    mgr, seq = _open(policy, device_blocks=8, **args)
    cap = seq.policy.capacity
    sink = tuple(range(args["sink_blocks"]))
    arena_ptr = None
    scores = "budget_blocks" in args
    for n in range(2000):
        i = seq.append()
        seq.write(i, torch.randn(SMALL.block_shape))
        seq.policy.after_write(seq, [i])
        plan = seq.plan()
        if scores:
            per_token = [torch.randn(plan.num_tokens) for _ in range(SMALL.num_layers)]
            seq.policy.observe_scores(seq, plan, _scores(per_token))
        if n == 0:
            arena_ptr = mgr.pools[DEVICE].arena.data_ptr()
        assert seq.counts[DEVICE] == min(n + 1, cap)
        assert max(plan.starts) + T <= cap * T and plan.query_start <= cap * T
        assert i in plan.indices and plan.indices[: len(sink)] == sink[: n + 1]
    assert len(seq.table) == cap and seq.next_position == 2000 * T
    assert mgr.pools[DEVICE].arena.data_ptr() == arena_ptr
    st = mgr.stats()
    assert st["tiers"]["device"]["used_blocks"] == cap and st["counters"]["dropped"] == 2000 - cap
    mgr.check_invariants()


@pytest.mark.parametrize(
    ("policy", "args", "match"),
    [
        ("sink_window", {"adaptive_tau": 1.5}, r"adaptive_tau .* \[-1, 1\]"),
        ("sink_window", {"sink_blocks": 0, "adaptive_tau": 0.2}, "sink_blocks >= 1"),
        ("deep_sink", {"sink_blocks": 0}, "sink_blocks >= 1"),
        ("deep_sink", {"window_blocks": 0}, "window_blocks >= 1"),
        ("ema_sink", {"sink_blocks": 0}, "sink_blocks >= 1"),
        ("ema_sink", {"window_blocks": 0}, "window_blocks >= 1"),
        ("ema_sink", {"alpha": 1.01}, r"alpha in \[0, 1\]"),
        ("ema_sink", {"alpha": -0.1}, r"alpha in \[0, 1\]"),
        ("participative", {"sink_blocks": -1}, "sink_blocks >= 0"),
        ("participative", {"recent_blocks": 0}, "recent_blocks >= 1"),
        (
            "participative",
            {"sink_blocks": 2, "budget_blocks": 5, "recent_blocks": 3},
            "budget_blocks >= .* = 6",
        ),
        ("deep_sink_participative", {"budget_blocks": 14}, "budget_blocks >= .* = 15"),
        ("deep_sink", {"budget_blocks": 3}, "bad arguments for cache policy 'deep_sink'"),
    ],
)
def test_bad_arguments_name_the_argument_and_its_range(policy, args, match):
    with pytest.raises(ValueError, match=match):
        make_policy(policy, **args)


def test_observe_scores_rejects_scores_of_another_plan():
    _, seq = _open("participative", sink_blocks=1, budget_blocks=4, recent_blocks=1)
    seq.append()
    seq.append()
    plan = seq.plan()
    with pytest.raises(ValueError, match="plan keeps 8 tokens"):
        seq.policy.observe_scores(seq, plan, {0: torch.zeros(1, 4)})


# ---------------------------------------------------------------- through the real model


@pytest.fixture
def engine_hooks(monkeypatch):
    """Make `streamed_forward` call the policy hooks the way the engine must: after each
    chunk's (clean) forward, hand its scores to the policy, then `after_write`."""
    log = []
    real = exactness.streaming_forward

    def forward(model, state, rows, *args, **kwargs):
        scores = {}
        out = real(model, state, rows, *args, scores=scores, **kwargs)
        for b, row in enumerate(rows):
            seq, policy = row.seq, row.seq.policy
            if hasattr(policy, "observe_scores"):
                policy.observe_scores(seq, row.plan, scores, row=b)
            policy.after_write(seq, row.write)
            importance = {i: seq.table[i].importance for i in row.plan.indices}
            row_scores = {layer: s[b].clone() for layer, s in scores.items()}
            log.append(
                (policy, seq.counts[DEVICE], row.plan, list(row.write), importance, row_scores)
            )
        return out

    monkeypatch.setattr(exactness, "streaming_forward", forward)
    return log


@pytest.mark.parametrize(
    ("policy", "args", "chunk"),
    [
        ("sink_window", {"sink_blocks": 1, "window_blocks": 3, "adaptive_tau": 1.0}, 1),
        ("deep_sink", {"sink_blocks": 3, "window_blocks": 3}, 3),
        ("ema_sink", {"sink_blocks": 3, "window_blocks": 3, "alpha": 0.9}, 3),
        ("participative", {"sink_blocks": 1, "budget_blocks": 7, "recent_blocks": 3}, 3),
        ("deep_sink_participative", {"sink_blocks": 3, "budget_blocks": 7, "recent_blocks": 3}, 3),
    ],
)
def test_policy_streams_through_the_wan_model(engine_hooks, policy, args, chunk):
    model = build_wan(tiny_wan_config(), seed=1)
    torch.manual_seed(2)
    frames, tpf = 15, 16  # 8x8 latents, 2x2 patches
    x = torch.randn(1, 4, frames, 8, 8)
    text = torch.randn(1, 5, 16)
    frame_t = torch.full((1, frames), 500)
    out, _ = streamed_forward(model, x, frame_t, text, chunk, policy, **args)
    assert out.shape == x.shape and torch.isfinite(out).all()
    pol = engine_hooks[0][0]
    cap = pol.capacity
    assert len(engine_hooks) == frames // chunk
    assert max(entry[1] for entry in engine_hooks) == cap  # the budget was reached and held
    for _, count, plan, write, _, _ in engine_hooks:
        assert count <= cap and max(plan.starts) // tpf < cap and set(write) <= set(plan.indices)
        assert plan.starts == tuple(j * tpf for j in range(len(plan.indices)))
    assert engine_hooks[-1][2].indices[-chunk:] == tuple(range(frames - chunk, frames))
    if "adaptive_tau" in args:
        assert pol.sink_refreshes == frames - args["sink_blocks"]  # tau = 1: every new frame
    if "budget_blocks" in args:
        for (_, _, plan, _, importance, scores), nxt in itertools.pairwise(engine_hooks):
            # The model's q.k scores reached the blocks...
            total = sum(scores.values())
            for j, i in enumerate(plan.indices):
                want = total[j * tpf : (j + 1) * tpf].sum().item()
                assert importance[i] == pytest.approx(want, rel=1e-5, abs=1e-4)
            # ...and the next chunk's appends evicted exactly the least important candidates.
            ref = _Reference(policy, args)
            ref.kept, ref.importance = list(plan.indices), importance
            for i in nxt[3]:
                ref.append(i, torch.empty(0))
            assert tuple(ref.kept) == nxt[2].indices
