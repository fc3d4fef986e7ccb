"""`gen.compile`: the streaming forward compiles whole (no graph breaks), its graphs are all
built while a stream's window fills, none after, and it gives the eager latents."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch._dynamo.utils import counters

from streamrt.config import CacheConfig, GenConfig
from streamrt.errors import InputError
from streamrt.gen.compiled import compiled_model
from streamrt.gen.engine import GenEngine
from streamrt.gen.forward import run_requests
from streamrt.models.generator_files import tiny_random_parts
from streamrt.world import VOCAB

PROMPT = "a red circle moving right on a dark background"
SWITCH = "a green triangle moving left on a striped background"


def _engine(**overrides) -> GenEngine:
    torch.manual_seed(0)
    base = GenConfig(height=32, width=32, policy_args={"sink_blocks": 1, "window_blocks": 6})
    cfg = dataclasses.replace(base, **overrides)
    return GenEngine(*tiny_random_parts(VOCAB), cfg, cache_config=CacheConfig())


def _graphs() -> int:
    return counters["stats"]["unique_graphs"]


def _reset() -> None:
    torch._dynamo.reset()
    counters.clear()


def _latents(engine: GenEngine, chunks: int, switch_at: tuple[int, ...] = (), streams: int = 1):
    """Each chunk's latents of `streams` streams of `engine` (the runtime's way when more
    than one: their forwards batched), and the graphs built after every chunk."""
    torch.manual_seed(1)
    opened = [engine.open_stream(PROMPT) for _ in range(streams)]
    out, graphs = [], []
    for n in range(chunks):
        if n in switch_at:  # to the other prompt, then back
            opened[0].set_prompt(SWITCH if switch_at.index(n) % 2 == 0 else PROMPT)
        if streams == 1:
            out.append(opened[0].next_latents())
        else:
            out.extend(_lockstep(engine, opened))
        graphs.append(_graphs())
    for s in opened:
        s.close()
    return out, graphs


def _lockstep(engine: GenEngine, streams) -> list[torch.Tensor]:
    """One chunk of every stream, each step's requests in one forward (as the runtime
    batches them)."""
    for s in streams:
        s.batched = True
    schedules = [s.chunk_steps() for s in streams]
    requests = [next(steps) for steps in schedules]
    done: list[torch.Tensor | None] = [None] * len(streams)
    while any(d is None for d in done):
        live = [i for i, d in enumerate(done) if d is None]
        outs = run_requests(engine, [requests[i] for i in live])
        for i, v in zip(live, outs):
            try:
                requests[i] = schedules[i].send(v)
            except StopIteration as stop:
                done[i] = stop.value
    return done


CASES = {
    # name: (gen overrides, chunks, prompt switches before these chunks, streams batched);
    # a switch re-caches its stream's K/V alone: the first one meets a new structure when
    # the stream was batched, so each case switches during the warm-up too
    "sink-window, fold": ({}, 40, (), 1),
    "deep sink, rolling": (
        {"policy": "deep_sink", "policy_args": {}, "sampler": "rolling"},
        40,
        (),
        1,
    ),
    "stream batch": (
        {"sampler": "stream_batch", "policy_args": {"sink_blocks": 1, "window_blocks": 12}},
        30,
        (),
        1,
    ),
    "guided, prompt switch": ({"guidance_scale": 3.0}, 40, (5, 20), 1),
    "participative (scores)": ({"policy": "participative", "policy_args": {}}, 30, (), 1),
    "three streams batched": ({}, 30, (), 3),
    # one prompt for all rows, then two (a view of one prompt's K/V, then a concatenation)
    "three streams batched, one switches": ({}, 30, (5, 20), 3),
}


@pytest.mark.parametrize("case", list(CASES))
def test_stream_traces_whole_and_stops_recompiling_once_the_window_is_full(case):
    # Dynamo only (backend "eager"): the same guards and graph breaks as Inductor, without
    # code generation. fullgraph=True turns any graph break into an error.
    overrides, chunks, switch_at, streams = CASES[case]
    _reset()
    eager = _engine(**overrides)
    traced = _engine(**overrides)
    traced.model = compiled_model(traced.transformer, "default", backend="eager")
    want, _ = _latents(eager, chunks, switch_at, streams)
    got, graphs = _latents(traced, chunks, switch_at, streams)
    assert traced.model.fell_back is None
    half = len(graphs) // 2
    # One graph per structurally different forward (one row or several; per-frame or
    # per-token timesteps), not one per window size, kept length or shifted sink.
    assert 1 <= graphs[half] <= 3
    assert graphs[-1] == graphs[half], f"recompiled after the window filled: {graphs}"
    for a, b in zip(want, got):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fold", [True, False])
def test_inductor_compiled_stream_equals_eager(fold):
    _reset()
    eager = _engine(fold_refresh=fold)
    compiled = _engine(fold_refresh=fold, compile="default")
    assert compiled.model is not compiled.transformer
    want, _ = _latents(eager, 14)
    got, graphs = _latents(compiled, 14)
    assert compiled.model.fell_back is None
    assert graphs[-1] == graphs[7]
    for a, b in zip(want, got):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


def test_a_forward_the_compiler_refuses_runs_eager_and_the_stream_goes_on():
    _reset()
    eager = _engine(sampler="rolling", policy="deep_sink", policy_args={})
    traced = _engine(sampler="rolling", policy="deep_sink", policy_args={})
    traced.model = compiled_model(traced.transformer, "default", backend="eager")
    want, _ = _latents(eager, 6)
    with torch._dynamo.config.patch(recompile_limit=1):  # rolling needs 3 graphs
        got, _ = _latents(traced, 6)
    assert "RecompileLimit" in traced.model.fell_back
    for a, b in zip(want, got):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_compile_is_an_engine_setting():
    with pytest.raises(InputError, match="is not traced"):
        _engine(compile="default", attention="flash")
    with pytest.raises(InputError, match=r"gen\.compile: unknown compile 'fast'"):
        _engine(compile="fast")
    engine = _engine()
    assert engine.model is engine.transformer
    with pytest.raises(InputError, match=r"gen\.compile is the engine's"):
        engine.open_stream(PROMPT, compile="default")


def test_cli_compile_option():
    from streamrt.apps.cli import build_parser
    from streamrt.apps.generate import overrides_from

    parser = build_parser()
    args = parser.parse_args(["generate", "--prompt", PROMPT, "--compile"])
    assert overrides_from(args)["compile"] == "default"
    args = parser.parse_args(["generate", "--prompt", PROMPT, "--compile", "max-autotune"])
    assert overrides_from(args)["compile"] == "max-autotune"
    assert "compile" not in overrides_from(parser.parse_args(["generate", "--prompt", PROMPT]))
    assert parser.parse_args(["serve", "--compile"]).compile == "default"
