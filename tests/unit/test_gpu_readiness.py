"""GPU readiness, checked on the CPU: FP8 KV blocks (stored in one byte, upcast in
attention) against a reference that rounds the same K/V, and the memory plan of Wan-1.3B
at 480x832 on a 16 GB and a 24 GB card, by arithmetic."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from streamrt.config import GenConfig
from streamrt.errors import InputError
from streamrt.gen.engine import GenEngine
from streamrt.gen.memory import GIB, WAN_1_3B, memory_plan, wan_parameters
from streamrt.kernels import rotate
from streamrt.models.generator_files import tiny_random_parts
from streamrt.world import VOCAB

PROMPT = "a red circle moving right on a dark background"
SMALL = {"height": 32, "width": 32, "policy_args": {"sink_blocks": 1, "window_blocks": 6}}


def engine(**overrides) -> GenEngine:
    torch.manual_seed(0)
    cfg = dataclasses.replace(GenConfig(**SMALL), **overrides)
    return GenEngine(*tiny_random_parts(VOCAB), cfg)


def chunks(e: GenEngine, n: int = 4) -> list[torch.Tensor]:
    s = e.open_stream(PROMPT, e.config)
    try:
        return [s.next_latents() for _ in range(n)]
    finally:
        s.close()


def _round_kv_through(dtype: torch.dtype):
    """Forward hook rounding every self-attention V to `dtype`."""

    def hook(_module, _inputs, out):
        return out.to(dtype).to(out.dtype)

    return hook


def _round_stored_keys_through(e: GenEngine, dtype: torch.dtype):
    """Forward hook on K (after its norm) that makes the key the cache stores, rotated at
    its frame, the `dtype`-rounded one: K' = R^-1 round(R K), so R K' = round(R K)."""

    def hook(_module, _inputs, out):
        turn = torch.view_as_complex(e.state.current.batch.rope)  # [rows, tokens, 1, dim / 2]
        k = out.unflatten(2, (-1, 2 * turn.shape[-1]))
        stored = rotate(k, turn).to(dtype).to(out.dtype)
        return rotate(stored, turn.conj()).flatten(2)

    return hook


@pytest.mark.parametrize("kv_dtype", ["float8_e4m3fn", "float8_e5m2"])
def test_fp8_kv_equals_attention_over_the_same_rounded_kv(kv_dtype):
    fp8 = engine(kv_dtype=kv_dtype)
    full = engine()
    assert fp8.spec.dtype == getattr(torch, kv_dtype)
    assert fp8.spec.block_bytes * 4 == full.spec.block_bytes  # fp32 -> 1 byte per value
    # Reference: the fp32 engine whose self-attention K (as stored: rotated at its frame)
    # and V are rounded to fp8 before they reach the cache (every read then sees exactly
    # what the fp8 blocks hold).
    ref_engine = engine()
    dtype = getattr(torch, kv_dtype)
    for block in ref_engine.transformer.blocks:
        block.attn1.norm_k.register_forward_hook(_round_stored_keys_through(ref_engine, dtype))
        block.attn1.to_v.register_forward_hook(_round_kv_through(dtype))
    got, ref, plain = chunks(fp8), chunks(ref_engine), chunks(full)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
        assert b.abs().max() > 0.1
    # ... and FP8 rounding is not nothing, but small next to the signal
    drift = max(float((a - c).abs().max()) for a, c in zip(got, plain))
    assert 1e-4 < drift < 0.25 * max(float(c.abs().max()) for c in plain)
    fp8.cache.check_invariants()


def test_a_stream_cannot_change_the_engines_kv_dtype():
    e = engine()
    with pytest.raises(InputError, match="kv_dtype"):
        e.open_stream(PROMPT, kv_dtype="float8_e4m3fn")


@pytest.fixture(scope="module")
def params():
    return wan_parameters()


def test_wan_parameter_counts_are_the_real_models(params):
    assert 1.40e9 < params["transformer"] < 1.43e9  # "1.3B"
    assert 1.26e8 < params["vae"] < 1.28e8
    assert 5.6e9 < params["text_encoder"] < 5.8e9  # umt5-xxl encoder


def test_memory_plan_for_wan_1_3b_on_16_and_24_gb(params):
    tokens = 30 * 52  # 480x832 -> 60x104 latents -> 30x52 patches
    dim = WAN_1_3B["num_attention_heads"] * WAN_1_3B["attention_head_dim"]
    kv_bf16 = 21 * tokens * 30 * 2 * dim * 2  # kept frames x tokens x layers x K,V x dim x 2 B
    plan16 = memory_plan(16, params=params)
    assert plan16.items["KV window x 1 stream(s)"] == kv_bf16  # 5.6 GiB
    assert plan16.items["transformer weights"] == params["transformer"] * 2
    assert plan16.fits and plan16.more_streams == 0  # one stream, text encoder on the CPU
    # the bf16 text encoder on the card too: not on 16 GB; on 24 GB with one stream only
    assert not memory_plan(16, params=params, text_encoder_on_gpu=True).fits
    with_text = memory_plan(24, params=params, text_encoder_on_gpu=True)
    assert with_text.fits and with_text.more_streams == 0
    # 24 GB: room for more streams; FP8 KV halves the window and fits more
    plan24 = memory_plan(24, params=params)
    fp8 = memory_plan(24, params=params, kv_dtype="float8_e4m3fn")
    assert fp8.items["KV window x 1 stream(s)"] * 2 == kv_bf16
    assert 1 <= plan24.more_streams < fp8.more_streams
    # FP8 KV on 16 GB: a second stream fits
    assert memory_plan(16, params=params, kv_dtype="float8_e4m3fn", streams=2).fits
    assert not memory_plan(16, params=params, streams=2).fits
    text = plan16.table()
    assert "KV window" in text and "fits" in text and f"{16 * GIB / GIB:.0f} GiB" in text
