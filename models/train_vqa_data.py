"""The settings of a tiny Video-LLM training run (`TrainVQAConfig`) and the clips it trains
on: world clips with their questions, the caption task and the dense per-token targets,
drawn from training seeds that never meet the held-out ones (`models/train_vqa.py` trains
on them, `models/train_vqa_eval.py` evaluates on held-out seeds)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from streamrt.config import QAConfig
from streamrt.errors import InputError
from streamrt.models.train_schedule import RunSchedule
from streamrt.models.train_vqa_dense import DenseTargets, dense_targets
from streamrt.world import QA, WorldConfig, make_clip
from streamrt.world.qa import aux_questions

CAPTION_QUESTION = "what is in the video?"
"""The caption task's question (its answer is the clip's caption, kind "caption")."""
AUX_KINDS = ("caption", "shape_frame", "motion_frame")
"""Training-only auxiliary tasks (not world question kinds; left out of every "all"
accuracy): the caption, and the simplest shape and motion questions (`aux_questions`)."""
TRAIN_SEED_BASE = 1_000_000
"""Training clips use world seeds from here up; seeds below it are held out for evaluation."""


@dataclass
class TrainVQAConfig(RunSchedule):
    """One training run of the tiny Video-LLM (defaults: the first stage of the shipped
    model's recipe, which started from the first model's weights, see `init_from`, and was
    then resumed with `max_minutes=220`, see assets/tiny-vqa/TRAINING.md; the schedule
    fields are `RunSchedule`'s)."""

    steps: int = 100_000
    max_minutes: float | None = 110.0  # the time budget ends the run, not the step count
    lr: float = 1e-3  # 3e-3 stalls at the answer prior: ~33 % after 2000 steps
    min_lr_ratio: float = 0.05
    ema_decay: float = 0.995
    log_every: int = 25
    checkpoint_every: int = 200

    batch_size: int = 16
    """Clips per step (every question drawn for a clip trains on the clip's one prefix)."""

    num_frames: int = 8
    """Frames per clip; the shipped model is meant for sessions whose window holds them all
    (`QAConfig.window_frames` and `retrieve_frames` >= this)."""

    image_size: int = 64
    """Frame side the world renders at and the vision tower takes."""

    world_fps: float = 2.0
    """Frame rate of the world clips (`WorldConfig.fps`; speeds are pixels per second, so a
    lower rate moves objects further per frame: 1-5 px at 4 fps, 0.5-2.5 px at the world's
    default 8, 2-10 px at 2 fps, where motion is easiest to see). Exported as the session's
    `fps`, so a session samples a stream at the rate the model was trained on."""

    qa_per_kind: int = 3
    """Questions drawn per kind and clip (answer-balanced, see `streamrt.world.qa`): all
    run on the clip's one prefix, so three give ~3x the answer signal for ~1.8x the step."""

    kinds: tuple[str, ...] | None = None
    """Question kinds trained on (`streamrt.world.QA_KINDS` keys); None: all of them."""

    caption_task: bool = True
    """Also ask every training clip `CAPTION_QUESTION`, answered with its caption: a dense
    signal (every object's colour, shape and direction, the background) that gets the
    model looking at the frames long before one-word answers alone would."""

    text: dict[str, Any] = field(
        default_factory=lambda: {
            "hidden_size": 128,
            "intermediate_size": 256,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
            "head_dim": 32,
        }
    )
    """Overrides of the Llama text config (`vlm_tiny._text_config`)."""

    vision: dict[str, Any] = field(
        default_factory=lambda: {
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "patch_size": 8,
        }
    )
    """Overrides of the vision config; `image_size` comes from `image_size` (the world's
    shapes are 9-15 pixels across; patch 4 with `scale_factor` 4 also gives 16 tokens a
    frame, at ~1.7x the step time, and learnt no more, see assets/tiny-vqa/TRAINING.md)."""

    scale_factor: int = 2
    """Pixel-shuffle factor: (image_size / patch_size / scale_factor)^2 tokens per frame."""

    system_prompt: str = ""
    question_template: str = "{question}"
    """The session's prompt settings the model is trained under (`QAConfig` defaults)."""

    aux_tasks: bool = False
    """Also ask every clip one `shape_frame` and one `motion_frame` question (see
    `aux_questions`): the shape or the direction of motion of a frame's only object, the
    way `color_frame` asks its colour, a direct signal for what the world's shape and
    direction kinds need before those kinds' binding and ordering."""

    eval_clips: int = 64
    """Held-out clips of the teacher-forced check logged at every checkpoint."""

    dense_weight: float = 1.0
    """Weight of the dense per-token losses (`streamrt.models.train_vqa_dense`: shape,
    colour and centre of each cell's object from the connector's tokens; its motion, the
    frame index and the frame's object count from the text model's hidden states after
    `dense_layer`) next to the answer loss; 0: answer loss only (the first model).
    Their linear heads are training-only: the export is the stock model alone."""

    dense_layer: int = 2
    """Text-model layer whose output the motion/frame/count heads read (1-based)."""

    vision_minutes: float = 24.0
    """A first stage of this many minutes (of the run's time budget) that trains only the
    vision tower and connector on the connector-level dense targets (shape, colour, centre:
    no text model, ~5x more frames a second), before the question/answer training with all
    the losses; needs `dense_weight > 0`."""

    vision_extra: int = 0
    """Extra vision-only steps (tower + connector on the connector-level dense targets, as
    in the first stage, on clips of their own) after each question/answer step: the tower
    keeps getting ~5x cheaper shape signal while the text model stays aligned with it."""

    init_from: str | None = None
    """A model directory (`save_pretrained`, e.g. an earlier export) whose weights start a
    fresh run wherever a parameter's name and shape match this config's (the rest keeps its
    random init); None: all random. A resumed run ignores it."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.steps < 1 or self.batch_size < 1 or self.num_frames < 1:
            raise InputError("steps, batch_size and num_frames must be >= 1")
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise InputError(f"max_minutes must be > 0, got {self.max_minutes}")
        if self.dense_weight < 0:
            raise InputError(f"dense_weight must be >= 0, got {self.dense_weight}")
        if self.dense_weight and not 1 <= self.dense_layer <= self.text["num_hidden_layers"]:
            raise InputError(
                f"dense_layer must lie in 1..{self.text['num_hidden_layers']}, "
                f"got {self.dense_layer}"
            )
        for name in ("vision_minutes", "vision_extra"):  # both train on the dense targets
            value = getattr(self, name)
            if value < 0 or (value and not self.dense_weight):
                raise InputError(f"{name} must be >= 0 and needs dense_weight > 0")
        if self.num_frames > 64:
            raise InputError("num_frames must be <= 64 (frame numbers are vocabulary words)")

    def qa_config(self, **overrides: Any) -> QAConfig:
        """The session settings the trained model answers under (window = whole clip)."""
        base = QAConfig(
            system_prompt=self.system_prompt,
            question_template=self.question_template,
            window_frames=self.num_frames,
            retrieve_frames=self.num_frames,
            max_new_tokens=4,
            device="cpu",
        )
        return dataclasses.replace(base, **overrides)

    @property
    def token_side(self) -> int:
        """Side of the connector's token grid: `image_size / (patch_size * scale_factor)`."""
        return self.image_size // (self.vision.get("patch_size", 8) * self.scale_factor)

    def world(self) -> WorldConfig:
        return WorldConfig(
            height=self.image_size,
            width=self.image_size,
            fps=self.world_fps,
            qa_per_kind=self.qa_per_kind,
        )


# ---------------------------------------------------------------------- data


@dataclass
class Example:
    """One clip and the questions asked about it."""

    frames: np.ndarray
    """`[F, H, W, 3]` uint8."""
    qa: list[QA]
    dense: DenseTargets | None = None
    """Per-token targets (`cfg.dense_weight > 0` only)."""


def clip_example(
    cfg: TrainVQAConfig, seed: int, caption: bool | None = None, dense: bool | None = None
) -> Example:
    """The clip of world seed `seed` with its questions (every kind the clip settles), the
    caption question if `caption` (default `cfg.caption_task`) and the dense targets if
    `dense` (default `cfg.dense_weight > 0`)."""
    clip = make_clip(seed, cfg.num_frames, cfg.world())
    qa = [q for q in clip.qa if cfg.kinds is None or q.kind in cfg.kinds]
    if cfg.aux_tasks:
        qa.extend(aux_questions(clip.scene, cfg.num_frames, np.random.default_rng([seed, 7])))
    if cfg.caption_task if caption is None else caption:
        qa.append(QA(CAPTION_QUESTION, clip.caption, "caption", cfg.num_frames - 1))
    if bool(cfg.dense_weight) if dense is None else dense:
        return Example(clip.frames, qa, dense_targets(clip.scene, cfg.num_frames, cfg.token_side))
    return Example(clip.frames, qa)


def sample_batch(cfg: TrainVQAConfig, step: int, caption: bool | None = None) -> list[Example]:
    """The clips of training step `step` (seeds >= `TRAIN_SEED_BASE`, never repeated)."""
    return _training_clips(cfg, step, caption)


EXTRA_SEED_OFFSET = 50_000_000
"""Where the clips of the extra vision steps (`vision_extra`) start, past `sample_batch`'s."""


def extra_vision_batch(cfg: TrainVQAConfig, step: int, j: int) -> list[Example]:
    """The clips of extra vision step `j` after training step `step` (never repeated, never
    one of `sample_batch`'s)."""
    return _training_clips(cfg, step * cfg.vision_extra + j, False, EXTRA_SEED_OFFSET)


def _training_clips(
    cfg: TrainVQAConfig, index: int, caption: bool | None, offset: int = 0
) -> list[Example]:
    """Batch `index` of the training seeds past `TRAIN_SEED_BASE + offset` (per `cfg.seed`)."""
    first = TRAIN_SEED_BASE + cfg.seed * 100_000_000 + offset + index * cfg.batch_size
    return [clip_example(cfg, first + i, caption) for i in range(cfg.batch_size)]
