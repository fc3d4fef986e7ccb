"""`streamrt bench agents`: its workload generator, its GPU-scale simulation (the engine's
own scheduling and `AgentKV` decisions on simulated time) and a tiny CLI run."""

from __future__ import annotations

import itertools
import json
import math

import pytest

from streamrt.agents import workload
from streamrt.agents.sim import CostModel, SimConfig, simulate
from streamrt.agents.workload import SHAPES, KVSampler, Trace, make_trace
from streamrt.apps.cli import main
from streamrt.errors import InputError


def test_workload_is_deterministic_for_a_seed_and_round_trips_through_json():
    a, b = make_trace("tool-heavy", 30, seed=3), make_trace("tool-heavy", 30, seed=3)
    assert a == b
    assert make_trace("tool-heavy", 30, seed=4) != a
    again = Trace.from_json(a.to_json())
    assert again == a
    for spec, other in zip(a.programs, again.programs):
        pa, pb = a.program(spec), again.program(other)
        assert pa.prompt == pb.prompt
        assert [vars(s) for s in pa.steps] == [vars(s) for s in pb.steps]
    with pytest.raises(InputError):
        Trace.from_json('{"programs": []}')


def test_tool_heavy_shape_shared_prefix_many_turns_fast_tools_slow_tail():
    trace = make_trace("tool-heavy", 60, seed=0)
    system = trace.tokens("system", trace.system_tokens)
    for spec in trace.programs:
        program = trace.program(spec)
        assert program.prompt[: len(system)] == system  # one system prompt for all
        kinds = ["llm" if "llm" in s else "tool" for s in spec.steps]
        assert kinds[0] == kinds[-1] == "llm"
        assert all(x != y for x, y in itertools.pairwise(kinds))  # LLM and tool calls alternate
    s = trace.summary()
    assert s["llm_calls"] / s["programs"] >= SHAPES["tool-heavy"].turns[0]
    assert s["tool_share_under_1s"] > 0.6  # most tools return within a second
    assert s["tool_p95_s"] > 5.0  # a long tail of slow ones
    # scaled for a CPU run: counts and seconds shrink, contexts stay under the cap
    small = make_trace(
        "tool-heavy", 10, vocab_size=127, token_scale=1 / 16, time_scale=0.02, max_context=600
    )
    assert all(small.context_tokens(p) <= 600 for p in small.programs)
    assert max(t for p in small.programs for t in small.prompt(p)) < 127


def _fast_trace():
    return make_trace("fast-tools", 16, seed=1, token_scale=0.25)


# a device budget that holds a few programs' contexts, not all: policies matter
SMALL_GPU = SimConfig(device_kv_bytes=2**30, max_batch=16)


def test_simulation_is_deterministic():
    trace = _fast_trace()
    a, b = simulate(trace, "ttl", SMALL_GPU), simulate(trace, "ttl", SMALL_GPU)
    assert a == b
    assert a["finished"] == a["programs"] == 16


def test_keeping_kv_never_loses_to_baseline_when_tools_are_fast_and_prefixes_long():
    trace = _fast_trace()
    runs = {p: simulate(trace, p, SMALL_GPU) for p in ("baseline", "ttl", "offload")}
    base = runs["baseline"]
    assert base["recomputed_tokens"] > 0  # freed at each tool call, then lost to others
    for policy in ("ttl", "offload"):
        r = runs[policy]
        assert r["finished"] == r["programs"]
        assert r["resumes_kept"] > 0
        # what the mechanism guarantees: KV kept across a fast tool is not computed again
        assert r["recomputed_tokens"] < base["recomputed_tokens"]
        assert r["prefill_tokens"] < base["prefill_tokens"]
        # not a guarantee to the microsecond: offloads and uploads take link time
        assert r["jct_mean_s"] <= 1.02 * base["jct_mean_s"]


def test_offload_wins_where_memory_binds_with_no_preemption_or_recompute():
    """A memory-bound deployment (device KV holds 9% of the programs' contexts): the
    baseline's prefix cache is evicted during tool calls and contexts are prefilled
    again; offload keeps every context on the host and loses nothing. Admission reserves
    the running calls' growth, so no policy preempts."""
    trace = make_trace("tool-heavy", 40, seed=0, token_scale=0.25, time_scale=0.05)
    config = SimConfig(device_kv_bytes=2**30, max_batch=32)
    runs = {p: simulate(trace, p, config) for p in ("baseline", "ttl", "offload")}
    base, off = runs["baseline"], runs["offload"]
    assert all(r["preempted"] == 0 and r["finished"] == 40 for r in runs.values())
    assert base["recomputed_tokens"] > 100_000 and off["recomputed_tokens"] == 0
    assert off["jct_mean_s"] <= 0.7 * base["jct_mean_s"]
    assert runs["ttl"]["jct_mean_s"] < base["jct_mean_s"]


def test_cost_model_matches_its_anchors():
    cost = CostModel()
    assert 100 < 1 / cost.step_s([(4096, 1)]) < 130  # ~115 tokens/s at batch 1
    assert 15_000 < cost.prefill_tokens_per_s() < 30_000


