"""Where the embedded generator's loss looks hardest: object pixels, the background ring
around each object, and the pixels that tell its shape from the others.

`sample_batch` (`models/train_gen_data.py`) returns masks `[B, 2, F, H, W]`: channel 0 the
object pixels, channel 1 the shape-difference pixels; `loss_weight` turns them and the
config's weights into a latent pixel's loss weight.
"""

from __future__ import annotations

import numpy as np
import torch

from streamrt.world import SHAPES
from streamrt.world.render import draw_shape


def shape_difference(scene, num_frames: int, size: int) -> np.ndarray:
    """`[F, size, size]`: pixels where each visible object's shape differs from a circle, a
    square or a triangle of its size at its place (the symmetric differences): what a model
    must get right to draw the prompted shape rather than a blob of the right size."""
    out = np.zeros((num_frames, size, size), bool)
    for t in range(num_frames):
        for state in scene.state(t):
            if not state.visible:
                continue
            masks = {}
            for shape in SHAPES:
                blank = np.zeros((size, size, 3), np.uint8)
                draw_shape(blank, shape, *state.center, state.size, (255, 255, 255))
                masks[shape] = blank[..., 0] > 0
            own = masks[state.shape]
            for shape, mask in masks.items():
                if shape != state.shape:
                    out[t] |= mask ^ own
    return out


def edge_ring(objects: torch.Tensor, px: int) -> torch.Tensor:
    """Pixels within `px` of an object but not on one, of masks `[B, 1, F, H, W]`."""
    k = 2 * px + 1
    grown = torch.nn.functional.max_pool3d(objects, (1, k, k), stride=1, padding=(0, px, px))
    return grown - objects


def loss_weight(codec, masks: torch.Tensor, cfg, object_weight: float) -> torch.Tensor:
    """A latent pixel's weight: 1 + `object_weight` x its share of object pixels, +
    `cfg.edge_weight` x its share of the ring around objects, + `cfg.shape_weight` x its
    share of shape-difference pixels."""
    s = codec.spatial

    def share(mask: torch.Tensor) -> torch.Tensor:  # of each latent pixel's s x s pixels
        return torch.nn.functional.avg_pool3d(mask, (1, s, s)) if s > 1 else mask

    objects = masks[:, :1]
    weight = 1.0 + object_weight * share(objects)
    if cfg.edge_weight:
        weight = weight + cfg.edge_weight * share(edge_ring(objects, cfg.edge_px))
    if cfg.shape_weight:
        weight = weight + cfg.shape_weight * share(masks[:, 1:2])
    return weight
