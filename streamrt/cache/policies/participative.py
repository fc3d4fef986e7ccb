"""Participative Compression (Deep Forcing): keep the past frames recent queries attend to."""

from __future__ import annotations

from collections.abc import Collection
from typing import TYPE_CHECKING, Any

import torch

from streamrt.cache.block import DEVICE
from streamrt.cache.policies.base import CachePolicy, contiguous_plan
from streamrt.errors import InputError

if TYPE_CHECKING:
    from streamrt.cache.sequence import AttentionPlan, Sequence


class ParticipativePolicy(CachePolicy):
    """A budget of N frames: S sink, the R most recent, and the C = N - S - R most important
    frames of the rest, by how much recent queries attended to them.

        device blocks, time order, at the budget (M = N resident before an append):

        [ sink 0..S-1 | candidates ..................... | recent M-R .. M-1 ]
                        importance phi_j = sum_r q_r . k_j   never victims
                        lowest phi leaves first (ties: oldest)

        planned:  [ sink | kept candidates (time order) | recent ] [query], contiguous from 0

    Importance: the engine runs the forward with a scores dict (`ForwardContext.scores`,
    per layer `[rows, kept_tokens]` of `sum_r q_r . k_j` over the forward's queries and
    heads) and hands it to `observe_scores`, which sums each block's tokens over all
    layers into `KVBlock.importance` (one selection for all layers, since a block holds
    every layer; the paper selects per layer). The latest observation of a block replaces
    the previous one. Blocks never observed keep importance 0, so without scores the
    policy degrades to sink + FIFO window.

    Budget: the manager evicts one victim per append once `counts[DEVICE] >= capacity`,
    so `capacity = N` keeps exactly N frames after every append. This is the streaming,
    one-in-one-out form of the paper's compression (which lets the cache grow to a
    maximum, e.g. 21, and then cuts it to N = 16 at once): every time the budget is hit
    the least important candidate leaves, so the kept candidates are always the top C of
    those still resident, in temporal order. Selection happens at `append`, before the new
    chunk's forward, so it uses the queries of the latest forward observed (the previous
    chunk's clean pass: the paper's "clean past queries").

    Args:
        sink_blocks: S, the first frames, never evicted (>= 0).
        budget_blocks: N, frames kept on the device (>= S + R + 1).
        recent_blocks: R, newest frames, never evicted (>= 1, and at least the frames of
            one chunk, which are written into them).
    """

    name = "participative"
    window_arg = "recent_blocks"

    @classmethod
    def fit_args(
        cls, args: dict[str, Any], in_flight: int, given: Collection[str], why: str
    ) -> dict[str, Any]:
        """Grow `recent_blocks` to the frames in flight and, unless the user set it, the
        budget by as much, so the number of candidates C = N - S - R stays the same."""
        out = super().fit_args(args, in_flight, given, why)
        full = {**cls.defaults(), **out}
        grown = full["recent_blocks"] - {**cls.defaults(), **args}["recent_blocks"]
        if grown and "budget_blocks" not in given:
            out["budget_blocks"] = full["budget_blocks"] + grown
        need = full["sink_blocks"] + full["recent_blocks"] + 1
        if "budget_blocks" in given and full["budget_blocks"] < need:
            raise InputError(
                f"budget_blocks={full['budget_blocks']} is too small for {why}: "
                f"recent_blocks {full['recent_blocks']} + sink_blocks {full['sink_blocks']} + 1 "
                f"candidate: use budget_blocks >= {need} (cache policy {cls.name!r})"
            )
        return out

    def __init__(
        self, sink_blocks: int = 3, budget_blocks: int = 16, recent_blocks: int = 4
    ) -> None:
        if sink_blocks < 0:
            raise InputError(f"{self.name} needs sink_blocks >= 0, got {sink_blocks}")
        if recent_blocks < 1:
            raise InputError(f"{self.name} needs recent_blocks >= 1, got {recent_blocks}")
        if budget_blocks < sink_blocks + recent_blocks + 1:
            raise InputError(
                f"{self.name} needs budget_blocks >= sink_blocks + recent_blocks + 1 = "
                f"{sink_blocks + recent_blocks + 1} (at least one candidate), got {budget_blocks}"
            )
        self.sink_blocks = sink_blocks
        self.budget_blocks = budget_blocks
        self.recent_blocks = recent_blocks
        self.capacity = budget_blocks

    def candidates(self, seq: Sequence) -> list[int]:
        """Device blocks that may be evicted: neither sink nor among the R most recent."""
        resident = seq.indices(DEVICE)
        older = resident[: max(len(resident) - self.recent_blocks, 0)]
        return [i for i in older if i >= self.sink_blocks]

    def select_victims(self, seq: Sequence, n: int) -> list[int]:
        ranked = sorted(self.candidates(seq), key=lambda i: (seq.table[i].importance, i))
        return ranked[:n]

    def plan(self, seq: Sequence) -> AttentionPlan:
        return contiguous_plan(seq, seq.indices(DEVICE))

    needs_scores = True
    fold_safe = False

    def observe_scores(
        self,
        seq: Sequence,
        plan: AttentionPlan,
        scores: dict[int, torch.Tensor],
        row: int = 0,
    ) -> None:
        """Store per-block importance from one forward's `ForwardContext.scores`.

        Args:
            seq: The sequence the forward attended over.
            plan: The plan of that forward (the scores' token order).
            scores: Per layer, `[rows, plan.num_tokens]` importance of each kept token.
            row: This sequence's batch row in that forward.
        """
        if not scores or not plan.indices:
            return
        total = None
        for layer, per_row in scores.items():
            s = per_row[row].float()
            if s.shape != (plan.num_tokens,):
                raise InputError(
                    f"scores of layer {layer} have {tuple(s.shape)} values for row {row}, "
                    f"the plan keeps {plan.num_tokens} tokens: pass the scores of this plan's forward"
                )
            total = s if total is None else total + s
        assert total is not None
        per_block = torch.stack([t.sum() for t in total.split(list(plan.lengths))])
        for index, value in zip(plan.indices, per_block.tolist()):
            block = seq.table.get(index)
            if block is not None:
                block.importance = value


class DeepSinkParticipativePolicy(ParticipativePolicy):
    """Deep Forcing as published: a deep sink (S = 10) + participative compression (N = 16, R = 4).

    The plan is contiguous, so the sink sits right before the tail (kept candidates +
    recent), which is Deep Sink's re-alignment (see `DeepSinkPolicy`).
    """

    name = "deep_sink_participative"

    def __init__(
        self, sink_blocks: int = 10, budget_blocks: int = 16, recent_blocks: int = 4
    ) -> None:
        super().__init__(sink_blocks, budget_blocks, recent_blocks)
