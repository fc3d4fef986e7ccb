"""Cache policies, chosen by name. Each is one small class on `CachePolicy`."""

from __future__ import annotations

from typing import Any

from streamrt.cache.policies.base import CachePolicy, contiguous_plan
from streamrt.cache.policies.deep_sink import DeepSinkPolicy
from streamrt.cache.policies.ema_sink import EmaSinkPolicy
from streamrt.cache.policies.full import FullPolicy
from streamrt.cache.policies.participative import DeepSinkParticipativePolicy, ParticipativePolicy
from streamrt.cache.policies.sink_window import SinkWindowPolicy
from streamrt.errors import InputError

POLICIES: dict[str, type[CachePolicy]] = {
    FullPolicy.name: FullPolicy,
    SinkWindowPolicy.name: SinkWindowPolicy,
    DeepSinkPolicy.name: DeepSinkPolicy,
    EmaSinkPolicy.name: EmaSinkPolicy,
    ParticipativePolicy.name: ParticipativePolicy,
    DeepSinkParticipativePolicy.name: DeepSinkParticipativePolicy,
}


def make_policy(name: str | CachePolicy, **kwargs: Any) -> CachePolicy:
    """Build a policy from its name (or pass an instance through)."""
    if isinstance(name, CachePolicy):
        return name
    if name not in POLICIES:
        raise InputError(
            f"unknown cache policy {name!r}; choose one of: {', '.join(sorted(POLICIES))}"
        )
    try:
        return POLICIES[name](**kwargs)
    except TypeError as exc:
        raise InputError(f"bad arguments for cache policy {name!r}: {exc}") from None


__all__ = [
    "POLICIES",
    "CachePolicy",
    "DeepSinkParticipativePolicy",
    "DeepSinkPolicy",
    "EmaSinkPolicy",
    "FullPolicy",
    "ParticipativePolicy",
    "SinkWindowPolicy",
    "contiguous_plan",
    "make_policy",
]
