"""The runtime: many streams in one forward equal their solo runs; scheduling, admission,
failure isolation, QA sessions on the one cache manager."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from streamrt.cache import OutOfBlocksError
from streamrt.config import RuntimeConfig
from streamrt.errors import InputError, UnknownNameError
from streamrt.runtime import AdmissionError, Runtime, StreamFailed
from streamrt.runtime.playout import Playout
from streamrt.runtime.runtime import serve_all

PROMPTS = [
    "a red circle moving right on a dark background",
    "a blue square moving up on a light background",
    "a green triangle moving left on a striped background",
    "a yellow circle moving down on a checkered background",
]
FREE = RuntimeConfig(admission=False, ahead_s=1e6, suspend_late_s=0)
"""Every stream runs as fast as it goes: what it is batched with is up to the order."""


@pytest.fixture(scope="module")
def rt():
    runtime = Runtime("tiny-random", runtime=FREE)
    yield runtime
    runtime.close()


def _record_latents(handle) -> list[torch.Tensor]:
    """Wrap the stream's decoder to keep the clean latents of every chunk it decodes."""
    gen = handle._live.gen
    seen: list[torch.Tensor] = []
    decode = gen.decode

    def keep(x0):
        seen.append(x0.clone())
        return decode(x0)

    gen.decode = keep
    return seen


def _solo(rt: Runtime, prompt: str, chunks: int, **overrides) -> list[torch.Tensor]:
    stream = rt.engine.open_stream(prompt, **overrides)
    try:
        return [stream.next_latents() for _ in range(chunks)]
    finally:
        stream.close()


MIXED = [
    ({}, PROMPTS[0]),
    ({"policy": "deep_sink", "policy_args": {"sink_blocks": 2, "window_blocks": 6}}, PROMPTS[1]),
    ({"policy": "participative"}, PROMPTS[2]),
    ({"guidance_scale": 3.0, "seed": 5}, PROMPTS[3]),
    ({"sampler": "stream_batch", "timesteps": [1000, 500]}, PROMPTS[0]),
    ({"policy": "ema_sink", "timesteps": [1000, 750, 250], "seed": 2}, PROMPTS[1]),
    ({"sampler": "rolling", "timesteps": [1000, 500]}, PROMPTS[2]),
    ({"sampler": "rolling", "timesteps": [1000, 500], "seed": 9}, PROMPTS[3]),
]


def test_batched_streams_equal_their_solo_runs(rt):
    chunks = 6
    handles = [rt.open_stream(p, num_frames=chunks * 3, **o) for o, p in MIXED]
    seen = {h.id: _record_latents(h) for h in handles}
    before = dict(rt.counters)
    frames = serve_all(handles)
    forwards = rt.counters["forwards"] - before["forwards"]
    rows = rt.counters["rows"] - before["rows"]
    assert rows / forwards > 2, "streams did not share forwards"
    for h, (overrides, prompt) in zip(handles, MIXED):
        assert len(frames[h.id]) == chunks * 3
        solo = _solo(rt, prompt, chunks, **overrides)
        assert len(seen[h.id]) == chunks
        for a, b in zip(seen[h.id], solo):
            assert (a - b).abs().max().item() <= 1e-5, (h.id, overrides)


def test_prompt_switch_at_a_chunk_boundary_equals_solo(rt):
    h = rt.open_stream(PROMPTS[0], num_frames=12)
    other = rt.open_stream(PROMPTS[2], num_frames=12)
    seen = _record_latents(h)
    frames = h.frames()
    for _ in range(6):  # two chunks of three frames
        next(frames)
    h.set_prompt(PROMPTS[1])
    rest = list(frames)
    assert len(rest) == 6
    list(other.frames())
    stream = rt.engine.open_stream(PROMPTS[0])
    solo = [stream.next_latents(), stream.next_latents()]
    stream.set_prompt(PROMPTS[1])
    solo += [stream.next_latents(), stream.next_latents()]
    stream.close()
    for a, b in zip(seen, solo, strict=True):
        assert (a - b).abs().max().item() <= 1e-5


