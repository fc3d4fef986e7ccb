"""Overlapped decode: the same frames in the same order, no extra chunk, errors surface."""

import dataclasses
import threading

import numpy as np
import pytest
import torch

from conftest import omp_max_threads
from streamrt.config import GenConfig
from streamrt.gen.engine import GenEngine
from streamrt.gen.generator import StreamGenerator
from streamrt.models.generator_files import tiny_random_parts
from streamrt.world import VOCAB

pytestmark = pytest.mark.usefixtures("one_thread_quiet")  # the decode thread must follow

PROMPT = "a red circle moving right on a dark background"
SMALL = {"height": 32, "width": 32, "policy_args": {"sink_blocks": 1, "window_blocks": 16}}


@pytest.fixture(scope="module", params=["pixel", "wan_vae"])
def parts(request):
    return tiny_random_parts(VOCAB, codec=request.param)


def make_gen(parts, **overrides):
    return StreamGenerator(GenEngine(*parts, dataclasses.replace(GenConfig(**SMALL), **overrides)))


def opened_streams(gen):
    """Record the streams `gen` opens (to read their counters after they close)."""
    opened = []
    open_stream = gen.engine.open_stream
    gen.engine.open_stream = lambda *a, **k: opened.append(open_stream(*a, **k)) or opened[-1]
    return opened


class HookedDecoder:
    """A stream's decoder that calls `hook` (in the decoding thread) before each chunk."""

    def __init__(self, codec, hook):
        self.inner = type(codec).decoder(codec)
        self.hook = hook

    def decode(self, latents):
        self.hook()
        return self.inner.decode(latents)


def hook_decoder(gen, hook):
    codec = gen.engine.codec
    codec.decoder = lambda: HookedDecoder(codec, hook)  # instance attribute, undone below


def decode_threads():
    return [t for t in threading.enumerate() if t.name.startswith("streamrt-decode-")]


def per_chunk(codec, chunks: int) -> list[int]:
    return [codec.decoded_frames(3, first=k == 0) for k in range(chunks)]


@pytest.mark.parametrize("sampler", ["chunkwise", "stream_batch"])
def test_overlapped_frames_equal_sequential_in_order(parts, sampler):
    seq = list(make_gen(parts, overlap_decode=False, sampler=sampler).stream(PROMPT, num_frames=40))
    gen = make_gen(parts, overlap_decode=True, sampler=sampler)
    threads, omp = [], []

    def trace():
        threads.append(threading.current_thread().name)
        omp.append(omp_max_threads())

    hook_decoder(gen, trace)
    try:
        ov = list(gen.stream(PROMPT, num_frames=40))
    finally:
        del gen.engine.codec.decoder  # back to the class's method
    assert len(seq) == len(ov) == 40
    for i, (a, b) in enumerate(zip(seq, ov)):
        assert np.array_equal(a, b), f"frame {i} differs"
    # the first chunk is decoded by the caller, every later one by the decode thread
    assert threads[0] == threading.current_thread().name
    assert len(threads) > 2 and all(t.startswith("streamrt-decode-") for t in threads[1:])
    # with the caller's torch threads: OpenMP's count is per OS thread (default: all cores)
    assert set(omp) == {torch.get_num_threads()} or None in omp
    assert not decode_threads()


@pytest.mark.parametrize("overlap", [False, True])
@pytest.mark.parametrize("num_frames", [1, 3, 4, 7, 12])
def test_forwards_are_what_the_returned_frames_need(parts, overlap, num_frames):
    gen = make_gen(parts, overlap_decode=overlap)  # 3 latent frames per chunk
    opened = opened_streams(gen)
    assert len(list(gen.stream(PROMPT, num_frames=num_frames))) == num_frames
    sizes = per_chunk(parts[2], 20)
    chunks = next(k for k in range(1, 21) if sum(sizes[:k]) >= num_frames)
    assert opened[0].stats["frames"] == sum(sizes[:chunks])  # decoded: only chunks shown
    # 4 steps each; each refresh but the last chunk's runs inside the next chunk's first
    # forward (`GenConfig.fold_refresh`), and the last chunk's is never needed
    assert opened[0].stats["forwards"] == 4 * chunks
    gen.engine.cache.check_invariants()


def test_an_error_in_the_decode_thread_surfaces_and_nothing_hangs(parts):
    gen = make_gen(parts, overlap_decode=True)
    calls = []

    def fail_third():
        calls.append(threading.current_thread().name)
        if len(calls) == 3:
            raise RuntimeError("decoder exploded")

    hook_decoder(gen, fail_third)
    got = []
    try:
        with pytest.raises(RuntimeError, match="decoder exploded") as info:
            for frame in gen.stream(PROMPT, num_frames=200):
                got.append(frame)
    finally:
        del gen.engine.codec.decoder
    assert calls[2].startswith("streamrt-decode-")  # it failed in the decode thread
    assert any("decode thread" in note for note in info.value.__notes__)
    assert len(got) == sum(per_chunk(parts[2], 2))  # every frame before the failed chunk
    assert not decode_threads()
    assert gen.active is None
    gen.engine.cache.check_invariants()
    # the generator still works afterwards
    assert len(list(gen.stream(PROMPT, num_frames=5))) == 5


def test_stopping_early_stops_the_decode_thread(parts):
    gen = make_gen(parts, overlap_decode=True)
    frames = gen.stream(PROMPT)  # endless
    for _ in range(15):
        next(frames)
    assert decode_threads()
    frames.close()
    assert not decode_threads()
    gen.engine.cache.check_invariants()
