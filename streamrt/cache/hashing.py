"""Chained block hashes for prefix sharing: `h_i = sha256(h_{i-1}, tokens_i, extra)`.

sha256, not Python's `hash()`: the value must be the same in every process and run.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence


def hash_block_tokens(
    parent: bytes | None, tokens: Sequence[int], extra: str | bytes = b""
) -> bytes:
    """Hash one block's token ids, chained to the previous block's hash."""
    h = hashlib.sha256(parent or b"\0" * 32)
    h.update(struct.pack(f"<{len(tokens)}q", *tokens))
    h.update(extra.encode() if isinstance(extra, str) else extra)
    return h.digest()


def hash_chain(
    tokens: Sequence[int], tokens_per_block: int, extra: str | bytes = b""
) -> list[bytes]:
    """Hashes of every *full* block of `tokens` (a partial last block is never shared)."""
    hashes: list[bytes] = []
    parent = None
    for start in range(0, len(tokens) - tokens_per_block + 1, tokens_per_block):
        parent = hash_block_tokens(parent, tokens[start : start + tokens_per_block], extra)
        hashes.append(parent)
    return hashes
