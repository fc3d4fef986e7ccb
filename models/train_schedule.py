"""What every training run of the embedded models shares: the optimizer schedule's
settings (`RunSchedule`), how far a run is (`progress`), its learning rate (`lr_at`), and
the loop around a model's own step (`resume_or_new`, `run_steps`, `torch_threads`).

`TrainGenConfig` and `TrainVQAConfig` extend `RunSchedule` with their data and model
settings and set their own defaults.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from streamrt.errors import InputError

CHECKPOINT = "checkpoint.pt"
"""File name of a run's resumable state inside its work directory."""


@dataclass
class RunSchedule:
    """Steps, time budget, AdamW, warm-up + cosine decay, weight average, logging."""

    steps: int = 3000
    """Optimizer steps; the learning rate decays over exactly these."""

    max_minutes: float | None = None
    """Time budget of the run (training time, summed over resumes): the run ends and the
    learning rate finishes its decay when either this or `steps` runs out."""

    lr: float = 2e-3
    """Peak AdamW learning rate."""

    warmup_steps: int = 100
    """Linear warm-up from 0 to `lr`; then cosine decay to `lr * min_lr_ratio`."""

    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of `lr`."""

    weight_decay: float = 0.01
    """AdamW decoupled weight decay."""

    grad_clip: float = 1.0
    """Global gradient-norm clip."""

    ema_decay: float = 0.998
    """Decay of the weight average that is exported (ramped up over the first steps)."""

    seed: int = 0
    """Seeds the initial weights, the training data and any noise (resumable exactly)."""

    threads: int = 1
    """torch intra-op threads (1 on a shared machine: tiny matmuls gain little from more)."""

    log_every: int = 10
    """Steps between log lines."""

    checkpoint_every: int = 100
    """Steps between checkpoints (each also exports the model and redraws its loss curve)."""

    def __post_init__(self) -> None:
        """Refuse a schedule that cannot run (subclasses call this first)."""
        for name in ("steps", "threads", "log_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup_steps < 0:
            raise InputError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.max_minutes is not None and not 0 < self.max_minutes < math.inf:
            raise InputError(f"max_minutes (--minutes) must be > 0, got {self.max_minutes}")
        if not 0 < self.lr < math.inf:
            raise InputError(f"lr must be a finite number > 0, got {self.lr}")


def progress(cfg: RunSchedule, step: int, seconds: float) -> float:
    """How far the run is, 0..1: steps done, or time spent if a time budget runs out first."""
    done = step / cfg.steps
    if cfg.max_minutes is not None:
        done = max(done, seconds / (60.0 * cfg.max_minutes))
    return min(1.0, done)


def lr_at(cfg: RunSchedule, step: int, seconds: float = 0.0) -> float:
    """Linear warm-up over `warmup_steps`, then cosine decay over the rest of the run."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    start = cfg.warmup_steps / cfg.steps
    frac = (progress(cfg, step, seconds) - start) / max(1e-9, 1.0 - start)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, max(0.0, frac))))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)


@contextlib.contextmanager
def torch_threads(n: int):
    """Run the body with `n` torch intra-op threads, then restore the previous count."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def write_checkpoint(blob: dict[str, Any], path: Path) -> None:
    """Write `path` atomically (temp file + rename): a run stopped mid-write keeps the last."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(blob, tmp)
    os.replace(tmp, path)


def update_average(
    average: dict[str, torch.Tensor], named_parameters, cfg: RunSchedule, step: int
) -> None:
    """Move the exported weight average towards the weights after step `step` (the decay
    ramps up to `cfg.ema_decay` over the first steps)."""
    decay = min(cfg.ema_decay, (1 + step) / (10 + step))
    with torch.no_grad():
        for name, p in named_parameters:
            average[name].lerp_(p.detach(), 1 - decay)


def read_checkpoint(path: Path) -> dict[str, Any]:
    """The dict a run saved at `path`, read with `torch.load(weights_only=True)`.

    A checkpoint holds only tensors and plain containers, which is all `weights_only`
    unpickles; anything else (a crafted file whose pickle would run code) is refused.

    Raises:
        CheckpointError: the file is not such a checkpoint (foreign, crafted or truncated).
    """
    import pickle

    from streamrt.models.wan_keys import CheckpointError

    fix = "delete it or pass --fresh to start a new run"
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "Weights only load failed" in str(error):
            raise CheckpointError(
                f"{path}: refused to resume: the file holds pickled objects other than tensors "
                f"and plain containers (not a streamrt training checkpoint); {fix}"
            ) from None
        raise CheckpointError(f"{path}: corrupt or truncated checkpoint ({error}); {fix}") from None
    except Exception as error:
        first = (str(error).splitlines() or [""])[0]
        raise CheckpointError(
            f"{path}: corrupt or truncated checkpoint ({type(error).__name__}: {first}); {fix}"
        ) from None
    if not isinstance(blob, dict) or not {"config", "step"} <= blob.keys():
        raise CheckpointError(f"{path}: not a streamrt training checkpoint; {fix}")
    return blob


def resume_or_new(
    cfg: RunSchedule,
    work_dir: str | Path | None,
    resume: bool,
    load: Callable[[Path, Any], Any],
    new: Callable[[Any], Any],
    log: Callable[[str], None],
) -> tuple[Any, Path | None]:
    """`(state, checkpoint path)`: `work_dir/CHECKPOINT` loaded with `cfg` if it exists
    and `resume`, else a new state."""
    ckpt = None if work_dir is None else Path(work_dir) / CHECKPOINT
    if resume and ckpt is not None and ckpt.exists():
        state = load(ckpt, cfg)
        log(f"resumed from {ckpt} at step {state.step}")
        return state, ckpt
    return new(cfg), ckpt


def run_steps(
    state: Any,
    train_step: Callable[[Any], float],
    at_checkpoint: Callable[[Any], None],
    log: Callable[[str], None],
) -> None:
    """Step `state` (with `.cfg`, `.step`, `.seconds`, `.losses`) until its schedule's
    `progress` reaches 1: log every `log_every` steps, call `at_checkpoint` every
    `checkpoint_every` steps and at the end. `state.seconds` counts training time only
    (what `at_checkpoint` spends, evaluation and export, is left out)."""
    cfg = state.cfg
    last = time.perf_counter()
    while progress(cfg, state.step, state.seconds) < 1.0:
        train_step(state)
        now = time.perf_counter()
        state.seconds += now - last
        last = now
        if state.step % cfg.log_every == 0:
            recent = state.losses[-cfg.log_every :]
            log(
                f"step {state.step}/{cfg.steps} loss {sum(recent) / len(recent):.4f} "
                f"lr {lr_at(cfg, state.step - 1, state.seconds):.2e} "
                f"{state.seconds / 60:.1f} min"
            )
        done = progress(cfg, state.step, state.seconds) >= 1.0
        if state.step % cfg.checkpoint_every == 0 or done:
            at_checkpoint(state)
            last = time.perf_counter()
    log(f"finished at step {state.step} after {state.seconds / 60:.1f} min of training")
