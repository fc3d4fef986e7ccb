"""Dense per-token targets of the tiny Video-LLM's training: labels agree with the pixels,
motion with the frames, cells with the connector's token order; heads train, resume, and
never reach the export."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_train_vqa import tiny_cfg
from transformers.models.smolvlm.modeling_smolvlm import SmolVLMConnector

from streamrt.models.train_vqa import in_vision_stage, new_state, train, train_step
from streamrt.models.train_vqa_data import (
    TrainVQAConfig,
    clip_example,
    extra_vision_batch,
    sample_batch,
)
from streamrt.models.train_vqa_dense import (
    COLOR_CLASSES,
    IGNORE,
    MOTION_CLASSES,
    SHAPE_CLASSES,
    dense_targets,
    owner_map,
)
from streamrt.models.train_vqa_eval import export_model
from streamrt.world import COLORS, WorldConfig, make_clip

pytestmark = pytest.mark.usefixtures("one_thread_quiet")

SIDE = 4  # 64-pixel frames, patch 8, pixel shuffle 2: the shipped model's 4 x 4 tokens
CELL = 16


def cells(image: np.ndarray) -> list[np.ndarray]:
    """Row-major 16 x 16 cells of a 64 x 64 image."""
    return [
        image[r * CELL : (r + 1) * CELL, c * CELL : (c + 1) * CELL]
        for r in range(SIDE)
        for c in range(SIDE)
    ]


@pytest.mark.parametrize("seed", [3, 11, 40])
def test_cell_labels_are_what_the_cells_pixels_show(seed):
    clip = make_clip(seed, 8, WorldConfig(fps=4.0))
    dense = dense_targets(clip.scene, 8, SIDE)
    palette = {name: np.array(rgb) for name, rgb in COLORS.items()}
    checked = 0
    for t in range(8):
        for k, pixels in enumerate(cells(clip.frames[t])):
            counts = {n: int((pixels == rgb).all(-1).sum()) for n, rgb in palette.items()}
            if dense.color[t, k] == IGNORE:
                continue
            name = COLOR_CLASSES[dense.color[t, k]]
            if name == "none":
                assert sum(counts.values()) == 0, (t, k, counts)
            else:
                # the labelled colour is the cell's most common palette colour
                assert counts[name] == max(counts.values()) >= 6, (t, k, name, counts)
                assert SHAPE_CLASSES[dense.shape[t, k]] != "none"
                checked += 1
        assert dense.count[t] == sum(s.visible for s in clip.scene.state(t))
    assert checked > 0


@pytest.mark.parametrize("seed", [3, 11, 40, 77])
def test_motion_labels_follow_the_objects_pixels_between_frames(seed):
    clip = make_clip(seed, 8, WorldConfig(fps=4.0))
    dense = dense_targets(clip.scene, 8, SIDE)
    step = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
    labelled = 0
    for t in range(1, 8):
        now, before = owner_map(clip.scene, t), owner_map(clip.scene, t - 1)
        for k in range(SIDE * SIDE):
            if dense.motion[t, k] in (IGNORE, 0):
                continue
            r, c = divmod(k, SIDE)
            owner = np.bincount(now[r * CELL : (r + 1) * CELL, c * CELL : (c + 1) * CELL].ravel())
            owner[0] = 0
            obj = int(owner.argmax())
            ys, xs = np.nonzero(now == obj)
            ys0, xs0 = np.nonzero(before == obj)
            assert len(ys0), "motion is only labelled when the object was there before"
            dx, dy = xs.mean() - xs0.mean(), ys.mean() - ys0.mean()
            ex, ey = step[MOTION_CLASSES[dense.motion[t, k]]]
            # the object's pixels moved that way (occlusion can only blur, not flip, it)
            assert dx * ex + dy * ey > 0.4, (t, k, dx, dy)
            # the smooth target: moved that way over frames t-2..t, and only that way
            sx, sy = dense.shift[t, k]
            assert sx * ex + sy * ey > 0 and sx * ey == sy * ex, (t, k, sx, sy)
            labelled += 1
    assert labelled > 0
    assert np.isnan(dense.shift[dense.motion <= 0]).all()
    assert not np.isin(dense.motion[:2], [1, 2, 3, 4]).any(), "motion needs frames t-2..t"


def test_token_k_of_the_connector_is_cell_k_of_the_frame_row_major():
    """The cell layout the targets assume is the stock pixel shuffle's token order."""
    patches = 8  # 64 / patch 8
    index = torch.arange(patches * patches, dtype=torch.float32).view(1, -1, 1)
    tokens = SmolVLMConnector.pixel_shuffle(None, index, 2)[0]  # [16, 4] patch ids
    for k in range(SIDE * SIDE):
        r, c = divmod(k, SIDE)
        ids = tokens[k].long().tolist()
        assert {i // patches for i in ids} == {2 * r, 2 * r + 1}
        assert {i % patches for i in ids} == {2 * c, 2 * c + 1}


def test_dense_heads_learn_train_resume_and_stay_out_of_the_export(tmp_path):
    cfg = tiny_cfg(dense_weight=1.0, dense_layer=1, steps=4)
    example = clip_example(cfg, seed=5)
    assert example.dense is not None and example.dense.shape.shape == (3, 4)
    assert clip_example(tiny_cfg(), seed=5).dense is None

    state = new_state(cfg)
    before = {n: p.detach().clone() for n, p in state.heads.named_parameters()}
    train_step(state)
    assert set(state.dense_losses[0]) == {
        *("shape", "color", "center", "motion", "shift", "frame", "count")
    }
    assert all(not torch.equal(p, before[n]) for n, p in state.heads.named_parameters())

    whole = train(cfg, work_dir=None, log=lambda _: None)
    train(dataclasses.replace(cfg, max_minutes=1e-6), work_dir=tmp_path, log=lambda _: None)
    resumed = train(cfg, work_dir=tmp_path, log=lambda _: None)
    assert resumed.losses == pytest.approx(whole.losses, rel=1e-5)
    assert resumed.dense_losses == whole.dense_losses
    for name, p in resumed.heads.state_dict().items():
        torch.testing.assert_close(p, whole.heads.state_dict()[name])

    export_model(resumed, tmp_path / "model")
    export_model(new_state(tiny_cfg()), tmp_path / "plain")
    exported = load_file(str(tmp_path / "model" / "model.safetensors"))
    plain = load_file(str(tmp_path / "plain" / "model.safetensors"))
    assert {n: t.shape for n, t in exported.items()} == {n: t.shape for n, t in plain.items()}


def test_the_vision_stage_trains_the_tower_and_connector_only():
    cfg = tiny_cfg(dense_weight=1.0, vision_minutes=1.0)
    state = new_state(cfg)
    assert in_vision_stage(state)
    before = {n: p.detach().clone() for n, p in state.model.named_parameters()}
    train_step(state)
    assert set(state.dense_losses[0]) == {"shape", "color", "center"}
    assert state.vision_steps == 1
    moved = {n for n, p in state.model.named_parameters() if not torch.equal(p, before[n])}
    assert moved and all(n.startswith(("model.vision_model.", "model.connector.")) for n in moved)
    state.seconds = 60.0  # the stage's minute is spent: the question/answer training starts
    assert not in_vision_stage(state)
    train_step(state)
    assert "motion" in state.dense_losses[1] and state.vision_steps == 1


def test_extra_vision_steps_move_only_the_tower_and_connector_after_a_joint_step():
    plain, extra = new_state(tiny_cfg(dense_weight=1.0)), new_state(tiny_cfg(dense_weight=1.0))
    extra.cfg = dataclasses.replace(extra.cfg, vision_extra=2)
    train_step(plain)
    train_step(extra)
    assert extra.losses == plain.losses  # the question/answer step is the same
    assert "vision_extra" in extra.dense_losses[0] and "vision_extra" not in plain.dense_losses[0]
    after = dict(plain.model.named_parameters())
    moved = {n for n, p in extra.model.named_parameters() if not torch.equal(p, after[n])}
    assert moved and all(n.startswith(("model.vision_model.", "model.connector.")) for n in moved)
    clips = [*sample_batch(extra.cfg, 0), *sample_batch(extra.cfg, 1)]
    clips += [e for j in range(2) for e in extra_vision_batch(extra.cfg, 0, j)]
    assert len({e.frames.tobytes() for e in clips}) == len(clips)  # clips of their own


def test_a_run_with_extra_vision_steps_checks_held_out_clips_and_resumes_exactly(tmp_path):
    cfg = tiny_cfg(dense_weight=1.0, vision_extra=1, steps=3, checkpoint_every=1, eval_clips=2)
    whole = train(cfg, work_dir=None, log=lambda _: None)
    train(dataclasses.replace(cfg, max_minutes=1e-6), work_dir=tmp_path, log=lambda _: None)
    resumed = train(cfg, work_dir=tmp_path, log=lambda _: None)
    assert [e["step"] for e in resumed.evals] == [1, 2, 3]  # the held-out check ran
    assert resumed.losses == pytest.approx(whole.losses, rel=1e-5)
    assert resumed.dense_losses == whole.dense_losses


def test_dense_settings_are_checked():
    with pytest.raises(ValueError, match="dense_weight"):
        TrainVQAConfig(dense_weight=-1.0)
    with pytest.raises(ValueError, match="dense_layer"):
        TrainVQAConfig(dense_weight=1.0, dense_layer=5)
    with pytest.raises(ValueError, match="vision_minutes"):
        TrainVQAConfig(dense_weight=0.0, vision_minutes=5.0)
    with pytest.raises(ValueError, match="vision_extra"):
        TrainVQAConfig(dense_weight=0.0, vision_minutes=0.0, vision_extra=2)
