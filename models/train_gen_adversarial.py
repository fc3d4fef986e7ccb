"""A caption-conditioned critic for sharp, prompted shapes: `--adversarial-weight W`.

Flow matching regresses the mean velocity, and the one-step estimate of the clean frames a
few-step sampler draws from, x0 = x_t - sigma v, is the mean of what may lie under the
noise: on the embedded world, a blob in which circle, square and triangle are averaged,
with the shape word all but ignored (assets/tiny-world/TRAINING.md, sessions 10-16).
Adversarial diffusion distillation (Sauer et al. 2023) adds a critic on that estimate,
which rewards one sharp sample instead of the mean; a matching-aware critic (Reed et al.
2016) also scores real frames under a wrong caption as fake, so a sharp object of the
wrong shape is as fake as a blob:

    generator   L = MSE(v, eps - x0) + W * lambda * mean(-D(x0_hat, caption))
                lambda = |dMSE/dv| / |dL_adv/dv|, both on the batch's velocity (detached):
                the adversarial gradient reaching the transformer has W times the
                norm of the regression's (VQGAN's balancing, taken at the model's
                output instead of its last layer: no second backward through it)
    critic      hinge: relu(1 - D(x0, c)) + (relu(1 + D(x0_hat, c)) + relu(1 + D(x0, c'))) / 2
                c' = the caption with each shape word swapped for another shape,
                or a caption of another clip of the batch where it names no shape

The critic judges single latent frames (a PatchGAN map over them, averaged), only of the
chunks that carry noise with sigma <= `adversarial_max_sigma`; its caption input is its
own embedding of the tokenizer's ids by position (not the text encoder's, which trains).
"""

from __future__ import annotations

import re
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from streamrt.world import SHAPES

_SHAPE_WORD = re.compile(r"\b(" + "|".join(SHAPES) + r")\b")


def swap_shapes(caption: str, gen: torch.Generator) -> str | None:
    """`caption` with each shape word replaced by another shape (None: it names none)."""
    if not _SHAPE_WORD.search(caption):
        return None

    def other(match: re.Match) -> str:
        choices = [s for s in SHAPES if s != match.group(1)]
        return choices[int(torch.randint(len(choices), (1,), generator=gen))]

    return _SHAPE_WORD.sub(other, caption)


def wrong_captions(captions: list[str], gen: torch.Generator) -> list[str]:
    """A caption per clip that does not describe it: its shapes swapped, or (no shape
    word) the next clip's caption."""
    rolled = captions[1:] + captions[:1]
    return [swap_shapes(c, gen) or r for c, r in zip(captions, rolled)]


class Critic(nn.Module):
    """Projection discriminator over latent frames `[N, C, H, W]` and caption ids `[N, L]`:
    a logit per location of a stride-2 feature map (spectral norm on every layer)."""

    def __init__(self, channels: int, vocab_size: int, text_len: int, width: int = 64) -> None:
        super().__init__()
        self.body = nn.Sequential(
            spectral_norm(nn.Conv2d(channels, width // 2, 3, padding=1)),
            nn.LeakyReLU(0.2),
            spectral_norm(nn.Conv2d(width // 2, width, 4, stride=2, padding=1)),
            nn.LeakyReLU(0.2),
            spectral_norm(nn.Conv2d(width, width, 3, padding=1)),
            nn.LeakyReLU(0.2),
        )
        self.out = spectral_norm(nn.Conv2d(width, 1, 1))
        self.words = nn.Embedding(vocab_size, width)
        self.positions = nn.Parameter(torch.zeros(text_len, width))
        self.caption = spectral_norm(nn.Linear(text_len * width, width))

    def forward(self, latents: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Logits `[N, H', W']` (real > 0)."""
        features = self.body(latents)
        embedded = self.caption((self.words(ids) + self.positions).flatten(1))
        projected = (embedded[:, :, None, None] * features).sum(1)
        return self.out(features)[:, 0] + projected


def _frames(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """`[B, C, F, H, W]` -> the kept frames `[N, C, H, W]` (`keep`: `[B, F]` bool)."""
    return x.permute(0, 2, 1, 3, 4)[keep]


class Adversary:
    """The critic, its optimizer, and the batch its next step learns from."""

    def __init__(self, cfg, text_encoder, channels: int) -> None:
        self.cfg = cfg
        self.text_encoder = text_encoder  # its tokenizer only: the critic embeds ids itself
        self.critic = Critic(channels, len(text_encoder.tokenizer), cfg.text_len)
        self.optimizer = torch.optim.Adam(
            self.critic.parameters(), lr=cfg.adversarial_lr, betas=(0.0, 0.99)
        )
        self.pending: tuple[torch.Tensor, ...] | None = None
        self.last: dict[str, float] = {}

    def ids(self, captions: list[str]) -> torch.Tensor:
        return self.text_encoder.token_ids(captions)[0]

    def generator_loss(
        self,
        mse: torch.Tensor,
        v: torch.Tensor,
        x0_hat: torch.Tensor,
        x0: torch.Tensor,
        sigma: torch.Tensor,
        captions: list[str],
        gen: torch.Generator,
    ) -> torch.Tensor:
        """`mse` plus the balanced adversarial term on the judged frames of `x0_hat`; keeps
        those frames (detached), their clean ones and captions for `step`."""
        keep = (sigma > 0) & (sigma <= self.cfg.adversarial_max_sigma)
        self.last = {"mse": mse.item()}
        if not bool(keep.any()):
            self.pending = None
            return mse
        frames = keep.sum(1)
        ids = self.ids(captions).repeat_interleave(frames, dim=0)
        wrong = self.ids(wrong_captions(captions, gen)).repeat_interleave(frames, dim=0)
        fake = _frames(x0_hat, keep)
        for p in self.critic.parameters():
            p.requires_grad_(False)
        adv = -self.critic(fake, ids).mean()
        for p in self.critic.parameters():
            p.requires_grad_(True)
        g_mse = torch.autograd.grad(mse, v, retain_graph=True)[0]
        g_adv = torch.autograd.grad(adv, v, retain_graph=True)[0]
        scale = (g_mse.norm() / (g_adv.norm() + 1e-8)).clamp(max=1e4).detach()
        self.pending = (_frames(x0, keep).detach(), fake.detach(), ids, wrong)
        self.last.update(adv=adv.item(), scale=scale.item())
        return mse + self.cfg.adversarial_weight * scale * adv

    def step(self) -> float | None:
        """One critic update on the batch of the last `generator_loss`; its hinge loss."""
        if self.pending is None:
            return None
        real, fake, ids, wrong = self.pending
        self.pending = None
        loss = F.relu(1 - self.critic(real, ids)).mean() + 0.5 * (
            F.relu(1 + self.critic(fake, ids)).mean() + F.relu(1 + self.critic(real, wrong)).mean()
        )
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.last["critic"] = loss.item()
        return self.last["critic"]

    def state_dict(self) -> dict[str, Any]:
        return {"critic": self.critic.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, blob: dict[str, Any]) -> None:
        self.critic.load_state_dict(blob["critic"])
        self.optimizer.load_state_dict(blob["optimizer"])
