"""Agent programs (LLM calls and tool calls), their calls and handles: what `AgentEngine` runs."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from streamrt.errors import InputError, StreamrtError

if TYPE_CHECKING:
    from streamrt.agents.engine import AgentEngine


class ContextTooLongError(InputError):
    """A context (prompt + max_tokens) longer than the model's positions."""


class CallFailed(StreamrtError):
    """An LLM call ended with an error (the message says why)."""


# ---------------------------------------------------------------------- programs


@dataclass
class LLM:
    """An LLM call: once the nodes in `after` have ended, append their outputs (in that
    order), then `append`, to the context, then generate."""

    max_tokens: int = 16
    append: str | list[int] | None = None
    stop: bool = True
    """End at the model's EOS token (False: always `max_tokens` tokens)."""
    id: str | None = None
    """A node name other steps can wait on as "program_id/id"."""
    after: tuple[str, ...] = ()
    """Nodes ("program_id/node_id", of this or another program) this call waits for
    besides the program's previous step: several agents can depend on each other."""


@dataclass
class Tool:
    """A tool call of `duration_s` seconds whose `result` joins the context when it
    returns; it starts once the nodes in `after` have ended."""

    name: str
    duration_s: float
    result: str | list[int] = ""
    id: str | None = None
    after: tuple[str, ...] = ()


@dataclass
class Program:
    """An agent: an initial context and a sequence of LLM and tool calls."""

    prompt: str | list[int]
    steps: list[LLM | Tool]
    priority: int = 0
    id: str | None = None


def check_dag(programs: list[Program], known: dict[str, Program]) -> None:
    """Raise `InputError` unless every `after` of `programs` names a node of one of them
    or of `known` (programs already submitted), and the nodes form no cycle.

    Nodes are (program, step); each step follows the program's previous one and the
    nodes it names. Kahn's algorithm: a cycle leaves nodes that never become ready."""
    group = {p.id: p for p in programs}
    if None in group and any(s.after for p in programs for s in p.steps):
        raise InputError("programs in a DAG need ids (Program(..., id='planner'))")
    everyone = {**known, **group}
    index = {}
    for pid, program in everyone.items():
        for i, step in enumerate(program.steps):
            if step.id is not None:
                if (pid, step.id) in index:
                    raise InputError(f"program {pid!r} has two steps with id {step.id!r}")
                index[(pid, step.id)] = i
    edges: dict[tuple, list[tuple]] = {}
    indegree: dict[tuple, int] = {}
    for pid, program in group.items():
        for i, step in enumerate(program.steps):
            node = (pid, i)
            indegree.setdefault(node, 0)
            deps = [(pid, i - 1)] if i else []
            for ref in step.after:
                who, _, name = ref.partition("/")
                if (who, name) not in index:
                    raise InputError(
                        f"program {pid!r} step {i} waits for {ref!r}, which names no step "
                        "('program_id/step_id' of this submission or a running program)"
                    )
                deps.append((who, index[(who, name)]))
            for dep in deps:
                if dep[0] in group:
                    edges.setdefault(dep, []).append(node)
                    indegree[node] += 1
    ready = [n for n, d in indegree.items() if d == 0]
    seen = 0
    while ready:
        node = ready.pop()
        seen += 1
        for nxt in edges.get(node, []):
            indegree[nxt] -= 1
            if indegree[nxt] == 0:
                ready.append(nxt)
    if seen < len(indegree):
        stuck = sorted({pid for (pid, _), d in indegree.items() if d > 0})
        raise InputError(f"the programs' steps wait for each other in a cycle: {stuck}")


