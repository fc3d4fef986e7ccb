"""Training of the embedded tiny Video-LLM on the procedural world's question/answer pairs.

The model is a stock `SmolVLMForConditionalGeneration` (Idefics3-style vision tower +
pixel-shuffle connector + Llama text model) with the word-level tokenizer of
`streamrt.models.vlm_tiny`. Training runs exactly the token layout a `VideoQA` session
builds when its window covers the whole clip, with the session's own helpers
(`lay_out`, `question_ids`, `text_ids`) and its own `PlannedCache`:

    tokens     | system sink | frame 0 | frame 1 | ... | frame F-1 | question  answer |
    positions  | 0 .. S-1    | S ..    |         |     |      .. P-1 | P ..             |
    attention  | causal over the prefix (what `feed` builds frame by frame)  | sees all  |
    loss       |                          --                      | answer word, </s> |

The prefix (sink + frames) runs once per clip; every question about the clip then runs
on a `PlannedCache` holding the prefix's K/V, as `VideoQA.ask` runs it on the blocks it
fetched. A model trained here therefore answers the same through the streaming memory
(tests/unit/test_train_vqa.py pins the logits).

    cfg = TrainVQAConfig(steps=2000)
    train(cfg, work_dir="build/train-vqa", output="assets/tiny-vqa")

The run's settings and the clips it trains on live in `models/train_vqa_data.py`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers.cache_utils import DynamicCache

from streamrt.models.train_schedule import (
    lr_at,
    read_checkpoint,
    resume_or_new,
    run_steps,
    torch_threads,
    update_average,
    write_checkpoint,
)
from streamrt.models.train_vqa_data import (
    Example,
    TrainVQAConfig,
    extra_vision_batch,
    sample_batch,
)
from streamrt.models.train_vqa_dense import DenseHeads
from streamrt.models.vlm import SmolVLMAdapter
from streamrt.models.vlm_tiny import tiny_tokenizer, tiny_vlm
from streamrt.qa.context import PlannedCache
from streamrt.qa.layout import lay_out, question_ids, text_ids

# ---------------------------------------------------------------------- model


def new_model(cfg: TrainVQAConfig) -> tuple[SmolVLMAdapter, Any]:
    """A randomly initialised adapter (stock SmolVLM inside) and its tokenizer."""
    tok = tiny_tokenizer()
    vision = {**cfg.vision, "image_size": cfg.image_size}
    model = tiny_vlm(
        "smolvlm",
        vocab_size=len(tok) + 4,
        seed=cfg.seed,
        text=cfg.text,
        vision=vision,
        scale_factor=cfg.scale_factor,
    )
    if cfg.init_from is not None:
        init_matching(model, cfg.init_from)
    return SmolVLMAdapter(model), tok


def init_matching(model: torch.nn.Module, path: str | Path) -> list[str]:
    """Copy the weights of the model directory `path` into `model` where name and shape
    match; returns the names copied."""
    from safetensors.torch import load_file

    source = load_file(str(Path(path) / "model.safetensors"))
    own = model.state_dict()
    copied = [n for n, t in source.items() if n in own and own[n].shape == t.shape]
    model.load_state_dict({n: source[n] for n in copied}, strict=False)
    return copied


@dataclass
class ClipOutput:
    """What `clip_forward` computes for a batch of clips."""

    logits: torch.Tensor
    """`[Q, L, vocab]`, one row per question, rows in batch order."""
    targets: torch.Tensor
    """`[Q, L]` answer tokens, -100 where nothing is learnt (question tokens, padding)."""
    embeds: torch.Tensor | None = None
    """`[B, F, T, hidden]` connector output at the frames' visual tokens (`dense` only)."""
    hidden: torch.Tensor | None = None
    """`[B, F, T, hidden]` text model's output of layer `cfg.dense_layer` there."""


