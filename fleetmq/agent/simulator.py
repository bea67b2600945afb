"""The fleet simulator's engine: N virtual nodes over K MQTT connections, paced by time slots.

It owns the paho connections, the schedule and the counters; it parses no options and prints
nothing (``fleetmq.commands.simulate`` does). Memory is O(N) bytes, not O(N) tasks: one cursor
walks the nodes at N/S per second. paho runs no thread here: the event loop drives every
socket (see ``_Link``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import secrets
import socket
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from fleetmq.config import BrokerSettings
from fleetmq.core.clock import SystemClock
from fleetmq.core.topics import Topics, is_valid_root
from fleetmq.errors import BrokerError, ConfigError
from fleetmq.mqtt.link import use_broker
from fleetmq.tls import broker_context

log = logging.getLogger(__name__)

TICK_S = 0.05
"""How often the scheduler wakes to send what fell due: N/S x 50 ms messages per tick."""
CHUNK = 2_000
"""Publishes between two yields to the event loop, so a late tick never starves it."""
QUEUE_BOUND = 100_000
"""Unacknowledged QoS 1 messages paho may hold, over all connections (at least 100 each); past
it a publish fails and counts as an error, so a slow broker costs errors, not memory."""
CONNECT_TIMEOUT_S = 10.0
"""How long the first connections may take (plus 1 s per 500 connections)."""
NETWORK_TIMEOUT_S = 10.0
CLOSE_TIMEOUT_S = 5.0
"""How long the clean DISCONNECTs at the end may take."""
RECONNECT_MIN_S = 0.5
RECONNECT_MAX_S = 30.0


@dataclass(frozen=True, slots=True)
class SimSettings:
    nodes: int
    interval_s: int
    connections: int
    broker: BrokerSettings
    duration_s: float | None = None
    """None: until ``stop`` is set."""
    kill_fraction: float = 0.0
    topic_root: str = "fleet"
    node_type: str = "simulated"
    keepalive_s: int = 60

    def __post_init__(self) -> None:
        out_of_range = (
            (1 <= self.nodes <= 10_000_000, f"--nodes {self.nodes}", "give 1 to 10000000"),
            (1 <= self.interval_s <= 86_400, f"--interval {self.interval_s}",
             "give whole seconds from 1 to 86400"),
            (1 <= self.connections <= self.nodes, f"--connections {self.connections}",
             f"give 1 to --nodes ({self.nodes})"),
            (self.duration_s is None or self.duration_s > 0, f"--duration {self.duration_s}",
             "give seconds above 0"),
            (0.0 <= self.kill_fraction <= 1.0, f"--kill-fraction {self.kill_fraction}",
             "give a share from 0 to 1"),
            (1 <= len(self.node_type) <= 64, f"--node-type {self.node_type[:64]!r}",
             "give 1 to 64 characters"),
        )
        for ok, what, fix in out_of_range:
            if not ok:
                raise ConfigError(f"{what} is out of range: {fix}")
        if not is_valid_root(self.topic_root):
            raise ConfigError(f"--topic-root {self.topic_root!r} is not a plain topic: use "
                              "letters, digits and '_.:-' in levels separated by '/'")
        if self.broker.embedded:
            raise ConfigError("--broker: the simulator connects to a running broker: use "
                              "mqtt://host:port or mqtts://host:port")

    @property
    def own_connections(self) -> bool:
        """One connection per node, with the node's id as client id and its own will."""
        return self.connections == self.nodes

    @property
    def kill_at_s(self) -> float | None:
        """Mid-run: half of --duration, else after two intervals (registration, one beat)."""
        if self.kill_fraction <= 0:
            return None
        return self.duration_s / 2 if self.duration_s is not None else 2.0 * self.interval_s

    def node_id(self, index: int) -> str:
        return f"sim-{index + 1:0{max(6, len(str(self.nodes)))}d}"

    def node_index(self, node_id: str) -> int | None:
        digits = node_id.removeprefix("sim-")
        if not digits.isdigit() or not 1 <= int(digits) <= self.nodes:
            return None
        index = int(digits) - 1
        return index if self.node_id(index) == node_id else None


@dataclass
class SimStats:
    """Counters, written on the event loop only."""

    sent: int = 0
    errors: int = 0
    """Messages not sent (connection down, paho queue full) and failed connection attempts."""
    reconnects: int = 0
    not_found: int = 0
    """404 replies seen (each answered by a new register)."""
    killed: int = 0
    connected: int = 0


