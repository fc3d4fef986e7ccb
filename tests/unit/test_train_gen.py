"""`streamrt train gen`: the diffusion-forcing loop on tiny configs, and the shipped model."""

import dataclasses
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from streamrt.cache import CacheManager, KVSpec
from streamrt.gen.attention import attach_streaming, detach_streaming
from streamrt.gen.forward import chunk_rows, streaming_forward
from streamrt.models import train_gen, train_gen_eval, train_gen_masks
from streamrt.models.train_gen import (
    TrainGenConfig,
    apply_block_causal,
    block_causal_mask,
    load_checkpoint,
    new_state,
    sample_sigmas,
    save_checkpoint,
    train,
    train_step,
    world_config,
)
from streamrt.models.train_gen_eval import EVAL_PROMPTS, EVAL_SEEDS, prompt_scores
from streamrt.models.train_gen_export import small_cache
from streamrt.models.train_schedule import CHECKPOINT
from streamrt.world import make_clip
from streamrt.world.render import draw_shape

ASSET = Path(__file__).resolve().parents[2] / "assets" / "tiny-world"
TINY_MODEL = {"num_layers": 1, "num_attention_heads": 2, "attention_head_dim": 24, "ffn_dim": 32}


def tiny_cfg(**overrides) -> TrainGenConfig:
    base = {
        "steps": 60,
        "batch_size": 4,
        "num_frames": 6,
        "lr": 5e-3,
        "warmup_steps": 5,
        "model": TINY_MODEL,
        "compile": False,
        "threads": 1,
        "log_every": 1000,
        "checkpoint_every": 1000,
    }
    return TrainGenConfig(**{**base, **overrides})


def test_block_causal_mask_lets_a_chunk_see_itself_and_older_chunks():
    mask = block_causal_mask(num_frames=4, chunk_frames=2, tokens_per_frame=1)
    assert mask.int().tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1]]


def test_sigmas_are_per_chunk_and_any_chunk_may_be_clean_context():
    cfg = tiny_cfg(num_frames=9, clean_prob=0.5)
    sigma = sample_sigmas(cfg, 256, torch.Generator().manual_seed(0))
    chunks = sigma.view(256, 3, 3)
    assert (chunks == chunks[..., :1]).all()
    clean = chunks[..., 0] == 0
    assert 0.3 < clean[:, 0].float().mean() < 0.6  # the first chunk is learnt from noise too
    assert (~clean).any(dim=1).all()
    assert sigma.max() <= 1.0


def test_sigma_shift_below_one_trains_more_on_low_noise():
    from streamrt.apps.cli import build_parser
    from streamrt.apps.train import config_from

    args = build_parser().parse_args(["train", "gen", "--sigma-shift", "0.5"])
    low = dataclasses.replace(tiny_cfg(num_frames=9, clean_prob=0.0), sigma_shift=0.5)
    assert config_from(args).sigma_shift == 0.5
    high = dataclasses.replace(low, sigma_shift=3.0)
    draws = [sample_sigmas(c, 512, torch.Generator().manual_seed(0)) for c in (low, high)]
    assert (draws[0] < 0.5).float().mean() > 0.6 > 0.3 > (draws[1] < 0.5).float().mean()


def test_progressive_chunks_rise_frame_by_frame():
    plain = tiny_cfg(num_frames=9, clean_prob=0.3)
    base = sample_sigmas(plain, 64, torch.Generator().manual_seed(0))
    cfg = tiny_cfg(num_frames=9, clean_prob=0.3, progressive_prob=1.0, progressive_lag=0.5)
    chunks = sample_sigmas(cfg, 64, torch.Generator().manual_seed(0)).view(64, 3, 3)
    clean = base.view(64, 3, 3)[..., 0] == 0
    assert (chunks[clean] == 0).all()  # clean context stays clean
    noisy = chunks[~clean]
    assert (noisy[:, 1:] >= noisy[:, :-1]).all() and (noisy[:, -1] > 0).all()
    assert ((noisy >= 0) & (noisy <= 1)).all()
    steps = noisy[:, 1:] - noisy[:, :-1]
    assert (steps <= 0.5 + 1e-6).all() and (steps > 0.05).float().mean() > 0.5
    with pytest.raises(ValueError, match="progressive_prob"):
        tiny_cfg(progressive_prob=1.5)


