"""QA sessions and LLM agents on the layer-pipeline server (`streamrt serve --parallel
layers`), on rank 0.

The Video-LLM and the agents' LM are not split over the ranks: rank 0 loads them whole, and
their KV lives in rank 0's cache manager, the one that holds rank 0's share of every
generation stream's KV. Between the pipeline's rounds, rank 0's round thread encodes the
frames queued by every session in one vision batch (as `Runtime`'s step loop does) and runs
one agent step; a question takes the lock ahead of that encoding, and a session opened
with a stream id is fed that stream's frames (every k-th, near the QA model's fps). The
other ranks never see this work.
"""

from __future__ import annotations

from typing import Any

from streamrt.config import RuntimeConfig
from streamrt.runtime.live import feed_watchers
from streamrt.runtime.qa import QAHandle, QASession, QASessions, encode_together


class _Waker:
    """`QAHandle.feed` sets it: the round thread wakes up to encode."""

    def __init__(self, cond) -> None:
        self._cond = cond

    def set(self) -> None:
        with self._cond:
            self._cond.notify_all()


class PipelineSideWork(QASessions):
    """Mixin of `PipelineRuntime`: the `Runtime` QA and agent surface the server uses."""

    def _init_side(
        self, qa_model: str | None, runtime: RuntimeConfig | None, agents, agent_policy: str
    ) -> None:
        self.agents = None
        """The agent engine (rank 0, `agents=`), on rank 0's cache manager."""
        if agents and self.rank == 0:
            from streamrt.agents.engine import AgentEngine

            path = None if agents is True else agents
            self.agents = AgentEngine.from_pretrained(
                path, manager=self.pipe.engine.cache, policy=agent_policy
            )
            self.agents.driver = self  # handles wait for the round thread's steps
        self.qa_model = qa_model
        self.runtime_config = runtime or RuntimeConfig()
        self.sessions: dict[str, QASession] = {}
        self._qa_parts: tuple[Any, Any, Any] | None = None
        self._wake = _Waker(self._cond)
        self.encoded = 0

    def open_qa(
        self,
        stream_id: str | None = None,
        priority: int = 0,
        kv_quota_mb: float | None = None,
        **qa_config: Any,
    ) -> QAHandle:
        """A QA session on rank 0 (with `stream_id`: fed that stream's frames)."""
        with self.lock:
            source = self._get(stream_id) if stream_id is not None else None
            if self._qa_parts is None:
                from streamrt.qa.layout import load_qa_model

                self._qa_parts = load_qa_model(self.qa_model)
            return self._open_session(
                self._qa_parts,
                self.pipe.engine.cache,
                self.runtime_config,
                source,
                stream_id,
                priority,
                kv_quota_mb,
                qa_config,
            )

    def step(self) -> float:
        """The side work (`QAHandle.flush` calls it without a thread)."""
        self._side_work()
        return 0.0

    def _side_waiting(self) -> bool:
        """QA frames queued, or agents with work (or a tool call to poll)."""
        busy = self.agents is not None and self.agents.busy
        return busy or any(s.queue for s in self.sessions.values())

    def _side_work(self) -> None:
        """Between rounds: the queued QA frames in one batch, then one agent step."""
        with self.lock:
            work = [(s, s.take_queued()) for s in self.sessions.values()]
            work = [(s, frames) for s, frames in work if frames]
            if work:
                self.encoded += encode_together(work)
        if self.agents is not None:
            self.agents.step()

    def _feed_watchers(self, live, frames: list, first: int) -> None:
        with self.lock:
            feed_watchers(live.watchers, frames, first, live.playout.fps)

    def _close_side(self) -> None:
        with self.lock:
            for session_id in list(self.sessions):
                self.close_qa(session_id)
        if self.agents is not None:
            for agent_id in list(self.agents.agents):
                self.agents.close_agent(agent_id)

    def qa_stats(self) -> dict[str, Any]:
        with self.lock:
            return {s.id: s.stats() for s in self.sessions.values()}
