"""Question/answer pairs about a clip, computed from its per-frame object states.

Answers are single vocabulary words or small numbers. A question is asked only when the
frames settle it: an object counts as *clear* at a frame when it is visible, wholly
inside the frame and its box (grown by one pixel) touches no other visible object's box,
so it can be neither clipped nor covered. A frame is *clean* when every visible object
in it is clear. Questions that name "the red circle" need that colour/shape pair to be
unique among the objects seen in the clip.

`QA.frame` is the last frame needed: frames 0..frame determine the answer, which is what
a streaming model that answers as frames arrive needs to know.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from streamrt.world.scene import ObjectState, Scene
from streamrt.world.vocab import COLORS, MAX_NUMBER, SHAPES, article


@dataclass(frozen=True)
class QA:
    """One question about a clip and its one-word answer."""

    question: str
    answer: str
    kind: str
    """Template name, a key of `QA_KINDS`."""
    frame: int
    """Frames 0..frame determine the answer (the frame asked about, if any)."""


def _touch(a: ObjectState, b: ObjectState) -> bool:
    ax0, ay0, ax1, ay1 = a.box
    bx0, by0, bx1, by1 = b.box
    return ax0 <= bx1 + 1 and bx0 <= ax1 + 1 and ay0 <= by1 + 1 and by0 <= ay1 + 1


class Timeline:
    """Per-frame states of a clip with the clear/clean bookkeeping questions rely on."""

    def __init__(self, scene: Scene, num_frames: int) -> None:
        self.scene = scene
        self.num_frames = num_frames
        self.states = [scene.state(t) for t in range(num_frames)]
        self.clear = [self._clear_at(states) for states in self.states]
        self.clean = [
            all(c or not s.visible for s, c in zip(states, clear))
            for states, clear in zip(self.states, self.clear)
        ]
        n = len(scene.objects)
        self.seen = [[t for t in range(num_frames) if self.states[t][i].visible] for i in range(n)]
        self.clear_frames = [[t for t in range(num_frames) if self.clear[t][i]] for i in range(n)]

    def _clear_at(self, states: list[ObjectState]) -> list[bool]:
        h, w = self.scene.height, self.scene.width
        visible = [s for s in states if s.visible]
        return [
            s.visible
            and s.box[0] >= 0
            and s.box[1] >= 0
            and s.box[2] <= w - 1
            and s.box[3] <= h - 1
            and not any(_touch(s, o) for o in visible if o.index != s.index)
            for s in states
        ]

    def ever_seen(self) -> list[int]:
        """Indices of objects visible in at least one frame."""
        return [i for i, frames in enumerate(self.seen) if frames]

    def named(self) -> list[int]:
        """Seen objects whose colour/shape pair no other seen object shares."""
        pairs = defaultdict(list)
        for i in self.ever_seen():
            pairs[self.scene.objects[i].color, self.scene.objects[i].shape].append(i)
        return [ids[0] for ids in pairs.values() if len(ids) == 1]

    def askable_frames(self) -> range:
        """Frames a question may name (frame numbers must be vocabulary words)."""
        return range(min(self.num_frames, MAX_NUMBER))


def _first(tl: Timeline, kind: str) -> list[QA]:
    starts = {i: tl.seen[i][0] for i in tl.ever_seen()}
    if not starts:
        return []
    first = min(starts, key=starts.get)
    rivals = min((t for i, t in starts.items() if i != first), default=tl.num_frames)
    frames = [t for t in tl.clear_frames[first] if t < rivals]
    if not frames:
        return []  # a tie, or the first one was never clearly seen before the next arrived
    obj = tl.scene.objects[first]
    if kind == "first_color":
        return [QA("what color was the first shape?", obj.color, kind, frames[0])]
    return [QA("what shape appeared first?", obj.shape, kind, frames[0])]


def _count_frame(tl: Timeline) -> list[QA]:
    return [
        QA(
            f"how many shapes are there at frame {t}?",
            str(sum(s.visible for s in tl.states[t])),
            "count_frame",
            t,
        )
        for t in tl.askable_frames()
        if tl.clean[t]
    ]


def _count_clip(tl: Timeline) -> list[QA]:
    seen = tl.ever_seen()
    if any(not tl.clear_frames[i] for i in seen):
        return []
    return [
        QA("how many shapes appear in the video?", str(len(seen)), "count_clip", tl.num_frames - 1)
    ]


def _direction(tl: Timeline) -> list[QA]:
    out = []
    for i in tl.named():
        obj = tl.scene.objects[i]
        directions = {tl.states[t][i].direction for t in tl.seen[i]}
        if obj.speed > 0 and len(directions) == 1 and len(tl.clear_frames[i]) >= 3:
            question = f"which direction did the {obj.color} {obj.shape} move?"
            out.append(QA(question, directions.pop(), "direction", tl.clear_frames[i][2]))
    return out


def _direction_frame(tl: Timeline) -> list[QA]:
    # Three clear frames with one direction: even 0.5 px/frame shows a pixel of motion.
    out = []
    for i in tl.named():
        obj = tl.scene.objects[i]
        for t in tl.askable_frames()[2:]:
            window = [tl.states[u][i] for u in (t - 2, t - 1, t)]
            if (
                obj.speed > 0
                and all(tl.clear[u][i] for u in (t - 2, t - 1, t))
                and len({s.direction for s in window}) == 1
            ):
                question = f"which direction was the {obj.color} {obj.shape} moving at frame {t}?"
                out.append(QA(question, window[-1].direction, "direction_frame", t))
    return out


def _color_of_shape(tl: Timeline) -> list[QA]:
    out = []
    for shape in SHAPES:
        ids = [i for i in tl.ever_seen() if tl.scene.objects[i].shape == shape]
        if len(ids) == 1 and tl.clear_frames[ids[0]]:
            color = tl.scene.objects[ids[0]].color
            out.append(
                QA(
                    f"what color is the {shape}?",
                    color,
                    "color_of_shape",
                    tl.clear_frames[ids[0]][0],
                )
            )
    return out


def _exists(tl: Timeline) -> list[QA]:
    out = []
    for color in COLORS:
        for shape in SHAPES:
            ids = [
                i
                for i in tl.ever_seen()
                if (tl.scene.objects[i].color, tl.scene.objects[i].shape) == (color, shape)
            ]
            frames = sorted(t for i in ids for t in tl.clear_frames[i])
            question = f"is there {article(color)} {color} {shape}?"
            if frames:
                out.append(QA(question, "yes", "exists", frames[0]))
            elif not ids:
                out.append(QA(question, "no", "exists", tl.num_frames - 1))
    return out


def _color_frame(tl: Timeline) -> list[QA]:
    out = []
    for t in tl.askable_frames():
        visible = [s for s in tl.states[t] if s.visible]
        if tl.clean[t] and len(visible) == 1:
            question = f"what color was the shape at frame {t}?"
            out.append(QA(question, visible[0].color, "color_frame", t))
    return out


def _extreme(visible: list[ObjectState], where: str) -> ObjectState | None:
    """The object wholly beyond every other one towards `where`, if there is one."""
    key = {
        "top": lambda s: s.center[1],
        "bottom": lambda s: -s.center[1],
        "left": lambda s: s.center[0],
        "right": lambda s: -s.center[0],
    }[where]
    best, *rest = sorted(visible, key=key)
    lo, hi = (1, 3) if where in ("top", "bottom") else (0, 2)
    for other in rest:
        apart = (
            best.box[hi] < other.box[lo]
            if where in ("top", "left")
            else best.box[lo] > other.box[hi]
        )
        if not apart:
            return None
    return best


def _position(tl: Timeline, kind: str) -> list[QA]:
    out = []
    for t in tl.askable_frames():
        visible = [s for s in tl.states[t] if s.visible]
        if not tl.clean[t] or len(visible) < 2:
            continue
        for where in ("top", "bottom", "left", "right"):
            hit = _extreme(visible, where)
            if hit is None:
                continue
            place = f"{'at' if where in ('top', 'bottom') else 'on'} the {where}"
            if kind == "position_color":
                question = f"what color was the shape {place} at frame {t}?"
                out.append(QA(question, hit.color, kind, t))
            else:
                out.append(QA(f"what shape was {place} at frame {t}?", hit.shape, kind, t))
    return out


QA_KINDS: dict[str, Callable[[Timeline], list[QA]]] = {
    "first_color": lambda tl: _first(tl, "first_color"),
    "first_shape": lambda tl: _first(tl, "first_shape"),
    "count_frame": _count_frame,
    "count_clip": _count_clip,
    "direction": _direction,
    "direction_frame": _direction_frame,
    "color_of_shape": _color_of_shape,
    "exists": _exists,
    "color_frame": _color_frame,
    "position_color": lambda tl: _position(tl, "position_color"),
    "position_shape": lambda tl: _position(tl, "position_shape"),
}
"""Question kind -> function listing every unambiguous question of that kind for a clip."""


def _sample(candidates: list[QA], k: int, rng: np.random.Generator) -> list[QA]:
    # Draw an answer uniformly first, then a question with that answer, so a model cannot
    # score by always saying "yes" or the most common count.
    by_answer: dict[str, list[QA]] = defaultdict(list)
    for qa in candidates:
        by_answer[qa.answer].append(qa)
    picked = []
    while by_answer and len(picked) < k:
        answer = sorted(by_answer)[int(rng.integers(len(by_answer)))]
        group = by_answer[answer]
        picked.append(group.pop(int(rng.integers(len(group)))))
        if not group:
            del by_answer[answer]
    return picked


def aux_questions(scene: Scene, num_frames: int, rng: np.random.Generator) -> list[QA]:
    """One answer-balanced question of each training-only auxiliary kind (not in
    `QA_KINDS`; `TrainVQAConfig.aux_tasks` asks them in training) the clip settles:

    - `shape_frame`, "what shape was at frame t?": frame t is clean and shows one object;
    - `motion_frame`, "which direction was the shape moving at frame t?": frames t-2..t
      each show only the same moving object, clear, in one direction (the rule of the
      world's `direction_frame`, without naming the object).
    """
    tl = Timeline(scene, num_frames)
    shape, motion = [], []
    for t in tl.askable_frames():
        alone = [s for s in tl.states[t] if s.visible]
        if not (tl.clean[t] and len(alone) == 1):
            continue
        obj = alone[0]
        shape.append(QA(f"what shape was at frame {t}?", obj.shape, "shape_frame", t))
        window = [tl.states[u] for u in (t - 2, t - 1, t)] if t >= 2 else []
        if (
            window
            and scene.objects[obj.index].speed > 0
            and all(tl.clean[u] for u in (t - 2, t - 1))
            and all([s.index for s in w if s.visible] == [obj.index] for w in window)
            and len({w[obj.index].direction for w in window}) == 1
        ):
            question = f"which direction was the shape moving at frame {t}?"
            motion.append(QA(question, obj.direction, "motion_frame", t))
    return [*_sample(shape, 1, rng), *_sample(motion, 1, rng)]


def make_qa(
    scene: Scene,
    num_frames: int,
    rng: np.random.Generator | None = None,
    per_kind: int | None = 1,
) -> list[QA]:
    """Question/answer pairs about frames 0..num_frames-1 of `scene`.

    Args:
        scene: The scene; answers come from its per-frame states.
        num_frames: Length of the clip the questions are about.
        rng: Chooses among the candidate questions (default: a generator seeded with 0).
        per_kind: Questions drawn per kind; None keeps every candidate, in a fixed order.

    Returns:
        Pairs grouped by kind in `QA_KINDS` order; kinds with no unambiguous question for
        this clip contribute none.
    """
    rng = rng if rng is not None else np.random.default_rng(0)
    timeline = Timeline(scene, num_frames)
    out = []
    for generate in QA_KINDS.values():
        candidates = generate(timeline)
        out.extend(candidates if per_kind is None else _sample(candidates, per_kind, rng))
    return out
