"""THE cache manager: every KV byte of every consumer, in device, host and disk tiers."""

from streamrt.cache.block import DEVICE, DISK, HOST, KVBlock
from streamrt.cache.errors import (
    BudgetError,
    CacheError,
    CorruptBlockError,
    DiskTierError,
    OutOfBlocksError,
    SpecMismatchError,
)
from streamrt.cache.hashing import hash_block_tokens, hash_chain
from streamrt.cache.manager import CacheManager
from streamrt.cache.policies import POLICIES, CachePolicy, make_policy
from streamrt.cache.sequence import AttentionPlan, KeyRotation, Sequence
from streamrt.cache.spec import Consumer, KVSpec

__all__ = [
    "DEVICE",
    "DISK",
    "HOST",
    "POLICIES",
    "AttentionPlan",
    "BudgetError",
    "CacheError",
    "CacheManager",
    "CachePolicy",
    "Consumer",
    "CorruptBlockError",
    "DiskTierError",
    "KVBlock",
    "KVSpec",
    "KeyRotation",
    "OutOfBlocksError",
    "Sequence",
    "SpecMismatchError",
    "hash_block_tokens",
    "hash_chain",
    "make_policy",
]
