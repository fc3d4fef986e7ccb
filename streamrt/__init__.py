"""streamrt: a runtime that turns video models into live streams."""

__version__ = "0.1.0"

from streamrt.cache import CacheManager, KVSpec
from streamrt.config import CacheConfig, StreamrtConfig, load_config

__all__ = ["CacheConfig", "CacheManager", "KVSpec", "StreamrtConfig", "__version__", "load_config"]
