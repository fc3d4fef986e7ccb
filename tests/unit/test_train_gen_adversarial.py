"""`--adversarial-weight`: the caption-conditioned critic of `train_gen_adversarial`."""

import argparse

import pytest
import torch

from streamrt.errors import InputError
from streamrt.models.train_gen import (
    flow_matching_loss,
    load_checkpoint,
    new_state,
    save_checkpoint,
    train_step,
)
from streamrt.models.train_gen_adversarial import Critic, swap_shapes, wrong_captions
from streamrt.models.train_gen_data import sample_batch
from tests.unit.test_train_gen import tiny_cfg

CAPTION = "a red circle moving right on a dark background"


def test_wrong_captions_swap_every_shape_word_and_keep_the_rest():
    gen = torch.Generator().manual_seed(0)
    two = "a red circle moving right and a blue square moving up on a dark background"
    for _ in range(20):
        swapped = swap_shapes(two, gen)
        words, theirs = two.split(), swapped.split()
        changed = [(a, b) for a, b in zip(words, theirs) if a != b]
        assert [a for a, _ in changed] == ["circle", "square"], swapped
        assert all(b in ("circle", "square", "triangle") and a != b for a, b in changed)
    assert swap_shapes("a red light", gen) is None
    # a caption without a shape word (caption dropout's "") gets another clip's caption
    assert wrong_captions(["", CAPTION], gen)[0] == CAPTION


def test_the_critic_reads_the_caption_and_learns_a_shape_from_a_wrong_one():
    """Real: a bright square under "square"; the same square under "circle" is fake.
    A critic that ignored its caption could not separate the two."""
    torch.manual_seed(0)
    critic = Critic(channels=3, vocab_size=8, text_len=4, width=16)
    frames = torch.full((8, 3, 16, 16), -1.0)
    frames[:, :, 4:12, 4:12] = 1.0
    square = torch.tensor([[1, 2, 3, 0]]).repeat(8, 1)
    circle = torch.tensor([[1, 4, 3, 0]]).repeat(8, 1)
    opt = torch.optim.Adam(critic.parameters(), lr=2e-3, betas=(0.0, 0.99))
    for _ in range(150):
        loss = (
            torch.relu(1 - critic(frames, square)).mean()
            + torch.relu(1 + critic(frames, circle)).mean()
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        right, wrong = critic(frames, square).mean(), critic(frames, circle).mean()
    assert critic(frames, square).shape == (8, 8, 8)
    assert right > 0.5 and wrong < -0.5, (right, wrong)


def test_the_adversarial_gradient_has_the_weight_times_the_regressions_norm():
    cfg = tiny_cfg(adversarial_weight=0.5)
    state = new_state(cfg)
    frames, captions, objects = sample_batch(cfg, 0)
    seen = {}
    adversary = state.adversary
    original = adversary.generator_loss

    def spy(mse, v, *rest):
        seen["mse"], seen["v"] = mse, v
        total = original(mse, v, *rest)
        seen["total"] = total
        return total

    adversary.generator_loss = spy
    gen = torch.Generator().manual_seed(0)
    flow_matching_loss(
        state.transformer, state.text_encoder, state.codec, frames, objects, captions, cfg, gen,
        adversary=adversary,
    )  # fmt: skip
    v = seen["v"]
    g_mse = torch.autograd.grad(seen["mse"], v, retain_graph=True)[0]
    g_total = torch.autograd.grad(seen["total"], v, retain_graph=True)[0]
    g_adv = g_total - g_mse
    assert g_adv.norm().item() == pytest.approx(0.5 * g_mse.norm().item(), rel=1e-4)
    assert adversary.pending is not None and adversary.step() > 0


def test_an_adversarial_run_trains_its_critic_and_resumes_it(tmp_path):
    cfg = tiny_cfg(steps=3, adversarial_weight=0.5, adversarial_max_sigma=0.8)
    state = new_state(cfg)
    before = {k: v.clone() for k, v in state.adversary.critic.state_dict().items()}
    train_step(state)
    train_step(state)
    after = state.adversary.critic.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert set(state.adversary.last) >= {"mse", "adv", "scale", "critic"}
    # the logged loss is the regression's: comparable with runs without a critic
    assert state.losses[-1] == state.adversary.last["mse"]
    save_checkpoint(state, tmp_path / "c.pt")
    loaded = load_checkpoint(tmp_path / "c.pt")
    for k, v in loaded.adversary.critic.state_dict().items():
        assert torch.equal(v, after[k]), k
    assert loaded.adversary.optimizer.state_dict()["state"]
    # a plain run's checkpoint resumed with a critic: a fresh critic joins
    plain = new_state(tiny_cfg(steps=3))
    save_checkpoint(plain, tmp_path / "p.pt")
    joined = load_checkpoint(tmp_path / "p.pt", cfg)
    train_step(joined)
    assert joined.adversary.last["critic"] > 0


def test_adversarial_options_reach_the_config_and_bad_values_are_refused(tmp_path):
    from streamrt.apps import train as train_cli

    parser = argparse.ArgumentParser()
    train_cli.add_arguments(parser)
    args = parser.parse_args(
        ["gen", "--adversarial-weight", "0.3", "--adversarial-max-sigma", "0.6"]
    )
    cfg = train_cli.config_from(args)
    assert (cfg.adversarial_weight, cfg.adversarial_max_sigma) == (0.3, 0.6)
    assert train_cli.config_from(parser.parse_args(["gen"])).adversarial_weight == 0
    with pytest.raises(InputError, match="adversarial_max_sigma"):
        tiny_cfg(adversarial_weight=1, adversarial_max_sigma=0)
    with pytest.raises(InputError, match="distill_from"):
        tiny_cfg(adversarial_weight=1, distill_from=str(tmp_path))