@dataclass(eq=False)
class Call:
    """One LLM call of an agent, as the scheduler sees it."""

    agent: Agent
    max_tokens: int
    arrival: float
    seq_no: int
    tool_hint: tuple[str, float | None] | None = None
    stop: bool = True
    node: str | None = None
    """"program_id/step_id" when the call is a named step (its output feeds others)."""
    out: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    error: BaseException | None = None
    first_token_s: float | None = None
    done_s: float | None = None
    preempted: bool = False
    cond: threading.Condition = field(default_factory=threading.Condition)
    on_token: Callable[[int], None] | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None or self.error is not None

    def tokens(self, timeout: float | None = None) -> Iterator[int]:
        """Tokens as they are generated (raises `CallFailed` if the call fails)."""
        i = 0
        while True:
            with self.cond:
                while i >= len(self.out) and not self.done:
                    if not self.cond.wait(timeout):
                        raise TimeoutError("no token within the timeout")
                new, done, error = self.out[i:], self.done, self.error
            yield from new
            i += len(new)
            if done and i >= len(self.out):
                if error is not None:
                    raise CallFailed(str(error)) from error
                return

    def wait(self, timeout: float | None = None) -> list[int]:
        with self.cond:
            if not self.cond.wait_for(lambda: self.done, timeout):
                raise TimeoutError("the call did not finish within the timeout")
        if self.error is not None:
            raise CallFailed(str(self.error)) from self.error
        return list(self.out)


@dataclass(eq=False)
class Agent:
    """An agent's context (token ids) and its KV sequence in the cache manager."""

    id: str
    tokens: list[int]
    priority: int
    arrival: float
    computed: int = 0
    """Tokens of `tokens` whose K/V are in the sequence's blocks."""
    peak: int = 0
    """Most tokens ever computed: a forward below it recomputes lost K/V."""
    hashes: list[bytes] = field(default_factory=list)
    """Chained hashes of the full blocks written so far."""
    in_tool: bool = False
    program: Program | None = None
    step_index: int = 0
    calls: list[Call] = field(default_factory=list)
    tool_until: float | None = None
    pending_result: list[int] = field(default_factory=list)
    pending_node: str | None = None
    """The running tool's node name: its result is recorded when it returns."""
    blocked: bool = False
    """Waiting for nodes of other programs (`after`); its KV is kept as in a tool call."""
    done_s: float | None = None
    handle: ProgramHandle | None = None


@dataclass
class ProgramResult:
    outputs: list[list[int]]
    jct_s: float
    ttft_s: list[float]


class ProgramHandle:
    """What `submit` returns: stream tokens, wait for the outputs."""

    def __init__(self, engine: AgentEngine, agent: Agent) -> None:
        self.engine, self.agent, self.id = engine, agent, agent.id
        self.cond = threading.Condition()

    def tokens(self, timeout: float | None = None) -> Iterator[int]:
        """Every generated token of every LLM call of the program, in order."""
        i = 0
        while True:
            with self.cond:
                if not self.cond.wait_for(
                    lambda i=i: len(self.agent.calls) > i or self.agent.done_s is not None, timeout
                ):
                    raise TimeoutError("no token within the timeout")
                if len(self.agent.calls) <= i:
                    return
                call = self.agent.calls[i]
            yield from call.tokens(timeout)
            i += 1

    def done(self) -> bool:
        return self.agent.done_s is not None

    def result(self, timeout: float | None = None) -> ProgramResult:
        """Wait for the program's end; when no thread drives the engine, drive it here."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.done():
            if self.engine.driver is None:
                if not self.engine.step():
                    time.sleep(0.001)
            else:
                with self.cond:
                    self.cond.wait(0.05)
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError("the program did not finish within the timeout")
        for call in self.agent.calls:
            if call.error is not None:
                raise CallFailed(str(call.error)) from call.error
        return ProgramResult(
            [list(c.out) for c in self.agent.calls],
            self.agent.done_s - self.agent.arrival,
            [c.first_token_s - c.arrival for c in self.agent.calls if c.first_token_s],
        )

    def __await__(self):
        import asyncio

        return asyncio.get_running_loop().run_in_executor(None, self.result).__await__()
