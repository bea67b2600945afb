"""Wiring and lifecycle: builds every part from ``Settings`` and runs them together.

``FleetService`` is ready when ``__aenter__`` returns (REST bound; the broker connection comes
up in the background and ``/readyz`` follows it). Shutdown runs in reverse: REST stops taking
requests and finishes those in flight, the loops stop, the manager publishes its offline status
and disconnects cleanly, then the embedded broker (if any) stops.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import AsyncExitStack
from typing import Any

from fleetmq.broker import EmbeddedBroker
from fleetmq.clock import Clock, SystemClock
from fleetmq.config import Settings
from fleetmq.errors import BrokerError
from fleetmq.fleet import Fleet
from fleetmq.http import HttpServer, RestApi
from fleetmq.ingest import MqttIngest
from fleetmq.metrics import Metrics
from fleetmq.mqtt import MqttLink, Will
from fleetmq.publisher import Publisher
from fleetmq.registry import Registry
from fleetmq.topics import Topics
from fleetmq.views import manager_status_payload

log = logging.getLogger(__name__)

EXPIRY_TICK_S = 0.2
EXPIRY_BATCH = 10_000
"""Nodes expired between two yields to the event loop: a mass expiry never stalls REST."""
IN_HAND_MARGIN_S = 0.05
"""With nothing queued, expiry still stays this far behind now: paho's thread may hold a
message it has stamped but not yet queued."""
GOODBYE_TIMEOUT_S = 3.0


class FleetService:
    def __init__(self, settings: Settings, clock: Clock | None = None) -> None:
        self.settings = settings
        self.clock = clock or SystemClock()
        self.topics = Topics(settings.topic_root)
        self.metrics = Metrics()
        self.registry = Registry(settings.heartbeat_interval_s, settings.default_timeout_s)
        self.link = MqttLink(
            settings.broker,
            settings.mqtt_client_id,
            subscriptions=[self.topics.register_filter, self.topics.heartbeat_filter],
            will=Will(self.topics.manager_status,
                      manager_status_payload("offline", None, "connection_lost")),
            keepalive_s=settings.keepalive_s,
            # amqtt speaks 3.1.1 only
            prefer_mqtt5=settings.mqtt_version == "5" and not settings.broker.embedded,
            monotonic=self.clock.monotonic,
        )
        self.publisher = Publisher(self.link, self.topics, self.registry, self.metrics)
        self.fleet = Fleet(self.registry, self.clock, self.publisher, self.metrics)
        self.ingest = MqttIngest(self.link, self.topics, self.fleet, self.publisher, self.metrics)
        self.api = RestApi(self.fleet, self.registry, self.link, self.publisher, self.metrics,
                           settings.http, settings.topic_root)
        self.http = HttpServer(self.api, settings.http)
        self._stack = AsyncExitStack()
        self._tasks: list[asyncio.Task[Any]] = []
        self._group: asyncio.TaskGroup | None = None
        self._publisher_task: asyncio.Task[None] | None = None

    @property
    def http_port(self) -> int:
        return self.http.port

    async def __aenter__(self) -> FleetService:
        stack = self._stack
        try:
            self.http.check_port_free()
            broker = self.settings.broker
            if broker.embedded:
                await stack.enter_async_context(EmbeddedBroker(broker.host, broker.port))
            self.fleet.grant_grace()
            await stack.enter_async_context(self.link)
            stack.push_async_callback(self._say_goodbye)
            group = self._group = await stack.enter_async_context(asyncio.TaskGroup())
            stack.push_async_callback(self._stop_loops)
            self._publisher_task = group.create_task(self.publisher.run(), name="fleetmq-publisher")
            for name, coro in (
                ("ingest", self.ingest.run()),
                ("expiry", self._expire_loop()),
                ("connection", self._watch_connection()),
            ):
                self._tasks.append(group.create_task(coro, name=f"fleetmq-{name}"))
            await stack.enter_async_context(self.http)
        except BaseException:
            await stack.aclose()
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._stack.aclose()

    async def _stop_loops(self) -> None:
        # Ingest, expiry and reconciliation stop first; the publisher then gets a moment to
        # send the statuses and replies already queued (not the republish sweep), then stops.
        for task in self._tasks:
            task.cancel()
        if self._publisher_task is not None:
            drained = await self.publisher.drain(GOODBYE_TIMEOUT_S)
            if not drained:
                log.warning("publisher_not_drained backlog=%d", self.publisher.backlog)
            self._publisher_task.cancel()

    async def _say_goodbye(self) -> None:
        payload = manager_status_payload("offline", self.clock.now().wall, "shutdown")
        if self.publisher.publish_presence(payload):
            acked = await self.link.flush(GOODBYE_TIMEOUT_S)
            log.info("manager_offline_published acknowledged=%s", acked)

    async def _expire_loop(self) -> None:
        graced_for = 0
        while True:
            await asyncio.sleep(EXPIRY_TICK_S)
            if not self.link.connected:
                continue  # no heartbeats can be seen: no node goes offline by timeout
            if self.link.connections != graced_for:
                # A new connection: nobody saw heartbeats while we were away, so every node
                # gets a full timeout of grace. Granted here, before the first expiry on this
                # connection, so no tick can slip in between.
                graced_for = self.link.connections
                self.fleet.grant_grace()
            try:
                await self._expire_due()
            except Exception:
                log.exception("expiry_failed")

    async def _expire_due(self) -> None:
        self.metrics.expiry_passes += 1
        while True:
            oldest = self.link.oldest_pending()
            limit = oldest if oldest is not None else self.clock.now().mono - IN_HAND_MARGIN_S
            if self.fleet.expire(limit, EXPIRY_BATCH) < EXPIRY_BATCH:
                return
            await asyncio.sleep(0)

    async def _watch_connection(self) -> None:
        handled = 0
        reconcile: asyncio.Task[bool] | None = None
        while True:
            await self.link.wait_state_change()
            if not self.link.connected or self.link.connections == handled:
                continue
            try:
                reconcile = self._on_connected(reconcile)
            except Exception:
                log.exception("on_connected_failed")
            handled = self.link.connections

    def _on_connected(self, reconcile: asyncio.Task[bool] | None) -> asyncio.Task[bool] | None:
        self.publisher.publish_presence(manager_status_payload("online", self.clock.now().wall))
        self.publisher.republish_all()
        # Reconcile once per process; a run cut short by a lost connection starts again.
        if reconcile is not None and (not reconcile.done() or reconcile.result()):
            return reconcile
        if self._group is None:
            return None
        task = self._group.create_task(self._reconcile(), name="fleetmq-reconcile")
        self._tasks.append(task)
        return task

    async def _reconcile(self) -> bool:
        try:
            await self.ingest.reconcile()
        except BrokerError as exc:
            log.warning("reconcile_interrupted reason=%s retry=next connection", exc)
            return False
        except Exception:
            log.exception("reconcile_failed")
            return False
        return True