def test_bench_agents_cli_tiny_run_writes_json_and_replays_its_trace(tmp_path):
    out, trace = tmp_path / "a.json", tmp_path / "trace.json"
    args = ["bench", "agents", "--programs", "3", "--sim-programs", "3", "--time-scale", "0.005"]
    args += ["--trace", str(trace), "--plot", "", "--json", str(out)]
    assert main(args) == 0
    result = json.loads(out.read_text())
    for part in ("real", "sim"):
        rows = result[part]["results"]
        assert set(rows) == {"baseline", "ttl", "offload"}
        assert all(r["finished"] == r["programs"] == 3 for r in rows.values())
        assert all(r["jct_mean_s"] > 0 and 0 <= r["kv_util"] <= 1 for r in rows.values())
        assert all(0 <= r["kv_active"] <= 1 for r in rows.values())
    assert {a["measure"] for a in result["aims"]} >= {"real: ttl mean JCT / baseline"}
    written = json.loads(trace.read_text())
    # replayed, not regenerated; with the agents on a Runtime beside two live streams
    replay = [*args[:2], "--trace", str(trace), "--policies", "ttl", "--sim-programs", "0"]
    replay += ["--shared-runtime", "--plot", "", "--json", str(out)]
    assert main(replay) == 0
    again = json.loads(out.read_text())
    assert again["real"]["trace"] == Trace.from_json(json.dumps(written["real"])).summary()
    assert "sim" not in again
    shared = again["shared_runtime"]["ttl"]
    assert shared["agents_jct_mean_s"] > 0 and len(shared["stream_slo"]) == 2


def test_a_trace_replays_a_dag_of_agents_from_json():
    trace = make_trace("tool-heavy", 3, seed=2, token_scale=0.01, time_scale=0.01)
    a, b, c = trace.programs
    a.steps[0]["id"] = "plan"
    b.steps[0]["after"] = [f"{a.id}/plan"]
    c.steps[-1]["after"] = [f"{a.id}/plan", f"{b.id}/{b.steps[-1].setdefault('id', 'end')}"]
    again = Trace.from_json(trace.to_json())
    programs = [again.program(p) for p in again.programs]
    assert programs[1].steps[0].after == (f"{a.id}/plan",)
    assert programs[2].steps[-1].after == (f"{a.id}/plan", f"{b.id}/end")
    # ...and they run as a DAG on the simulated engine: c ends after b's last step
    from streamrt.agents.sim import SimClock, SimEngine

    clock = SimClock()
    engine = SimEngine(SimConfig(device_kv_bytes=2**30), "offload", clock, again.vocab_size)
    handles = engine.submit_all(programs)
    while engine.busy:
        if not engine.step():
            clock.advance_to(min(engine.next_event(), clock.now + 0.01))
    ends = {h.id: h.agent.calls[-1].done_s for h in handles}
    assert handles[2].agent.calls[-1].arrival >= ends[b.id]
    assert not engine.nodes


def test_kv_sampler_counts_contended_shares_only_while_calls_wait():
    class Pool:
        num_blocks, num_free = 10, 10

    class Manager:
        def __init__(self):
            self.pools = {"device": Pool()}

    class Block:
        def __init__(self, i):
            self.block_id = i

    class Seq:
        def __init__(self, ids):
            self.ids = ids

        def blocks(self, tier):
            return [Block(i) for i in self.ids]

    queued, running = [0], [Seq([0, 1])]
    sampler = KVSampler(Manager(), every_s=0.0, running=lambda: running, waiting=lambda: queued[0])
    Pool.num_free = 6  # 4 held, 2 of them read by the batch
    sampler.add(3.0)  # nobody waits: not contended
    assert sampler.contended_mean("held") is None
    queued[0] = 2
    Pool.num_free = 2  # 8 held while calls wait, still 2 active
    sampler.add(1.0)
    Pool.num_free = 0
    running[0] = Seq(list(range(5)))
    sampler.add(1.0)
    assert sampler.contended["s"] == 2.0
    assert sampler.contended_mean("held") == pytest.approx((0.8 + 1.0) / 2)
    assert sampler.contended_mean("active") == pytest.approx((0.2 + 0.5) / 2)
    assert sampler.mean == pytest.approx((0.4 * 3 + 0.8 + 1.0) / 5)


def test_multi_agent_workload_is_teams_of_a_lead_and_workers_submitted_together():
    trace = make_trace("multi-agent", 10, seed=3, token_scale=0.01, time_scale=0.01)
    again = Trace.from_json(trace.to_json())
    assert [p.team for p in again.programs] == ["a0"] * 4 + ["a4"] * 4 + ["a8"] * 2
    lead, *workers = again.programs[:4]
    assert lead.steps[0]["id"] == "plan"
    assert lead.steps[-1]["after"] == [f"{w.id}/end" for w in workers]
    for w in workers:
        assert w.arrival_s == lead.arrival_s
        assert w.steps[0]["after"] == ["a0/plan"] and w.steps[-1]["id"] == "end"
    pending = sorted(again.programs, key=lambda s: s.arrival_s)
    groups = workload.due(pending, math.inf)
    assert sorted(len(g) for g in groups) == [2, 4, 4] and not pending
    # run on the simulated engine: every lead sums up after its workers' last calls
    from streamrt.agents.sim import SimClock, SimEngine

    clock = SimClock()
    engine = SimEngine(SimConfig(device_kv_bytes=2**30), "offload", clock, again.vocab_size)
    handles = [h for g in groups for h in engine.submit_all([again.program(s) for s in g])]
    while engine.busy:
        if not engine.step():
            clock.advance_to(min(engine.next_event(), clock.now + 0.01))
    ended = {h.id: h.agent.calls[-1].done_s for h in handles}
    for h in handles:
        team = [s for s in again.programs if s.team == h.id and s.id != h.id]
        assert all(h.agent.calls[-1].arrival >= ended[s.id] for s in team)
    result = simulate(again, "ttl", SMALL_GPU)
    assert result["finished"] == result["programs"] == 10
