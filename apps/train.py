"""`streamrt train gen|vqa`: train the embedded tiny models and ship them.

streamrt train gen --minutes 45              # train (resumes build/train-gen/), export
streamrt train gen --tune-only               # pick the sampler settings of the manifest
streamrt train vqa --minutes 55              # the tiny Video-LLM (resumes build/train-vqa/)
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from rich.console import Console

console = Console(stderr=True, soft_wrap=True)


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="what", required=True)
    gen = sub.add_parser("gen", help="the tiny text-to-video model (assets/tiny-world)")
    gen.add_argument("--output", default="assets/tiny-world", help="generator directory to write")
    gen.add_argument(
        "--work-dir", default="build/train-gen", help="checkpoint directory (resumed if present)"
    )
    gen.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint")
    gen.add_argument("--steps", type=int, help="optimizer steps (default 3000)")
    gen.add_argument("--minutes", type=float, help="time budget; ends the run if reached first")
    gen.add_argument("--batch-size", type=int, help="clips per step (default 8)")
    gen.add_argument("--frames", type=int, help="frames per training clip (default 9)")
    gen.add_argument("--lr", type=float, help="peak learning rate (default 2e-3)")
    gen.add_argument("--seed", type=int, help="seed of weights, clips and noise (default 0)")
    gen.add_argument("--threads", type=int, help="torch threads (default 2; 1 on a busy machine)")
    gen.add_argument(
        "--object-weight", type=float, help="extra loss weight of object pixels at the start"
    )
    gen.add_argument("--object-weight-final", type=float, help="... at the end (reached linearly)")
    gen.add_argument("--no-compile", action="store_true", help="train without torch.compile")
    gen.add_argument("--tune", action="store_true", help="after training, sweep sampler settings")
    gen.add_argument(
        "--tune-only", action="store_true", help="only sweep sampler settings of --output"
    )

    vqa = sub.add_parser("vqa", help="the tiny Video-LLM (assets/tiny-vqa)")
    vqa.add_argument(
        "--out",
        "--output",
        dest="output",
        default="assets/tiny-vqa",
        help="model directory to write (default assets/tiny-vqa)",
    )
    vqa.add_argument(
        "--work-dir", default="build/train-vqa", help="checkpoint directory (resumed if present)"
    )
    vqa.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint")
    vqa.add_argument("--steps", type=int, help="optimizer steps (default 6000)")
    vqa.add_argument("--minutes", type=float, help="time budget; ends the run if reached first")
    vqa.add_argument("--batch-size", type=int, help="clips per step (default 16)")
    vqa.add_argument("--lr", type=float, help="peak learning rate (default 1e-3)")
    vqa.add_argument("--seed", type=int, help="seed of weights and clips (default 0)")
    vqa.add_argument("--threads", type=int, help="torch threads (default 1)")
    vqa.add_argument(
        "--eval-clips",
        type=int,
        default=200,
        help="held-out clips asked through VideoQA after training (0: skip; default 200)",
    )


def vqa_config_from(args: argparse.Namespace):
    from streamrt.models.train_vqa import TrainVQAConfig

    fields = {
        "steps": args.steps,
        "max_minutes": args.minutes,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "seed": args.seed,
        "threads": args.threads,
    }
    return TrainVQAConfig(**{k: v for k, v in fields.items() if v is not None})


def run_vqa(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from streamrt.models import train_vqa, train_vqa_eval

    try:
        cfg = vqa_config_from(args)
    except ValueError as exc:
        console.print(f"[red]error:[/] {exc}")
        return 2
    state = train_vqa.train(
        cfg, args.work_dir, args.output, resume=not args.fresh, log=console.print
    )
    console.print(f"wrote {args.output} (checkpoint in {args.work_dir})")
    if args.eval_clips:
        result = train_vqa_eval.videoqa_accuracy(
            args.output, state.cfg, clips=args.eval_clips, log=console.print
        )
        path = Path(args.output) / "eval.json"
        path.write_text(json.dumps(result, indent=1) + "\n")
        console.print(f"held-out accuracy through VideoQA: {result['all']:.3f} ({path})")
    return 0


def config_from(args: argparse.Namespace):
    from streamrt.models.train_gen import TrainGenConfig

    fields = {
        "steps": args.steps,
        "max_minutes": args.minutes,
        "batch_size": args.batch_size,
        "num_frames": args.frames,
        "lr": args.lr,
        "seed": args.seed,
        "threads": args.threads,
        "object_weight": args.object_weight,
        "object_weight_final": args.object_weight_final,
    }
    cfg = TrainGenConfig(**{k: v for k, v in fields.items() if v is not None})
    cfg.compile = not args.no_compile
    return cfg


def run(args: argparse.Namespace) -> int:
    from streamrt.models import train_gen, train_gen_eval

    if args.what == "vqa":
        return run_vqa(args)
    if args.what != "gen":
        console.print(f"[red]error:[/] nothing to train called {args.what!r}")
        return 2
    if not args.tune_only:
        try:
            cfg = config_from(args)
        except ValueError as exc:
            console.print(f"[red]error:[/] {exc}")
            return 2
        train_gen.train(cfg, args.work_dir, args.output, resume=not args.fresh, log=console.print)
        console.print(f"wrote {args.output} (checkpoint in {args.work_dir})")
    if args.tune or args.tune_only:
        best = train_gen_eval.tune_sampler(args.output, log=console.print)
        console.print(f"best sampler settings, written to {args.output}: {best}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="streamrt train", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
