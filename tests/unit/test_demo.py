"""The demo's backend without a browser: every tab a stream on the one runtime, prompt
switches, asking about the generated stream, webcam stylization, QA, closing tabs."""

import threading
import time

import numpy as np
import pytest

from streamrt.apps.demo import QUESTION, DemoBackend, Session, answer_text, build_demo
from streamrt.config import RuntimeConfig
from streamrt.models.text import PromptError
from streamrt.runtime import AdmissionError
from streamrt.world import make_clip

RED = "a red circle moving right on a dark background"
BLUE = "a blue square moving up on a light background"
# Admission control measures the machine; these 2 shared cores can be loaded by other
# jobs, so it could refuse at random: capacity is tested with max_streams instead.
SETTINGS = RuntimeConfig(admission=False)


@pytest.fixture(scope="module")
def backend():
    b = DemoBackend("tiny-random", realtime=False, runtime=SETTINGS)
    yield b
    b.close()


def _in_use(backend) -> tuple[set, set]:
    """Ids of the runtime's live streams and open QA sessions."""
    stats = backend.rt.stats()
    return set(stats["streams"]), set(stats["qa"])


def test_generate_streams_frames_and_switches_prompt_between_chunks(backend):
    session = Session()
    statuses = []
    for frame, status in backend.generate(RED, session, max_frames=80):
        assert frame.shape == (64, 64, 3) and frame.dtype == np.uint8
        statuses.append(status)
        if len(statuses) == 3:
            handle = session.stream
            backend.switch_prompt(BLUE, session)
        if status.endswith(BLUE):
            break
    assert statuses[0].startswith("frame 1 |") and statuses[0].endswith(RED)
    assert statuses[-1].endswith(BLUE), statuses[-1]  # the switch took effect at a chunk
    assert handle.done and session.stream is None  # the generator ended: its stream closed


def test_bad_prompt_fails_that_request_only(backend):
    with pytest.raises(PromptError, match="vocabulary"):
        next(backend.generate("a pink elephant", Session()))
    with pytest.raises(PromptError, match="vocabulary"):
        backend.switch_prompt("a pink elephant", Session())
    with pytest.raises(ValueError, match="press Start first"):
        backend.switch_prompt(BLUE, Session())
    frames = list(backend.generate(RED, Session(), max_frames=3))
    assert len(frames) == 3


def test_two_tabs_stream_at_once_on_the_one_runtime(backend):
    tabs = [Session(), Session()]
    arrived: list[list[float]] = [[], []]
    errors = []

    def watch(i: int, prompt: str) -> None:
        try:
            for _ in backend.generate(prompt, tabs[i]):  # endless until its tab stops
                arrived[i].append(time.monotonic())
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=watch, args=(i, p)) for i, p in enumerate((RED, BLUE))]
    for t in threads:
        t.start()
    # Neither stream ends until both showed 2 chunks' worth: a backend that served one
    # tab at a time would stall the other here.
    deadline = time.monotonic() + 30
    while min(map(len, arrived)) < 24 and time.monotonic() < deadline and not errors:
        time.sleep(0.02)
    streams, sessions = _in_use(backend)
    ids = [tab.stream.id for tab in tabs]
    watchers = [tab.watch.id for tab in tabs]
    for tab in tabs:
        assert backend.stop_generate(tab).startswith("stopped after")
    for t in threads:
        t.join(10)
        assert not t.is_alive(), "a stopped tab's generator did not end"
    assert not errors, errors
    assert min(map(len, arrived)) >= 24, f"frames per tab: {list(map(len, arrived))}"
    assert set(ids) <= streams and set(watchers) <= sessions  # both on the one runtime
    assert not set(ids) & _in_use(backend)[0]  # Stop closed the streams
    for tab in tabs:
        backend.close_session(tab)
    assert not set(watchers) & _in_use(backend)[1]


