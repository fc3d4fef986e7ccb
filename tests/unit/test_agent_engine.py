"""The agent engine: continuous batching on the shared cache manager, exact greedy decode
whatever the batch, policy or prefix sharing; programs with tool calls under each policy."""

import pytest
import torch
from transformers import GenerationConfig

from streamrt.agents.engine import LLM, AgentEngine, Program, Tool, load_causal_lm
from streamrt.cache import CacheManager

PROMPTS = [
    "what color was the circle ?",
    "a red circle moving right on a dark background . what color was the circle ?",
    "a blue square moving up on a light background . a red circle moving right . what shape ?",
]


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def lm():
    return load_causal_lm()


def engine(lm, **kw):
    model, tok = lm
    kw.setdefault("tokens_per_block", 4)
    return AgentEngine(model, tok, **kw)


def reference(lm, prompt: str, n: int, stop: bool = True) -> list[int]:
    """Stock transformers: `generate` (greedy, stops at EOS); without a stop, a plain
    greedy loop of full forwards (no cache at all)."""
    model, tok = lm
    ids = torch.tensor([tok(prompt, add_special_tokens=False).input_ids])
    with torch.no_grad():
        if stop:
            cfg = GenerationConfig(max_new_tokens=n, do_sample=False, pad_token_id=0)
            return model.generate(ids, generation_config=cfg)[0, ids.shape[1] :].tolist()
        out = []
        for _ in range(n):
            out.append(int(model(ids).logits[0, -1].argmax()))
            ids = torch.cat([ids, torch.tensor([[out[-1]]])], 1)
        return out


def test_greedy_equals_stock_generate(lm):
    e = engine(lm)
    for prompt in PROMPTS[:2]:
        assert e.generate([prompt], 12) == [reference(lm, prompt, 12)]
    # without EOS, longer outputs (several decode steps over block boundaries)
    assert e.generate([PROMPTS[2]], 10, stop=False) == [reference(lm, PROMPTS[2], 10, False)]
    e.manager.check_invariants()


def test_same_tokens_alone_together_shared_and_under_every_policy(lm):
    alone = [engine(lm).generate([p], 9, stop=False)[0] for p in PROMPTS]
    for policy in ("baseline", "ttl", "offload"):
        e = engine(lm, policy=policy, step_tokens=7)  # chunked prefill mixed with decode rows
        assert e.generate(PROMPTS, 9, stop=False) == alone
        # again: the prompts' full blocks come from the prefix cache, not a prefill
        before = e.counters["prefill_tokens"]
        assert e.generate(PROMPTS[::-1], 9, stop=False) == alone[::-1]
        assert e.counters["shared_tokens"] > 0
        assert e.counters["prefill_tokens"] - before < sum(len(e.encode(p)) for p in PROMPTS)
        e.manager.check_invariants()
        assert e.manager.stats()["counters"]["prefix_hits"] > 0


def test_prefix_hit_skips_prefill_of_the_shared_blocks(lm):
    e = engine(lm)
    base = PROMPTS[1]
    e.generate([base], 2)
    prefill = e.counters["prefill_tokens"]
    n = len(e.encode(base))
    longer = base + " what shape ?"
    out = e.generate([longer], 4, stop=False)
    # only the tokens after the shared full blocks were prefilled
    assert e.counters["prefill_tokens"] - prefill == len(e.encode(longer)) - n // 4 * 4
    assert out == [reference(lm, longer, 4, False)]


def program(prompt, tool_s):
    return Program(
        prompt,
        [LLM(4, stop=False), Tool("search", tool_s, "the circle was red ."), LLM(4, stop=False)],
    )