def test_closing_a_stream_frees_its_blocks_and_ends_its_reader(rt):
    base = rt.cache.stats()["consumers"]["gen"]["device"]["blocks"]
    h = rt.open_stream(PROMPTS[0])
    frames = h.frames()
    next(frames)
    assert rt.cache.stats()["consumers"]["gen"]["device"]["blocks"] > base
    h.close()
    assert rt.cache.stats()["consumers"]["gen"]["device"]["blocks"] == base
    assert len(list(frames)) <= 2  # what was already queued, then the end
    assert h.stats()["state"] == "done"


def test_a_failing_stream_ends_alone_with_its_message(rt):
    good = rt.open_stream(PROMPTS[0], num_frames=9)
    bad = rt.open_stream(PROMPTS[1], num_frames=9)

    def broken(x0):
        raise ValueError("decoder exploded")

    bad._live.gen.decode = broken
    out = list(good.frames())
    assert len(out) == 9
    with pytest.raises(StreamFailed, match="decoder exploded"):
        list(bad.frames())
    assert rt.stream_stats(bad.id)["state"] == "failed"
    assert "decoder exploded" in rt.stats()["finished"][bad.id]["error"]


def test_bad_requests_are_refused_before_anything_is_allocated(rt):
    base = rt.cache.stats()["consumers"]["gen"]["device"]["blocks"]
    for kwargs, match in [
        ({"num_frames": 0}, "num_frames"),
        ({"num_frames": 2.5}, "num_frames"),
        ({"fps": -1}, "fps"),
        ({"seed": "x"}, "seed"),
        ({"priority": 1.5}, "priority"),
    ]:
        with pytest.raises(InputError, match=match):
            rt.open_stream(PROMPTS[0], **kwargs)
    with pytest.raises(InputError, match="empty"):
        rt.open_stream("  ")
    with pytest.raises(UnknownNameError):
        rt.stream("s999")
    with pytest.raises(UnknownNameError):
        rt.set_prompt("nope", PROMPTS[0])
    assert rt.cache.stats()["consumers"]["gen"]["device"]["blocks"] == base


def test_streams_are_served_concurrently_from_threads():
    with Runtime("tiny-random", runtime=FREE).start() as runtime:
        handles = [runtime.open_stream(p, num_frames=15) for p in PROMPTS]
        counts: dict[str, int] = {}

        def read(h):
            counts[h.id] = sum(1 for _ in h.frames(timeout=60))

        threads = [threading.Thread(target=read, args=(h,)) for h in handles]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert counts == {h.id: 15 for h in handles}
        assert runtime.counters["rows"] > runtime.counters["forwards"]


# ---------------------------------------------------------------------- scheduling


def test_playout_deadlines_slack_attainment_and_gaps():
    p = Playout(fps=10, ttff_s=1.0, now=100.0)
    assert p.slack(100.0) == pytest.approx(1.0)
    p.produced(3, 100.5)  # frames 0-2 due at 101.0, 101.1, 101.2: on time
    assert p.slack(100.5) == pytest.approx(101.3 - 100.5)
    p.produced(3, 102.0)  # frames 3-5 due at 101.3-101.5: late
    s = p.stats(102.0)
    assert s["frames"] == 6 and s["slo_attainment"] == pytest.approx(0.5)
    # shown at 101.0, 101.1, 101.2, then the stall until 102.0, then 102.1, 102.2
    assert s["gap_p50_s"] == pytest.approx(0.1)
    assert max(p.gaps) == pytest.approx(0.8)
    p.pause(103.0)
    p.resume(104.0)
    assert p.due(6) == pytest.approx(101.6 + 1.0)


def test_deadline_scheduler_holds_streams_ahead_and_runs_the_most_urgent_first():
    runtime = Runtime("tiny-random", runtime=RuntimeConfig(admission=False, ahead_s=0.5))
    try:
        late = runtime.open_stream(PROMPTS[0], fps=10)
        ahead = runtime.open_stream(PROMPTS[1], fps=10)
        now = late._live.playout.opened
        late._live.playout.opened -= 5.0  # its frames were due 5 s ago
        ahead._live.playout.opened += 5.0  # its first frame is due in 6 s
        ready = runtime.scheduler.ready(list(runtime.streams.values()), now)
        assert [s.id for s in ready] == [late.id]
        for s in runtime.streams.values():
            s.start_chunk()
        batch = runtime.scheduler.pick(list(runtime.streams.values()), now)
        assert batch[0].id == late.id
        fcfs = RuntimeConfig(scheduler="fcfs")
        from streamrt.runtime.scheduler import Scheduler

        assert len(Scheduler(fcfs).ready(list(runtime.streams.values()), now)) == 2
    finally:
        runtime.close()


