"""`streamrt train gen --distill-from DIR`: a few-step student taught by a many-step
teacher (`models/train_gen_distill.py`; tiny configs, CPU)."""

import argparse
import copy

import pytest
import torch
from test_train_gen import tiny_cfg

from streamrt.errors import InputError
from streamrt.models.train_gen import (
    apply_block_causal,
    block_causal_mask,
    new_state,
    train,
    train_step,
)
from streamrt.models.train_gen_distill import (
    Teacher,
    distill_loss,
    sample_targets,
    student_levels,
    teacher_step,
)
from streamrt.models.train_gen_export import export_generator
from streamrt.models.wan_checkpoints import CheckpointError

CAPTIONS = ["a red circle moving right on a dark background", ""]


class Linear(torch.nn.Module):
    """A teacher whose velocity is `a * x` (frame-wise, caption-blind): its Euler steps
    have a closed form."""

    def __init__(self, a: float) -> None:
        super().__init__()
        self.a = a

    def forward(self, x, t, embeds, return_dict=False):
        return (self.a * x,)


def test_teacher_substeps_are_even_euler_steps_and_context_stays():
    cfg = tiny_cfg(distill_substeps=3)
    x = torch.randn(2, 3, 6, 4, 4)
    sigma = torch.tensor([[0.0] * 3 + [0.75] * 3, [0.5] * 6])
    nxt = torch.tensor([[0.0] * 3 + [0.5] * 3, [0.25] * 6])
    out = teacher_step(Linear(2.0), x, sigma, nxt, torch.zeros(2, 1, 1), None, cfg, 16)
    # x' = x (1 + a dt / m)^m with dt = nxt - sigma, m = 3
    factor = (1 + 2.0 * (nxt - sigma) / 3) ** 3
    assert torch.allclose(out, x * factor[:, None, :, None, None], atol=1e-6)
    assert torch.equal(out[0, :, :3], x[0, :, :3])  # clean context is not touched


def test_guided_teacher_mixes_conditional_and_null_velocities():
    class Caption(torch.nn.Module):  # velocity = the caption embedding's first value
        def forward(self, x, t, embeds, return_dict=False):
            return (torch.ones_like(x) * embeds[:, 0, 0][:, None, None, None, None],)

    cfg = tiny_cfg(distill_substeps=1, distill_guidance=3.0)
    x = torch.zeros(1, 3, 3, 2, 2)
    sigma, nxt = torch.full((1, 3), 1.0), torch.full((1, 3), 0.5)
    cond, null = torch.full((1, 1, 1), 2.0), torch.full((1, 1, 1), 1.0)
    out = teacher_step(Caption(), x, sigma, nxt, cond, null, cfg, 4)
    assert torch.allclose(out, torch.full_like(x, -0.5 * (1 + 3.0 * (2 - 1))))


def test_targets_put_one_chunk_at_a_student_level_after_clean_context():
    cfg = tiny_cfg(num_frames=9)
    levels = student_levels(cfg)
    assert levels == [1.0, 0.75, 0.5, 0.25, 0.0]
    k, i, sigma, nxt = sample_targets(cfg, 64, 9, torch.Generator().manual_seed(0))
    assert set(k.tolist()) == {0, 1, 2} and set(i.tolist()) == {0, 1, 2, 3}
    for b in range(64):
        chunks, after = sigma[b].view(3, 3), nxt[b].view(3, 3)
        assert (chunks[: k[b]] == 0).all() and (after[: k[b]] == 0).all()
        assert (chunks[k[b] :] == levels[i[b]]).all()
        assert (after[k[b] :] == levels[i[b] + 1]).all()


def test_a_student_that_is_its_one_step_teacher_has_zero_loss_and_a_longer_teacher_not():
    cfg = tiny_cfg(distill_substeps=1)
    state = new_state(cfg)
    for _ in range(2):  # weights that predict something
        train_step(state)
    teacher = copy.deepcopy(state.transformer).eval()
    mask = block_causal_mask(cfg.num_frames, cfg.chunk_frames, 64)
    for model in (state.transformer, teacher):
        apply_block_causal(model, mask)
    x0 = torch.randn(2, 3, cfg.num_frames, 32, 32)
    eps = torch.randn_like(x0)
    weight = torch.ones(2, 1, cfg.num_frames, 32, 32)

    def loss(c):
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            return distill_loss(
                state.transformer, Teacher(teacher, state.text_encoder), state.text_encoder,
                x0, eps, weight, CAPTIONS, c, gen, 64,
            ).item()  # fmt: skip

    assert loss(cfg) < 1e-10
    assert loss(tiny_cfg(distill_substeps=4)) > 1e-6  # the curved path's chord differs


def test_a_distillation_run_trains_from_its_teacher_and_refuses_another_one(tmp_path):
    state = new_state(tiny_cfg())
    train_step(state)
    export_generator(state, tmp_path / "teacher")
    cfg = tiny_cfg(
        steps=2, init_from=str(tmp_path / "teacher"), distill_from=str(tmp_path / "teacher")
    )
    run = train(cfg, tmp_path / "work", tmp_path / "student", log=lambda _: None)
    assert run.step == 2 and all(loss > 0 for loss in run.losses)
    frozen = [*run.teacher.transformer.parameters(), *run.teacher.text_encoder.model.parameters()]
    assert not any(p.requires_grad for p in frozen)
    # the teacher keeps its own text encoder, the export's, while the student's trains
    from streamrt.models.text import TextEncoder

    exported = TextEncoder.from_pretrained(tmp_path / "teacher", 16).model.state_dict()
    theirs = run.teacher.text_encoder.model.state_dict()
    assert all(torch.equal(theirs[k], v) for k, v in exported.items())
    ours = run.text_encoder.model.state_dict()
    assert any(not torch.equal(ours[k], v) for k, v in exported.items())
    assert (tmp_path / "student" / "streamrt.json").exists()

    other = tiny_cfg(model={**tiny_cfg().model, "num_layers": 2})
    other_state = new_state(other)
    export_generator(other_state, tmp_path / "other")
    with pytest.raises(InputError, match="num_layers"):
        train(tiny_cfg(steps=1, distill_from=str(tmp_path / "other")), None, None)
    with pytest.raises(CheckpointError):
        train(tiny_cfg(steps=1, distill_from=str(tmp_path)), None, None)
    with pytest.raises(InputError, match="resample_prob"):
        tiny_cfg(distill_from=str(tmp_path / "teacher"), resample_prob=0.5)
    with pytest.raises(InputError, match="distill_substeps"):
        tiny_cfg(distill_substeps=0)


def test_distill_options_reach_the_config(tmp_path):
    from streamrt.apps import train as train_cli

    parser = argparse.ArgumentParser()
    train_cli.add_arguments(parser)
    args = parser.parse_args(
        ["gen", "--distill-from", str(tmp_path), "--distill-substeps", "2",
         "--distill-guidance", "3"]
    )  # fmt: skip
    cfg = train_cli.config_from(args)
    assert (cfg.distill_from, cfg.distill_substeps, cfg.distill_guidance) == (str(tmp_path), 2, 3)
    assert train_cli.config_from(parser.parse_args(["gen"])).distill_from is None
