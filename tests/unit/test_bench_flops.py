"""The benches' roofline: the CPU's matmul peak and a stream's FLOPs per frame."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from streamrt.apps.bench import flops, peers


@pytest.fixture(autouse=True)
def _threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_flop_count_includes_cpu_attention():
    flops.count_cpu_flash_attention()
    flops.count_cpu_flash_attention()  # once is enough; twice is harmless
    q, k, v = torch.randn(2, 4, 8, 16), torch.randn(2, 4, 12, 16), torch.randn(2, 4, 12, 16)
    counter = FlopCounterMode(display=False)
    with counter:
        torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert counter.get_total_flops() == 2 * (2 * 2 * 4 * 8 * 12 * 16)  # QK^T and PV


def test_the_peak_is_the_best_of_the_cube_and_the_models_own_shapes(monkeypatch):
    seen = []

    def fake(m, k, n):
        seen.append((m, k, n))
        return 50.0 if (m, k, n) == (192, 128, 256) else 10.0

    monkeypatch.setattr(flops, "_gflops", fake)
    assert flops.matmul_peak_gflops(1) == 10.0
    assert seen == [(flops.SQUARE,) * 3]
    seen.clear()
    assert flops.matmul_peak_gflops(1, 128, 256) == 50.0
    assert {(m, 128, 128) for m in flops.MODEL_SHAPES_TOKENS} <= set(seen)
    assert {(m, 256, 128) for m in flops.MODEL_SHAPES_TOKENS} <= set(seen)
    assert flops.model_widths(peers.tiny_parts()[0]) == (128, 256)


def test_a_real_products_throughput_is_measured():
    torch.set_num_threads(1)
    assert 0.05 < flops._gflops(64, 64, 64, seconds=0.01, repeats=2) < 1e4


def test_stream_flops_per_frame_counts_the_decode_of_an_overlapped_stream():
    """The decode runs in another thread by default (`overlap_decode`), where a dispatch
    mode sees nothing: the count must still include it."""
    from streamrt.config import GenConfig
    from streamrt.gen.engine import GenEngine
    from streamrt.gen.generator import StreamGenerator
    from streamrt.models.codec import WanVAECodec

    transformer, text, vae = peers.tiny_parts()
    cfg = GenConfig(height=32, width=32, chunk_frames=2)
    assert cfg.overlap_decode
    gen = StreamGenerator(GenEngine(transformer, text, WanVAECodec(vae), cfg))

    def by_hand(overlap: bool) -> float:
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            n = sum(1 for _ in gen.stream(peers.PROMPT, num_frames=9, overlap_decode=overlap))
        assert n == 9
        return counter.get_total_flops() / n

    by_hand(False)  # the prompt's embedding is cached from here on
    got = flops.stream_flops_per_frame(gen, peers.PROMPT, 9)
    assert got == by_hand(False)
    assert by_hand(True) < got  # the overlap thread's decode convolutions were not seen