def test_late_streams_share_one_forward_and_on_time_ones_join_as_the_deadline_allows():
    """Under overload every late stream of the same shape runs in one forward (a row's
    marginal cost each); a stream still on time joins only within the head's allowance
    (here 2 rows' time: the head is late, so twice its own forward)."""
    runtime = Runtime("tiny-random", runtime=RuntimeConfig(admission=False, ahead_s=1e9))
    try:
        cost = runtime.scheduler.cost
        cost.samples.clear()
        cost.observe(1, 0.01)
        cost.observe(4, 0.04)  # 0.01 s per row, no fixed cost
        late = [runtime.open_stream(PROMPTS[i % 4], fps=10) for i in range(3)]
        on_time = runtime.open_stream(PROMPTS[3], fps=10)
        now = on_time._live.playout.opened
        for i, h in enumerate(late):
            h._live.playout.opened -= 5.0 + i  # frames due 5-7 s ago
        on_time._live.playout.opened += 5.0
        for s in runtime.streams.values():
            s.start_chunk()
        batch = runtime.scheduler.pick(list(runtime.streams.values()), now)
        assert [s.id for s in batch] == [h.id for h in reversed(late)]  # most urgent first
        on_time._live.playout.opened -= 20.0  # now late too: it joins
        batch = runtime.scheduler.pick(list(runtime.streams.values()), now)
        assert len(batch) == 4
        runtime.config.max_batch = 2  # the cap still holds
        assert len(runtime.scheduler.pick(list(runtime.streams.values()), now)) == 2
    finally:
        runtime.close()


def _fps_for_share(runtime: Runtime, share: float) -> float:
    """A playout rate at which one stream needs `share` of the machine, under a fixed cost
    model (0.01 s per row of a forward, 0.002 s per decode, no fixed cost: n such streams
    need n x share), so the admission decisions below do not depend on this CPU's load."""
    cost = runtime.scheduler.cost
    cost.samples.clear()
    cost.observe(1, 0.01)
    cost.observe(4, 0.04)
    cost.decode_s = 0.002
    cost.observe = lambda rows, seconds: None  # frozen: real forwards do not move it
    cost.observe_decode = lambda seconds: None
    one = runtime.open_stream(PROMPTS[0], fps=1.0)
    load = runtime.scheduler.load([one._live])  # load grows linearly with fps
    one.close()
    return share / load


def test_admission_refuses_what_the_measured_capacity_cannot_serve():
    runtime = Runtime("tiny-random", runtime=RuntimeConfig(headroom=0.5, queue_s=0))
    try:
        fps = _fps_for_share(runtime, 0.2)
        admitted = []
        with pytest.raises(AdmissionError, match="capacity"):
            for _ in range(20):
                admitted.append(runtime.open_stream(PROMPTS[1], fps=fps))
        lives = [h._live for h in admitted]
        assert len(admitted) == 2  # 0.2 + 0.2 fits 0.5, a third does not
        assert runtime.scheduler.load(lives) == pytest.approx(0.4)
        assert runtime.counters["refused"] == 1
        admitted[0].close()
        runtime.open_stream(PROMPTS[2], fps=fps)  # room again
    finally:
        runtime.close()


def test_a_lone_stream_is_always_admitted():
    runtime = Runtime("tiny-random", runtime=RuntimeConfig(headroom=0.5, queue_s=0))
    try:
        fps = _fps_for_share(runtime, 3.0)  # more than the machine can do
        h = runtime.open_stream(PROMPTS[0], fps=fps, num_frames=3)
        with pytest.raises(AdmissionError):
            runtime.open_stream(PROMPTS[1], fps=fps)
        assert len(list(h.frames())) == 3
    finally:
        runtime.close()


