"""Attention and RoPE backends (installed as streamrt.kernels).

Import them only through this package: optional GPU kernels (FlexAttention,
xformers, flash-attn, Triton) are chosen here, behind one gate, so the rest of the
runtime never imports them directly.
"""

from streamrt.kernels.attention import (
    BACKENDS,
    attend,
    available_backends,
    sdpa,
    set_attention_backend,
)
from streamrt.kernels.rope import (
    apply_rope,
    apply_wan_rope,
    rope_frequencies,
    wan_rope_cos_sin,
    wan_rope_halves,
)

__all__ = [
    "BACKENDS",
    "apply_rope",
    "apply_wan_rope",
    "attend",
    "available_backends",
    "rope_frequencies",
    "sdpa",
    "set_attention_backend",
    "wan_rope_cos_sin",
    "wan_rope_halves",
]