def test_drifting_training_noise_is_the_streams_noise():
    """With drift_prob, a clip's noise drifts along its caption's direction exactly as a
    stream's initial noise does (rolled one field); captions without one stay independent."""
    cfg = tiny_cfg(num_frames=9, drift_prob=1.0, noise_drift=1.0)
    captions = [
        "a red circle moving left on a dark background",
        "a blue square on a light background",
    ]
    eps = train_gen.sample_noise(
        cfg, (2, 12, 9, 16, 16), captions, torch.Generator().manual_seed(0)
    )
    for k in range(9):
        assert torch.equal(eps[0, :, k], torch.roll(eps[0, :, 0], -k, dims=2))
    assert not torch.equal(eps[1, :, 1], torch.roll(eps[1, :, 0], -1, dims=2))
    plain = train_gen.sample_noise(tiny_cfg(), (2, 12, 9, 16, 16), captions, torch.Generator())
    assert not torch.equal(plain[0, :, 1], torch.roll(plain[0, :, 0], -1, dims=2))
    with pytest.raises(ValueError, match="drift_prob"):
        tiny_cfg(drift_prob=-0.1)


def test_object_masks_mark_exactly_the_shapes():
    cfg = tiny_cfg(batch_size=4)
    x, captions, objects = train_gen.sample_batch(cfg, 0)
    assert objects.shape == (4, 2, cfg.num_frames, 64, 64) and len(captions) == 4
    assert x.shape == (4, 3, cfg.num_frames, 64, 64)
    world = world_config(cfg)
    rng = np.random.default_rng((cfg.seed, 0))
    for i, seed in enumerate(rng.integers(0, 2**31, size=cfg.batch_size)):
        scene = make_clip(int(seed), cfg.num_frames, world).scene
        drawn = np.zeros((cfg.num_frames, 64, 64), bool)
        for t in range(cfg.num_frames):
            for state in scene.state(t):
                if state.visible:
                    blank = np.zeros((64, 64, 3), np.uint8)
                    draw_shape(blank, state.shape, *state.center, state.size, (255, 255, 255))
                    drawn[t] |= blank[..., 0] > 0
        # shapes are opaque palette colours on grey backgrounds: the union of the shapes
        assert np.array_equal(objects[i, 0].numpy() > 0, drawn)
        assert 0.01 < drawn.mean() < 0.2, drawn.mean()


def test_edge_ring_is_the_background_around_each_shape():
    objects = torch.zeros(1, 1, 2, 16, 16)
    objects[0, 0, 0, 6:9, 6:9] = 1  # a 3x3 square in frame 0, nothing in frame 1
    ring = train_gen_masks.edge_ring(objects, 2)
    assert ring[0, 0, 0].sum() == 7 * 7 - 3 * 3
    assert ring[0, 0, 0, 4:11, 4:11].sum() == 40 and ring[0, 0, 0, 6:9, 6:9].sum() == 0
    assert ring[0, 0, 1].sum() == 0  # frames are not mixed


def test_edge_weight_weighs_the_silhouettes_outside_and_zero_is_the_old_loss():
    from streamrt.models.codec import PixelCodec
    from streamrt.models.generator_files import tiny_random_parts
    from streamrt.world import VOCAB

    cfg = tiny_cfg(batch_size=2, num_frames=3, object_weight=3.0)
    transformer, text, _ = tiny_random_parts(VOCAB, codec="pixel", spatial=2, **TINY_MODEL)
    codec = PixelCodec(spatial=2)
    x, captions, objects = train_gen.sample_batch(cfg, 0)

    def loss(**change):
        c = dataclasses.replace(cfg, **change)
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            return train_gen.flow_matching_loss(
                transformer, text, codec, x, objects, captions, c, gen
            ).item()

    old = loss()
    assert loss(edge_weight=0.0, edge_px=5) == old  # off: the loss is unchanged
    assert loss(edge_weight=3.0) > old  # the ring now counts 4x
    assert loss(edge_weight=3.0, edge_px=1) < loss(edge_weight=3.0, edge_px=4)  # wider ring
    shaped = dataclasses.replace(cfg, shape_weight=5.0)
    x, captions, objects = train_gen.sample_batch(shaped, 0)
    assert loss(shape_weight=5.0) > old  # the pixels that tell the shapes apart count 6x


