"""Attention backends behind one gate. `sdpa` (torch scaled_dot_product_attention) is the
reference and default; the others must match it (tests/unit/test_kernels.py).

    sdpa      torch SDPA (CPU and GPU)
    flex      torch FlexAttention (compiled on CUDA; eager, unfused on CPU)
    xformers  xformers.ops.memory_efficient_attention (CUDA, if installed)
    flash     flash_attn.flash_attn_func (CUDA, fp16/bf16, if installed)

All take token-major tensors `[..., tokens, heads, head_dim]`; K/V may have fewer heads
than Q (grouped-query attention). Nothing outside this package imports a kernel library.
"""

from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F

from streamrt.errors import InputError

Attention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
_selected = "sdpa"


def _expand_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, head_dim: int = -2):
    groups = q.shape[head_dim] // k.shape[head_dim]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=head_dim)
        v = v.repeat_interleave(groups, dim=head_dim)
    return k, v


def sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Reference attention; `mask` is boolean, True where a query may attend."""
    qh, kh, vh = (t.transpose(-3, -2) for t in (q, k, v))  # [..., heads, tokens, dim]
    kh, vh = _expand_kv(qh, kh, vh, head_dim=-3)
    return F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask).transpose(-3, -2)


def _batched(fn):
    """Lift a `[B, S, H, D]` kernel to inputs with or without the batch dimension."""

    def run(q, k, v):
        if q.dim() == 3:
            return fn(q[None], k[None], v[None])[0]
        return fn(q, k, v)

    return run


@_batched
def _flex(q, k, v):
    from torch.nn.attention.flex_attention import flex_attention

    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))
    kh, vh = _expand_kv(qh, kh, vh, head_dim=1)
    fn = _compiled_flex() if q.is_cuda else flex_attention
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        return fn(qh, kh, vh).transpose(1, 2)


_FLEX = None


def _compiled_flex():
    global _FLEX
    if _FLEX is None:
        from torch.nn.attention.flex_attention import flex_attention

        _FLEX = torch.compile(flex_attention, dynamic=True)
    return _FLEX


@_batched
def _xformers(q, k, v):
    import xformers.ops as xops

    k, v = _expand_kv(q, k, v)
    return xops.memory_efficient_attention(q, k, v)


@_batched
def _flash(q, k, v):
    from flash_attn import flash_attn_func

    dtype = q.dtype
    half = torch.bfloat16 if dtype not in (torch.float16, torch.bfloat16) else dtype
    return flash_attn_func(q.to(half), k.to(half), v.to(half)).to(dtype)  # GQA native


BACKENDS: dict[str, Attention] = {
    "sdpa": sdpa,
    "flex": _flex,
    "xformers": _xformers,
    "flash": _flash,
}


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Backends usable on `device` here (libraries installed, CUDA where needed)."""
    cuda = torch.device(device).type == "cuda" and torch.cuda.is_available()
    out = ["sdpa"]
    if importlib.util.find_spec("torch.nn.attention.flex_attention") is not None:
        out.append("flex")
    if cuda and importlib.util.find_spec("xformers") is not None:
        out.append("xformers")
    if cuda and importlib.util.find_spec("flash_attn") is not None:
        out.append("flash")
    return out


def set_attention_backend(name: str) -> None:
    """Choose the backend `attend` uses (process-wide)."""
    global _selected
    if name not in BACKENDS:
        raise InputError(
            f"unknown attention backend {name!r}; choose one of: {', '.join(BACKENDS)}"
        )
    _selected = name


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Attention with the selected backend (cache policies choose the keys).

    `mask` (boolean, True where a query may attend, broadcast to `[..., heads, q, k]`)
    hides the padding of rows batched with different key counts (in a compiled forward
    on the CPU it is there, all True, even without padding); it runs on SDPA, which takes
    a mask on every device (the other backends here take none).
    """
    if mask is not None:
        return sdpa(q, k, v, mask)
    return BACKENDS[_selected](q, k, v)
