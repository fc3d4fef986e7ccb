"""`streamrt train vqa`: layout-faithful training on tiny configs, and the shipped model."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from streamrt.apps.train import main as train_main
from streamrt.models.train_vqa import clip_logits, init_matching, new_model, new_state, train
from streamrt.models.train_vqa_data import AUX_KINDS, TrainVQAConfig, clip_example
from streamrt.models.train_vqa_eval import _summary, manifest_qa, videoqa_accuracy
from streamrt.models.vlm import ModelFileError, model_qa_settings, resolve_model_dir
from streamrt.qa import VideoQA
from streamrt.world.qa import aux_questions

ASSET = Path(__file__).resolve().parents[2] / "assets" / "tiny-vqa"
SHIPPED_BAR = 0.92
"""Accuracy the shipped model must keep on `EVAL_CLIPS` held-out clips through `VideoQA`:
above the issue's 90 % with the measured numbers' margin (0.990 on these 97 questions,
0.958 on 1596 of 200 clips; per kind in assets/tiny-vqa/TRAINING.md)."""
LEARNT_KINDS = (
    *("color_frame", "first_color", "count_frame", "count_clip", "first_shape"),
    *("color_of_shape", "position_color"),
)
"""Kinds the shipped model answers >= 97 % of the time on 200 clips (all of them here)."""
EVAL_CLIPS = 12


pytestmark = pytest.mark.usefixtures("one_thread_quiet")


def tiny_cfg(**overrides) -> TrainVQAConfig:
    base = {
        "steps": 30,
        "batch_size": 2,
        "num_frames": 3,
        "image_size": 32,
        "lr": 3e-3,
        "warmup_steps": 3,
        "text": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2},
        "vision": {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1},
        "log_every": 1000,
        "checkpoint_every": 1000,
        "eval_clips": 0,
        # the answer-loss path alone; tests/unit/test_train_vqa_dense.py covers the dense one
        "dense_weight": 0.0,
        "vision_minutes": 0.0,
        "max_minutes": None,
    }
    return TrainVQAConfig(**{**base, **overrides})


@pytest.mark.parametrize("system_prompt", ["", "system what color is the circle"])
def test_training_logits_equal_the_streaming_sessions(system_prompt):
    """A training sequence is what `VideoQA` runs: frames fed one by one into the memory,
    the question asked on the fetched blocks, same logits."""
    cfg = tiny_cfg(system_prompt=system_prompt)
    state = new_state(cfg)
    example = clip_example(cfg, seed=7)
    logits, targets = clip_logits(state.adapter, state.tokenizer, cfg, [example])
    with VideoQA(state.adapter, state.tokenizer, cfg.qa_config()) as qa:
        qa.feed(example.frames)
        for row, item in enumerate(example.qa):
            streamed = qa.question_logits(item.question)
            n = streamed.shape[0]
            torch.testing.assert_close(streamed, logits[row, :n], atol=1e-5, rtol=1e-5)
            # the answer is learnt from the question's last token on
            answer = state.tokenizer(item.answer, add_special_tokens=False)["input_ids"]
            assert targets[row, n - 1 : n - 1 + len(answer)].tolist() == answer
            assert targets[row, : n - 1].eq(-100).all()


def test_a_few_steps_lower_the_loss():
    state = train(tiny_cfg(steps=40, lr=1e-2), work_dir=None, log=lambda _: None)
    first, last = state.losses[:5], state.losses[-5:]
    assert state.step == 40
    assert sum(last) / 5 < 0.6 * sum(first) / 5


def test_resumed_run_equals_an_uninterrupted_one(tmp_path):
    whole = train(tiny_cfg(steps=6), work_dir=None, log=lambda _: None)
    train(tiny_cfg(steps=6, max_minutes=1e-6), work_dir=tmp_path, log=lambda _: None)
    resumed = train(tiny_cfg(steps=6), work_dir=tmp_path, log=lambda _: None)
    assert resumed.step == 6
    assert resumed.losses == pytest.approx(whole.losses, rel=1e-5)


def test_train_vqa_cli_writes_a_loadable_model(tmp_path):
    out = tmp_path / "model"
    argv = [
        "vqa",
        "--steps",
        "1",
        "--batch-size",
        "2",
        "--out",
        str(out),
        "--work-dir",
        str(tmp_path / "work"),
    ]
    assert train_main([*argv, "--eval-clips", "1"]) == 0
    for name in ("config.json", "model.safetensors", "tokenizer.json", "loss.png", "eval.json"):
        assert (out / name).is_file(), name
    with VideoQA.from_pretrained(out) as qa:
        assert qa.adapter.tokens_per_frame == 16


@pytest.mark.skipif(not (ASSET / "config.json").is_file(), reason="assets/tiny-vqa not built")
def test_shipped_model_answers_held_out_clips_through_videoqa():
    world = TrainVQAConfig(world_fps=model_qa_settings(ASSET)["fps"])  # clips at its rate
    result = videoqa_accuracy(ASSET, world, clips=EVAL_CLIPS, first_seed=500)
    assert result["questions"] >= 80
    assert result["all"] >= SHIPPED_BAR, result
    for kind in LEARNT_KINDS:
        assert result["per_kind"][kind] >= 0.9, (kind, result)


@pytest.mark.skipif(not (ASSET / "config.json").is_file(), reason="assets/tiny-vqa not built")
def test_default_model_is_the_shipped_one_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_model_dir() == ASSET
    with VideoQA.from_pretrained() as qa:  # the directory's streamrt.json sets the window
        assert qa.config.window_frames == TrainVQAConfig().num_frames
        assert qa.adapter.image_size == (64, 64)


@pytest.mark.skipif(not (ASSET / "config.json").is_file(), reason="assets/tiny-vqa not built")
def test_ask_cli_defaults_to_the_shipped_model(tmp_path, capsys, monkeypatch):
    import argparse

    from streamrt.apps.ask import add_arguments, run
    from streamrt.io.sinks import VideoSink
    from streamrt.world import COLORS

    cfg = TrainVQAConfig()
    clip = clip_example(cfg, seed=3)
    path = tmp_path / "clip.mp4"
    with VideoSink(path, fps=cfg.world_fps, width=64, height=64) as sink:  # the clip's rate
        for frame in clip.frames:
            sink.write(frame)
    monkeypatch.chdir(tmp_path)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert run(parser.parse_args(["--video", str(path), "what color is the circle?"])) == 0
    out = capsys.readouterr()
    assert "fed 8 frames" in out.err  # sampled at the model's rate, the clip's
    assert out.out.strip() in COLORS


@pytest.mark.skipif(not (ASSET / "config.json").is_file(), reason="assets/tiny-vqa not built")
@pytest.mark.parametrize("name", ["model.safetensors", "tokenizer.json", "config.json"])
def test_truncated_or_missing_asset_file_names_the_file_and_the_rebuild(tmp_path, name):
    copy = shutil.copytree(ASSET, tmp_path / "tiny-vqa")
    data = (copy / name).read_bytes()
    (copy / name).write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError, match=rf"{name} is truncated.*streamrt train vqa"):
        VideoQA.from_pretrained(copy)
    (copy / name).unlink()
    with pytest.raises(FileNotFoundError, match=rf"{name}|no config\.json"):
        VideoQA.from_pretrained(copy)


@pytest.mark.parametrize("fps", [4.0, 8.0])
def test_auxiliary_questions_are_settled_by_the_frames(fps):
    """`shape_frame` names the shape of a frame's only object; `motion_frame` the way that
    object moved over the two frames before (its centre, as drawn, moved that way)."""
    from streamrt.world import make_clip

    cfg = TrainVQAConfig(world_fps=fps, aux_tasks=True)
    seen = {"shape_frame": 0, "motion_frame": 0}
    step = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
    for seed in range(60):
        clip = make_clip(seed, cfg.num_frames, cfg.world())
        for qa in aux_questions(clip.scene, cfg.num_frames, np.random.default_rng(seed)):
            states = [s for s in clip.scene.state(qa.frame) if s.visible]
            assert len(states) == 1, qa
            seen[qa.kind] += 1
            if qa.kind == "shape_frame":
                assert qa.answer == states[0].shape
                continue
            dx, dy = step[qa.answer]
            path = [
                clip.scene.object_state(states[0].index, t).center for t in (qa.frame - 2, qa.frame)
            ]
            moved = (path[1][0] - path[0][0], path[1][1] - path[0][1])
            assert moved[0] * dx + moved[1] * dy > 0 and moved[0] * dy == moved[1] * dx, qa
    assert seen["shape_frame"] >= 20 and seen["motion_frame"] >= 10, seen


def test_auxiliary_tasks_join_the_clips_questions_only_when_asked_for():
    plain = clip_example(TrainVQAConfig(), seed=1)  # a clip with a lone moving shape
    extra = clip_example(TrainVQAConfig(aux_tasks=True), seed=1)
    assert not {q.kind for q in plain.qa} & {"shape_frame", "motion_frame"}
    assert extra.qa[: len(plain.qa) - 1] == plain.qa[:-1]  # the world's, then aux, caption
    assert [q.kind for q in extra.qa[len(plain.qa) - 1 : -1]] == ["shape_frame", "motion_frame"]
    assert extra.qa[-1] == plain.qa[-1] and extra.qa[-1].kind == "caption"


def test_auxiliary_kinds_stay_out_of_the_overall_accuracy():
    hits = {"color_frame": [True, False], "shape_frame": [True] * 5, "caption": [True] * 5}
    out = _summary(hits)
    assert set(AUX_KINDS) >= {"caption", "shape_frame", "motion_frame"}
    assert out["all"] == 0.5 and out["questions"] == 2
    assert out["per_kind"]["shape_frame"] == 1.0


def test_world_rate_reaches_the_clips_and_the_manifest():
    slow, fast = TrainVQAConfig(world_fps=4.0), TrainVQAConfig(world_fps=8.0)
    assert manifest_qa(slow)["fps"] == 4.0 and manifest_qa(fast)["fps"] == 8.0
    a = clip_example(slow, seed=11, caption=False).frames
    b = clip_example(fast, seed=11, caption=False).frames
    assert a.shape == b.shape and not np.array_equal(a, b)  # further per frame at 4 fps


def test_init_from_copies_the_weights_whose_name_and_shape_match(tmp_path):
    source = tiny_cfg()
    model, _ = new_model(source)
    model.model.save_pretrained(tmp_path)
    finer = tiny_cfg(seed=1, vision={**source.vision, "patch_size": 4}, init_from=str(tmp_path))
    started, _ = new_model(finer)  # patch 4: its patch and position embeddings differ
    random, _ = new_model(dataclasses.replace(finer, init_from=None))
    before = random.model.state_dict()
    before = {n: t.clone() for n, t in before.items()}
    copied = init_matching(random.model, tmp_path)
    assert "lm_head.weight" in copied
    assert "model.vision_model.embeddings.patch_embedding.weight" not in copied
    saved = model.model.state_dict()
    for name, value in started.model.state_dict().items():
        assert torch.equal(value, saved[name] if name in copied else before[name]), name


def test_a_resumed_run_does_not_read_init_from_again(tmp_path):
    start = tmp_path / "start"
    new_model(tiny_cfg())[0].model.save_pretrained(start)
    cfg = tiny_cfg(steps=4, init_from=str(start))
    train(dataclasses.replace(cfg, max_minutes=1e-6), work_dir=tmp_path / "w", log=lambda _: None)
    shutil.rmtree(start)
    assert train(cfg, work_dir=tmp_path / "w", log=lambda _: None).step == 4
