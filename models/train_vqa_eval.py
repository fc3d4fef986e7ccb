"""The trained tiny Video-LLM: how well it answers held-out world clips, and its export.

Two measures. `videoqa_accuracy` is the one that counts: every clip goes through a real
`VideoQA` session (feed the frames, `ask` the question, greedy decoding, the answer text
compared with the world's answer). `teacher_forced_accuracy` is its fast stand-in during
training (one batched forward; correct when the answer word and `</s>` are both argmax),
equal to it by construction of `train_vqa.clip_logits` (see tests/unit/test_train_vqa.py).

Held-out clips are world seeds below `train_vqa_data.TRAIN_SEED_BASE`, which training never uses.
"""

from __future__ import annotations

import dataclasses
import json
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from streamrt.config import QAConfig
from streamrt.models.train_vqa import TrainState, averaged, clip_logits
from streamrt.models.train_vqa_data import AUX_KINDS, Example, TrainVQAConfig, clip_example
from streamrt.models.vlm import MANIFEST

EVAL_SEED = 0
"""First held-out world seed of the evaluation clips."""
EVAL_QA_PER_KIND = 1
"""Questions per kind and held-out clip (answer-balanced), the same for every model."""


def held_out(cfg: TrainVQAConfig, clips: int, first_seed: int = EVAL_SEED) -> list[Example]:
    """`clips` held-out clips (world seeds `first_seed`, `first_seed + 1`, ...), each with
    `EVAL_QA_PER_KIND` questions per kind whatever the training drew."""
    cfg = dataclasses.replace(cfg, qa_per_kind=EVAL_QA_PER_KIND)
    return [clip_example(cfg, first_seed + i, dense=False) for i in range(clips)]


def _summary(hits: dict[str, list[bool]]) -> dict[str, Any]:
    """Accuracy over the world's question kinds ("all"; the auxiliary tasks, `AUX_KINDS`,
    are reported per kind only), and per kind."""
    every = [h for k, v in hits.items() if k not in AUX_KINDS for h in v]
    out: dict[str, Any] = {"all": sum(every) / max(1, len(every)), "questions": len(every)}
    out["per_kind"] = {k: sum(v) / len(v) for k, v in sorted(hits.items())}
    out["per_kind_n"] = {k: len(v) for k, v in sorted(hits.items())}
    return out


@torch.no_grad()
def teacher_forced_accuracy(
    adapter: Any, tokenizer: Any, cfg: TrainVQAConfig, clips: int | None = None, batch: int = 16
) -> dict[str, Any]:
    """Share of held-out questions whose answer tokens and `</s>` are all argmax."""
    examples = held_out(cfg, cfg.eval_clips if clips is None else clips)
    hits: dict[str, list[bool]] = defaultdict(list)
    for start in range(0, len(examples), batch):
        chunk = examples[start : start + batch]
        logits, targets = clip_logits(adapter, tokenizer, cfg, chunk)
        right = (logits.argmax(-1) == targets) | (targets == -100)
        kinds = [qa.kind for e in chunk for qa in e.qa]
        for kind, row in zip(kinds, right.all(-1).tolist()):
            hits[kind].append(row)
    return _summary(hits)


def videoqa_accuracy(
    path_or_session: Any,
    cfg: TrainVQAConfig,
    clips: int = 100,
    first_seed: int = EVAL_SEED,
    log: Callable[[str], None] | None = None,
    **qa_options: Any,
) -> dict[str, Any]:
    """Accuracy through `VideoQA` on held-out clips: feed every frame, ask every question.

    `path_or_session`: a model directory, opened with `VideoQA.from_pretrained` as a user
    opens it (its `streamrt.json` settings, then `qa_options`), or an `(adapter, tokenizer)`
    pair, run under `cfg.qa_config(**qa_options)` (a window and retrieval over the clip).
    """
    from streamrt.qa import VideoQA

    qa_cfg = cfg.qa_config(**qa_options)
    hits: dict[str, list[bool]] = defaultdict(list)
    wrong: list[tuple[str, str, str]] = []
    model = path_or_session
    for i, example in enumerate(held_out(cfg, clips, first_seed)):
        if isinstance(model, tuple):
            session = VideoQA(*model, qa_cfg)
        else:  # loaded once; later clips reuse the model under the same settings
            session = VideoQA.from_pretrained(model, **qa_options)
            model, qa_cfg = (session.adapter, session.tokenizer), session.config
        with session:
            session.feed(example.frames)
            for qa in example.qa:
                long = len(qa.answer.split()) + 1 if qa.kind == "caption" else None
                text = session.ask(qa.question, long).text
                hits[qa.kind].append(text == qa.answer)
                if text != qa.answer:
                    wrong.append((qa.question, qa.answer, text))
        if log is not None and (i + 1) % 25 == 0:
            now = _summary(hits)
            log(f"{i + 1}/{clips} clips: {now['all']:.3f} of {now['questions']} questions")
    out = _summary(hits)
    out["wrong_examples"] = wrong[:20]
    return out


# ---------------------------------------------------------------------- export


