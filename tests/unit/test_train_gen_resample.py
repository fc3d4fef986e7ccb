"""`streamrt train gen --init-from DIR --resample-prob p`: a run started from an exported
generator, and context chunks the model regenerates itself (tiny configs, CPU)."""

import argparse

import pytest
import torch
from test_train_gen import TINY_MODEL, tiny_cfg

from streamrt.errors import InputError
from streamrt.models.text import TextEncoder
from streamrt.models.train_gen import (
    TrainGenConfig,
    apply_block_causal,
    block_causal_mask,
    flow_matching_loss,
    load_checkpoint,
    new_state,
    sample_batch,
    sample_noise,
    sample_sigmas,
    save_checkpoint,
    train_step,
)
from streamrt.models.train_gen_export import export_generator
from streamrt.models.train_gen_resample import regenerate_context, resampled_inputs
from streamrt.models.wan_checkpoints import load_wan_transformer

PROMPT = "a red circle moving right on a dark background"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny generator trained 3 steps (weights != the average) and exported (the average)."""
    cfg = tiny_cfg()
    state = new_state(cfg)
    for _ in range(3):
        train_step(state)
    out = tmp_path_factory.mktemp("gen") / "tiny"
    export_generator(state, out)
    return state, out


def test_init_from_loads_exactly_the_exported_weights(exported):
    source, out = exported
    state = new_state(tiny_cfg(init_from=str(out), seed=5))  # another seed: other random init
    assert state.step == 0 and state.losses == [] and not state.optimizer.state
    for name, p in state.named_parameters():
        assert torch.equal(p, source.ema[name]), name  # the export is the average
        assert torch.equal(state.ema[name], p), name  # the new average starts there
    torch.manual_seed(0)
    x, t, text = torch.randn(2, 3, 6, 32, 32), torch.full((2, 6 * 64), 600.0), [PROMPT, ""]
    theirs = load_wan_transformer(out / "transformer")
    their_text = TextEncoder.from_pretrained(out, 16)
    with torch.no_grad():
        ours = state.transformer(x, t, state.text_encoder.embed(text), return_dict=False)[0]
        ref = theirs(x, t, their_text.embed(text), return_dict=False)[0]
    assert torch.equal(ours, ref)
    assert ref.abs().mean() > 1e-3


def test_a_run_from_a_tuned_generator_exports_with_its_sampler(exported, tmp_path):
    """The run's first export takes `--init-from`'s tuned sampler (not the untuned
    default), with the run's own drift speed; a manifest already at the output wins."""
    import json
    import shutil

    from streamrt.models.train_gen import train

    _, out = exported
    source = tmp_path / "source"
    shutil.copytree(out, source)
    manifest = json.loads((source / "streamrt.json").read_text())
    manifest["gen"].update(timesteps=[1000, 500], shift=1.0, noise_drift=1.0)
    (source / "streamrt.json").write_text(json.dumps(manifest))
    cfg = tiny_cfg(steps=1, init_from=str(source), drift_prob=0.5, noise_drift=0.25)
    train(cfg, None, tmp_path / "run", log=lambda _: None)
    gen = json.loads((tmp_path / "run" / "streamrt.json").read_text())["gen"]
    assert (gen["timesteps"], gen["shift"], gen["noise_drift"]) == ([1000, 500], 1.0, 0.25)
    gen_default = json.loads((out / "streamrt.json").read_text())["gen"]
    assert gen_default["timesteps"] != [1000, 500]  # what the run would export otherwise

    tuned = json.loads((tmp_path / "run" / "streamrt.json").read_text())
    tuned["gen"]["timesteps"] = [1000, 750, 250]
    (tmp_path / "run" / "streamrt.json").write_text(json.dumps(tuned))
    train(cfg, None, tmp_path / "run", log=lambda _: None)
    gen = json.loads((tmp_path / "run" / "streamrt.json").read_text())["gen"]
    assert gen["timesteps"] == [1000, 750, 250]


