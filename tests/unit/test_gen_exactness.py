"""Chunk-wise streaming through the cache equals diffusers' full forward with a block-causal mask."""

import pytest
import torch

from streamrt.cache import CacheManager, KVSpec
from streamrt.gen.attention import attach_streaming, detach_streaming
from streamrt.gen.forward import chunk_rows, streaming_forward
from streamrt.models.wan import apply_block_causal, block_causal_mask, build_wan, tiny_wan_config


def reference_forward(model, x, frame_t, text, chunk):
    _, _, f, h, w = x.shape
    tpf = (h // 2) * (w // 2)
    apply_block_causal(model, block_causal_mask(f, chunk, tpf))
    with torch.no_grad():
        return model(x, frame_t.repeat_interleave(tpf, dim=1).float(), text, return_dict=False)[0]


def streamed_forward(model, x, frame_t, text, chunk, policy="full", **policy_args):
    _, _, f, h, w = x.shape
    tpf = (h // 2) * (w // 2)
    heads, dim = model.config.num_attention_heads, model.config.attention_head_dim
    mgr = CacheManager(device_bytes=1 << 22, host_bytes=1 << 22)
    mgr.register("gen", KVSpec(len(model.blocks), heads, dim, tpf), offload=False)
    seq = mgr.open_sequence("gen", policy, **policy_args)
    state = attach_streaming(model)
    outs = []
    with torch.no_grad():
        for start in range(0, f, chunk):
            write = [seq.append() for _ in range(chunk)]
            rows = chunk_rows([seq], [write], tpf)
            sl = slice(start, start + chunk)
            outs.append(
                streaming_forward(
                    model, state, rows, x[:, :, sl], frame_t[:, sl], text, text_key="p"
                )
            )
    detach_streaming(model)
    mgr.check_invariants()
    return torch.cat(outs, dim=2), state


@pytest.mark.parametrize("chunk", [1, 3])
def test_chunkwise_cache_equals_block_causal_full_forward(chunk):
    model = build_wan(tiny_wan_config(), seed=1)
    torch.manual_seed(2)
    frames = 6
    x = torch.randn(1, 4, frames, 8, 8)
    text = torch.randn(1, 5, 16)
    frame_t = torch.tensor([[999, 700, 10, 500, 250, 0][:frames]])
    ref = reference_forward(model, x, frame_t, text, chunk)
    got, state = streamed_forward(model, x, frame_t, text, chunk)
    assert (got - ref).abs().max().item() <= 1e-5
    assert ref.abs().mean() > 1e-2  # the comparison is not between zeros
    assert len(state.text_cache["p"]) == len(model.blocks)  # prompt K/V computed once per layer


def test_window_that_drops_frames_differs_from_full_attention():
    """Guard that the exactness test can fail: a 2-frame window must not match full attention."""
    model = build_wan(tiny_wan_config(), seed=1)
    torch.manual_seed(2)
    x = torch.randn(1, 4, 6, 8, 8)
    text = torch.randn(1, 5, 16)
    frame_t = torch.full((1, 6), 500)
    ref = reference_forward(model, x, frame_t, text, 1)
    got, _ = streamed_forward(
        model, x, frame_t, text, 1, "sink_window", sink_blocks=0, window_blocks=2
    )
    assert (got[:, :, :2] - ref[:, :, :2]).abs().max() <= 1e-5  # identical while nothing dropped
    assert (got[:, :, 3:] - ref[:, :, 3:]).abs().max() > 1e-4
