"""Rotary position embedding applied at attention time, at positions a cache policy assigns.

Keys are stored before RoPE; rotating them here by the positions of an `AttentionPlan`
is what lets a policy re-position blocks (sink re-alignment, compression, retrieval)
without touching the stored cache.
"""

from __future__ import annotations

import torch


def rope_frequencies(head_dim: int, base: float = 10000.0, device=None) -> torch.Tensor:
    """Inverse frequencies `[head_dim // 2]` of the standard (1-D) rotary embedding."""
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
    exponent = torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim
    return (1.0 / base**exponent).float()


def apply_rope(x: torch.Tensor, positions: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Rotate `x` `[..., tokens, heads, head_dim]` by integer `positions` `[tokens]`.

    Pairs are interleaved (`x[..., 0::2]`, `x[..., 1::2]`), as in Wan's `rope_apply`.
    Computed in float32 and returned in `x`'s dtype.
    """
    inv = rope_frequencies(x.shape[-1], base, x.device)
    angles = positions.to(x.device, torch.float32)[:, None] * inv[None, :]  # [T, D/2]
    cos, sin = angles.cos()[:, None, :], angles.sin()[:, None, :]  # [T, 1, D/2]
    xf = x.float()
    even, odd = xf[..., 0::2], xf[..., 1::2]
    out = torch.empty_like(xf)
    out[..., 0::2] = even * cos - odd * sin
    out[..., 1::2] = even * sin + odd * cos
    return out.to(x.dtype)
