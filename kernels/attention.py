"""Attention backends. `sdpa` (torch scaled_dot_product_attention) is the reference."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Attention over token-major tensors `[tokens, heads, head_dim]` (or with a leading batch).

    `k`/`v` may have fewer heads than `q` (grouped-query attention); `mask` is boolean,
    True where a query may attend, broadcastable to `[..., heads, q_tokens, k_tokens]`.
    """
    qh, kh, vh = (t.transpose(-3, -2) for t in (q, k, v))  # [..., heads, tokens, dim]
    groups = qh.shape[-3] // kh.shape[-3]
    if groups > 1:
        kh = kh.repeat_interleave(groups, dim=-3)
        vh = vh.repeat_interleave(groups, dim=-3)
    out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask)
    return out.transpose(-3, -2)