def clip_logits(
    adapter: SmolVLMAdapter, tokenizer: Any, cfg: TrainVQAConfig, batch: list[Example]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced logits of every question in `batch` and their targets.

    Returns `logits [Q, L, vocab]` and `targets [Q, L]` (-100 where nothing is learnt:
    question tokens and padding), one row per question, rows in batch order.
    """
    out = clip_forward(adapter, tokenizer, cfg, batch)
    return out.logits, out.targets


def clip_forward(
    adapter: SmolVLMAdapter,
    tokenizer: Any,
    cfg: TrainVQAConfig,
    batch: list[Example],
    dense: bool = False,
) -> ClipOutput:
    """`clip_logits`, and with `dense` the frames' token states the dense heads read."""
    qa_cfg = cfg.qa_config()
    # 1. Frames through the vision tower, as `feed` does (one batch, no gradient cut).
    feats = frame_blocks(adapter, batch)
    b, f, t = feats.shape[:3]
    sink = text_ids(tokenizer, cfg.system_prompt) if cfg.system_prompt else []
    blocks = ([("text", len(sink))] if sink else []) + [("frame", t)] * f
    positions, end = lay_out(adapter, blocks)
    prefix = feats.reshape(b, f * t, -1)
    if sink:
        sink_embeds = adapter.language_model.get_input_embeddings()(torch.tensor(sink))
        prefix = torch.cat([sink_embeds.expand(b, -1, -1), prefix], dim=1)
    # 2. The prefix, causal: what the session's window holds after the last frame.
    lm = adapter.language_model
    cache = DynamicCache(config=adapter.text_config)
    pre = lm(
        inputs_embeds=prefix,
        position_ids=adapter._position_ids(positions).expand(b, -1),
        cache=cache,
        use_cache=True,
        output_hidden_states=dense,
    )
    # 3. Every question on the clip's K/V (a PlannedCache, as `ask` lays it out).
    rows, owner = [], []
    for i, e in enumerate(batch):
        for qa in e.qa:
            q = question_ids(tokenizer, qa_cfg, qa.question)
            a = [*text_ids(tokenizer, qa.answer), tokenizer.eos_token_id]
            rows.append((q, a))
            owner.append(i)
    length = max(len(q) + len(a) - 1 for q, a in rows)
    ids = torch.full((len(rows), length), tokenizer.pad_token_id, dtype=torch.long)
    targets = torch.full((len(rows), length), -100, dtype=torch.long)
    for r, (q, a) in enumerate(rows):
        seq = q + a[:-1]
        ids[r, : len(seq)] = torch.tensor(seq)
        targets[r, len(q) - 1 : len(q) - 1 + len(a)] = torch.tensor(a)
    idx = torch.tensor(owner)
    planned = PlannedCache(
        [
            (layer.keys.index_select(0, idx), layer.values.index_select(0, idx))
            for layer in cache.layers
        ]
    )
    text_pos = adapter.text_positions(length) + end
    out = lm(
        inputs_embeds=lm.get_input_embeddings()(ids),
        position_ids=adapter._position_ids(text_pos).expand(len(rows), -1),
        cache=planned,
        use_cache=True,
    )
    logits = adapter.model.lm_head(out.last_hidden_state).float()
    if not dense:
        return ClipOutput(logits, targets)
    hidden = pre.hidden_states[cfg.dense_layer][:, len(sink) :].reshape(b, f, t, -1)
    return ClipOutput(logits, targets, visual_part(adapter, feats), visual_part(adapter, hidden))


def frame_blocks(adapter: SmolVLMAdapter, batch: list[Example]) -> torch.Tensor:
    """Every clip's frame blocks through the vision tower and connector (with the family's
    wrapper tokens, as `feed` encodes them): `[B, F, tokens_per_frame, hidden]`."""
    frames = torch.as_tensor(np.stack([e.frames for e in batch])).float() / 255.0
    feats = adapter.frame_features(adapter.pixels(frames.flatten(0, 1)))
    return feats.reshape(*frames.shape[:2], *feats.shape[1:])


def visual_part(adapter: SmolVLMAdapter, blocks: torch.Tensor) -> torch.Tensor:
    """The visual tokens of frame blocks `[B, F, tokens_per_frame, ...]` (after a wrapper
    prefix, if the family has one): the tokens the dense targets' cells describe."""
    first = len(adapter.frame_prefix)
    return blocks[:, :, first : first + adapter.visual_tokens]


def answer_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over each answer's tokens and its closing `</s>`, averaged per question
    (a caption of 20 words weighs as much as a one-word answer)."""
    ce = torch.nn.functional.cross_entropy(
        logits.transpose(1, 2), targets, ignore_index=-100, reduction="none"
    )
    counted = (targets != -100).sum(1).clamp(min=1)
    return (ce.sum(1) / counted).mean()


# ---------------------------------------------------------------------- state


@dataclass
class TrainState:
    """Everything a run needs to continue: model, its average, optimizer, losses."""

    cfg: TrainVQAConfig
    adapter: SmolVLMAdapter
    tokenizer: Any
    ema: dict[str, torch.Tensor]
    optimizer: torch.optim.Optimizer
    step: int = 0
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    """Training wall time summed over invocations."""
    evals: list[dict[str, Any]] = field(default_factory=list)
    """Held-out checks logged at checkpoints (step, accuracy)."""
    heads: DenseHeads | None = None
    """The dense targets' read-outs (`cfg.dense_weight > 0`); trained, never exported."""
    dense_losses: list[dict[str, float]] = field(default_factory=list)
    """Per-target dense losses of each step."""
    vision_steps: int = 0
    """Steps of the vision-only first stage (`losses` holds their dense loss)."""

    @property
    def model(self) -> torch.nn.Module:
        return self.adapter.model


def new_state(cfg: TrainVQAConfig) -> TrainState:
    adapter, tok = new_model(cfg)
    heads = (
        DenseHeads(adapter.text_config.hidden_size, cfg.num_frames) if cfg.dense_weight else None
    )
    decay, no_decay = [], []
    named = [*adapter.model.named_parameters()]
    named += [*heads.named_parameters(prefix="heads")] if heads is not None else []
    for name, p in named:
        (no_decay if p.ndim < 2 or "norm" in name else decay).append(p)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay}],
        lr=cfg.lr,
        betas=(0.9, 0.98),
        weight_decay=0.0,
    )
    ema = {n: p.detach().clone() for n, p in adapter.model.named_parameters()}
    return TrainState(cfg, adapter, tok, ema, optimizer, heads=heads)


