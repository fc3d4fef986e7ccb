"""What a consumer stores: its KV spec, and how the manager treats it (quotas, priority)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from streamrt.cache.errors import SpecMismatchError
from streamrt.errors import InputError

_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "float8_e4m3fn": torch.float8_e4m3fn,
    "float8_e5m2": torch.float8_e5m2,
}
"""KV block dtypes. FP8 stores K/V in one byte (writes round and saturate; readers upcast)."""


def dtype_from_name(name: str | torch.dtype) -> torch.dtype:
    """Parse "bfloat16" / "torch.bfloat16" / a torch dtype into a floating torch dtype."""
    if isinstance(name, torch.dtype):
        return name
    key = str(name).removeprefix("torch.")
    if key not in _DTYPES:
        raise InputError(f"unsupported KV dtype {name!r}; choose one of: {', '.join(_DTYPES)}")
    return _DTYPES[key]


@dataclass(frozen=True)
class KVSpec:
    """Shape of one consumer's KV blocks.

    A block holds K and V of `tokens_per_block` tokens for every layer, laid out
    `[2, num_layers, tokens_per_block, num_kv_heads, head_dim]` (token-major, so the
    blocks of a window gather into one `[tokens, heads, head_dim]` tensor per layer).
    """

    num_layers: int
    num_kv_heads: int
    head_dim: int
    tokens_per_block: int
    dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_dim", "tokens_per_block"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise InputError(f"KVSpec.{name} must be a positive int, got {value!r}")
        object.__setattr__(self, "dtype", dtype_from_name(self.dtype))

    @property
    def block_shape(self) -> tuple[int, int, int, int, int]:
        """`(2, layers, tokens, kv_heads, head_dim)`."""
        return (2, self.num_layers, self.tokens_per_block, self.num_kv_heads, self.head_dim)

    @property
    def block_bytes(self) -> int:
        """Bytes of K and V of one block."""
        n = 2 * self.num_layers * self.tokens_per_block * self.num_kv_heads * self.head_dim
        return n * self.dtype.itemsize

    def describe(self) -> dict[str, Any]:
        """Plain-data form, stored with disk blocks and compared on reload."""
        return {
            "num_layers": self.num_layers,
            "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "tokens_per_block": self.tokens_per_block,
            "dtype": str(self.dtype).removeprefix("torch."),
        }

    def check_compatible(self, other: dict[str, Any] | KVSpec, what: str) -> None:
        """Raise `SpecMismatchError` naming every field where `other` differs."""
        theirs = other.describe() if isinstance(other, KVSpec) else other
        ours = self.describe()
        diffs = [
            f"{k}: expected {ours[k]!r}, got {theirs.get(k)!r}"
            for k in ours
            if theirs.get(k) != ours[k]
        ]
        if diffs:
            raise SpecMismatchError(f"{what} does not match the KV spec: " + "; ".join(diffs))

    def check_tensor(self, tensor: torch.Tensor, what: str) -> None:
        """Raise `SpecMismatchError` unless `tensor` has this spec's block shape and dtype."""
        if tuple(tensor.shape) != self.block_shape or tensor.dtype != self.dtype:
            raise SpecMismatchError(
                f"{what}: expected a block of shape {self.block_shape} and dtype {self.dtype}, "
                f"got {tuple(tensor.shape)} {tensor.dtype}"
            )


@dataclass
class Consumer:
    """One user of the cache manager: a generation engine, a QA memory, an agent server.

    Attributes:
        name: Unique name; also the prefix of its disk keys.
        spec: Its KV block layout.
        priority: Higher keeps memory longer; a consumer may take memory from lower ones.
        quotas: Per-tier byte limits (`None`: only the tier budget limits it).
        offload: Whether blocks leaving a tier move down (device -> host -> disk) or are dropped.
        used_blocks: Blocks held per tier (kept by the manager; checked by invariants).
    """

    name: str
    spec: KVSpec
    priority: int = 0
    quotas: dict[str, int | None] = field(default_factory=dict)
    offload: bool = True
    used_blocks: dict[str, int] = field(default_factory=lambda: {"device": 0, "host": 0, "disk": 0})
