"""Errors raised by the cache manager. Every message says what to change."""

from streamrt.errors import StreamrtError


class CacheError(StreamrtError, RuntimeError):
    """Base class for cache-manager errors."""


class DiskTierError(CacheError):
    """The disk tier cannot be used or a write to it failed."""


class CorruptBlockError(CacheError):
    """A block read back from disk failed its checksum; it is never served."""


class OutOfBlocksError(CacheError):
    """No block could be found in a tier, even after evicting what policy and priority allow."""


class SpecMismatchError(CacheError):
    """A tensor or a stored block does not match the consumer's KV spec."""


class BudgetError(CacheError):
    """A budget or quota cannot hold even one block of a consumer."""