def test_a_queued_stream_starts_when_room_frees():
    config = RuntimeConfig(headroom=0.5, queue_s=30.0)
    runtime = Runtime("tiny-random", runtime=config)
    try:
        fps = _fps_for_share(runtime, 0.4)
        first = runtime.open_stream(PROMPTS[0], fps=fps)
        queued = runtime.open_stream(PROMPTS[1], fps=fps, num_frames=3)
        assert runtime.stats()["scheduler"]["waiting"] == 1
        assert queued.stats()["state"] == "waiting"
        first.close()
        assert len(list(queued.frames(timeout=60))) == 3
    finally:
        runtime.close()


def test_a_higher_priority_stream_suspends_a_lower_one_which_resumes_bit_exactly():
    # degrade_steps=0: a stream late on a busy machine is never thinned to fewer steps,
    # which would make its frames differ from the solo run for a reason this test is not about
    config = RuntimeConfig(headroom=0.5, queue_s=0, suspend_late_s=0.2, degrade_steps=0)
    runtime = Runtime("tiny-random", runtime=config)
    try:
        fps = _fps_for_share(runtime, 0.4)
        low = runtime.open_stream(PROMPTS[0], fps=fps, num_frames=12, priority=0)
        seen = _record_latents(low)
        frames = low.frames()
        for _ in range(3):
            next(frames)
        high = runtime.open_stream(PROMPTS[1], fps=fps, num_frames=6, priority=1)
        assert runtime.stream_stats(low.id)["state"] == "suspended"
        runtime.step()  # at its chunk boundary: the suspended stream's KV leaves the device
        seqs = low._live.gen.seqs
        assert all(b.tier == "host" for seq in seqs for b in seq.table.values())
        assert len(list(high.frames())) == 6
        rest = list(frames)  # room again: it resumes, its KV back on the device
        assert len(rest) == 9
        assert runtime.counters["suspended"] == 1 and runtime.counters["resumed"] == 1
        solo = _solo(runtime, PROMPTS[0], 4)
        for a, b in zip(seen, solo, strict=True):
            assert torch.equal(a, b)
    finally:
        runtime.close()


def test_sustained_lateness_degrades_then_suspends_the_lowest_priority_stream():
    """The degrade order: fewer steps for every stream that can (lowest priority first),
    then suspension; with room again, resume first, then the full steps back."""
    runtime = Runtime("tiny-random", runtime=RuntimeConfig(admission=False, suspend_late_s=0.5))
    try:
        a = runtime.open_stream(PROMPTS[0], priority=1)
        b = runtime.open_stream(PROMPTS[1], priority=0)
        c = runtime.open_stream(PROMPTS[2], priority=0)
        handles = (a, b, c)
        for h in handles:
            h._live.playout.opened -= 10  # ten seconds behind

        def states():
            stats = [runtime.stream_stats(h.id) for h in handles]
            return [(s["state"], s["steps"]) for s in stats]

        runtime.step()
        assert states() == [("running", 4), ("running", 4), ("running", 2)]
        # At most one change per suspend_late_s: the next step comes right after the change
        # (on a slow machine the first step's forward alone can take longer than 0.5 s).
        runtime._last_change = time.perf_counter()
        runtime.step()
        assert states() == [("running", 4), ("running", 4), ("running", 2)]
        for expected in (
            [("running", 4), ("running", 2), ("running", 2)],
            [("running", 2), ("running", 2), ("running", 2)],
            [("running", 2), ("running", 2), ("suspended", 2)],
        ):
            runtime._last_change -= 1
            runtime.step()
            assert states() == expected
        # Caught up: the suspended stream resumes first, then the full steps come back,
        # highest priority first.
        for h in handles:
            h._live.playout.opened += 1e6
        for expected in (
            [("running", 2), ("running", 2), ("running", 2)],
            [("running", 4), ("running", 2), ("running", 2)],
            [("running", 4), ("running", 4), ("running", 2)],
        ):
            runtime._last_change -= 1
            runtime.step()
            assert states() == expected
        assert runtime.counters["degraded"] == 3 and runtime.counters["restored"] == 2
    finally:
        runtime.close()


