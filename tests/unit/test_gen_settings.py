"""Settings on the shipped model: every policy with every sampler, window sizing, presets.

The shipped model's own settings keep a 9-frame window (chunkwise, 3-frame chunks); the
rolling and stream-batch samplers keep 4 steps x 3 frames in flight, so its window has
to grow, and a window the user set too small must be refused with the numbers to use.
"""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from streamrt.apps.cli import main
from streamrt.apps.generate import load_generator
from streamrt.cache.policies import POLICIES
from streamrt.config import ConfigError, load_config, parse_bytes, read_preset
from streamrt.embedded import GEN_MODEL
from streamrt.errors import InputError
from streamrt.gen.generator import StreamGenerator
from streamrt.gen.samplers import SAMPLERS
from streamrt.models.codec import tensor_to_frames

ROOT = Path(__file__).resolve().parents[2]
PRESETS = sorted((ROOT / "configs").glob("*.yaml"))
PROMPT = "a red circle moving right on a dark background"
CHUNKS = 8  # 24 frames out (+ up to 9 in flight): past every capacity below (at most 24)
CASES = [(p, {}, s) for p in sorted(POLICIES) for s in SAMPLERS] + [
    ("sink_window", {"adaptive_tau": 0.2}, s) for s in SAMPLERS
]


def _window(cfg) -> int:
    policy = POLICIES[cfg.policy]
    return {**policy.defaults(), **cfg.policy_args}[policy.window_arg]


@pytest.mark.parametrize(("policy", "args", "sampler"), CASES)
def test_every_policy_runs_with_every_sampler_on_the_shipped_model(policy, args, sampler):
    extra = {"policy_args": args} if args else {}
    gen = StreamGenerator.from_pretrained(GEN_MODEL, policy=policy, sampler=sampler, **extra)
    cfg = gen.engine.config
    in_flight = cfg.chunk_frames * (1 if sampler == "chunkwise" else len(cfg.timesteps))
    assert (cfg.chunk_frames, len(cfg.timesteps)) == (3, 4)  # the shipped model's own
    stream = gen.engine.open_stream(PROMPT)
    seq = stream.seqs[0]
    if POLICIES[policy].window_arg is not None:
        assert _window(stream.config) >= in_flight
    for _ in range(CHUNKS):
        x0 = stream.next_latents()
        assert x0.shape == (1, 3, 3, 32, 32)
        assert torch.isfinite(x0).all()
        gen.engine.cache.check_invariants()
    frames = tensor_to_frames(stream.decoder.decode(x0.float()))
    assert frames.shape == (3, 64, 64, 3) and frames.dtype == np.uint8
    assert frames.std() > 0
    cap = seq.policy.capacity
    # The stream wrapped its ring: it wrote more than it could keep, and keeps exactly that.
    assert seq.next_index >= CHUNKS * 3 + in_flight - 3
    if cap is not None:
        assert seq.next_index > cap and seq.counts["device"] == cap
    stream.close()


def test_a_window_sized_for_the_sampler_equals_the_same_window_given():
    auto = StreamGenerator.from_pretrained(GEN_MODEL, sampler="rolling")
    assert auto.engine.config.policy_args == {"sink_blocks": 0, "window_blocks": 12}
    given = StreamGenerator.from_pretrained(
        GEN_MODEL, sampler="rolling", policy_args={"sink_blocks": 0, "window_blocks": 12}
    )
    a = np.stack(list(auto.stream(PROMPT, num_frames=24)))
    b = np.stack(list(given.stream(PROMPT, num_frames=24)))
    assert a.shape == (24, 64, 64, 3) and np.array_equal(a, b)
    # The shipped chunkwise setting is untouched, and a stream may switch sampler alone.
    gen = StreamGenerator.from_pretrained(GEN_MODEL)
    assert gen.engine.config.policy_args == {"sink_blocks": 0, "window_blocks": 9}
    stream = gen.engine.open_stream(PROMPT, sampler="stream_batch")
    assert stream.config.policy_args == {"sink_blocks": 0, "window_blocks": 12}
    stream.close()
    # A new policy starts from its own defaults, not the shipped sink_window's arguments.
    deep = StreamGenerator.from_pretrained(GEN_MODEL, policy="deep_sink", sampler="rolling")
    assert deep.engine.config.policy_args == {"window_blocks": 12}
    assert deep.engine.open_stream(PROMPT).seqs[0].policy.sink_blocks == 10


