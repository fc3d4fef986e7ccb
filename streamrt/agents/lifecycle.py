"""Program steps of an `AgentEngine`: what happens between its LLM calls.

Kept apart from the step loop so each file stays readable; `AgentEngine` inherits these
methods and provides the state they read (`agents`, `nodes`, `waiting`, `running`, `kv`,
`manager`, `policy`, `counters`, `clock`, `encode`, `_seq_no`).

    _advance       the program's next step: an LLM call joins the queue, a tool call (or a
                   wait on other agents' named outputs) hands the agent's KV to the policy
    _tool_call     baseline frees the KV; ttl pins it (Continuum); offload pins or moves
                   it to the host with a predictive upload (TokenCake)
    _tool_return   the policy's resume: the kept blocks (made findable again) or recompute
"""

from __future__ import annotations

import contextlib

from streamrt.agents.program import Agent, Call, Tool
from streamrt.cache.block import DEVICE
from streamrt.cache.errors import OutOfBlocksError


class ProgramSteps:
    """Mixin of `AgentEngine`: program steps, tool calls and the agents' KV sequences."""

    def _advance(self, agent: Agent) -> None:
        """Start the program's next step (an LLM call or a tool call) or end it."""
        program = agent.program
        assert program is not None
        if agent.tool_until is not None:
            return
        if agent.step_index >= len(program.steps):
            self._end_program(agent)
            return
        step = program.steps[agent.step_index]
        node = None if step.id is None else f"{agent.id}/{step.id}"
        if any(ref not in self.nodes for ref in step.after):
            if not agent.blocked and not agent.in_tool:
                # waiting on other agents: the policy keeps or frees its KV as for a tool
                self._tool_call(agent, "after", None)
            agent.blocked = True
            return
        agent.blocked = False
        agent.step_index += 1
        if isinstance(step, Tool):
            if not agent.in_tool:
                self._tool_call(agent, step.name, step.duration_s)
            agent.tool_until = self.clock() + step.duration_s
            agent.pending_result = self.encode(step.result) if step.result else []
            agent.pending_node = node
            return
        joined = [t for ref in step.after for t in self.nodes[ref]]
        joined += self.encode(step.append) if step.append else []
        if agent.in_tool:  # back from waiting on other agents
            self._tool_return(agent)
        agent.tokens.extend(joined)
        call = Call(
            agent, step.max_tokens, self.clock(), next(self._seq_no), stop=step.stop, node=node
        )
        agent.calls.append(call)
        self.waiting.append(call)

    def _end_program(self, agent: Agent) -> None:
        """The program's last step ended: close it; forget the named outputs no live
        program can still wait for."""
        agent.done_s = self.clock()
        self.kv.close(agent.id)
        del self.agents[agent.id]
        wanted = {
            ref
            for a in self.agents.values()
            if a.program is not None
            for step in a.program.steps[a.step_index :]
            for ref in step.after
        }
        for ref in [r for r in self.nodes if r not in wanted]:
            owner = ref.partition("/")[0]
            if owner not in self.agents:
                del self.nodes[ref]
        if agent.handle is not None:
            with agent.handle.cond:
                agent.handle.cond.notify_all()

    def _tool_call(self, agent: Agent, tool: str, duration: float | None) -> None:
        agent.in_tool = True
        if self.policy == "baseline":
            self._reset_kv(agent)
            return
        allow = ("pin", "free") if self.policy == "ttl" else ("pin", "offload", "free")
        self.kv.tool_call(agent.id, tool, predicted_s=duration, allow=allow)

    def _tool_return(self, agent: Agent) -> None:
        agent.in_tool = False
        if agent.id not in self.kv.calls:
            return
        resume = self.kv.tool_return(agent.id, fetch=False)  # fetched when admitted
        self.counters[f"resume_{resume.action}"] += 1
        self.counters["resume_prefetched"] += resume.prefetched
        if resume.recompute or not self._seq(agent).table:
            self._reset_kv(agent)
        else:
            self._rehash(agent)

    def _fetch(self, agent: Agent) -> None:
        """The agent's blocks off the device back (a miss is preempted by `_on_device`)."""
        with contextlib.suppress(OutOfBlocksError):
            self.kv.fetch(agent.id)
        self._rehash(agent)

    def _rehash(self, agent: Agent) -> None:
        """Blocks that moved and came back: make their full ones findable again."""
        seq = self._seq(agent)
        for i, h in zip(sorted(seq.table), agent.hashes):
            if seq.table[i].tier == DEVICE:
                self.manager.commit_hash(seq, i, h)

    # ------------------------------------------------------------------ KV helpers

    def running_sequences(self) -> list:
        """The KV sequences of the calls in the batch (for utilisation sampling)."""
        with self.lock:
            return [self._seq(c.agent) for c in self.running]

    def _seq(self, agent: Agent):
        return self.kv.agents[agent.id]

    def _reset_kv(self, agent: Agent) -> None:
        """Free the agent's KV (full blocks stay cached by hash) and start a new sequence."""
        if agent.id not in self.kv.agents:
            return
        self.kv.close(agent.id)
        self.kv.open(agent.id)
        agent.computed, agent.hashes = 0, []

    def _rebase(self, agent: Agent, context: list[int]) -> None:
        """The agent's context is now `context`: keep the K/V of the common prefix."""
        common = 0
        for a, b in zip(agent.tokens[: agent.computed], context):
            if a != b:
                break
            common += 1
        common = min(common, len(context) - 1)
        if common < agent.computed:
            self._reset_kv(agent)  # simple and exact: prefix sharing finds the full blocks
        agent.tokens = list(context)
