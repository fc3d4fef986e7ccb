"""Checks of what a user hands a `VideoQA` session: frames and question words.

Each check either returns the input in the form the model takes or raises an
`InputError` whose message says what to change.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from streamrt.errors import InputError


def check_frames(frames: Any, image_size: tuple[int, int], resize: bool) -> torch.Tensor:
    """Frames as float `[N, H, W, 3]` in [0, 1] at `image_size` (resized when `resize`),
    or an `InputError` saying what is wrong with them."""
    h, w = image_size
    try:
        t = frames if isinstance(frames, torch.Tensor) else torch.as_tensor(np.asarray(frames))
    except (TypeError, ValueError, RuntimeError) as exc:
        raise InputError(
            f"frames must be an array of RGB pixels [H, W, 3] or [N, H, W, 3], got "
            f"{type(frames).__name__} ({exc})"
        ) from None
    if t.ndim == 3:
        t = t[None]
    if t.ndim != 4 or t.shape[-1] != 3 or 0 in t.shape:
        raise InputError(
            f"frames must be RGB [H, W, 3] or [N, H, W, 3] with 3 channels last (model "
            f"size {h}x{w}), got shape {tuple(t.shape)}"
        )
    if t.dtype == torch.uint8:
        x = t.float() / 255.0
    elif t.is_floating_point():
        x = t.float()
        if not torch.isfinite(x).all():
            raise InputError("frames contain NaN or infinite values: pass finite pixels")
        if x.min() < 0 or x.max() > 1:
            raise InputError(
                f"float frames must lie in [0, 1], got [{x.min():.3g}, {x.max():.3g}]: "
                "divide uint8 pixels by 255"
            )
    else:
        raise InputError(
            f"frames must be uint8 or float in [0, 1], got dtype {t.dtype}: convert them"
        )
    if tuple(x.shape[1:3]) != (h, w):
        if not resize:
            raise InputError(
                f"frames are {x.shape[1]}x{x.shape[2]} but the model takes {h}x{w}: resize "
                "them or open the session with resize=True"
            )
        # As the transformers image processors: bilinear with antialiasing.
        x = (
            torch.nn.functional.interpolate(
                x.permute(0, 3, 1, 2), size=(h, w), mode="bilinear", antialias=True
            )
            .permute(0, 2, 3, 1)
            .clamp(0, 1)
        )
    return x


def unknown_words(tokenizer: Any, question: str) -> tuple[str, ...]:
    """Words of `question` the tokenizer maps to its unknown token (closed vocabularies,
    like the tiny models'; subword tokenizers have none), in order, each once."""
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None:
        return ()
    try:
        enc = tokenizer(question, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError:  # slow tokenizers have no offsets
        return ()
    words = [
        question[a:b] for tok, (a, b) in zip(enc["input_ids"], enc["offset_mapping"]) if tok == unk
    ]
    return tuple(dict.fromkeys(words))
