"""Needles at the start of long streams through the embedded model's default `VideoQA`.

The question is about a held-out world clip seen only in the first frames; the rest of
the stream is the clip's empty background, `SCALE` x the window long. With the default
settings (`VideoQA.from_pretrained()`) retrieval must bring the clip back and the answers
must be right; a window-only memory (nothing retrieved) must not be, so the test fails if
retrieval stops working. Measured numbers: assets/tiny-vqa/TRAINING.md ("Needles in long
streams").
"""

from __future__ import annotations

import pytest

from streamrt.models.train_vqa_eval import needle_accuracy

SCALE = 100  # 800 frames behind an 8-frame window
SEEDS = range(8, 12)
"""Held-out clips (never trained on), one question per kind each: 28 questions. Pinned
where the old default (each layer its own frames, `layer_selection="independent"`) was
measured wrong: 23/28 against 27/28 now, window-only 5/28."""

pytestmark = pytest.mark.usefixtures("one_thread_quiet")


def test_default_settings_answer_needles_far_outside_the_window():
    result = needle_accuracy(
        clips=len(SEEDS),
        first_seed=SEEDS[0],
        scale=SCALE,
        modes={"default": {}, "window-only": None},
    )
    default, window = result["default"], result["window-only"]
    assert default["questions"] >= 25
    assert default["all"] >= 0.9, default
    assert window["all"] <= 0.5, window  # the answers come from retrieval, not the window
    assert default["all"] - window["all"] >= 0.4


def test_the_reported_red_circle_video_answers_right_after_a_long_stream():
    # The case: "is there a red circle?" answered "no" in a red-circle video once
    # the circle was 100 windows back (each layer retrieved its own frames).
    import numpy as np

    from streamrt.models.train_vqa_data import TrainVQAConfig
    from streamrt.qa import VideoQA
    from streamrt.world import make_clip, render_background

    caption = "a red circle moving right on a dark background"
    clip = make_clip(0, 8, TrainVQAConfig().world(), caption=caption)
    questions = {
        "is there a red circle?": "yes",
        "is there a yellow triangle?": "no",
        "what color is the circle?": "red",
        "how many shapes appear in the video?": "1",
    }
    with VideoQA.from_pretrained() as qa:
        filler = render_background("dark", *clip.frames.shape[1:3])
        qa.feed(clip.frames)
        qa.feed(np.repeat(filler[None], SCALE * qa.config.window_frames - 8, 0))
        answers = {q: qa.ask(q).text for q in questions}
    assert answers == questions


def test_unknown_layer_selection_is_refused():
    from streamrt.errors import InputError
    from streamrt.qa import VideoQA

    with pytest.raises(InputError, match="layer_selection"):
        VideoQA.from_pretrained(layer_selection="every")
