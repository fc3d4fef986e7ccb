"""Agent KV across tool calls, on the shared cache manager (ALGORITHMS.md §3.2-3.3).

When an agent's LLM call ends in a tool call, its KV (one `Sequence` of the manager) can
be freed, kept pinned on the device for a time-to-live (Continuum), or moved to host
memory and brought back just before the tool is predicted to return (TokenCake's
predictive upload). `AgentKV.tool_call` decides, `tick` carries out what is due, and
`tool_return` resumes the agent with its KV on the device, bit-exact.

    Continuum   tau* = argmax_tau F_tool(tau) * (queue_delay + reload_cost) - tau
                F_tool: the tool's empirical duration CDF (cold start: exponential, mean 1 s)
                pin for tau* when the tool likely returns by then (F_tool(tau*) >= 0.5)
    TokenCake   otherwise offload when the predicted duration > margin x (offload +
                reload time); start the upload at predicted_return - reload_time
    free        neither pays: the caller prefills the context again on return
    pressure    unpin the most recently arrived program first (Continuum)

Priorities (TokenCake's spatial partitioning) are the manager's: consumers registered with
a higher priority and a device quota keep their reserve when lower ones need room.

    kv = AgentKV(manager, "agents")
    seq = kv.open("planner")                 # the agent's sequence; fill it as usual
    decision = kv.tool_call("planner", "search")
    ...                                      # the tool runs; call kv.tick() now and then
    kv.tool_return("planner", duration_s)    # KV is on the device again
"""

from __future__ import annotations

import bisect
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from streamrt.cache.block import DEVICE, HOST
from streamrt.cache.manager import CacheManager
from streamrt.cache.sequence import Sequence
from streamrt.errors import InputError, UnknownNameError

Action = Literal["pin", "offload", "free"]


