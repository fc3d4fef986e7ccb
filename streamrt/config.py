"""Typed configuration: one dataclass per subsystem, every field defaulted and documented.

YAML presets in `configs/` only fill these in. `load_config` rejects unknown keys and
wrong types with a message that names the key and the file.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

T = TypeVar("T")

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_bytes(value: int | str, what: str = "size") -> int:
    """Parse 1048576, "512MiB", "2 GB" into a byte count."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"{what} must be >= 0, got {value}")
        return value
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", str(value))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(
            f"{what}: cannot read {value!r} as a size; write e.g. 4096, '512MiB' or '2GiB'"
        )
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


@dataclass
class CacheConfig:
    """Budgets and behaviour of the one `CacheManager` of a process."""

    device_bytes: int | str = "1GiB"
    """Byte budget of the device tier (the model's device: GPU memory, or RAM on CPU)."""

    host_bytes: int | str = "2GiB"
    """Byte budget of the host tier (pinned RAM when CUDA is present)."""

    disk_bytes: int | str | None = None
    """Byte budget of the disk tier; None: limited only by the disk."""

    disk_dir: str | None = None
    """Directory of the disk tier; None disables it (blocks leaving the host are dropped)."""

    page_bytes: int | str = 0
    """Size of one pool page (one block of any consumer). 0: the largest block among
    consumers registered before the first allocation."""

    pin_host_memory: bool = True
    """Pin the host pool when CUDA is available, so device<->host copies run asynchronously."""

    device: str | None = None
    """Device of the device tier ("cuda", "cuda:1", "cpu"); None: CUDA if available, else CPU."""

    def __post_init__(self) -> None:
        self.device_bytes = parse_bytes(self.device_bytes, "cache.device_bytes")
        self.host_bytes = parse_bytes(self.host_bytes, "cache.host_bytes")
        self.page_bytes = parse_bytes(self.page_bytes, "cache.page_bytes")
        if self.disk_bytes is not None:
            self.disk_bytes = parse_bytes(self.disk_bytes, "cache.disk_bytes")


@dataclass
class BenchConfig:
    """Defaults of `streamrt bench`."""

    repeats: int = 3
    """Times each measurement is repeated; the best is reported (machines here are noisy)."""

    json_path: str | None = None
    """Write the numbers to this JSON file as well as printing the table."""


@dataclass
class StreamrtConfig:
    """All subsystems; a YAML preset fills any subset of these sections."""

    cache: CacheConfig = field(default_factory=CacheConfig)
    """The KV-cache manager."""

    bench: BenchConfig = field(default_factory=BenchConfig)
    """Benchmarks."""


class ConfigError(ValueError):
    """A config file has an unknown key or a value of the wrong type."""


def _type_ok(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if tp is type(None):
        return value is None
    if origin in (Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(tp))
    if origin is Literal:
        return value in typing.get_args(tp)
    if origin in (list, tuple):
        args = typing.get_args(tp)
        return (
            isinstance(value, (list, tuple)) and all(_type_ok(v, args[0]) for v in value)
            if args
            else True
        )
    if origin is dict:
        return isinstance(value, dict)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def _describe(tp: Any) -> str:
    return str(tp).replace("typing.", "").replace("<class '", "").replace("'>", "")


def from_dict(cls: type[T], data: dict[str, Any], source: str = "<dict>", prefix: str = "") -> T:
    """Build dataclass `cls` from `data`, checking every key and type.

    Raises:
        ConfigError: naming the dotted key and `source` for unknown keys and wrong types.
    """
    if not isinstance(data, dict):
        raise ConfigError(
            f"{source}: section '{prefix or '<top>'}' must be a mapping, got {type(data).__name__}"
        )
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            raise ConfigError(
                f"{source}: unknown key '{dotted}'; known keys here: {', '.join(fields)}"
            )
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = from_dict(tp, value or {}, source, dotted + ".")
        elif not _type_ok(value, tp):
            raise ConfigError(
                f"{source}: key '{dotted}' must be {_describe(tp)}, got {value!r} ({type(value).__name__})"
            )
        else:
            kwargs[key] = value
    try:
        return cls(**kwargs)
    except ValueError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def load_config(path: str | Path | None = None, cls: type[T] = StreamrtConfig) -> T:  # type: ignore[assignment]
    """Read a YAML preset into `cls` (defaults for everything it does not set)."""
    if path is None:
        return cls()
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    return from_dict(cls, data, str(path))


def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings of a config dataclass (the string literal under each field)."""
    import ast
    import inspect
    import textwrap

    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs: dict[str, str] = {}
    for node, nxt in itertools.pairwise(body):
        documented = isinstance(nxt, ast.Expr) and isinstance(
            getattr(nxt, "value", None), ast.Constant
        )
        if documented and isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            docs[node.target.id] = str(nxt.value.value).strip()
    return docs
