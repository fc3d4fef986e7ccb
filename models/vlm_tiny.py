"""Tiny random Video-LLMs of the stock transformers classes, for tests and benchmarks.

`save_tiny_vlm(path, family)` writes a directory that loads through exactly the
`from_pretrained` path a real checkpoint uses: `config.json`, safetensors weights and a
word-level tokenizer over the procedural world's vocabulary (no download anywhere).
"""

from __future__ import annotations

from pathlib import Path

import torch

from streamrt.errors import InputError

FAMILIES = ("smolvlm", "llava_onevision", "qwen2_vl", "qwen2_5_vl")
IMAGE_SIZE = 32
"""Frame side of the tiny models (4 visual tokens per frame; 64 for Qwen2-VL)."""


def tiny_tokenizer():
    """Word tokenizer over the world's vocabulary plus a few words tests plant."""
    from streamrt.models.text import word_tokenizer
    from streamrt.world import VOCAB

    return word_tokenizer([*VOCAB, "needle", "system", "frames"], text_len=512)


def _text_config(vocab_size: int) -> dict:
    return {
        "vocab_size": vocab_size,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 8,
        "max_position_embeddings": 4096,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
    }


def tiny_vlm(
    family: str,
    vocab_size: int,
    seed: int = 0,
    text: dict | None = None,
    vision: dict | None = None,
    scale_factor: int = 2,
) -> torch.nn.Module:
    """A randomly initialised tiny model of `family` (one of `FAMILIES`).

    `text` / `vision` override entries of the text and vision configs (sizes, layers,
    `image_size`, `patch_size`); `scale_factor` is SmolVLM's pixel-shuffle factor.
    """
    import transformers

    torch.manual_seed(seed)
    text = {**_text_config(vocab_size), **(text or {})}
    image_token = vocab_size - 1  # never produced by the tokenizer
    vision = {
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "image_size": IMAGE_SIZE,
        "patch_size": 8,
        **(vision or {}),
    }
    if family == "smolvlm":
        cfg = transformers.SmolVLMConfig(
            text_config={"model_type": "llama", **text},
            vision_config=vision,
            scale_factor=scale_factor,
            image_token_id=image_token,
        )
        model = transformers.SmolVLMForConditionalGeneration(cfg)
    elif family == "llava_onevision":
        cfg = transformers.LlavaOnevisionConfig(
            text_config={"model_type": "qwen2", **text},
            vision_config={"model_type": "siglip_vision_model", **vision},
            vision_feature_layer=-1,
            vision_feature_select_strategy="full",
            image_token_id=image_token,
            video_token_id=image_token - 1,
        )
        model = transformers.LlavaOnevisionForConditionalGeneration(cfg)
    elif family in ("qwen2_vl", "qwen2_5_vl"):  # patch 2 x merge 2 x 8 tokens a side = 32 px
        v25 = family == "qwen2_5_vl"
        vision_extra = (
            {"out_hidden_size": text["hidden_size"], "intermediate_size": 32}
            if v25
            else {"embed_dim": 16}
        )
        config_cls = transformers.Qwen2_5_VLConfig if v25 else transformers.Qwen2VLConfig
        cfg = config_cls(
            text_config={
                **text,
                "num_attention_heads": 4,
                "rope_parameters": {
                    "rope_type": "default",
                    "rope_theta": 10000.0,
                    "mrope_section": [1, 1, 2],
                },
            },
            vision_config={
                "depth": 1,
                "hidden_size": 16 if v25 else text["hidden_size"],
                "num_heads": 2,
                "patch_size": 2,
                "spatial_merge_size": 2,
                "temporal_patch_size": 2,
                **({"fullatt_block_indexes": [0], "window_size": 8} if v25 else {}),
                **vision_extra,
            },
            image_token_id=image_token,
            video_token_id=image_token - 1,
            vision_start_token_id=image_token - 2,
            vision_end_token_id=image_token - 3,
        )
        model_cls = (
            transformers.Qwen2_5_VLForConditionalGeneration
            if v25
            else transformers.Qwen2VLForConditionalGeneration
        )
        model = model_cls(cfg)
    else:
        raise InputError(f"unknown tiny VLM family {family!r}; choose one of {FAMILIES}")
    return model.eval()


def save_tiny_vlm(path: str | Path, family: str = "smolvlm", seed: int = 0) -> Path:
    """Write a tiny random `family` model and its tokenizer to `path`; return `path`."""
    path = Path(path)
    tok = tiny_tokenizer()
    model = tiny_vlm(family, vocab_size=len(tok) + 4, seed=seed)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
