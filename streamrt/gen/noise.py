"""Drifting initial noise: a motion prior for text-to-video from the prompt's direction.

A flow-matching sampler run deterministically (`renoise: predicted`) maps its initial
noise to a video, and Wan's attention has no absolute positions, so shifting the noise
shifts what is drawn from it. Drawing one noise field per stream and giving frame k the
field rolled by k x `drift` (latent pixels per frame) therefore puts a motion of that
direction into the video: the training-free form of noise warping (Go-with-the-Flow,
Burgert et al. 2025, which warps noise along optical flow). The direction comes from the
prompt's words ("... moving left", "panning up"); a prompt without one gets
independent noise, as without drift.

    frame        0          1               2                 ...
    noise        N          roll(N, d)      roll(N, 2d)           d = drift x direction

Each frame's noise is still exactly standard normal (a roll permutes a Gaussian field),
so a model sees in-distribution noise; only the correlation between frames changes.
"""

from __future__ import annotations

import re

import torch

DIRECTIONS: dict[str, tuple[int, int]] = {
    "right": (0, 1),
    "rightward": (0, 1),
    "rightwards": (0, 1),
    "left": (0, -1),
    "leftward": (0, -1),
    "leftwards": (0, -1),
    "down": (1, 0),
    "downward": (1, 0),
    "downwards": (1, 0),
    "up": (-1, 0),
    "upward": (-1, 0),
    "upwards": (-1, 0),
}
"""Direction words and their (rows, columns) unit steps on screen (rows grow downwards)."""


def prompt_direction(prompt: str) -> tuple[int, int] | None:
    """(dy, dx) of the prompt's first direction word, None if it has none."""
    for word in re.findall(r"[a-z]+", prompt.lower()):
        if word in DIRECTIONS:
            return DIRECTIONS[word]
    return None


class DriftingNoise:
    """Initial noise of a stream's text-to-video chunks, drifting with the prompt.

    `drift` latent pixels per frame along the prompt's direction, for the first `frames`
    frames of the stream (None: all of them); later frames get independent noise.
    """

    def __init__(self, drift: float, frames: int | None, draw) -> None:
        self.drift = drift
        self.frames = frames
        self.draw = draw
        """`draw(shape) -> standard normal tensor` (the stream's seeded generator)."""
        self.field: torch.Tensor | None = None
        self.done = 0
        """Frames whose noise has been handed out."""
        self.direction: tuple[int, int] | None = None

    def set_prompt(self, prompt: str) -> None:
        self.direction = prompt_direction(prompt)

    def chunk(self, shape: tuple[int, ...]) -> torch.Tensor:
        """Noise `[B, C, F, h, w]` for the next F frames of the stream."""
        start, self.done = self.done, self.done + shape[2]
        if (
            self.drift == 0
            or self.direction is None
            or (self.frames is not None and start >= self.frames)
        ):
            return self.draw(shape)
        if self.field is None:
            self.field = self.draw((*shape[:2], 1, *shape[3:]))
        dy, dx = self.direction
        rolled = [
            torch.roll(
                self.field,
                (round((start + j) * self.drift * dy), round((start + j) * self.drift * dx)),
                dims=(3, 4),
            )
            for j in range(shape[2])
        ]
        return torch.cat(rolled, dim=2)