def test_a_lone_stream_folds_its_refresh_and_batched_streams_do_not():
    """Alone, a stream's clean refresh rides in its next chunk's first forward (4 forwards a
    chunk, none for the last chunk's refresh); batched, it stays a forward of its own."""
    runtime = Runtime("tiny-random", runtime=FREE)
    try:
        lone = runtime.open_stream(PROMPTS[0], num_frames=9)
        assert len(list(lone.frames())) == 9
        assert lone._live.forwards == 3 * 4
        pair = [runtime.open_stream(p, num_frames=9) for p in PROMPTS[:2]]
        got = {h.id: [] for h in pair}
        its = {h.id: h.frames() for h in pair}
        while its:
            for k in list(its):
                try:
                    got[k].append(next(its[k]))
                except StopIteration:
                    del its[k]
        assert [len(v) for v in got.values()] == [9, 9]
        assert runtime.counters["rows"] > runtime.counters["forwards"]  # they shared forwards
        assert [h._live.forwards for h in pair] == [3 * 5, 3 * 5]
    finally:
        runtime.close()


def test_a_degraded_stream_runs_the_thinned_schedule():
    """Degraded from its first chunk, a stream's chunks equal a solo stream configured with
    the thinned timesteps."""
    runtime = Runtime("tiny-random", runtime=FREE)
    try:
        h = runtime.open_stream(PROMPTS[0], num_frames=9)
        seen = _record_latents(h)
        full = list(runtime.engine.config.timesteps)
        h._live.degrade(2)
        assert len(list(h.frames())) == 9
        assert h._live.forwards == 3 * 2  # per chunk 2 steps, not 4 (refreshes folded)
        solo = _solo(runtime, PROMPTS[0], 3, timesteps=[full[0], full[2]])
        for x, y in zip(seen, solo, strict=True):
            torch.testing.assert_close(x, y, rtol=0, atol=1e-6)
        assert not torch.allclose(seen[0], _solo(runtime, PROMPTS[0], 1)[0], atol=1e-3)
    finally:
        runtime.close()


# ---------------------------------------------------------------------- QA


def test_qa_session_watching_a_stream_answers_from_its_frames(rt):
    h = rt.open_stream(PROMPTS[0], num_frames=12)
    qa = rt.open_qa(stream_id=h.id)
    assert len(list(h.frames())) == 12
    qa.flush()
    stride = round(h.fps / rt.session(qa.id).qa.config.fps)  # near the QA model's fps
    assert qa.stats()["fed"] == len(range(0, 12, stride))
    answer = qa.ask("what color is the shape?")
    assert answer.text
    assert answer.timestamps and max(answer.timestamps) <= 12 / h.fps
    assert rt.stats()["qa"][qa.id]["stream_id"] == h.id
    assert "qa" in str(rt.cache.stats()["consumers"])  # its blocks live in the one manager
    qa.close()


def test_qa_feed_queue_is_bounded_and_drops_by_policy():
    for drop, kept_first in (("oldest", 6), ("newest", 0)):
        runtime = Runtime("tiny-random", runtime=RuntimeConfig(qa_queue_frames=4, qa_drop=drop))
        try:
            qa = runtime.open_qa()
            frames = [np.full((32, 32, 3), i * 20, np.uint8) for i in range(10)]
            kept = sum(qa.feed(f) for f in frames)
            session = runtime.session(qa.id)
            assert kept == 4 and session.dropped == 6
            assert int(session.queue[0][0][0, 0, 0]) == kept_first * 20
            qa.flush()
            assert qa.stats()["fed"] == 4
        finally:
            runtime.close()


def test_a_question_under_memory_pressure_retrieves_fewer_frames(rt, monkeypatch):
    qa = rt.open_qa()
    qa.feed(np.stack([np.full((32, 32, 3), 40 * i, np.uint8) for i in range(6)]))
    qa.flush()
    session = rt.session(qa.id)
    ask = type(session.qa).ask
    tried = []

    def short_of_memory(self, question, max_new_tokens=None):
        tried.append(self.config.retrieve_frames)
        if self.config.retrieve_frames > 2:
            raise OutOfBlocksError("no room on the device tier")
        return ask(self, question, max_new_tokens)

    monkeypatch.setattr(type(session.qa), "ask", short_of_memory)
    answer = qa.ask("what color is the shape?")
    assert tried == [8, 4, 2]
    assert any("retrieved 2 of 8" in w for w in answer.warnings)
    assert session.qa.config.retrieve_frames == 8
    qa.close()