class ToolDurations:
    """Per tool, the durations seen so far: an empirical CDF and a prediction."""

    def __init__(self, cold_mean_s: float = 1.0) -> None:
        if not (
            isinstance(cold_mean_s, (int, float)) and math.isfinite(cold_mean_s) and cold_mean_s > 0
        ):
            raise InputError(
                f"ToolDurations: cold_mean_s must be a positive number of seconds, got {cold_mean_s!r}"
            )
        self.cold_mean_s = cold_mean_s
        self.seen: dict[str, list[float]] = {}

    def observe(self, tool: str, seconds: float) -> None:
        bisect.insort(self.seen.setdefault(tool, []), max(0.0, float(seconds)))

    def cdf(self, tool: str, tau: float) -> float:
        """P(duration <= tau): empirical, or exponential with mean `cold_mean_s` cold."""
        seen = self.seen.get(tool)
        if not seen:
            return 1.0 - math.exp(-max(0.0, tau) / self.cold_mean_s)
        return bisect.bisect_right(seen, tau) / len(seen)

    def predict(self, tool: str) -> float:
        """Predicted duration: the median of what was seen (the cold mean before that)."""
        seen = self.seen.get(tool)
        return seen[len(seen) // 2] if seen else self.cold_mean_s

    def best_ttl(self, tool: str, benefit_s: float) -> float:
        """Continuum's tau: maximise `cdf(tau) * benefit_s - tau` (0: do not pin).

        Cold, the optimum of the exponential is `mean * ln(benefit / mean)`; warm, the
        candidates are the durations seen (the objective only jumps there).
        """
        seen = self.seen.get(tool)
        if not seen:
            m = self.cold_mean_s
            return m * math.log(benefit_s / m) if benefit_s > m else 0.0
        best, best_value = 0.0, 0.0
        for tau in seen:
            value = self.cdf(tool, tau) * benefit_s - tau
            if value > best_value:
                best, best_value = tau, value
        return best


@dataclass
class ToolCall:
    """What `tool_call` decided for one agent, and what happened since."""

    tool: str
    action: Action
    started: float
    predicted_s: float
    ttl_s: float = 0.0
    """Pin: how long the KV stays on the device before it is freed or offloaded."""
    upload_at: float | None = None
    """Offload: when `tick` starts moving the KV back (predictive upload)."""
    uploaded: bool = False
    allow: tuple[Action, ...] = ("pin", "offload", "free")
    """The actions the scheduling policy permits (an expired or relieved pin takes the
    next one: offload if allowed and there is host memory, else free)."""


@dataclass
class Resume:
    """How an agent came back from a tool call."""

    action: Action
    waited_s: float
    """Time `tool_return` spent moving KV back (0 when the upload was done in time)."""
    prefetched: bool
    recompute: bool
    """The KV had been freed: the caller must prefill the context again."""


@dataclass
class AgentKV:
    """Agents' KV sequences on `manager` under consumer `consumer`, across tool calls."""

    manager: CacheManager
    consumer: str
    durations: ToolDurations = field(default_factory=ToolDurations)
    queue_delay_s: float = 0.5
    """Continuum's cost of losing the KV beyond its reload: waiting in line for a new
    prefill."""
    prefill_tokens_per_s: float = 5000.0
    """Recompute speed, for the cost of a freed context (updated by the caller if known)."""
    move_bytes_per_s: float = 8e9
    """Device <-> host bandwidth estimate; every measured move updates it."""
    margin: float = 1.5
    """TokenCake: offload only if the tool outlasts offload + reload by this factor."""
    clock: Callable[[], float] = time.monotonic
    agents: dict[str, Sequence] = field(default_factory=dict)
    calls: dict[str, ToolCall] = field(default_factory=dict)
    arrivals: dict[str, float] = field(default_factory=dict)

    def open(self, agent: str, policy: str = "full", **policy_args) -> Sequence:
        """The agent's KV sequence (one per agent; blocks appended as its context grows)."""
        if agent in self.agents:
            raise InputError(f"agent {agent!r} is already open")
        seq = self.manager.open_sequence(self.consumer, policy, **policy_args)
        self.agents[agent] = seq
        self.arrivals[agent] = self.clock()
        return seq

    def close(self, agent: str) -> None:
        seq = self._seq(agent)
        self.calls.pop(agent, None)
        self.arrivals.pop(agent, None)
        self._free_blocks(seq)
        self.manager.close_sequence(self.agents.pop(agent))

    # ------------------------------------------------------------------ costs

    def context_bytes(self, agent: str) -> int:
        """Bytes a move of the agent's KV carries (its private blocks, `to_move`)."""
        seq = self._seq(agent)
        return len(self.to_move(seq, HOST)) * seq.spec.block_bytes

    def move_s(self, agent: str) -> float:
        """One-way device <-> host transfer time of the agent's KV."""
        return self.context_bytes(agent) / self.move_bytes_per_s

    def move_s_of(self, seq: Sequence) -> float:
        """Upload time of `seq`'s blocks off the device."""
        off = len(self.to_move(seq, DEVICE)) - seq.counts[DEVICE]
        return off * self.block_bytes_of(seq) / self.move_bytes_per_s

    def block_bytes_of(self, seq: Sequence) -> int:
        return seq.spec.block_bytes

    def recompute_s(self, agent: str) -> float:
        tokens = sum(b.num_tokens for b in self._seq(agent).blocks())
        return tokens / self.prefill_tokens_per_s

    # ------------------------------------------------------------------ tool calls

    def tool_call(
        self,
        agent: str,
        tool: str,
        predicted_s: float | None = None,
        allow: tuple[Action, ...] = ("pin", "offload", "free"),
    ) -> ToolCall:
        """The agent's LLM call ended in a call of `tool`: pin, offload or free its KV.

        `predicted_s`: the caller's hint of the duration (else the tool's median so far);
        `allow`: the actions a scheduling policy permits (free is always possible)."""
        seq = self._seq(agent)
        if agent in self.calls:
            raise InputError(f"agent {agent!r} is already in a tool call")
        now = self.clock()
        predicted = self.durations.predict(tool) if predicted_s is None else predicted_s
        move = self.move_s(agent)
        call = ToolCall(tool, "free", now, predicted, allow=allow)
        ttl = self.durations.best_ttl(tool, self.queue_delay_s + self.recompute_s(agent))
        if "pin" in allow and ttl > 0 and self.durations.cdf(tool, ttl) >= 0.5:
            # Likely back before the pin expires: keep it where it is, no transfer at all.
            call.action, call.ttl_s = "pin", ttl
            self.manager.pin(seq, ttl)
        elif "offload" in allow and predicted > self.margin * 2 * move:
            call.action = "offload"
            self._move(seq, HOST)  # also refreshes the bandwidth estimate for the way back
            call.upload_at = now + max(0.0, predicted - self.move_s(agent))
        else:
            self._free_blocks(seq)
        self.calls[agent] = call
        return call

    def tick(self, room: int | None = None) -> list[str]:
        """Carry out what is due: predictive uploads and expired pins. Returns what it did.

        `room`: device blocks uploads may take (the caller's free blocks less what its
        running work still needs); an upload that does not fit waits, and the resume
        fetches what is still on the host. None: no limit."""
        now, done = self.clock(), []
        for agent, call in self.calls.items():
            seq = self._seq(agent)
            if call.action == "offload" and not call.uploaded and now >= call.upload_at:
                size = len(seq.table) - seq.counts[DEVICE]
                if room is not None:
                    if size > room:
                        continue
                    room -= size
                self._move(seq, DEVICE)
                call.uploaded = True
                done.append(f"upload {agent}")
            elif call.action == "pin" and now >= call.started + call.ttl_s:
                self._unpin(seq, call)
                done.append(f"expire {agent}")
        return done

    def relieve_pressure(self) -> str | None:
        """Device memory is short: unpin the most recently arrived pinned program
        (Continuum) and give its device blocks back at once, to the host if the policy
        offloads, else freed (still findable by hash until reused). Returns the agent."""
        pinned = [a for a, c in self.calls.items() if c.action == "pin"]
        if not pinned:
            return None
        agent = max(pinned, key=lambda a: self.arrivals[a])
        self._unpin(self.agents[agent], self.calls[agent])
        return agent

    def _unpin(self, seq: Sequence, call: ToolCall) -> None:
        """End a pin: offload (uploaded before the predicted return) or free."""
        self.manager.pin(seq, None)
        if "offload" in call.allow and self.manager.budgets[HOST] > 0:
            self._move(seq, HOST)
            call.action = "offload"
            back = call.started + call.predicted_s - self.move_s_of(seq)
            call.upload_at = max(self.clock(), back)
        else:
            self._free_blocks(seq)
            call.action = "free"

    def tool_return(
        self, agent: str, duration_s: float | None = None, fetch: bool = True
    ) -> Resume:
        """The tool returned: learn its duration, bring the KV back to the device.

        `fetch=False`: leave what is still on the host there; the caller fetches it
        (`fetch`) once it has room for it (an engine, when it admits the next call)."""
        seq = self._seq(agent)
        call = self.calls.pop(agent, None)
        if call is None:
            raise InputError(f"agent {agent!r} is not in a tool call")
        now = self.clock()
        self.durations.observe(call.tool, now - call.started if duration_s is None else duration_s)
        self.manager.pin(seq, None)
        on_host = seq.counts[DEVICE] < len(seq.table)
        waited = self.fetch(agent) if fetch else 0.0
        return Resume(call.action, waited, call.uploaded and not on_host, not seq.table)

    def fetch(self, agent: str) -> float:
        """Bring the agent's blocks that are off the device back (synchronously);
        returns the seconds it waited."""
        seq = self._seq(agent)
        if seq.counts[DEVICE] == len(seq.table):
            return 0.0
        start = time.perf_counter()
        self._move(seq, DEVICE)
        return time.perf_counter() - start

    # ------------------------------------------------------------------ helpers

    def _seq(self, agent: str) -> Sequence:
        """The open agent's sequence, or an `InputError` naming the open agents."""
        if agent not in self.agents:
            known = ", ".join(map(repr, self.agents)) or "none"
            raise UnknownNameError(
                f"no open agent {agent!r}; open agents: {known} (call open first)"
            )
        return self.agents[agent]

    @staticmethod
    def to_move(seq: Sequence, tier: str) -> list[int]:
        """The blocks a move of `seq` to `tier` carries. Down: only its private blocks; a
        block shared with other agents (the common system prompt) stays on the device,
        where its other holders keep it anyway: moving it would free nothing and come
        back as a private duplicate. Up: every block (those already on the device stay, and
        are protected from the room-making of the others' fetch)."""
        if tier == DEVICE:
            return list(seq.table)  # the manager skips those on the device, but protects them
        return [i for i, b in seq.items() if b.tier == DEVICE and b.ref_cnt == 1]

    def _move(self, seq: Sequence, tier: str) -> None:
        indices = self.to_move(seq, tier)
        if not indices:
            return
        start = time.perf_counter()
        if tier == DEVICE:
            transfers = self.manager.fetch(seq, indices)
        else:
            transfers = self.manager.offload(seq, indices, tier)
        for t in transfers:
            t.wait()
        seconds = time.perf_counter() - start
        moved = len(transfers) * seq.spec.block_bytes
        if moved and seconds > 0:  # running estimate of the link's bandwidth
            self.move_bytes_per_s = 0.5 * self.move_bytes_per_s + 0.5 * moved / seconds

    def _free_blocks(self, seq: Sequence) -> None:
        """Free the tail first: the free queue is LRU, so a context's last blocks are
        reused before its first ones, and its prefix stays findable by hash longest
        (vLLM frees in reverse for the same reason)."""
        for index in sorted(seq.table, reverse=True):
            seq.free(index)