def export_model(state: TrainState, output: str | Path) -> None:
    """Write the averaged weights and the tokenizer with `save_pretrained` (safetensors),
    and `streamrt.json`: the session settings the model was trained for."""
    output = Path(output)
    with averaged(state):
        state.model.save_pretrained(output)
    state.tokenizer.save_pretrained(output)
    manifest = {"format": "streamrt-video-llm", "qa": manifest_qa(state.cfg)}
    (output / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")


def manifest_qa(cfg: TrainVQAConfig) -> dict[str, Any]:
    """`QAConfig` fields a session needs to match training: a window and a retrieval that
    hold a whole clip, the world's frame rate, the prompt layout."""
    qa = {
        "window_frames": cfg.num_frames,
        "retrieve_frames": cfg.num_frames,
        "fps": cfg.world().fps,
    }
    if cfg.system_prompt:
        qa["system_prompt"] = cfg.system_prompt
    if cfg.question_template != QAConfig.question_template:
        qa["question_template"] = cfg.question_template
    return qa


def plot_training(
    losses: list[float],
    evals: list[dict[str, Any]],
    path: str | Path,
    size=(8, 4.5),
    start: int = 0,
) -> None:
    """Answer loss per step from step `start` on (grey, running mean blue, log axis; the
    steps before are a vision-only stage, marked by a dashed line) and the held-out
    teacher-forced accuracy at each checkpoint (orange, right axis)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    if not losses:
        return
    start = min(start, len(losses))
    fig, ax = plt.subplots(figsize=size, dpi=100)
    if start:
        ax.plot(np.arange(1, start + 1), losses[:start], color="tab:green", lw=0.7)
        ax.axvline(start, color="0.4", ls="--", lw=1)
        ax.text(
            0, 1.0, " vision stage (its dense loss)", transform=ax.get_xaxis_transform(), va="top"
        )
    y = np.asarray(losses[start:] or losses, dtype=np.float64)
    k = max(1, len(y) // 40)
    smooth = np.convolve(y, np.ones(k) / k, mode="valid")
    if start < len(losses):
        ax.plot(np.arange(start + 1, start + len(y) + 1), y, color="0.8", lw=0.7)
        ax.plot(np.arange(start + k, start + len(y) + 1), smooth, color="tab:blue", lw=1.5)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("answer cross-entropy (per question)", color="tab:blue")
    tail = y[-100:].mean()
    ax.set_title(f"train vqa: loss (last 100 steps {tail:.3f}) and held-out accuracy")
    if evals:
        acc = ax.twinx()
        acc.plot([e["step"] for e in evals], [e["all"] for e in evals], "o-", color="tab:orange")
        acc.set_ylim(0, 1)
        acc.set_ylabel("held-out accuracy (teacher-forced)", color="tab:orange")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ---------------------------------------------------------------------- needles

NEEDLE_MODES: dict[str, dict[str, Any] | str | None] = {
    "consensus": {"per_layer": True, "layer_selection": "consensus"},
    "independent": {"per_layer": True, "layer_selection": "independent"},
    "summed": {"per_layer": False},
    "window-only": None,
    "oracle": "clip",
}
"""Memories `needle_accuracy` compares: `QAConfig` overrides; None: [sink | window] only
(nothing retrieved, `streamrt.apps.bench.qa.BenchQA.window_only`); "clip": the clip's own
frames for every layer, exactly the in-window layout (the model's ceiling)."""


def needle_accuracy(
    path: str | Path | None = None,
    cfg: TrainVQAConfig | None = None,
    clips: int = 12,
    first_seed: int = EVAL_SEED,
    scale: int = 100,
    modes: dict[str, dict[str, Any] | str | None] | None = None,
    **qa_options: Any,
) -> dict[str, dict[str, Any]]:
    """Accuracy on needles at the start of long streams, per memory in `modes`.

    Each stream is a held-out clip (the needle: every question is about it) followed by
    its own empty background up to `scale` x `window_frames` frames, fed once into one
    session (`VideoQA.from_pretrained(path, **qa_options)`'s settings); every question of
    the clip is then asked under each mode's settings on the same stored frames.
    """
    from streamrt.apps.bench.qa import BenchQA
    from streamrt.qa import VideoQA
    from streamrt.world import make_clip, render_background

    class NeedleQA(BenchQA):
        clip_only = False
        """True: every layer gets the clip's frames (the first ones stored)."""

        def _select(self, ids: list[int], frames: list[int], cutoff: int) -> list[list[int]]:
            if self.clip_only:
                return [frames[: cfg.num_frames]] * self.adapter.num_layers
            return super()._select(ids, frames, cutoff)

    cfg = dataclasses.replace(cfg or TrainVQAConfig(), qa_per_kind=EVAL_QA_PER_KIND)
    modes = NEEDLE_MODES if modes is None else modes
    opened = VideoQA.from_pretrained(path, **qa_options)
    adapter, tokenizer, base = opened.adapter, opened.tokenizer, opened.config
    opened.close()
    hits: dict[str, dict[str, list[bool]]] = {m: defaultdict(list) for m in modes}
    length = scale * base.window_frames
    for seed in range(first_seed, first_seed + clips):
        clip = make_clip(seed, cfg.num_frames, cfg.world())  # as `held_out` draws it
        frames = clip.frames
        background = render_background(clip.scene.background, *frames.shape[1:3])
        filler = np.repeat(background[None], max(0, length - len(frames)), 0)
        with NeedleQA(adapter, tokenizer, base) as session:
            session.feed(frames)
            if len(filler):
                session.feed(filler)
            for mode, options in modes.items():
                overrides = options if isinstance(options, dict) else {}
                session.config = dataclasses.replace(base, **overrides)
                session.window_only = options is None
                session.clip_only = options == "clip"
                for qa in clip.qa:
                    if cfg.kinds is not None and qa.kind not in cfg.kinds:
                        continue
                    hits[mode][qa.kind].append(session.ask(qa.question).text == qa.answer)
    return {m: _summary(h) for m, h in hits.items()}