def test_encoding_is_batched_across_sessions(rt, monkeypatch):
    a, b = rt.open_qa(), rt.open_qa()
    adapter = rt.session(a.id).qa.adapter
    calls = []
    encode = adapter.encode_frames

    def counted(pixels):
        calls.append(pixels.shape[0])
        return encode(pixels)

    monkeypatch.setattr(adapter, "encode_frames", counted)
    a.feed(np.zeros((3, 32, 32, 3), np.uint8))
    b.feed(np.zeros((2, 32, 32, 3), np.uint8))
    a.flush()
    b.flush()
    assert calls == [5]
    a.close()
    b.close()


def test_side_work_runs_only_when_the_batch_can_wait_for_it():
    runtime = Runtime("tiny-random", runtime=RuntimeConfig(admission=False), qa=False)
    try:
        h = runtime.open_stream(PROMPTS[0])
        live = h._live
        live.start_chunk()
        runtime.scheduler.cost.observe(1, 0.01)
        runtime._side_s = 0.05  # measured side work: 50 ms
        now = live.playout.opened
        live.playout.opened = now - live.playout.ttff_s + 0.06  # next frame due in 60 ms
        assert not runtime._spare([live], now)  # 50 ms + 2 x 10 ms does not fit in 60 ms
        live.playout.opened = now - live.playout.ttff_s + 0.2
        assert runtime._spare([live], now)
        assert runtime._spare([], now)  # nothing due: side work always fits
    finally:
        runtime.close()


def test_a_kv_quota_refuses_a_stream_keeping_more_and_bounds_one_that_fits(rt):
    blocks_before = rt.cache.stats()["consumers"]["gen"]
    with pytest.raises(InputError, match=r"kv_quota_mb is 0.01: keep at most \d+ frames"):
        rt.open_stream(PROMPTS[0], num_frames=3, kv_quota_mb=0.01)
    with pytest.raises(InputError, match="keeps every frame"):
        rt.open_stream(PROMPTS[0], num_frames=3, kv_quota_mb=100, policy="full")
    with pytest.raises(InputError, match="kv_quota_mb must be a number > 0"):
        rt.open_stream(PROMPTS[0], num_frames=3, kv_quota_mb=-1)
    assert rt.cache.stats()["consumers"]["gen"] == blocks_before  # nothing kept
    # what the refused one needed fits a quota of that size, and the stream stays under it
    h = rt.open_stream(PROMPTS[0], num_frames=3)
    live = h._live
    need = live.gen.seqs[0].policy.capacity * live.gen.seqs[0].spec.block_bytes / 1e6
    h.close()
    h = rt.open_stream(PROMPTS[0], num_frames=30, kv_quota_mb=need)
    peak = 0.0
    for _ in h.frames():
        peak = max(peak, h.stats()["kv_mb"])
    assert 0 < peak <= need


def test_a_qa_kv_quota_refuses_settings_that_hold_more_and_frees_what_it_took(rt):
    before = (rt.cache.stats()["consumers"], dict(rt.sessions))
    with pytest.raises(InputError, match=r"kv_quota_mb is 0.001: lower window_frames"):
        rt.open_qa(kv_quota_mb=0.001)
    assert (rt.cache.stats()["consumers"], rt.sessions) == before  # nothing kept
    ok = rt.open_qa(window_frames=2, retrieve_frames=2)
    session = rt.session(ok.id)
    need = session.device_blocks() * session.qa.memory.spec.block_bytes / 1e6
    rt.close_qa(ok.id)
    h = rt.open_qa(window_frames=2, retrieve_frames=2, kv_quota_mb=need)
    for _ in range(4):
        h.feed(np.zeros((64, 64, 3), np.uint8))
    h.flush()
    assert h.ask("what color is the shape?").text is not None
    rt.close_qa(h.id)
