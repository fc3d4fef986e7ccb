"""`streamrt bench quality`: long rollouts per cache policy, scored by streamrt.metrics.

Rolls out 1x and 10x the training clip length for each policy of the seeds and reports
adherence, dynamics, drift, first-frame copying and shape recognition (a table, `--json`,
and a PNG over time of all but shape)."""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np

from streamrt.apps.bench import print_table, write_json
from streamrt.metrics import adherence, copying, drift, dynamics, summarize_rollout
from streamrt.world import WorldConfig, make_clip

PROMPTS = [
    "a red circle moving right on a dark background",
    "a blue square moving up on a light background",
    "a green triangle moving left on a striped background",
    "a yellow circle moving down on a checkered background",
]


def policies(window: int) -> dict[str, tuple[str, dict[str, Any]]]:
    """The seeds' policies at one total budget of `window` latent frames."""
    half = window // 2
    return {
        "window": ("sink_window", {"sink_blocks": 0, "window_blocks": window}),
        "sink": ("sink_window", {"sink_blocks": 3, "window_blocks": window - 3}),
        "deep sink": ("deep_sink", {"sink_blocks": half, "window_blocks": window - half}),
        "ema sink": ("ema_sink", {"sink_blocks": 3, "window_blocks": window - 3}),
        "deep sink + compression": (
            "deep_sink_participative",
            {"sink_blocks": half, "budget_blocks": window, "recent_blocks": max(3, window // 4)},
        ),
    }


def _rollout(args, policy: str, policy_args: dict, prompt: str, frames: int) -> np.ndarray:
    from streamrt.apps.generate import load_generator

    gen = load_generator(args.model, args.config, {"policy": policy, "policy_args": policy_args})
    return np.stack(list(gen.stream(prompt, num_frames=frames)))


def _series(
    frames: np.ndarray, prompt: str, reference: np.ndarray, step: int
) -> dict[str, list[float]]:
    """Metrics over time in windows of `step` frames (for the plot)."""
    out: dict[str, list[float]] = {"adherence": [], "dynamics": [], "drift": [], "copying": []}
    cop = copying(frames)
    for s in range(0, len(frames) - step + 1, step):
        w = frames[s : s + step]
        out["adherence"].append(adherence(w, prompt)["score"])
        out["dynamics"].append(float(dynamics(w).mean()))
        out["drift"].append(float(drift(w, reference).mean()))
        out["copying"].append(float(cop[s : s + step].mean()))
    return out


def _plot(curves: dict[str, dict[str, list[float]]], step: int, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(16, 3.5))
    for ax, metric in zip(axes, ["adherence", "dynamics", "drift", "copying"]):
        for name, series in curves.items():
            ax.plot(np.arange(len(series[metric])) * step, series[metric], label=name)
        ax.set_title(metric)
        ax.set_xlabel("frame")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def bench_quality(args: argparse.Namespace) -> int:
    world = WorldConfig(late_entry_prob=0, early_exit_prob=0, boundary="wrap")
    lengths = {"1x": args.clip_frames, "10x": 10 * args.clip_frames}
    rows, curves = [], {}
    for name, (policy, pargs) in policies(args.window).items():
        for label, n in lengths.items():
            scores, series = [], []
            for prompt in PROMPTS[: args.prompts]:
                frames = _rollout(args, policy, pargs, prompt, n)
                reference = make_clip(0, 32, world, caption=prompt).frames
                scores.append(summarize_rollout(frames, prompt, reference))
                if label == "10x":
                    series.append(_series(frames, prompt, reference, args.clip_frames))
            mean = {k: float(np.mean([s[k] for s in scores])) for k in scores[0]}
            rows.append({"policy": name, "length": f"{label} ({n})", **mean})
            if series:
                curves[name] = {k: list(np.mean([s[k] for s in series], axis=0)) for k in series[0]}
    cols = [
        "policy",
        "length",
        "adherence",
        "late_adherence",
        "dynamics",
        "late_dynamics",
        "drift",
        "copying",
        "shape",
    ]
    print_table(f"bench quality: {args.model}, window {args.window} frames", rows, cols)
    if args.plot:
        _plot(curves, args.clip_frames, args.plot)
    write_json(args.json, {"suite": "quality", "model": args.model, "rows": rows, "curves": curves})
    return 0
