"""Quality metrics judge the world's own clips as the seeds' failure modes would be judged."""

import numpy as np

from streamrt.metrics import adherence, copying, drift, dynamics, summarize_rollout
from streamrt.world import WorldConfig, make_clip

CAPTION = "a red circle moving right on a dark background"
CFG = WorldConfig(late_entry_prob=0, early_exit_prob=0, boundary="wrap")


def _clip(caption=CAPTION, n=32, seed=0):
    return make_clip(seed, n, CFG, caption=caption).frames


def test_world_clips_adhere_to_their_captions():
    for caption in (
        CAPTION,
        "a blue square moving up on a light background",
        "a green triangle moving left and a yellow circle moving down on a striped background",
    ):
        assert adherence(_clip(caption), caption)["score"] == 1.0, caption


def test_wrong_direction_or_missing_color_fails_adherence():
    frames = _clip()
    assert adherence(frames[::-1], CAPTION)["score"] == 0.0  # played backwards: moves left
    assert adherence(frames, "a blue circle moving right on a dark background")["score"] == 0.0


def test_frozen_video_has_no_dynamics_and_copies_the_first_frame():
    frames = _clip()
    frozen = np.repeat(frames[:1], 32, axis=0)
    assert dynamics(frozen).max() < 1e-3 < dynamics(frames).mean()
    assert copying(frozen)[-1] > 0.999
    assert copying(frames)[-8:].mean() < copying(frozen)[-8:].mean()


def test_drift_grows_when_colors_wash_out():
    frames = _clip()
    washed = (frames.astype(np.float32) * 0.3 + 160).astype(np.uint8)
    assert drift(frames, _clip(seed=1)).mean() < drift(washed, _clip(seed=1)).mean()
    s = summarize_rollout(frames, CAPTION, _clip(seed=1))
    assert s["adherence"] == 1.0 and s["dynamics"] > 0


def test_world_scores_high_and_noise_scores_zero():
    from streamrt.world import random_caption

    rng = np.random.default_rng(0)
    scores = []
    for seed in range(40):
        caption = random_caption(rng, CFG)
        scores.append(adherence(make_clip(seed, 32, CFG, caption=caption).frames, caption)["score"])
    assert np.mean(scores) >= 0.9  # the world itself: occlusions cost a little
    noise = np.random.default_rng(1).integers(0, 255, (48, 64, 64, 3), dtype=np.uint8)
    assert adherence(noise, CAPTION)["score"] == 0.0  # scattered red pixels are not an object
