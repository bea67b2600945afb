"""The manager's one MQTT connection, over paho-mqtt; the only module that imports paho.

paho runs its network loop on its own thread. Its callbacks never touch fleetmq state: inbound
messages go into a bounded deque that the event loop drains in batches, and connection changes
are handed over with ``call_soon_threadsafe``. When the deque is full, paho's thread waits, so
a backlog stays in the broker's queue for our persistent session instead of being dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from fleetmq.config import BrokerSettings
from fleetmq.errors import BrokerError

log = logging.getLogger(__name__)

INBOUND_BOUND = 50_000
"""Messages received but not yet applied. Past it paho's thread waits (backpressure)."""
SESSION_EXPIRY_S = 3600
"""MQTT 5: how long the broker keeps our session (and queues for it) while we are away."""
RECONNECT_MIN_S = 0.5
RECONNECT_MAX_S = 30.0
CONNACK_TIMEOUT_S = 5.0
"""An MQTT 5 CONNECT left unanswered this long counts as refused: amqtt (3.1.1 only) misreads
one that carries properties or a will and waits for bytes that never come, instead of refusing."""
_UNSUPPORTED_PROTOCOL = (1, 132)  # CONNACK codes: 3.1.1 "unacceptable protocol", MQTT 5 0x84


class Inbound(NamedTuple):
    """One received message, as the ingest path needs it (a tuple: built for every message
    on paho's thread, where a frozen dataclass costs several times as much)."""

    topic: str
    payload: bytes | bytearray
    retain: bool
    received: float
    """Monotonic receipt time: expiry never runs ahead of messages still waiting."""
    response_topic: str | None = None
    correlation: bytes | None = None


@dataclass(frozen=True, slots=True)
class Will:
    topic: str
    payload: bytes


