"""The only place that reads time.

Deadlines use the monotonic clock, timestamps use UTC wall time; both travel together as an
``Instant`` so the registry stays free of I/O and tests drive it with ``FakeClock``.
"""

from __future__ import annotations

import functools
import time
from datetime import UTC, datetime
from typing import NamedTuple, Protocol


class Instant(NamedTuple):
    """One moment, read once from both clocks."""

    mono: float
    """Monotonic seconds: for deadlines and durations."""
    wall: float
    """UTC epoch seconds: for timestamps shown to users."""


class Clock(Protocol):
    def now(self) -> Instant: ...

    def monotonic(self) -> float:
        """``now().mono`` alone: cheap enough to stamp every received message."""
        ...


def _since_boot() -> float:
    """Seconds that keep counting while the host is suspended (Linux ``CLOCK_BOOTTIME``;
    elsewhere the monotonic clock)."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


class SystemClock:
    def now(self) -> Instant:
        return Instant(time.monotonic(), time.time())

    monotonic = staticmethod(time.monotonic)
    since_boot = staticmethod(_since_boot if hasattr(time, "CLOCK_BOOTTIME") else time.monotonic)
    """For the lease's deadline: a host that wakes from a suspend longer than the lease finds
    it passed (the monotonic clock stands still while suspended)."""


class FakeClock:
    """A clock that moves only when told to."""

    def __init__(self, wall: float = 1_771_230_600.0, mono: float = 1000.0) -> None:
        self._mono = mono
        self._wall = wall

    def now(self) -> Instant:
        return Instant(self._mono, self._wall)

    def monotonic(self) -> float:
        return self._mono

    def advance(self, seconds: float) -> Instant:
        self._mono += seconds
        self._wall += seconds
        return self.now()


@functools.lru_cache(maxsize=64)
def _second(seconds: int) -> str:
    # Most timestamps formatted in a burst share their second: strftime once per second.
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S")


@functools.lru_cache(maxsize=16)
def _millisecond(ms: int) -> str:
    # Replies and statuses of a burst share their millisecond: formatted once per millisecond.
    seconds, ms = divmod(ms, 1000)
    return f"{_second(seconds)}.{ms:03d}Z"


def format_timestamp(wall: float) -> str:
    """RFC 3339, UTC, milliseconds, ending in ``Z``: ``2026-02-16T08:30:00.000Z``."""
    return _millisecond(round(wall * 1000))