class _Link:
    """One paho client driven by the event loop, shared by nodes ``index, index + K, ...``.

    No paho thread: the loop reads and writes the socket (``add_reader``/``add_writer``), so a
    publish costs no thread hand-off (with ``loop_start`` a GIL ping-pong per message capped a
    process near 3,000 messages/s). Only the blocking TCP connect runs in an executor.
    """

    def __init__(self, sim: Simulator, index: int, client_id: str, will_topic: str | None) -> None:
        self.index = index
        self.session = ""
        """The current connection's session, drawn before each CONNECT (it is in the will)."""
        self.register_payload = b""
        self.connected = False
        self.ever_connected = False
        self.killed = False
        self.closing = False
        self._sim = sim
        self._will_topic = will_topic
        self._backoff_s = RECONNECT_MIN_S
        broker = sim.settings.broker
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                             protocol=MQTTProtocolVersion.MQTTv311, clean_session=True,
                             reconnect_on_failure=False)
        client.max_inflight_messages_set(100)
        client.max_queued_messages_set(max(100, QUEUE_BOUND // sim.settings.connections))
        client.connect_timeout = NETWORK_TIMEOUT_S
        use_broker(client, broker, sim.tls)
        token = sim.tokens.get(client_id)
        if token is not None:  # the node's own login: username = client id = node id
            client.username_pw_set(client_id, token)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        self.client = client

    async def connect(self) -> None:
        """Connect once (the CONNACK arrives later, through ``_on_connect``)."""
        client, broker = self.client, self._sim.settings.broker
        self.session = secrets.token_hex(4)
        if self._will_topic is not None:
            will = {"status": "offline", "reason": "connection_lost", "session": self.session}
            client.will_set(self._will_topic, _json(will), qos=1, retain=False)
        # Off while paho connects on an executor thread: it writes CONNECT there itself.
        client.on_socket_register_write = None
        client.on_socket_unregister_write = None
        client.on_socket_close = None
        try:
            await self._sim.loop.run_in_executor(
                None, client.connect, broker.host, broker.port, self._sim.settings.keepalive_s)
        except (OSError, ValueError) as exc:  # refused, unreachable, TLS, bad host
            self._sim.link_failed(f"{type(exc).__name__}: {exc}")
            self._retry_later()
            return
        sock = client.socket()
        if self.killed or self.closing or not isinstance(sock, socket.socket):
            with contextlib.suppress(OSError):
                client.disconnect()
            return
        loop = self._sim.loop
        client.on_socket_register_write = lambda _c, _u, s: loop.add_writer(s, self._write)
        client.on_socket_unregister_write = lambda _c, _u, s: self._unwant_write(s)
        client.on_socket_close = lambda _c, _u, s: self._forget(s)
        loop.add_reader(sock, self._read)
        if client.want_write():
            loop.add_writer(sock, self._write)

    def _read(self) -> None:
        self.client.loop_read()

    def _write(self) -> None:
        self.client.loop_write()

    def _unwant_write(self, sock: Any) -> None:
        self._sim.loop.remove_writer(sock)

    def _forget(self, sock: Any) -> None:
        self._sim.loop.remove_reader(sock)
        self._sim.loop.remove_writer(sock)

    def tick(self) -> None:
        """Keepalive pings and their timeout (a CONNACK that never comes too): once a second."""
        if not self.killed and self.client.socket() is not None:
            self.client.loop_misc()

    def _retry_later(self) -> None:
        if self.killed or self.closing:
            return
        delay, self._backoff_s = self._backoff_s, min(RECONNECT_MAX_S, self._backoff_s * 2)
        self._sim.later(delay * random.uniform(0.5, 1.0), self.connect)

    def publish(self, topic: str, payload: bytes) -> bool:
        info = self.client.publish(topic, payload, qos=1, retain=False)
        return info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS

    def drop(self) -> None:
        """Close the socket without DISCONNECT (the broker fires the will); no reconnect."""
        self.killed = True
        sock = self.client.socket()
        if isinstance(sock, socket.socket):
            self._forget(sock)
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def close(self) -> None:
        """Send DISCONNECT (the broker discards the will); the loop writes it."""
        self.closing = True
        with contextlib.suppress(Exception):
            self.client.disconnect()

    # --- paho callbacks: on the event loop (paho runs no thread here) ------------------------

    def _on_connect(self, _c: paho.Client, _u: object, _f: Any, rc: ReasonCode,
                    _p: Properties | None) -> None:
        if rc.is_failure:
            self._sim.link_failed(f"refused: {rc}")
            return
        self._backoff_s = RECONNECT_MIN_S
        self._sim.link_up(self)

    def _on_disconnect(self, _c: paho.Client, _u: object, _f: Any, _rc: ReasonCode,
                       _p: Properties | None) -> None:
        self._sim.link_down(self)
        self._retry_later()

    def _on_message(self, _c: paho.Client, _u: object, msg: paho.MQTTMessage) -> None:
        if not msg.retain and b"404" in msg.payload:  # only 404 replies matter here
            self._sim.reply_received(msg.topic, bytes(msg.payload))


class Simulator:
    """``async with Simulator(settings) as sim: await sim.run(stop)``; read ``sim.stats``."""

    def __init__(self, settings: SimSettings, tokens: Mapping[str, str] | None = None) -> None:
        """``tokens``: node id -> node token, for a broker that checks logins (one connection
        per node then: a login speaks for one node only)."""
        if tokens and not settings.own_connections:
            raise ConfigError("node tokens need one connection per node: give --connections "
                              f"{settings.nodes} (= --nodes) or leave it out")
        self.settings = settings
        self.tokens: Mapping[str, str] = tokens or {}
        self.tls = broker_context(settings.broker)  # files read now: a wrong path fails here
        self.stats = SimStats()
        self.loop = asyncio.get_running_loop()
        self._topics = Topics(settings.topic_root)
        self._clock = SystemClock()
        self._started = self._clock.monotonic()
        self._registered = bytearray(settings.nodes)  # 1 once registered on the current link
        self._links: list[_Link] = []
        self._last_error = "no answer"
        self._node_type = json.dumps(settings.node_type)
        self._none_connected = asyncio.Event()
        self._none_connected.set()
        self._tasks: set[asyncio.Task[None]] = set()
        """Connects and delayed reconnects; cancelled and awaited in ``__aexit__``."""

    def elapsed_s(self) -> float:
        return self._clock.monotonic() - self._started

    async def __aenter__(self) -> Simulator:
        s = self.settings
        for k in range(s.connections):
            if s.own_connections:
                node_id = s.node_id(k)
                link = _Link(self, k, node_id, self._topics.heartbeat(node_id))
            else:
                link = _Link(self, k, f"sim-conn-{k}", None)
            self._links.append(link)
            self.later(0, link.connect)
        return self

    async def __aexit__(self, *_exc: object) -> None:
        live = [link for link in self._links if not link.killed]
        for link in live:
            link.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._none_connected.wait(), CLOSE_TIMEOUT_S)
        tasks, self._tasks = self._tasks, set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for link in live:
            link.drop()  # whatever is still open after the DISCONNECT went out
        log.info("simulator_closed connections=%d", len(live))

    def later(self, delay_s: float, connect: Callable[[], Awaitable[None]]) -> None:
        """Run ``connect()`` after ``delay_s``, as a task this object awaits on exit."""
        async def delayed() -> None:
            await asyncio.sleep(delay_s)
            await connect()
        task = self.loop.create_task(delayed())
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("simulator_connect_crashed", exc_info=task.exception())

    async def run(self, stop: asyncio.Event) -> None:
        """Register and heartbeat every node until ``stop`` is set or --duration is over."""
        await self._wait_connected(stop)
        s = self.settings
        self._started = self._clock.monotonic()
        per_s = s.nodes / s.interval_s
        kill_at = s.kill_at_s
        cursor = 0
        next_tick = 1.0
        while not stop.is_set():
            elapsed = self.elapsed_s()
            if elapsed >= next_tick:
                next_tick = elapsed + 1.0
                for link in self._links:
                    link.tick()
            if s.duration_s is not None and elapsed >= s.duration_s:
                return
            if kill_at is not None and elapsed >= kill_at:
                kill_at = None
                self._kill()
                continue
            due = int(elapsed * per_s) + 1
            if due - cursor > s.nodes:  # a whole interval behind: skip, never burst
                cursor = due - s.nodes
            uptime = int(elapsed)
            while cursor < due:
                upto = min(due, cursor + CHUNK)
                for position in range(cursor, upto):
                    self._send(position % s.nodes, position // s.nodes, uptime)
                cursor = upto
                await asyncio.sleep(0)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), TICK_S)

    async def _wait_connected(self, stop: asyncio.Event) -> None:
        timeout_s = CONNECT_TIMEOUT_S + len(self._links) / 500
        deadline = self._clock.monotonic() + timeout_s
        while self.stats.connected < len(self._links) and not stop.is_set():
            if self._clock.monotonic() > deadline:
                if self.stats.connected == 0:
                    raise BrokerError(f"cannot connect to {self.settings.broker.describe()}: "
                                      f"{self._last_error} within {timeout_s:.0f} s")
                log.warning("simulator_partly_connected connected=%d connections=%d",
                            self.stats.connected, len(self._links))
                return
            await asyncio.sleep(0.05)

    def _send(self, index: int, cycle: int, uptime: int) -> None:
        link = self._links[index % len(self._links)]
        if link.killed:
            return
        if not link.connected:
            self.stats.errors += 1
            return
        node_id = self.settings.node_id(index)
        if not self._registered[index]:
            sent = link.publish(self._topics.register(node_id), link.register_payload)
            if sent:
                self._registered[index] = 1
        else:
            sent = link.publish(self._topics.heartbeat(node_id),
                                _telemetry(index, cycle, uptime, link.session))
        if sent:
            self.stats.sent += 1
        else:
            self.stats.errors += 1

    def _kill(self) -> None:
        alive = [link for link in self._links if not link.killed]
        count = min(len(alive), max(1, round(len(self._links) * self.settings.kill_fraction)))
        for link in random.sample(alive, count):  # which ones does not matter
            self.link_down(link)
            link.drop()
        self.stats.killed += count
        log.info("simulator_killed connections=%d", count)

    # --- news from paho, on the event loop ---------------------------------------------------

    def link_up(self, link: _Link) -> None:
        if link.killed or link.connected:
            return
        s = self.settings
        session = link.session
        link.connected = True
        self._none_connected.clear()
        link.register_payload = (
            f'{{"node_type":{self._node_type},"heartbeat_interval_seconds":{s.interval_s},'
            f'"capabilities":["simulated"],"session":"{session}"}}').encode()
        self.stats.connected += 1
        if link.ever_connected:
            # A new connection is a new session: its nodes register again in their next slot.
            self.stats.reconnects += 1
            count = len(range(link.index, s.nodes, s.connections))
            self._registered[link.index::s.connections] = bytes(count)
        link.ever_connected = True
        if s.own_connections:
            link.client.subscribe(self._topics.reply(s.node_id(link.index)), qos=1)
        elif link.index == 0:
            # One listener for every node's replies: K listeners would receive them K times.
            link.client.subscribe(self._topics.reply("+"), qos=1)

    def link_failed(self, reason: str) -> None:
        self.stats.errors += 1
        self._last_error = reason

    def link_down(self, link: _Link) -> None:
        if link.connected:
            link.connected = False
            self.stats.connected -= 1
            if self.stats.connected == 0:
                self._none_connected.set()

    def reply_received(self, topic: str, payload: bytes) -> None:
        try:
            body = json.loads(payload)
        except ValueError:
            return
        if not isinstance(body, dict) or body.get("code") != 404:
            return
        root_prefix = self._topics.root + "/"
        node_id = topic.removeprefix(root_prefix).partition("/")[0]
        index = self.settings.node_index(node_id)
        if index is None or self._topics.reply(node_id) != topic:
            return
        self.stats.not_found += 1
        self._registered[index] = 0
        self._send(index, 0, 0)  # a register: the node is unknown to the manager


def _telemetry(index: int, cycle: int, uptime: int, session: str) -> bytes:
    # Each node "booted" at its own moment up to a day ago; memory wanders, sensors stay.
    booted = (index * 2_654_435_761) % 86_400
    free_kb = 96 + (index * 37 + cycle * 13) % 160
    return (b'{"uptime_seconds":%d,"free_memory_kb":%d,"sensors_active":%d,"session":"%s"}'
            % (booted + uptime, free_kb, 1 + index % 4, session.encode()))


def _json(body: dict[str, Any]) -> bytes:
    return json.dumps(body, separators=(",", ":")).encode()
