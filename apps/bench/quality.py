"""`streamrt bench quality`: long rollouts per cache policy, scored by streamrt.metrics.

Rolls out 1x and 10x the training clip length for each policy of the seeds and reports
adherence, dynamics, drift, first-frame copying and shape recognition; for participative
compression also what it keeps against a FIFO window of the same budget
(`streamrt.metrics.kept`). Writes a table, `--json`, a PNG of the metrics over time, a
contact sheet of the 10x rollouts (one row per policy and prompt), and the video-QA
needle table of the embedded QA model (default memory against window-only)."""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np

from streamrt.apps.bench import print_table, write_json
from streamrt.metrics import adherence, copying, drift, dynamics, summarize_rollout
from streamrt.metrics.kept import Snapshot, kept_report
from streamrt.metrics.sheet import draw_sheet, prompt_lines
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
        "compression": (
            "participative",
            {"sink_blocks": 0, "budget_blocks": window, "recent_blocks": max(3, window // 4)},
        ),
        "sink": ("sink_window", {"sink_blocks": 3, "window_blocks": window - 3}),
        "deep sink": ("deep_sink", {"sink_blocks": half, "window_blocks": window - half}),
        "ema sink": ("ema_sink", {"sink_blocks": 3, "window_blocks": window - 3}),
        "deep sink + compression": (
            "deep_sink_participative",
            {"sink_blocks": half, "budget_blocks": window, "recent_blocks": max(3, window // 4)},
        ),
    }


def _rollout(
    args, policy: str, policy_args: dict, prompt: str, frames: int
) -> tuple[np.ndarray, list[Snapshot]]:
    """The frames, and the kept device frames with their importance each time they change."""
    from streamrt.apps.generate import load_generator
    from streamrt.cache.block import DEVICE

    gen = load_generator(args.model, args.config, {"policy": policy, "policy_args": policy_args})
    out, snapshots = [], []
    for frame in gen.stream(prompt, num_frames=frames):
        out.append(frame)
        seq = gen.active.seqs[0]
        kept = seq.indices(DEVICE)
        if not snapshots or snapshots[-1][0] != kept:
            snapshots.append((kept, [seq.table[i].importance for i in kept]))
    return np.stack(out), snapshots


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


def _needles(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Per question kind, the QA model's needle accuracy at 100x the window: its default
    memory against the window-only one (`streamrt.models.train_vqa_eval.needle_accuracy`)."""
    from streamrt.models.train_vqa_eval import needle_accuracy

    modes = {"default": {}, "window-only": None}
    got = needle_accuracy(args.qa_model, clips=args.needle_clips, modes=modes)
    kinds = sorted(got["default"]["per_kind"])
    rows = [
        {
            "kind": k,
            "n": got["default"]["per_kind_n"][k],
            **{m: got[m]["per_kind"][k] for m in modes},
        }
        for k in kinds
    ]
    rows.append(
        {"kind": "all", "n": got["default"]["questions"], **{m: got[m]["all"] for m in modes}}
    )
    return rows


def bench_quality(args: argparse.Namespace) -> int:
    world = WorldConfig(late_entry_prob=0, early_exit_prob=0, boundary="wrap")
    lengths = {"1x": args.clip_frames, "10x": 10 * args.clip_frames}
    rows, kept_rows, curves, sheet = [], [], {}, {}
    for name, (policy, pargs) in policies(args.window).items():
        for label, n in lengths.items():
            scores, series, snapshots = [], [], []
            for prompt in PROMPTS[: args.prompts]:
                frames, kept = _rollout(args, policy, pargs, prompt, n)
                snapshots += kept
                reference = make_clip(0, 32, world, caption=prompt).frames
                scores.append(summarize_rollout(frames, prompt, reference))
                if label == "10x":
                    series.append(_series(frames, prompt, reference, args.clip_frames))
                    if args.sheet:
                        sheet[prompt, name] = frames
            mean = {k: float(np.mean([s[k] for s in scores])) for k in scores[0]}
            row = {"policy": name, "length": f"{label} ({n})", **mean}
            if "participative" in policy:
                report = kept_report(snapshots, pargs["sink_blocks"])
                row["kept_vs_fifo"] = report["differs"]
                kept_rows.append({"policy": name, "length": row["length"], **report})
            rows.append(row)
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
    print_table(
        "what compression keeps against a FIFO window of the same budget (sinks aside)",
        kept_rows,
        ["policy", "length", "differs", "jaccard", "age", "fifo_age", "recency_corr"],
    )
    print(
        "differs: share of chunks whose kept frames are not FIFO's; jaccard: overlap with "
        "FIFO's; age: mean frames behind the newest; recency_corr: rank correlation of "
        "importance with recency (+1: importance orders frames as age does, and compression "
        "keeps what FIFO keeps)"
    )
    if args.plot:
        _plot(curves, args.clip_frames, args.plot)
    if args.sheet:
        strips: list = []
        for prompt in PROMPTS[: args.prompts]:
            strips += [([name, *prompt_lines(prompt)], sheet[prompt, name]) for name in curves]
            strips.append(None)  # a grey line between prompts
        draw_sheet(strips, args.sheet, every=args.clip_frames, scale=args.sheet_scale)
        print(
            f"wrote {args.sheet}: 10x rollouts, one row per policy, one frame in {args.clip_frames}"
        )
    needles = _needles(args) if args.needle_clips else []
    if needles:
        print_table(
            f"bench quality: QA needles at 100x the window ({args.needle_clips} clips)",
            needles,
            ["kind", "n", "default", "window-only"],
        )
    write_json(
        args.json,
        {
            "suite": "quality",
            "model": args.model,
            "rows": rows,
            "kept": kept_rows,
            "curves": curves,
            "needles": needles,
        },
    )
    return 0
