"""Streaming generation end to end on tiny random models: samplers, controls, API, bad input."""

import dataclasses

import numpy as np
import pytest
import torch

from streamrt.config import GenConfig
from streamrt.gen.engine import GenEngine
from streamrt.gen.generator import StreamGenerator
from streamrt.gen.v2v import SimilarityFilter, motion_level
from streamrt.models.generator_files import tiny_random_parts
from streamrt.models.text import PromptError
from streamrt.world import VOCAB

PROMPT = "a red circle moving right on a dark background"
SMALL = {"height": 32, "width": 32, "policy_args": {"sink_blocks": 1, "window_blocks": 16}}


@pytest.fixture(scope="module")
def parts():
    return tiny_random_parts(VOCAB)


def make_gen(parts, **overrides):
    return StreamGenerator(GenEngine(*parts, dataclasses.replace(GenConfig(**SMALL), **overrides)))


@pytest.mark.parametrize("sampler", ["chunkwise", "rolling", "stream_batch"])
def test_samplers_are_deterministic_per_seed(parts, sampler):
    a = np.stack(list(make_gen(parts, sampler=sampler, seed=3).stream(PROMPT, num_frames=9)))
    b = np.stack(list(make_gen(parts, sampler=sampler, seed=3).stream(PROMPT, num_frames=9)))
    c = np.stack(list(make_gen(parts, sampler=sampler, seed=4).stream(PROMPT, num_frames=9)))
    assert a.shape == (9, 32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_forward_counts_per_sampler(parts):
    steps = 4
    for sampler, refresh, fold, per_chunk, warmup in [
        ("chunkwise", True, False, steps + 1, 0),  # steps, then the clean refresh
        ("chunkwise", True, True, steps, 0),  # the refresh inside the next chunk's forward
        ("rolling", False, False, 1, steps - 1),
        ("stream_batch", False, False, 1, steps - 1),
    ]:
        gen = make_gen(parts, sampler=sampler, clean_refresh=refresh, fold_refresh=fold)
        stream = gen.engine.open_stream(PROMPT, gen.engine.config)
        for _ in range(5):
            stream.next_latents()
        assert stream.stats["forwards"] == warmup + 5 * per_chunk, (sampler, fold)
        stream.close()
        gen.engine.cache.check_invariants()


@pytest.mark.parametrize("num_frames", [1, 3, 5, 6])
def test_stream_computes_no_chunk_past_the_frames_asked_for(parts, num_frames):
    gen = make_gen(parts)  # 3-frame chunks
    opened = []
    open_stream = gen.engine.open_stream
    gen.engine.open_stream = lambda *a, **k: opened.append(open_stream(*a, **k)) or opened[-1]
    assert len(list(gen.stream(PROMPT, num_frames=num_frames))) == num_frames
    chunks = -(-num_frames // 3)
    assert opened[0].stats["frames"] == 3 * chunks  # decoded: only the chunks shown
    # 4 steps each (the refreshes fold into the next chunk's first forward; the last
    # chunk's is never computed)
    assert opened[0].stats["forwards"] == 4 * chunks


def test_prompt_switch_recaches_kept_frames(parts):
    gen = make_gen(parts)
    stream = gen.engine.open_stream(PROMPT, gen.engine.config)
    for _ in range(3):
        stream.next_frames()
    before = stream.stats["forwards"]
    last = len(gen.engine.transformer.blocks) - 1  # layer 0 keys precede any cross-attention
    keys_before = stream.seqs[0].gather(last)[0].clone()
    stream.set_prompt("a blue square moving up on a light background")
    # the last chunk's deferred refresh under the old prompt, then one t=0 pass per kept chunk
    assert stream.stats["forwards"] == before + 1 + 3
    assert not torch.equal(
        stream.seqs[0].gather(last)[0], keys_before
    )  # the cache follows the prompt
    switched = stream.next_frames()
    other = make_gen(parts).engine.open_stream(PROMPT, gen.engine.config)
    for _ in range(3):
        other.next_frames()
    assert not np.array_equal(switched, other.next_frames())
    with pytest.raises(PromptError, match="outside this model's vocabulary"):
        stream.set_prompt("a pink elephant")


def test_failing_stream_does_not_disturb_another(parts):
    solo = np.stack(list(make_gen(parts, seed=7).stream(PROMPT, num_frames=12)))
    gen = make_gen(parts, seed=7)
    a = gen.engine.open_stream(PROMPT, gen.engine.config)
    b = gen.engine.open_stream(
        "a blue square moving up on a light background", gen.engine.config, seed=9
    )
    out = []
    for i in range(4):
        out.append(a.next_frames())
        if i == 1:
            bad = make_gen(parts).stylize([np.zeros((10, 10, 3), np.uint8)], PROMPT)
            with pytest.raises(ValueError, match="shape"):
                next(bad)
        b.next_frames()
    assert np.array_equal(np.concatenate(out), solo)
    gen.engine.cache.check_invariants()


def test_guidance_runs_two_sequences_and_changes_output(parts):
    plain = np.stack(list(make_gen(parts).stream(PROMPT, num_frames=3)))
    gen = make_gen(parts, guidance_scale=3.0, negative_prompt="a blue square")
    guided = np.stack(list(gen.stream(PROMPT, num_frames=3)))
    assert not np.array_equal(plain, guided)


def test_long_stream_keeps_cache_memory_and_positions_bounded(parts):
    gen = make_gen(
        parts,
        timesteps=[1000],
        chunk_frames=10,
        clean_refresh=False,
        height=16,
        width=16,
        policy_args={"sink_blocks": 2, "window_blocks": 18},
    )
    stream = gen.engine.open_stream(PROMPT, gen.engine.config)
    used = set()
    for _ in range(1000):  # 10,000 frames
        stream.next_latents()
        used.add(gen.engine.cache.stats()["consumers"][gen.engine.consumer]["device"]["blocks"])
    plan = stream.seqs[0].plan()
    assert used == {10, 20}  # first chunk, then the full window forever
    assert plan.query_start <= 20 * stream.tokens_per_frame
    assert stream.seqs[0].next_index == 10_000


def test_save_and_load_round_trip(parts, tmp_path):
    gen = make_gen(parts, seed=5)
    gen.save_pretrained(tmp_path / "g")
    again = StreamGenerator.from_pretrained(tmp_path / "g")
    assert again.engine.config.seed == 5
    a = np.stack(list(gen.stream(PROMPT, num_frames=6)))
    b = np.stack(list(again.stream(PROMPT, num_frames=6)))
    assert np.array_equal(a, b)
    (tmp_path / "g" / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(b"broken")
    with pytest.raises(ValueError, match="transformer"):
        StreamGenerator.from_pretrained(tmp_path / "g")
    with pytest.raises(FileNotFoundError, match=r"streamrt\.json"):
        StreamGenerator.from_pretrained(tmp_path)


def test_bad_configs_fail_clearly(parts):
    with pytest.raises(ValueError, match="multiple of 8"):
        next(make_gen(parts, height=30).stream(PROMPT))
    with pytest.raises(ValueError, match="unknown sampler"):
        next(make_gen(parts, sampler="euler").stream(PROMPT))
    with pytest.raises(ValueError, match="unknown cache policy"):
        next(make_gen(parts, policy="lru9").stream(PROMPT))
    with pytest.raises(ValueError, match="frames in flight"):
        next(
            make_gen(
                parts, sampler="rolling", policy_args={"sink_blocks": 1, "window_blocks": 4}
            ).stream(PROMPT)
        )


def test_video_to_video_frames_and_bad_input(parts):
    gen = make_gen(parts)
    rng = np.random.default_rng(0)
    src = [rng.integers(0, 255, (32, 32, 3), dtype=np.uint8) for _ in range(9)]
    out = list(gen.stylize(src, PROMPT))
    assert len(out) == 9 and out[0].shape == (32, 32, 3)
    gen.engine.cache.check_invariants()
    nan = np.full((32, 32, 3), np.nan, np.float32)
    with pytest.raises(ValueError, match="finite"):
        list(gen.stylize([nan], PROMPT))
    # Static input: the similarity filter skips most frames, output keeps one frame per input.
    still = [src[0]] * 12
    assert len(list(make_gen(parts).stylize(still, PROMPT))) >= 11


def test_motion_level_and_similarity_filter():
    x = torch.zeros(1, 3, 3, 4, 4)
    assert motion_level(x) == 0.0
    x[:, :, 2] = 0.1  # rms step of 0.1 -> d = 0.5
    assert motion_level(x) == pytest.approx(0.5)
    x[:, :, 2] = 1.0
    assert motion_level(x) == 1.0
    f = SimilarityFilter(0.98, max_skipped=3, seed=0)
    frame = np.full((4, 4, 3), 100, np.uint8)
    decisions = [f.skip(frame) for _ in range(9)]
    assert decisions == [False, True, True, True, False, True, True, True, False]
    other = np.zeros((4, 4, 3), np.uint8)
    other[0, 0] = 255
    assert f.skip(other) is False  # dissimilar frames are always processed


def test_wan_vae_codec_streams_like_a_full_decode():
    from streamrt.models.generator_files import tiny_random_parts as parts_fn

    transformer, text, codec = parts_fn(VOCAB, codec="wan_vae")
    z = torch.randn(1, 4, 5, 8, 8)
    with torch.no_grad():
        full = codec.vae.decode(z).sample
    dec = codec.decoder()
    streamed = torch.cat(
        [dec.decode(z[:, :, :1]), dec.decode(z[:, :, 1:3]), dec.decode(z[:, :, 3:])], dim=2
    )
    assert torch.allclose(full, streamed, atol=1e-6)
    gen = StreamGenerator(GenEngine(transformer, text, codec, GenConfig(**SMALL)))
    frames = list(gen.stream(PROMPT, num_frames=4))
    assert frames[0].shape == (32, 32, 3)


@pytest.mark.parametrize(
    ("policy", "args"),
    [
        ("full", {}),
        ("sink_window", {"sink_blocks": 3, "window_blocks": 6, "adaptive_tau": 0.2}),
        ("deep_sink", {"sink_blocks": 4, "window_blocks": 5}),
        ("ema_sink", {"sink_blocks": 3, "window_blocks": 6, "alpha": 0.9}),
        ("participative", {"sink_blocks": 3, "budget_blocks": 10, "recent_blocks": 4}),
        ("deep_sink_participative", {"sink_blocks": 4, "budget_blocks": 10, "recent_blocks": 4}),
    ],
)
def test_every_policy_streams_through_the_engine(parts, policy, args):
    gen = make_gen(parts, policy=policy, policy_args=args, height=16, width=16)
    stream = gen.engine.open_stream(PROMPT, gen.engine.config)
    used = []
    for _ in range(8):  # 24 frames
        frames = stream.next_frames()
        assert np.isfinite(frames.astype(float)).all()
        used.append(stream.seqs[0].counts["device"])
    cap = stream.seqs[0].policy.capacity
    assert cap is None or max(used) <= cap
    if policy != "full":
        assert used[-1] == used[-2] == cap  # steady state: constant cache
    if policy.endswith("participative"):
        imp = [b.importance for b in stream.seqs[0].blocks("device")]
        assert any(v != 0.0 for v in imp)  # the engine fed query-key scores to the policy
    gen.engine.cache.check_invariants()


def test_presets_build_their_policy_and_sampler():
    from pathlib import Path

    from streamrt.cache import make_policy
    from streamrt.config import load_config
    from streamrt.gen.samplers import SAMPLERS

    for path in sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml")):
        cfg = load_config(path).gen
        make_policy(cfg.policy, **cfg.policy_args)
        assert cfg.sampler in SAMPLERS, path


def test_rcfg_guides_without_a_second_branch(parts):
    plain_gen = make_gen(parts, seed=2)
    plain = np.stack(list(plain_gen.stream(PROMPT, num_frames=6)))
    gen = make_gen(parts, seed=2, guidance_scale=2.0, rcfg=True)
    stream = gen.engine.open_stream(PROMPT, gen.engine.config)
    frames = np.concatenate([stream.next_frames(), stream.next_frames()])
    assert len(stream.seqs) == 1  # no unconditional cache
    assert stream.stats["forwards"] == 2 * 4  # and no extra forward: 4 steps per chunk
    assert not np.array_equal(frames, plain)
    # g = 1 makes RCFG the identity.
    same = np.stack(
        list(make_gen(parts, seed=2, guidance_scale=1.0, rcfg=True).stream(PROMPT, num_frames=6))
    )
    assert np.array_equal(same, plain)


def test_diffusers_pipeline_dir_with_a_causal_checkpoint(tmp_path):
    """The layout users bring: Wan2.1-T2V-*-Diffusers plus a Self-Forcing-style `.pt`."""
    import json

    from streamrt.models.wan_checkpoints import save_generator_pt

    transformer, text, codec = tiny_random_parts(VOCAB, codec="wan_vae", seed=0)
    other, _, _ = tiny_random_parts(VOCAB, codec="wan_vae", seed=1)
    pipe = tmp_path / "Wan-tiny-Diffusers"
    transformer.save_pretrained(pipe / "transformer")
    text.save_pretrained(pipe)
    codec.vae.save_pretrained(pipe / "vae")
    (pipe / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}))
    save_generator_pt(other, tmp_path / "self_forcing_dmd.pt")

    loaded = StreamGenerator.from_pretrained(
        pipe, checkpoint=tmp_path / "self_forcing_dmd.pt", **SMALL
    )
    direct = StreamGenerator(
        GenEngine(other, TextEncoderLike(text, 512), codec, GenConfig(**SMALL))
    )
    a = np.stack(list(loaded.stream(PROMPT, num_frames=4)))
    b = np.stack(list(direct.stream(PROMPT, num_frames=4)))
    assert np.array_equal(a, b)
    base = np.stack(
        list(StreamGenerator.from_pretrained(pipe, **SMALL).stream(PROMPT, num_frames=4))
    )
    assert not np.array_equal(a, base)  # the checkpoint really replaced the weights


def TextEncoderLike(text, text_len):
    from streamrt.models.text import TextEncoder

    return TextEncoder(text.model, text.tokenizer, text_len)


def test_wan_vae_streaming_encode_and_video_to_video():
    from diffusers import AutoencoderKLWan

    from streamrt.models.codec import WanVAECodec

    transformer, text, _ = tiny_random_parts(VOCAB, codec="wan_vae")
    torch.manual_seed(0)
    vae = AutoencoderKLWan(  # Wan's topology (4x time, 8x space), tiny widths
        base_dim=8,
        z_dim=4,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        attn_scales=[],
        latents_mean=[0.1, -0.2, 0.0, 0.3],
        latents_std=[1.5, 0.5, 1.0, 2.0],
    ).eval()
    codec = WanVAECodec(vae)
    t = codec.temporal
    assert (t, codec.spatial) == (4, 8)
    enc = codec.encoder()
    first_n, rest_n = enc.frames_needed(3), t * 3
    assert first_n == 1 + t * 2
    frames = torch.rand(1, 3, first_n + rest_n, 32, 32) * 2 - 1
    with torch.no_grad():
        full = (codec.vae.encode(frames).latent_dist.mode() - codec.mean) / codec.std
    first = enc.encode(frames[:, :, :first_n])
    assert enc.frames_needed(3) == rest_n
    rest = enc.encode(frames[:, :, first_n:])
    assert first.shape[2] == 3 and rest.shape[2] == 3
    torch.testing.assert_close(torch.cat([first, rest], dim=2), full, atol=1e-5, rtol=1e-5)
    gen = StreamGenerator(
        GenEngine(transformer, text, codec, GenConfig(**{**SMALL, "height": 32, "width": 32}))
    )
    rng = np.random.default_rng(0)
    src = [rng.integers(0, 255, (32, 32, 3), dtype=np.uint8) for _ in range(first_n + rest_n)]
    out = list(gen.stylize(src, PROMPT))
    assert len(out) == len(src) and out[0].shape == (32, 32, 3)  # one output frame per input


@pytest.mark.parametrize("sampler", ["chunkwise", "stream_batch"])
def test_video_to_video_keeps_frame_count_and_order(parts, sampler):
    gen = make_gen(parts, sampler=sampler, similarity_threshold=0.9)  # copies always skip
    rng = np.random.default_rng(1)
    moving = [rng.integers(0, 255, (32, 32, 3), dtype=np.uint8) for _ in range(7)]
    src = moving[:4] + [moving[3]] * 3 + moving[4:]  # a still stretch in the middle, 10 frames
    out = list(gen.stylize(src, PROMPT))
    assert len(out) == len(src)  # the partial last chunk is flushed too
    # The still stretch repeats the output of the frame before it, in place.
    assert all(np.array_equal(out[k], out[3]) for k in (4, 5, 6))
    assert not np.array_equal(out[7], out[3]) and not np.array_equal(out[2], out[3])


def test_predicted_renoise_is_an_euler_step():
    """renoise="predicted" re-noises with the model's own noise estimate: a flow-matching Euler step."""
    from streamrt.gen.schedule import predict_x0, renoise

    torch.manual_seed(0)
    x, v = torch.randn(1, 3, 2, 4, 4), torch.randn(1, 3, 2, 4, 4)
    sigma, nxt = 0.9375, 0.8333
    x0 = predict_x0(x, v, sigma)
    torch.testing.assert_close(renoise(x0, x0 + v, nxt), x + (nxt - sigma) * v)


def test_predicted_renoise_draws_no_noise_between_steps(parts):
    gen = make_gen(parts, renoise="predicted")
    stream = gen.engine.open_stream(PROMPT, gen.engine.config)
    state = stream.generator.get_state()
    stream.next_latents()
    draws = torch.Generator().set_state(state)
    torch.randn((1, *stream._chunk_shape()), generator=draws)  # only the chunk's initial noise
    assert torch.equal(draws.get_state(), stream.generator.get_state())


def test_prompt_direction_words():
    from streamrt.gen.noise import prompt_direction

    assert prompt_direction("a red circle moving right on a dark background") == (0, 1)
    assert prompt_direction("Camera panning UP over a city") == (-1, 0)
    assert prompt_direction("a blue square moving down and a red circle moving left") == (1, 0)
    assert prompt_direction("a red circle on a dark background") is None
    assert prompt_direction("upright bright lights") is None  # whole words only


def _initial_noise(parts, prompt, chunks=3, **overrides):
    gen = make_gen(parts, renoise="predicted", **overrides)
    stream = gen.engine.open_stream(prompt, gen.engine.config)
    out = [stream.initial_latents()[0] for _ in range(chunks)]
    stream.close()
    return torch.cat(out, dim=2)


def test_noise_drift_rolls_one_field_along_the_prompted_direction(parts):
    left = _initial_noise(parts, "a red circle moving left on a dark background", noise_drift=1.0)
    frames = left.shape[2]
    for k in range(frames):  # frame k = frame 0 moved k latent pixels left
        assert torch.equal(left[:, :, k], torch.roll(left[:, :, 0], -k, dims=3))
    up = _initial_noise(parts, "a red circle moving up on a dark background", noise_drift=2.0)
    assert torch.equal(up[:, :, 3], torch.roll(up[:, :, 0], -6, dims=2))
    half = _initial_noise(parts, PROMPT, noise_drift=0.5)
    assert torch.equal(half[:, :, 2], torch.roll(half[:, :, 0], 1, dims=3))
    # each frame's noise is still a standard normal field
    assert abs(float(left.std()) - 1.0) < 0.1 and abs(float(left.mean())) < 0.1


def test_noise_drift_off_limited_or_without_direction_is_independent_noise(parts):
    plain = _initial_noise(parts, PROMPT)
    assert torch.equal(plain, _initial_noise(parts, PROMPT, noise_drift=0.0))
    still = "a red circle on a dark background"
    assert torch.equal(_initial_noise(parts, still), _initial_noise(parts, still, noise_drift=1.0))
    first = _initial_noise(parts, PROMPT, noise_drift=1.0, noise_drift_frames=3)
    assert torch.equal(first[:, :, 1], torch.roll(first[:, :, 0], 1, dims=3))
    later = first[:, :, 3:]
    assert not torch.equal(later[:, :, 0], torch.roll(first[:, :, 0], 3, dims=3))
    corr = torch.corrcoef(torch.stack([later[:, :, 0].flatten(), later[:, :, 1].flatten()]))
    assert abs(float(corr[0, 1])) < 0.2  # past noise_drift_frames: fresh draws
