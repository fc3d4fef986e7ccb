"""Agent workloads: programs of LLM and tool calls, per-tool duration distributions and
bursty arrivals, replayable from JSON (`streamrt bench agents`).

    trace = make_trace("tool-heavy", programs=200, seed=0)
    Path("t.json").write_text(trace.to_json())      # replay: Trace.from_json(text)
    for spec in trace.programs:
        engine.submit(trace.program(spec))           # at spec.arrival_s

Shapes (`SHAPES`) are given at the scale of a real deployment (an 8B model on a GPU,
tools taking wall-clock seconds); `token_scale` and `time_scale` shrink token counts and
durations for a tiny model on a CPU. A trace records its counts, durations and one seed;
token ids are drawn from that seed per program and step (`Trace.tokens`), so the JSON
stays small and replays the same ids.

"tool-heavy", the default, follows the published shape of agent traces (SWE-bench with
SWE-agent / OpenHands, BFCL multi-turn): one long system prompt shared by every program
(tool schemas and instructions, a few thousand tokens), a task description, then many
turns of a short LLM output (a thought and a tool call) and a tool result (file views, test
logs) joining the context. Most tool calls (edits, searches, short shell commands) return
within a second; test runs and builds make a long tail of tens of seconds.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import random
from dataclasses import asdict, dataclass, field

from streamrt.agents.engine import LLM, Program, Tool
from streamrt.errors import InputError

FIRST_TOKEN = 3
"""Token ids start here (0-2: pad, bos, eos in the tiny models' vocabularies)."""


@dataclass(frozen=True)
class ToolProfile:
    """One tool: how often agents call it, how long it runs, how much it returns."""

    name: str
    weight: float
    """Share of the tool calls (normalised over the shape's tools)."""
    median_s: float
    """Median duration (lognormal)."""
    sigma: float
    """Log-space spread of the duration: 0.5 tight, 1.0 a heavy tail."""
    result_tokens: tuple[int, int]
    """Tokens of the result joining the context (uniform in the range)."""


@dataclass(frozen=True)
class Shape:
    """What a workload's programs look like (token counts and seconds at full scale)."""

    system_tokens: int
    """The system prompt: the same tokens at the start of every program."""
    task_tokens: tuple[int, int]
    """The program's own task description after it (uniform in the range)."""
    turns: tuple[int, int]
    """LLM calls per program (uniform); a tool call sits between two of them."""
    output_tokens: tuple[int, int]
    """Tokens generated per LLM call (uniform; generated to the end, no EOS stop)."""
    tools: tuple[ToolProfile, ...]
    rate_per_s: float
    """Mean program arrival rate."""
    burst: float
    """Mean programs per burst (geometric); 1: Poisson arrivals."""
    burst_window_s: float = 1.0
    """A burst's programs arrive within this window."""
    team: int = 1
    """Programs per team, arriving together as a DAG of agents (1: independent programs):
    the first (the lead) names its first LLM call "plan"; every other member starts once
    the plan has ended (its output joins their context) and names its last call "end";
    the lead's last call waits for every member's "end" (their outputs join its context),
    as a planner, its workers and the planner's summary do in multi-agent frameworks."""


SWE_TOOLS = (
    ToolProfile("edit", 0.35, 0.05, 0.6, (80, 600)),
    ToolProfile("search", 0.25, 0.3, 0.7, (40, 400)),
    ToolProfile("bash", 0.25, 0.6, 1.0, (40, 500)),
    ToolProfile("run_tests", 0.10, 6.0, 0.8, (200, 1200)),
    ToolProfile("build", 0.05, 30.0, 0.6, (100, 400)),
)

SHAPES: dict[str, Shape] = {
    "tool-heavy": Shape(
        system_tokens=3000,
        task_tokens=(300, 1200),
        turns=(6, 24),
        output_tokens=(20, 120),
        tools=SWE_TOOLS,
        rate_per_s=2.0,
        burst=8.0,
    ),
    # Every tool back within ~0.2 s, a long shared prefix: keeping KV can only help.
    "fast-tools": Shape(
        system_tokens=4000,
        task_tokens=(200, 600),
        turns=(4, 12),
        output_tokens=(20, 80),
        tools=(
            ToolProfile("edit", 0.6, 0.05, 0.3, (80, 400)),
            ToolProfile("search", 0.4, 0.1, 0.3, (40, 300)),
        ),
        rate_per_s=4.0,
        burst=8.0,
    ),
}
SHAPES["multi-agent"] = dataclasses.replace(SHAPES["tool-heavy"], team=4)
"""tool-heavy's programs in teams of a lead and 3 workers (a DAG)."""


@dataclass
class ProgramSpec:
    """One agent program of a trace: arrival, priority and its steps.

    `steps` alternate `{"llm": tokens}` and `{"tool": name, "duration_s": s,
    "result": tokens}`, first and last an LLM call. A step may also name itself
    (`"id"`) and wait for steps of other programs (`"after": ["program_id/step_id"]`):
    programs of a trace then form a DAG of agents (replay them with `submit_all`)."""

    id: str
    arrival_s: float
    task_tokens: int
    steps: list[dict]
    priority: int = 0
    team: str | None = None
    """Programs of one team reference each other's steps: they are submitted together
    (`due`)."""


@dataclass
class Trace:
    """A replayable workload: programs with arrival times (seconds from the start)."""

    shape: str
    seed: int
    vocab_size: int
    system_tokens: int
    programs: list[ProgramSpec]
    token_scale: float = 1.0
    time_scale: float = 1.0
    version: int = 1
    meta: dict = field(default_factory=dict)

    # ------------------------------------------------------------------ token ids

    def tokens(self, key: str, n: int) -> list[int]:
        """`n` token ids drawn from the trace's seed and `key` (the same on every replay)."""
        return list(_tokens(f"{self.seed}/{key}", n, self.vocab_size))

    def prompt(self, spec: ProgramSpec) -> list[int]:
        """The shared system prompt, then the program's task."""
        return self.tokens("system", self.system_tokens) + self.tokens(
            f"{spec.id}/task", spec.task_tokens
        )

    def program(self, spec: ProgramSpec) -> Program:
        """The engine's `Program` of one spec (every LLM call runs to its `max_tokens`)."""
        steps: list[LLM | Tool] = []
        for i, step in enumerate(spec.steps):
            node = {"id": step.get("id"), "after": tuple(step.get("after", ()))}
            if "llm" in step:
                steps.append(LLM(step["llm"], stop=False, **node))
            else:
                result = self.tokens(f"{spec.id}/{i}", step["result"])
                steps.append(Tool(step["tool"], step["duration_s"], result, **node))
        return Program(self.prompt(spec), steps, spec.priority, spec.id)

    # ------------------------------------------------------------------ summary, JSON

    def summary(self) -> dict:
        llm = [s["llm"] for p in self.programs for s in p.steps if "llm" in s]
        tools = [s["duration_s"] for p in self.programs for s in p.steps if "tool" in s]
        tools.sort()
        return {
            "programs": len(self.programs),
            "llm_calls": len(llm),
            "tool_calls": len(tools),
            "output_tokens": sum(llm),
            "tool_p50_s": tools[len(tools) // 2] if tools else 0.0,
            "tool_p95_s": tools[min(len(tools) - 1, int(0.95 * len(tools)))] if tools else 0.0,
            "tool_share_under_1s": (
                sum(t <= self.time_scale for t in tools) / len(tools) if tools else 0.0
            ),
            "last_arrival_s": max((p.arrival_s for p in self.programs), default=0.0),
            "max_context_tokens": max((self.context_tokens(p) for p in self.programs), default=0),
        }

    def context_tokens(self, spec: ProgramSpec) -> int:
        """Tokens of the program's context at its end."""
        return (
            self.system_tokens
            + spec.task_tokens
            + sum(s.get("llm", 0) + s.get("result", 0) for s in spec.steps)
        )

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> Trace:
        raw = json.loads(text)
        if not isinstance(raw, dict) or raw.get("version") != 1 or "programs" not in raw:
            raise InputError("not an agent trace (version 1 JSON with 'programs')")
        raw["programs"] = [ProgramSpec(**p) for p in raw["programs"]]
        return cls(**raw)


@functools.lru_cache(maxsize=1 << 16)  # the system prompt once; each replay draws once
def _tokens(key: str, n: int, vocab_size: int) -> tuple[int, ...]:
    return tuple(random.Random(key).choices(range(FIRST_TOKEN, vocab_size), k=n))


def make_trace(
    shape: str | Shape = "tool-heavy",
    programs: int = 200,
    seed: int = 0,
    *,
    vocab_size: int = 32000,
    token_scale: float = 1.0,
    time_scale: float = 1.0,
    max_context: int | None = None,
) -> Trace:
    """A trace of `programs` programs of `shape` (a `SHAPES` name or a `Shape`).

    `token_scale` multiplies every token count, `time_scale` every duration and arrival
    gap; `max_context` ends a program's turns before its context would exceed it."""
    name = shape if isinstance(shape, str) else "custom"
    if isinstance(shape, str):
        if shape not in SHAPES:
            raise InputError(f"unknown workload {shape!r}; workloads: {', '.join(SHAPES)}")
        shape = SHAPES[shape]
    if programs < 1 or token_scale <= 0 or time_scale <= 0:
        raise InputError("programs, token_scale and time_scale must be positive")
    rng = random.Random(seed)

    def scaled(lo_hi: tuple[int, int]) -> int:
        return max(1, round(rng.randint(*lo_hi) * token_scale))

    system = max(1, round(shape.system_tokens * token_scale))
    weights = [t.weight for t in shape.tools]
    arrivals = _bursty_arrivals(rng, programs, shape)
    specs = []
    for i, arrival in enumerate(arrivals):
        task = scaled(shape.task_tokens)
        context = system + task
        steps: list[dict] = []
        for _ in range(rng.randint(*shape.turns) - 1):
            out = scaled(shape.output_tokens)
            tool = rng.choices(shape.tools, weights)[0]
            duration = rng.lognormvariate(math.log(tool.median_s), tool.sigma)
            result = scaled(tool.result_tokens)
            if max_context is not None and context + out > max_context and steps:
                break
            steps.append({"llm": out})
            context += out
            nxt = scaled(shape.output_tokens)
            if max_context is not None and context + result + nxt > max_context:
                break
            steps.append(
                {"tool": tool.name, "duration_s": round(duration * time_scale, 6), "result": result}
            )
            context += result
        if not steps or "tool" in steps[-1]:
            steps.append({"llm": scaled(shape.output_tokens)})
        specs.append(ProgramSpec(f"a{i}", round(arrival * time_scale, 6), task, steps))
    if shape.team > 1:
        _make_teams(specs, shape.team)
    return Trace(
        name,
        seed,
        vocab_size,
        system,
        specs,
        token_scale,
        time_scale,
        meta=json.loads(json.dumps({"shape": asdict(shape)})),  # as it reads back
    )


def _make_teams(specs: list[ProgramSpec], size: int) -> None:
    """Consecutive programs form teams of `size` (`Shape.team`); members arrive with the lead."""
    for start in range(0, len(specs), size):
        lead, *members = specs[start : start + size]
        lead.team = lead.id
        if not members:
            continue
        lead.steps[0]["id"] = "plan"
        for m in members:
            m.team, m.arrival_s = lead.id, lead.arrival_s
            m.steps[0]["after"] = [f"{lead.id}/plan"]
            m.steps[-1]["id"] = "end"
        if len(lead.steps) == 1:  # a lone call plans; a second one sums up
            lead.steps.append({"llm": lead.steps[0]["llm"]})
        lead.steps[-1]["after"] = [f"{m.id}/end" for m in members]


def due(pending: list[ProgramSpec], now: float) -> list[list[ProgramSpec]]:
    """Pop the specs of `pending` (sorted by arrival) that have arrived by `now`, grouped
    into what is submitted together (`AgentEngine.submit_all`): a team, or one program."""
    groups: dict[str, list[ProgramSpec]] = {}
    while pending and pending[0].arrival_s <= now:
        spec = pending.pop(0)
        groups.setdefault(spec.team or spec.id, []).append(spec)
    return list(groups.values())


def _bursty_arrivals(rng: random.Random, n: int, shape: Shape) -> list[float]:
    """Bursts at Poisson times (rate / burst); geometric burst sizes of mean `burst`."""
    times, t = [], 0.0
    p = 1.0 / max(1.0, shape.burst)
    while len(times) < n:
        size = 1
        while rng.random() > p:
            size += 1
        times += [t + rng.uniform(0, shape.burst_window_s) for _ in range(size)]
        t += rng.expovariate(shape.rate_per_s / max(1.0, shape.burst))
    return sorted(times[:n])


# ---------------------------------------------------------------------- measuring a replay


class KVSampler:
    """Device KV utilisation over time, time-weighted, plus a thinned timeline for plots.

    held    share of the device pool's blocks held by any KV (not free, not merely cached):
            running calls, pinned programs, uploads back before a tool returns
    active  TokenCake's "effective" utilisation: share held by the calls in the batch, the
            KV a forward reads (idle KV of programs stalled on tools does not count);
            sampled every `every_s` (a scan of the running calls' blocks) when `running`
            (a callable giving the running calls' sequences) is given
    contended  both, counted only while calls wait for a batch slot or memory (`waiting`,
            a callable giving how many): how much of the pool serves running calls when
            someone is kept out. Over the whole replay a policy that clears the queue
            sooner spends more of it idle, so only the contended share compares policies
            that run the same trace at different loads.
    """

    def __init__(self, manager, every_s: float, running=None, waiting=None) -> None:
        self.manager, self.every_s, self.running = manager, every_s, running
        self.waiting = waiting
        self.weighted = self.total = self.t = 0.0
        self.active_weighted = self.active_total = 0.0
        self.contended = {"held": 0.0, "active": 0.0, "s": 0.0}
        self.timeline: list[tuple[float, float]] = []

    def held(self) -> float:
        pool = self.manager.pools.get("device")
        return 0.0 if pool is None else 1.0 - pool.num_free / pool.num_blocks

    def active(self) -> float:
        pool = self.manager.pools.get("device")
        if pool is None or self.running is None:
            return 0.0
        blocks = {b.block_id for seq in self.running() for b in seq.blocks("device")}
        return len(blocks) / pool.num_blocks

    def add(self, dt: float) -> None:
        """The shares now held for the `dt` seconds that just passed."""
        share = self.held()
        self.weighted += share * dt
        self.total += dt
        self.t += dt
        if self.waiting is not None and self.waiting() > 0:
            self.contended["held"] += share * dt
            self.contended["active"] += self.active() * dt
            self.contended["s"] += dt
        if not self.timeline or self.t - self.timeline[-1][0] >= self.every_s:
            since = self.t - self.timeline[-1][0] if self.timeline else self.t
            self.active_weighted += self.active() * since
            self.active_total += since
            self.timeline.append((round(self.t, 4), round(share, 4)))

    @property
    def mean(self) -> float:
        return self.weighted / self.total if self.total else 0.0

    @property
    def active_mean(self) -> float:
        return self.active_weighted / self.active_total if self.active_total else 0.0

    def contended_mean(self, which: str) -> float | None:
        """Time-weighted `held` or `active` share while calls waited (None: none ever did)."""
        s = self.contended["s"]
        return self.contended[which] / s if s else None


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, max(0, math.ceil(q * len(values)) - 1))]