@pytest.mark.parametrize("policy", ["baseline", "ttl", "offload"])
def test_programs_with_tool_calls_give_the_same_outputs_under_every_policy(lm, policy):
    clock = Clock()
    e = engine(lm, policy=policy, clock=clock)
    e.kv.queue_delay_s = 5.0  # makes pinning worth it (ttl)
    e.kv.move_bytes_per_s = 1e12  # makes offloading cheap (offload)
    handles = [e.submit(program(p, 3.0)) for p in PROMPTS[:2]]
    actions = []
    while e.busy:
        if not e.step():
            actions += [c.action for c in e.kv.calls.values()]
            clock.now += 0.5
    outs = [h.result().outputs for h in handles]
    # the reference: the whole context each call, alone, stock transformers
    for p, out in zip(PROMPTS[:2], outs):
        assert out[0] == reference(lm, p, 4, False)
    solo = engine(lm).generate(
        [e.encode(PROMPTS[0]) + outs[0][0] + e.encode("the circle was red .")], 4, stop=False
    )
    assert outs[0][1] == solo[0]
    # baseline frees at the tool call; ttl/offload pin, and when the 1.6 s TTL expires
    # ttl frees (Continuum), offload moves the KV to the host (TokenCake)
    expected = {"baseline": set(), "ttl": {"pin", "free"}, "offload": {"pin", "offload"}}
    assert set(actions) == expected[policy]
    assert not e.agents and e.manager.stats()["consumers"][e.consumer]["device"]["blocks"] == 0
    e.manager.check_invariants()


def test_long_tool_call_offloads_and_uploads_before_return(lm):
    clock = Clock()
    e = engine(lm, policy="offload", clock=clock)
    e.kv.move_bytes_per_s = 1e9
    h = e.submit(program(PROMPTS[0], 30.0))
    seen = []
    while e.busy:
        if not e.step():
            for a, c in e.kv.calls.items():
                seen.append((c.action, {b.tier for b in e.kv.agents[a].blocks()}))
            clock.now += 1.0
    assert ("offload", {"host"}) in seen  # during the tool call
    # uploaded by the tick before the tool returned: the resume paid no transfer
    assert e.counters["resume_offload"] == 1 and e.counters["resume_prefetched"] == 1
    assert h.result().outputs[0] == reference(lm, PROMPTS[0], 4, False)
    e.manager.check_invariants()


