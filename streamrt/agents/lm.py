"""The causal LM an `AgentEngine` runs: loading it, its KV layout, the `Cache` it reads."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicLayer

from streamrt.cache import KVSpec
from streamrt.errors import InputError

DEFAULT_MODEL = "assets/tiny-vqa"


# ---------------------------------------------------------------------- the model's cache


class _PastLayer(DynamicLayer):
    """A `DynamicLayer` that starts with the batch's padded past K/V `[B, H, P, D]`."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        super().__init__()
        self.keys, self.values = keys, values
        self.device = keys.device
        self.dtype = keys.dtype
        self.is_initialized = True

    def get_seq_length(self) -> int:
        return self.keys.shape[-2]


class BatchCache(Cache):
    """The past K/V of every row, padded to one length; `update` appends the step's keys
    (already rotated by the model), which the engine then writes to the blocks."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        super().__init__(layers=[_PastLayer(k, v) for k, v in zip(keys, values)])


def cache_kwarg(model: torch.nn.Module) -> str:
    """transformers 5 renames `past_key_values` to `cache` in some versions."""
    import inspect

    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


# ---------------------------------------------------------------------- loading


def load_causal_lm(path: str | Path | None = None) -> tuple[torch.nn.Module, Any]:
    """`(model, tokenizer)`: a transformers causal-LM directory, or the language model of a
    Video-LLM directory (SmolVLM/Idefics3: its Llama text model and `lm_head`)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from streamrt.embedded import resolve_shipped

    root = resolve_shipped(path or DEFAULT_MODEL)
    config_file = root / "config.json"
    if not config_file.is_file():
        raise InputError(f"{root}: not a model directory (no config.json)")
    raw = json.loads(config_file.read_text())
    tokenizer = AutoTokenizer.from_pretrained(root)
    if "text_config" in raw and raw.get("model_type") in ("smolvlm", "idefics3"):
        from safetensors.torch import load_file

        text = dict(raw["text_config"])
        cfg = AutoConfig.for_model(text.pop("model_type"), **text)
        cfg.tie_word_embeddings = raw.get("tie_word_embeddings", False)
        model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
        state = {}
        for file in sorted(root.glob("*.safetensors")):
            for key, value in load_file(file).items():
                if key.startswith("model.text_model."):
                    state["model." + key[len("model.text_model.") :]] = value
                elif key == "lm_head.weight":
                    state[key] = value
        model.load_state_dict(state, strict=not cfg.tie_word_embeddings)
    else:
        model = AutoModelForCausalLM.from_pretrained(root, attn_implementation="sdpa")
    return model.eval(), tokenizer


def lm_spec(model: torch.nn.Module, tokens_per_block: int) -> KVSpec:
    cfg = model.config
    heads = cfg.num_attention_heads
    return KVSpec(
        cfg.num_hidden_layers,
        getattr(cfg, "num_key_value_heads", None) or heads,
        getattr(cfg, "head_dim", None) or cfg.hidden_size // heads,
        tokens_per_block,
        next(model.parameters()).dtype,
    )


def padded_forward(
    model: torch.nn.Module,
    cache_kw: str,
    spec: KVSpec,
    pasts: list[torch.Tensor | None],
    inputs: list[list[int]],
    device: torch.device,
) -> tuple[torch.Tensor, list[int]]:
    """One forward of a batch of rows, each its past K/V `[2, L, p, H, D]` (None: p = 0)
    and its new token ids at positions p.. . Returns the new K/V `[B, 2, L, N, H, D]` and
    each row's greedy next token (after its last input).

        key columns   0 ........ p_r ... P | P ...... P + n_r ... P + N
        row r         past (attended) | pad | new (causal)   | pad
        a padded query (beyond n_r) attends to itself only; its outputs are dropped
    """
    B, dev = len(inputs), device
    P = max((0 if p is None else p.shape[2]) for p in pasts)
    N = max(len(x) for x in inputs)
    L, H, D = spec.num_layers, spec.num_kv_heads, spec.head_dim
    past = torch.zeros(2, L, B, P, H, D, dtype=spec.dtype, device=dev)
    ids = torch.zeros(B, N, dtype=torch.long, device=dev)
    pos = torch.zeros(B, N, dtype=torch.long, device=dev)
    mask = torch.zeros(B, 1, N, P + N, dtype=torch.bool, device=dev)
    causal = torch.ones(N, N, dtype=torch.bool, device=dev).tril()
    for r, (kv, tokens) in enumerate(zip(pasts, inputs)):
        p, n = (0 if kv is None else kv.shape[2]), len(tokens)
        if p:
            past[:, :, r, :p] = kv
            mask[r, 0, :, :p] = True
        ids[r, :n] = torch.tensor(tokens, dtype=torch.long)
        pos[r] = torch.arange(p, p + N)
        mask[r, 0, :, P : P + N] = causal
        mask[r, 0, n:, P : P + N] = torch.eye(N, dtype=torch.bool, device=dev)[n:]
    cache = BatchCache(
        [past[0, i].transpose(1, 2) for i in range(L)],  # [B, H, P, D]
        [past[1, i].transpose(1, 2) for i in range(L)],
    )
    with torch.no_grad():
        out = model(
            input_ids=ids,
            position_ids=pos,
            attention_mask=mask,
            use_cache=True,
            logits_to_keep=0,
            **{cache_kw: cache},
        )
    new_k = torch.stack([layer.keys[:, :, P:] for layer in cache.layers])  # [L, B, H, N, D]
    new_v = torch.stack([layer.values[:, :, P:] for layer in cache.layers])
    new = torch.stack([new_k, new_v]).permute(2, 0, 1, 4, 3, 5)  # [B, 2, L, N, H, D]
    last = torch.tensor([len(x) - 1 for x in inputs], device=out.logits.device)
    greedy = out.logits[torch.arange(B, device=last.device), last].argmax(-1)
    return new, greedy.tolist()
