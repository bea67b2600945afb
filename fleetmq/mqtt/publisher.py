"""Everything the manager publishes: retained node statuses, replies, its own presence.

Statuses are merged per node while they wait (the latest state wins: each is read from the
registry at send time, so a deleted node's topic is cleared and a newer state is never
overwritten). In-flight QoS 1 publishes are bounded (packet ids run out at 65,535, and the
broker's receive maximum may allow fewer: the link keeps to it). Republishing the whole fleet
after a (re)connect runs behind live changes, in batches that yield to the event loop, so it
never blocks ingest.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict, deque
from typing import Any

from fleetmq.aio import wait_set
from fleetmq.core.events import Event
from fleetmq.core.registry import Registry
from fleetmq.core.topics import Topics
from fleetmq.metrics import Metrics
from fleetmq.mqtt.link import MqttLink
from fleetmq.views import dumps, node_status_payload

log = logging.getLogger(__name__)

MAX_IN_FLIGHT = 4_096
"""QoS 1 publishes awaiting PUBACK (fewer if the broker's receive maximum says so). The round
trip is the manager's own loop as much as the broker: with the loop busy applying a flood, 256
(the bound until issue 9) dropped 30% of the replies of a registration flood past REPLY_BOUND
(bench/README.md section 14); 4,096 is a few hundred KB to send again after a lost connection."""
REPLY_BOUND = 10_000
"""Replies waiting for the broker; past it the oldest is dropped (and counted)."""
BATCH = 500


class Publisher:
    def __init__(self, link: MqttLink, topics: Topics, registry: Registry, metrics: Metrics,
                 max_in_flight: int = MAX_IN_FLIGHT) -> None:
        self._link = link
        self._topics = topics
        self._registry = registry
        self._metrics = metrics
        self._max_in_flight = max_in_flight
        self._pending: OrderedDict[str, None] = OrderedDict()
        self._replies: deque[tuple[str, bytes, bytes | None]] = deque()
        self._sweep: list[str] = []
        self._sweep_pos = 0
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def backlog(self) -> int:
        return len(self._pending) + len(self._replies) + len(self._sweep) - self._sweep_pos

    def on_events(self, events: list[Event]) -> None:
        for event in events:
            self._pending[event.node_id] = None
        if events:
            self._idle.clear()
            self._wake.set()

    def clear_status(self, node_id: str) -> None:
        """Send the node's current status, or clear its topic if the node is unknown."""
        self._pending[node_id] = None
        self._idle.clear()
        self._wake.set()

    def reply(self, topic: str, body: dict[str, Any], correlation: bytes | None = None) -> None:
        if len(self._replies) >= REPLY_BOUND:
            self._replies.popleft()
            self._metrics.replies_overflowed += 1
        self._replies.append((topic, dumps(body), correlation))
        self._idle.clear()
        self._wake.set()

    def republish_all(self) -> None:
        """Queue every known node's status, behind live changes."""
        self._sweep = self._registry.ids()
        self._sweep_pos = 0
        log.info("republish_started nodes=%d", len(self._sweep))
        self._wake.set()

    def publish_presence(self, payload: bytes) -> bool:
        return self._link.publish(self._topics.manager_status, payload, retain=True)

    async def drain(self, timeout_s: float) -> bool:
        """Wait until queued statuses and replies are handed to the broker link (shutdown)."""
        return await wait_set(self._idle, timeout_s)

    async def run(self) -> None:
        while True:
            if not (self._pending or self._replies):
                self._idle.set()
            if not self.backlog:
                self._wake.clear()
                await self._wake.wait()
                continue
            await self._link.wait_credit(self._max_in_flight)
            try:
                progressed = self._send_batch(
                    min(BATCH, self._max_in_flight - self._link.in_flight))
            except Exception:
                log.exception("publish_failed")
                progressed = False
            # Nothing went out (the link dropped under us): wait a moment rather than spin.
            await asyncio.sleep(0 if progressed else 0.1)

    def _send_batch(self, budget: int) -> bool:
        """Send up to ``budget`` messages; False when nothing could be sent."""
        start = budget
        link = self._link
        metrics = self._metrics
        while budget > 0 and self._replies:
            topic, payload, correlation = self._replies[0]
            if not link.publish(topic, payload, correlation=correlation):
                return budget < start
            self._replies.popleft()
            metrics.replies_published += 1
            budget -= 1
        while budget > 0 and self._pending:
            node_id, _ = self._pending.popitem(last=False)
            if not self._send_status(node_id):
                self._pending[node_id] = None
                self._pending.move_to_end(node_id, last=False)
                return budget < start
            budget -= 1
        while budget > 0 and self._sweep_pos < len(self._sweep):
            node_id = self._sweep[self._sweep_pos]
            node = self._registry.get(node_id)
            # A deleted node is skipped; a node with a newer state waiting goes out with it.
            if node is not None and node_id not in self._pending:
                if not link.publish(self._topics.status(node_id), node_status_payload(node),
                                    retain=True):
                    return budget < start
                metrics.status_published += 1
                budget -= 1
            self._sweep_pos += 1
        if self._sweep and self._sweep_pos >= len(self._sweep):
            log.info("republish_finished nodes=%d", len(self._sweep))
            self._sweep = []
            self._sweep_pos = 0
        return True

    def _send_status(self, node_id: str) -> bool:
        node = self._registry.get(node_id)
        payload = node_status_payload(node) if node is not None else b""
        sent = self._link.publish(self._topics.status(node_id), payload, retain=True)
        if sent:
            self._metrics.status_published += 1
        return sent
