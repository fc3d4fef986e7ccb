"""Keys rotated once, at write: every policy attends as if keys were stored before RoPE and
rotated at the plan's positions each forward (the reference path, written out here), and
the cache holds each key rotated at its own frame, also past the model's RoPE table."""

from contextlib import nullcontext
from unittest import mock

import pytest
import torch
from diffusers.models.transformers.transformer_wan import _get_qkv_projections

from streamrt.cache import DEVICE, CacheManager, KVSpec
from streamrt.gen import attention
from streamrt.gen.attention import StreamingSelfAttention, attach_streaming, detach_streaming
from streamrt.gen.forward import chunk_rows, streaming_forward
from streamrt.kernels import (
    WanKeyRope,
    apply_wan_rope,
    attend,
    rotate,
    wan_rope_cos_sin,
    wan_rope_halves,
    wan_rope_rotation,
)
from streamrt.models.wan import build_wan, tiny_wan_config


class PreRopeSelfAttention(StreamingSelfAttention):
    """Reference: keys stored before RoPE, every kept key rotated at its plan position in
    every forward, the query at the plan's query positions (one row, diffusers' own
    `apply_wan_rope` math)."""

    def __call__(self, attn, hidden_states, *_):
        ctx = self.state.context()
        (row,) = ctx.rows
        h, w = ctx.grid
        rope = self.rope
        query, key, value = _get_qkv_projections(attn, hidden_states, None)
        query = attn.norm_q(query).unflatten(2, (attn.heads, -1))
        key = attn.norm_k(key).unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        seq, tpf = row.seq, h * w
        for j, i in enumerate(row.write):
            seq.kv(i)[0, self.layer] = key[0, j * tpf : (j + 1) * tpf]
            seq.kv(i)[1, self.layer] = value[0, j * tpf : (j + 1) * tpf]
        k = torch.cat([seq.kv(i)[0, self.layer] for i in row.plan.indices])[None]
        v = torch.cat([seq.kv(i)[1, self.layer] for i in row.plan.indices])[None]
        frames = torch.tensor([s // tpf for s in row.plan.starts])
        query = apply_wan_rope(query, *wan_rope_cos_sin(rope, row.query_frames, h, w))
        k = apply_wan_rope(k, *wan_rope_cos_sin(rope, frames, h, w))
        out = attend(query, k, v)
        if ctx.scores is not None:
            ctx.scores[self.layer] = [torch.einsum("bqhd,bkhd->bk", query, k)[0]]
        return attn.to_out[1](attn.to_out[0](out.flatten(2, 3)))


def _stream(model, x, text, chunk, policy, reference, **args):
    """Chunk-wise stream of `x` through the cache, calling the policy hooks as the engine
    does; returns the outputs, the sequence, and how many forwards turned kept keys."""
    _, _, f, h, w = x.shape
    tpf = (h // 2) * (w // 2)
    mgr = CacheManager(device_bytes=1 << 22, host_bytes=1 << 22)
    cfg = model.config
    mgr.register(
        "gen", KVSpec(len(model.blocks), cfg.num_attention_heads, cfg.attention_head_dim, tpf)
    )
    seq = mgr.open_sequence("gen", policy, **args)
    state = attach_streaming(model)
    if reference:
        procs = {}
        for i in range(len(model.blocks)):
            procs[f"blocks.{i}.attn1.processor"] = PreRopeSelfAttention(i, state)
            procs[f"blocks.{i}.attn1.processor"].rope = model.rope
            procs[f"blocks.{i}.attn2.processor"] = attention.CachedCrossAttention(i, state)
        model.set_attn_processor(procs)
    outs, turned = [], 0
    # The reference keeps its keys before RoPE: nothing marks them rotated.
    unbound = mock.patch.object(attention, "_bind_rotation", lambda *a: None)
    with torch.no_grad(), unbound if reference else nullcontext():
        for start in range(0, f, chunk):
            write = [seq.append() for _ in range(chunk)]
            rows = chunk_rows([seq], [write], tpf)
            scores = {} if seq.policy.needs_scores else None
            sl = slice(start, start + chunk)
            t = torch.full((1, chunk), 400)
            outs.append(streaming_forward(model, state, rows, x[:, :, sl], t, text, "p", scores))
            if not reference:
                ctx = attention.ForwardContext(rows, (h // 2, w // 2))
                ctx.prepare(model.rope, tpf)
                turned += ctx.batch.shift_ids is not None
            if scores is not None:
                seq.policy.observe_scores(seq, rows[0].plan, scores)
            seq.policy.after_write(seq, write)
    detach_streaming(model)
    mgr.check_invariants()
    return torch.cat(outs, dim=2), seq, turned


CASES = [
    ("sink_window", {"sink_blocks": 0, "window_blocks": 6}, 0),
    ("sink_window", {"sink_blocks": 2, "window_blocks": 4, "positions": "absolute"}, 0),
    ("sink_window", {"sink_blocks": 2, "window_blocks": 4, "adaptive_tau": 0.7}, 1),
    ("deep_sink", {"sink_blocks": 3, "window_blocks": 3}, 1),
    ("ema_sink", {"sink_blocks": 3, "window_blocks": 3, "alpha": 0.8}, 1),
    ("participative", {"sink_blocks": 1, "budget_blocks": 7, "recent_blocks": 3}, 1),
    ("deep_sink_participative", {"sink_blocks": 3, "budget_blocks": 7, "recent_blocks": 3}, 1),
]


@pytest.mark.parametrize(("policy", "args", "turns"), CASES)
def test_keys_rotated_at_write_attend_as_keys_rotated_at_the_plan(policy, args, turns):
    table = 64 if args.get("positions") == "absolute" else 16  # bounded plans: past it
    model = build_wan(tiny_wan_config(rope_max_seq_len=table), seed=1)
    torch.manual_seed(2)
    frames = 30  # absolute frames reach 29
    x, text = torch.randn(1, 4, frames, 8, 8), torch.randn(1, 5, 16)
    want, ref_seq, _ = _stream(model, x, text, 3, policy, True, **args)
    got, seq, turned = _stream(model, x, text, 3, policy, False, **args)
    assert want.abs().mean() > 1e-2
    torch.testing.assert_close(got, want, atol=2e-5, rtol=0)
    assert (turned > 0) == bool(turns)  # the re-positioning path was (or was not) taken
    if "adaptive_tau" in args:
        assert 0 < seq.policy.sink_refreshes == ref_seq.policy.sink_refreshes < 28  # both ways
    # The cache holds each key rotated at its own frame (sinks folded or refreshed too).
    rope = WanKeyRope(model.rope)
    assert seq.indices(DEVICE) == ref_seq.indices(DEVICE)
    for i in seq.indices(DEVICE):
        raw = ref_seq.kv(i)[0]  # [L, T, H, D]
        turn = rope.at(torch.tensor([i]), 4, 4)
        torch.testing.assert_close(seq.kv(i)[0], rotate(raw, turn), atol=2e-5, rtol=0)
        torch.testing.assert_close(seq.kv(i)[1], ref_seq.kv(i)[1], atol=2e-5, rtol=0)


def test_rotation_at_any_frame_is_the_models_table_and_shifts_compose():
    model = build_wan(tiny_wan_config(attention_head_dim=24, rope_max_seq_len=40), seed=0)
    rope = WanKeyRope(model.rope)
    inside = torch.tensor([0, 3, 39])
    table = wan_rope_rotation(*wan_rope_halves(*wan_rope_cos_sin(model.rope, inside, 3, 2)))
    assert torch.equal(rope.at(inside, 3, 2), table)  # bit for bit inside the table
    x = torch.randn(2, 6, 2, 24)
    far = torch.tensor([100_000, 100_001])
    moved = rotate(
        rotate(x, rope.at(inside[:2] * 0 + 7, 3, 2).view(2, 6, 1, 12)),
        rope.shift(far - 7)[:, None, None],
    )
    direct = rotate(x, rope.at(far, 3, 2).view(2, 6, 1, 12))
    torch.testing.assert_close(moved, direct, atol=1e-5, rtol=0)
    assert not torch.allclose(direct, rotate(x, rope.at(far + 1, 3, 2).view(2, 6, 1, 12)))
