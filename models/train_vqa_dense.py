"""Dense per-token supervision for the tiny Video-LLM's training (training-only heads).

A question's answer is one word per clip: too sparse a signal to teach a vision tower
shapes and a 4-layer text model motion within an hour (assets/tiny-vqa/TRAINING.md).
The world knows, for every frame, what each output token of the connector looks at, so
training adds dense targets read by linear heads that are dropped at export (the exported
model stays a stock `SmolVLMForConditionalGeneration`):

    connector token of cell (r, c) at frame t  ->  shape, colour and centre (x, y) of the
                                                    object covering most of the cell
    text model's hidden state at that token,   ->  direction and distance (dx, dy) that
    after layer `dense_layer` (causal)              object moved over frames t-2..t, the
                                                    frame index t, how many objects frame t
                                                    shows

The first group makes the tower see shapes and where they are; the second makes the text
model compare each object with itself in the frames before (motion), know which frame a
token belongs to (questions name frames by number) and aggregate a frame (counts). The
question/answer loss then only has to learn to read these features out.

Cells follow the connector's token order: pixel shuffle groups `scale x scale` patches,
so with `side = image_size / (patch * scale)` token k covers the square cell
(k // side, k % side) of `image_size / side` pixels, row-major.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass

import numpy as np
import torch

from streamrt.world import Scene
from streamrt.world.render import draw_shape
from streamrt.world.vocab import COLORS, DIRECTIONS, SHAPES

SHAPE_CLASSES = ("none", *SHAPES)
COLOR_CLASSES = ("none", *COLORS)
MOTION_CLASSES = ("none", *DIRECTIONS)
MAX_COUNT = 4
"""Most objects a world scene holds (`WorldConfig.max_objects` <= 4)."""
IGNORE = -100
CENTER_UNIT = 2.0
"""Pixels per unit of the centre targets: a one-pixel error costs 0.125 (Huber, quadratic
below one unit), on the scale of the classification losses, so the tokens learn where an
object is to the pixel: motion of 2-10 pixels over two frames is read from it."""


@dataclass
class DenseTargets:
    """Per-token targets of one clip, `F` frames x `T = side * side` tokens."""

    shape: np.ndarray
    """`[F, T]` int: index into `SHAPE_CLASSES` (IGNORE where a cell holds a sliver)."""
    color: np.ndarray
    """`[F, T]` int: index into `COLOR_CLASSES`."""
    center: np.ndarray
    """`[F, T, 2]` float: the object's centre (x, y) in units of `CENTER_UNIT` pixels from
    the frame's centre (NaN: no object)."""
    motion: np.ndarray
    """`[F, T]` int: index into `MOTION_CLASSES`; IGNORE where frames t-2..t do not
    settle the motion (the first two frames, an entry, a wrap-around, a bounce)."""
    count: np.ndarray
    """`[F]` int: objects visible at frame t."""
    shift: np.ndarray
    """`[F, T, 2]` float: how far (x, y) that object moved over frames t-2..t, in units of
    `CENTER_UNIT` pixels (NaN where `motion` is IGNORE or "none"): the smooth form of
    `motion`, what comparing its centre with its centre two frames before gives."""


def owner_map(scene: Scene, t: int) -> np.ndarray:
    """`[H, W]` int: 1 + the index of the object drawn on top at each pixel, 0 for the
    background (the renderer's drawing order and pixels)."""
    ids = np.zeros((scene.height, scene.width, 3), dtype=np.uint8)
    for s in scene.state(t):
        if s.visible:
            draw_shape(ids, s.shape, *s.center, s.size, (s.index + 1,) * 3)
    return ids[..., 0].astype(np.int64)


