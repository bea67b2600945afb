"""Wiring and lifecycle: builds every part from ``Settings`` and runs them together.

``FleetService`` is ready when ``__aenter__`` returns (the store opened and every stored node
loaded, REST bound; the broker connection comes up in the background and ``/readyz`` follows
it). Shutdown runs in reverse: REST stops taking requests and finishes those in flight, the
loops stop, the manager publishes its offline status and disconnects cleanly, the store gets
what is still queued, then the embedded broker (if any) stops.

High availability (contract section 10): the store's lease (``fleetmq.store.lease``) decides
whether this manager is the active one. A standby serves ``/healthz`` and 503s, keeps the fleet
loaded and follows the store (PostgreSQL) or waits for the file's lock (SQLite); once it holds
the lease it takes the duties of the active (``_duties``: the broker connections and every
loop). A manager that loses its lease acts no more and sets ``deposed``: its owner ends it and
starts it again as a standby (``fleetmq serve`` does).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack
from dataclasses import replace
from typing import Any

from fleetmq.auth.rules import TopicRules
from fleetmq.auth.service import AuthService
from fleetmq.auth.startup import (
    AuthSetupError,
    adopt_admin_token_file,
    decide_mode,
    warn_cleartext,
)
from fleetmq.auth.store import AuthStore
from fleetmq.broker.access import MANAGER_USERNAME
from fleetmq.broker.embedded import EmbeddedBroker
from fleetmq.config import CLIENT_ID_PREFIX, OUTPUT_USER_SUFFIX, Settings
from fleetmq.core.clock import Clock, SystemClock
from fleetmq.core.registry import Node, Registry
from fleetmq.core.topics import Topics
from fleetmq.errors import BrokerError, FencedError, StoreError
from fleetmq.fleet import Fleet
from fleetmq.heap import Heap
from fleetmq.http.api import RestApi
from fleetmq.http.auth import RestAccess
from fleetmq.http.broker_hooks import BrokerHooks, ManagerLogin
from fleetmq.http.server import HttpServer
from fleetmq.metrics import Metrics
from fleetmq.mqtt.dynsec import check_admin_url
from fleetmq.mqtt.dynsec_mirror import DynsecMirror, login_for, manager_logins
from fleetmq.mqtt.ingest import MqttIngest, waiting_in
from fleetmq.mqtt.link import MqttLink, Will
from fleetmq.mqtt.publisher import Publisher
from fleetmq.rates import CUT_OFF_S, NodeRates
from fleetmq.store import SqliteStore, make_auth_store, make_store
from fleetmq.store.base import SharedStore, Store, nodes_from_rows
from fleetmq.store.lease import POLL_S, FileLease, Lease, PostgresLease, SoleLease
from fleetmq.store.writer import RUN_IDS, StoreWriter
from fleetmq.views import manager_status_payload

log = logging.getLogger(__name__)

EXPIRY_TICK_S = 0.2
EXPIRY_BATCH = 10_000
"""Nodes expired between two yields to the event loop: a mass expiry never stalls REST."""
IN_HAND_MARGIN_S = 0.05
"""Expiry stays this far behind now: what reached the socket just before a deadline is read and
queued first."""
GOODBYE_TIMEOUT_S = 3.0
STORE_CLOSE_TIMEOUT_S = 10.0
PRUNE_EVERY_S = 3600.0
STALL_S = 1.0
"""An event-loop stall longer than this gives every node grace (contract section 11)."""
FOLLOW_EVERY_S = 0.5
"""How often a standby reads what the active stored."""
FOLLOW_BATCH = 10_000
WILL_DELAY_S = 5
"""The manager's MQTT 5 will waits this long: a standby taking over sooner resumes the session
and no offline presence flashes (contract section 10)."""


class FleetService:
    def __init__(self, settings: Settings, clock: Clock | None = None,
                 store: Store | None = None, auth_store: AuthStore | None = None, *,
                 port_shared: bool = False) -> None:
        """``store`` and ``auth_store`` replace the ones ``settings.store`` names (tests pass
        their own). ``port_shared``: this process already answers on the HTTP port (a start
        again after a step-down): no check that it is free."""
        self.settings = settings
        self._port_shared = port_shared
        self.clock = clock or SystemClock()
        self.topics = Topics(settings.topic_root)
        self.rules = TopicRules(settings.topic_root)
        self.auth = AuthService(auth_store if auth_store is not None
                                else make_auth_store(settings.store), self.clock)
        self.auth_enabled = False
        """Decided at start (``--auth`` and the store), fixed for the process's life."""
        self.metrics = Metrics()
        self.registry = Registry(settings.heartbeat_interval_s, settings.default_timeout_s,
                                 held_id=self.auth.held_node_id)
        # Two connections: ingest (persistent session, subscriptions) and output (statuses,
        # replies, presence and the manager's will). On one connection the PUBACKs of our
        # publishes queue behind every inbound message, so under a heartbeat backlog status
        # messages would wait for the whole backlog.
        prefer_mqtt5 = settings.mqtt_version == "5" and not settings.broker.embedded  # amqtt: 3.1.1
        # The manager's own broker logins, never written anywhere:
        # - the embedded broker knows both connections as _fleetmq by a secret drawn per
        #   process, handed to it and to our links only: no device can present it;
        # - --broker-auth dynsec: each connection is its own dynsec client, provisioned at
        #   start through --broker-admin with a fresh password (--broker needs no credentials);
        # - --broker-auth external without a login in --broker: the same kind of per-process
        #   secret, which only fleetmq's HTTP auth hooks accept.
        self._broker_secret = secrets.token_urlsafe(32)
        self._manager_logins = manager_logins(
            [settings.mqtt_client_id, f"{settings.mqtt_client_id}-out"]
        ) if settings.auth.broker_auth == "dynsec" else {}
        self.dynsec: DynsecMirror | None = None
        self.embedded_broker: EmbeddedBroker | None = None
        self.manager_login = (ManagerLogin(settings.mqtt_client_id, self._broker_secret)
                              if settings.auth.broker_auth == "external"
                              and not settings.broker.embedded
                              and settings.broker.username is None else None)
        self.link, self.out = self._links(prefer_mqtt5)
        self.publisher = Publisher(self.out, self.topics, self.registry, self.metrics)
        self.role = "starting"
        """"standby" or "active" (contract section 10) once started."""
        self.deposed = asyncio.Event()
        """Set once this manager lost its lease: it acts no more; end it (and start a new one,
        which is a standby)."""
        self.deposed_why = ""
        self._role_task: asyncio.Task[None] | None = None
        self._followed = 0
        """A standby's position in the store's events (``follow``)."""
        self._follow_failing = False
        self.store = store if store is not None else make_store(settings.store)
        self.shared = self.store if isinstance(self.store, SharedStore) else None
        self.lease = self._lease_of(self.store)
        self.writer = StoreWriter(self.store, self.registry, self.clock.monotonic,
                                  settings.store.flush_interval_s, may_write=self._acting)
        self.rates = NodeRates(settings.auth.node_rate, settings.auth.node_burst)
        self.rates.add_flood_listener(self._cut_off)
        self.fleet = Fleet(self.registry, self.clock, self.publisher, self.metrics, self.writer,
                           self.rates)
        self.ingest = MqttIngest(self.link, self.topics, self.fleet, self.publisher, self.metrics)
        self.broker_hooks = BrokerHooks(self.auth, self.rules, self.clock.monotonic,
                                        self.manager_login, self.metrics.broker_hooks)
        self.access = RestAccess(self.auth, settings.auth, self.clock.monotonic,
                                 self.metrics.auth_refused)
        self.api = RestApi(self.fleet, self.registry, (self.link, self.out), self.publisher,
                           self.metrics, settings.http, settings.topic_root, self.access,
                           broker_hooks=self.broker_hooks)
        self.watch = self.api.watch
        self.http = HttpServer(self.api, settings.http)
        self._wire_role()
        self._stack = AsyncExitStack()
        self._tasks: list[asyncio.Task[Any]] = []
        self._group: asyncio.TaskGroup | None = None
        self._duty_group: asyncio.TaskGroup | None = None
        self._publisher_task: asyncio.Task[None] | None = None
        self._heap = Heap()
        self._reconcile_task: asyncio.Task[bool] | None = None

    def _links(self, prefer_mqtt5: bool) -> tuple[MqttLink, MqttLink]:
        """Ingest's connection (persistent session, subscriptions) and the output one
        (statuses, replies, presence and the manager's will), with the manager's logins."""
        settings = self.settings
        broker = settings.broker
        if broker.embedded:
            broker = replace(broker, username=MANAGER_USERNAME, password=self._broker_secret)
        elif self.manager_login is not None:
            log.info("manager_broker_login username=%s: a secret of this process that only "
                     "fleetmq's HTTP auth hooks accept", self.manager_login.username)
            broker = replace(broker, username=self.manager_login.username,
                             password=self.manager_login.password)
        link = MqttLink(
            login_for(broker, self._manager_logins, settings.mqtt_client_id),
            settings.mqtt_client_id,
            subscriptions=[self.topics.register_filter, self.topics.heartbeat_filter],
            will=None,
            keepalive_s=settings.keepalive_s,
            prefer_mqtt5=prefer_mqtt5,
            monotonic=self.clock.monotonic,
            ack_after_apply=settings.puback == "applied",
            may_act=self._acting,
        )
        out_broker = broker
        if (not broker.embedded and broker.username is not None
                and broker.username.startswith(CLIENT_ID_PREFIX)):
            # A broker that makes each username its client id (Mosquitto's
            # use_username_as_clientid, which `credentials export` relies on) would let two
            # connections under one username kick each other: the output one gets its own.
            out_broker = replace(broker, username=broker.username + OUTPUT_USER_SUFFIX)
        out = MqttLink(
            login_for(out_broker, self._manager_logins, f"{settings.mqtt_client_id}-out"),
            f"{settings.mqtt_client_id}-out",
            subscriptions=[],
            will=Will(self.topics.manager_status,
                      manager_status_payload("offline", None, "connection_lost"), WILL_DELAY_S),
            keepalive_s=settings.keepalive_s,
            prefer_mqtt5=prefer_mqtt5,
            monotonic=self.clock.monotonic,
            may_act=self._acting,
        )
        return link, out

    @property
    def http_port(self) -> int:
        return self.http.port

    @property
    def ready(self) -> bool:
        """The active manager, both broker connections up with their subscriptions
        acknowledged."""
        return self.role == "active" and self.link.connected and self.out.connected

    def _wire_role(self) -> None:
        """Who asks whether this manager is the active one, and who tells it it is not."""
        self.writer.on_fenced = self._fenced
        self.auth.may_write = self._acting
        for fenced in (self.store, self.auth.store):
            if hasattr(fenced, "on_fenced"):  # PostgreSQL's: any write refused steps down
                fenced.on_fenced = self._fenced
        self.api.standby = lambda: self.role != "active"
        self.api.active_url = lambda: self.lease.active_url

    def _acting(self) -> bool:
        return self.lease.acting and not self.deposed.is_set()

    def _lease_of(self, store: Store) -> Lease:
        """PostgreSQL: the lease row and lock; SQLite: the file's lock (a standby waits for
        it); memory: nobody else can reach the fleet."""
        if isinstance(store, SqliteStore):
            return FileLease(store.try_lock)
        if self.shared is not None:
            elapsed = (self.clock.since_boot if isinstance(self.clock, SystemClock)
                       else self.clock.monotonic)  # a test's FakeClock drives both
            return PostgresLease(self.shared.dsn, store.url, self.settings.lease_s,
                                 self.settings.advertise_url, elapsed)
        return SoleLease()

    async def __aenter__(self) -> FleetService:
        stack = self._stack
        try:
            if not self._port_shared:
                self.http.check_port_free()
            await self._open_auth()
            broker = self.settings.broker
            if broker.embedded:
                await stack.enter_async_context(self._embedded_broker())
            self._heap.space_collections()
            stack.push_async_callback(self.lease.close)  # after the store's last write
            if self.lease.follows:
                await self._open_store()  # a standby keeps the fleet loaded
            active = await self.lease.acquire()
            if not active and broker.embedded:
                raise StoreError(
                    f"store {self.store.url} is in use by another fleetmq (active: "
                    f"{self.lease.active_url or 'unknown'}): a standby needs an external "
                    "broker the active shares (--broker mqtt://HOST:PORT), since the embedded "
                    "one dies with its manager; or give this manager its own --store")
            if active and not self.lease.follows:
                await self._open_store()
            self._group = await stack.enter_async_context(asyncio.TaskGroup())
            stack.push_async_callback(self._stop_role)
            # The lease is renewed from the moment it is held, whatever starting takes.
            self._role_task = self._group.create_task(
                self._hold() if active else self._play(), name="fleetmq-role")
            if active:
                await self._take_over(at_start=True)
                await stack.enter_async_context(self._duties())
            await stack.enter_async_context(self.http)
        except BaseException:
            await stack.aclose()
            raise
        return self

    @contextlib.asynccontextmanager
    async def _duties(self) -> AsyncIterator[None]:
        """What only the active manager does: the broker connections, ingest, expiry,
        publishing, writing, pruning, reconciliation and the dynsec mirror."""
        async with AsyncExitStack() as stack:
            self.fleet.grant_grace()
            if self._manager_logins:
                self.dynsec = await stack.enter_async_context(DynsecMirror(
                    self.auth, check_admin_url(self.settings.auth.broker_admin),
                    self.settings.topic_root, self._manager_logins, self.clock,
                    may_act=self._acting))
            await stack.enter_async_context(self.out)
            await stack.enter_async_context(self.link)
            stack.push_async_callback(self._say_goodbye)
            group = await stack.enter_async_context(asyncio.TaskGroup())
            stack.push_async_callback(self._stop_loops)
            self._publisher_task = group.create_task(self.publisher.run(), name="fleetmq-publisher")
            self._tasks.append(group.create_task(self.auth.run(), name="fleetmq-auth"))
            group.create_task(self.writer.run(), name="fleetmq-store")
            self._tasks.append(group.create_task(self.watch.run(), name="fleetmq-watch"))
            for name, coro in (
                ("ingest", self.ingest.run()),
                ("expiry", self._expire_loop()),
                ("prune", self._prune_loop()),
                ("ingest-connection", self._on_each_connection(self.link, self._ingest_connected)),
                ("output-connection", self._on_each_connection(self.out, self._output_connected)),
            ):
                self._tasks.append(group.create_task(coro, name=f"fleetmq-{name}"))
            self._duty_group = group
            self.role = "active"
            self.metrics.active = 1
            self.metrics.lease_epoch = self.lease.epoch or 0
            yield

    async def _hold(self) -> None:
        """Renew the lease until it is lost, then step down and let go of the broker at once:
        what arrives from here on waits in the manager's session for the new active."""
        self._step_down(await self.lease.hold())
        for link in (self.link, self.out):
            await link.let_go()

    async def _play(self) -> None:
        """A standby's life: wait for the lease (following the store), then take the duties
        of the active until the lease is lost or the service stops."""
        self.role = "standby"
        log.info("standby store=%s active=%s", self.store.url, self.lease.active_url)
        await self._wait_for_lease()
        started = self.clock.now().mono
        opened_here = not self.lease.follows  # SQLite: the store opens with its lock
        async with asyncio.TaskGroup() as group:
            group.create_task(self._hold(), name="fleetmq-lease")
            try:
                if opened_here:
                    await self._open_store(own=False)
                await self._take_over(at_start=False)
                self.metrics.takeovers += 1
                async with self._duties():
                    log.info("takeover_started epoch=%s seconds=%.2f", self.lease.epoch,
                             self.clock.now().mono - started)
                    await self.deposed.wait()
            except Exception as exc:
                # A takeover that cannot finish (the store failing as it started, say) gives
                # the lease up: a fresh standby tries again, and another manager may be
                # quicker.
                log.exception("takeover_failed epoch=%s", self.lease.epoch)
                self.lease.lose(f"the takeover failed: {exc}")
            finally:
                if opened_here:
                    await self._close_store()

    async def _wait_for_lease(self) -> None:
        """Poll the lease; meanwhile follow what the active stores (PostgreSQL)."""
        follow_at = 0.0
        while not await self.lease.acquire():
            if self.lease.follows and self.clock.monotonic() >= follow_at:
                follow_at = self.clock.monotonic() + FOLLOW_EVERY_S
                await self._follow()
            await asyncio.sleep(POLL_S)

    async def _follow(self, upto: int | None = None) -> None:
        """Take in the registrations, transitions and deletions the active stored, and the
        credentials it changed. ``upto``: at a takeover, every event up to that id must be
        in, or StoreError (a standby's regular follow only logs, once per outage)."""
        assert self.shared is not None
        try:
            while upto is None or self._followed < upto:
                after, rows, gone = await self.shared.follow(self._followed, FOLLOW_BATCH)
                if after == self._followed:
                    if upto is not None:  # the store has fewer events than it said
                        raise StoreError(f"store {self.store.url}: events up to {upto} were "
                                         f"announced, found up to {after}")
                    break
                self.registry.follow(nodes_from_rows(rows, self.clock.now()), gone)
                self._followed = after
            await self.auth.refresh()
        except StoreError as exc:
            if upto is not None:
                raise
            if not self._follow_failing:
                log.warning("standby_follow_failed error=%s (trying again every %g s)", exc,
                            FOLLOW_EVERY_S)
            self._follow_failing = True
            return
        if self._follow_failing:
            log.info("standby_follow_recovered")
        self._follow_failing = False

    async def _take_over(self, *, at_start: bool) -> None:
        """The lease is this manager's: everything the last active stored is in (its writes
        are fenced from here on), and this manager's events are numbered after its. Raises
        StoreError when that cannot be known: a takeover never starts on a partial fleet."""
        epoch = self.lease.epoch
        if self.shared is not None:
            self.shared.epoch = epoch
            if hasattr(self.auth.store, "epoch"):  # the same database's access-control tables
                self.auth.store.epoch = epoch
            last = await self.shared.max_event_id()
            await self._follow(upto=last)
            block = await self.shared.reserve_run(last // RUN_IDS + 1)
            self.writer.continue_from(last, run_block=block)
        await self.auth.store.set_mirror(bool(self._manager_logins))
        if not at_start:
            self.fleet.grant_grace()

    def _step_down(self, why: str) -> None:
        if self.deposed.is_set():
            return
        self.deposed_why = why
        self.deposed.set()
        self.role = "standby"
        self.metrics.active = 0
        self.metrics.lease_epoch = 0
        log.warning("stepping_down epoch=%s reason=%s", self.lease.epoch, why)

    def _fenced(self, why: str) -> None:
        """The store refused a write: another manager holds the lease."""
        self._step_down(why)
        self.lease.lose(why)

    async def _stop_role(self) -> None:
        task = self._role_task
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def __aexit__(self, *exc_info: object) -> None:
        try:
            await self._stack.aclose()
        finally:
            self._heap.thaw()

    async def _open_auth(self) -> None:
        """Credentials loaded, the first admin key adopted, the mode decided: all before any
        listener opens."""
        await self.auth.store.open()
        self._stack.push_async_callback(self._close_auth)
        await self.auth.load()
        # With a dynsec mirror, tokens made from here on (the admin token file's too) wait in
        # the outbox for it; without one, no token may wait there (said again, fenced, when
        # this manager becomes active: a standby never empties the active's outbox).
        if self._manager_logins:
            await self.auth.store.set_mirror(True)
        if self.settings.auth.admin_token_file is not None:
            await adopt_admin_token_file(self.auth, self.settings.auth.admin_token_file)
        self.auth_enabled = decide_mode(self.settings, self.auth)
        self.ingest.own_reply_only = self.access.enabled = self.auth_enabled
        if self._manager_logins:
            if self.settings.broker.embedded:
                raise AuthSetupError("--broker-auth dynsec mirrors credentials into an external "
                                     "Mosquitto: pass --broker mqtt://HOST:PORT")
            check_admin_url(self.settings.auth.broker_admin)  # before any listener opens
        warn_cleartext(self.settings)
        log.debug("auth_decided mode=%s enabled=%s keys=%d", self.settings.auth.mode,
                  self.auth_enabled, len(self.auth.keys()))

    def _cut_off(self, node_id: str) -> None:
        """A node past 10 x its rate for 10 s: disconnected (embedded broker) or disabled
        (dynsec) for a minute. On another broker its messages stay refused by rate."""
        if self.embedded_broker is not None:
            self.embedded_broker.cut_off(node_id, CUT_OFF_S, self.rates.flood_count)
        if self.dynsec is not None:
            self.dynsec.cut_off(node_id, CUT_OFF_S)

    def _embedded_broker(self) -> EmbeddedBroker:
        broker = self.settings.broker
        if self.auth_enabled:
            embedded = EmbeddedBroker(broker.host, broker.port, auth=self.auth, rules=self.rules,
                                      manager_secret=self._broker_secret,
                                      monotonic=self.clock.monotonic,
                                      tls=self.settings.broker_tls,
                                      ws=self.settings.broker_ws,
                                      key_rate=self.settings.auth.key_rate,
                                      key_burst=self.settings.auth.key_burst)
            self.metrics.broker_access = embedded.counters
        else:
            embedded = EmbeddedBroker(broker.host, broker.port, tls=self.settings.broker_tls,
                                      ws=self.settings.broker_ws)
        self.embedded_broker = embedded
        return embedded

    async def _close_auth(self) -> None:
        try:
            if self._acting():  # a standby writes nothing
                await self.auth.flush_uses()
        except StoreError as exc:
            log.warning("auth_last_use_not_written error=%s", exc)
        await self.auth.store.close()

    async def _open_store(self, own: bool = True) -> None:
        """Open the store and load every node into the registry, straight into its objects.
        ``own``: closed with the service (else by the caller)."""
        started = self.clock.now()
        await self.store.open()
        if own:
            self._stack.push_async_callback(self._close_store)
        self.writer.continue_from(self.store.last_event_id)
        self._followed = self.store.last_event_id
        nodes: list[Node] = []
        chunks = self.store.load()
        with self._heap.loading():
            try:
                # The next chunk is fetched (in the store's thread or socket) while this one
                # is turned into nodes.
                pending = asyncio.ensure_future(anext(chunks, None))
                try:
                    while (rows := await pending) is not None:
                        pending = asyncio.ensure_future(anext(chunks, None))
                        nodes += nodes_from_rows(rows, started)
                finally:
                    if not pending.done():
                        pending.cancel()
                        with contextlib.suppress(asyncio.CancelledError, StoreError):
                            await pending
            finally:
                await chunks.aclose()
            self.registry.restore(nodes)
        self._heap.frozen(len(nodes))
        log.info("store_loaded store=%s nodes=%d seconds=%.2f", self.store.url, len(nodes),
                 self.clock.now().mono - started.mono)

    async def _close_store(self) -> None:
        # The loops, the writer's own among them, have stopped (``_stop_loops``): write what
        # is still queued (heartbeats written behind too), then close.
        await self.writer.close(STORE_CLOSE_TIMEOUT_S)
        await self.store.close()

    async def _stop_loops(self) -> None:
        # Ingest, expiry and reconciliation stop first; the publisher then gets a moment to
        # send the statuses and replies already queued (not the republish sweep), then stops.
        for task in self._tasks:
            task.cancel()
        if self._publisher_task is not None:
            # A deposed manager publishes nothing: no drain to wait for.
            drained = not self._acting() or await self.publisher.drain(GOODBYE_TIMEOUT_S)
            if not drained:
                log.warning("publisher_not_drained backlog=%d", self.publisher.backlog)
            self._publisher_task.cancel()
        # The store writer stops after its batch in hand, never mid-write; the rest is written
        # when the store closes.
        self.writer.stop()

    async def _say_goodbye(self) -> None:
        if not self._acting():
            return  # deposed: the new active speaks for the fleet now
        payload = manager_status_payload("offline", self.clock.now().wall, "shutdown")
        if self.publisher.publish_presence(payload):
            acked = await self.out.flush(GOODBYE_TIMEOUT_S)
            log.info("manager_offline_published acknowledged=%s", acked)

    async def _expire_loop(self) -> None:
        graced_for = 0
        tick = self.clock.monotonic()
        while True:
            await asyncio.sleep(EXPIRY_TICK_S)
            last, tick = tick, self.clock.monotonic()
            if tick - last > EXPIRY_TICK_S + STALL_S:
                # Nothing was read meanwhile: like a reconnect, but nothing to republish.
                log.warning("event_loop_stalled seconds=%.2f", tick - last - EXPIRY_TICK_S)
                self.fleet.grant_grace()
            if not self.link.connected or not self._acting():
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
            self._heap.settle(len(self.registry))

    async def _prune_loop(self) -> None:
        keep_s = self.settings.store.history_days * 86_400
        audit_keep_s = self.settings.auth.audit_days * 86_400
        while True:
            if not self._acting():
                return  # deposed: the new active prunes
            try:
                dropped = await self.store.prune(self.clock.now().wall - keep_s)
                audit_dropped = await self.auth.store.prune_audit(
                    self.clock.now().wall - audit_keep_s)
            except FencedError:
                return  # deposed (the store told ``_fenced``): the new active prunes
            except Exception:
                log.exception("history_prune_failed")
            else:
                if dropped or audit_dropped:
                    log.info("history_pruned events=%d audit_entries=%d", dropped,
                             audit_dropped)
            await asyncio.sleep(PRUNE_EVERY_S)

    async def _expire_due(self) -> None:
        """Expire what is due, in batches, without waiting for the ingest backlog: a due node
        is held back only by a message of its own received by its deadline and still queued.
        One limit for the whole pass, so what arrives during it cannot matter. Received means
        read into the link's inbox: while the inbox is full and reading paused, what the socket
        and the broker hold is not (docs/protocol.md, Deadline)."""
        self.metrics.expiry_passes += 1
        limit = self.clock.now().mono - IN_HAND_MARGIN_S
        waiting = waiting_in(self.link, self.topics)
        while True:
            if self.fleet.expire(limit, EXPIRY_BATCH, waiting) < EXPIRY_BATCH:
                return
            await asyncio.sleep(0)

    async def _on_each_connection(self, link: MqttLink, connected: Callable[[], None]) -> None:
        handled = 0
        while True:
            await link.wait_state_change()
            if not link.connected or link.connections == handled:
                continue
            handled = link.connections
            try:
                connected()
            except Exception:
                log.exception("on_connected_failed")

    def _output_connected(self) -> None:
        self.publisher.publish_presence(manager_status_payload("online", self.clock.now().wall))
        self.publisher.republish_all()

    def _ingest_connected(self) -> None:
        # Reconcile once per process; a run cut short by a lost connection starts again.
        task = self._reconcile_task
        group = self._duty_group
        if (task is not None and (not task.done() or task.result())) or group is None:
            return
        self._reconcile_task = group.create_task(self._reconcile(),
                                                       name="fleetmq-reconcile")
        self._tasks.append(self._reconcile_task)

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