def test_admission_reserves_the_growth_of_running_calls(lm):
    """Two calls that cannot grow to their end side by side: the second waits for the
    first instead of being admitted on room the first will decode into (then preempted
    and recomputed)."""
    model, tok = lm
    from streamrt.agents.engine import lm_spec

    spec = lm_spec(model, 4)
    probe = engine(lm)
    need = [-(-(len(probe.encode(p)) + 12) // 4) for p in (PROMPTS[0], PROMPTS[2])]
    blocks = sum(need) - 1
    mgr = CacheManager(device_bytes=spec.block_bytes * blocks, host_bytes=spec.block_bytes)
    e = AgentEngine(model, tok, mgr, tokens_per_block=4)
    handles = [e.submit(Program(p, [LLM(12, stop=False)])) for p in (PROMPTS[0], PROMPTS[2])]
    most = 0
    while e.busy:
        e.step()
        most = max(most, len(e.running))
    assert most == 1 and e.counters["preempted"] == 0 and e.counters["recomputed_tokens"] == 0
    assert [h.result().outputs[0] for h in handles] == [
        reference(lm, p, 12, False) for p in (PROMPTS[0], PROMPTS[2])
    ]
    mgr.check_invariants()


def test_engine_shares_a_manager_with_another_consumer_and_frees_what_it_held(lm):
    model, tok = lm
    from streamrt.agents.engine import lm_spec

    spec = lm_spec(model, 4)
    mgr = CacheManager(device_bytes=spec.block_bytes * 64, host_bytes=spec.block_bytes * 64)
    mgr.register("other", spec)
    other = mgr.open_sequence("other")
    other.append()
    e = AgentEngine(model, tok, mgr, tokens_per_block=4)
    assert e.generate(PROMPTS[:2], 5, stop=False) == [
        reference(lm, p, 5, False) for p in PROMPTS[:2]
    ]
    # baseline: every block freed (full ones stay findable by hash until reused)
    assert mgr.stats()["consumers"]["agents"]["device"]["blocks"] == 0
    assert mgr.stats()["consumers"]["other"]["device"]["blocks"] == 1
    mgr.check_invariants()


def dag():
    """A planner, two workers that read its plan, a reducer that reads both workers."""
    plan = Program(PROMPTS[0], [LLM(3, stop=False, id="plan")], id="planner")
    workers = [
        Program(
            p,
            [
                LLM(2, stop=False, after=("planner/plan",)),
                Tool("search", 1.0, "the circle was red ."),
                LLM(3, stop=False, id="answer"),
            ],
            id=f"w{i}",
        )
        for i, p in enumerate(PROMPTS[1:3])
    ]
    reduce = Program("so :", [LLM(4, stop=False, after=("w1/answer", "w0/answer"))], id="reduce")
    return [plan, *workers, reduce]


@pytest.mark.parametrize("policy", ["baseline", "ttl", "offload"])
def test_a_dag_of_agents_runs_in_dependency_order_with_the_same_outputs(lm, policy):
    clock = Clock()
    e = engine(lm, policy=policy, clock=clock)
    handles = e.submit_all(dag())
    while e.busy:
        if not e.step():
            clock.now += 0.5
    plan, w0, w1, red = (h.result().outputs for h in handles)
    calls = {h.id: h.agent.calls for h in handles}
    # a worker starts after the plan; the reducer after both workers' answers
    assert all(c[0].arrival >= calls["planner"][0].done_s for c in (calls["w0"], calls["w1"]))
    assert calls["reduce"][0].arrival >= max(calls["w0"][-1].done_s, calls["w1"][-1].done_s)
    # each joins what it waited for, in its `after` order: the same tokens as a solo run
    solo = engine(lm)
    assert w0[0] == solo.generate([solo.encode(PROMPTS[1]) + plan[0]], 2, stop=False)[0]
    want = solo.generate([solo.encode("so :") + w1[1] + w0[1]], 4, stop=False)[0]
    assert red[0] == want
    assert not e.agents and not e.nodes
    e.manager.check_invariants()


def test_a_dag_with_a_cycle_or_an_unknown_step_is_refused(lm):
    from streamrt.errors import InputError

    e = engine(lm)
    a = Program("a", [LLM(2, id="x", after=("b/y",))], id="a")
    b = Program("b", [LLM(2, id="y", after=("a/x",))], id="b")
    with pytest.raises(InputError, match="cycle"):
        e.submit_all([a, b])
    with pytest.raises(InputError, match="names no step"):
        e.submit(Program("c", [LLM(2, after=("a/nope",))], id="c"))
    assert not e.agents and not e.busy


def test_reserve_ratio_follows_critical_use_between_floor_and_ceiling():
    from streamrt.agents.reserve import SpatialReserve

    r = SpatialReserve(floor=0.05, ceiling=0.3, weight=0.5)
    assert r.ratio == 0.05 and r.room(False, 10, 0, 100) == 5 and r.room(True, 10, 0, 100) == 10
    for _ in range(20):
        r.observe(50, 100)  # critical agents hold half the device
    assert r.ratio == 0.3
    assert r.room(False, 40, 10, 100) == 20  # the reserve still lacks 30 - 10 blocks
    for _ in range(20):
        r.observe(0, 100)
    assert r.ratio == pytest.approx(0.05, abs=1e-3)


@pytest.mark.parametrize("policy", ["baseline", "offload"])
def test_reserve_admits_a_critical_agent_while_others_fill_the_device(lm, policy):
    """Fillers arrive first and would take every block; a planner that another agent
    waits for arrives next. With the reserve, one filler waits and the planner runs at
    once; without it, the planner waits for a filler to end. Outputs do not change."""
    from streamrt.agents.engine import lm_spec
    from streamrt.agents.reserve import SpatialReserve

    model, tok = lm
    spec = lm_spec(model, 4)
    fill = -(-(len(engine(lm).encode(PROMPTS[2])) + 12) // 4)
    firsts, outs = {}, {}
    for extra in ("", "+reserve"):
        clock = Clock()
        mgr = CacheManager(
            device_bytes=spec.block_bytes * 3 * fill, host_bytes=spec.block_bytes * 64
        )
        e = AgentEngine(model, tok, mgr, tokens_per_block=4, policy=policy + extra, clock=clock)
        if e.reserve is not None:
            e.reserve = SpatialReserve(floor=0.25, ceiling=0.3)
        fillers = [e.submit(Program(PROMPTS[2], [LLM(12, stop=False)])) for _ in range(3)]
        e.step()
        plan = Program(PROMPTS[0], [LLM(2, stop=False, id="plan")], id="planner")
        worker = Program(PROMPTS[1], [LLM(2, stop=False, after=("planner/plan",))], id="w")
        handles = e.submit_all([plan, worker])
        while e.busy:
            e.step()
            clock.now += 1
        firsts[extra] = handles[0].agent.calls[0].first_token_s
        outs[extra] = [h.result().outputs for h in [*fillers, *handles]]
        assert e.counters["preempted"] == 0
        mgr.check_invariants()
    assert outs[""] == outs["+reserve"]
    assert firsts["+reserve"] <= 2 < firsts[""]


def test_a_call_whose_kv_stayed_on_the_device_passes_a_call_that_waits_for_room(lm):
    """Two programs come back from their tools in the same step, while a long call holds
    most of the device: the older one's KV went to the host and does not fit back; the
    newer one's was pinned and never left. The pinned one runs at once (its memory is
    held anyway; it needs only its growth), the other after the long call ends. Outputs
    are those of the same programs run one by one."""
    from streamrt.agents.engine import lm_spec

    model, tok = lm
    spec = lm_spec(model, 4)
    probe = engine(lm)
    result = "the circle was red ."

    def blocks(*parts, extra=0):
        return -(-(sum(len(probe.encode(p)) for p in parts) + extra) // 4)

    def prog(prompt, tool, pid):
        return Program(
            prompt, [LLM(2, stop=False), Tool(tool, 1.0, result), LLM(2, stop=False)], id=pid
        )

    long_call = Program(PROMPTS[2], [LLM(30, stop=False)], id="long")
    k2_now = blocks(PROMPTS[0], extra=2)
    k2_growth = blocks(PROMPTS[0], result, extra=4) - k2_now
    device = blocks(PROMPTS[2], extra=30) + k2_now + k2_growth + 1
    assert blocks(PROMPTS[1], result, extra=4) > k2_growth + 1  # the older one cannot fit
    clock = Clock()
    mgr = CacheManager(device_bytes=spec.block_bytes * device, host_bytes=spec.block_bytes * 64)
    e = AgentEngine(model, tok, mgr, tokens_per_block=4, policy="offload", clock=clock)
    e.kv.queue_delay_s, e.kv.move_bytes_per_s = 5.0, 1e12
    for _ in range(3):  # learned: "fast" returns within its pin, "slow" is worth offloading
        e.kv.durations.observe("fast", 1.5)
        e.kv.durations.observe("slow", 50.0)
    older, newer = e.submit_all([prog(PROMPTS[1], "slow", "k1"), prog(PROMPTS[0], "fast", "k2")])
    while older.agent.calls[0].done_s is None or newer.agent.calls[0].done_s is None:
        e.step()
    assert {a: c.action for a, c in e.kv.calls.items()} == {"k1": "offload", "k2": "pin"}
    long_h = e.submit(long_call)
    while e.busy:
        e.step()
        clock.now += 0.1
    long_end = long_h.agent.calls[0].done_s
    assert newer.agent.calls[1].first_token_s < long_end <= older.agent.calls[1].first_token_s
    assert e.counters["preempted"] == 0
    mgr.check_invariants()
    solo = engine(lm, policy="baseline")
    for h, p in ((older, prog(PROMPTS[1], "slow", "k1")), (newer, prog(PROMPTS[0], "fast", "k2"))):
        assert h.result().outputs == solo.submit(p).result().outputs
    assert long_h.result().outputs == solo.submit(long_call).result().outputs


def test_kept_programs_back_from_the_host_are_admitted_together_when_their_blocks_fit(lm):
    """Two programs whose KV went to the host return in the same step, and the device
    has exactly the blocks both need to the end of their calls: both join the batch at
    once (a fetch during admission must not count the fetched blocks twice)."""
    from streamrt.agents.engine import lm_spec

    model, tok = lm
    spec = lm_spec(model, 4)
    probe = engine(lm)
    result = "the circle was red ."

    def total(prompt):
        return -(-(len(probe.encode(prompt)) + 2 + len(probe.encode(result)) + 2) // 4)

    programs = [
        Program(p, [LLM(2, stop=False), Tool("slow", 1.0, result), LLM(2, stop=False)], id=i)
        for i, p in (("a", PROMPTS[0]), ("b", PROMPTS[1]))
    ]
    device = total(PROMPTS[0]) + total(PROMPTS[1])
    clock = Clock()
    mgr = CacheManager(device_bytes=spec.block_bytes * device, host_bytes=spec.block_bytes * 64)
    e = AgentEngine(model, tok, mgr, tokens_per_block=4, policy="offload", clock=clock)
    e.kv.move_bytes_per_s = 1e12
    for _ in range(3):
        e.kv.durations.observe("slow", 50.0)  # not worth a pin: offloaded
    handles = e.submit_all(programs)
    while len(e.kv.calls) < 2:
        e.step()
    for call in e.kv.calls.values():
        assert call.action == "offload"
        call.upload_at = float("inf")  # no predictive upload: both come back at admission
    assert all(s.counts["device"] == 0 for s in e.kv.agents.values())
    clock.now = 1.0
    e.step()
    assert sorted(c.agent.id for c in e.running) == ["a", "b"] and not e.waiting
    while e.busy:
        e.step()
        clock.now += 0.1
    assert e.counters["preempted"] == 0
    solo = engine(lm, policy="baseline")
    for h, p in zip(handles, programs):
        assert h.result().outputs == solo.submit(p).result().outputs
    mgr.check_invariants()


def test_a_predictive_upload_does_not_take_the_room_a_waiting_call_needs(lm):
    """An offloaded program's upload falls due in the step a new call arrives, and the
    device has room for one of them: the call is admitted, the upload waits (it is fetched
    when its program runs again)."""
    from streamrt.agents.engine import lm_spec

    model, tok = lm
    spec = lm_spec(model, 4)
    probe = engine(lm)

    def blocks(prompt, extra):
        return -(-(len(probe.encode(prompt)) + extra) // 4)

    kept = Program(
        PROMPTS[0], [LLM(2, stop=False), Tool("slow", 1.0, "red ."), LLM(2, stop=False)], id="k"
    )
    long_call = Program(PROMPTS[2], [LLM(30, stop=False)], id="long")
    new = Program(PROMPTS[1], [LLM(2, stop=False)], id="new")
    k_blocks = blocks(PROMPTS[0], 2)
    device = blocks(PROMPTS[2], 30) + blocks(PROMPTS[1], 2) + k_blocks - 1
    clock = Clock()
    mgr = CacheManager(device_bytes=spec.block_bytes * device, host_bytes=spec.block_bytes * 64)
    e = AgentEngine(model, tok, mgr, tokens_per_block=4, policy="offload", clock=clock)
    e.kv.move_bytes_per_s = 1e12
    for _ in range(3):
        e.kv.durations.observe("slow", 50.0)
    e.submit_all([kept, long_call])
    while "k" not in e.kv.calls:
        e.step()
    assert e.kv.calls["k"].action == "offload" and e.kv.agents["k"].counts["device"] == 0
    clock.now = 0.5
    e.kv.calls["k"].upload_at = 0.5  # due now
    handle = e.submit(new)
    e.step()
    assert "new" in [c.agent.id for c in e.running]
    assert e.kv.agents["k"].counts["device"] == 0 and not e.kv.calls["k"].uploaded
    while e.busy:
        e.step()
        clock.now += 0.1
    assert handle.result().outputs == engine(lm).submit(new).result().outputs
    mgr.check_invariants()
