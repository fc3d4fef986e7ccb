"""A chunk's clean refresh folded into the next chunk's first forward (`GenConfig.fold_refresh`)
gives the latents of the separate refresh, with one forward fewer per chunk."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from streamrt.config import CacheConfig, GenConfig
from streamrt.gen.engine import GenEngine
from streamrt.models.generator_files import tiny_random_parts
from streamrt.world import VOCAB

PROMPT = "a red circle moving right on a dark background"
SWITCH = "a green triangle moving left on a striped background"
CHUNKS = 7

CASES = {
    # name: (gen overrides, forwards saved: CHUNKS - 1 where every refresh folds; 1 where
    # the window is one chunk, so the refresh runs alone (the ring evicts the refreshed
    # chunk's own blocks) and only the last chunk's is saved; 0 for policies that act on
    # writes or evictions)
    "sink-window": ({"policy_args": {"sink_blocks": 1, "window_blocks": 6}}, CHUNKS - 1),
    "absolute-positions": (
        {"policy_args": {"sink_blocks": 1, "window_blocks": 6, "positions": "absolute"}},
        CHUNKS - 1,
    ),
    "guided": ({"guidance_scale": 3.0, "policy_args": {"window_blocks": 6}}, CHUNKS - 1),
    "rcfg": (
        {"guidance_scale": 2.0, "rcfg": True, "policy_args": {"window_blocks": 6}},
        CHUNKS - 1,
    ),
    "deep-sink": ({"policy": "deep_sink", "policy_args": {}}, CHUNKS - 1),
    "full": ({"policy": "full", "policy_args": {}}, CHUNKS - 1),
    "one-chunk-window": ({"policy_args": {"sink_blocks": 0, "window_blocks": 3}}, 1),
    "ema-sink": ({"policy": "ema_sink", "policy_args": {"window_blocks": 6}}, 0),
    # a device budget of exactly the window: once it is full, no free pages for the next
    # chunk's blocks while the refresh still reads the ones they replace, so it runs alone
    # (chunk 1's still folds: 3 of 7 pages in use; and the last chunk's is saved)
    "no-spare-pages": ({"policy_args": {"sink_blocks": 1, "window_blocks": 6}, "pages": 7}, 2),
    "participative": ({"policy": "participative", "policy_args": {}}, 0),
}


def _run(overrides: dict, fold: bool) -> tuple[list[torch.Tensor], int]:
    torch.manual_seed(0)
    overrides = dict(overrides)
    pages = overrides.pop("pages", None)
    base = GenConfig(height=32, width=32, sampler="chunkwise", fold_refresh=fold)
    cfg = dataclasses.replace(base, **overrides)
    budget = None
    if pages is not None:
        probe = GenEngine(*tiny_random_parts(VOCAB), cfg, cache_config=CacheConfig())
        probe.register_consumer(cfg)
        block = probe.cache.consumers[probe.consumer].spec.block_bytes
        budget = CacheConfig(device_bytes=pages * block)
        torch.manual_seed(0)
    e = GenEngine(*tiny_random_parts(VOCAB), cfg, cache_config=budget)
    s = e.open_stream(PROMPT, e.config, seed=3)
    out = []
    for c in range(CHUNKS):
        if c == 4:
            s.set_prompt(SWITCH)  # with a refresh still deferred
        out.append(s.next_latents())
    forwards = s.stats["forwards"]
    s.close()
    e.cache.check_invariants()
    return out, forwards


@pytest.mark.parametrize("case", list(CASES))
def test_folded_refresh_equals_the_separate_one(case):
    overrides, saved = CASES[case]
    folded, n_folded = _run(overrides, True)
    separate, n_separate = _run(overrides, False)
    for c, (a, b) in enumerate(zip(folded, separate)):
        assert b.abs().max() > 0.1
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5, msg=f"{case}: chunk {c}")
    # Folded, a chunk's refresh is no forward of its own, and the last chunk's is never
    # computed; the one deferred at the prompt switch runs alone there.
    assert n_folded == n_separate - saved
