"""`AgentEngine`: continuous batching and greedy decode of a transformers causal LM on the
shared cache manager, for agent programs (LLM calls + tool calls).

    engine = AgentEngine.from_pretrained()            # the LM inside assets/tiny-vqa
    h = engine.submit(Program("what color was the circle ?", [LLM(8), Tool("search", 0.2,
                              "the circle was red"), LLM(8)]))
    engine.run_until_idle()                           # or: the runtime's step loop drives it
    h.result().outputs                                # token ids of each LLM call

Each `step()`:

    1. carry out due KV moves (`AgentKV.tick`: predictive uploads, expired pins, into
       room no running call needs), return finished tool calls (their result tokens join
       the context) and wake programs whose `after` steps have ended
    2. admit waiting calls (`admission.py`: priority, then the policy's order) while rows
       last and their blocks fit beside the running calls' reserved growth (a call that
       does not fit waits; only calls whose kept KV is on the device pass it); a call whose
       context starts with cached full blocks shares them (chained sha256 block hashes,
       `streamrt.cache.hashing`) and skips their prefill
    3. one batched forward (`lm.padded_forward`): a decode row per running call plus
       prefill chunks of new ones, padded, with per-row positions and a per-row mask (the
       model is stock transformers; the past K/V comes in through a `transformers.Cache`)
    4. new K/V are written to each call's blocks; full blocks get their hash; a call whose
       input is consumed appends its greedy token; EOS / max_tokens end the call
    5. an ended call's KV follows the policy: `baseline` frees it (its full blocks stay
       findable by hash until reused: a vLLM-style LRU prefix cache); `ttl` pins it for
       Continuum's TTL during a tool call; `offload` (TokenCake) pins short tool calls and
       moves long ones to host memory, uploading before the predicted return

Keys are stored after RoPE (what the `Cache` receives) at their absolute positions, which
never change (a shared prefix sits at the same positions in every context), so greedy
outputs are the same whatever the batch composition, scheduling policy or sharing.
"""

from __future__ import annotations

import itertools
import logging
import math
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from streamrt.agents.admission import Admission
from streamrt.agents.kv import AgentKV
from streamrt.agents.lifecycle import ProgramSteps
from streamrt.agents.lm import cache_kwarg, lm_spec, load_causal_lm, padded_forward
from streamrt.agents.program import (
    LLM,
    Agent,
    Call,
    CallFailed,
    ContextTooLongError,
    Program,
    ProgramHandle,
    ProgramResult,
    Tool,
    check_dag,
)
from streamrt.agents.reserve import SpatialReserve
from streamrt.cache import CacheManager
from streamrt.cache.block import DEVICE
from streamrt.cache.errors import OutOfBlocksError
from streamrt.cache.hashing import hash_block_tokens
from streamrt.cache.process import is_process_cache, join_or_own, process_cache
from streamrt.errors import InputError, UnknownNameError

logger = logging.getLogger(__name__)
CONSUMER = "agents"
POLICIES = ("baseline", "ttl", "offload")
"""KV policies across tool calls; each composes with TokenCake's reserve as "<policy>+reserve"."""


def _release(manager: CacheManager, agents: dict, consumer: str) -> None:
    manager.release_later(list(agents.values()), consumer)


# ---------------------------------------------------------------------- the engine


