"""Agent KV across tool calls: Continuum's TTL, TokenCake's offload + predictive upload,
pressure order, and a real transformers LM resuming bit-exactly from manager blocks."""

import math

import numpy as np
import pytest
import torch

from streamrt.agents import AgentKV, ToolDurations
from streamrt.cache import CacheManager, KVSpec

# transformers renamed the forward's `past_key_values` to `cache` (5.x deprecation).
CACHE_KW = (
    "cache"
    if "cache"
    in __import__("inspect")
    .signature(__import__("transformers").LlamaForCausalLM.forward)
    .parameters
    else "past_key_values"
)
SPEC = KVSpec(num_layers=2, num_kv_heads=2, head_dim=8, tokens_per_block=4)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make(device_blocks=32, host_blocks=32, **kw):
    mgr = CacheManager(
        device_bytes=SPEC.block_bytes * device_blocks, host_bytes=SPEC.block_bytes * host_blocks
    )
    mgr.register("agents", SPEC)
    clock = Clock()
    return mgr, AgentKV(mgr, "agents", clock=clock, **kw), clock


def grow(seq, blocks: int) -> list[torch.Tensor]:
    out = []
    for _ in range(blocks):
        i = seq.append()
        seq.kv(i).copy_(torch.randn(seq.kv(i).shape))
        out.append(seq.kv(i).clone())
    return out


def test_cold_ttl_maximises_the_exponential_objective():
    d = ToolDurations(cold_mean_s=1.0)
    tau = d.best_ttl("search", benefit_s=5.0)
    assert tau == pytest.approx(math.log(5.0))
    grid = np.linspace(0, 10, 10001)
    values = [d.cdf("search", t) * 5.0 - t for t in grid]
    assert tau == pytest.approx(grid[int(np.argmax(values))], abs=1e-3)
    assert d.best_ttl("search", benefit_s=0.8) == 0.0  # not worth pinning at all


def test_warm_ttl_picks_among_seen_durations():
    d = ToolDurations()
    for s in (0.1, 5.0, 0.2):
        d.observe("calc", s)
    # cdf*2 - tau: 0.1 -> 0.567, 0.2 -> 1.133, 5.0 -> -3.0
    assert d.best_ttl("calc", 2.0) == 0.2
    assert d.predict("calc") == 0.2 and d.cdf("calc", 0.15) == pytest.approx(1 / 3)


def test_short_tool_pins_then_expires_to_host_and_comes_back_exact():
    mgr, kv, clock = make(queue_delay_s=3.0)
    seq = kv.open("a")
    data = grow(seq, 3)
    call = kv.tool_call("a", "calc")
    assert call.action == "pin" and call.ttl_s == pytest.approx(math.log(3.0 + kv.recompute_s("a")))
    assert all(b.pin_deadline is not None for b in seq.blocks())
    clock.now += call.ttl_s / 2
    assert kv.tick() == []
    clock.now += call.ttl_s
    assert kv.tick() == ["expire a"]
    assert {b.tier for b in seq.blocks()} == {"host"}
    resume = kv.tool_return("a")
    assert resume.action == "offload" and not resume.prefetched and not resume.recompute
    assert {b.tier for b in seq.blocks()} == {"device"}
    for i, ref in zip(seq.indices(), data):
        assert torch.equal(seq.kv(i), ref)
    mgr.check_invariants()


def test_long_tool_offloads_and_uploads_before_its_predicted_return():
    mgr, kv, clock = make(move_bytes_per_s=SPEC.block_bytes * 4)  # 4 blocks/s: 1 s per move
    seq = kv.open("a")
    data = grow(seq, 4)
    kv.durations.observe("browse", 10.0)
    call = kv.tool_call("a", "browse")
    assert call.action == "offload" and {b.tier for b in seq.blocks()} == {"host"}
    assert call.upload_at == pytest.approx(clock.now + 10.0 - kv.move_s("a"), rel=1e-6)
    clock.now = call.upload_at - 0.01
    assert kv.tick() == []
    clock.now = call.upload_at
    assert kv.tick() == ["upload a"]
    assert {b.tier for b in seq.blocks()} == {"device"}
    resume = kv.tool_return("a", duration_s=10.0)
    assert resume.prefetched and resume.waited_s == 0.0
    for i, ref in zip(seq.indices(), data):
        assert torch.equal(seq.kv(i), ref)
    mgr.check_invariants()