def test_shape_difference_marks_where_the_other_shapes_differ():
    cfg = tiny_cfg(batch_size=2, shape_weight=5.0)
    masks = train_gen.sample_batch(cfg, 0)[2]
    assert (
        masks[:, 1].any() and not train_gen.sample_batch(tiny_cfg(batch_size=2), 0)[2][:, 1].any()
    )

    def drawn(shape):
        blank = np.zeros((32, 32, 3), np.uint8)
        draw_shape(blank, shape, 15, 15, 6, (255, 255, 255))
        return blank[..., 0] > 0

    class Scene:  # one object of `shape` in frame 0
        def __init__(self, shape):
            self.shape = shape

        def state(self, t):
            return [SimpleNamespace(visible=True, shape=self.shape, center=(15, 15), size=6)]

    circle, square, triangle = drawn("circle"), drawn("square"), drawn("triangle")
    for shape, own in (("circle", circle), ("square", square), ("triangle", triangle)):
        diff = train_gen_masks.shape_difference(Scene(shape), 1, 32)[0]
        others = [m for s, m in (("circle", circle), ("square", square), ("triangle", triangle))]
        assert np.array_equal(diff, np.logical_or.reduce([m ^ own for m in others]))
    corners = square & ~circle  # a circle's prompt: a square's corners must stay background
    assert (
        corners.any() and train_gen_masks.shape_difference(Scene("circle"), 1, 32)[0][corners].all()
    )


def test_pixel_codec_downsamples_and_upsamples():
    from streamrt.models.codec import PixelCodec

    x = torch.rand(1, 3, 2, 16, 16) * 2 - 1
    assert PixelCodec().encode(x) is x
    codec = PixelCodec(2)
    z = codec.encode(x)
    assert z.shape == (1, 3, 2, 8, 8)
    assert torch.allclose(z[0, :, :, 0, 0], x[0, :, :, :2, :2].mean(dim=(-1, -2)))
    flat = torch.full((1, 3, 1, 16, 16), 0.25)
    assert torch.allclose(codec.decode(codec.encode(flat)), flat)
    assert codec.decode(z).shape == x.shape
    with pytest.raises(ValueError, match="positive integer"):
        PixelCodec(0)


def test_masked_training_forward_equals_the_engines_chunkwise_stream():
    """What training optimises is what the engine runs: chunk by chunk through the cache."""
    cfg = tiny_cfg()
    state = new_state(cfg)
    model = state.transformer
    torch.manual_seed(0)
    x = torch.randn(1, 3, 6, 8, 8)  # 2x2 latent patches of 4: 4 tokens per frame
    frame_t = torch.tensor([[0.0, 0.0, 0.0, 700.0, 700.0, 700.0]])
    text = torch.randn(1, 16, 32)
    apply_block_causal(model, block_causal_mask(6, 3, 4))
    with torch.no_grad():
        ref = model(x, frame_t.repeat_interleave(4, dim=1), text, return_dict=False)[0]
    spec = KVSpec(1, 2, 24, 4)
    mgr = CacheManager(device_bytes=1 << 20, host_bytes=1 << 20)
    mgr.register("gen", spec, offload=False)
    seq = mgr.open_sequence("gen", "full")
    stream_state = attach_streaming(model)
    outs = []
    with torch.no_grad():
        for start in (0, 3):
            rows = chunk_rows([seq], [[seq.append() for _ in range(3)]], 4)
            sl = slice(start, start + 3)
            outs.append(
                streaming_forward(model, stream_state, rows, x[:, :, sl], frame_t[:, sl], text)
            )
    detach_streaming(model)
    assert (torch.cat(outs, dim=2) - ref).abs().max() < 1e-5
    assert ref.abs().mean() > 1e-2


def test_training_lowers_the_loss():
    state = train(tiny_cfg(), work_dir=None, output=None, log=lambda _: None)
    first, last = np.mean(state.losses[:10]), np.mean(state.losses[-10:])
    assert state.step == 60
    # Measured with this seed: 1.404 -> 1.000 (0.71x); with lr 0: 1.719 -> 1.713 (1.00x).
    assert last < 0.8 * first, (first, last)


