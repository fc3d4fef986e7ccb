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


def wan_rope_cos_sin(
    rope: torch.nn.Module, frames: torch.Tensor, height: int, width: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Wan's 3-D rotary tables for tokens at latent-frame positions `frames`.

    diffusers' `WanRotaryPosEmbed` always counts frames from 0; a streaming cache needs
    arbitrary frame positions (the ones a policy assigns). This reads the model's own
    `freqs_cos` / `freqs_sin` buffers, so the values are exactly the model's.

    Args:
        rope: The model's `WanRotaryPosEmbed` (`transformer.rope`).
        frames: Integer frame position of each frame, `[num_frames]`.
        height: Patches per frame vertically (`latent_height // patch_h`).
        width: Patches per frame horizontally.

    Returns:
        `(cos, sin)`, each `[num_frames * height * width, 1, head_dim]`, frame-major.
    """
    split = [rope.t_dim, rope.h_dim, rope.w_dim]
    out = []
    for table in (rope.freqs_cos, rope.freqs_sin):
        t_tab, h_tab, w_tab = table.split(split, dim=1)
        n = frames.numel()
        ft = t_tab[frames.to(t_tab.device)].view(n, 1, 1, -1).expand(n, height, width, -1)
        fh = h_tab[:height].view(1, height, 1, -1).expand(n, height, width, -1)
        fw = w_tab[:width].view(1, 1, width, -1).expand(n, height, width, -1)
        out.append(torch.cat([ft, fh, fw], dim=-1).reshape(n * height * width, 1, -1))
    return out[0], out[1]


def wan_rope_halves(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The `[..., head_dim // 2]` halves `apply_wan_rope` reads, made contiguous once so a
    forward's layers all reuse them."""
    return cos[..., 0::2].contiguous(), sin[..., 1::2].contiguous()


def apply_wan_rope(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, halves: bool = False
) -> torch.Tensor:
    """Rotate `x` `[..., tokens, heads, head_dim]` with Wan tables (same math as diffusers).

    With `halves`, `cos`/`sin` are already `wan_rope_halves(cos, sin)`.
    """
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    c, s = (cos, sin) if halves else (cos[..., 0::2], sin[..., 1::2])
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * c - x2 * s
    out[..., 1::2] = x1 * s + x2 * c
    return out.type_as(x)


def wan_rope_rotation(cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`wan_rope_halves` tables as one complex table `cos + i sin` (`rotate` reads it)."""
    return torch.complex(cos.float(), sin.float())


def rotate(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """`apply_wan_rope` with a `wan_rope_rotation` table: each interleaved pair of `x`
    `[..., tokens, heads, head_dim]` is one complex number multiplied by the table, one
    kernel instead of eight (7x faster on CPU, bit-identical in float32). Other dtypes take
    `apply_wan_rope`'s path in their own precision, as diffusers does."""
    if x.dtype != torch.float32:
        return apply_wan_rope(x, rotation.real, rotation.imag, halves=True)
    pairs = torch.view_as_complex(x.unflatten(-1, (-1, 2)))
    return torch.view_as_real(pairs * rotation).flatten(-2)
