"""`torch.compile` of a streaming transformer: one graph per stream layout, whole.

`gen.compile` (`off`, `default`, `reduce-overhead`, `max-autotune`: torch.compile's modes)
compiles the transformer's forward with `fullgraph=True`, so a graph break is an error,
not a silent slowdown. What makes the streaming forward one graph:

- the attention processors read tensors only: the forward's page ids, RoPE pairs and mask
  (`BatchLayout`) and the prompt's cross-attention K/V (`ForwardContext.prepare_prompts`),
  all prepared in eager code before the call;
- the cache pool is written and read by one opaque op per layer
  (`streamrt::cache_exchange`), which mutates the pool in place: written with the graph's
  own ops, the pool would be copied back whole after every forward;
- rows keeping different numbers of keys attend in one masked call.

What keeps it from recompiling: every size that changes between forwards (rows, kept
blocks while a window fills, frames per forward) is marked dynamic before each call, so
the graphs of a stream are those of its structurally different forwards (one row or
several, rows of equal or of different lengths, positions shifted or not), all met while
its window fills; then none over any number of chunks (`tests/unit/test_compile.py`).
Outputs equal eager within float32 rounding. The graphs are shared by every engine on the
same model (Dynamo caches them on the forward's code).

A layer pipeline's ranks compile their share of blocks (`compiled_blocks`); after blocks
move between ranks, the next forward builds graphs for the new range.

`reduce-overhead` (CUDA graphs) needs a GPU and is untested here: no GPU was lent.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from streamrt.errors import InputError
from streamrt.gen.attention import ForwardContext

MODES = ("off", "default", "reduce-overhead", "max-autotune")


def compiled_model(
    transformer: torch.nn.Module, mode: str, backend: str = "inductor"
) -> Callable[..., torch.Tensor]:
    """The callable a streaming forward runs: `transformer` itself (`off`), or its compiled
    forward in `mode`, built once per model, mode and backend (`backend="eager"` traces
    with Dynamo only: guards and graph breaks without code generation, for tests)."""
    if mode not in MODES:
        raise InputError(f"gen.compile is {mode!r}; choose one of: {', '.join(MODES)}")
    if mode == "off":
        return transformer
    built = transformer.__dict__.setdefault("_streamrt_compiled", {})
    key = (mode, backend)
    if key not in built:
        built[key] = torch.compile(
            transformer,
            fullgraph=True,
            backend=backend,
            mode=None if mode == "default" or backend != "inductor" else mode,
        )
    return built[key]


def compiled_blocks(mode: str, backend: str = "inductor") -> Callable[..., torch.Tensor]:
    """`run_blocks`, compiled in `mode` (`off`: as it is): a layer pipeline rank's share of
    the forward (its blocks), the rest of which stays eager."""
    if mode == "off":
        return run_blocks
    return torch.compile(
        run_blocks,
        fullgraph=True,
        backend=backend,
        mode=None if mode == "default" or backend != "inductor" else mode,
    )


def run_blocks(blocks, hidden, text, proj) -> torch.Tensor:
    """`hidden` through `blocks` as `WanTransformer3DModel.forward` runs them (their
    processors do their own RoPE)."""
    for block in blocks:
        hidden = block(hidden, text, proj, None)
    return hidden


def mark_dynamic(ctx: ForwardContext, *inputs: torch.Tensor) -> None:
    """Mark the sizes that vary between a stream's forwards as dynamic (no recompile when
    they change): the batch dimension of the inputs, frames per forward, and the page ids,
    rotations, mask and prompt K/V of the context."""
    batch = ctx.batch
    if batch.table.is_cuda:  # CUDA graphs replay a pool written in place only at a fixed
        torch._dynamo.mark_static_address(batch.table)  # address (untested: no GPU here)
    for t in inputs:
        torch._dynamo.maybe_mark_dynamic(t, 0)
    first = inputs[0]
    if first.dim() in (3, 5):  # the frames of latents [B, C, F, H, W], tokens of hidden states
        torch._dynamo.maybe_mark_dynamic(first, 2 if first.dim() == 5 else 1)
    for t in (batch.write_ids, batch.rope, batch.shift_ids, batch.shift):
        if t is not None:
            torch._dynamo.maybe_mark_dynamic(t, 0)
    torch._dynamo.maybe_mark_dynamic(batch.rope, 1)
    for dim in (0, 1):
        torch._dynamo.maybe_mark_dynamic(batch.read_ids, dim)
    if batch.mask is not None:
        torch._dynamo.maybe_mark_dynamic(batch.mask, 0)
        torch._dynamo.maybe_mark_dynamic(batch.mask, 3)
    for k, v in (ctx.text_kv or {}).values():
        torch._dynamo.maybe_mark_dynamic(k, 0)
        torch._dynamo.maybe_mark_dynamic(v, 0)
