"""What a cache policy keeps, against a FIFO window of the same budget.

A snapshot is the kept device frames of a stream between two chunks (their indices, in
time order) with each one's importance (`KVBlock.importance`: what participative
compression ranks by). `kept_report` says how often the kept set differs from the FIFO
one (the same sink frames, then the newest frames up to the same count), how old the
kept frames are, and how importance relates to recency: when importance only grows with
recency, "drop the least important" is "drop the oldest", and the policy is FIFO.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

Snapshot = tuple[list[int], list[float]]


def fifo_set(kept: Sequence[int], sink: int) -> set[int]:
    """What a FIFO window keeps with as many frames as `kept`: the sink frames `kept`
    holds (indices < `sink`) and the newest of the others, up to the same count."""
    sinks = {i for i in kept if i < sink}
    newest = max(kept)
    return sinks | set(range(newest - (len(kept) - len(sinks)) + 1, newest + 1))


def _spearman(a: np.ndarray, b: np.ndarray) -> float | None:
    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return None
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def kept_report(snapshots: list[Snapshot], sink: int) -> dict[str, float | None]:
    """Over `snapshots`, excluding the `sink` frames:

    - `differs`: share of snapshots whose kept set is not the FIFO window's;
    - `jaccard`: mean overlap |kept & fifo| / |kept | fifo| of the non-sink frames;
    - `age`, `fifo_age`: mean age (newest index - index) of the kept non-sink frames and of
      FIFO's (equal when the sets are);
    - `recency_corr`: mean Spearman correlation between importance and index over the
      observed (importance != 0) non-sink frames: +1 means importance orders the frames
      exactly as recency does.
    """
    differs, jac, age, fifo_age, corr = [], [], [], [], []
    for kept, importance in snapshots:
        if not kept:
            continue
        fifo = fifo_set(kept, sink)
        mine = {i for i in kept if i >= sink}
        theirs = {i for i in fifo if i >= sink}
        newest = max(kept)
        differs.append(set(kept) != fifo)
        if mine:  # FIFO keeps as many non-sink frames, so `theirs` is not empty either
            jac.append(len(mine & theirs) / len(mine | theirs))
            age.append(float(np.mean([newest - i for i in mine])))
            fifo_age.append(float(np.mean([newest - i for i in theirs])))
        seen = [(i, s) for i, s in zip(kept, importance) if i >= sink and s != 0]
        if seen:
            c = _spearman(np.array([i for i, _ in seen]), np.array([s for _, s in seen]))
            if c is not None:
                corr.append(c)

    def mean(v: list) -> float | None:
        return float(np.mean(v)) if v else None

    return {
        "differs": mean(differs),
        "jaccard": mean(jac),
        "age": mean(age),
        "fifo_age": mean(fifo_age),
        "recency_corr": mean(corr),
    }