def summarize(runs: list[tuple[ProgramSpec, object]], t0: float, engine, sampler: KVSampler):
    """Per-policy metrics of a replay: `runs` pairs each spec with its engine `Agent`;
    JCT is measured from the trace's arrival time (`t0 + arrival_s`) to the end of the
    program's last LLM call; TTFT from a call's queueing to its first token."""
    jct = [a.done_s - (t0 + s.arrival_s) for s, a in runs if a.done_s is not None]
    ttft = [
        c.first_token_s - c.arrival for _, a in runs for c in a.calls if c.first_token_s is not None
    ]
    c = engine.counters
    return {
        "programs": len(runs),
        "finished": len(jct),
        "jct_mean_s": sum(jct) / len(jct) if jct else float("nan"),
        "jct_p95_s": _pct(jct, 0.95),
        "ttft_mean_s": sum(ttft) / len(ttft) if ttft else float("nan"),
        "ttft_p95_s": _pct(ttft, 0.95),
        "kv_util": sampler.mean,
        "kv_active": sampler.active_mean,
        "kv_held_contended": sampler.contended_mean("held"),
        "kv_active_contended": sampler.contended_mean("active"),
        "contended_s": sampler.contended["s"],
        "preempted": c["preempted"],
        "recomputed_tokens": c["recomputed_tokens"],
        "prefill_tokens": c["prefill_tokens"],
        "shared_tokens": c["shared_tokens"],
        "resumes_kept": c["resume_pin"] + c["resume_offload"],
        "resumes_freed": c["resume_free"],
        "resumes_prefetched": c["resume_prefetched"],
        "failed_calls": c["failed"],
        "jct_s": sorted(jct),
        "kv_timeline": sampler.timeline,
    }
