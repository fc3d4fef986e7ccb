"""streamrt: a runtime that turns video models into live streams."""

__version__ = "0.1.0"

from streamrt.cache import CacheManager, KVSpec
from streamrt.config import CacheConfig, StreamrtConfig, load_config

_LAZY = {"StreamGenerator": "streamrt.gen.generator", "VideoQA": "streamrt.qa"}


def __getattr__(name: str):
    # Heavy subsystems (diffusers, transformers) load on first use, not on `import streamrt`.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'streamrt' has no attribute {name!r}")


__all__ = [
    "CacheConfig",
    "CacheManager",
    "KVSpec",
    "StreamGenerator",
    "StreamrtConfig",
    "__version__",
    "load_config",
]