class MqttLink:
    """Connects, reconnects with backoff, subscribes, publishes, and queues what arrives.

    Use as an async context manager: ``__aenter__`` starts connecting (it does not wait for
    the broker: REST serves meanwhile and ``/readyz`` says why it is not ready).
    """

    def __init__(
        self,
        broker: BrokerSettings,
        client_id: str,
        *,
        subscriptions: list[str],
        will: Will | None,
        keepalive_s: int = 60,
        prefer_mqtt5: bool = True,
        monotonic: Callable[[], float],
    ) -> None:
        self._broker = broker
        self._client_id = client_id
        self._subscriptions = subscriptions
        self._will = will
        self._keepalive_s = keepalive_s
        self._protocol = (
            MQTTProtocolVersion.MQTTv5 if prefer_mqtt5 else MQTTProtocolVersion.MQTTv311
        )
        self._monotonic = monotonic
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: paho.Client | None = None
        self._inbound: deque[Inbound] = deque()
        self._space = threading.Event()
        self._space.set()
        self._waiting = False
        self._arrived = asyncio.Event()
        self._state_changed = asyncio.Event()
        self._ever_connected = False
        self._connacks = 0
        self._generation = 0
        self._closing = False
        self._connack_timer: asyncio.TimerHandle | None = None
        self._pending_subacks: dict[int, asyncio.Future[None]] = {}
        self._sent = 0
        self._acked = 0
        self._credit_waiter: asyncio.Future[None] | None = None
        self.connected = False
        """True while connected with our subscriptions acknowledged."""
        self.last_error = "not connected yet"
        self.connections = 0

    # --- lifecycle -----------------------------------------------------------------------

    async def __aenter__(self) -> MqttLink:
        self._loop = asyncio.get_running_loop()
        self._start_client()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        client = self._client
        self._closing = True
        self._client = None
        self._cancel_connack_timer()
        if client is None:
            return
        self._space.set()
        with contextlib.suppress(Exception):
            client.disconnect()
        await asyncio.to_thread(client.loop_stop)
        self._set_connected(connected=False, reason="stopped")

    def _start_client(self) -> None:
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self._client_id,
            protocol=self._protocol,
            clean_session=False if self._protocol is MQTTProtocolVersion.MQTTv311 else None,
        )
        client.reconnect_delay_set(RECONNECT_MIN_S, RECONNECT_MAX_S)  # type: ignore[arg-type]
        # The publisher keeps its own, smaller window (publisher.MAX_IN_FLIGHT): paho never
        # needs to queue behind it.
        client.max_inflight_messages_set(1000)
        client.max_queued_messages_set(0)
        if self._will is not None:
            client.will_set(self._will.topic, self._will.payload, qos=1, retain=True)
        if self._broker.username is not None:
            client.username_pw_set(self._broker.username, self._broker.password)
        if self._broker.scheme == "mqtts":
            client.tls_set(cert_reqs=ssl.CERT_REQUIRED)
        client.on_socket_open = self._on_socket_open
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        client.on_unsubscribe = self._on_unsubscribe
        client.on_publish = self._on_publish
        if self._protocol is MQTTProtocolVersion.MQTTv5:
            # Resume the session on every connect, the first included: registrations queued
            # while the manager restarted are applied, not lost.
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]  # paho leaves it untyped
            props.SessionExpiryInterval = SESSION_EXPIRY_S
            client.connect_async(self._broker.host, self._broker.port,
                                 keepalive=self._keepalive_s, clean_start=False, properties=props)
        else:
            client.connect_async(self._broker.host, self._broker.port, keepalive=self._keepalive_s)
        self._client = client
        client.loop_start()

    # --- state ---------------------------------------------------------------------------

    async def wait_state_change(self) -> bool:
        """Wait until the connection goes up or down; returns the new state."""
        await self._state_changed.wait()
        self._state_changed.clear()
        return self.connected

    def _set_connected(self, *, connected: bool, reason: str) -> None:
        if not connected:
            # Every disconnect starts a new generation: SUBACKs of the old one no longer count.
            self._generation += 1
            self.last_error = reason
            pending, self._pending_subacks = self._pending_subacks, {}
            for fut in pending.values():
                if not fut.done():
                    fut.set_exception(BrokerError(f"connection lost: {reason}"))
        if connected == self.connected:
            return
        self.connected = connected
        if connected:
            self.connections += 1
        self._state_changed.set()
        self._wake_credit()

    # --- paho callbacks, on paho's thread: they hand over through call_soon_threadsafe and
    # touch only the hand-off fields (the inbound deque, _waiting, _acked), each written by one
    # side only or guarded by re-checks, so no lock is needed ----------------------------------

    def _call(self, fn: Callable[..., None], *args: Any) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed between check and call
                loop.call_soon_threadsafe(fn, *args)

    def _on_socket_open(self, client: paho.Client, userdata: object, sock: Any) -> None:
        _set_nodelay(client, userdata, sock)
        self._call(self._socket_opened, client)

    def _on_connect(self, client: paho.Client, _u: object, flags: Any, rc: ReasonCode,
                    _p: Properties | None) -> None:
        self._call(self._connack_received)
        if rc.is_failure:
            self._call(self._connect_refused, rc.value, str(rc))
            return
        mids = []
        for topic in self._subscriptions:
            result, mid = client.subscribe(topic, qos=1)
            if result == MQTTErrorCode.MQTT_ERR_SUCCESS and mid is not None:
                mids.append(mid)
        self._call(self._connected_waiting_subacks, client, mids, bool(flags.session_present))

    def _on_connect_fail(self, _c: paho.Client, _u: object) -> None:
        self._call(self._note_error, f"cannot connect to {self._broker.describe()}")

    def _on_disconnect(self, client: paho.Client, _u: object, _f: Any, rc: ReasonCode,
                       _p: Properties | None) -> None:
        self._call(self._set_connected_false, client, str(rc))

    def _on_message(self, _c: paho.Client, _u: object, msg: paho.MQTTMessage) -> None:
        props = getattr(msg, "properties", None)
        if props is None:
            inbound = Inbound(msg.topic, msg.payload, msg.retain, self._monotonic())
        else:
            inbound = Inbound(msg.topic, msg.payload, msg.retain, self._monotonic(),
                              getattr(props, "ResponseTopic", None),
                              getattr(props, "CorrelationData", None))
        if len(self._inbound) >= INBOUND_BOUND:
            self._space.clear()
            # Re-check after clearing: the consumer may have drained in between.
            while len(self._inbound) >= INBOUND_BOUND and self._client is not None:
                self._space.wait(1.0)
        self._inbound.append(inbound)
        if self._waiting:
            self._waiting = False
            self._call(self._arrived.set)

    def _on_subscribe(self, _c: paho.Client, _u: object, mid: int, codes: list[ReasonCode],
                      _p: Properties | None) -> None:
        failed = [str(code) for code in codes if code.is_failure]
        self._call(self._suback, mid, failed)

    def _on_unsubscribe(self, _c: paho.Client, _u: object, mid: int, _codes: Any,
                        _p: Properties | None) -> None:
        self._call(self._suback, mid, [])

    def _on_publish(self, _c: paho.Client, _u: object, _mid: int, _rc: ReasonCode,
                    _p: Properties | None) -> None:
        self._acked += 1  # only paho's thread writes it; the loop only reads
        if self._credit_waiter is not None:
            self._call(self._wake_credit)

    # --- the same, on the event loop -----------------------------------------------------

    def _note_error(self, message: str) -> None:
        if message != self.last_error:
            log.warning("broker_unreachable broker=%s error=%s", self._broker.describe(), message)
        self.last_error = message

    def _set_connected_false(self, client: paho.Client, reason: str) -> None:
        if client is not self._client and not self._closing:
            return  # a client replaced by the 3.1.1 fallback: its news is not ours
        if self.connected:
            level = logging.INFO if self._closing else logging.WARNING
            log.log(level, "broker_disconnected broker=%s reason=%s",
                    self._broker.describe(), reason)
        self._set_connected(connected=False, reason=f"connection lost: {reason}")

    def _connect_refused(self, code: int, reason: str) -> None:
        if code in _UNSUPPORTED_PROTOCOL and self._may_fall_back():
            log.info("broker_mqtt5_refused broker=%s fallback=3.1.1", self._broker.describe())
            self._fall_back_to_mqtt311()
            return
        self._note_error(f"broker refused the connection: {reason}")

    def _may_fall_back(self) -> bool:
        return self._protocol is MQTTProtocolVersion.MQTTv5 and not self._ever_connected

    def _fall_back_to_mqtt311(self) -> None:
        self._cancel_connack_timer()
        self._protocol = MQTTProtocolVersion.MQTTv311
        old = self._client
        self._client = None
        if old is not None:
            old.disconnect()
            threading.Thread(target=old.loop_stop, daemon=True).start()
        self._start_client()

    def _socket_opened(self, client: paho.Client) -> None:
        # Armed once per unanswered stretch: a broker that drops and re-accepts the connection
        # without ever answering must not keep postponing the fallback.
        if self._connack_timer is not None or not self._may_fall_back() or self._loop is None:
            return
        self._connack_timer = self._loop.call_later(
            CONNACK_TIMEOUT_S, self._connack_overdue, client, self._connacks)

    def _connack_received(self) -> None:
        self._connacks += 1
        self._cancel_connack_timer()

    def _connack_overdue(self, client: paho.Client, connacks: int) -> None:
        self._connack_timer = None
        if client is not self._client or connacks != self._connacks or not self._may_fall_back():
            return
        log.info("broker_mqtt5_unanswered broker=%s timeout_s=%s fallback=3.1.1",
                 self._broker.describe(), CONNACK_TIMEOUT_S)
        self._fall_back_to_mqtt311()

    def _cancel_connack_timer(self) -> None:
        if self._connack_timer is not None:
            self._connack_timer.cancel()
            self._connack_timer = None

    def _connected_waiting_subacks(self, client: paho.Client, mids: list[int],
                                   session_present: bool) -> None:
        if client is not self._client:
            return
        self._generation += 1
        generation = self._generation
        loop = asyncio.get_running_loop()
        futures = []
        for mid in mids:
            fut: asyncio.Future[None] = loop.create_future()
            self._pending_subacks[mid] = fut
            futures.append(fut)
        self._ever_connected = True
        log.info("broker_connected broker=%s protocol=%s session_present=%s",
                 self._broker.describe(), self.protocol_name, session_present)

        def ready(done: asyncio.Future[list[BaseException | None]]) -> None:
            if done.cancelled() or generation != self._generation:
                return  # the connection went away (or came again) meanwhile
            errors = [r for r in done.result() if isinstance(r, BaseException)]
            if errors:
                self._note_error(str(errors[0]))
                return
            self._set_connected(connected=True, reason="")

        gathered = asyncio.gather(*futures, return_exceptions=True)
        gathered.add_done_callback(ready)

    def _suback(self, mid: int, failed: list[str]) -> None:
        fut = self._pending_subacks.pop(mid, None)
        if fut is None or fut.done():
            return
        if failed:
            fut.set_exception(BrokerError(f"subscription refused: {', '.join(failed)}"))
        else:
            fut.set_result(None)

    # --- inbound ---------------------------------------------------------------------------

    async def wait_inbound(self) -> None:
        """Return once at least one message is queued."""
        while not self._inbound:
            self._arrived.clear()
            self._waiting = True
            if self._inbound:
                self._waiting = False
                return
            await self._arrived.wait()

    def take_inbound(self, limit: int) -> list[Inbound]:
        queue = self._inbound
        batch = [queue.popleft() for _ in range(min(limit, len(queue)))]
        if not self._space.is_set() and len(queue) < INBOUND_BOUND // 2:
            self._space.set()
        return batch

    def oldest_pending(self) -> float | None:
        """Receipt time of the oldest message not yet taken, or None."""
        try:
            return self._inbound[0].received
        except IndexError:
            return None

    # --- outbound --------------------------------------------------------------------------

    @property
    def protocol_name(self) -> str:
        return "5" if self._protocol is MQTTProtocolVersion.MQTTv5 else "3.1.1"

    @property
    def mqtt5(self) -> bool:
        return self._protocol is MQTTProtocolVersion.MQTTv5

    @property
    def in_flight(self) -> int:
        return self._sent - self._acked

    def publish(self, topic: str, payload: bytes, *, retain: bool = False, qos: int = 1,
                correlation: bytes | None = None) -> bool:
        """Queue one publish on paho; False when not connected (nothing is queued)."""
        client = self._client
        if client is None or not self.connected:
            return False
        props = None
        if correlation is not None and self.mqtt5:
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]  # paho leaves it untyped
            props.CorrelationData = correlation
        info = client.publish(topic, payload, qos=qos, retain=retain, properties=props)
        # NO_CONN: the link dropped an instant ago; paho keeps a QoS 1 message and sends it on
        # reconnect, so it counts as sent (returning False would send it twice).
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS and not (
            qos and info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN
        ):
            return False
        if qos:
            self._sent += 1
        return True

    async def wait_credit(self, limit: int) -> None:
        """Wait until fewer than ``limit`` QoS 1 publishes await their acknowledgement."""
        while self.in_flight >= limit or not self.connected:
            fut = asyncio.get_running_loop().create_future()
            self._credit_waiter = fut
            if self.in_flight < limit and self.connected:
                break
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a cancellation
            # that lands as the future completes, and shutdown would then wait here for ever.
            try:
                async with asyncio.timeout(1.0):
                    await fut
            except TimeoutError:
                pass
            finally:
                self._credit_waiter = None

    def _wake_credit(self) -> None:
        fut = self._credit_waiter
        if fut is not None and not fut.done():
            fut.set_result(None)

    async def subscribe(self, topics: list[str], timeout_s: float = 10.0) -> None:
        await self._request(lambda c: c.subscribe([(t, 1) for t in topics]), timeout_s)

    async def unsubscribe(self, topics: list[str], timeout_s: float = 10.0) -> None:
        await self._request(lambda c: c.unsubscribe(topics), timeout_s)

    async def _request(
        self, send: Callable[[paho.Client], tuple[MQTTErrorCode, int | None]], timeout_s: float
    ) -> None:
        client = self._client
        if client is None or not self.connected:
            raise BrokerError("not connected")
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        result, mid = send(client)
        if result != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
            raise BrokerError(f"request failed: {paho.error_string(result)}")
        self._pending_subacks[mid] = fut
        async with asyncio.timeout(timeout_s):
            await fut

    async def flush(self, timeout_s: float) -> bool:
        """Wait until every QoS 1 publish so far is acknowledged; False on timeout."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self.wait_credit(1)
                return True
        return False


def _set_nodelay(_c: paho.Client, _u: object, sock: Any) -> None:
    # paho leaves Nagle on: a small status publish would wait 40-90 ms for the ACK clock.
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
