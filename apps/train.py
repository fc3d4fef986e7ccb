"""`streamrt train gen|vae|vqa`: train the embedded tiny models and ship them.

streamrt train gen --minutes 45              # train (resumes build/train-gen/), export
streamrt train gen --tune-only               # pick the sampler settings of the manifest
streamrt train gen --init-from assets/tiny-world --resample-prob 0.5   # fine-tune on own context
streamrt train vqa --init-from DIR          # the tiny Video-LLM (resumes build/train-vqa/)
streamrt train vae --minutes 30             # a tiny Wan VAE on the world (build/tiny-vae)
streamrt train gen --vae build/tiny-vae --noise-drift 0.25 ...   # a generator on its latents
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from rich.console import Console

from streamrt.apps.arguments import count, existing_dir, non_negative, positive, probability

console = Console(stderr=True, soft_wrap=True)


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="what", required=True)
    gen = sub.add_parser("gen", help="the tiny text-to-video model (assets/tiny-world)")
    gen.add_argument("--output", default="assets/tiny-world", help="generator directory to write")
    _schedule_arguments(gen, "build/train-gen", steps=3000, batch=8, lr="2e-3", threads=2)
    gen.add_argument("--frames", type=count(1), help="frames per training clip (default 9)")
    gen.add_argument(
        "--object-weight", type=non_negative, help="extra loss weight of object pixels at the start"
    )
    gen.add_argument(
        "--object-weight-final", type=non_negative, help="... at the end (reached linearly)"
    )
    gen.add_argument(
        "--progressive-prob", type=probability, help="chance of frame-wise rising noise in a chunk"
    )
    gen.add_argument(
        "--drift-prob",
        type=probability,
        help="chance of noise drifting along the caption's direction (GenConfig.noise_drift)",
    )
    gen.add_argument(
        "--init-from",
        type=existing_dir,
        help="generator directory (e.g. assets/tiny-world) whose weights start a fresh run "
        "(new optimizer, step 0); ignored when resuming",
    )
    gen.add_argument(
        "--resample-prob",
        type=probability,
        help="chance that a clip's context is the model's own regeneration (default 0: off)",
    )
    gen.add_argument(
        "--resample-sigma",
        type=_level_range,
        help="noise levels LO,HI a context chunk is put back to before regeneration "
        "(default 0.3,0.9)",
    )
    gen.add_argument(
        "--edge-weight",
        type=non_negative,
        help="extra loss weight of the background ring around each object (default 0)",
    )
    gen.add_argument(
        "--shape-weight",
        type=non_negative,
        help="extra loss weight of the pixels that tell the object's shape from the others "
        "(default 0)",
    )
    gen.add_argument(
        "--object-size",
        type=_size_range,
        help="half-extent range LO,HI of the training world's objects in pixels of a 64-pixel "
        "frame (default 4,7: shapes 9 to 15 pixels across)",
    )
    gen.add_argument(
        "--sigma-shift",
        type=positive,
        help="training noise levels shift*u / (1 + (shift-1)*u), u uniform (default 3: more "
        "high noise; below 1: more low noise, where shapes are drawn)",
    )
    gen.add_argument(
        "--min-lr-ratio",
        type=probability,
        help="final learning rate as a share of --lr (default 0.1; 1: constant)",
    )
    gen.add_argument(
        "--vae",
        type=existing_dir,
        help="a trained AutoencoderKLWan directory (streamrt train vae): denoise its latents at "
        "patch 1 instead of pixels; it is exported with the generator",
    )
    gen.add_argument(
        "--vae-patch",
        type=count(),
        help="patch side over the VAE's latents (default 1; 2 for a 4x VAE: the same tokens)",
    )
    gen.add_argument(
        "--noise-drift",
        type=non_negative,
        help="latent pixels per frame of the drifting noise (default 1; 0.25 for an 8x VAE)",
    )
    gen.add_argument(
        "--distill-from",
        type=existing_dir,
        help="a generator directory (the run's architecture) whose many-step sampler the run's "
        "4-step sampler learns to match (few-step distillation)",
    )
    gen.add_argument(
        "--distill-substeps",
        type=count(),
        help="teacher steps per student step (default 4: a 16-step teacher)",
    )
    gen.add_argument(
        "--distill-guidance",
        type=positive,
        help="classifier-free guidance of the teacher, learnt by the student (default 1: none)",
    )
    gen.add_argument(
        "--adversarial-weight",
        type=non_negative,
        help="a caption-conditioned critic on the one-step clean estimate, its gradient this "
        "multiple of the regression's (default 0: off)",
    )
    gen.add_argument(
        "--adversarial-max-sigma",
        type=probability,
        help="the critic judges chunks noised up to this level (default 1)",
    )
    gen.add_argument("--no-compile", action="store_true", help="train without torch.compile")
    gen.add_argument("--tune", action="store_true", help="after training, sweep sampler settings")
    gen.add_argument(
        "--tune-only", action="store_true", help="only sweep sampler settings of --output"
    )

    vae = sub.add_parser("vae", help="a tiny Wan VAE on the world (the generator's latents)")
    vae.add_argument("--output", default="build/tiny-vae", help="VAE directory to write")
    _schedule_arguments(vae, "build/train-vae", steps=20_000, batch=16, lr="1e-3", threads=1)
    vae.add_argument("--kl-weight", type=non_negative, help="weight of the KL term (default 1e-4)")
    vae.add_argument(
        "--dim-mult",
        type=_int_tuple,
        help="channel multiplier per stage, e.g. 1,2,4 (two downsamplings: 4x space; default "
        "1,2,4,4: 8x)",
    )
    vae.add_argument("--z-dim", type=count(), help="latent channels (default 8)")
    vae.add_argument(
        "--object-weight",
        type=non_negative,
        help="extra loss weight of the pixels on and near objects (default 4)",
    )
    vae.add_argument("--init-from", help="start from this exported VAE directory's weights")
    vae.add_argument(
        "--decoder-only",
        action="store_true",
        help="train only the decoder: --init-from's encoder and latent space stay as they are",
    )
    vae.add_argument(
        "--latent-noise",
        type=non_negative,
        help="largest extra noise on the decoder's latents, in latent stds (default 0)",
    )

    vqa = sub.add_parser("vqa", help="the tiny Video-LLM (assets/tiny-vqa)")
    vqa.add_argument(
        "--out",
        "--output",
        dest="output",
        default="assets/tiny-vqa",
        help="model directory to write (default assets/tiny-vqa)",
    )
    _schedule_arguments(vqa, "build/train-vqa", steps=100_000, batch=16, lr="1e-3", threads=1)
    vqa.add_argument(
        "--eval-clips",
        type=count(0),
        default=200,
        help="held-out clips asked through VideoQA after training (0: skip; default 200)",
    )
    vqa.add_argument(
        "--init-from",
        type=existing_dir,
        help="model directory whose weights start a fresh run where names and shapes match "
        "(e.g. an earlier export); ignored when resuming",
    )
    vqa.add_argument(
        "--dense-weight",
        type=non_negative,
        help="weight of the dense per-token losses (shape, colour, motion, ...; 0: off)",
    )
    vqa.add_argument("--world-fps", type=positive, help="frame rate of the world clips")
    vqa.add_argument(
        "--vision-minutes",
        type=non_negative,
        help="minutes of a first, vision-only stage on the dense targets (needs dense weight)",
    )
    vqa.add_argument("--qa-per-kind", type=count(1), help="questions drawn per kind and clip")
    vqa.add_argument(
        "--vision-extra",
        type=count(0),
        help="vision-only steps after each question/answer step (needs dense weight)",
    )


def _int_tuple(text: str) -> tuple[int, ...]:
    """Type of `--dim-mult`: comma-separated whole numbers >= 1, at least two."""
    try:
        values = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers like 1,2,4, got {text!r}") from None
    if len(values) < 2 or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected at least two numbers >= 1, got {text!r}")
    return values


def _size_range(text: str) -> tuple[int, int]:
    """Type of `--object-size`: "LO,HI" whole numbers with 1 <= LO <= HI <= 16."""
    try:
        lo, hi = (int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LO,HI like 6,9, got {text!r}") from None
    if not 1 <= lo <= hi <= 16:
        raise argparse.ArgumentTypeError(f"expected 1 <= LO <= HI <= 16, got {text!r}")
    return lo, hi


def _level_range(text: str) -> tuple[float, float]:
    """Type of `--resample-sigma`: "LO,HI" with 0 < LO <= HI <= 1."""
    try:
        lo, hi = (float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LO,HI (e.g. 0.3,0.9), got {text!r}") from None
    if not 0 < lo <= hi <= 1:
        raise argparse.ArgumentTypeError(f"expected 0 < LO <= HI <= 1, got {text!r}")
    return lo, hi


def _schedule_arguments(
    p: argparse.ArgumentParser, work_dir: str, steps: int, batch: int, lr: str, threads: int
) -> None:
    """The options every training shares (`RunSchedule` fields, checkpoint directory)."""
    p.add_argument("--work-dir", default=work_dir, help="checkpoint directory (resumed if present)")
    p.add_argument("--fresh", action="store_true", help="ignore an existing checkpoint")
    p.add_argument("--steps", type=count(1), help=f"optimizer steps (default {steps})")
    p.add_argument("--minutes", type=positive, help="time budget; ends the run if reached first")
    p.add_argument("--batch-size", type=count(1), help=f"clips per step (default {batch})")
    p.add_argument("--lr", type=positive, help=f"peak learning rate (default {lr})")
    p.add_argument("--seed", type=int, help="seed of weights, data and noise (default 0)")
    # The cli adds `--threads` to every other command; here its default is the run's config.
    p.add_argument("--threads", type=count(1), help=f"torch threads (default {threads})")


def _given(args: argparse.Namespace, **fields) -> dict:
    """The config fields the command line set: the shared schedule ones and `fields`."""
    shared = {
        "steps": args.steps,
        "max_minutes": args.minutes,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "seed": args.seed,
        "threads": args.threads,
    }
    return {k: v for k, v in {**shared, **fields}.items() if v is not None}


def vqa_config_from(args: argparse.Namespace):
    from streamrt.models.train_vqa_data import TrainVQAConfig

    return TrainVQAConfig(
        **_given(
            args,
            init_from=args.init_from,
            dense_weight=args.dense_weight,
            world_fps=args.world_fps,
            vision_minutes=args.vision_minutes,
            qa_per_kind=args.qa_per_kind,
            vision_extra=args.vision_extra,
        )
    )


def run_vqa(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from streamrt.models import train_vqa, train_vqa_eval

    cfg = vqa_config_from(args)
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


def run_vae(args: argparse.Namespace) -> int:
    from streamrt.models import train_vae

    cfg = train_vae.TrainVAEConfig(
        **_given(
            args,
            kl_weight=args.kl_weight,
            dim_mult=args.dim_mult,
            z_dim=args.z_dim,
            object_weight=args.object_weight,
            init_from=args.init_from,
            decoder_only=args.decoder_only or None,
            latent_noise=args.latent_noise,
        )
    )
    state = train_vae.train(
        cfg, args.work_dir, args.output, resume=not args.fresh, log=console.print
    )
    report = train_vae.reconstruction_report(train_vae.averaged_vae(state))
    console.print(f"wrote {args.output} (checkpoint in {args.work_dir}); held-out: {report}")
    return 0


def config_from(args: argparse.Namespace):
    from streamrt.models.train_gen import TrainGenConfig

    cfg = TrainGenConfig(
        **_given(
            args,
            num_frames=args.frames,
            object_weight=args.object_weight,
            object_weight_final=args.object_weight_final,
            progressive_prob=args.progressive_prob,
            drift_prob=args.drift_prob,
            init_from=args.init_from,
            resample_prob=args.resample_prob,
            resample_sigma=args.resample_sigma,
            edge_weight=args.edge_weight,
            shape_weight=args.shape_weight,
            object_size=args.object_size,
            min_lr_ratio=args.min_lr_ratio,
            sigma_shift=args.sigma_shift,
            vae=args.vae,
            vae_patch=args.vae_patch,
            distill_from=args.distill_from,
            distill_substeps=args.distill_substeps,
            distill_guidance=args.distill_guidance,
            noise_drift=args.noise_drift,
            adversarial_weight=args.adversarial_weight,
            adversarial_max_sigma=args.adversarial_max_sigma,
        )
    )
    cfg.compile = not args.no_compile
    return cfg


def run(args: argparse.Namespace) -> int:
    from streamrt.models import train_gen, train_gen_eval

    if args.what == "vqa":
        return run_vqa(args)
    if args.what == "vae":
        return run_vae(args)
    if not args.tune_only:
        cfg = config_from(args)
        train_gen.train(cfg, args.work_dir, args.output, resume=not args.fresh, log=console.print)
        console.print(f"wrote {args.output} (checkpoint in {args.work_dir})")
    if args.tune or args.tune_only:
        best = train_gen_eval.tune_sampler(args.output, log=console.print)
        console.print(f"best sampler settings, written to {args.output}: {best}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`streamrt train ...` with the CLI's error handling and `--threads`."""
    from streamrt.apps.cli import main as cli_main

    return cli_main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