def save_checkpoint(state: TrainState, path: Path) -> None:
    """Write `path` atomically (`write_checkpoint`)."""
    blob = {
        "config": dataclasses.asdict(state.cfg),
        "step": state.step,
        "losses": state.losses,
        "seconds": state.seconds,
        "evals": state.evals,
        "model": state.model.state_dict(),
        "ema": state.ema,
        "optimizer": state.optimizer.state_dict(),
        "heads": state.heads.state_dict() if state.heads is not None else None,
        "dense_losses": state.dense_losses,
        "vision_steps": state.vision_steps,
    }
    write_checkpoint(blob, path)


def load_checkpoint(path: Path, cfg: TrainVQAConfig | None = None) -> TrainState:
    """A state from `path`; `cfg` (e.g. more steps) replaces the saved config if given."""
    blob = read_checkpoint(path)
    cfg = cfg or TrainVQAConfig(**blob["config"])
    # the saved weights replace any start: `init_from` is not read (it may be gone)
    state = new_state(dataclasses.replace(cfg, init_from=None))
    state.cfg = cfg
    state.model.load_state_dict(blob["model"])
    state.optimizer.load_state_dict(blob["optimizer"])
    state.ema = blob["ema"]
    state.step, state.losses, state.seconds = blob["step"], blob["losses"], blob["seconds"]
    state.evals = blob.get("evals", [])
    if state.heads is not None and blob.get("heads") is not None:
        state.heads.load_state_dict(blob["heads"])
    state.dense_losses = blob.get("dense_losses", [])
    state.vision_steps = blob.get("vision_steps", 0)
    return state


def in_vision_stage(state: TrainState) -> bool:
    """Whether the run is still in its vision-only first stage (`cfg.vision_minutes`)."""
    return state.seconds < 60.0 * state.cfg.vision_minutes


def train_step(state: TrainState) -> float:
    """One optimizer step on the clips of `state.step` (and `cfg.vision_extra` vision-only
    steps after it, outside the first stage); returns the step's loss."""
    cfg = state.cfg
    for group in state.optimizer.param_groups:
        group["lr"] = lr_at(cfg, state.step, state.seconds)
    state.model.train()
    vision_only = in_vision_stage(state)
    batch = sample_batch(cfg, state.step, caption=not vision_only)
    if vision_only:
        # stage 1: tower + connector on the connector-level targets alone
        dense = vision_losses(state, batch)
        loss = total = cfg.dense_weight * sum(dense.values())
        state.vision_steps = state.step + 1
    else:
        out = clip_forward(
            state.adapter, state.tokenizer, cfg, batch, dense=state.heads is not None
        )
        loss = answer_loss(out.logits, out.targets)
        total = loss
        if state.heads is not None:
            dense = state.heads.losses(out.embeds, out.hidden, [e.dense for e in batch])
            total = loss + cfg.dense_weight * sum(dense.values())
    optimizer_step(state, total)
    if state.heads is not None:
        logged = {k: round(v.item(), 4) for k, v in dense.items()}
        if not vision_only and cfg.vision_extra:  # (vision_extra needs the heads)
            extra = []
            for j in range(cfg.vision_extra):
                losses = vision_losses(state, extra_vision_batch(cfg, state.step, j))
                extra.append(optimizer_step(state, cfg.dense_weight * sum(losses.values())))
            logged["vision_extra"] = round(sum(extra) / len(extra), 4)
        state.dense_losses.append(logged)
    state.model.eval()
    state.step += 1
    update_average(state.ema, state.model.named_parameters(), cfg, state.step)
    state.losses.append(loss.item())
    return state.losses[-1]


