"""How a `VideoQA` session lays out its sequences: its KV blocks, token ids and RoPE
positions, and the model it loads. Module functions, so that training
(`streamrt.models.train_vqa`) builds its sequences with exactly the token ids and positions
a session uses at inference."""

from __future__ import annotations

from collections.abc import Sequence as SequenceABC
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch

from streamrt.cache import KVSpec
from streamrt.config import QAConfig
from streamrt.errors import InputError


def kv_spec(adapter: Any) -> KVSpec:
    """The KV blocks of a session on this model: one frame's tokens per block."""
    return KVSpec(
        adapter.num_layers,
        adapter.num_kv_heads,
        adapter.head_dim,
        adapter.tokens_per_frame,
        adapter.dtype,
    )


def load_qa_model(path: str | Path | None = None, **config: Any) -> tuple[Any, Any, QAConfig]:
    """`(adapter, tokenizer, config)` of a Video-LLM directory (None: the embedded one);
    `config` keys are `QAConfig` fields over the directory's own settings."""
    from transformers import AutoTokenizer

    from streamrt.cache.spec import dtype_from_name
    from streamrt.models.vlm import load_adapter, model_qa_settings, resolve_model_dir

    known = {f.name for f in fields(QAConfig)}
    unknown = sorted(set(config) - known)
    if unknown:
        raise InputError(f"unknown QA option(s) {unknown}; known: {', '.join(sorted(known))}")
    path = resolve_model_dir() if path is None else resolve_model_dir(path)
    cfg = QAConfig(**{**model_qa_settings(path), **config})
    adapter = load_adapter(path, dtype=dtype_from_name(cfg.dtype), device=cfg.device)
    tokenizer = AutoTokenizer.from_pretrained(path)
    adapter.use_frame_wrapper(tokenizer)  # real checkpoints: a frame as the processor has it
    return adapter, tokenizer, cfg


def text_ids(tokenizer: Any, text: str) -> list[int]:
    """Token ids of `text` as a session feeds them (no special tokens)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def question_ids(tokenizer: Any, config: QAConfig, question: Any) -> list[int]:
    """Token ids of `question` put through `config.question_template`, or a clear error."""
    if not isinstance(question, str) or not question.strip():
        raise InputError(f"the question must be non-empty text, got {question!r}")
    try:
        question.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates: undecodable bytes from argv or a file
        raise InputError(
            "the question is not valid text (it holds bytes that are not UTF-8): "
            "ask it again in UTF-8"
        ) from None
    ids = text_ids(tokenizer, config.question_template.format(question=question.strip()))
    if not ids:
        raise InputError(f"the question {question!r} has no tokens for this tokenizer")
    return ids


def lay_out(adapter: Any, blocks: SequenceABC[tuple[str, int]]) -> tuple[torch.Tensor, int]:
    """RoPE positions `[tokens, rope_axes]` of `blocks` (`("text" | "frame", tokens)`) laid
    one after another from 0, and the first free position after them (where new tokens go).

        sink text    t t t t t t t        each token one position further (all axes)
        frame        (s, s+row, s+col)    M-RoPE: one temporal step, a spatial grid
                     s, s+1, ..., s+T-1   1-D RoPE: like text
        next block   s + span             span = max offset + 1 (T for 1-D RoPE)

    This is the stock models' own rule (e.g. Qwen2-VL `get_rope_index`): a retrieved
    frame moved to a new place keeps its token offsets, every axis shifted alike.
    """
    frame = adapter.frame_positions()
    frame_span = int(frame.max()) + 1
    parts, pos = [], 0
    for kind, n in blocks:
        if kind == "text":
            parts.append(adapter.text_positions(n) + pos)
            pos += n
        else:
            parts.append(frame[:n] + pos)
            pos += frame_span
    if not parts:
        return torch.zeros(0, adapter.rope_axes, dtype=torch.long), 0
    return torch.cat(parts), pos