def dense_targets(scene: Scene, num_frames: int, side: int, min_pixels: int = 6) -> DenseTargets:
    """The targets of frames 0..num_frames-1 on a `side x side` token grid.

    A cell belongs to the object with most pixels in it; with fewer than `min_pixels` of
    them the cell's labels are IGNORE (a sliver a 16-pixel cell's token may or may not
    show), with none at all it is "none".
    """
    h, w = scene.height, scene.width
    ch, cw = h // side, w // side
    n_obj = len(scene.objects)
    shape = np.zeros((num_frames, side * side), dtype=np.int64)
    color = np.zeros_like(shape)
    motion = np.zeros_like(shape)
    center = np.full((num_frames, side * side, 2), np.nan, dtype=np.float32)
    count = np.zeros(num_frames, dtype=np.int64)
    shift = np.full((num_frames, side * side, 2), np.nan, dtype=np.float32)
    states = [scene.state(t) for t in range(num_frames)]
    for t in range(num_frames):
        owners = owner_map(scene, t)
        # pixels per (cell, owner): [side, side, n_obj + 1]
        cells = owners.reshape(side, ch, side, cw).transpose(0, 2, 1, 3).reshape(side, side, -1)
        hist = np.stack([(cells == k).sum(-1) for k in range(n_obj + 1)], axis=-1)
        obj_hist = hist[..., 1:].reshape(side * side, n_obj)
        count[t] = sum(s.visible for s in states[t])
        for k in range(side * side):
            if n_obj == 0 or obj_hist[k].max() == 0:
                continue
            i = int(obj_hist[k].argmax())
            if obj_hist[k, i] < min_pixels:
                shape[t, k] = color[t, k] = motion[t, k] = IGNORE
                continue
            s = states[t][i]
            shape[t, k] = SHAPE_CLASSES.index(s.shape)
            color[t, k] = COLOR_CLASSES.index(s.color)
            center[t, k] = (
                (s.center[0] - (w - 1) / 2) / CENTER_UNIT,
                (s.center[1] - (h - 1) / 2) / CENTER_UNIT,
            )
            motion[t, k] = _motion_label(scene, states, i, t)
            if motion[t, k] > 0:
                before = states[t - 2][i].center
                shift[t, k] = (
                    (s.center[0] - before[0]) / CENTER_UNIT,
                    (s.center[1] - before[1]) / CENTER_UNIT,
                )
    return DenseTargets(shape, color, center, motion, count, shift)


def _motion_label(scene: Scene, states: list, i: int, t: int) -> int:
    """Direction object `i` moved over frames t-2..t, if it moved one way all along (the
    rule of the world's `direction_frame` questions; 2-10 pixels at 4 fps)."""
    obj = scene.objects[i]
    if t < 2 or obj.speed <= 0 or not all(states[u][i].visible for u in (t - 2, t - 1)):
        return IGNORE
    path = [states[u][i] for u in (t - 2, t - 1, t)]
    for before, now in itertools.pairwise(path):
        step = abs(now.x - before.x) + abs(now.y - before.y)
        if abs(step - obj.speed) > 1e-3 or before.direction != path[0].direction:
            return IGNORE  # wrapped round, or bounced off a wall on the way
    return MOTION_CLASSES.index(path[0].direction)


class DenseHeads(torch.nn.Module):
    """The linear read-outs of the dense targets (training only; never exported)."""

    def __init__(self, hidden: int, num_frames: int) -> None:
        super().__init__()
        self.shape = torch.nn.Linear(hidden, len(SHAPE_CLASSES))
        self.color = torch.nn.Linear(hidden, len(COLOR_CLASSES))
        self.center = torch.nn.Linear(hidden, 2)
        self.motion = torch.nn.Linear(hidden, len(MOTION_CLASSES))
        self.frame = torch.nn.Linear(hidden, num_frames)
        self.count = torch.nn.Linear(hidden, MAX_COUNT + 1)
        self.shift = torch.nn.Linear(hidden, 2)

    def vision_losses(
        self, embeds: torch.Tensor, targets: list[DenseTargets]
    ) -> dict[str, torch.Tensor]:
        """Losses of the connector-level targets; `embeds` is `[B, F, T, hidden]`."""
        ce = torch.nn.functional.cross_entropy
        return {
            "shape": ce(self.shape(embeds).flatten(0, 2), _stack(targets, "shape").flatten()),
            "color": ce(self.color(embeds).flatten(0, 2), _stack(targets, "color").flatten()),
            "center": _huber(self.center(embeds), _stack(targets, "center")),
        }

    def losses(
        self, embeds: torch.Tensor, hidden: torch.Tensor, targets: list[DenseTargets]
    ) -> dict[str, torch.Tensor]:
        """Per-target losses; `embeds` and `hidden` are `[B, F, T, hidden]` (connector output
        and the text model's hidden state at the frames' visual tokens)."""
        ce = torch.nn.functional.cross_entropy
        b, f, t, _ = hidden.shape
        out = self.vision_losses(embeds, targets)
        stack = functools.partial(_stack, targets)
        out["motion"] = ce(self.motion(hidden).flatten(0, 2), stack("motion").flatten())
        out["shift"] = _huber(self.shift(hidden), stack("shift"))
        frames = torch.arange(f).view(1, f, 1).expand(b, f, t)
        out["frame"] = ce(self.frame(hidden).flatten(0, 2), frames.flatten())
        count = stack("count").clamp(max=MAX_COUNT)[:, :, None].expand(b, f, t)
        out["count"] = ce(self.count(hidden).flatten(0, 2), count.flatten())
        return out


def _stack(targets: list[DenseTargets], name: str) -> torch.Tensor:
    return torch.as_tensor(np.stack([getattr(d, name) for d in targets]))


def _huber(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Huber loss summed over (x, y), averaged over the tokens whose target is known."""
    known = ~torch.isnan(target[..., 0])
    loss = torch.nn.functional.huber_loss(pred[known], target[known], reduction="sum")
    return loss / max(1, int(known.sum()))