def vision_losses(state: TrainState, batch: list[Example]) -> dict[str, torch.Tensor]:
    """The connector-level dense losses (shape, colour, centre) of `batch`: tower and
    connector only, no text model."""
    embeds = visual_part(state.adapter, frame_blocks(state.adapter, batch))
    return state.heads.vision_losses(embeds, [e.dense for e in batch])


def optimizer_step(state: TrainState, total: torch.Tensor) -> float:
    """Backward `total`, clip the gradient norm, step AdamW (parameters without a gradient,
    e.g. the text model in a vision step, stay put); returns `total`."""
    state.optimizer.zero_grad(set_to_none=True)
    total.backward()
    params = [*state.model.parameters()]
    params += [*state.heads.parameters()] if state.heads is not None else []
    torch.nn.utils.clip_grad_norm_(params, state.cfg.grad_clip)
    state.optimizer.step()
    return total.item()


def train(
    cfg: TrainVQAConfig,
    work_dir: str | Path | None,
    output: str | Path | None = None,
    resume: bool = True,
    log: Callable[[str], None] = print,
) -> TrainState:
    """Train until `cfg.steps` or `cfg.max_minutes` run out, checkpointing to `work_dir`.

    Every checkpoint also exports the averaged weights to `output` (if given) and redraws
    `output/loss.png`, so a run stopped at any point leaves a usable model behind.
    """
    with torch_threads(cfg.threads):
        return _train(cfg, work_dir, output, resume, log)


def _train(cfg: TrainVQAConfig, work_dir, output, resume: bool, log: Callable) -> TrainState:
    from streamrt.models.train_vqa_eval import teacher_forced_accuracy

    state, ckpt = resume_or_new(cfg, work_dir, resume, load_checkpoint, new_state, log)

    def at_checkpoint(state: TrainState) -> None:
        if cfg.eval_clips and not in_vision_stage(state):
            with averaged(state):
                acc = teacher_forced_accuracy(state.adapter, state.tokenizer, cfg)
            state.evals.append({"step": state.step, **acc})
            log(f"step {state.step} held-out teacher-forced accuracy {acc['all']:.3f}")
        checkpoint(state, ckpt, output, log)

    run_steps(state, train_step, at_checkpoint, log)
    return state


class averaged:
    """Context manager: the model holds the averaged (EMA) weights inside, its own after."""

    def __init__(self, state: TrainState) -> None:
        self.state = state
        self.saved: dict[str, torch.Tensor] = {}

    def __enter__(self) -> TrainState:
        with torch.no_grad():
            for name, p in self.state.model.named_parameters():
                self.saved[name] = p.detach().clone()
                p.copy_(self.state.ema[name])
        return self.state

    def __exit__(self, *exc: Any) -> None:
        with torch.no_grad():
            for name, p in self.state.model.named_parameters():
                p.copy_(self.saved[name])


def checkpoint(
    state: TrainState, ckpt: Path | None, output: str | Path | None, log: Callable = print
) -> None:
    """Save the state, then export; a failed export is reported and training goes on."""
    if ckpt is not None:
        save_checkpoint(state, ckpt)
    if output is None:
        return
    from streamrt.models.train_vqa_eval import export_model, plot_training

    try:
        export_model(state, output)
        plot_training(
            state.losses, state.evals, Path(output) / "loss.png", start=state.vision_steps
        )
    except Exception as exc:  # the run must outlive a broken export
        log(f"export to {output} failed at step {state.step}: {type(exc).__name__}: {exc}")