def test_init_from_refuses_another_architecture_in_one_line(exported):
    _, out = exported
    with pytest.raises(InputError) as err:
        new_state(tiny_cfg(init_from=str(out), model={**TINY_MODEL, "num_layers": 2}))
    message = str(err.value)
    assert "\n" not in message and "num_layers 1 (run: 2)" in message and str(out) in message


def test_resume_ignores_init_from(exported, tmp_path):
    _, out = exported
    cfg = tiny_cfg(init_from=str(out))
    state = new_state(cfg)
    train_step(state)
    save_checkpoint(state, tmp_path / "c.pt")
    moved = out.parent / "moved"
    out.rename(moved)  # the directory may be gone by the time a run resumes
    try:
        loaded = load_checkpoint(tmp_path / "c.pt", cfg)
    finally:
        moved.rename(out)
    assert loaded.step == 1 and loaded.cfg == cfg
    for (name, a), (_, b) in zip(loaded.named_parameters(), state.named_parameters()):
        assert torch.equal(a, b), name


def _masked(cfg: TrainGenConfig, tokens_per_frame: int = 64):
    """A state whose transformer has the training mask (64 tokens: a 64x64 world frame)."""
    state = new_state(cfg)
    mask = block_causal_mask(cfg.num_frames, 3, tokens_per_frame)
    apply_block_causal(state.transformer, mask)
    return state


def test_resampled_context_is_the_models_own_and_carries_no_gradient():
    cfg = tiny_cfg(num_frames=9, resample_prob=1.0, drift_prob=1.0)
    state = _masked(cfg)
    frames, captions, objects = sample_batch(cfg, 0)
    gen = torch.Generator().manual_seed(0)
    x0 = state.codec.encode(frames)
    sigma = sample_sigmas(cfg, x0.shape[0], gen)
    eps = sample_noise(cfg, x0.shape, captions, gen)
    embeds = state.text_encoder.embed(captions)
    assert embeds.requires_grad
    context, levels = resampled_inputs(state.transformer, embeds, x0, eps, sigma, cfg, gen, 64)
    assert context.grad_fn is None and not context.requires_grad  # made under no_grad
    for b in range(cfg.batch_size):
        clean = levels[b] == 0
        k = int(clean.sum())
        assert k in (3, 6) and clean[:k].all()  # a clean prefix of 1 or 2 chunks
        assert (levels[b, k:] > 0).all()  # the later chunks are learnt
        assert (context[b, :, :k] - x0[b, :, :k]).abs().mean() > 1e-3  # regenerated
        assert torch.equal(context[b, :, k:], x0[b, :, k:])  # ground truth where noised
    loss = flow_matching_loss(
        state.transformer, state.text_encoder, state.codec, frames, objects, captions, cfg, gen
    )
    loss.backward()
    assert all(p.grad is not None for _, p in state.named_parameters() if p.requires_grad)


def test_regeneration_is_block_causal_and_chunk_by_chunk():
    """Chunk 0's regeneration does not see later frames; chunk 1's sees the regenerated
    chunk 0, not the ground truth."""
    cfg = tiny_cfg(num_frames=9)
    state = _masked(cfg, tokens_per_frame=4)
    torch.manual_seed(0)
    x0, eps = torch.randn(1, 3, 9, 8, 8), torch.randn(1, 3, 9, 8, 8)
    embeds = torch.randn(1, 16, 32)
    sigma_r = torch.tensor([[0.8, 0.6, 0.5]])

    def regen(x, k):
        return regenerate_context(
            state.transformer, embeds, x, eps, torch.tensor([k]), sigma_r, cfg, 4
        )

    two = regen(x0, 2)
    later = x0.clone()
    later[:, :, 3:] += 1.0
    one = regen(later, 1)
    assert torch.allclose(one[:, :, :3], two[:, :, :3], atol=1e-6)  # later frames unseen
    assert torch.equal(one[:, :, 3:], later[:, :, 3:])  # beyond the prefix: untouched
    # chunk 1 by hand, seeing the regenerated chunk 0 at t = 0 (steps 0.6 -> 0.5 -> 0.25)
    x = 0.4 * x0[:, :, 3:6] + 0.6 * eps[:, :, 3:6]
    with torch.no_grad():
        for s, nxt in ((0.6, 0.5), (0.5, 0.25), (0.25, 0.0)):
            inp = torch.cat([two[:, :, :3], x, x0[:, :, 6:]], dim=2)
            t = torch.tensor([[0.0] * 3 + [s * 1000] * 3 + [0.0] * 3]).repeat_interleave(4, 1)
            v = state.transformer(inp, t, embeds, return_dict=False)[0][:, :, 3:6]
            pred = x - s * v
            x = (1 - nxt) * pred + nxt * (pred + v)
    assert torch.allclose(two[:, :, 3:6], pred, atol=1e-5)


