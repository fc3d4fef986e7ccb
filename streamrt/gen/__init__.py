"""Streaming generation: causal video diffusion on rolling KV caches."""

from streamrt.gen.generator import StreamGenerator

__all__ = ["StreamGenerator"]
