"""Rate limits and the failed-login back-off (contract section 8, "Limits"), as pure state.

Callers pass ``now`` (monotonic seconds); nothing here reads a clock, sleeps or does I/O, so
REST, the embedded broker and the HTTP hooks share these classes and tests drive them with a
fake time. Every table is bounded: an attacker who invents keys or identities costs memory
up to ``max_keys``/``max_pairs`` and no more.
"""

from __future__ import annotations

import itertools
from collections import deque
from typing import Any


class TokenBucket:
    """``rate`` tokens a second up to ``burst``; a full bucket to start with."""

    __slots__ = ("_last", "_tokens", "burst", "rate")

    def __init__(self, rate: float, burst: int) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError(f"a token bucket needs rate > 0 and burst >= 1, not {rate}, {burst}")
        self.rate = rate
        self.burst = burst
        self._tokens = float(burst)
        self._last: float | None = None

    def take(self, now: float, n: float = 1) -> float:
        """0.0 when ``n`` tokens were taken, else the seconds until they would be there
        (nothing is taken then: a refused request costs the caller nothing)."""
        # The refill is inline: this runs for every message and request (NodeRates).
        last = self._last
        if last is None:
            self._last = now
        elif now > last:
            self._tokens = min(float(self.burst), self._tokens + (now - last) * self.rate)
            self._last = now
        if self._tokens >= n:
            self._tokens -= n
            return 0.0
        return (n - self._tokens) / self.rate

    def full_at(self, now: float) -> bool:
        """Whether the bucket is full at ``now``: forgetting it then changes nothing."""
        self.take(now, 0)  # refills, takes nothing
        return self._tokens >= self.burst


class KeyedLimiter:
    """One ``TokenBucket`` per key (a node id, an API key id), at most ``max_keys`` of them.

    When the table is full, buckets that have refilled are dropped (forgetting a full bucket
    changes nothing); if too few were, the least recently used go, which at worst hands those
    keys a fresh burst.
    """

    def __init__(self, rate: float, burst: int, max_keys: int = 100_000) -> None:
        TokenBucket(rate, burst)  # validates the figures once
        if max_keys < 1:
            raise ValueError(f"max_keys must be at least 1, not {max_keys}")
        self.rate = rate
        self.burst = burst
        self.max_keys = max_keys
        self._buckets: dict[str, TokenBucket] = {}

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, key: str, now: float) -> float:
        """0.0 when allowed, else the seconds to wait."""
        bucket = self._buckets.pop(key, None)
        if bucket is None:
            if len(self._buckets) >= self.max_keys:
                self._make_room(now)
            bucket = TokenBucket(self.rate, self.burst)
        self._buckets[key] = bucket  # re-inserted: the dict's order is least recently used first
        return bucket.take(now)

    def _make_room(self, now: float) -> None:
        idle = [key for key, bucket in self._buckets.items() if bucket.full_at(now)]
        for key in idle:
            del self._buckets[key]
        _trim(self._buckets, self.max_keys)


class _Pair:
    __slots__ = ("blocked_until", "failures")

    def __init__(self, limit: int) -> None:
        self.failures: deque[float] = deque(maxlen=limit)
        self.blocked_until = 0.0


class LoginBackoff:
    """Failed logins per (client address, presented identity): after ``limit`` failures
    within ``window_s``, every further failure of that pair blocks it for ``window_s``.

    Only failures are counted and only failures are answered with the back-off: a caller
    checks a valid credential first and never asks here, so a device is never locked out
    by someone else's failures from the same address (NAT).
    """

    def __init__(self, limit: int = 10, window_s: float = 60.0,
                 max_pairs: int = 100_000) -> None:
        if limit < 1 or window_s <= 0 or max_pairs < 1:
            raise ValueError("LoginBackoff needs limit >= 1, window_s > 0 and max_pairs >= 1")
        self.limit = limit
        self.window_s = window_s
        self.max_pairs = max_pairs
        self._pairs: dict[tuple[str, str], _Pair] = {}

    def __len__(self) -> int:
        return len(self._pairs)

    def failed(self, address: str, identity: str, now: float) -> None:
        """Record a failed attempt; the ``limit + 1``-th within the window (and any after it
        while blocked) blocks the pair for ``window_s`` from now."""
        key = (address, identity)
        pair = self._pairs.pop(key, None)
        if pair is None:
            if len(self._pairs) >= self.max_pairs:
                self._make_room(now)
            pair = _Pair(self.limit)
        self._pairs[key] = pair  # most recently failed last
        recent = pair.failures
        while recent and recent[0] <= now - self.window_s:
            recent.popleft()
        if pair.blocked_until > now or len(recent) >= self.limit:
            pair.blocked_until = now + self.window_s
        recent.append(now)

    def retry_after(self, address: str, identity: str, now: float) -> float:
        """Seconds the pair stays blocked; 0.0 when it is not."""
        pair = self._pairs.get((address, identity))
        if pair is None or pair.blocked_until <= now:
            return 0.0
        return pair.blocked_until - now

    def _make_room(self, now: float) -> None:
        horizon = now - self.window_s
        stale = [key for key, pair in self._pairs.items()
                 if pair.blocked_until <= now and (not pair.failures
                                                   or pair.failures[-1] <= horizon)]
        for key in stale:
            del self._pairs[key]
        _trim(self._pairs, self.max_pairs)


def _trim(table: dict[Any, Any], most: int) -> None:
    """Drop the oldest entries down to 90 % of ``most``: the next tenth of new entries then
    costs no scan, so a flood of new keys never costs a full scan per request."""
    keep = most - max(1, most // 10)
    excess = len(table) - keep
    if excess > 0:
        for key in list(itertools.islice(table, excess)):
            del table[key]
