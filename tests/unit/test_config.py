"""Typed config: defaults, documentation, YAML presets and their errors."""

import dataclasses
from pathlib import Path

import pytest

from streamrt.config import (
    CacheConfig,
    ConfigError,
    StreamrtConfig,
    field_docs,
    load_config,
    parse_bytes,
)

ROOT = Path(__file__).resolve().parents[2]


def _config_classes(cls=StreamrtConfig, seen=None):
    seen = seen if seen is not None else []
    seen.append(cls)
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default) and type(default) not in seen:
            _config_classes(type(default), seen)
    return seen


def test_every_field_is_defaulted_and_documented():
    for cls in _config_classes():
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            assert (
                f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
            ), f"{cls.__name__}.{f.name} has no default"
            assert docs.get(f.name), f"{cls.__name__}.{f.name} has no docstring"
    assert StreamrtConfig().cache.device_bytes == 2**30


def test_presets_load(tmp_path):
    presets = sorted((ROOT / "configs").glob("*.yaml"))
    assert presets
    for path in presets:
        load_config(path)
    cfg = load_config(ROOT / "configs" / "cache-small.yaml")
    assert cfg.cache.device_bytes == 256 * 2**20 and cfg.cache.host_bytes == 512 * 2**20


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("cache:\n  device_bytez: 1\n", r"bad\.yaml: unknown key 'cache\.device_bytez'"),
        ("cache:\n  pin_host_memory: 3\n", r"key 'cache\.pin_host_memory' must be bool"),
        ("cache:\n  device_bytes: lots\n", r"bad\.yaml: cache\.device_bytes: cannot read 'lots'"),
        ("cachez: {}\n", r"unknown key 'cachez'"),
        ("cache: [1, 2]\n", r"section 'cache\.' must be a mapping"),
        ("cache: {device_bytes: 1\n", r"not valid YAML"),
    ],
)
def test_bad_presets_name_key_and_file(tmp_path, text, match):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_config(path)


def test_missing_file_and_sizes():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("/nonexistent/x.yaml")
    assert parse_bytes("512MiB") == 512 * 2**20
    assert parse_bytes("2 GB") == 2 * 10**9
    assert parse_bytes(4096) == 4096
    assert CacheConfig(disk_bytes="1KiB").disk_bytes == 1024
    with pytest.raises(ValueError, match=">= 0"):
        parse_bytes(-1)
