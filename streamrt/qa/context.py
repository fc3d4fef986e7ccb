"""How the QA runtime plugs into a transformers language model without forking it.

Two extension points, nothing else:

* `PlannedCache`: a `transformers.Cache` whose layers start out holding the K/V the
  runtime laid out for this step (sink + window, or sink + retrieved frames, rotated at
  the plan's positions) and then grow like a `DynamicLayer` with the step's own tokens.
  The mask follows from its length: the step's queries see every planned token and are
  causal among themselves.

* `capture`: forward hooks on the attention projections. transformers applies RoPE
  *before* `Cache.update`, so the keys a Cache receives are already rotated; the output
  of `k_proj` is the same key before RoPE, bit for bit. The runtime stores that (and
  `v_proj`'s output, which RoPE never touches) in the cache manager, so a stored frame
  can later be laid at any position by rotating it there (`VLMAdapter.rotate`).
  `q_proj`'s output gives the pre-RoPE queries ReKV scores blocks with.

Valid for attention layers whose keys are `rope(k_proj(x))` (Llama, Qwen2; not models with
a key norm after the projection).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from transformers.cache_utils import Cache, DynamicLayer


class PlannedLayer(DynamicLayer):
    """A `DynamicLayer` that starts with planned (already rotated) context K/V `[1, H, P, D]`."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        super().__init__()
        self.keys, self.values = keys, values
        self.device = keys.device
        self.is_initialized = True

    def get_seq_length(self) -> int:
        return self.keys.shape[-2]


class PlannedCache(Cache):
    """One `PlannedLayer` per decoder layer; the contexts must have equal lengths (one mask)."""

    def __init__(self, contexts: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        lengths = {k.shape[-2] for k, _ in contexts}
        if len(lengths) > 1:
            raise ValueError(f"per-layer contexts must have one length, got {sorted(lengths)}")
        super().__init__(layers=[PlannedLayer(k, v) for k, v in contexts])


@contextmanager
def capture(
    attention_modules: list[torch.nn.Module], names: tuple[str, ...] = ("k_proj", "v_proj")
) -> Iterator[dict[str, list[torch.Tensor | None]]]:
    """Record the outputs `[1, n, heads * D]` of the named projections of every layer.

    Yields `{name: [per-layer output or None]}`, filled while the block runs; the hooks are
    removed on exit, so the model is untouched outside it.
    """
    out: dict[str, list[torch.Tensor | None]] = {n: [None] * len(attention_modules) for n in names}
    handles = []
    for layer, attn in enumerate(attention_modules):
        for name in names:

            def hook(_mod, _inp, output, _name=name, _layer=layer):
                out[_name][_layer] = output.detach()

            handles.append(getattr(attn, name).register_forward_hook(hook))
    try:
        yield out
    finally:
        for h in handles:
            h.remove()
