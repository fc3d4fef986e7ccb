"""A few-step student distilled from a many-step teacher: `--distill-from DIR`.

Streams sample with a few deterministic steps (`renoise: predicted`: x0 = x - sigma v,
then back to the next level along the same direction, an Euler step of the flow). A model
trained by flow matching predicts the mean velocity, and a large step along a mean lands
on the average of the possible frames: on the embedded world, a blob in a blended colour.
Many small steps follow the flow's curved paths instead and land on one frame; 16 steps of
the latent generator drew the objects 1.5x as often as 4 (assets/tiny-world/TRAINING.md).
Distillation trains the student's single step to land where the teacher's `substeps` small
steps land (progressive distillation, Salimans & Ho 2022, on the rectified-flow step):

    student levels  s_0 = 1 > s_1 > ... > s_{n-1} > s_n = 0      (the stream's sampler)
    a clip          chunk k of each clip noised to a student level s_i with the clip's
                    training noise (drifting where the clip's is); chunks < k clean
                    context (t = 0), as the engine's clean refresh writes them
    teacher         `substeps` even Euler steps from s_i to s_{i+1} on chunk k (no grad;
                    optionally with classifier-free guidance, which the student absorbs)
    target          v* = (x_{s_i} - x_teacher) / (s_i - s_{i+1}): the student's one step
                    with v* lands on the teacher's point
    loss            object-weighted MSE(v_student, v*) on chunk k only

Chunks after k see chunk k through the block-causal mask but not the other way, so they
do not change its target; they carry no loss. The teacher is a frozen generator directory
of the run's architecture (usually the run's own `--init-from`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

import torch

from streamrt.errors import InputError
from streamrt.gen.schedule import shifted_sigmas


class Teacher(NamedTuple):
    """The frozen teacher: its transformer and its own text encoder (the student's text
    encoder trains, so its embeddings would drift away from what the teacher learnt)."""

    transformer: torch.nn.Module
    text_encoder: Any


def load_teacher(cfg, path: str | Path, student: torch.nn.Module) -> Teacher:
    """The transformer and text encoder of the generator directory `path`, frozen; the
    transformer must have the student's architecture (the caller applies the mask)."""
    from streamrt.models.text import TextEncoder
    from streamrt.models.train_gen_resample import config_diff
    from streamrt.models.wan_checkpoints import load_wan_transformer

    teacher = load_wan_transformer(Path(path) / "transformer")  # CheckpointError: one line
    theirs = json.loads(json.dumps(dict(teacher.config)))
    diff = config_diff(theirs, student.config)
    if diff:
        raise InputError(
            f"--distill-from {path}: its transformer is not the run's: " + "; ".join(diff)
        )
    text = TextEncoder.from_pretrained(path, cfg.text_len)
    for p in [*teacher.parameters(), *text.model.parameters()]:
        p.requires_grad_(False)
    text.model.eval()
    return Teacher(teacher.eval(), text)


def student_levels(cfg) -> list[float]:
    """The student's noise levels, s_0 .. s_{n-1}, then 0."""
    return [*shifted_sigmas(list(cfg.resample_timesteps), cfg.resample_shift), 0.0]


def sample_targets(cfg, batch: int, frames: int, gen: torch.Generator):
    """Per clip: the target chunk `k` `[B]`, the student step `i` `[B]`, and the per-frame
    levels `[B, F]` before and after that step (chunks < k clean at both; chunk k and the
    later chunks at s_i, then s_(i+1): those are masked out of the loss and cannot reach
    chunk k)."""
    n = frames // cfg.chunk_frames
    levels = torch.tensor(student_levels(cfg))
    k = torch.randint(0, n, (batch,), generator=gen)
    i = torch.randint(0, len(levels) - 1, (batch,), generator=gen)
    context = (torch.arange(n)[None] < k[:, None]).repeat_interleave(cfg.chunk_frames, dim=1)
    sigma = torch.where(context, 0.0, levels[i][:, None])
    nxt = torch.where(context, 0.0, levels[i + 1][:, None])
    return k, i, sigma, nxt


@torch.no_grad()
def teacher_step(
    teacher,
    x_t: torch.Tensor,
    sigma: torch.Tensor,
    nxt: torch.Tensor,
    embeds: torch.Tensor,
    null_embeds: torch.Tensor | None,
    cfg,
    tokens_per_frame: int,
) -> torch.Tensor:
    """`substeps` even Euler steps of the teacher from the per-frame levels `sigma` `[B, F]`
    to `nxt` `[B, F]` (frames where they are equal, the clean context, stay as they are);
    with `null_embeds`, the velocity is guided by `cfg.distill_guidance`."""
    x = x_t.clone()
    m = cfg.distill_substeps
    for j in range(m):
        here = sigma + (nxt - sigma) * (j / m)
        there = sigma + (nxt - sigma) * ((j + 1) / m)
        t = (here * 1000.0).repeat_interleave(tokens_per_frame, dim=1)
        v = teacher(x, t, embeds, return_dict=False)[0]
        if null_embeds is not None:
            v_null = teacher(x, t, null_embeds, return_dict=False)[0]
            v = v_null + cfg.distill_guidance * (v - v_null)
        x = x + (there - here)[:, None, :, None, None] * v
    return x


def distill_loss(
    student,
    teacher: Teacher,
    text_encoder,
    x0: torch.Tensor,
    eps: torch.Tensor,
    weight: torch.Tensor,
    captions: list[str],
    cfg,
    gen: torch.Generator,
    tokens_per_frame: int,
) -> torch.Tensor:
    """Object-weighted MSE between the student's velocity and the teacher's multi-step
    target on each clip's target chunk (module docstring)."""
    batch, _, frames = x0.shape[:3]
    k, _, sigma, nxt = sample_targets(cfg, batch, frames, gen)
    s = sigma[:, None, :, None, None]
    x_t = (1 - s) * x0 + s * eps
    embeds = text_encoder.embed(captions)
    with torch.no_grad():
        theirs = teacher.text_encoder.embed(captions)
        null = None
        if cfg.distill_guidance != 1.0:
            null = teacher.text_encoder.embed([""] * batch)
    x_next = teacher_step(teacher.transformer, x_t, sigma, nxt, theirs, null, cfg, tokens_per_frame)
    step = (sigma - nxt)[:, None, :, None, None]
    target = (x_t - x_next) / step.clamp_min(1e-6)
    t = (sigma * 1000.0).repeat_interleave(tokens_per_frame, dim=1)
    v = student(x_t, t, embeds, return_dict=False)[0]
    in_chunk = torch.arange(frames)[None] // cfg.chunk_frames == k[:, None]
    per_frame = (weight * (v - target).pow(2)).mean(dim=(1, 3, 4))
    mask = in_chunk.float()
    return (per_frame * mask).sum() / mask.sum()