def test_checkpoint_round_trip_resumes_exactly(tmp_path):
    cfg = tiny_cfg(steps=3)
    straight = new_state(cfg)
    for _ in range(3):
        train_step(straight)
    resumed = new_state(cfg)
    for _ in range(2):
        train_step(resumed)
    save_checkpoint(resumed, tmp_path / "c.pt")
    loaded = load_checkpoint(tmp_path / "c.pt")
    assert loaded.step == 2 and loaded.losses == resumed.losses
    assert loaded.cfg == cfg
    train_step(loaded)
    assert loaded.losses == pytest.approx(straight.losses, rel=1e-6)
    for (name, a), (_, b) in zip(loaded.named_parameters(), straight.named_parameters()):
        assert torch.allclose(a, b, atol=1e-6), name
    for name, a in loaded.ema.items():
        assert torch.allclose(a, straight.ema[name], atol=1e-6), name


def test_train_exports_a_loadable_generator_and_loss_curve(tmp_path):
    from streamrt.gen.generator import StreamGenerator

    out = tmp_path / "gen"
    cfg = tiny_cfg(steps=2, batch_size=1)
    train(cfg, tmp_path / "work", out, log=lambda _: None)
    assert (tmp_path / "work" / CHECKPOINT).exists()
    assert (out / "loss.png").stat().st_size > 0
    gen = StreamGenerator.from_pretrained(out, cache=small_cache())
    cfg_gen = gen.engine.config
    assert cfg_gen.chunk_frames == 3
    assert cfg_gen.policy_args == {"sink_blocks": 0, "window_blocks": 6}
    frames = list(gen.stream("a red circle moving right on a dark background", num_frames=9))
    assert len(frames) == 9 and frames[0].shape == (64, 64, 3)


def test_tune_sampler_writes_the_best_settings_into_the_manifest(tmp_path):
    from streamrt.gen.generator import StreamGenerator

    train(tiny_cfg(steps=1, batch_size=1), None, tmp_path, log=lambda _: None)
    sweep = ({"timesteps": [1000, 500], "shift": 1.0}, {"timesteps": [1000], "shift": 2.0})
    caption = "a red circle moving right on a dark background"
    best = train_gen_eval.tune_sampler(tmp_path, (caption,), 6, sweep, log=lambda _: None)
    assert {"timesteps", "shift"} <= best.keys()
    cfg = StreamGenerator.from_pretrained(tmp_path, cache=small_cache()).engine.config
    for key, value in best.items():
        assert getattr(cfg, key) == value


def test_prompt_scores_see_colour_and_direction_of_a_world_clip():
    caption = "a red circle moving right on a dark background"
    clip = make_clip(1, 24, world_config(TrainGenConfig()), caption)
    right = prompt_scores(clip.frames, caption)
    left = prompt_scores(clip.frames, caption.replace("right", "left"))
    blue = prompt_scores(clip.frames, caption.replace("red", "blue"))
    assert right["present"] > 0.7 and 0.01 < right["area"] < 0.05
    assert right["direction"] == 1.0 and right["speed"] > 0.5
    assert left["direction"] == 0.0
    assert blue["present"] == 0.0
    assert right["shape"] == 1.0 and blue["shape"] == 0.0
    assert prompt_scores(clip.frames, caption.replace("circle", "square"))["shape"] == 0.0
    noise = np.random.default_rng(0).integers(0, 256, (24, 64, 64, 3), dtype=np.uint8)
    assert prompt_scores(noise, caption)["present"] == 0.0  # specks are not a shape


shipped = pytest.mark.skipif(
    not (ASSET / "streamrt.json").exists(), reason="no shipped tiny-world model"
)


def shipped_rollout(caption: str, num_frames: int = 12) -> np.ndarray:
    from streamrt.gen.generator import StreamGenerator

    gen = StreamGenerator.from_pretrained(ASSET, cache=small_cache())
    return np.stack(list(gen.stream(caption, num_frames=num_frames)))


@shipped
def test_shipped_model_draws_the_prompted_background():
    dark = shipped_rollout("a red circle moving right on a dark background")
    light = shipped_rollout("a blue square moving up on a light background")
    # Measured on the shipped model: mean level 26.5 and 213.9 (the world's: 20 and 220),
    # background error 0.026 (dark vs light would be 0.8).
    assert dark.mean() < 60 and light.mean() > 170, (dark.mean(), light.mean())
    assert prompt_scores(dark, "a red circle moving right on a dark background")["background"] < 0.1


@pytest.fixture(scope="module")
def shipped_1x():
    """1x rollouts (the 9-frame training clip) of the shipped model, with its own settings,
    on `EVAL_PROMPTS` x `EVAL_SEEDS` (24 streams; the sampler was tuned on other seeds)."""
    from streamrt.gen.generator import StreamGenerator

    gen = StreamGenerator.from_pretrained(ASSET, cache=small_cache())
    return [
        (p, np.stack(list(gen.stream(p, num_frames=9, seed=seed))))
        for seed in EVAL_SEEDS
        for p in EVAL_PROMPTS
    ]


