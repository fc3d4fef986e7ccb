"""Procedural world: determinism, pixels against state, dynamics, captions, QA, world:// URLs."""

import itertools
import re
import time

import numpy as np
import pytest

from streamrt.config import field_docs
from streamrt.world import (
    BACKGROUNDS,
    COLORS,
    QA_KINDS,
    VOCAB,
    Scene,
    WorldConfig,
    WorldObject,
    WorldSource,
    caption_for,
    make_clip,
    make_qa,
    parse_caption,
    random_caption,
    render_background,
    scene_from_caption,
    tokenize,
)
from streamrt.world.config import BOUNDARIES

SEEDS = range(16)


def _boxes_touch(a, b) -> bool:
    return a[0] <= b[2] + 1 and b[0] <= a[2] + 1 and a[1] <= b[3] + 1 and b[1] <= a[3] + 1


def _scene(*objects, boundary="bounce", background="dark", **config) -> Scene:
    return Scene(list(objects), background, boundary, WorldConfig(**config))


# --- config and vocabulary ------------------------------------------------------------


def test_config_fields_are_defaulted_documented_and_checked():
    docs = field_docs(WorldConfig)
    for name in WorldConfig.__dataclass_fields__:
        assert docs.get(name), f"WorldConfig.{name} has no docstring"
    bad_ones = ({"height": 60}, {"width": 24}, {"max_objects": 5}, {"boundary": "slide"})
    for bad in (*bad_ones, {"object_size": (5, 3)}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            WorldConfig(**bad)


def test_palette_is_distinct_from_itself_and_every_background():
    colors = np.array(list(COLORS.values()), dtype=float)
    pairwise = np.linalg.norm(colors[:, None] - colors[None], axis=-1)
    assert pairwise[~np.eye(len(colors), dtype=bool)].min() > 90
    for name in BACKGROUNDS:
        bg = np.unique(render_background(name, 64, 64).reshape(-1, 3), axis=0).astype(float)
        assert np.linalg.norm(colors[:, None] - bg[None], axis=-1).min() > 90, name
    assert len(np.unique(render_background("striped", 64, 64).reshape(-1, 3), axis=0)) == 2
    assert len(np.unique(render_background("checkered", 64, 64).reshape(-1, 3), axis=0)) == 2


def test_every_caption_question_and_answer_word_is_in_vocab():
    assert len(VOCAB) == len(set(VOCAB))
    for seed in SEEDS:
        clip = make_clip(seed, config=WorldConfig(speed_in_captions=seed % 2 == 1))
        assert set(tokenize(clip.caption)) <= set(VOCAB), clip.caption
        for qa in clip.qa:
            assert set(tokenize(qa.question)) <= set(VOCAB), qa.question
            assert tokenize(qa.answer) == [qa.answer] and qa.answer in VOCAB


# --- determinism ------------------------------------------------------------------------


def test_same_seed_same_clip_and_different_seeds_differ():
    clips = [make_clip(seed) for seed in range(6)]
    for seed, clip in enumerate(clips):
        again = make_clip(seed)
        assert np.array_equal(clip.frames, again.frames)
        assert clip.caption == again.caption and clip.qa == again.qa
        assert clip.frames.shape == (32, 64, 64, 3) and clip.frames.dtype == np.uint8
    for a, b in itertools.combinations(clips, 2):
        assert not np.array_equal(a.frames, b.frames)
    assert len({c.caption for c in clips}) == len(clips)


def test_resolution_scales_frames_and_sizes():
    clip = make_clip(2, num_frames=5, config=WorldConfig(height=32, width=48))
    assert clip.frames.shape == (5, 32, 48, 3)
    big = [make_clip(s, num_frames=1, config=WorldConfig(height=128, width=128)) for s in SEEDS]
    sizes = {o.size for c in big for o in c.scene.objects}
    assert min(sizes) >= 8 and max(sizes) <= 14
    large = WorldConfig(object_size=(9, 10))  # the generator's training world may draw larger
    sizes = {o.size for s in SEEDS for o in make_clip(s, 1, large).scene.objects}
    assert sizes == {9, 10}


# --- rendering against state and dynamics ---------------------------------------------


@pytest.mark.parametrize("boundary", BOUNDARIES)
def test_pixels_agree_with_state(boundary):
    checked = 0
    for seed in range(8):
        clip = make_clip(seed, config=WorldConfig(boundary=boundary))
        background = render_background(clip.scene.background, 64, 64)
        for t, frame in enumerate(clip.frames):
            states = clip.scene.state(t)
            visible = [s for s in states if s.visible]
            covered = np.zeros((64, 64), dtype=bool)
            for s in visible:
                x0, y0, x1, y1 = s.box
                covered[max(y0, 0) : y1 + 1, max(x0, 0) : x1 + 1] = True
                alone = not any(_boxes_touch(s.box, o.box) for o in visible if o is not s)
                cx, cy = s.center
                if alone and 0 <= cx < 64 and 0 <= cy < 64:
                    assert tuple(frame[cy, cx]) == COLORS[s.color], (seed, t, s)
                    checked += 1
            # Off-stage and off-screen objects leave no trace: everything else is background.
            assert np.array_equal(frame[~covered], background[~covered]), (seed, t)
    assert checked > 200


def test_wrap_leaves_and_reenters_from_the_opposite_side():
    obj = WorldObject("red", "square", "right", x0=50, y0=32, size=5, speed=2.0)
    scene = _scene(obj, boundary="wrap")
    period = 64 + 4 * 5  # frame plus a margin of 2 * size on each side
    xs = [scene.state(t)[0].x for t in range(60)]
    assert xs == [(50 + 10 + 2 * t) % period - 10 for t in range(60)]
    visible = [scene.state(t)[0].visible for t in range(60)]
    gone = visible.index(False)
    back = visible.index(True, gone)
    assert 0 < gone < back and xs[gone] > 63 + 5 and xs[back] < 5
    assert tuple(scene.render(back)[32, 0]) == COLORS["red"]
    assert {scene.state(t)[0].direction for t in range(60)} == {"right"}


def test_bounce_reflects_off_walls_and_flips_direction():
    obj = WorldObject("red", "square", "right", x0=55, y0=32, size=5, speed=2.0)
    scene = _scene(obj)
    s = [scene.state(t)[0] for t in range(80)]
    assert [x.x for x in s[:4]] == [55, 57, 57, 55]  # the wall for the centre is 63 - 5 = 58
    assert [x.direction for x in s[:4]] == ["right", "right", "left", "left"]
    assert all(5 <= x.x <= 58 and x.visible for x in s)
    flips = sum(a.direction != b.direction for a, b in itertools.pairwise(s))
    assert flips >= 3
    red = [np.flatnonzero((scene.render(t) == COLORS["red"]).all(-1).any(0)) for t in range(80)]
    # Reaches both walls (to within one step's rounding) and the shape is never cut off.
    assert min(r.min() for r in red) <= 1 and max(r.max() for r in red) >= 62
    assert all(len(r) == 11 for r in red)


def test_enter_and_exit_frames_bound_visibility():
    obj = WorldObject("blue", "circle", "down", 20, 10, 6, 1.0, enter_frame=5, exit_frame=9)
    scene = _scene(obj)
    assert [scene.state(t)[0].visible for t in range(12)] == [t in range(5, 9) for t in range(12)]
    assert scene.state(5)[0].y == 10  # x0, y0 are where it enters
    for t in range(12):
        has_blue = (scene.render(t) == COLORS["blue"]).all(-1).any()
        assert has_blue == (5 <= t < 9)


def test_rendering_a_thousand_frames_is_fast():
    frames = WorldSource("world://seed=1", max_frames=1000)
    start = time.perf_counter()
    assert sum(1 for _ in frames) == 1000
    assert time.perf_counter() - start < 2.0


# --- captions ---------------------------------------------------------------------------


@pytest.mark.parametrize("speed_in_captions", [False, True])
def test_sampled_captions_round_trip(speed_in_captions):
    config = WorldConfig(speed_in_captions=speed_in_captions)
    rng = np.random.default_rng(0)
    captions = [random_caption(rng, config) for _ in range(60)]
    assert len(set(captions)) > 40
    assert any(" and " in c for c in captions)
    assert any(re.search(r"\b(slow|fast)\b", c) for c in captions) == speed_in_captions
    for seed, caption in enumerate(captions):
        assert caption_for(scene_from_caption(caption, seed, config)) == caption


def test_scene_from_caption_shows_what_the_caption_says():
    rng = np.random.default_rng(1)
    for seed in range(30):
        caption = random_caption(rng)
        description = parse_caption(caption)
        scene = scene_from_caption(caption, seed)
        assert scene.background == description.background
        assert len(scene.objects) == len(description.objects)
        for i, (want, obj) in enumerate(zip(description.objects, scene.objects)):
            t = obj.enter_frame
            state = scene.state(t)
            me = state[i]
            assert (me.color, me.shape, me.direction) == (want.color, want.shape, want.direction)
            assert me.visible
            cx, cy = me.center
            on_top = [s for s in state[i + 1 :] if s.visible and _boxes_touch(s.box, me.box)]
            if not on_top:
                assert tuple(scene.render(t)[cy, cx]) == COLORS[want.color], (caption, seed)


def test_one_object_caption_in_pixels():
    caption = "a red circle moving right on a light background"
    scene = scene_from_caption(caption, seed=4, config=WorldConfig(boundary="wrap"))
    s0, s2 = scene.state(0)[0], scene.state(2)[0]
    assert (s0.color, s0.shape, s0.direction, s0.visible) == ("red", "circle", "right", True)
    assert s2.x > s0.x or s2.x < 0  # moved right (or wrapped past the right edge)
    frame = scene.render(0)
    assert tuple(frame[s0.center[1], s0.center[0]]) == COLORS["red"]
    x0, y0 = s0.box[:2]
    assert x0 >= 0 and y0 >= 0  # seed 4 puts the whole circle inside the frame
    assert tuple(frame[y0, x0]) == (220, 220, 220)  # a circle leaves its box corners bare


@pytest.mark.parametrize(
    "caption, culprit",
    [
        ("a pink circle moving right on a dark background", "pink"),
        ("a red hexagon moving right on a dark background", "hexagon"),
        ("a red circle moving sideways on a foggy background", "sideways, foggy"),
    ],
)
def test_out_of_vocabulary_caption_names_the_words_and_the_vocabulary(caption, culprit):
    with pytest.raises(ValueError) as err:
        scene_from_caption(caption, 0)
    message = str(err.value)
    assert culprit in message and "triangle" in message and "checkered" in message
    with pytest.raises(ValueError, match=culprit.split(",")[0]):
        make_clip(0, caption=caption)


@pytest.mark.parametrize(
    "caption",
    [
        "",
        "red circle moving right on a dark background",
        "a red circle moving right",
        "a red circle moving right on a dark",
        "a circle red moving right on a dark background",
        "a red circle moving right and on a dark background",
    ],
)
def test_ungrammatical_caption_is_rejected(caption):
    with pytest.raises(ValueError, match="cannot read caption"):
        parse_caption(caption)


# --- QA ---------------------------------------------------------------------------------

_NAMED = re.compile(r"(?:the|an?) (\w+) (circle|square|triangle)")


def _object_named(question):
    color, shape = _NAMED.search(question).groups()
    return color, shape


def _check_qa(qa, scene, num_frames):
    """Recompute `qa`'s answer from per-frame states and pixels, independently of qa.py."""
    states = [scene.state(t) for t in range(num_frames)]
    seen = {}
    for t, frame_states in enumerate(states):
        for s in frame_states:
            if s.visible:
                seen.setdefault(s.index, []).append(t)
    t, kind, answer = qa.frame, qa.kind, qa.answer
    visible = [s for s in states[t] if s.visible]
    if kind in ("first_color", "first_shape"):
        start = min(f[0] for f in seen.values())
        firsts = [i for i, f in seen.items() if f[0] == start]
        assert len(firsts) == 1
        obj = scene.objects[firsts[0]]
        assert answer == (obj.color if kind == "first_color" else obj.shape)
    elif kind == "count_frame":
        assert answer == str(len(visible))
    elif kind == "count_clip":
        assert answer == str(len(seen)) and t == num_frames - 1
    elif kind == "direction":
        color, shape = _object_named(qa.question)
        (i,) = [
            i for i in seen if (scene.objects[i].color, scene.objects[i].shape) == (color, shape)
        ]
        assert {states[f][i].direction for f in seen[i]} == {answer}
    elif kind == "direction_frame":
        color, shape = _object_named(qa.question)
        (me,) = [s for s in visible if (s.color, s.shape) == (color, shape)]
        before = states[t - 2][me.index]
        moved = {"right": me.x - before.x, "left": before.x - me.x}.get(answer)
        moved = {"down": me.y - before.y, "up": before.y - me.y}.get(answer, moved)
        assert me.direction == answer and moved > 0
    elif kind == "color_of_shape":
        shape = qa.question.split()[-1].rstrip("?")
        colors = {scene.objects[i].color for i in seen if scene.objects[i].shape == shape}
        assert colors == {answer}
    elif kind == "exists":
        color, shape = _object_named(qa.question)
        present = any((s.color, s.shape) == (color, shape) for f in states for s in f if s.visible)
        assert answer == ("yes" if present else "no")
    elif kind == "color_frame":
        (me,) = visible
        assert answer == me.color
    else:
        where = re.search(r"the (top|bottom|left|right)", qa.question).group(1)
        key = {"top": lambda s: s.y, "bottom": lambda s: -s.y}
        key.update({"left": lambda s: s.x, "right": lambda s: -s.x})
        me = min(visible, key=key[where])
        assert answer == (me.color if kind == "position_color" else me.shape)
    if kind == "direction_frame":
        visible = [me]
    if kind in ("count_frame", "color_frame", "direction_frame") or kind.startswith("position"):
        # Every shape a frame question is about shows its colour at its centre.
        frame = scene.render(t)
        for s in visible:
            assert tuple(frame[s.center[1], s.center[0]]) == COLORS[s.color]


def test_qa_answers_match_an_independent_recomputation():
    kinds = set()
    for seed in range(40):
        clip = make_clip(seed, num_frames=24)
        every = make_qa(clip.scene, 24, per_kind=None)
        assert set(clip.qa) <= set(every)
        for qa in every:
            _check_qa(qa, clip.scene, 24)
            kinds.add(qa.kind)
    assert kinds == set(QA_KINDS)


def _answers(scene, num_frames):
    return {qa.question: qa.answer for qa in make_qa(scene, num_frames, per_kind=None)}


def test_qa_of_a_hand_built_scene():
    red = WorldObject("red", "circle", "right", x0=12, y0=12, size=5, speed=1.0)
    blue = WorldObject("blue", "square", "up", x0=40, y0=48, size=5, speed=1.0, enter_frame=4)
    qa = _answers(_scene(red, blue), 16)
    expected = {
        "what color was the first shape?": "red",
        "what shape appeared first?": "circle",
        "how many shapes are there at frame 2?": "1",
        "how many shapes are there at frame 10?": "2",
        "how many shapes appear in the video?": "2",
        "which direction did the red circle move?": "right",
        "which direction did the blue square move?": "up",
        "which direction was the blue square moving at frame 8?": "up",
        "what color is the circle?": "red",
        "what color is the square?": "blue",
        "is there a red circle?": "yes",
        "is there a green triangle?": "no",
        "is there a blue circle?": "no",
        "what color was the shape at frame 3?": "red",
        "what color was the shape at the top at frame 10?": "red",
        "what shape was at the bottom at frame 10?": "square",
        "what color was the shape on the left at frame 10?": "red",
        "what shape was on the right at frame 10?": "square",
    }
    assert {q: qa.get(q) for q in expected} == expected
    absent = [
        "what color was the shape at frame 4?",  # two shapes by then
        "what color is the triangle?",
        "which direction was the blue square moving at frame 5?",  # seen for 2 frames only
    ]
    assert not set(absent) & set(qa)


def test_qa_skips_ambiguous_questions():
    # Both enter at frame 0: no "first" question.
    a = WorldObject("red", "circle", "right", 12, 12, 5, 1.0)
    b = WorldObject("green", "triangle", "left", 50, 50, 5, 1.0)
    qa = _answers(_scene(a, b), 10)
    assert not any("first" in q for q in qa)
    assert qa["what shape was at the top at frame 0?"] == "circle"
    # Two identical squares stacked: counts, colours and positions are unreadable.
    c = WorldObject("blue", "square", "down", 30, 20, 6, 1.0)
    d = WorldObject("blue", "square", "down", 33, 20, 6, 1.0)
    qa = _answers(_scene(c, d), 10)
    assert not any(q.startswith(("how many", "what color", "which")) for q in qa)
    # Never clearly seen, yet present: neither "yes" nor "no" is safe to teach.
    assert "is there a blue square?" not in qa and qa["is there a red circle?"] == "no"
    # A bounce flips the direction: no whole-clip direction, per-frame ones after the wall.
    e = WorldObject("red", "square", "right", 55, 32, 5, 2.0)
    qa = _answers(_scene(e), 10)
    assert "which direction did the red square move?" not in qa
    assert "which direction was the red square moving at frame 2?" not in qa
    assert qa["which direction was the red square moving at frame 5?"] == "left"


def test_clip_qa_sampling_is_balanced_and_per_kind():
    per_kind = [make_clip(s, config=WorldConfig(qa_per_kind=2)).qa for s in range(10)]
    for qa in per_kind:
        counts = {k: sum(q.kind == k for q in qa) for k in QA_KINDS}
        assert max(counts.values()) <= 2
    answers = [q.answer for qa in per_kind for q in qa if q.kind == "exists"]
    assert 0.25 < answers.count("yes") / len(answers) < 0.75


# --- live source ------------------------------------------------------------------------


def test_world_source_yields_deterministic_frames():
    source = WorldSource("world://seed=3&frames=20")
    frames = list(source)
    assert len(frames) == 20
    assert all(f.shape == (64, 64, 3) and f.dtype == np.uint8 for f in frames)
    assert all(np.array_equal(a, b) for a, b in zip(frames, list(source)))
    again = list(WorldSource(3, max_frames=20))
    assert all(np.array_equal(a, b) for a, b in zip(frames, again))
    assert not np.array_equal(frames[0], next(iter(WorldSource(4))))
    assert source.scene.boundary == "wrap"


def test_world_source_options():
    caption = "a red circle moving right on a dark background"
    url = "world://seed=3&fps=16&size=96x64&caption=" + caption.replace(" ", "+")
    source = WorldSource(url)
    assert source.caption == caption and source.fps == 16
    endless = list(itertools.islice(source, 300))
    assert len(endless) == 300 and endless[0].shape == (64, 96, 3)
    red = [(f == COLORS["red"]).all(-1).any() for f in endless]
    assert not all(red) and red.count(True) > 100  # leaves and keeps coming back
    assert WorldSource(f"world://seed=3&caption={caption}").caption == caption


@pytest.mark.parametrize(
    "url, culprit",
    [
        ("http://seed=3", "world://"),
        ("world://seed=x", "seed"),
        ("world://seed=-1", "seed"),
        ("world://seed", "key=value"),
        ("world://colour=red", "colour"),
        ("world://size=64", "size"),
        ("world://size=60x64", "width"),
        ("world://fps=0", "fps"),
        ("world://frames=0", "frames"),
        ("world://seed=1&seed=2", "twice"),
        ("world://caption=a pink circle moving right on a dark background", "pink"),
    ],
)
def test_bad_world_urls_are_rejected_with_the_reason(url, culprit):
    with pytest.raises(ValueError, match=re.escape(culprit)):
        WorldSource(url)
