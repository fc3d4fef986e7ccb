"""TokenCake's spatial partitioning: a priority reserve of device KV for critical agents.

A share of the device blocks is kept for critical agents' calls: other calls are admitted
only into the free blocks beyond what the reserve still lacks. The share follows the
critical agents' own use (an exponential moving average, with headroom), between a floor
and a ceiling:

    device blocks  [ held by anyone ........ | free ........................ ]
    reserve        R = clamp(ema(critical held) x headroom, floor, ceiling) x blocks
    a critical call may use    free
    any other call may use     free - max(0, R - critical held)

Critical (ALGORITHMS.md §3.3): a program with a priority above 0, or whose steps other
live programs wait for (`after`, on the critical path of the agent graph); among them,
more dependents first. Compose with a KV policy: `AgentEngine(policy="offload+reserve")`.
"""

from __future__ import annotations

from dataclasses import dataclass

from streamrt.errors import InputError


@dataclass
class SpatialReserve:
    """The reserve's size and its adaptation (module docstring)."""

    floor: float = 0.05
    """Smallest share of the device blocks kept for critical agents."""
    ceiling: float = 0.30
    """Largest share."""
    headroom: float = 1.5
    """The reserve is this many times the critical agents' recent use."""
    weight: float = 0.1
    """Weight of the newest sample in the moving average of the critical agents' use."""
    usage: float = 0.0
    """Moving average of the share of device blocks critical agents hold."""

    def __post_init__(self) -> None:
        if not 0 <= self.floor <= self.ceiling <= 1:
            raise InputError(
                f"SpatialReserve: need 0 <= floor <= ceiling <= 1, got {self.floor}, {self.ceiling}"
            )

    @property
    def ratio(self) -> float:
        """The reserve's share of the device blocks now."""
        return min(self.ceiling, max(self.floor, self.usage * self.headroom))

    def observe(self, critical_held: int, blocks: int) -> None:
        """Critical agents hold `critical_held` of the `blocks` device blocks now."""
        if blocks:
            self.usage += self.weight * (critical_held / blocks - self.usage)

    def room(self, critical: bool, free: int, critical_held: int, blocks: int) -> int:
        """Free blocks a call may take: all for a critical agent, else what the reserve
        does not still need."""
        if critical:
            return free
        lacking = max(0, round(self.ratio * blocks) - critical_held)
        return max(0, free - lacking)