@shipped
def test_shipped_model_draws_the_prompted_shapes(shipped_1x):
    present = np.mean([prompt_scores(f, p)["present"] for p, f in shipped_1x])
    area = np.mean([prompt_scores(f, p)["area"] for p, f in shipped_1x])
    # Measured on the shipped model: present 0.99 (the world's own clips: 0.92), area 0.039
    # (the world's: 0.024); at 24, 48 and 90 frames 0.045, 0.045 and 0.047 (the model
    # before self-resampling grew its shapes: 0.071, 0.085, 0.092). The model of session 1
    # drew no object.
    assert present >= 0.85, present
    assert 0.01 < area < 0.08, area


@shipped
def test_shipped_model_reaches_the_issue_bar_of_adherence(shipped_1x):
    from streamrt.metrics import adherence

    scores = [adherence(f, p)["score"] for p, f in shipped_1x]
    # The issue's bar: colour present in >= half the frames and moving the prompted way.
    # Measured: 1.0 (24 of 24); at 24, 48 and 90 frames 1.0, 0.958, 1.0. The model before
    # self-resampling: 0.958 (0.833, 0.833, 0.75); before drift training: 0.50.
    assert np.mean(scores) >= 0.9, scores


@shipped
def test_shipped_model_moves_the_prompted_way_in_the_prompted_colour():
    """The adherence metric is not met by any moving blob: the same stream scores 0 for
    the opposite direction and for another colour."""
    from streamrt.gen.generator import StreamGenerator
    from streamrt.metrics import adherence

    gen = StreamGenerator.from_pretrained(ASSET, cache=small_cache())
    flipped = "a red circle moving left on a dark background"
    frames = np.stack(list(gen.stream(flipped, num_frames=9)))
    assert adherence(frames, flipped)["score"] == 1.0
    assert adherence(frames, flipped.replace("left", "right"))["score"] == 0.0
    blue = "a blue circle moving left on a dark background"
    assert adherence(frames, blue)["score"] == 0.0  # the red circle is not a blue one


@shipped
@pytest.mark.parametrize(
    "part", ["transformer/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"]
)
def test_truncated_asset_file_is_named_with_how_to_rebuild_it(part, tmp_path):
    from streamrt.gen.generator import StreamGenerator
    from streamrt.models.generator_files import ModelFileError

    copy = tmp_path / "tiny-world"
    shutil.copytree(ASSET, copy)
    file = copy / part
    file.write_bytes(file.read_bytes()[:1000])
    with pytest.raises(ModelFileError, match="truncated") as err:
        StreamGenerator.from_pretrained(copy)
    assert str(file) in str(err.value) and "streamrt train gen" in str(err.value)
    shutil.rmtree(copy / "tokenizer")
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        StreamGenerator.from_pretrained(copy)


def test_conditioning_measures_how_far_each_caption_word_moves_the_model():
    moved = train_gen_eval.conditioning(ASSET, levels=(500.0,), seeds=(0,))
    assert set(moved) == {"shape", "colour", "direction", "background"}
    assert all(v[500.0] > 0 for v in moved.values())
    # the background fills the frame and the colour every object pixel: they move it most
    assert moved["background"][500.0] > moved["colour"][500.0] > moved["direction"][500.0]
    with pytest.raises(ValueError, match="lacks one of the words"):
        train_gen_eval.conditioning(ASSET, caption="a red circle", levels=(500.0,))


def test_shape_probe_reads_the_worlds_shapes_when_there_is_no_noise_to_remove():
    """At sigma ~ 0 the one-step prediction is the clip itself, so the probe must name
    every shape right (through the shipped pixel codec); the shipped model at sigma 0.5
    names squares and triangles almost never (its blobs)."""
    probe = train_gen_eval.shape_probe(ASSET, sigmas=(1e-4, 0.5), seeds=(0, 1))
    for shape, (right, answered) in probe[1e-4].items():
        assert answered >= 12 and right == answered, (shape, right, answered)
    square, triangle = probe[0.5]["square"], probe[0.5]["triangle"]
    assert square[0] + triangle[0] <= 0.2 * (square[1] + triangle[1]), probe[0.5]
