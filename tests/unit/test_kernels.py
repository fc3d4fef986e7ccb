"""Every attention backend available here matches the SDPA reference; Wan RoPE tables match diffusers."""

import pytest
import torch

from streamrt.kernels import (
    BACKENDS,
    apply_wan_rope,
    available_backends,
    sdpa,
    set_attention_backend,
    wan_rope_cos_sin,
)
from streamrt.models.wan import build_wan, tiny_wan_config

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("backend", available_backends(DEVICE))
@pytest.mark.parametrize(
    ("q_heads", "kv_heads", "batched"), [(4, 4, True), (4, 2, True), (2, 2, False)]
)
def test_backend_matches_sdpa(backend, q_heads, kv_heads, batched):
    torch.manual_seed(0)
    lead = (2,) if batched else ()
    q = torch.randn(*lead, 37, q_heads, 16, device=DEVICE)
    k = torch.randn(*lead, 53, kv_heads, 16, device=DEVICE)
    v = torch.randn(*lead, 53, kv_heads, 16, device=DEVICE)
    ref = sdpa(q, k, v)
    got = BACKENDS[backend](q, k, v)
    tol = 2e-2 if backend == "flash" else 1e-5
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, atol=tol, rtol=tol)


def test_streaming_forward_with_flex_equals_diffusers_reference():
    from test_gen_exactness import reference_forward, streamed_forward

    model = build_wan(tiny_wan_config(), seed=1)
    torch.manual_seed(2)
    x, text = torch.randn(1, 4, 6, 8, 8), torch.randn(1, 5, 16)
    frame_t = torch.tensor([[999, 700, 10, 500, 250, 0]])
    ref = reference_forward(model, x, frame_t, text, 3)
    set_attention_backend("flex")
    try:
        got, _ = streamed_forward(model, x, frame_t, text, 3)
    finally:
        set_attention_backend("sdpa")
    assert (got - ref).abs().max().item() <= 1e-5


def test_unknown_backend():
    with pytest.raises(ValueError, match="unknown attention backend 'triton2'"):
        set_attention_backend("triton2")


def test_wan_rope_tables_equal_diffusers_from_frame_zero():
    model = build_wan(tiny_wan_config(), seed=0)
    x = torch.zeros(1, 4, 3, 8, 8)  # 3 frames of 4x4 patches
    cos_ref, sin_ref = model.rope(x)
    cos, sin = wan_rope_cos_sin(model.rope, torch.arange(3), 4, 4)
    assert torch.equal(cos, cos_ref[0]) and torch.equal(sin, sin_ref[0])
    # Shifting every frame by the same delta keeps q.k unchanged (RoPE is relative).
    q, k = torch.randn(48, 2, 12), torch.randn(48, 2, 12)
    c2, s2 = wan_rope_cos_sin(model.rope, torch.arange(3) + 7, 4, 4)
    a = torch.einsum("qhd,khd->hqk", apply_wan_rope(q, cos, sin), apply_wan_rope(k, cos, sin))
    b = torch.einsum("qhd,khd->hqk", apply_wan_rope(q, c2, s2), apply_wan_rope(k, c2, s2))
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_rotate_with_a_complex_table_equals_apply_wan_rope():
    from streamrt.kernels import rotate, wan_rope_halves, wan_rope_rotation

    cos = torch.randn(12, 1, 32)
    sin = torch.randn(12, 1, 32)
    halves = wan_rope_halves(cos, sin)
    table = wan_rope_rotation(*halves)
    x = torch.randn(3, 12, 4, 32)
    assert torch.equal(rotate(x, table), apply_wan_rope(x, *halves, halves=True))
    xb = x.bfloat16()  # other dtypes: apply_wan_rope's own path and precision
    assert torch.equal(rotate(xb, table), apply_wan_rope(xb, *halves, halves=True))
