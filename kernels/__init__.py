"""Attention and RoPE backends (installed as streamrt.kernels).

Import them only through this package: optional GPU kernels (FlexAttention,
xformers, flash-attn, Triton) are chosen here, behind one gate, so the rest of the
runtime never imports them directly.
"""

from streamrt.kernels.attention import sdpa
from streamrt.kernels.rope import apply_rope, apply_wan_rope, rope_frequencies, wan_rope_cos_sin

__all__ = ["apply_rope", "apply_wan_rope", "rope_frequencies", "sdpa", "wan_rope_cos_sin"]