TOO_SMALL = [
    (
        "deep_sink",
        {"sink_blocks": 10, "window_blocks": 11},
        "rolling",
        "window_blocks=11 is too small for the rolling sampler with 4 steps x 3 frames in "
        "flight: use window_blocks >= 12",
    ),
    (
        "sink_window",
        {"sink_blocks": 1, "window_blocks": 4},
        "stream_batch",
        "window_blocks=4 is too small for the stream_batch sampler with 4 steps x 3 frames "
        "in flight: use window_blocks >= 12",
    ),
    (
        "ema_sink",
        {"window_blocks": 2},
        "chunkwise",
        "window_blocks=2 is too small for the chunkwise sampler with one chunk of 3 frames "
        "in flight: use window_blocks >= 3",
    ),
    (
        "participative",
        {"recent_blocks": 4},
        "rolling",
        "recent_blocks=4 is too small for the rolling sampler with 4 steps x 3 frames in "
        "flight: use recent_blocks >= 12",
    ),
    (
        "deep_sink_participative",
        {"budget_blocks": 16},
        "stream_batch",
        "budget_blocks=16 is too small for the stream_batch sampler with 4 steps x 3 frames "
        "in flight: recent_blocks 12 + sink_blocks 10 + 1 candidate: use budget_blocks >= 23",
    ),
]


@pytest.mark.parametrize(("policy", "args", "sampler", "message"), TOO_SMALL)
def test_a_window_given_too_small_is_refused_with_the_numbers(policy, args, sampler, message):
    with pytest.raises(InputError) as err:
        StreamGenerator.from_pretrained(GEN_MODEL, policy=policy, policy_args=args, sampler=sampler)
    assert message in str(err.value)
    # The same numbers one larger run (the message's bound is the real one).
    key = message.split("use ")[1].split(" >= ")[0]
    ok = {**args, key: int(message.rsplit(">= ", 1)[1])}
    gen = StreamGenerator.from_pretrained(GEN_MODEL, policy=policy, policy_args=ok, sampler=sampler)
    got = gen.engine.config.policy_args
    assert {k: got[k] for k in ok} == ok  # given arguments are never resized
    stream = gen.engine.open_stream(PROMPT)
    for _ in range(10):
        stream.next_latents()
    assert stream.seqs[0].next_index > stream.seqs[0].policy.capacity
    stream.close()


def test_a_window_too_small_for_a_stream_override_is_refused():
    gen = StreamGenerator.from_pretrained(
        GEN_MODEL, policy_args={"sink_blocks": 0, "window_blocks": 9}
    )
    with pytest.raises(InputError, match="window_blocks=9 is too small for the rolling"):
        next(gen.stream(PROMPT, sampler="rolling"))
    assert not gen.engine.sequences()  # nothing left open


def test_cli_refuses_a_small_window_in_one_line(tmp_path, capsys):
    out = tmp_path / "o.mp4"
    argv = ["generate", "--prompt", PROMPT, "--frames", "3", "-o", str(out)]
    deep = ["--policy", "deep_sink", "--policy-args", "sink_blocks=10,window_blocks=11"]
    assert main([*argv, *deep, "--sampler", "rolling"]) == 2
    err = capsys.readouterr().err
    assert "use window_blocks >= 12" in err and "Traceback" not in err
    assert not out.exists()
    assert main([*argv, "--sampler", "rolling"]) == 0
    assert out.stat().st_size > 0


# ---------------------------------------------------------------------------- presets


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
def test_every_preset_runs_at_64x64(preset, tmp_path, capsys):
    out = tmp_path / "o.mp4"
    argv = ["generate", "--prompt", PROMPT, "--config", str(preset), "--frames", "8"]
    assert main([*argv, "--size", "64x64", "-o", str(out)]) == 0
    assert out.stat().st_size > 0
    cfg = load_config(preset)
    gen = load_generator(GEN_MODEL, str(preset), {"height": 64, "width": 64})
    frames = np.stack(list(gen.stream(PROMPT, num_frames=8)))
    assert frames.shape == (8, 64, 64, 3)
    device = gen.stats()["cache"]["tiers"]["device"]
    # The preset's budget sizes the device pool (not the 1 GiB default).
    assert device["total_blocks"] == cfg.cache.device_bytes // device["page_bytes"]
    if (cfg.gen.height, cfg.gen.width) != (64, 64):
        # The preset's own size does not fit the embedded model's RoPE table: one line.
        assert main([*argv, "-o", str(tmp_path / "big.mp4")]) == 2
        err = capsys.readouterr().err
        assert "--size 64x64" in err and "--model DIR" in err and "Traceback" not in err


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
def test_every_preset_runs_on_the_untrained_tiny_model(preset, tmp_path):
    gen = load_generator("tiny-random", str(preset), {"height": 64, "width": 64})
    cfg = load_config(preset)
    assert gen.engine.transformer.patch_embedding.weight.dtype == getattr(torch, cfg.gen.dtype)
    frames = np.stack(list(gen.stream(PROMPT, num_frames=4)))
    assert frames.shape == (4, 64, 64, 3)


def _other(value, choices=None):
    """A different valid value of a preset field (to see the change land)."""
    if choices:
        return next(c for c in choices if c != value)
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value / 2
    if isinstance(value, str):
        return parse_bytes(value) + 2**20
    if isinstance(value, list):
        return value[:-1]
    if isinstance(value, dict):
        return {k: _other(v) for k, v in value.items()}
    raise AssertionError(f"no other value for {value!r}")


