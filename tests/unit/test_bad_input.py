"""Bad-input corpus: every wrong argument, config, checkpoint or video file gets one clear
line naming what to fix (CLI: `error: ...`, exit 2, nothing written), and a failing
stream never disturbs another one on the same generator."""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
import shutil
import subprocess
import sys

import av
import numpy as np
import pytest
import safetensors.torch
import torch

from streamrt.apps.cli import main
from streamrt.cache import CacheManager, KVSpec
from streamrt.cache.errors import SpecMismatchError
from streamrt.config import CacheConfig, GenConfig
from streamrt.errors import InputError, StreamrtError, UnknownNameError
from streamrt.gen.engine import GenEngine
from streamrt.gen.generator import StreamGenerator
from streamrt.models.generator_files import tiny_random_parts
from streamrt.models.text import PromptError
from streamrt.models.train_schedule import read_checkpoint
from streamrt.models.wan_keys import CheckpointError
from streamrt.threads import default_threads
from streamrt.world import VOCAB

PROMPT = "a red circle moving right on a dark background"
SMALL = {"height": 32, "width": 32, "policy_args": {"sink_blocks": 1, "window_blocks": 16}}
GEN = ["generate", "--model", "tiny-random", "--size", "32x32", "--frames", "3"]
STREAM = ["stream", "--model", "tiny-random", "--size", "32x32", "--prompt", PROMPT]


