"""Few-step flow-matching schedule (Self-Forcing / CausVid lineage).

x_t = (1 - sigma) * x0 + sigma * eps        the model predicts v = eps - x0
x0  = x_t - sigma * v
"""

from __future__ import annotations

import torch

from streamrt.errors import InputError


def shifted_sigmas(timesteps: list[int], shift: float) -> list[float]:
    """`sigma(t) = s*u / (1 + (s-1)*u)`, `u = t/1000`; shift 5 maps 1000/750/500/250 to
    1.0/0.9375/0.8333/0.625."""
    if not timesteps or any(not 0 <= t <= 1000 for t in timesteps):
        raise InputError(
            f"timesteps must be a non-empty list of values in 0..1000, got {timesteps}"
        )
    if list(timesteps) != sorted(timesteps, reverse=True):
        raise InputError(f"timesteps must be decreasing, got {timesteps}")
    out = []
    for t in timesteps:
        u = t / 1000.0
        out.append(shift * u / (1 + (shift - 1) * u))
    return out


def even_timesteps(steps: int) -> list[int]:
    """`steps` timesteps evenly spaced down from 1000: 4 -> [1000, 750, 500, 250]."""
    if steps < 1:
        raise InputError(f"the step count must be >= 1, got {steps}")
    return [round(1000 - i * 1000 / steps) for i in range(steps)]


def predict_x0(
    x_t: torch.Tensor, velocity: torch.Tensor, sigma: torch.Tensor | float
) -> torch.Tensor:
    """Clean estimate from a velocity prediction."""
    return x_t - sigma * velocity


def renoise(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """Put `x0` back at noise level `sigma` with fresh `noise`."""
    return (1 - sigma) * x0 + sigma * noise