class AgentEngine(Admission, ProgramSteps):
    """Continuous-batching greedy decode of agent programs on a `CacheManager`.

    Args:
        model, tokenizer: A transformers causal LM (and its tokenizer, for text prompts).
        manager: The cache manager (the runtime's `rt.cache`); None: the process's
            (`streamrt.cache.process`).
        policy: "baseline", "ttl" or "offload" (module docstring).
        max_batch: Running calls at most.
        step_tokens: Tokens per forward at most (decode rows first, then prefill chunks).
        tokens_per_block: Tokens per KV block (the prefix-sharing granularity).
        clock: Seconds (tool durations, JCT); tests pass a fake one.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any = None,
        manager: CacheManager | None = None,
        *,
        policy: str = "baseline",
        max_batch: int = 8,
        step_tokens: int = 256,
        tokens_per_block: int = 16,
        consumer: str = CONSUMER,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        base, _, extra = policy.partition("+")
        if base not in POLICIES or extra not in ("", "reserve"):
            raise InputError(
                f"unknown policy {policy!r}; policies: {', '.join(POLICIES)}, each optionally "
                "with '+reserve' (TokenCake's device reserve for critical agents)"
            )
        self.model, self.tokenizer, self.policy = model, tokenizer, base
        self.policy_name = policy
        self.reserve = SpatialReserve() if extra == "reserve" else None
        self.max_batch, self.step_tokens = max_batch, step_tokens
        self.clock = clock
        self.spec = lm_spec(model, tokens_per_block)
        if manager is None:  # the process's; its own where those pages are in use
            device = next(model.parameters()).device
            manager, consumer = join_or_own(
                process_cache(device),
                consumer,
                self.spec,
                lambda: CacheManager(
                    device_bytes=self.spec.block_bytes * 256,
                    host_bytes=self.spec.block_bytes * 256,
                    device=str(device),
                ),
                f"an agent LM with {self.spec.block_bytes}-byte KV blocks",
            )
        elif consumer not in manager.consumers:
            manager.register(consumer, self.spec)
        self.manager = manager
        self.consumer = consumer
        self.kv = AgentKV(manager, consumer, clock=clock)
        if is_process_cache(manager):  # an engine dropped unclosed gives its blocks back
            weakref.finalize(self, _release, manager, self.kv.agents, consumer)
        self.eos = set()
        for source in (getattr(model, "generation_config", None), model.config, tokenizer):
            eos = getattr(source, "eos_token_id", None)
            if eos is not None:
                self.eos.update(eos if isinstance(eos, (list, tuple)) else [eos])
        self.max_positions = getattr(model.config, "max_position_embeddings", None) or 1 << 30
        self.cache_kw = cache_kwarg(model)
        self.lock = threading.RLock()
        self.agents: dict[str, Agent] = {}
        self.waiting: list[Call] = []
        self.running: list[Call] = []
        self.nodes: dict[str, list[int]] = {}
        """Outputs of ended named steps ("program_id/step_id"), while a program may wait
        for them."""
        self.driver: object | None = None
        """Set by whoever runs `step` in a thread (the runtime): `result()` then waits."""
        self._ids = itertools.count()
        self._seq_no = itertools.count()
        self.counters = {
            "steps": 0,
            "rows": 0,
            "prefill_tokens": 0,
            "decode_tokens": 0,
            "shared_tokens": 0,
            "recomputed_tokens": 0,
            "preempted": 0,
            "failed": 0,
            "resume_pin": 0,
            "resume_offload": 0,
            "resume_free": 0,
            "resume_prefetched": 0,
        }
        self.kv_samples: list[float] = []

    @classmethod
    def from_pretrained(
        cls, path: str | Path | None = None, manager: CacheManager | None = None, **kw: Any
    ) -> AgentEngine:
        model, tokenizer = load_causal_lm(path)
        return cls(model, tokenizer, manager, **kw)

    # ------------------------------------------------------------------ text

    def encode(self, text: str | list[int]) -> list[int]:
        if isinstance(text, list):
            bad = [t for t in text if not isinstance(t, int) or not 0 <= t < self.vocab_size]
            if bad:
                raise InputError(f"token ids must be in 0..{self.vocab_size - 1}, got {bad[:5]}")
            return list(text)
        if not isinstance(text, str):
            raise InputError(f"a prompt is text or a list of token ids, got {type(text).__name__}")
        if self.tokenizer is None:
            raise InputError("this engine has no tokenizer: pass token ids")
        return list(self.tokenizer(text, add_special_tokens=False).input_ids)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True) if self.tokenizer else ""

    @property
    def vocab_size(self) -> int:
        return self.model.config.vocab_size

    def render(self, messages: list[dict[str, str]]) -> list[int]:
        """Chat messages as token ids: the tokenizer's chat template, else "role: content"."""
        tok = self.tokenizer
        if tok is not None and getattr(tok, "chat_template", None):
            ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            return list(ids["input_ids"] if isinstance(ids, dict) else ids)
        text = "\n".join(f"{m['role']}: {m['content']}" for m in messages) + "\nassistant:"
        return self.encode(text)

    # ------------------------------------------------------------------ submission

    def submit(self, program: Program) -> ProgramHandle:
        """Queue an agent program; returns its handle at once."""
        return self.submit_all([program])[0]

    def submit_all(self, programs: list[Program]) -> list[ProgramHandle]:
        """Queue programs whose steps may wait for each other's (`LLM/Tool(after=...)`):
        a DAG of agents; the references and the absence of cycles are checked first."""
        for program in programs:
            if not program.steps or not all(isinstance(s, (LLM, Tool)) for s in program.steps):
                raise InputError("a program needs steps: LLM(...) and Tool(...) calls")
        with self.lock:
            live = {a.id: a.program for a in self.agents.values() if a.program is not None}
            check_dag(programs, live)
            agents = []
            for program in programs:
                agent = self.open_agent(program.prompt, program.priority, program.id)
                agent.program = program
                agent.handle = ProgramHandle(self, agent)
                agents.append(agent)
            for agent in agents:
                self._advance(agent)
            return [a.handle for a in agents]

    def generate(
        self, prompts: list[str | list[int]], max_tokens: int = 16, stop: bool = True
    ) -> list[list[int]]:
        """Greedy outputs of independent prompts, batched together (a helper)."""
        handles = [self.submit(Program(p, [LLM(max_tokens, stop=stop)])) for p in prompts]
        return [h.result().outputs[0] for h in handles]

    def open_agent(
        self, prompt: str | list[int] = "", priority: int = 0, agent_id: str | None = None
    ) -> Agent:
        """An agent with its (empty) KV sequence; calls come with `call`."""
        tokens = self.encode(prompt) if prompt else []
        with self.lock:
            agent_id = agent_id or f"p{next(self._ids)}"
            if agent_id in self.agents:
                raise InputError(f"program {agent_id!r} already exists")
            agent = Agent(agent_id, tokens, priority, self.clock())
            self.kv.open(agent_id)
            self.agents[agent_id] = agent
            return agent

    def agent(self, agent_id: str) -> Agent:
        with self.lock:
            if agent_id not in self.agents:
                raise UnknownNameError(f"no program {agent_id!r}")
            return self.agents[agent_id]

    def call(
        self,
        agent_id: str,
        context: list[int] | None = None,
        max_tokens: int = 16,
        tool_hint: tuple[str, float | None] | None = None,
        on_token: Callable[[int], None] | None = None,
    ) -> Call:
        """Queue one LLM call of an open agent. `context`: the agent's whole context now
        (a chat client resends it); the part already in KV is kept (its longest common
        prefix, in full blocks), the rest is prefilled. `tool_hint`: this call ends in a
        tool call (name, predicted seconds): its KV is kept per the policy until the next."""
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise InputError(f"max_tokens must be a whole number >= 1, got {max_tokens!r}")
        with self.lock:
            agent = self.agent(agent_id)
            if any(c.agent is agent and not c.done for c in [*self.waiting, *self.running]):
                raise InputError(f"program {agent_id!r} already has a call in progress")
            if context is not None:
                context = self.encode(context)
                if not context:
                    raise InputError("the context is empty")
            total = len(context if context is not None else agent.tokens) + max_tokens
            if total > self.max_positions:
                raise ContextTooLongError(
                    f"context of {total - max_tokens} tokens + max_tokens {max_tokens} exceeds "
                    f"the model's {self.max_positions} positions"
                )
            if agent.in_tool:
                self._tool_return(agent)
            if context is not None:
                self._rebase(agent, context)
            if not agent.tokens:
                raise InputError("the context is empty")
            call = Call(agent, max_tokens, self.clock(), next(self._seq_no), tool_hint)
            call.on_token = on_token
            agent.calls.append(call)
            self.waiting.append(call)
        if agent.handle is not None:
            with agent.handle.cond:
                agent.handle.cond.notify_all()
        return call

    def close_agent(self, agent_id: str) -> None:
        """End an agent: cancel its calls, free its KV (full blocks stay cached by hash)."""
        with self.lock:
            agent = self.agent(agent_id)
            for call in [c for c in [*self.waiting, *self.running] if c.agent is agent]:
                self._fail(call, CallFailed(f"program {agent_id!r} was closed"))
            self.kv.close(agent_id)
            del self.agents[agent_id]

    def cancel(self, call: Call, reason: str = "cancelled") -> None:
        """Stop a call (a client went away): its row leaves the batch, its KV is freed."""
        with self.lock:
            if not call.done:
                self._fail(call, CallFailed(reason))
                self._reset_kv(call.agent)

    # ------------------------------------------------------------------ the step

    @property
    def busy(self) -> bool:
        return bool(
            self.waiting
            or self.running
            or self._tool_agents()
            or any(a.blocked for a in self.agents.values())
        )

    def _tool_agents(self) -> list[Agent]:
        return [a for a in self.agents.values() if a.tool_until is not None]

    def step(self) -> bool:
        """One scheduling step; False when there was nothing to run."""
        with self.lock:
            now = self.clock()
            # predictive uploads only into room no running or waiting call needs
            needed = sum(map(self._growth, self.running)) + sum(map(self._growth, self.waiting))
            self.kv.tick(room=self._free_blocks() - needed)
            for agent in self._tool_agents():
                if now >= agent.tool_until:
                    agent.tool_until = None
                    self._tool_return(agent)
                    agent.tokens.extend(agent.pending_result)
                    if agent.pending_node is not None:
                        self.nodes[agent.pending_node] = agent.pending_result
                    agent.pending_result, agent.pending_node = [], None
                    self._advance(agent)
            for agent in [a for a in self.agents.values() if a.blocked]:
                self._advance(agent)
            self._admit()
            rows = self._plan_rows()
            if not rows:
                return False
            try:
                self._forward(rows)
            except Exception as exc:  # a failing forward fails its rows, not the engine
                logger.exception("agent forward failed")
                for call, _ in rows:
                    self._fail(call, exc)
                    self._reset_kv(call.agent)
            self.counters["steps"] += 1
            device = self.manager.stats()
            self._sample_kv(device)
            return True

    def run_until_idle(self, timeout: float = 600.0) -> None:
        deadline = time.monotonic() + timeout
        while self.busy:
            if not self.step():
                time.sleep(0.0005)
            if time.monotonic() > deadline:
                raise TimeoutError("the engine did not become idle")

    # ------------------------------------------------------------------ the batch

    def _plan_rows(self) -> list[tuple[Call, int]]:
        """(call, tokens to feed) per running call: decode rows first, then prefill chunks."""
        budget, rows = self.step_tokens, []
        for call in sorted(self.running, key=lambda c: len(c.agent.tokens) - c.agent.computed):
            n = min(len(call.agent.tokens) - call.agent.computed, max(budget, 1))
            if n <= 0:
                continue
            if not self._reserve(call, n):
                continue
            rows.append((call, n))
            budget -= n
            if budget <= 0:
                break
        return self._on_device(rows)

    def _on_device(self, rows: list[tuple[Call, int]]) -> list[tuple[Call, int]]:
        """The rows whose blocks are all on the device. Room-making for another row (or a
        higher-priority consumer) may have moved a running call's blocks to the host: fetch
        them back; a row that cannot have them back, or lost them to a later fetch, is
        preempted like a row without room."""
        for call, _ in rows:
            seq = self._seq(call.agent)
            if seq.counts[DEVICE] < len(seq.table):
                self._fetch(call.agent)
        kept = []
        for call, n in rows:
            seq = self._seq(call.agent)
            if seq.counts[DEVICE] == len(seq.table):
                kept.append((call, n))
            else:
                self._preempt(call)
        return kept

    def _reserve(self, call: Call, n: int) -> bool:
        """Account `n` more tokens in the agent's blocks (filling the last one, then new
        ones). On a full device, unpin kept programs first (most recently arrived first,
        Continuum), then preempt the call (back to the queue, its KV freed)."""
        seq, target = self._seq(call.agent), call.agent.computed + n
        while True:
            try:
                self._grow(seq, target)
                return True
            except OutOfBlocksError:
                if self.kv.relieve_pressure() is None:
                    self._preempt(call)
                    return False

    def _grow(self, seq, target: int) -> None:
        """Blocks for `target` tokens (resumes where a failed attempt stopped)."""
        tpb = self.spec.tokens_per_block
        while seq.next_position < target:
            last = seq.table.get(seq.next_index - 1)
            if last is not None and last.num_tokens < tpb:
                self.manager.extend_last(
                    seq, min(tpb - last.num_tokens, target - seq.next_position)
                )
            else:
                seq.append(min(tpb, target - seq.next_position))

    def _preempt(self, call: Call) -> None:
        """Back to the queue, its KV freed (full blocks stay findable by hash)."""
        self.running.remove(call)
        self._reset_kv(call.agent)
        if not self.running:  # alone and still no room: it can never run
            self._fail(call, OutOfBlocksError("the KV cache cannot hold this context"))
            return
        call.preempted = True
        self.waiting.append(call)
        self.counters["preempted"] += 1

    def _forward(self, rows: list[tuple[Call, int]]) -> None:
        """Run the model on the rows, store their new K/V, emit the tokens of finished inputs."""
        pasts = [c.agent.computed for c, _ in rows]
        new, greedy = self._run_model(rows, pasts)
        self.counters["rows"] += len(rows)
        for r, (call, n) in enumerate(rows):
            agent, p = call.agent, pasts[r]
            self._write(agent, new[r, :, :, :n], p)
            if not call.out:  # a decode row feeds the call's last generated token
                self.counters["prefill_tokens"] += n
            # K/V this agent had computed before and lost (freed, evicted, preempted)
            self.counters["recomputed_tokens"] += max(0, min(agent.peak, p + n) - p)
            agent.computed += n
            agent.peak = max(agent.peak, agent.computed)
            if agent.computed == len(agent.tokens):
                self.counters["decode_tokens"] += 1
                self._emit(call, greedy[r])

    def _run_model(
        self, rows: list[tuple[Call, int]], pasts: list[int]
    ) -> tuple[torch.Tensor, list[int]]:
        """One padded forward of the rows: their new K/V `[B, 2, L, N, H, D]` and each
        row's greedy next token (after its last fed token). A simulation overrides this."""
        spec, tpb = self.spec, self.spec.tokens_per_block
        table = self.manager.device_table(spec)
        L, H, D = spec.num_layers, spec.num_kv_heads, spec.head_dim
        pasts_kv, inputs = [], []
        for (call, n), p in zip(rows, pasts):
            agent, past = call.agent, None
            if p:
                seq = self._seq(agent)
                used = sorted(seq.table)[: math.ceil(p / tpb)]
                blocks = table[self.manager.device_ids(seq, used)]  # [nb, 2, L, T, H, D]
                past = blocks.permute(1, 2, 0, 3, 4, 5).reshape(2, L, -1, H, D)[:, :, :p]
            pasts_kv.append(past)
            inputs.append(agent.tokens[p : p + n])
        return padded_forward(self.model, self.cache_kw, spec, pasts_kv, inputs, table.device)

    def _write(self, agent: Agent, kv: torch.Tensor, start: int) -> None:
        """K/V `[2, L, n, H, D]` of tokens `start..` into the agent's blocks; hash full ones."""
        seq, tpb = self._seq(agent), self.spec.tokens_per_block
        indices = sorted(seq.table)
        n, done = kv.shape[2], 0
        while done < n:
            p = start + done
            b, off = divmod(p, tpb)
            m = min(tpb - off, n - done)
            block = seq.table[indices[b]]
            self.manager.kv(block)[:, :, off : off + m] = kv[:, :, done : done + m]
            if off + m == tpb and len(agent.hashes) == b:
                parent = agent.hashes[-1] if agent.hashes else None
                h = hash_block_tokens(parent, agent.tokens[b * tpb : (b + 1) * tpb])
                agent.hashes.append(h)
                self.manager.commit_hash(seq, indices[b], h)
            done += m

    def _emit(self, call: Call, token: int) -> None:
        agent = call.agent
        now = self.clock()
        if call.first_token_s is None:
            call.first_token_s = now
        with call.cond:
            call.out.append(token)
            agent.tokens.append(token)
            if call.stop and token in self.eos:
                call.finish_reason = "stop"
            elif len(call.out) >= call.max_tokens:
                call.finish_reason = "length"
            call.cond.notify_all()
        if call.on_token is not None:
            call.on_token(token)
        if call.done:
            call.done_s = now
            self._finish(call)

    # ------------------------------------------------------------------ call ends

    def _finish(self, call: Call) -> None:
        self.running.remove(call)
        agent = call.agent
        if call.node is not None:
            self.nodes[call.node] = list(call.out)
        nxt = None
        if agent.program is not None and agent.step_index < len(agent.program.steps):
            nxt = agent.program.steps[agent.step_index]
        hint = call.tool_hint or ((nxt.name, nxt.duration_s) if isinstance(nxt, Tool) else None)
        if hint is None and agent.program is None and self.policy != "baseline":
            hint = ("client", None)  # a chat client's next turn: keep the KV like a tool call
        if hint is not None:
            self._tool_call(agent, *hint)
        elif self.policy == "baseline":
            self._reset_kv(agent)
        if agent.program is not None:
            self._advance(agent)
        if agent.handle is not None:
            with agent.handle.cond:
                agent.handle.cond.notify_all()

    def _fail(self, call: Call, exc: BaseException) -> None:
        for queue in (self.waiting, self.running):
            if call in queue:
                queue.remove(call)
        with call.cond:
            call.error = exc
            call.done_s = self.clock()
            call.cond.notify_all()
        self.counters["failed"] += 1

    def _sample_kv(self, stats: dict[str, Any]) -> None:
        pool = self.manager.pools.get("device")
        if pool is not None:
            self.kv_samples.append(1.0 - pool.num_free / pool.num_blocks)

    def stats(self) -> dict[str, Any]:
        with self.lock:
            return {
                "policy": self.policy_name,
                "programs": len(self.agents),
                "waiting": len(self.waiting),
                "running": len(self.running),
                **self.counters,
            }


__all__ = [
    "LLM",
    "AgentEngine",
    "Call",
    "CallFailed",
    "ContextTooLongError",
    "Program",
    "ProgramHandle",
    "ProgramResult",
    "Tool",
    "lm_spec",
    "load_causal_lm",
]
