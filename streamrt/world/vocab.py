"""The world's words: colours and their RGB values, shapes, directions, backgrounds, numbers.

Everything a caption, a question or an answer can contain is listed in `VOCAB`, so a
word-level tokenizer built from it never meets an unknown word. `tokenize` is the one
way text is split into those words (the question mark is a word of its own).
"""

from __future__ import annotations

import re

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (230, 25, 25),
    "orange": (255, 140, 0),
    "yellow": (250, 230, 30),
    "green": (30, 190, 50),
    "cyan": (0, 210, 230),
    "blue": (30, 60, 240),
    "purple": (170, 40, 220),
}
"""Colour name -> RGB. Saturated hues, so none is close to a (grey) background."""

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
DIRECTIONS: tuple[str, ...] = ("left", "right", "up", "down")
BACKGROUNDS: tuple[str, ...] = ("dark", "light", "striped", "checkered")
PACES: tuple[str, ...] = ("slow", "fast")
POSITIONS: tuple[str, ...] = ("top", "bottom", "left", "right")
"""Where a shape sits in a frame, as QA questions name it."""

MAX_NUMBER = 64
"""Numbers 0..MAX_NUMBER-1 are words (counts in answers, frame indices in questions)."""
NUMBERS: tuple[str, ...] = tuple(str(i) for i in range(MAX_NUMBER))

CAPTION_GLUE: tuple[str, ...] = ("a", "an", "moving", "and", "on", "background")
QUESTION_GLUE: tuple[str, ...] = (
    "what",
    "color",
    "was",
    "is",
    "the",
    "first",
    "shape",
    "shapes",
    "appeared",
    "appear",
    "how",
    "many",
    "are",
    "there",
    "at",
    "frame",
    "in",
    "video",
    "which",
    "direction",
    "did",
    "move",
    "?",
)
ANSWER_WORDS: tuple[str, ...] = ("yes", "no")


def _unique(*groups: tuple[str, ...]) -> list[str]:
    seen: dict[str, None] = {}
    for group in groups:
        seen.update(dict.fromkeys(group))
    return list(seen)


CAPTION_WORDS: list[str] = _unique(
    CAPTION_GLUE, PACES, tuple(COLORS), SHAPES, DIRECTIONS, BACKGROUNDS
)
"""Every word a caption may use, in a fixed order."""

VOCAB: list[str] = _unique(tuple(CAPTION_WORDS), QUESTION_GLUE, POSITIONS, ANSWER_WORDS, NUMBERS)
"""Every word of captions, questions and answers, in a fixed order (tokenizer ids)."""


def article(word: str) -> str:
    """ "a" or "an", whichever goes before `word` ("an orange", "a red")."""
    return "an" if word[0] in "aeiou" else "a"


_TOKEN = re.compile(r"[a-z0-9]+|\?")


def tokenize(text: str) -> list[str]:
    """Split text into vocabulary words: lower-cased runs of letters/digits and "?"."""
    return _TOKEN.findall(text.lower())
