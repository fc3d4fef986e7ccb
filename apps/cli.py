"""`streamrt` command line: generate, bench, config.

Sub-commands are added as their subsystems land; each prints what it does and fails
with a message that says what to fix.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from rich.console import Console

console = Console(stderr=True, soft_wrap=True)


def _cmd_generate(args: argparse.Namespace) -> int:
    from streamrt.apps.generate import run

    return run(args)


def _cmd_stream(args: argparse.Namespace) -> int:
    from streamrt.apps.stream import run

    return run(args)


def _cmd_train(args: argparse.Namespace) -> int:
    from streamrt.apps.train import run

    return run(args)


def _cmd_ask(args: argparse.Namespace) -> int:
    from streamrt.apps.ask import run

    return run(args)


def _cmd_demo(args: argparse.Namespace) -> int:
    from streamrt.apps.demo import run

    return run(args)


def _cmd_bench(args: argparse.Namespace) -> int:
    from streamrt.apps.bench import run_bench

    return run_bench(args)


def _cmd_config(args: argparse.Namespace) -> int:
    import dataclasses

    import yaml

    from streamrt.config import ConfigError, load_config

    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        console.print(f"[red]{exc}[/]")
        return 2
    print(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from streamrt import __version__

    parser = argparse.ArgumentParser(prog="streamrt", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"streamrt {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    from streamrt.apps.generate import add_arguments

    gen = sub.add_parser("generate", help="generate a video from a prompt")
    add_arguments(gen)
    gen.set_defaults(func=_cmd_generate)

    from streamrt.apps.stream import add_arguments as stream_arguments

    st = sub.add_parser(
        "stream", help="live video-to-video: file/rtmp/webcam/world:// in, mp4/rtmp out"
    )
    stream_arguments(st)
    st.set_defaults(func=_cmd_stream)

    from streamrt.apps.train import add_arguments as train_arguments

    tr = sub.add_parser("train", help="train the embedded tiny models (train gen, train vqa)")
    train_arguments(tr)
    tr.set_defaults(func=_cmd_train)

    from streamrt.apps.ask import add_arguments as ask_arguments

    ask = sub.add_parser("ask", help="ask questions about a video file (streaming video QA memory)")
    ask_arguments(ask)
    ask.set_defaults(func=_cmd_ask)

    bench = sub.add_parser("bench", help="measure speed against a baseline in the same run")
    bench_sub = bench.add_subparsers(dest="suite", required=True)
    cache = bench_sub.add_parser("cache", help="block allocation and tier-move throughput")
    cache.add_argument("--json", metavar="PATH", help="also write the numbers to PATH")
    cache.add_argument("--repeats", type=int, default=5, help="best of N (default 5)")
    cache.add_argument(
        "--block-mib", type=float, default=2.0, help="block size for move benchmarks"
    )
    cache.add_argument("--blocks", type=int, default=32, help="blocks moved per measurement")
    cache.add_argument(
        "--ops", type=int, default=100_000, help="allocate+free pairs per measurement"
    )
    cache.add_argument("--disk-dir", help="directory for the disk tier (default: a temp dir)")
    gen_b = bench_sub.add_parser(
        "gen", help="streaming generation FPS vs recompute / batch / long streams"
    )
    gen_b.add_argument("--model", default="tiny-random", help="generator directory or tiny-random")
    gen_b.add_argument("--config", help="YAML preset")
    gen_b.add_argument("--window", type=int, default=15, help="kept frames incl. 3 sink frames")
    gen_b.add_argument("--chunks", type=int, default=10, help="chunks timed per measurement")
    gen_b.add_argument(
        "--long-frames", type=int, default=20_000, help="frame index of the late measurement"
    )
    gen_b.add_argument(
        "--long-size", default="32x32", help="frame size of the long-stream measurement"
    )
    gen_b.add_argument(
        "--threads", type=int, help="torch threads (1 is steadier on a shared machine)"
    )
    gen_b.add_argument("--json", metavar="PATH")
    q = bench_sub.add_parser(
        "quality", help="long rollouts per cache policy: adherence, dynamics, drift, copying"
    )
    q.add_argument("--model", default="assets/tiny-world")
    q.add_argument("--config", help="YAML preset")
    q.add_argument("--window", type=int, default=12, help="cache budget in latent frames")
    q.add_argument("--clip-frames", type=int, default=24, help="training clip length (1x)")
    q.add_argument("--prompts", type=int, default=4, help="how many of the fixed prompts")
    q.add_argument(
        "--plot", default="bench-quality.png", help="PNG of the metrics over time ('' for none)"
    )
    q.add_argument("--json", metavar="PATH")
    qa_b = bench_sub.add_parser(
        "qa", help="video QA memory: encode FPS, answer latency vs re-prefill, needle accuracy"
    )
    qa_b.add_argument("--model", default="tiny-random", help="Video-LLM directory or tiny-random")
    qa_b.add_argument(
        "--max-frames", type=int, default=3600, help="stream length at 1 fps (default 1 h)"
    )
    qa_b.add_argument("--window", type=int, default=8, help="frames in the local window")
    qa_b.add_argument("--retrieve", type=int, help="frames retrieved per layer (default: window)")
    qa_b.add_argument("--max-new-tokens", type=int, default=8, help="answer length in tokens")
    qa_b.add_argument("--repeats", type=int, default=3, help="best of N (default 3)")
    qa_b.add_argument(
        "--baseline-max-frames",
        type=int,
        default=3600,
        help="measure re-prefill up to this many frames, extrapolate beyond",
    )
    qa_b.add_argument("--trials", type=int, default=20, help="needle trials per scale (0: none)")
    qa_b.add_argument(
        "--needle-scales",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[1, 10, 100],
        help="needle stream lengths in windows (default 1,10,100)",
    )
    qa_b.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    qa_b.add_argument("--json", metavar="PATH")
    pipe = bench_sub.add_parser(
        "pipeline", help="row-parallel generation on N local ranks vs one process"
    )
    pipe.add_argument("--model", default="assets/tiny-world", help="generator dir or tiny-random")
    pipe.add_argument("--ranks", type=int, default=2, help="local gloo processes (default 2)")
    pipe.add_argument("--size", default="64x64", help="frame size WIDTHxHEIGHT")
    pipe.add_argument("--steps", type=int, help="denoising steps (default: the model's)")
    pipe.add_argument("--warmup", type=int, default=4, help="chunks before timing")
    pipe.add_argument("--chunks", type=int, default=10, help="chunks timed")
    pipe.add_argument(
        "--samplers",
        type=lambda s: s.split(","),
        default=["stream_batch", "chunkwise"],
        help="comma-separated (default stream_batch,chunkwise)",
    )
    pipe.add_argument("--json", metavar="PATH")
    bench.set_defaults(func=_cmd_bench)

    from streamrt.apps.demo import add_arguments as demo_arguments

    demo = sub.add_parser("demo", help="the Gradio live demo: generate, stylize webcam, ask")
    demo_arguments(demo)
    demo.set_defaults(func=_cmd_demo)

    config = sub.add_parser("config", help="print the effective configuration (defaults + preset)")
    config.add_argument("--config", help="YAML preset from configs/")
    config.set_defaults(func=_cmd_config)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
