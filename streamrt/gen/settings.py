"""How a stream's `GenConfig` is put together, and its cache window sized for its sampler.

    model's manifest `gen:`  <  preset `gen:` section  <  keyword overrides / CLI flags
    (defaults)                  (the user's)               (the user's)

Policy arguments belong to their policy. Switching `policy` without new `policy_args`
starts from the new policy's own defaults (another policy's arguments mean nothing to it,
e.g. the shipped model's `sink_blocks: 0` is no deep sink). New `policy_args` replace the
old ones as a whole, and their keys are the user's ("given").

Window sizing (`fit_window`): the frames a sampler keeps in flight are written into the
policy's window (`CachePolicy.window_arg`), which must hold them all or the policy would
evict a block still being denoised:

    chunkwise               one chunk              chunk_frames          e.g. 3
    rolling, stream_batch   one chunk per step     steps x chunk_frames  e.g. 4 x 3 = 12

A window the user did not set grows to that many frames; one the user set is never
changed, and too small it is refused with the value to use.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping
from typing import Any

from streamrt.config import GenConfig
from streamrt.errors import InputError
from streamrt.gen.samplers import frames_in_flight


def apply_changes(
    base: GenConfig, given: Collection[str], changes: Mapping[str, Any]
) -> tuple[GenConfig, frozenset[str]]:
    """`base` with `changes` (GenConfig fields) applied, and the policy arguments now given.

    Args:
        base: The settings so far.
        given: Policy arguments of `base` the user set.
        changes: Fields to set (a preset's `gen:` keys or keyword overrides).
    """
    changes = dict(changes)
    fields = {f.name for f in dataclasses.fields(GenConfig)}
    unknown = sorted(set(changes) - fields)
    if unknown:
        raise InputError(
            f"unknown generation setting(s) {', '.join(unknown)}; GenConfig fields are: "
            f"{', '.join(sorted(fields))}"
        )
    if "policy_args" in changes:
        args = changes["policy_args"]
        if not isinstance(args, Mapping):
            raise InputError(f"policy_args must be a mapping of argument to value, got {args!r}")
        changes["policy_args"] = dict(args)
        given = frozenset(args)
    elif changes.get("policy", base.policy) != base.policy:
        changes["policy_args"] = {}
        given = frozenset()
    return dataclasses.replace(base, **changes), frozenset(given)


def fit_window(config: GenConfig, given: Collection[str]) -> GenConfig:
    """`config` with the policy's window large enough for the sampler's frames in flight.

    Raises:
        InputError: a window in `given` is too small, naming the value to use; or the
            sampler is unknown.
    """
    from streamrt.cache.policies import POLICIES

    in_flight, why = frames_in_flight(config.sampler, len(config.timesteps), config.chunk_frames)
    policy = POLICIES.get(config.policy)
    if policy is None:
        return config  # `make_policy` names the choices when the stream opens
    args = policy.fit_args(config.policy_args, in_flight, given, why)
    if args == config.policy_args:
        return config
    return dataclasses.replace(config, policy_args=args)
