"""The single write path into the registry, shared by MQTT ingest and the REST facade.

It reads the clock, applies a validated request, and hands the resulting events to the store
writer, the publisher and the counters. Readers (REST GETs, the publisher) only read the
registry. Registrations and deletes are refused up front while the store is unavailable: they
could not be acknowledged.
"""

from __future__ import annotations

import logging

from fleetmq.core.clock import Clock, Instant
from fleetmq.core.events import Event, NodeTransitioned
from fleetmq.core.models import HeartbeatRequest, RegisterRequest
from fleetmq.core.registry import HeartbeatApplied, Registered, Registry, Waiting
from fleetmq.metrics import Metrics
from fleetmq.mqtt.publisher import Publisher
from fleetmq.rates import NodeRates, RateLimitedError
from fleetmq.store.writer import StoreWriter

log = logging.getLogger(__name__)

EXPIRED_LOG_EVERY_S = 10.0
"""During a mass expiry, one ``nodes_expired`` line per this many seconds with the count since
the last, rather than one per expiry pass (5 a second); the rest is logged once a pass finds
nothing more to expire."""


class Fleet:
    def __init__(self, registry: Registry, clock: Clock, publisher: Publisher,
                 metrics: Metrics, writer: StoreWriter, rates: NodeRates) -> None:
        self.registry = registry
        self.clock = clock
        self.rates = rates
        self._publisher = publisher
        self._metrics = metrics
        self.writer = writer
        self._expired_unlogged = 0
        self._expired_logged_at = float("-inf")

    def register(self, node_id: str, req: RegisterRequest,
                 sender: str | None = None) -> tuple[Registered, Instant]:
        """Raises RateLimitedError, StoreUnavailableError while the store is down,
        NodeConflictError. ``sender``: an API key speaking for the node (``NodeRates``)."""
        self.rates.check(node_id, self.clock.monotonic(), sender)
        self.writer.check_available()
        now = self.clock.now()
        result = self.registry.register(node_id, req, now)
        if result.created:  # debug: a fleet re-registering at once must not flood the log
            log.debug("node_registered node_id=%s type=%s", node_id, req.node_type)
        self._emit(result.events)
        return result, now

    def heartbeat(self, node_id: str, req: HeartbeatRequest,
                  sender: str | None = None) -> tuple[HeartbeatApplied, Instant]:
        """Raises RateLimitedError, NodeNotFoundError. A heartbeat ignored on purpose
        (``result.ignored``) is the transport's to count."""
        now = self.clock.now()  # read once: the rate and the registry take the same moment
        try:
            self.rates.check(node_id, now.mono, sender)
        except RateLimitedError:
            # A last will that takes a live node offline is never refused: the node is gone,
            # and the fleet must know. Any other message past the rate is.
            node = self.registry.get(node_id)
            if req.status != "offline" or node is None or node.status == "offline":
                raise
        result = self.registry.heartbeat(node_id, req, now)
        if result.events:
            self._emit(result.events)
        elif req.status != "offline":  # an offline report changes neither last_seen nor data
            self.writer.touch(node_id)
        return result, now

    def delete(self, node_id: str) -> None:
        """Raises StoreUnavailableError while the store is down, NodeNotFoundError."""
        self.writer.check_available()
        self._emit(self.registry.delete(node_id, self.clock.now()))
        log.info("node_deleted node_id=%s", node_id)

    def expire(self, limit: float | None, max_events: int | None = None,
               waiting: Waiting | None = None) -> int:
        now = self.clock.now()
        events = self.registry.expire(now, limit, max_events, waiting)
        if events:
            self._emit(events)
            self._expired_unlogged += len(events)
        if self._expired_unlogged and (
                not events or now.mono - self._expired_logged_at >= EXPIRED_LOG_EVERY_S):
            log.info("nodes_expired count=%d", self._expired_unlogged)
            self._expired_unlogged = 0
            self._expired_logged_at = now.mono
        return len(events)

    def grant_grace(self) -> None:
        self.registry.grant_grace(self.clock.now())

    def _emit(self, events: list[Event]) -> None:
        for event in events:
            if isinstance(event, NodeTransitioned):
                self._metrics.transitions[event.status] += 1
                log.debug("node_status node_id=%s status=%s reason=%s",
                          event.node_id, event.status, event.reason)
        self.writer.record(events)
        self._publisher.on_events(events)
