"""Failed-login back-off per (client address, presented identity) (contract section 8, Limits).

Pure: the caller passes ``now`` (monotonic seconds). It only counts failures and says how long a
pair stays in back-off; it never decides whether a login is valid, so a valid token is always
accepted by the caller whatever this says. The API matches ``fleetmq.auth.limits.LoginBackoff``
(``failed`` / ``retry_after``) so either can serve the embedded broker.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict, deque

MAX_PAIRS = 100_000
"""Pairs remembered at once; past it the least recently failed pair is forgotten, so an
attacker cycling through addresses or usernames costs bounded memory."""
MAX_IDENTITY_CHARS = 128
"""A longer presented identity (a 10 kB username) is remembered by its SHA-256 digest."""


def identity_key(identity: str | None) -> str:
    """What a presented identity is remembered as: itself, "none", or a digest when long."""
    if identity is None or identity == "":
        return "none"
    if len(identity) <= MAX_IDENTITY_CHARS:
        return identity
    return "sha256:" + hashlib.sha256(identity.encode("utf-8", "surrogatepass")).hexdigest()


class _Pair:
    __slots__ = ("failures", "until")

    def __init__(self, limit: int) -> None:
        self.failures: deque[float] = deque(maxlen=limit)
        self.until = 0.0


class LoginBackoff:
    """After ``limit`` failures within ``window_s`` for one pair, that pair is in back-off for
    ``window_s`` from its latest failure (every further failure extends it)."""

    def __init__(self, limit: int = 10, window_s: float = 60.0,
                 max_pairs: int = MAX_PAIRS) -> None:
        if limit < 1 or window_s <= 0 or max_pairs < 1:
            raise ValueError("limit, window_s and max_pairs must be positive")
        self.limit = limit
        self.window_s = window_s
        self._max_pairs = max_pairs
        self._pairs: OrderedDict[tuple[str, str], _Pair] = OrderedDict()

    def __len__(self) -> int:
        return len(self._pairs)

    def failed(self, address: str, identity: str | None, now: float) -> None:
        """Count one failed login of the pair."""
        key = (address, identity_key(identity))
        pair = self._pairs.pop(key, None)
        if pair is None:
            pair = _Pair(self.limit)
            while len(self._pairs) >= self._max_pairs:
                self._pairs.popitem(last=False)
        self._pairs[key] = pair  # most recently failed last
        failures = pair.failures
        while failures and failures[0] <= now - self.window_s:
            failures.popleft()
        failures.append(now)
        if len(failures) >= self.limit:
            pair.until = now + self.window_s

    def retry_after(self, address: str, identity: str | None, now: float) -> float:
        """Seconds the pair stays in back-off (0.0: not in back-off)."""
        pair = self._pairs.get((address, identity_key(identity)))
        if pair is None:
            return 0.0
        left = pair.until - now
        if left > 0:
            return left
        if pair.failures and pair.failures[-1] <= now - self.window_s:
            del self._pairs[(address, identity_key(identity))]  # quiet for a window: forget
        return 0.0
