"""Row parallelism: the batch rows of every streaming forward split over the ranks of a
process group, so each denoising step of a stream batch runs on its own rank.

A stream-batch forward has one row per denoising step in flight (`samplers.py`): row i is
the chunk at step i, and every row's self-attention reads the K/V that this same forward
computes for the chunks in flight. Split over P ranks (row j on rank j mod P):

    rank r    embeds its rows -> per layer: q, k, v of its rows
              all-gather k, v of every row   -> writes every row's K/V into its own cache
              attends its own rows           (same plan, same positions as one process)
              ... -> velocity of its rows -> all-gather -> every rank has every row's velocity

Every rank keeps a full replica of the stream's cache and runs the same sampler loop with
the same seed, so noise, re-noise, policies and evictions agree without messages beyond
the two gathers; only rank 0 needs to write the frames out. With one row per rank
(P = number of steps) this is the timestep pipeline of ALGORITHMS.md 1.10: one finished
chunk per single-row forward, latency unchanged. The output equals the single-process
stream batch up to float summation order (tests/unit/test_parallel.py).

Partial, on purpose: the cache is replicated (not split) across ranks, and a rank with no
row of a forward (warm-up, the clean refresh, chunk-wise sampling) runs a dummy row so the
per-layer gathers line up; its result is discarded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class RowParallel:
    """Which rows of a forward this rank computes, and the gathers that share the rest."""

    group: dist.ProcessGroup | None = None
    """The ranks sharing the forwards (None: the default group)."""
    rows_computed: int = 0
    """Real rows this rank has run through the model (dummies not counted)."""
    rows_total: int = 0
    """Rows of all forwards this rank took part in."""

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group)

    @property
    def world(self) -> int:
        return dist.get_world_size(self.group)

    def local_rows(self, rows: int) -> list[int]:
        """Rows this rank computes, padded with row 0 (a dummy) to `per_rank(rows)` rows."""
        mine = list(range(self.rank, rows, self.world))
        self.rows_computed += len(mine)
        self.rows_total += rows
        return mine + [0] * (self.per_rank(rows) - len(mine))

    def per_rank(self, rows: int) -> int:
        return max(1, math.ceil(rows / self.world))

    def gather(self, local: torch.Tensor, rows: int) -> torch.Tensor:
        """Every rank's `local` `[per_rank, ...]` -> the forward's rows `[rows, ...]`."""
        local = local.contiguous()
        parts = [torch.empty_like(local) for _ in range(self.world)]
        dist.all_gather(parts, local, group=self.group)
        return torch.stack([parts[j % self.world][j // self.world] for j in range(rows)])
