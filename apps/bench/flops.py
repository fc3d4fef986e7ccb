"""What this CPU can compute at most, and what a stream asks of it: the benches' roofline.

`matmul_peak_gflops` is the float32 matmul throughput this CPU reaches (the best of a large
square product and the transformer's own product shapes, so a small model is not measured
against a peak its shapes never see); `stream_flops_per_frame` counts a whole stream's
FLOPs with `torch.utils.flop_counter`. Their ratio is the most frames per second any
schedule of that model can give on these threads: batching removes fixed costs, not FLOPs.
"""

from __future__ import annotations

import math
import time

import torch

SQUARE = 1024
"""Side of the large square product every peak includes."""

MODEL_SHAPES_TOKENS = (80, 192, 768, 1536)
"""Rows (tokens) of the model-shaped products: one stream's forward up to 8 batched rows."""


def count_cpu_flash_attention() -> None:
    """Teach `FlopCounterMode` the CPU flash-attention kernel SDPA runs here (torch counts
    only the CUDA kernels': without this the attention's FLOPs are left out)."""
    from torch.utils import flop_counter

    op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    if op in flop_counter.flop_registry or op.default in flop_counter.flop_registry:
        return

    @flop_counter.register_flop_formula(op)
    def _(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


def _gflops(m: int, k: int, n: int, seconds: float = 0.05, repeats: int = 5) -> float:
    """Best-of-`repeats` float32 GFLOP/s of an `m x k @ k x n` product."""
    a, b = torch.randn(m, k), torch.randn(k, n)
    a @ b  # warm-up (allocation, kernel selection)
    t0 = time.perf_counter()
    a @ b
    inner = max(1, int(seconds / max(time.perf_counter() - t0, 1e-7)))
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            a @ b
        best = min(best, (time.perf_counter() - t0) / inner)
    return 2 * m * k * n / best / 1e9


def matmul_peak_gflops(threads: int, hidden: int | None = None, ffn: int | None = None) -> float:
    """This CPU's float32 matmul throughput on `threads` threads: the best of a 1024-cube
    product and, given the model's `hidden` (and `ffn`) width, its attention and
    feed-forward products at one to eight streams' tokens."""
    torch.set_num_threads(threads)
    shapes = [(SQUARE, SQUARE, SQUARE)]
    if hidden:
        for m in MODEL_SHAPES_TOKENS:
            shapes.append((m, hidden, hidden))
            if ffn:
                shapes += [(m, hidden, ffn), (m, ffn, hidden)]
    return max(_gflops(*s) for s in shapes)


def model_widths(transformer: torch.nn.Module) -> tuple[int, int]:
    """(hidden, feed-forward) widths of a diffusers Wan transformer."""
    cfg = transformer.config
    return cfg.num_attention_heads * cfg.attention_head_dim, cfg.ffn_dim


def stream_flops_per_frame(generator, prompt: str, num_frames: int) -> float:
    """FLOPs per returned frame of a whole `num_frames` stream of `generator` (a
    `StreamGenerator`): every forward while its window fills and after, and the decode."""
    from torch.utils.flop_counter import FlopCounterMode

    count_cpu_flash_attention()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        # decoded in this thread: a dispatch mode does not see the overlap thread's ops
        stream = generator.stream(prompt, num_frames=num_frames, overlap_decode=False)
        frames = sum(1 for _ in stream)
    return counter.get_total_flops() / frames
