"""`torch.compile` of a streaming transformer: a few graphs per stream, each whole.

`gen.compile` (`off`, `default`, `reduce-overhead`, `max-autotune`: torch.compile's modes)
compiles the transformer's forward with `fullgraph=True`, so a graph break is found, not
a silent slowdown. What makes the streaming forward one graph:

- the attention processors read tensors only: the forward's page ids, RoPE pairs and mask
  (`BatchLayout`) and the prompt's cross-attention K/V (`ForwardContext.prepare_prompts`),
  all prepared in eager code before the call;
- the cache pool is written and read by one opaque op per layer
  (`streamrt::cache_exchange`), which mutates the pool in place: written with the graph's
  own ops, the pool would be copied back whole after every forward;
- the layout has one structure for every forward (`BatchLayout.build(uniform=True)`): a
  mask and turned keys always present, prompt K/V always contiguous; rows keeping
  different numbers of keys attend in one masked call.

What keeps it from recompiling: every size that changes between forwards (rows, kept
blocks while a window fills, frames or tokens per forward) is marked dynamic before each
call, so a stream's graphs are those of its structurally different forwards (one row or
several; per-frame or per-token timesteps; attention scores kept or not), all built while
its window fills; then none over any number of chunks (`tests/unit/test_compile.py`).
Outputs equal eager within float32 rounding. The graphs are shared by every engine on the
same model (Dynamo caches them on the forward's code).

Should Dynamo still refuse a forward (a graph break in a model streamrt has not seen, its
recompile limit reached), `CompiledForward` warns once and runs that model eager from then
on: a stream is never lost to the compiler. The check happens before the forward runs, so
nothing is written twice.

A layer pipeline's ranks compile their share of blocks (`compiled_blocks`); after blocks
move between ranks, the next forward builds graphs for the new range.

`reduce-overhead` (CUDA graphs) needs a GPU and is untested here: no GPU was lent.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from streamrt.gen.attention import ForwardContext

log = logging.getLogger(__name__)

_REFUSED = (
    torch._dynamo.exc.Unsupported,
    torch._dynamo.exc.FailOnRecompileLimitHit,
    torch._dynamo.exc.BackendCompilerFailed,
)
"""What Dynamo raises before a compiled call runs: the eager module takes over."""


class CompiledForward:
    """`fn` compiled in `mode`, falling back to `fn` itself, for good, the first time the
    compiler refuses a call (`fell_back` says why)."""

    def __init__(self, fn: Callable, mode: str, backend: str = "inductor") -> None:
        self.eager = fn
        self.compiled = torch.compile(
            fn,
            fullgraph=True,
            backend=backend,
            mode=None if mode == "default" or backend != "inductor" else mode,
        )
        self.fell_back: str | None = None

    def __call__(self, *args, **kwargs):
        if self.fell_back is None:
            try:
                return self.compiled(*args, **kwargs)
            except _REFUSED as exc:
                self.fell_back = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
                log.warning("torch.compile refused a forward; running eager: %s", self.fell_back)
        return self.eager(*args, **kwargs)


def compiled_model(
    transformer: torch.nn.Module, mode: str, backend: str = "inductor"
) -> Callable[..., torch.Tensor]:
    """The callable a streaming forward runs: `transformer` itself (`off`), or its compiled
    forward in `mode` (a `CompiledForward`), built once per model, mode and backend
    (`backend="eager"` traces with Dynamo only: guards and graph breaks without code
    generation, for tests). `mode` is one of `COMPILE_MODES` (`GenConfig` checks it)."""
    if mode == "off":
        return transformer
    built = transformer.__dict__.setdefault("_streamrt_compiled", {})
    if (mode, backend) not in built:
        built[mode, backend] = CompiledForward(transformer, mode, backend)
    return built[mode, backend]


def compiled_blocks(mode: str, backend: str = "inductor") -> Callable[..., torch.Tensor]:
    """`run_blocks`, compiled in `mode` (`off`: as it is): a layer pipeline rank's share of
    the forward (its blocks), the rest of which stays eager."""
    return run_blocks if mode == "off" else CompiledForward(run_blocks, mode, backend)


def run_blocks(blocks, hidden, text, proj) -> torch.Tensor:
    """`hidden` through `blocks` as `WanTransformer3DModel.forward` runs them (their
    processors do their own RoPE)."""
    for block in blocks:
        hidden = block(hidden, text, proj, None)
    return hidden


def mark_dynamic(ctx: ForwardContext, *inputs: tuple[torch.Tensor, tuple[int, ...]]) -> None:
    """Mark the sizes that vary between a stream's forwards as dynamic (no recompile when
    they change): the given `(tensor, dims)` of the call's inputs, and the sizes of the
    context's page ids, rotations, mask and prompt K/V."""
    batch = ctx.batch
    if batch.table.is_cuda:  # CUDA graphs replay a pool written in place only at a fixed
        torch._dynamo.mark_static_address(batch.table)  # address (untested: no GPU here)
    marks = [*inputs, (batch.write_ids, (0,)), (batch.rope, (0, 1)), (batch.read_ids, (0, 1))]
    marks += [(batch.shift_ids, (0,)), (batch.shift, (0,)), (batch.mask, (0, 3))]
    marks += [(t, (0,)) for kv in (ctx.text_kv or {}).values() for t in kv]
    for t, dims in marks:
        if t is not None:
            for dim in dims:
                torch._dynamo.maybe_mark_dynamic(t, dim)
