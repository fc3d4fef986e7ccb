"""`streamrt` command line: generate, stream, ask, train, bench, demo, serve, config.

Every error the user can fix (a `StreamrtError`, or a missing/unreadable path) is printed
by `main` as one line, `error: <what to fix>`, exit code 2; anything else is a bug: one
`error: unexpected ...` line, exit code 1, and `--debug` shows its traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from streamrt.apps.arguments import (
    Parser,
    add_compile_argument,
    add_rebalance_argument,
    count,
    existing_dir,
    new_file,
    number,
    positive,
    size,
)
from streamrt.config import COMPILE_MODES
from streamrt.errors import StreamrtError
from streamrt.threads import ENV as THREADS_ENV
from streamrt.threads import default_threads

THREADS_DEFAULT_HELP = f"1, or ${THREADS_ENV}"
SAMPLERS = ("chunkwise", "rolling", "stream_batch")


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


def _cmd_serve(args: argparse.Namespace) -> int:
    from streamrt.apps.serve import run

    return run(args)


def _cmd_bench(args: argparse.Namespace) -> int:
    from streamrt.apps.bench import run_bench

    return run_bench(args)


def _cmd_config(args: argparse.Namespace) -> int:
    import dataclasses

    import yaml

    from streamrt.config import load_config

    cfg = load_config(args.config)
    print(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from streamrt import __version__

    parser = Parser(prog="streamrt", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"streamrt {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of any error")
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
    cache.add_argument(
        "--json", type=new_file, metavar="PATH", help="also write the numbers to PATH"
    )
    cache.add_argument("--repeats", type=count(1), default=5, help="best of N (default 5)")
    cache.add_argument(
        "--block-mib", type=positive, default=2.0, help="block size for move benchmarks"
    )
    cache.add_argument("--blocks", type=count(1), default=32, help="blocks moved per measurement")
    cache.add_argument(
        "--ops", type=count(1), default=100_000, help="allocate+free pairs per measurement"
    )
    cache.add_argument(
        "--disk-dir", type=existing_dir, help="directory for the disk tier (default: a temp dir)"
    )
    gen_b = bench_sub.add_parser(
        "gen", help="streaming generation FPS vs recompute / batch / long streams"
    )
    gen_b.add_argument("--model", default="tiny-random", help="generator directory or tiny-random")
    gen_b.add_argument("--config", help="YAML preset")
    gen_b.add_argument(
        "--window", type=count(4), default=15, help="kept frames incl. 3 sink frames"
    )
    gen_b.add_argument("--chunks", type=count(1), default=10, help="chunks timed per measurement")
    gen_b.add_argument(
        "--long-frames", type=count(1), default=20_000, help="frame index of the late measurement"
    )
    gen_b.add_argument(
        "--long-size", type=size, default="32x32", help="frame size of the long-stream measurement"
    )
    gen_b.add_argument("--json", type=new_file, metavar="PATH")
    q = bench_sub.add_parser(
        "quality",
        help="long rollouts per cache policy: adherence, dynamics, drift, copying, shape",
    )
    q.add_argument("--model", default="assets/tiny-world")
    q.add_argument("--config", help="YAML preset")
    q.add_argument("--window", type=count(4), default=12, help="cache budget in latent frames")
    q.add_argument("--clip-frames", type=count(1), default=24, help="training clip length (1x)")
    q.add_argument(
        "--prompts", type=count(1, 4), default=4, help="how many of the fixed prompts (1-4)"
    )
    q.add_argument(
        "--plot",
        type=new_file,
        default="bench-quality.png",
        help="PNG of the metrics over time ('' for none)",
    )
    q.add_argument(
        "--sheet",
        type=new_file,
        default="bench-quality-sheet.png",
        help="contact sheet PNG of the 10x rollouts ('' for none)",
    )
    q.add_argument(
        "--sheet-scale", type=count(1, 8), default=2, help="contact sheet enlargement (1-8)"
    )
    q.add_argument(
        "--qa-model", help="Video-LLM directory for the needle table (default: embedded)"
    )
    q.add_argument(
        "--needle-clips",
        type=count(0),
        default=16,
        help="clips of the QA needle table at 100x the window (0: none)",
    )
    q.add_argument("--json", type=new_file, metavar="PATH")
    qa_b = bench_sub.add_parser(
        "qa", help="video QA memory: encode FPS, answer latency vs re-prefill, needle accuracy"
    )
    qa_b.add_argument("--model", default="tiny-random", help="Video-LLM directory or tiny-random")
    qa_b.add_argument(
        "--max-frames", type=count(1), default=3600, help="stream length at 1 fps (default 1 h)"
    )
    qa_b.add_argument("--window", type=count(1), default=8, help="frames in the local window")
    qa_b.add_argument(
        "--retrieve", type=count(1), help="frames retrieved per layer (default: window)"
    )
    qa_b.add_argument("--max-new-tokens", type=count(1), default=8, help="answer length in tokens")
    qa_b.add_argument("--repeats", type=count(1), default=3, help="best of N (default 3)")
    qa_b.add_argument(
        "--baseline-max-frames",
        type=count(1),
        default=3600,
        help="measure re-prefill up to this many frames, extrapolate beyond",
    )
    qa_b.add_argument(
        "--trials", type=count(0), default=20, help="needle trials per scale (0: none)"
    )
    qa_b.add_argument(
        "--needle-scales",
        type=count_list,
        default=[1, 10, 100],
        help="needle stream lengths in windows (default 1,10,100)",
    )
    qa_b.add_argument("--json", type=new_file, metavar="PATH")
    pipe = bench_sub.add_parser(
        "pipeline", help="step and layer pipelines on 1, 2, 3 local processes"
    )
    pipe.add_argument("--model", default="assets/tiny-world", help="generator dir or tiny-random")
    pipe.add_argument(
        "--ranks", type=count_list, default=[1, 2, 3], help="processes per run (default 1,2,3)"
    )
    pipe.add_argument(
        "--modes",
        type=choice_list("steps", "layers", "rebalance"),
        default=["steps", "layers"],
        help="comma-separated (default steps,layers); rebalance: the layer pipeline with "
        "its last rank --slowdown x slower, static ranges vs live re-balancing",
    )
    pipe.add_argument(
        "--slowdown",
        type=number(1.0),
        default=2.0,
        help="rebalance: how many times slower the last rank's blocks run (default 2)",
    )
    pipe.add_argument(
        "--rebalance-every",
        type=count(1),
        default=2,
        metavar="ROUNDS",
        help="rebalance: rounds between re-plans (default 2)",
    )
    pipe.add_argument("--size", type=size, default="64x64", help="frame size WIDTHxHEIGHT")
    pipe.add_argument("--steps", type=count(1), help="denoising steps (default: the model's)")
    pipe.add_argument("--warmup", type=count(1), default=4, help="chunks before timing")
    pipe.add_argument("--chunks", type=count(1), default=16, help="chunks timed")
    pipe.add_argument(
        "--microbatches",
        type=count(1),
        help="layers: units per forward (default: enough to fill the ranks)",
    )
    pipe.add_argument(
        "--streams",
        type=count(1),
        default=2,
        help="layers: stream-batch streams in the pipeline at once (default 2)",
    )
    pipe.add_argument("--json", type=new_file, metavar="PATH")
    comp = bench_sub.add_parser(
        "compile", help="a compiled stream (gen.compile) against an eager one, interleaved"
    )
    comp.add_argument(
        "--model", default="assets/tiny-world", help="generator directory or tiny-random"
    )
    comp.add_argument("--config", help="YAML preset")
    comp.add_argument(
        "--mode",
        choices=COMPILE_MODES[1:],
        default="default",
        help="torch.compile mode (default: default)",
    )
    comp.add_argument(
        "--warmup", type=count(1), default=12, help="chunks before timing (default 12)"
    )
    comp.add_argument(
        "--chunks", type=count(1), default=1000, help="chunks timed per stream (default 1000)"
    )
    comp.add_argument("--json", type=new_file, metavar="PATH")
    peers = bench_sub.add_parser(
        "peers",
        help="streamrt vs diffusers' WanPipeline and SkyReels-V2 diffusion forcing, same weights",
    )
    peers.add_argument(
        "--lengths",
        type=count_list,
        default=[97, 257, 1017],
        help="video lengths in frames (default 97,257,1017)",
    )
    peers.add_argument(
        "--thread-counts",
        type=count_list,
        default=[1, 2],
        help="torch threads per run (default 1,2)",
    )
    peers.add_argument(
        "--repeats", type=count(1), default=1, help="runs per method and length (best kept)"
    )
    peers.add_argument(
        "--compile",
        nargs="?",
        const="default",
        default="off",
        choices=COMPILE_MODES,
        help="streamrt's forward through torch.compile (gen.compile; graphs built in each "
        "run's warm-up)",
    )
    peers.add_argument(
        "--model",
        default="assets/tiny-world",
        help="generator directory whose forwards are also set against the matmul peak",
    )
    peers.add_argument("--json", type=new_file, metavar="PATH")
    serve_b = bench_sub.add_parser(
        "serve", help="many streams on one runtime: batching, deadline scheduler vs FCFS"
    )
    serve_b.add_argument(
        "--model", default="assets/tiny-world", help="generator dir or tiny-random"
    )
    serve_b.add_argument("--config", help="YAML preset")
    serve_b.add_argument(
        "--streams", type=count_list, default=[1, 2, 4, 8], help="concurrent streams (1,2,4,8)"
    )
    serve_b.add_argument("--frames", type=count(3), default=48, help="frames per stream (48)")
    serve_b.add_argument("--size", type=size, default="64x64", help="frame size WIDTHxHEIGHT")
    serve_b.add_argument("--fps", type=positive, default=16.0, help="playout fps of the trace")
    serve_b.add_argument(
        "--seconds", type=positive, default=12.0, help="length of the arrival trace (12)"
    )
    serve_b.add_argument(
        "--overload", type=positive, default=2.5, help="first burst / what the machine carries"
    )
    serve_b.add_argument(
        "--trace", metavar="PATH", help="arrival trace JSON: replayed if it exists, else written"
    )
    serve_b.add_argument(
        "--plot",
        type=new_file,
        default="bench-serve.png",
        help="PNG of every stream's slack over time ('' for none)",
    )
    serve_b.add_argument("--json", type=new_file, metavar="PATH")
    agents_b = bench_sub.add_parser(
        "agents", help="agent programs under the KV policies: real tiny-LM run + GPU simulation"
    )
    agents_b.add_argument("--model", default=None, help="causal LM directory (default tiny-vqa)")
    agents_b.add_argument(
        "--workload",
        choices=("tool-heavy", "fast-tools", "multi-agent"),
        default="tool-heavy",
        help="trace shape (multi-agent: teams of a lead and 3 workers, a DAG)",
    )
    agents_b.add_argument("--programs", type=count(1), default=24, help="real run programs (24)")
    agents_b.add_argument(
        "--sim-programs", type=count(0), default=300, help="simulated programs (300; 0: none)"
    )
    agents_b.add_argument("--seed", type=count(0), default=0, help="trace seed")
    agents_b.add_argument(
        "--policies",
        type=policy_list,
        default=["baseline", "ttl", "offload"],
        help="comma-separated",
    )
    agents_b.add_argument(
        "--token-scale", type=positive, default=1 / 16, help="real run: token counts x this"
    )
    agents_b.add_argument(
        "--time-scale",
        type=positive,
        default=0.02,
        help="real run: tool durations, arrivals x this",
    )
    agents_b.add_argument(
        "--max-context", type=count(16), default=1024, help="real run: context tokens at most"
    )
    agents_b.add_argument(
        "--kv-blocks",
        type=count(8),
        default=96,
        help="real run: device KV blocks (96 hold 18%% of the trace's KV, as the simulated "
        "48 GiB hold 21%% of its 300 programs': memory-bound; 384 hold 70%%: not)",
    )
    agents_b.add_argument("--tokens-per-block", type=count(1), default=16)
    agents_b.add_argument("--max-batch", type=count(1), default=8, help="real run: running calls")
    agents_b.add_argument("--step-tokens", type=count(1), default=256, help="real run: per forward")
    agents_b.add_argument(
        "--limit-s", type=positive, default=300.0, help="real run: stop a policy's replay after"
    )
    agents_b.add_argument("--sim-kv-gib", type=positive, default=48.0, help="simulated device KV")
    agents_b.add_argument(
        "--sim-link", choices=("pcie5", "pcie4", "nvlink-c2c"), default="pcie5", help="host link"
    )
    agents_b.add_argument("--sim-max-batch", type=count(1), default=128)
    agents_b.add_argument(
        "--trace", metavar="PATH", help="traces JSON: replayed if it exists, else written"
    )
    agents_b.add_argument(
        "--plot", type=new_file, default="bench-agents.png", help="PNG of JCT CDFs ('' for none)"
    )
    agents_b.add_argument(
        "--shared-runtime",
        action="store_true",
        help="also run the real trace on Runtime(agents=True) beside 2 live generation streams",
    )
    agents_b.add_argument(
        "--stream-model", default="assets/tiny-world", help="for --shared-runtime"
    )
    agents_b.add_argument("--stream-fps", type=positive, default=8.0, help="for --shared-runtime")
    agents_b.add_argument("--json", type=new_file, metavar="PATH")
    bench.set_defaults(func=_cmd_bench)

    from streamrt.apps.demo import add_arguments as demo_arguments

    demo = sub.add_parser("demo", help="the Gradio live demo: generate, stylize webcam, ask")
    demo_arguments(demo)
    demo.set_defaults(func=_cmd_demo)

    # here, not in apps/serve.py: building the parser does not import FastAPI
    serve = sub.add_parser("serve", help="the runtime over HTTP: streams, MJPEG, QA, v2v socket")
    serve.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0: all)")
    serve.add_argument("--port", type=count(1, 65535), default=8000)
    serve.add_argument("--model", default="assets/tiny-world", help="generator dir or tiny-random")
    serve.add_argument("--qa-model", help="Video-LLM directory (default: assets/tiny-vqa)")
    serve.add_argument("--config", help="YAML preset (its gen:, cache: and runtime: sections)")
    serve.add_argument(
        "--agents",
        nargs="?",
        const=True,
        help="serve LLM agents (/v1/chat/completions): the embedded LM, or a causal-LM dir",
    )
    serve.add_argument(
        "--agent-policy",
        choices=[f"{p}{r}" for p in ("baseline", "ttl", "offload") for r in ("", "+reserve")],
        default="baseline",
        help="--agents: KV policy across tool calls; +reserve adds TokenCake's device "
        "reserve for critical agents",
    )
    serve.add_argument(
        "--parallel",
        choices=["layers"],
        help="under torchrun: streams on a layer pipeline (block ranges per rank); rank 0 "
        "serves HTTP, QA sessions and agents. Live video-to-video answers 501 there",
    )
    add_rebalance_argument(serve)
    add_compile_argument(serve)
    serve.set_defaults(func=_cmd_serve)

    config = sub.add_parser("config", help="print the effective configuration (defaults + preset)")
    config.add_argument("--config", help="YAML preset from configs/")
    config.set_defaults(func=_cmd_config)
    add_common_arguments(parser)
    return parser


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """`--threads` on every command that runs a model, `--debug` after any command too."""
    for name, command in _leaf_commands(parser):
        command.add_argument(
            "--debug",
            action="store_true",
            default=argparse.SUPPRESS,
            help="show the full traceback of any error",
        )
        if name != "config" and "--threads" not in command._option_string_actions:
            command.add_argument(
                "--threads",
                type=count(1),
                help=f"torch threads (default {THREADS_DEFAULT_HELP})",
            )


def _leaf_commands(parser: argparse.ArgumentParser):
    """(name, parser) of every command without sub-commands of its own."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    for action in subs:
        for name, child in action.choices.items():
            if any(isinstance(a, argparse._SubParsersAction) for a in child._actions):
                yield from _leaf_commands(child)
            else:
                yield name, child