CHOICES = {
    "sampler": list(SAMPLERS),
    "policy": sorted(POLICIES),
    "dtype": ["float32", "bfloat16", "float16"],
    "attention": ["sdpa", "flex"],
    "renoise": ["fresh", "predicted"],
}
FIELDS = [
    (p, section, key)
    for p in PRESETS
    for section, keys in read_preset(p)[1].items()
    for key in keys
]


def _effective(gen, section, key):
    engine = gen.engine
    if section == "cache":
        value = getattr(engine.cache.config, key)
        if key in ("device_bytes", "host_bytes"):
            assert engine.cache.budgets[key.split("_")[0]] == value
        return value
    if key == "dtype":
        assert engine.dtype == getattr(torch, engine.config.dtype)
    return getattr(engine.config, key)


@pytest.mark.parametrize(
    ("preset", "section", "key"), FIELDS, ids=lambda v: v.name if isinstance(v, Path) else v
)
def test_every_preset_field_lands_in_the_engine(preset, section, key, tmp_path):
    """Each key of each preset reaches the engine's settings or cache manager, and a
    different value there reaches it too (no field is parsed and then ignored)."""
    value = read_preset(preset)[1][section][key]
    gen = StreamGenerator.from_pretrained(GEN_MODEL, config=preset)
    got = _effective(gen, section, key)
    if key == "policy_args":  # the preset's arguments are the user's: never resized
        assert {k: got[k] for k in value} == value
    else:
        assert got == value
    changed = _other(value, CHOICES.get(key))
    if key in ("policy", "sampler"):  # the preset's policy arguments fit its own choice
        data = {section: {key: changed}}
    else:
        data = yaml.safe_load(preset.read_text())
        data[section][key] = changed
    edited = tmp_path / preset.name
    edited.write_text(yaml.safe_dump(data))
    got = _effective(StreamGenerator.from_pretrained(GEN_MODEL, config=edited), section, key)
    if key == "policy_args":
        assert {k: got[k] for k in changed} == changed
    else:
        assert got == (parse_bytes(changed) if section == "cache" else changed)
    assert got != value


def test_sections_nothing_reads_are_rejected(tmp_path):
    bad = tmp_path / "bench.yaml"
    bad.write_text("bench:\n  repeats: 3\n")
    with pytest.raises(ConfigError, match=r"bench\.yaml: the 'bench' section is gone.*--repeats"):
        load_config(bad)
    with pytest.raises(ConfigError, match="'bench' section is gone"):
        StreamGenerator.from_pretrained(GEN_MODEL, config=bad)
    for preset in PRESETS:  # every section a preset uses is one the runtime reads
        assert set(yaml.safe_load(preset.read_text())) <= {"gen", "cache"}


def test_an_explicit_cache_config_wins_over_the_preset():
    from streamrt.config import CacheConfig

    small = ROOT / "configs" / "cache-small.yaml"
    gen = StreamGenerator.from_pretrained(GEN_MODEL, config=small)
    assert gen.engine.cache.budgets["device"] == 256 * 2**20
    assert gen.engine.cache.config.device == str(gen.engine.device)
    mine = CacheConfig(device_bytes="64MiB")
    gen = StreamGenerator.from_pretrained(GEN_MODEL, config=small, cache=mine)
    assert gen.engine.cache.budgets["device"] == 64 * 2**20
    default = StreamGenerator.from_pretrained(GEN_MODEL)
    assert default.engine.cache.budgets["device"] == 2**30
    assert math.isclose(default.engine.config.shift, 1.0)  # the shipped model's own


def test_positions_past_the_rope_table_are_refused(tmp_path, capsys):
    from streamrt.config import GenConfig
    from streamrt.gen.engine import GenEngine
    from streamrt.models.generator_files import tiny_random_parts
    from streamrt.world import VOCAB

    parts = tiny_random_parts(VOCAB, rope_max_seq_len=8)
    cfg = GenConfig(height=32, width=32, policy="full", policy_args={})
    stream = GenEngine(*parts, cfg).open_stream(PROMPT)
    stream.next_latents()
    stream.next_latents()  # frames 0..5: inside the 8-frame table
    with pytest.raises(InputError, match="frame position 8 is past this model's RoPE table of 8"):
        stream.next_latents()
    with pytest.raises(InputError, match=r"128x32 is 16x4 patches .* up to 64x64"):
        GenEngine(*parts, cfg).open_stream(PROMPT, width=128)
    # The CLI says the same in one line, mid-stream (the shipped model's table: 64 frames).
    out = tmp_path / "o.mp4"
    argv = ["generate", "--prompt", PROMPT, "--policy", "full", "--frames", "70", "-o", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "past this model's RoPE table of 64 frames" in err and "Traceback" not in err