def g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_no_resampling_gives_the_old_loss_exactly():
    cfg = tiny_cfg(num_frames=9, drift_prob=0.7, resample_prob=0.0)
    state = _masked(cfg)
    frames, captions, objects = sample_batch(cfg, 3)
    new = flow_matching_loss(
        state.transformer,
        state.text_encoder,
        state.codec,
        frames,
        objects,
        captions,
        cfg,
        g(7),
        3.0,
    )
    # the loss as it was before resampling existed (train_gen.py at f844112)
    gen = torch.Generator().manual_seed(7)
    codec, transformer = state.codec, state.transformer
    x0 = codec.encode(frames)
    weight = 1.0 + 3.0 * codec.encode(objects[:, :1])
    sigma = sample_sigmas(cfg, x0.shape[0], gen)
    eps = sample_noise(cfg, x0.shape, captions, gen)
    s = sigma[:, None, :, None, None]
    x_t = (1 - s) * x0 + s * eps
    timestep = (sigma * 1000.0).repeat_interleave(64, dim=1)
    v = transformer(x_t, timestep, state.text_encoder.embed(captions), return_dict=False)[0]
    per_frame = (weight * (v - (eps - x0)).pow(2)).mean(dim=(1, 3, 4))
    noisy = (sigma > 0).float()
    old = (per_frame * noisy).sum() / noisy.sum()
    assert new.item() == old.item()
    on = tiny_cfg(num_frames=9, drift_prob=0.7, resample_prob=1.0)
    resampled = flow_matching_loss(
        state.transformer, state.text_encoder, state.codec, frames, objects, captions, on, g(7), 3.0
    )
    assert resampled.item() != old.item()


def test_resample_options_reach_the_config(exported):
    from streamrt.apps import train as train_cli

    _, out = exported
    parser = argparse.ArgumentParser()
    train_cli.add_arguments(parser)
    args = parser.parse_args(
        ["gen", "--init-from", str(out), "--resample-prob", "0.5", "--resample-sigma", "0.2,0.8"]
    )
    cfg = train_cli.config_from(args)
    assert cfg.init_from == str(out) and cfg.resample_prob == 0.5
    assert cfg.resample_sigma == (0.2, 0.8)
    assert train_cli.config_from(parser.parse_args(["gen"])).resample_prob == 0.0
    with pytest.raises(SystemExit):
        parser.parse_args(["gen", "--resample-sigma", "0.9,0.3"])
    with pytest.raises(InputError, match="resample_sigma"):
        TrainGenConfig(resample_sigma=(0.0, 0.5))


def test_rollout_table_and_contact_sheet_of_an_export(exported, tmp_path):
    import cv2

    from streamrt.models.train_gen_eval import contact_sheet, rollout_table

    _, out = exported
    table = rollout_table(out, lengths=(3,), log=lambda _: None)
    assert set(table) == {3} and 0.0 <= table[3]["adherence"] <= 1.0
    assert 0.0 <= table[3]["shape"] <= 1.0  # the contour classifier's column
    sheet = tmp_path / "sheet.png"
    contact_sheet({"a": out, "b": out}, sheet, runs=((PROMPT, 0),), num_frames=6, every=3)
    img = cv2.imread(str(sheet))
    assert img.shape == (24 + 2 * 128 + 6, 260 + 2 * (128 + 2), 3)