def count_list(text: str) -> list[int]:
    """Type of a comma-separated list of whole numbers >= 1."""
    return [count(1)(x) for x in text.split(",")]


def sampler_list(text: str) -> list[str]:
    """Type of a comma-separated list of sampler names."""
    names = [x.strip() for x in text.split(",")]
    if bad := [n for n in names if n not in SAMPLERS]:
        raise argparse.ArgumentTypeError(f"unknown sampler(s) {bad}; choose from {SAMPLERS}")
    return names


def choice_list(*choices: str):
    """Type of a comma-separated list of names from `choices`."""

    def parse(text: str) -> list[str]:
        names = [x.strip() for x in text.split(",")]
        if bad := [n for n in names if n not in choices]:
            raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {', '.join(choices)}")
        return names

    return parse


def policy_list(text: str) -> list[str]:
    """Type of a comma-separated list of agent KV policies."""
    names = [x.strip() for x in text.split(",")]
    known = ("baseline", "ttl", "offload")
    if bad := [n for n in names if n.removesuffix("+reserve") not in known]:
        raise argparse.ArgumentTypeError(
            f"unknown policy(s) {bad}; choose from baseline, ttl, offload, each optionally "
            "with +reserve (TokenCake's device reserve for critical agents)"
        )
    return names


