"""Wan transformer helpers: configs the tests and tiny models use (the class is diffusers')."""

from __future__ import annotations

from typing import Any

import torch
from diffusers import WanTransformer3DModel


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
