"""The demo's backend without a browser: streams, prompt switches, webcam stylization, QA."""

import time

import numpy as np
import pytest

from streamrt.apps.demo import DemoBackend, Session
from streamrt.models.text import PromptError
from streamrt.world import make_clip

RED = "a red circle moving right on a dark background"
BLUE = "a blue square moving up on a light background"


@pytest.fixture(scope="module")
def backend():
    return DemoBackend("tiny-random", realtime=False)


def test_generate_streams_frames_and_switches_prompt_between_chunks(backend):
    session = Session()
    frames, statuses = [], []
    for frame, status in backend.generate(RED, session, max_frames=9):
        frames.append(frame)
        statuses.append(status)
        if len(frames) == 3:
            backend.switch_prompt(BLUE, session)
    assert len(frames) == 9 and frames[0].shape == (64, 64, 3)
    assert statuses[0].startswith("frame 1 |") and statuses[0].endswith(RED)
    assert statuses[-1].endswith(BLUE)  # the switch took effect at the next chunk
    assert session.prompt_switch is None


def test_bad_prompt_fails_that_request_only(backend):
    with pytest.raises(PromptError, match="vocabulary"):
        next(backend.generate("a pink elephant", Session()))
    with pytest.raises(PromptError, match="vocabulary"):
        backend.switch_prompt("a pink elephant", Session())
    frames = list(backend.generate(RED, Session(), max_frames=3))
    assert len(frames) == 3


def test_webcam_frames_come_back_styled_one_per_frame(backend):
    session = Session()
    camera = make_clip(2, 12, None).frames
    big = np.repeat(np.repeat(camera, 2, axis=1), 2, axis=2)  # a 128x128 camera
    outs = [backend.stylize(frame, RED, session) for frame in big]
    deadline = time.monotonic() + 30
    while len(session.stylizer.outputs) < 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    stylizer = session.stylizer
    assert stylizer.error is None
    assert stylizer.latest() is not None and stylizer.latest().shape == (64, 64, 3)
    assert outs[0] is None  # nothing before the first chunk is done
    with pytest.raises(ValueError, match="uint8"):
        backend.stylize(np.zeros((64, 64, 3), np.float32), RED, session)
    backend.stop_stylize(session)
    assert session.stylizer is None and not stylizer._worker.is_alive()


def test_ask_before_feeding_says_what_to_do(backend):
    with pytest.raises(ValueError, match="feed a video first"):
        backend.ask("what color was the first shape?", Session())


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
