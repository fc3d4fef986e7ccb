"""LLM agents' KV on the shared cache manager: pin, offload and predictive upload across
tool calls (Continuum, TokenCake). See `streamrt.agents.kv`."""

from streamrt.agents.kv import AgentKV, Resume, ToolCall, ToolDurations

__all__ = ["AgentKV", "Resume", "ToolCall", "ToolDurations"]
