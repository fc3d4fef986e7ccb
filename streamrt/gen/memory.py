"""A memory plan for a real generator on one GPU, by arithmetic: what Wan-1.3B at 480x832
needs on a 16 GB and a 24 GB card (weights, KV window, prompt K/V, activations, VAE).

Parameter counts are exact: the models are built on PyTorch's meta device (no memory, no
weights) from the configs the real checkpoints use. Working sets are estimates with the
formula stated at each item; `MemoryPlan.table()` prints them.

    transformer     parameters x weight bytes
    VAE             parameters x weight bytes (decoder and encoder; the encoder only for
                    video-to-video, counted anyway)
    text encoder    UMT5-XXL parameters x weight bytes when it stays on the GPU; default
                    on the CPU (it runs once per prompt and its embeddings are cached)
    KV window       per stream and sequence: kept frames x tokens per frame x layers x
                    2 (K and V) x hidden size x KV bytes (FP8 KV: 1 byte)
    prompt K/V      per prompt: text tokens x layers x 2 x hidden size x KV bytes
    activations     one forward of one chunk: 8 hidden-size tensors of its tokens (residual,
                    norms, q, k, v, attention out, modulation) + 2 FFN-size tensors, plus
                    the gathered K/V of the window for one layer and its rotated K copy
    VAE decode      the decoder's full-resolution stage for one latent frame's output frames:
                    4 feature maps of base_dim channels x temporal frames x height x width
    runtime         CUDA context and allocator slack: 1 GiB
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

GIB = 1024**3

WAN_1_3B = {
    "patch_size": (1, 2, 2),
    "num_attention_heads": 12,
    "attention_head_dim": 128,
    "in_channels": 16,
    "out_channels": 16,
    "text_dim": 4096,
    "freq_dim": 256,
    "ffn_dim": 8960,
    "num_layers": 30,
    "cross_attn_norm": True,
    "eps": 1e-6,
}
"""`WanTransformer3DModel` config of Wan2.1-T2V-1.3B (and every causal model distilled from it)."""

UMT5_XXL = {
    "vocab_size": 256384,
    "d_model": 4096,
    "d_kv": 64,
    "d_ff": 10240,
    "num_layers": 24,
    "num_heads": 64,
    "feed_forward_proj": "gated-gelu",
}
"""Wan's text encoder (umt5-xxl, encoder only)."""

_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float8_e4m3fn": 1, "float8_e5m2": 1}


def _params(build) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in build().parameters())


def wan_parameters() -> dict[str, int]:
    """Exact parameter counts of Wan-1.3B's transformer, VAE and text encoder."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    return {
        "transformer": _params(lambda: WanTransformer3DModel(**WAN_1_3B)),
        "vae": _params(AutoencoderKLWan),
        "text_encoder": _params(lambda: UMT5EncoderModel(UMT5Config(**UMT5_XXL))),
    }


@dataclass
class MemoryPlan:
    """Bytes per item on one card, and whether they fit."""

    card_bytes: int
    items: dict[str, int] = field(default_factory=dict)
    per_stream_bytes: int = 0
    """What one more stream adds (its KV window and prompt K/V)."""

    @property
    def total(self) -> int:
        return sum(self.items.values())

    @property
    def fits(self) -> bool:
        return self.total <= self.card_bytes

    @property
    def more_streams(self) -> int:
        """Streams beyond the planned ones that the rest of the card would hold."""
        return max(0, (self.card_bytes - self.total) // self.per_stream_bytes)

    def table(self) -> str:
        lines = [f"{name:<34}{b / GIB:8.2f} GiB" for name, b in self.items.items()]
        verdict = "fits" if self.fits else "does NOT fit"
        lines.append(
            f"{'total':<34}{self.total / GIB:8.2f} GiB of {self.card_bytes / GIB:.0f} GiB: "
            f"{verdict}" + (f", room for {self.more_streams} more stream(s)" if self.fits else "")
        )
        return "\n".join(lines)


def memory_plan(
    card_gib: float,
    streams: int = 1,
    height: int = 480,
    width: int = 832,
    chunk_frames: int = 3,
    kept_frames: int = 21,
    weight_dtype: str = "bfloat16",
    kv_dtype: str = "bfloat16",
    text_encoder_on_gpu: bool = False,
    text_tokens: int = 512,
    params: dict[str, int] | None = None,
) -> MemoryPlan:
    """The plan for `streams` Wan-1.3B streams at `height` x `width` on a `card_gib` card
    (defaults: the Self-Forcing preset, `configs/wan-1.3b-self-forcing.yaml`: 3-frame chunks,
    3 sink + 18 window frames kept, bf16)."""
    p = params or wan_parameters()
    w, kv = _BYTES[weight_dtype], _BYTES[kv_dtype]
    cfg = WAN_1_3B
    dim = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    layers = cfg["num_layers"]
    tokens_per_frame = (height // 8 // 2) * (width // 8 // 2)  # VAE 8x, patch 2x2
    kv_window = kept_frames * tokens_per_frame * layers * 2 * dim * kv
    prompt_kv = text_tokens * layers * 2 * dim * kv
    q = chunk_frames * tokens_per_frame
    keys = kept_frames * tokens_per_frame
    activations = (8 * q * dim + 2 * q * cfg["ffn_dim"]) * w + 3 * keys * dim * w
    temporal = 4  # Wan VAE: 4 frames per latent frame after the first
    vae_decode = 4 * 96 * temporal * height * width * w  # base_dim 96 at full resolution
    plan = MemoryPlan(card_bytes=int(card_gib * GIB))
    plan.items = {
        "transformer weights": p["transformer"] * w,
        "VAE weights": p["vae"] * w,
        "text encoder weights": p["text_encoder"] * w if text_encoder_on_gpu else 0,
        f"KV window x {streams} stream(s)": streams * kv_window,
        f"prompt K/V x {streams}": streams * prompt_kv,
        "forward activations": activations,
        "VAE decode working set": vae_decode,
        "CUDA context + allocator": GIB,
    }
    plan.per_stream_bytes = kv_window + prompt_kv
    return plan