def test_ask_about_what_is_being_generated(backend):
    session = Session()
    with pytest.raises(ValueError, match="press Start first"):
        backend.ask_generated(QUESTION, session)
    frames = backend.generate(RED, session)
    for _ in range(24):
        next(frames)
    handle, watch = session.stream, session.watch
    assert watch.stream_id == handle.id  # the QA session watches this tab's stream
    answer = backend.ask_generated(QUESTION, session)  # while the stream runs
    made = handle.stats()["frames"]
    assert answer.text.strip()
    assert answer.timestamps and min(answer.timestamps) >= 0
    assert max(answer.timestamps) < made / handle.fps  # times of frames it generated
    text = answer_text(answer)
    assert text.startswith(answer.text) and "frames at " in text and text.endswith("ms)")
    frames.close()  # the tab's generator went away: its stream closes, its QA stays
    assert handle.done and session.stream is None
    assert backend.ask_generated(QUESTION, session).timestamps
    backend.close_session(session)
    assert watch.id not in _in_use(backend)[1]


def test_closing_a_tab_frees_its_stream_and_sessions(backend):
    sequences = backend.rt.stats()["cache"]["sequences"]
    session = Session()
    backend.open_tab("tab-1", session)
    frames = backend.generate(RED, session)
    next(frames)
    backend.feed("world://seed=3", 1, session)
    ids = session.stream.id, session.watch.id, session.qa.id
    streams, sessions = _in_use(backend)
    assert ids[0] in streams and set(ids[1:]) <= sessions
    assert backend.rt.stats()["cache"]["sequences"] > sequences
    backend.close_tab("tab-1")
    streams, sessions = _in_use(backend)
    assert ids[0] not in streams and not set(ids[1:]) & sessions
    assert backend.rt.stats()["cache"]["sequences"] == sequences  # every block freed
    assert list(frames) == []  # the tab's generator ends too
    assert "tab-1" not in backend.tabs


def test_a_full_runtime_refuses_a_tab_with_a_message():
    import gradio as gr

    small = DemoBackend("tiny-random", realtime=False, runtime=RuntimeConfig(max_streams=1))
    try:
        first, second = Session(), Session()
        frames = small.generate(RED, first)
        next(frames)
        with pytest.raises(AdmissionError, match="max_streams"):
            next(small.generate(BLUE, second))
        demo = build_demo(small)
        start = next(f.fn for f in demo.fns.values() if f.name == "start")
        with pytest.raises(gr.Error, match="max_streams"):  # the tab shows the message
            next(start(BLUE, second))
        small.close_session(first)  # the first tab went away: room for the second
        assert next(small.generate(BLUE, second))[0].shape == (64, 64, 3)
    finally:
        small.close()


def test_webcam_frames_come_back_styled_one_per_frame(backend):
    session = Session()
    streaming = backend.generate(BLUE, Session())  # a Generate tab streams meanwhile
    next(streaming)
    camera = make_clip(2, 12, None).frames
    big = np.repeat(np.repeat(camera, 2, axis=1), 2, axis=2)  # a 128x128 camera
    outs = [backend.stylize(frame, RED, session) for frame in big]
    deadline = time.monotonic() + 30
    while len(session.stylizer.outputs) < 4 and time.monotonic() < deadline:
        next(streaming)
    stylizer = session.stylizer
    assert stylizer.error is None
    assert stylizer.latest() is not None and stylizer.latest().shape == (64, 64, 3)
    assert outs[0] is None  # nothing before the first chunk is done
    with pytest.raises(ValueError, match="uint8"):
        backend.stylize(np.zeros((64, 64, 3), np.float32), RED, session)
    backend.stop_stylize(session)
    assert session.stylizer is None and not stylizer._worker.is_alive()
    streaming.close()


def test_ask_the_video_feeds_and_answers(backend):
    session = Session()
    with pytest.raises(ValueError, match="feed a video first"):
        backend.ask(QUESTION, session)
    assert backend.feed("world://seed=3", 2, session).startswith("fed 4 frames")
    answer = backend.ask(QUESTION, session)
    assert answer.text.strip() and answer.timestamps
    assert session.qa.id in _in_use(backend)[1]  # a session of the runtime
    backend.close_session(session)


def test_frames_are_shown_magnified_nearest():
    from streamrt.apps.demo import DISPLAY_PX, shown

    frame = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    big = shown(frame)
    k = DISPLAY_PX // 64
    assert big.shape == (64 * k, 64 * k, 3) and big.dtype == np.uint8
    blocks = big.reshape(64, k, 64, k, 3)
    assert (blocks == frame[:, None, :, None, :]).all()  # every k x k square is one pixel
    assert shown(np.zeros((500, 400, 3), np.uint8)).shape == (500, 400, 3)  # never shrinks
    assert shown(None) is None
