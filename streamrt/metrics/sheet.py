"""Contact sheets: rollouts as rows of frames a person can look at beside the numbers."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _text(img: np.ndarray, text: str, xy: tuple[int, int]) -> None:
    import cv2

    cv2.putText(img, text, xy, cv2.FONT_HERSHEY_SIMPLEX, 0.42, (0, 0, 0), 1)


def prompt_lines(prompt: str) -> list[str]:
    """A prompt split before its background, so a label fits in two lines."""
    return prompt.replace(" on a ", " | on a ").split(" | ")


def draw_sheet(
    rows: list[tuple[list[str], np.ndarray] | None],
    out: str | Path,
    every: int = 10,
    scale: int = 2,
    label_w: int = 260,
    gap: int = 2,
) -> np.ndarray:
    """Write an image (PNG, or JPEG by `out`'s suffix) with one row per `(label lines, frames [T, H, W, 3] uint8)` showing every
    `every`-th frame, `scale`x enlarged (nearest) with `gap` white pixels between frames,
    under a header naming the frame numbers; None draws a grey separator. Returns the
    sheet (RGB)."""
    import cv2

    drawn: list[np.ndarray | None] = []
    pad = ((0, 0), (0, gap), (0, 0))
    for row in rows:
        if row is None:
            if drawn:
                drawn.append(None)
            continue
        lines, frames = row
        h, w = frames.shape[1] * scale, frames.shape[2] * scale
        tiles = [
            np.pad(cv2.resize(f, (w, h), interpolation=cv2.INTER_NEAREST), pad, constant_values=255)
            for f in frames[::every]
        ]
        label = np.full((h, label_w, 3), 255, np.uint8)
        line_h = min(22, (h - 8) // max(1, len(lines)))  # the lines fit the row
        for i, text in enumerate(lines):
            _text(label, text, (4, 16 + line_h * i))
        drawn.append(np.concatenate([label, *tiles], axis=1))
    if not any(r is not None for r in drawn):
        raise ValueError("a contact sheet needs at least one row of frames")
    width = max(r.shape[1] for r in drawn if r is not None)
    drawn = [
        np.full((6, width, 3), 128, np.uint8)  # a separator spans the sheet
        if r is None
        else np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0)), constant_values=255)
        for r in drawn
    ]
    head = np.full((24, width, 3), 255, np.uint8)
    tile_w = next(r for r in rows if r is not None)[1].shape[2] * scale + gap
    for i in range((width - label_w) // tile_w):
        _text(head, f"frame {i * every}", (label_w + i * tile_w + 4, 17))
    sheet = np.concatenate([head, *drawn], axis=0)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(out), cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR))
    return sheet