USER_ERRORS = (
    StreamrtError,
    FileNotFoundError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
)
"""What the user can fix (the message says how, or names the path): one line, exit 2."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run a command. Exit codes: 0 done, 2 the input needs fixing, 1 a bug, 130 interrupted."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--debug" in argv:  # before parsing, so argument errors show their traceback too
        return _run(argv)
    try:
        return _run(argv)
    except KeyboardInterrupt:
        return 130
    except USER_ERRORS as exc:
        _say(_message(exc))
        return 2
    except Exception as exc:
        text = _message(exc)
        text = text if len(text) <= 300 else text[:297] + "..."
        _say(
            f"unexpected {type(exc).__name__}: {text} (a bug: rerun with --debug for the traceback)"
        )
        return 1


def _run(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "config":
        return int(args.func(args) or 0)
    import torch

    before = torch.get_num_threads()  # restored: in-process callers keep their setting
    torch.set_num_threads(args.threads or default_threads())
    try:
        return int(args.func(args) or 0)
    finally:
        torch.set_num_threads(before)


def _message(exc: BaseException) -> str:
    """The error as one line (an OSError as `path: reason`)."""
    if isinstance(exc, OSError) and exc.filename and exc.strerror:
        text = f"{exc.filename}: {exc.strerror}"
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def _say(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
