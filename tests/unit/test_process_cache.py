"""The process's cache manager: generators, QA sessions and agent engines opened without a
manager share one (`streamrt.cache.process`), and what a dropped owner held comes back."""

from __future__ import annotations

import gc
import logging

import pytest
import torch

from streamrt.agents.engine import AgentEngine
from streamrt.cache import BudgetError, CacheManager, KVSpec, process
from streamrt.config import CacheConfig
from streamrt.gen import StreamGenerator
from streamrt.qa.video_qa import VideoQA

PROMPT = "a red circle moving right on a dark background"


@pytest.fixture(autouse=True)
def fresh_process_cache(monkeypatch):
    """Each test starts with no process manager (others in this pytest process have one)."""
    monkeypatch.setattr(process, "_managers", {})
    monkeypatch.setattr(process, "_warned", set())
    monkeypatch.setattr(process, "_config", CacheConfig())


def spec(tokens: int) -> KVSpec:
    return KVSpec(num_layers=1, num_kv_heads=1, head_dim=8, tokens_per_block=tokens)


def test_generators_qa_and_agents_without_a_manager_share_the_process_one():
    gen = StreamGenerator.from_pretrained("assets/tiny-world")
    other = StreamGenerator.from_pretrained("assets/tiny-world", policy="deep_sink")
    frames = list(gen.stream(PROMPT, 6))
    qa = VideoQA.from_pretrained()
    qa.feed(frames[0])
    agents = AgentEngine.from_pretrained()
    agents.generate(["what color was the circle ?"], max_tokens=2)
    shared = process.process_cache("cpu")
    assert gen.engine.cache is other.engine.cache is qa.manager is agents.manager is shared
    it = other.stream(PROMPT, 30)
    next(it)
    stats = shared.stats()["consumers"]
    # each generator and agent engine is a consumer of its own; QA sessions share theirs
    assert {gen.engine.consumer, other.engine.consumer} == {"gen", "gen-2"}
    assert stats[other.engine.consumer]["device"]["blocks"] > 0
    assert stats[gen.engine.consumer]["device"]["blocks"] == 0  # its stream ended: freed
    assert stats["qa"]["device"]["blocks"] > 0
    second = VideoQA.from_pretrained()
    assert second.manager is shared and second.memory.seq.consumer.name == "qa"
    assert second.memory.seq.seq_id != qa.memory.seq.seq_id
    shared.check_invariants()
    it.close()


def test_budgets_of_its_own_or_a_runtimes_manager_are_not_shared(tmp_path):
    own = StreamGenerator.from_pretrained("assets/tiny-world", cache=CacheConfig("64MiB"))
    assert own.engine.cache.budgets["device"] == 64 * 2**20
    assert not process.is_process_cache(own.engine.cache)
    persistent = VideoQA.from_pretrained(None, tmp_path / "mem")
    small = VideoQA.from_pretrained(device_bytes="32MiB")
    for qa in (persistent, small):
        assert not process.is_process_cache(qa.manager)
    assert small.manager.budgets["device"] == 32 * 2**20


def test_what_a_dropped_stream_or_model_held_comes_back_at_the_next_open():
    gen = StreamGenerator.from_pretrained("assets/tiny-world")
    shared = gen.engine.cache
    stream = gen.engine.open_stream(PROMPT)
    stream.next_latents()
    held = shared.stats()["tiers"]["device"]["used_blocks"]
    assert held > 0
    del stream
    gc.collect()
    again = gen.engine.open_stream(PROMPT)  # the dropped stream's blocks are freed first
    assert shared.stats()["tiers"]["device"]["used_blocks"] == 0
    assert len([k for k in shared.sequences if k[0] == gen.engine.consumer]) == 1
    again.close()
    extra = StreamGenerator.from_pretrained("assets/tiny-world")
    next(extra.stream(PROMPT, 3))
    assert "gen-2" in shared.consumers
    del extra
    gc.collect()
    gen.engine.open_stream(PROMPT).close()
    assert "gen-2" not in shared.consumers  # an engine's consumer goes with it
    shared.check_invariants()


def test_pages_grow_for_a_larger_block_while_none_is_in_use():
    mgr = CacheManager(device_bytes=2**20, host_bytes=2**20, device="cpu")
    mgr.register("small", spec(4))
    seq = mgr.open_sequence("small")
    seq.append()
    mgr.close_sequence(seq)
    small_page = mgr.page_bytes
    mgr.register("large", spec(64))  # nothing in use: the pages grow
    big = mgr.open_sequence("large")
    big.append()
    assert mgr.page_bytes >= spec(64).block_bytes > small_page
    assert mgr.counters["repaged"] == 1
    with pytest.raises(BudgetError, match="does not fit"):  # a block in use: they cannot
        mgr.register("larger", spec(256))
    assert "larger" not in mgr.consumers
    mgr.check_invariants()


def test_a_larger_model_gets_its_own_manager_while_the_process_pages_are_in_use(caplog):
    shared = process.process_cache("cpu")
    shared.register("tiny", spec(1))
    held = shared.open_sequence("tiny")
    held.append()  # pages of a 1-token block, in use
    with caplog.at_level(logging.WARNING, logger="streamrt.cache.process"):
        gen = StreamGenerator.from_pretrained("assets/tiny-world")
        frames = list(gen.stream(PROMPT, 3))
    assert len(frames) == 3
    assert gen.engine.cache is not shared and gen.engine.consumer == "gen"
    assert "has its own cache manager" in caplog.text and "Close the other" in caplog.text
    shared.close_sequence(held)
    later = StreamGenerator.from_pretrained("assets/tiny-world")
    next(later.stream(PROMPT, 3))
    assert later.engine.cache is shared  # nothing in use any more: the pages grew
    assert shared.counters["repaged"] == 1


def test_process_budgets_are_set_before_the_first_manager_and_not_after():
    process.configure_process_cache(CacheConfig(device_bytes="16MiB", host_bytes="32MiB"))
    shared = process.process_cache("cpu")
    assert shared.budgets == {"device": 16 * 2**20, "host": 32 * 2**20}
    assert process.process_cache(torch.device("cpu")) is shared
    with pytest.raises(BudgetError, match="configure it before the first model opens"):
        process.configure_process_cache(CacheConfig())