def test_pressure_unpins_the_most_recent_program_first():
    mgr, kv, clock = make(queue_delay_s=3.0)
    for name in ("old", "new"):
        grow(kv.open(name), 2)
        kv.tool_call(name, "calc")
        clock.now += 1
    assert kv.relieve_pressure() == "new"
    # unpinned and given back at once (this policy offloads: to the host)
    assert {b.tier for b in kv.agents["new"].blocks()} == {"host"}
    assert all(b.pin_deadline is None for b in kv.agents["new"].blocks())
    assert all(b.pin_deadline is not None for b in kv.agents["old"].blocks())
    assert kv.relieve_pressure() == "old" and kv.relieve_pressure() is None
    mgr.check_invariants()


def test_offload_leaves_blocks_shared_with_other_agents_on_the_device():
    mgr, kv, clock = make(move_bytes_per_s=1e12)
    a, b = kv.open("a"), kv.open("b")
    grow(a, 1)
    system = a.table[0]
    mgr.append_shared(b, system)  # b's context starts with a's first block (a system prompt)
    private = grow(a, 1)[0]
    call = kv.tool_call("a", "build", predicted_s=60.0)
    assert call.action == "offload"
    # only the private block moved: the shared one stays, held by both (no duplicate later)
    assert a.table[0] is system and system.tier == "device" and system.ref_cnt == 2
    assert a.table[1].tier == "host"
    assert kv.context_bytes("a") == 0  # nothing left to move down
    clock.now += 60
    kv.tool_return("a")
    assert a.table[0] is system and torch.equal(a.kv(1), private)
    assert mgr.stats()["consumers"]["agents"]["device"]["blocks"] == 2
    mgr.check_invariants()


def test_a_freed_context_gives_its_tail_blocks_out_first():
    mgr, kv, _ = make(device_blocks=4, queue_delay_s=0.0, prefill_tokens_per_s=1e9)
    seq = kv.open("a")
    grow(seq, 3)
    ids = [b.block_id for b in seq.blocks()]
    kv.tool_call("a", "calc", allow=("free",))
    # the free queue is LRU: the context's last block is reused first, its prefix last
    taken = [mgr.pools["device"].take().block_id for _ in range(4)]
    assert taken[1:] == ids[::-1]


def test_freed_context_asks_for_recompute():
    mgr, kv, _ = make(queue_delay_s=0.0, prefill_tokens_per_s=1e9, move_bytes_per_s=1.0)
    grow(kv.open("a"), 2)
    call = kv.tool_call("a", "calc")  # no pin benefit, and a link too slow to offload
    assert call.action == "free" and not kv.agents["a"].table
    assert kv.tool_return("a").recompute
    with pytest.raises(ValueError, match="not in a tool call"):
        kv.tool_return("a")
    mgr.check_invariants()


def test_a_real_lm_resumes_bit_exactly_from_offloaded_blocks():
    from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
    )
    torch.manual_seed(0)
    lm = LlamaForCausalLM(cfg).eval()
    prompt = torch.randint(0, 64, (1, 10))
    with torch.no_grad():
        out = lm(prompt, use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
        reference = lm(nxt, **{CACHE_KW: out.past_key_values}).logits
        out = lm(prompt, use_cache=True)  # the same prefill again, to store
    mgr, kv, _ = make(move_bytes_per_s=SPEC.block_bytes)
    seq = kv.open("coder")
    layers = out.past_key_values.layers
    for start in range(0, 10, SPEC.tokens_per_block):
        n = min(SPEC.tokens_per_block, 10 - start)
        i = seq.append(n)
        block = seq.kv(i)
        for layer_idx, layer in enumerate(layers):
            block[0, layer_idx, :n] = layer.keys[0, :, start : start + n].transpose(0, 1)
            block[1, layer_idx, :n] = layer.values[0, :, start : start + n].transpose(0, 1)
    kv.durations.observe("run_tests", 30.0)
    assert kv.tool_call("coder", "run_tests").action == "offload"
    assert {b.tier for b in seq.blocks()} == {"host"}
    kv.tool_return("coder")
    cache = DynamicCache()
    for layer_idx in range(cfg.num_hidden_layers):
        ks, vs = [], []
        for i, b in seq.items():
            kvb = seq.kv(i, writable=False)[:, layer_idx, : b.num_tokens]
            ks.append(kvb[0].transpose(0, 1))
            vs.append(kvb[1].transpose(0, 1))
        cache.update(torch.cat(ks, 1)[None], torch.cat(vs, 1)[None], layer_idx)
    with torch.no_grad():
        resumed = lm(nxt, **{CACHE_KW: cache}).logits
    assert torch.equal(resumed, reference)
    mgr.check_invariants()
