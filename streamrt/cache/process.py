"""The process's cache manager: what `StreamGenerator`, `VideoQA` and `AgentEngine` share
when they are opened without a manager and without budgets of their own.

    gen = StreamGenerator.from_pretrained("assets/tiny-world")   # no manager, no budgets
    qa = VideoQA.from_pretrained()                                # the same manager
    gen.engine.cache is qa.manager is process_cache("cpu")        # True

One manager per device (a manager's device tier lives on one device), built at first use
from `CacheConfig()` defaults, or from `configure_process_cache` called before that. A
`streamrt.runtime.Runtime` owns a manager of its own (its `cache` budgets), which its
streams, QA sessions and agents share.

Each generator and agent engine is a consumer of its own ("gen", "gen-2", ...; "agents",
...), unregistered when it is garbage-collected; QA sessions of one model share one ("qa"),
as on a `Runtime`. Pages fit one block of every consumer: a
consumer with larger blocks than the pages re-sizes them while no block is in use; while
blocks of others are in use it cannot, and the model gets a private manager instead (logged
once per process, with what to do about it).
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Callable
from typing import Any

import torch

from streamrt.cache.errors import BudgetError
from streamrt.cache.manager import CacheManager
from streamrt.cache.spec import KVSpec
from streamrt.config import CacheConfig

logger = logging.getLogger(__name__)
_lock = threading.Lock()
_managers: dict[str, CacheManager] = {}
_config = CacheConfig()
_names = itertools.count(1)
_warned: set[str] = set()


def configure_process_cache(config: CacheConfig) -> None:
    """Budgets of the process's managers; before the first one is built (raises after)."""
    global _config
    with _lock:
        if _managers:
            raise BudgetError(
                "the process's cache manager is already in use: configure it before the "
                "first model opens, or give a model its own budgets (cache=CacheConfig(...))"
            )
        _config = config


def process_cache(device: torch.device | str) -> CacheManager:
    """The process's cache manager on `device`, built at the first call for it."""
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:  # "cuda" and "cuda:0" are one card
        dev = torch.device("cuda", torch.cuda.current_device())
    key = str(dev)
    with _lock:
        manager = _managers.get(key)
        if manager is None:
            manager = CacheManager(_config, device=key)
            _managers[key] = manager
        return manager


def is_process_cache(manager: CacheManager) -> bool:
    return _managers.get(str(manager.device)) is manager


def unique_id(prefix: str) -> str:
    """A sequence id no other opener in this process uses (`prefix` + a process counter)."""
    return f"{prefix}{next(_names)}"


def join(
    manager: CacheManager, base: str, spec: KVSpec, share: bool = False, **register: Any
) -> str:
    """A consumer of `manager` with `spec`, named `base` or `base-N`: a new one (registered
    with `register`'s arguments), or with `share` one already registered with this layout
    (QA sessions of one model share theirs, as on a `Runtime`)."""
    with manager._lock:
        names = [base] + [f"{base}-{n}" for n in range(2, len(manager.consumers) + 2)]
        for name in names:
            found = manager.consumers.get(name)
            if found is None:
                manager.register(name, spec, **register)
                return name
            if share and found.spec == spec:
                return name
    raise AssertionError("unreachable: a free name is always among the candidates")


def join_or_own(
    manager: CacheManager,
    base: str,
    spec: KVSpec,
    private: Callable[[], CacheManager],
    what: str,
    share: bool = False,
    **register: Any,
) -> tuple[CacheManager, str]:
    """`join` `manager`; where it is the process's and its pages are in use by smaller
    blocks, a private manager from `private()` instead (logged once per `what`)."""
    try:
        return manager, join(manager, base, spec, share, **register)
    except BudgetError as exc:
        if not is_process_cache(manager):
            raise
        if what not in _warned:
            _warned.add(what)
            logger.warning(
                "%s has its own cache manager: %s. Close the other streams and sessions "
                "first to share the process's, or give it budgets of its own",
                what,
                exc,
            )
        own = private()
        return own, join(own, base, spec, share, **register)


__all__ = ["configure_process_cache", "is_process_cache", "join", "join_or_own", "process_cache"]
