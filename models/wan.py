"""Wan transformer helpers: configs the tests and tiny models use (the class is diffusers')."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import WanTransformer3DModel
from diffusers.models.transformers.transformer_wan import WanAttnProcessor


def tiny_wan_config(**overrides: Any) -> dict[str, Any]:
    """A ~100k-parameter `WanTransformer3DModel` config for tests (same class as Wan 1.3B)."""
    config = {
        "patch_size": (1, 2, 2),
        "num_attention_heads": 2,
        "attention_head_dim": 12,
        "in_channels": 4,
        "out_channels": 4,
        "text_dim": 16,
        "freq_dim": 16,
        "ffn_dim": 32,
        "num_layers": 2,
        "cross_attn_norm": True,
        "rope_max_seq_len": 64,
    }
    config.update(overrides)
    return config


def build_wan(
    config: dict[str, Any], seed: int = 0, dtype: torch.dtype = torch.float32
) -> WanTransformer3DModel:
    """A randomly initialised transformer (deterministic for `seed`), in eval mode."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = WanTransformer3DModel(**config)
    return (model if dtype == torch.float32 else model.to(dtype)).eval()


class MaskedWanProcessor(WanAttnProcessor):
    """diffusers' Wan self-attention processor with a fixed attention mask (the Wan block
    passes None, so the mask is given here). Training and the exactness reference use it."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.mask = mask

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None
    ):
        return super().__call__(attn, hidden_states, encoder_hidden_states, self.mask, rotary_emb)


def block_causal_mask(num_frames: int, chunk_frames: int, tokens_per_frame: int) -> torch.Tensor:
    """`[L, L]` bool, True where query token may see key token: same or older chunk."""
    chunk = torch.arange(num_frames * tokens_per_frame) // tokens_per_frame // chunk_frames
    return chunk[:, None] >= chunk[None, :]


def apply_block_causal(transformer: torch.nn.Module, mask: torch.Tensor) -> None:
    """Self-attention of every block under `mask`; cross-attention stays diffusers' own."""
    n = len(transformer.blocks)
    transformer.set_attn_processor(
        {f"blocks.{i}.attn1.processor": MaskedWanProcessor(mask) for i in range(n)}
        | {f"blocks.{i}.attn2.processor": WanAttnProcessor() for i in range(n)}
    )
