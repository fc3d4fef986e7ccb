"""SIMULATION of the agent engine at GPU scale: simulated time, no model runs.

`SimEngine` is `AgentEngine` with one method replaced, `_run_model`: instead of a forward
it advances a simulated clock by the cost model's step time and returns placeholder K/V
and tokens. Everything else is the engine's own code on a real `CacheManager`: admission
and its order (FCFS, Continuum's program-level FCFS), chunked prefill, prefix sharing by
block hash, preemption, and the policies' KV decisions (`AgentKV.tool_call`, `tick`,
`relieve_pressure`, `tool_return`: Continuum's TTL, TokenCake's offload and predictive
upload). The manager's pools hold as many blocks as the modelled GPU's KV budget, of a
stand-in spec of 4 bytes a token (K and V, one fp16 each) (bookkeeping only); `SimAgentKV` prices the moves at the
modelled link's bandwidth instead of timing the stand-in copies.

Cost model (`CostModel`), Llama-3-8B in bf16 on one H100 SXM:

    KV per token   2 (K,V) x 32 layers x 8 KV heads x 128 dims x 2 bytes = 128 KiB
                   (Llama-3-8B config.json: GQA, 8 KV heads)
    step time      overhead + max(FLOPs / (peak x MFU), bytes / (HBM x efficiency))
        FLOPs      2 x 8.03e9 per token fed + 4 x 32 x 4096 per (query, key) pair
        bytes      16.06e9 weights read once per step + the K/V of every row's context
    H100 SXM       989 TFLOP/s dense bf16, 3.35 TB/s HBM3 (NVIDIA H100 datasheet);
                   MFU 0.4 in prefill and 75% of HBM bandwidth: ~22k prefill tokens/s and
                   ~8.6 ms per decode step at batch 1, 4k context (~115 tokens/s), close to
                   what vLLM reports for Llama-3-8B on an H100
    overhead       2 ms a step (scheduling and launches with CUDA graphs)
    device KV      48 GiB: 80 GB x 0.9 (vLLM's gpu_memory_utilization) - 16 GB weights -
                   ~8 GB activations and graphs; ~393k tokens
    links          PCIe 5.0 x16 50 GB/s per direction (64 GB/s nominal, pinned memory),
                   PCIe 4.0 x16 25 GB/s, NVLink-C2C (GH200) 400 GB/s per direction

Moves: offloads (device -> host) and predictive uploads (host -> device, from `tick`) run
on a copy engine beside the compute, queued on their link; an upload the resume has to
wait for (not prefetched, or still in flight) stalls the engine until it lands, as the
engine's synchronous fetch does. The manager's own evictions under pressure are not
priced (they ride the same copy engine). Pins: the manager times pin deadlines with the
real clock; the simulation runs far faster than simulated time, so they only end when
`AgentKV.tick` ends them in simulated time.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch

from streamrt.agents.engine import AgentEngine, Call
from streamrt.agents.kv import AgentKV, ToolDurations
from streamrt.cache import CacheManager
from streamrt.cache.block import DEVICE, HOST

LINKS = {"pcie5": 50e9, "pcie4": 25e9, "nvlink-c2c": 400e9}
"""Device <-> host bandwidth per direction, bytes/s."""


@dataclass(frozen=True)
class CostModel:
    """Step time of a batch on the modelled GPU (module docstring: sources)."""

    params: float = 8.03e9
    layers: int = 32
    hidden: int = 4096
    kv_bytes_per_token: int = 2 * 32 * 8 * 128 * 2
    peak_flops: float = 989e12
    mfu: float = 0.4
    hbm_bytes_per_s: float = 3.35e12
    hbm_efficiency: float = 0.75
    overhead_s: float = 0.002
    weight_bytes_per_param: int = 2

    def step_s(self, rows: list[tuple[int, int]]) -> float:
        """Seconds of one forward of rows `(past tokens, new tokens)`."""
        tokens = sum(n for _, n in rows)
        pairs = sum(n * (p + (n + 1) / 2) for p, n in rows)
        flops = 2 * self.params * tokens + 4 * self.layers * self.hidden * pairs
        kv = sum(p + n for p, n in rows) * self.kv_bytes_per_token
        weights = self.params * self.weight_bytes_per_param
        compute = flops / (self.peak_flops * self.mfu)
        memory = (weights + kv) / (self.hbm_bytes_per_s * self.hbm_efficiency)
        return self.overhead_s + max(compute, memory)

    def prefill_tokens_per_s(self, chunk: int = 8192) -> float:
        return chunk / self.step_s([(0, chunk)])


class SimClock:
    """Simulated seconds; `listener(dt)` hears of every advance (time-weighted sampling)."""

    def __init__(self) -> None:
        self.now = 0.0
        self.listener: Callable[[float], None] | None = None

    def __call__(self) -> float:
        return self.now

    def advance_to(self, t: float) -> None:
        if t > self.now:
            if self.listener is not None:
                self.listener(t - self.now)
            self.now = t


@dataclass
class SimAgentKV(AgentKV):
    """`AgentKV` with its decisions untouched; a move costs link time, not a timed copy."""

    block_bytes: int = 64 * 2 * 32 * 8 * 128 * 2
    """Modelled bytes of one block (the stand-in blocks are 4 bytes a token)."""
    stalled_s: float = 0.0
    moved_bytes: dict[str, int] = field(default_factory=lambda: {DEVICE: 0, HOST: 0})
    _link_free: dict[str, float] = field(default_factory=lambda: {DEVICE: 0.0, HOST: 0.0})
    _ready_at: dict[str, float] = field(default_factory=dict)
    _sync: bool = False

    def context_bytes(self, agent: str) -> int:
        return len(self.to_move(self._seq(agent), HOST)) * self.block_bytes

    def block_bytes_of(self, seq) -> int:
        return self.block_bytes

    def fetch(self, agent: str) -> float:
        ready = self._ready_at.pop(self._seq(agent).seq_id, 0.0)
        self._stall_until(ready)  # a predictive upload (or the offload) still in flight
        self._sync = True
        try:
            return super().fetch(agent)
        finally:
            self._sync = False

    def _move(self, seq, tier: str) -> None:
        indices = self.to_move(seq, tier)  # together, as AgentKV moves: they protect each other
        if not indices:
            return
        fetch = tier == DEVICE
        transfers = (self.manager.fetch if fetch else self.manager.offload)(seq, indices)
        for t in transfers:
            t.wait()
        nbytes = len(transfers) * self.block_bytes
        if not nbytes:
            return
        self.moved_bytes[tier] += nbytes
        # an upload starts after the same sequence's offload has landed
        start = max(self.clock(), self._link_free[tier], self._ready_at.get(seq.seq_id, 0.0))
        end = start + nbytes / self.move_bytes_per_s
        self._link_free[tier] = end
        self._ready_at[seq.seq_id] = end
        if tier == DEVICE and self._sync:
            self._stall_until(end)

    def _stall_until(self, t: float) -> None:
        now = self.clock()
        if t > now:
            self.stalled_s += t - now
            self.clock.advance_to(t)


class _StandInLM(torch.nn.Module):
    """Stands in for the model: its config sizes the bookkeeping blocks. Never run."""

    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.config = SimpleNamespace(
            num_hidden_layers=1,
            num_attention_heads=1,
            num_key_value_heads=1,
            head_dim=1,
            hidden_size=1,
            vocab_size=vocab_size,
            max_position_embeddings=1 << 20,
            eos_token_id=None,
        )
        self.anchor = torch.nn.Parameter(torch.zeros(1, dtype=torch.float16), requires_grad=False)

    def forward(self, **kwargs):  # pragma: no cover - the simulation never runs the model
        raise RuntimeError("the simulation's stand-in model is never run")


@dataclass(frozen=True)
class SimConfig:
    """The simulated deployment (defaults: module docstring)."""

    cost: CostModel = CostModel()
    device_kv_bytes: float = 48 * 2**30
    host_kv_bytes: float = 256 * 2**30
    link: str = "pcie5"
    max_batch: int = 128
    step_tokens: int = 8192
    tokens_per_block: int = 64
    """TensorRT-LLM's default; vLLM uses 16 (4x the blocks: the manager's scans under
    pressure make a 200-program simulation several times slower)."""

    def blocks(self, nbytes: float) -> int:
        return int(nbytes // (self.cost.kv_bytes_per_token * self.tokens_per_block))


class SimEngine(AgentEngine):
    """`AgentEngine` whose forward is the cost model on a `SimClock` (module docstring)."""

    def __init__(
        self, config: SimConfig, policy: str, clock: SimClock, vocab_size: int = 32000
    ) -> None:
        standin = 4 * config.tokens_per_block  # bytes of a block of _StandInLM's spec
        manager = CacheManager(
            device_bytes=config.blocks(config.device_kv_bytes) * standin,
            host_bytes=config.blocks(config.host_kv_bytes) * standin,
            device="cpu",
        )
        super().__init__(
            _StandInLM(vocab_size),
            None,
            manager,
            policy=policy,
            max_batch=config.max_batch,
            step_tokens=config.step_tokens,
            tokens_per_block=config.tokens_per_block,
            clock=clock,
        )
        assert self.spec.block_bytes == standin
        self.sim_clock, self.config = clock, config
        self.kv = SimAgentKV(
            manager,
            self.consumer,
            clock=clock,
            durations=ToolDurations(),
            prefill_tokens_per_s=config.cost.prefill_tokens_per_s(config.step_tokens),
            move_bytes_per_s=LINKS[config.link],
            block_bytes=config.cost.kv_bytes_per_token * config.tokens_per_block,
        )
        self.busy_s = 0.0

    def _run_model(
        self, rows: list[tuple[Call, int]], pasts: list[int]
    ) -> tuple[torch.Tensor, list[int]]:
        dt = self.config.cost.step_s([(p, n) for p, (_, n) in zip(pasts, rows)])
        self.busy_s += dt
        self.sim_clock.advance_to(self.sim_clock.now + dt)
        N = max(n for _, n in rows)
        new = torch.zeros(len(rows), 2, 1, N, 1, 1, dtype=torch.float16)
        vocab = self.vocab_size - 3
        tokens = [  # deterministic placeholders (every call runs to its max_tokens)
            3 + (zlib.crc32(call.agent.id.encode()) + 7919 * (p + n)) % vocab
            for p, (call, n) in zip(pasts, rows)
        ]
        return new, tokens

    def next_event(self) -> float:
        """Simulated time of the next tool return, predictive upload or pin expiry."""
        times = [a.tool_until for a in self._tool_agents()]
        for call in self.kv.calls.values():
            if call.action == "pin":
                times.append(call.started + call.ttl_s)
            elif call.action == "offload" and not call.uploaded and call.upload_at is not None:
                times.append(call.upload_at)
        return min((t for t in times if math.isfinite(t)), default=math.inf)


def simulate(
    trace, policy: str, config: SimConfig | None = None, max_events: int = 10_000_000
) -> dict:
    """Replay `trace` (a `workload.Trace`) on a `SimEngine` under `policy`: the metrics of
    `workload.summarize`, in simulated seconds, plus the simulation's own counts."""
    from streamrt.agents.workload import KVSampler, due, summarize

    config = config or SimConfig()
    clock = SimClock()
    engine = SimEngine(config, policy, clock, trace.vocab_size)
    sampler = KVSampler(
        engine.manager,
        every_s=1.0,
        running=engine.running_sequences,
        waiting=lambda: len(engine.waiting),
    )
    clock.listener = sampler.add
    pending = sorted(trace.programs, key=lambda s: s.arrival_s)
    runs = []
    for _ in range(max_events):
        for group in due(pending, clock.now):
            handles = engine.submit_all([trace.program(spec) for spec in group])
            runs += [(spec, h.agent) for spec, h in zip(group, handles)]
        if engine.step():
            continue
        if not pending and not engine.busy:
            break
        nxt = min(engine.next_event(), pending[0].arrival_s if pending else math.inf)
        if not math.isfinite(nxt):
            if not engine.waiting:
                raise RuntimeError(f"simulation stuck at {clock.now:.3f} s: {engine.stats()}")
            nxt = clock.now + 1e-3  # calls preempted back to the queue: admit them again
        clock.advance_to(max(nxt, clock.now + 1e-6))
    else:
        raise RuntimeError("simulation did not finish within max_events")
    out = summarize(runs, 0.0, engine, sampler)
    out.update(
        simulated_s=clock.now,
        gpu_busy=engine.busy_s / clock.now if clock.now else 0.0,
        offloaded_gb=engine.kv.moved_bytes[HOST] / 1e9,
        uploaded_gb=engine.kv.moved_bytes[DEVICE] / 1e9,
        upload_stall_s=engine.kv.stalled_s,
        device_blocks=engine.manager.pools[DEVICE].num_blocks,
    )
    return out
