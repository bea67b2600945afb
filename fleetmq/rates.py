"""Per-node message rates on the one write path, over MQTT and REST alike, whether auth is on
or off (contract sections 8 "Limits" and 11), and the flood watch that has a node cut off at
its broker.

A node may send ``rate`` registers and heartbeats a second (burst ``burst``); past that a
message is refused and counted, so up to the manager's ingest capacity a flooding node costs
the others nothing. A node whose refused messages show it sending above ``FLOOD_FACTOR`` times
its rate for ``FLOOD_WINDOW_S`` is reported to the flood listeners (the embedded broker
disconnects it, dynsec disables it) once per ``CUT_OFF_S``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from fleetmq.auth.limits import KeyedLimiter
from fleetmq.errors import FleetmqError

log = logging.getLogger(__name__)

FLOOD_FACTOR = 10
FLOOD_WINDOW_S = 10.0
CUT_OFF_S = 60.0
ANSWER_EVERY_S = 1.0
"""MQTT: at most one 429 reply a second to a node over its rate."""
MAX_TRACKED = 100_000


class RateLimitedError(FleetmqError):
    def __init__(self, node_id: str, retry_after_s: float, answer: bool) -> None:
        super().__init__(f"node {node_id} is over its message rate")
        self.node_id = node_id
        self.retry_after_s = retry_after_s
        self.answer = answer
        """Whether this refusal gets a reply over MQTT (one a second at most)."""


class _Refusals:
    __slots__ = ("answered_at", "count", "since")

    def __init__(self, now: float) -> None:
        self.since = now
        self.count = 0
        self.answered_at = -ANSWER_EVERY_S


class NodeRates:
    def __init__(self, rate: float, burst: int) -> None:
        self._limiter = KeyedLimiter(rate, burst, max_keys=MAX_TRACKED)
        self._refusals: dict[str, _Refusals] = {}
        # Sending at FLOOD_FACTOR x rate means (FLOOD_FACTOR - 1) x rate refused a second.
        self._flood_refusals = (FLOOD_FACTOR - 1) * rate * FLOOD_WINDOW_S
        self.flood_count = int(self._flood_refusals)
        """Messages in one window that make a sender a flooder (brokers that know who sent
        what check the node itself sent that many before cutting it off)."""
        self._cut_until: dict[str, float] = {}
        self._listeners: list[Callable[[str], None]] = []
        self.refused = 0

    def add_flood_listener(self, listener: Callable[[str], None]) -> None:
        """``listener(node_id)``: cut the node off at the broker for ``CUT_OFF_S``."""
        self._listeners.append(listener)

    def check(self, node_id: str, now: float, sender: str | None = None) -> None:
        """Take one message of the node's rate at ``now`` (monotonic seconds); raise
        ``RateLimitedError`` when it has none left.

        ``sender``: an API key speaking for the node (REST knows who sent what), which gets a
        budget of its own for that node, so that a key cannot use up the node's own budget
        or get it cut off; its floods are bounded by the key's own rate. None: the node
        itself, or a sender nobody can tell (MQTT, where only the broker knows)."""
        wait = self._limiter.take(node_id if sender is None else f"{node_id}\0{sender}", now)
        if wait == 0.0:
            return
        self.refused += 1
        if sender is not None:
            raise RateLimitedError(node_id, wait, answer=True)
        refusals = self._refusals.get(node_id)
        if refusals is None or now - refusals.since >= FLOOD_WINDOW_S:
            if refusals is None and len(self._refusals) >= MAX_TRACKED:
                self._forget(now)
            refusals = self._refusals[node_id] = _Refusals(now)
        refusals.count += 1
        if refusals.count >= self._flood_refusals:
            self._flooding(node_id, now)
        answer = now - refusals.answered_at >= ANSWER_EVERY_S
        if answer:
            refusals.answered_at = now
        raise RateLimitedError(node_id, wait, answer)

    def _flooding(self, node_id: str, now: float) -> None:
        if self._cut_until.get(node_id, 0.0) > now:
            return
        for gone in [n for n, until in self._cut_until.items() if until <= now]:
            del self._cut_until[gone]
        self._cut_until[node_id] = now + CUT_OFF_S
        log.warning("node_flooding node_id=%s cut_off_s=%g", node_id, CUT_OFF_S)
        for listener in self._listeners:
            try:
                listener(node_id)
            except Exception:
                log.exception("flood_listener_failed node_id=%s", node_id)

    def _forget(self, now: float) -> None:
        for node_id in [n for n, r in self._refusals.items()
                        if now - r.since >= FLOOD_WINDOW_S]:
            del self._refusals[node_id]
