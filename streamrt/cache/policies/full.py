"""Keep everything; under memory pressure give up the least recently used blocks."""

from __future__ import annotations

from typing import TYPE_CHECKING

from streamrt.cache.block import DEVICE
from streamrt.cache.policies.base import CachePolicy

if TYPE_CHECKING:
    from streamrt.cache.sequence import Sequence


class FullPolicy(CachePolicy):
    """Full attention over every device block at its original position."""

    name = "full"

    def select_victims(self, seq: Sequence, n: int) -> list[int]:
        items = sorted(seq.items(DEVICE), key=lambda ib: (ib[1].last_access, ib[0]))
        return [i for i, _ in items[:n]]
