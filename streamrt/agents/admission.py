"""Admission of an `AgentEngine`'s waiting calls: order, room, reserve, prefix sharing.

Kept apart from the step loop so each file stays readable; `AgentEngine` inherits these
methods and provides the state they read (`waiting`, `running`, `agents`, `kv`, `manager`,
`spec`, `policy`, `reserve`, `_seq`).

Invariant: the free device blocks cover the growth every running call still has to its
last token (`_growth`); a call is admitted only into what is left, so decoding never runs
out of blocks unless another consumer or an upload outside this count takes them.
"""

from __future__ import annotations

import math

from streamrt.agents.program import Agent, Call
from streamrt.cache.block import DEVICE
from streamrt.cache.hashing import hash_block_tokens


class Admission:
    """Mixin of `AgentEngine`: which waiting calls join the batch, and their prefixes."""

    def _order(self, call: Call) -> tuple:
        if self.policy == "baseline":  # FCFS by request
            return (-call.agent.priority, not call.preempted, call.arrival, call.seq_no)
        # Continuum: preempted, programs whose KV was kept, then program-level FCFS
        kept = call.agent.computed > 0
        return (-call.agent.priority, not call.preempted, not kept, call.agent.arrival)

    def _admit(self) -> None:
        """Admit waiting calls in the policy's order while their KV fits beside what the
        running calls still need to finish (their growth is reserved: a call admitted on
        room a running call will decode into gets preempted and recomputed later, which
        thrashes under load). A kept program's blocks off the device count as needed. A call
        that does not fit waits, and only resident calls (`_resident`) pass it."""
        critical = self._critical()
        self.waiting.sort(key=lambda c: (-critical.get(c.agent.id, 0), *self._order(c)))
        reserved = sum(self._growth(c) for c in self.running)
        held = sum(self._seq(self.agents[a]).counts[DEVICE] for a in critical)
        blocked = False  # a call earlier in the order waits for room
        admitted: list[Agent] = []
        for call in list(self.waiting):
            if len(self.running) >= self.max_batch:
                break
            agent = call.agent
            if blocked and not self._resident(call):
                continue  # first come, first served: only a resident call passes a waiting one
            if agent.computed == 0 and not self._seq(agent).table:
                self._share_prefix(agent)
            need = self._growth(call)
            while (
                need + reserved > self._room(agent, critical, held) and self.kv.relieve_pressure()
            ):
                pass
            if need + reserved > self._room(agent, critical, held) and self.running:
                blocked = True  # room comes back when a running call ends
                continue
            self.waiting.remove(call)
            self.running.append(call)
            reserved += need
            held += need if agent.id in critical else 0
            admitted.append(agent)
        for agent in admitted:  # kept blocks still on the host: their room is counted in need
            self._fetch(agent)

    def _resident(self, call: Call) -> bool:
        """The call's kept KV is all on the device (a program back from a pinned or
        uploaded tool call): waiting, it holds that memory idle; running, it adds only its
        growth. So it may pass calls that wait for room (Continuum schedules a program
        whose KV was kept as soon as its tool returns). Never under `baseline`, whose
        FCFS is strict, as vLLM's is."""
        if self.policy == "baseline" or call.agent.computed == 0:
            return False
        seq = self._seq(call.agent)
        return seq.counts[DEVICE] == len(seq.table)

    def _critical(self) -> dict[str, int]:
        """With a reserve: critical programs (priority > 0, or waited for by others'
        `after`), by their number of dependents; the reserve sees their device use."""
        if self.reserve is None:
            return {}
        out: dict[str, int] = {}
        for a in self.agents.values():
            if a.program is None:
                continue
            for step in a.program.steps[a.step_index :]:
                for ref in step.after:
                    owner = ref.partition("/")[0]
                    if owner != a.id and owner in self.agents:
                        out[owner] = out.get(owner, 0) + 1
        for a in self.agents.values():
            if a.priority > 0:
                out[a.id] = out.get(a.id, 0) + a.priority
        held = sum(self._seq(self.agents[a]).counts[DEVICE] for a in out)
        self.reserve.observe(held, self._device_blocks())
        return out

    def _room(self, agent: Agent, critical: dict[str, int], held: int) -> int:
        """Free device blocks this agent's call may take (all, without a reserve)."""
        free = self._free_blocks()
        if self.reserve is None:
            return free
        return self.reserve.room(agent.id in critical, free, held, self._device_blocks())

    def _device_blocks(self) -> int:
        pool = self.manager.pools.get(DEVICE)
        if pool is None:  # made at the first allocation
            return self.manager.budgets[DEVICE] // self.spec.block_bytes
        return pool.num_blocks

    def _growth(self, call: Call) -> int:
        """Device blocks the call needs beyond those it holds there, to its last token."""
        end = len(call.agent.tokens) + call.max_tokens - len(call.out)
        seq = self._seq(call.agent)
        return max(0, math.ceil(end / self.spec.tokens_per_block) - seq.counts[DEVICE])

    def _free_blocks(self) -> int:
        pool = self.manager.pools.get("device")
        if pool is None:
            return self.manager.budgets["device"] // self.spec.block_bytes
        cached_free = pool.num_free
        return cached_free

    def _share_prefix(self, agent: Agent) -> None:
        """Share the cached full blocks the context starts with (at least its last token
        is always computed, for the logits)."""
        tpb = self.spec.tokens_per_block
        full = (len(agent.tokens) - 1) // tpb
        hashes, parent = [], None
        for i in range(full):
            parent = hash_block_tokens(parent, agent.tokens[i * tpb : (i + 1) * tpb])
            hashes.append(parent)
        seq = self._seq(agent)
        for block in self.manager.match_prefix(self.consumer, hashes):
            self.manager.append_shared(seq, block)
        agent.hashes = hashes[: len(seq.table)]
        agent.computed = len(seq.table) * tpb
        self.counters["shared_tokens"] += agent.computed
