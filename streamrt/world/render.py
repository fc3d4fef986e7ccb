"""OpenCV drawing of backgrounds and shapes into RGB uint8 frames.

Shapes are drawn without anti-aliasing, so every pixel of a shape has exactly its
palette colour: tests (and models) can read colours back from single pixels. A shape of
size `r` centred on pixel (cx, cy) covers at most the box [cx - r, cx + r] x [cy - r, cy + r].
"""

from __future__ import annotations

import cv2
import numpy as np

from streamrt.errors import InputError
from streamrt.world.vocab import BACKGROUNDS

_FLAT = {"dark": (20, 20, 20), "light": (220, 220, 220)}
_TEXTURED = {
    "striped": ((45, 45, 45), (105, 105, 105)),
    "checkered": ((60, 60, 60), (150, 150, 150)),
}


def render_background(name: str, height: int, width: int) -> np.ndarray:
    """Return the background `name` as a `[height, width, 3]` uint8 RGB image.

    Textures have a period of 16 pixels per 64 of frame size (bands and checks 8 wide).
    """
    if name not in BACKGROUNDS:
        raise InputError(f"unknown background {name!r}; choose one of {', '.join(BACKGROUNDS)}")
    image = np.empty((height, width, 3), dtype=np.uint8)
    if name in _FLAT:
        image[:] = _FLAT[name]
        return image
    cell = max(1, round(8 * min(height, width) / 64))
    rows = (np.arange(height) // cell)[:, None]
    cols = (np.arange(width) // cell)[None, :]
    # Horizontal bands: stripes never run parallel to a vertical edge a shape moves past.
    odd = rows % 2 == 1 if name == "striped" else (rows + cols) % 2 == 1
    first, second = _TEXTURED[name]
    image[:] = first
    image[np.broadcast_to(odd, (height, width))] = second
    return image


def draw_shape(
    frame: np.ndarray, shape: str, cx: int, cy: int, size: int, rgb: tuple[int, int, int]
) -> None:
    """Fill `shape` of half-extent `size` centred on pixel (cx, cy) into `frame` in place.

    Parts outside the frame are clipped; the centre pixel is always covered.
    """
    if shape == "circle":
        cv2.circle(frame, (cx, cy), size, rgb, thickness=-1, lineType=cv2.LINE_8)
    elif shape == "square":
        cv2.rectangle(frame, (cx - size, cy - size), (cx + size, cy + size), rgb, thickness=-1)
    elif shape == "triangle":
        points = np.array(
            [[cx, cy - size], [cx + size, cy + size], [cx - size, cy + size]], dtype=np.int32
        )
        cv2.fillConvexPoly(frame, points, rgb, lineType=cv2.LINE_8)
    else:
        raise InputError(f"unknown shape {shape!r}")
