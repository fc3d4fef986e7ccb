"""Rotary position embedding at the positions a cache policy assigns.

Caches that store keys before RoPE (the video-QA memory) rotate the kept keys by the
positions of an `AttentionPlan` at attention time, which lets a policy re-position
blocks (retrieval) without touching the stored cache. The generation cache stores keys
rotated once at their own frame and turns only the re-positioned ones (`WanKeyRope`).
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
    `apply_wan_rope`'s path in their own precision, as diffusers does.

    `rotation` is complex, or its real pairs `[..., 2]` (`torch.view_as_real`, a view), the
    form a compiled forward takes: Inductor writes no code for complex tensors, and there
    the pair arithmetic is fused into one kernel anyway.
    """
    if x.dtype != torch.float32 or torch.compiler.is_compiling():
        if rotation.is_complex():
            return apply_wan_rope(x, rotation.real, rotation.imag, halves=True)
        return apply_wan_rope(x, rotation[..., 0], rotation[..., 1], halves=True)
    turn = rotation if rotation.is_complex() else torch.view_as_complex(rotation)
    return torch.view_as_real(torch.view_as_complex(x.unflatten(-1, (-1, 2))) * turn).flatten(-2)


class WanKeyRope:
    """Wan's 3-D RoPE at any frame, for keys stored already rotated.

    A streaming cache that rotates each key once, when it is written, at the frame it was
    written as (its absolute latent frame), never rotates it again while its distance to
    the query stays what it was; only a key a policy re-positions (a re-aligned sink, a
    compressed window) is turned by the difference, on the frame axis alone (`shift`).
    Absolute frames grow without bound, so the frame part is computed here in float64 the
    way diffusers builds its table (`get_1d_rotary_pos_embed`, theta 10000): inside the
    model's table the values are the table's, bit for bit (checked at construction).

    Args:
        rope: The model's `WanRotaryPosEmbed` (`transformer.rope`).
        theta: The embedding's base (diffusers' Wan uses the default 10000).
    """

    def __init__(self, rope: torch.nn.Module, theta: float = 10000.0) -> None:
        t_dim = rope.t_dim
        exponent = torch.arange(0, t_dim, 2, dtype=torch.float64)[: t_dim // 2] / t_dim
        self.freqs = 1.0 / theta**exponent  # [t_dim / 2], float64
        self.half = (rope.t_dim + rope.h_dim + rope.w_dim) // 2
        self.rope = rope
        self._hw: dict[tuple[int, int], torch.Tensor] = {}
        """The height and width part of `at` per grid (the same every forward)."""
        probe = torch.arange(min(rope.max_seq_len, 64))
        cos, sin = wan_rope_cos_sin(rope, probe, 1, 1)
        table = wan_rope_rotation(*wan_rope_halves(cos, sin))[:, 0, : t_dim // 2].cpu()
        if not torch.equal(self._frame_part(probe), table):
            raise ValueError(
                "this model's RoPE frame table is not Wan's default (theta 10000): "
                "keys cannot be stored rotated; pass its theta"
            )

    def _frame_part(self, frames: torch.Tensor) -> torch.Tensor:
        angles = frames.to(torch.float64).cpu()[:, None] * self.freqs[None]
        return torch.complex(angles.cos().float(), angles.sin().float())

    def at(self, frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Complex rotation (`rotate`) of the tokens of frames `frames` (any integers),
        `[n * height * width, 1, head_dim / 2]`, frame-major; equal to
        `rotation(wan_rope_cos_sin(rope, frames, height, width))` inside the model's table."""
        n, t_half = frames.numel(), self.freqs.numel()
        hw = self._hw.get((height, width))
        if hw is None:
            zero = torch.zeros(1, dtype=torch.long)
            cos_sin = wan_rope_cos_sin(self.rope, zero, height, width)
            hw = wan_rope_rotation(*wan_rope_halves(*cos_sin))[:, 0, t_half:]  # [h * w, rest]
            self._hw[(height, width)] = hw
        ft = self._frame_part(frames).to(hw.device)
        return torch.cat(
            [ft[:, None].expand(n, height * width, t_half), hw[None].expand(n, -1, -1)], dim=-1
        ).reshape(n * height * width, 1, self.half)

    def shift(self, deltas: torch.Tensor) -> torch.Tensor:
        """Complex rotation `[n, head_dim / 2]` that moves keys by `deltas` frames (the
        height and width parts are 1)."""
        ft = self._frame_part(deltas)
        return torch.cat([ft, ft.new_ones(ft.shape[0], self.half - ft.shape[1])], dim=1)