class Exploit:
    """Unpickling this touches `marker`: a test sees whether pickled code ran."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


# ---------------------------------------------------------------------- files


@pytest.fixture(scope="module")
def parts():
    return tiny_random_parts(VOCAB)


@pytest.fixture(scope="module")
def files(tmp_path_factory, parts):
    """Model directories, checkpoints, configs and videos, good and bad (built once)."""
    root = tmp_path_factory.mktemp("bad-input")
    gen_dir = root / "gen"
    StreamGenerator(GenEngine(*parts, GenConfig(**SMALL))).save_pretrained(gen_dir)
    weights = gen_dir / "transformer" / "diffusion_pytorch_model.safetensors"
    state = safetensors.torch.load_file(weights)
    nan_state = dict(state)
    first = next(iter(nan_state))
    nan_state[first] = torch.full_like(nan_state[first], math.nan)
    safetensors.torch.save_file(nan_state, root / "nan.safetensors")
    shutil.copytree(gen_dir, root / "nan-model")
    safetensors.torch.save_file(
        nan_state, root / "nan-model" / "transformer" / "diffusion_pytorch_model.safetensors"
    )
    (root / "truncated.safetensors").write_bytes(weights.read_bytes()[:1000])
    torch.save({"generator": {"w": Exploit(root / "pwned-gen")}}, root / "crafted.pt")

    for name in ("crafted-train", "truncated-train"):
        (root / name).mkdir()
    torch.save(
        {"config": {}, "step": 0, "x": Exploit(root / "pwned-train")},
        root / "crafted-train" / "checkpoint.pt",
    )
    (root / "truncated-train" / "checkpoint.pt").write_bytes(b"PK\x03\x04" + b"\x00" * 40)

    (root / "empty.mp4").write_bytes(b"")
    (root / "corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"garbage" * 100)
    with av.open(str(root / "audio.wav"), "w") as container:
        stream = container.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16")
        frame.sample_rate = 8000
        for packet in [*stream.encode(frame), *stream.encode()]:
            container.mux(packet)

    configs = {
        "fps0": "gen:\n  fps: 0\n",
        "fpsneg": "gen:\n  fps: -8\n",
        "nan": "gen:\n  guidance_scale: .nan\n",
        "unknown": "gen:\n  frames_per_second: 16\n",
        "wrongtype": "gen:\n  height: big\n",
        "cuda": "gen:\n  device: cuda\n",
        "flash": "gen:\n  attention: flash\n",
        "sampler": "gen:\n  sampler: euler\n",
        "nosteps": "gen:\n  timesteps: []\n",
        "yaml": "gen: [unclosed\n",
        "section": "gen: 5\n",
    }
    for name, text in configs.items():
        (root / f"{name}.yaml").write_text(text)
    return root


def cli(argv: list[str], capsys) -> tuple[int, str]:
    """Run the CLI in-process: (exit code, its single error line)."""
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    return rc, errors[0]


# ---------------------------------------------------------------------- CLI corpus

F = "{files}"  # replaced by the fixture's directory
CLI_CASES = {
    # generate
    "frames 0": ([*GEN, "--prompt", PROMPT, "--frames", "0"], "--frames: must be >= 1, got 0"),
    "frames -5": ([*GEN, "--prompt", PROMPT, "--frames", "-5"], "must be >= 1, got -5"),
    "output .xyz": ([*GEN, "--prompt", PROMPT, "-o", "{out}.xyz"], "ending in .mp4, .mkv"),
    "output .webm": ([*GEN, "--prompt", PROMPT, "-o", "{out}.webm"], "'{out}.webm'"),
    "steps 0": ([*GEN, "--prompt", PROMPT, "--steps", "0"], "--steps: must be >= 1"),
    "steps -2": ([*GEN, "--prompt", PROMPT, "--steps", "-2"], "--steps: must be >= 1"),
    "size abc": ([*GEN, "--prompt", PROMPT, "--size", "abc"], "expected WIDTHxHEIGHT"),
    "size 0x64": ([*GEN, "--prompt", PROMPT, "--size", "0x64"], "width and height must be >= 1"),
    "size -64x64": ([*GEN, "--prompt", PROMPT, "--size=-64x64"], "must be >= 1"),
    "size -64x64 spaced": ([*GEN, "--prompt", PROMPT, "--size", "-64x64"], "as --option=VALUE"),
    "size 30x30": ([*GEN, "--prompt", PROMPT, "--size", "30x30"], "multiple of 8"),
    "empty prompt": ([*GEN, "--prompt", ""], "the prompt is empty"),
    "blank prompt": ([*GEN, "--prompt", "   "], "the prompt is empty"),
    "unknown words": ([*GEN, "--prompt", "a pink elephant"], "outside this model's vocabulary"),
    "no prompt": (GEN, "arguments are required: --prompt"),
    "noise drift nan": ([*GEN, "--prompt", PROMPT, "--noise-drift", "nan"], "finite number"),
    "threads 0": ([*GEN, "--prompt", PROMPT, "--threads", "0"], "--threads: must be >= 1"),
    "threads abc": ([*GEN, "--prompt", PROMPT, "--threads", "x"], "expected a whole number"),
    "policy unknown": ([*GEN, "--prompt", PROMPT, "--policy", "lru"], "unknown cache policy"),
    "policy args": ([*GEN, "--prompt", PROMPT, "--policy-args", "sink"], "expected key=value"),
    # configs
    "config missing": ([*GEN, "--prompt", PROMPT, "--config", F + "/no.yaml"], "does not exist"),
    "config fps 0": ([*GEN, "--prompt", PROMPT, "--config", F + "/fps0.yaml"], "gen.fps must be > 0"),
    "config fps <0": ([*GEN, "--prompt", PROMPT, "--config", F + "/fpsneg.yaml"], "gen.fps must"),
    "config nan": ([*GEN, "--prompt", PROMPT, "--config", F + "/nan.yaml"], "guidance_scale must be a finite"),
    "config unknown key": (["config", "--config", F + "/unknown.yaml"], "unknown key 'gen.frames_per_second'"),
    "config wrong type": (["config", "--config", F + "/wrongtype.yaml"], "'gen.height' must be int"),
    "config sampler": (["config", "--config", F + "/sampler.yaml"], "unknown sampler 'euler'"),
    "config no steps": (["config", "--config", F + "/nosteps.yaml"], "timesteps is empty"),
    "config bad yaml": (["config", "--config", F + "/yaml.yaml"], "not valid YAML"),
    "config section": (["config", "--config", F + "/section.yaml"], "section 'gen.' must be a mapping"),
    "config cuda": ([*GEN, "--prompt", PROMPT, "--config", F + "/cuda.yaml"], "no usable CUDA GPU"),
    "config flash": ([*GEN, "--prompt", PROMPT, "--config", F + "/flash.yaml"], "gen.attention is 'flash'"),
    # models and checkpoints
    "model missing": (["generate", "--prompt", PROMPT, "--model", F + "/none"], "holds no streamrt generator"),
    "checkpoint missing": (["generate", "--prompt", PROMPT, "--model", F + "/gen", "--checkpoint", F + "/no.pt"], "does not exist"),
    "checkpoint truncated": (["generate", "--prompt", PROMPT, "--model", F + "/gen", "--checkpoint", F + "/truncated.safetensors"], "corrupt or truncated"),
    "checkpoint nan": (["generate", "--prompt", PROMPT, "--model", F + "/gen", "--checkpoint", F + "/nan.safetensors"], "NaN or infinity"),
    "checkpoint crafted": (["generate", "--prompt", PROMPT, "--model", F + "/gen", "--checkpoint", F + "/crafted.pt"], "objects other than tensors"),
    "model nan": (["generate", "--prompt", PROMPT, "--model", F + "/nan-model"], "NaN or infinity"),
    "checkpoint tiny": ([*GEN, "--prompt", PROMPT, "--checkpoint", F + "/nan.safetensors"], "pass --model DIR"),
    # stream inputs
    "input missing": ([*STREAM, "--input", F + "/no.mp4", "--output", "{out}.mp4"], "does not exist"),
    "input corrupt": ([*STREAM, "--input", F + "/corrupt.mp4", "--output", "{out}.mp4"], "cannot open input"),
    "input empty": ([*STREAM, "--input", F + "/empty.mp4", "--output", "{out}.mp4"], "is empty (0 bytes)"),
    "input audio only": ([*STREAM, "--input", F + "/audio.wav", "--output", "{out}.mp4"], "has no video stream"),
    "input world url": ([*STREAM, "--input", "world://seed=x", "--output", "{out}.mp4"], "world URL: seed"),
    "stream frames 0": ([*STREAM, "--input", "world://", "--output", "{out}.mp4", "--frames", "0"], "--frames: must be >= 1"),
    "stream output .gif": ([*STREAM, "--input", "world://", "--output", "{out}.gif"], "ending in .mp4"),
    # bench
    "bench cache repeats": (["bench", "cache", "--repeats", "0"], "--repeats: must be >= 1"),
    "bench cache mib": (["bench", "cache", "--block-mib", "big"], "expected a number, got 'big'"),
    "bench cache mib 0": (["bench", "cache", "--block-mib", "0"], "must be > 0"),
    "bench cache dir": (["bench", "cache", "--disk-dir", F + "/none"], "does not exist"),
    "bench cache json": (["bench", "cache", "--json", F + "/none/x.json"], "/none does not exist"),
    "bench quality plot": (["bench", "quality", "--plot", F + "/none/q.png"], "create it first"),
    "bench gen window": (["bench", "gen", "--window", "2"], "--window: must be >= 4"),
    "bench gen chunks": (["bench", "gen", "--chunks", "-1"], "--chunks: must be >= 1"),
    "bench gen long size": (["bench", "gen", "--long-size", "32"], "expected WIDTHxHEIGHT"),
    "bench gen model": (["bench", "gen", "--model", F + "/none", "--chunks", "1"], "holds no streamrt generator"),
    "bench quality prompts": (["bench", "quality", "--prompts", "9"], "<= 4"),
    "bench qa frames": (["bench", "qa", "--max-frames", "0"], "--max-frames: must be >= 1"),
    "bench qa scales": (["bench", "qa", "--needle-scales", "1,x"], "expected a whole number"),
    "bench qa model": (["bench", "qa", "--model", F + "/none", "--trials", "0"], "no Video-LLM"),
    "bench pipeline ranks": (["bench", "pipeline", "--ranks", "0"], "--ranks: must be >= 1"),
    "bench pipeline modes": (
        ["bench", "pipeline", "--modes", "rows"],
        "unknown ['rows']; choose from steps, layers",
    ),
    "bench unknown": (["bench", "speed"], "invalid choice: 'speed'"),
    # ask (its own messages, through the same exit code)
    "ask video missing": (["ask", "--video", F + "/no.mp4", "--model", "tiny-random", "q"], "does not exist"),
    "ask not a video": (["ask", "--video", F + "/fps0.yaml", "--model", "tiny-random", "q"], "as a video"),
    # demo
    "demo port": (["demo", "--port", "0"], "--port: must be >= 1 and <= 65535"),
    "demo model": (["demo", "--model", F + "/none"], "holds no streamrt generator"),
    # train
    "train steps -1": (["train", "gen", "--steps", "-1"], "--steps: must be >= 1, got -1"),
    "train batch 0": (["train", "gen", "--batch-size", "0"], "--batch-size: must be >= 1"),
    "train lr nan": (["train", "gen", "--lr", "nan"], "finite number"),
    "train minutes 0": (["train", "vqa", "--minutes", "0"], "--minutes: must be > 0"),
    "train prob": (["train", "gen", "--progressive-prob", "2"], "must be <= 1.0"),
    "train init dir": (["train", "vqa", "--init-from", F + "/none"], "does not exist"),
    "train eval clips": (["train", "vqa", "--eval-clips", "-1"], "must be >= 0"),
    "train frames": (["train", "gen", "--frames", "abc"], "expected a whole number"),
    "train crafted resume": (["train", "gen", "--no-compile", "--steps", "1", "--work-dir", F + "/crafted-train", "--output", "{out}"], "refused to resume"),
    "train vae kl": (["train", "vae", "--kl-weight", "-1"], "--kl-weight: must be >= 0"),
    "train vae decoder only": (["train", "vae", "--decoder-only", "--work-dir", "{out}"], "pass init_from"),
    "train vae init not a vae": (["train", "vae", "--init-from", F, "--steps", "1", "--work-dir", "{out}", "--output", "{out}"], "not a VAE directory"),
    "train gen vae missing": (["train", "gen", "--vae", F + "/none"], "does not exist"),
    "train gen vae not one": (["train", "gen", "--no-compile", "--steps", "1", "--vae", F, "--work-dir", "{out}", "--output", "{out}"], "corrupt or truncated safetensors"),
    "train vae crafted resume": (["train", "vae", "--steps", "1", "--work-dir", F + "/crafted-train", "--output", "{out}"], "refused to resume"),
    "train truncated resume": (["train", "vqa", "--steps", "1", "--work-dir", F + "/truncated-train", "--output", "{out}"], "corrupt or truncated checkpoint"),
}  # fmt: skip

SKIP = {
    "config cuda": (torch.cuda.is_available(), "this machine has CUDA"),
    "config flash": (torch.cuda.is_available(), "flash-attn may be usable with CUDA"),
}


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_cli_bad_input_is_one_line_exit_2_and_writes_nothing(case, files, tmp_path, capsys):
    if case in SKIP and SKIP[case][0]:
        pytest.skip(SKIP[case][1])
    argv, fragment = CLI_CASES[case]
    out = tmp_path / "out"
    argv = [a.replace(F, str(files)).replace("{out}", str(out)) for a in argv]
    if "-o" not in argv and argv[0] == "generate":
        argv += ["-o", f"{out}.mp4"]
    rc, line = cli(argv, capsys)
    assert rc == 2, line
    assert fragment.replace("{out}", str(out)) in line
    assert list(tmp_path.iterdir()) == []  # no output file (or directory) left behind
    assert not (files / "pwned-gen").exists() and not (files / "pwned-train").exists()


# ---------------------------------------------------------------------- through a process

SUBPROCESS_CASES = {
    "frames 0": ([*GEN, "--prompt", PROMPT, "--frames", "0"], "--frames: must be >= 1"),
    "webm": ([*GEN, "--prompt", PROMPT, "-o", "x.webm"], "ending in .mp4"),
    "audio only": ([*STREAM, "--input", F + "/audio.wav", "--output", "x.mp4"], "no video stream"),
    "crafted resume": (
        ["train", "vqa", "--steps", "1", "--work-dir", F + "/crafted-train"],
        "refused",
    ),
}


@pytest.mark.parametrize("case", list(SUBPROCESS_CASES))
def test_real_process_prints_no_traceback(case, files, tmp_path):
    argv, fragment = SUBPROCESS_CASES[case]
    argv = [a.replace(F, str(files)) for a in argv]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "streamrt.apps.cli", *argv],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ")
    assert fragment in proc.stderr
    assert list(tmp_path.iterdir()) == []
    assert not (files / "pwned-train").exists()


# ---------------------------------------------------------------------- the handler


def test_unexpected_error_is_one_line_exit_1_and_debug_shows_it(monkeypatch, capsys):
    def broken(args):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr("streamrt.apps.generate.run", broken)
    rc, line = cli(["generate", "--prompt", PROMPT], capsys)
    assert rc == 1
    assert line == (
        "error: unexpected ZeroDivisionError: division by zero "
        "(a bug: rerun with --debug for the traceback)"
    )
    with pytest.raises(ZeroDivisionError):
        main(["--debug", "generate", "--prompt", PROMPT])
    with pytest.raises(ZeroDivisionError):  # also accepted after the command
        main(["generate", "--prompt", PROMPT, "--debug"])


def test_interrupt_exits_130_quietly(monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr("streamrt.apps.generate.run", interrupted)
    assert main(["generate", "--prompt", PROMPT]) == 130
    assert capsys.readouterr().err == ""


def test_path_errors_name_the_path(monkeypatch, capsys):
    def denied(args):
        raise PermissionError(13, "Permission denied", "/root/out.mp4")

    monkeypatch.setattr("streamrt.apps.generate.run", denied)
    rc, line = cli(["generate", "--prompt", PROMPT], capsys)
    assert (rc, line) == (2, "error: /root/out.mp4: Permission denied")


# ---------------------------------------------------------------------- threads


def test_default_threads_is_one_and_the_environment_overrides(monkeypatch):
    monkeypatch.delenv("STREAMRT_THREADS", raising=False)
    assert default_threads() == 1
    monkeypatch.setenv("STREAMRT_THREADS", "3")
    assert default_threads() == 3
    monkeypatch.setenv("STREAMRT_THREADS", "0")
    with pytest.raises(InputError, match="STREAMRT_THREADS must be >= 1"):
        default_threads()


def test_threads_option_and_environment_reach_torch(monkeypatch, capsys):
    seen = []
    monkeypatch.setattr(
        "streamrt.apps.generate.run", lambda a: seen.append(torch.get_num_threads())
    )
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("STREAMRT_THREADS", raising=False)
        assert main(["generate", "--prompt", PROMPT, "--threads", "2"]) == 0
        assert main(["generate", "--prompt", PROMPT]) == 0
        monkeypatch.setenv("STREAMRT_THREADS", "2")
        assert main(["generate", "--prompt", PROMPT]) == 0
        assert seen == [2, 1, 2]
        monkeypatch.setenv("STREAMRT_THREADS", "many")
        rc, line = cli(["generate", "--prompt", PROMPT], capsys)
        assert rc == 2 and "STREAMRT_THREADS must be a whole number" in line
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("command", [["ask", "--video", "v.mp4"], ["demo"], ["train", "gen"],
                                     ["train", "vqa"], ["stream", "--input", "i", "--output",
                                     "o.mp4", "--prompt", "p"], ["bench", "cache"],
                                     ["bench", "gen"], ["bench", "quality"], ["bench", "qa"],
                                     ["bench", "pipeline"]])  # fmt: skip
def test_every_model_command_takes_threads(command):
    from streamrt.apps.cli import build_parser

    assert build_parser().parse_args([*command, "--threads", "3"]).threads == 3


# ---------------------------------------------------------------------- Python API


def make_gen(parts, **overrides) -> StreamGenerator:
    return StreamGenerator(GenEngine(*parts, dataclasses.replace(GenConfig(**SMALL), **overrides)))


API_CASES = {
    "GenConfig fps 0": (lambda p: GenConfig(fps=0), InputError, "gen.fps must be > 0"),
    "GenConfig guidance inf": (lambda p: GenConfig(guidance_scale=math.inf), InputError, "finite"),
    "GenConfig timestep 0": (lambda p: GenConfig(timesteps=[0]), InputError, "1..1000"),
    "GenConfig chunk 0": (lambda p: GenConfig(chunk_frames=0), InputError, "chunk_frames must be >= 1"),
    "GenConfig dtype": (lambda p: GenConfig(dtype="float8"), InputError, "unknown dtype 'float8'"),
    "replace height str": (lambda p: dataclasses.replace(GenConfig(), height="64"), InputError, "gen.height must be int"),
    "stream num_frames 0": (lambda p: next(make_gen(p).stream(PROMPT, num_frames=0)), InputError, "num_frames must be"),
    "stream empty prompt": (lambda p: next(make_gen(p).stream("")), PromptError, "the prompt is empty"),
    "stream prompt not str": (lambda p: next(make_gen(p).stream(None)), PromptError, "must be text"),
    "stylize wrong shape": (lambda p: next(make_gen(p).stylize([np.zeros((8, 8, 3), np.uint8)], PROMPT)), InputError, "expected (32, 32, 3)"),
    "set_prompt idle": (lambda p: make_gen(p).set_prompt(PROMPT), InputError, "no active stream"),
    "engine cuda": (lambda p: GenEngine(*p, GenConfig(device="cuda")), InputError, "no usable CUDA"),
    "engine bad device": (lambda p: GenEngine(*p, GenConfig(device="gpu0")), InputError, "not a device"),
    "cache negative budget": (lambda p: CacheManager(device_bytes=-1), InputError, "device_bytes must be >= 0"),
    "cache size text": (lambda p: CacheConfig(host_bytes="lots"), InputError, "write e.g. 4096"),
    "kvspec zero layers": (lambda p: KVSpec(num_layers=0, num_kv_heads=2, head_dim=8, tokens_per_block=4), InputError, "num_layers must be a positive int"),
    "cache unknown consumer": (lambda p: CacheManager(device_bytes=4096).open_sequence("nobody", "full"), UnknownNameError, "register it first"),
    "cache unknown block": (lambda p: _written_block(None), UnknownNameError, "block 99 is not in sequence"),
    "cache wrong block shape": (lambda p: _written_block(torch.zeros(3, 3)), SpecMismatchError, "expected a block of shape"),
    "agent unknown": (lambda p: _agents().close("ghost"), UnknownNameError, "open agents: 'planner'"),
    "agent cold mean 0": (lambda p: _tool_durations(0), InputError, "cold_mean_s must be a positive"),
    "train checkpoint crafted": (lambda p: read_checkpoint(p["files"] / "crafted-train" / "checkpoint.pt"), CheckpointError, "refused to resume"),
    "train checkpoint truncated": (lambda p: read_checkpoint(p["files"] / "truncated-train" / "checkpoint.pt"), CheckpointError, "pass --fresh"),
}  # fmt: skip


def _written_block(kv: torch.Tensor) -> None:
    spec = KVSpec(num_layers=2, num_kv_heads=2, head_dim=8, tokens_per_block=4)
    mgr = CacheManager(device_bytes=spec.block_bytes * 4, host_bytes=spec.block_bytes * 4)
    mgr.register("c", spec)
    seq = mgr.open_sequence("c", "full")
    index = seq.append()
    if kv is None:
        seq.kv(99)
    seq.write(index, kv)


def _agents():
    from streamrt.agents.kv import AgentKV

    spec = KVSpec(num_layers=2, num_kv_heads=2, head_dim=8, tokens_per_block=4)
    mgr = CacheManager(device_bytes=spec.block_bytes * 4, host_bytes=spec.block_bytes * 4)
    mgr.register("agents", spec)
    kv = AgentKV(mgr, "agents")
    kv.open("planner")
    return kv


def _tool_durations(mean: float):
    from streamrt.agents.kv import ToolDurations

    return ToolDurations(cold_mean_s=mean)


@pytest.mark.parametrize("case", list(API_CASES))
def test_python_api_bad_input_raises_a_clear_error(case, parts, files):
    if case == "engine cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    fn, error, fragment = API_CASES[case]
    given = parts if "train checkpoint" not in case else {"files": files}
    with pytest.raises(error) as info:
        fn(given)
    assert isinstance(info.value, StreamrtError)
    assert fragment in str(info.value)
    assert not (files / "pwned-train").exists()


def test_a_failing_stream_leaves_another_on_the_same_generator_undisturbed(parts):
    reference = make_gen(parts, seed=7).engine.open_stream(PROMPT)
    solo = np.concatenate([reference.next_frames() for _ in range(4)])

    gen = make_gen(parts, seed=7)
    a = gen.engine.open_stream(PROMPT)
    b = gen.engine.open_stream("a blue square moving up on a light background", seed=9)
    good = np.zeros((32, 32, 3), np.uint8)
    styled = gen.stylize([good] * 6 + [np.zeros((16, 16, 3), np.uint8)], PROMPT)
    out = []
    for i in range(4):
        out.append(a.next_frames())
        b.next_frames()
        if i == 1:
            with pytest.raises(PromptError, match="the prompt is empty"):
                b.set_prompt("  ")
            with pytest.raises(InputError, match="input frame 6 has shape"):
                list(styled)
            with pytest.raises(PromptError):
                gen.engine.open_stream("a pink elephant")
    assert np.array_equal(np.concatenate(out), solo)
    assert b.prompt == "a blue square moving up on a light background"
    b.next_frames()  # the stream whose prompt was refused keeps going
    gen.engine.cache.check_invariants()
    assert len(gen.engine.sequences()) == 2  # the failed streams gave their blocks back


def test_non_finite_weights_fail_at_the_first_chunk_not_as_a_black_video():
    from streamrt.errors import NonFiniteError

    transformer, text, codec = tiny_random_parts(VOCAB)
    with torch.no_grad():
        transformer.proj_out.weight.fill_(math.nan)
    gen = StreamGenerator(GenEngine(transformer, text, codec, GenConfig(**SMALL)))
    with pytest.raises(NonFiniteError, match="NaN/inf latents in its first chunk"):
        next(gen.stream(PROMPT, num_frames=3))
    assert gen.engine.sequences() == []  # the failed stream was closed


def test_non_finite_vae_weights_fail_at_the_first_frames():
    from streamrt.errors import NonFiniteError

    transformer, text, codec = tiny_random_parts(VOCAB, codec="wan_vae")
    with torch.no_grad():
        for p in codec.vae.decoder.parameters():
            p.fill_(math.nan)
    gen = StreamGenerator(GenEngine(transformer, text, codec, GenConfig(**SMALL)))
    with pytest.raises(NonFiniteError, match=r"codec \(VAE\) decoded NaN/inf pixels"):
        next(gen.stream(PROMPT, num_frames=3))
