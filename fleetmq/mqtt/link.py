"""The manager's one MQTT connection, over paho-mqtt; the only module that imports paho.

paho runs no thread here: the event loop drives the socket (``add_reader``/``add_writer``, and
``loop_misc`` once a second for keepalive pings), so paho's callbacks run on the loop and call
straight into fleetmq. Only the blocking part of a connect (DNS, TCP, TLS handshake) runs in an
executor thread, while nothing else touches that client. Inbound messages go into a bounded
deque that the ingest task drains in batches; when the deque is full the loop stops reading the
socket, so a backlog stays in the broker's queue for our persistent session instead of growing
here, and reading resumes once the deque has drained below half.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
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
from fleetmq.tls import broker_context

log = logging.getLogger(__name__)

INBOUND_BOUND = 50_000
"""Messages received but not yet applied. Past it the socket is not read (backpressure)."""
SESSION_EXPIRY_S = 3600
"""MQTT 5: how long the broker keeps our session (and queues for it) while we are away."""
RECONNECT_MIN_S = 0.5
RECONNECT_MAX_S = 30.0
CONNACK_TIMEOUT_S = 5.0
"""An MQTT 5 CONNECT left unanswered this long counts as refused: amqtt (3.1.1 only) misreads
one that carries properties or a will and waits for bytes that never come, instead of refusing."""
CONNECT_TIMEOUT_S = 5.0
"""TCP connect and TLS handshake, in the executor thread (``__aexit__`` lets one finish)."""
MISC_INTERVAL_S = 1.0
"""How often paho's ``loop_misc`` runs: keepalive pings and their timeout."""
READ_BUDGET = 500
"""Packets read per wake-up of the socket, so REST, expiry and ingest are never starved."""
RECV_CHUNK = 65_536
CLOSE_TIMEOUT_S = 2.0
"""How long ``__aexit__`` waits for the DISCONNECT to be written before closing anyway."""
_UNSUPPORTED_PROTOCOL = (1, 132)  # CONNACK codes: 3.1.1 "unacceptable protocol", MQTT 5 0x84


class Inbound(NamedTuple):
    """One received message, as the ingest path needs it (a tuple: built for every message,
    where a frozen dataclass costs several times as much)."""

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


class _Client(paho.Client):
    """paho's client with buffered socket reads and a direct ``on_message``.

    Two private paho methods are replaced (tests/unit/test_mqtt_link.py checks they exist):

    - ``_sock_recv``: paho reads every packet with at least three ``recv`` calls (the type
      byte, the length bytes one at a time, the rest); here one ``recv`` of up to 64 KiB serves
      many packets. ``starved`` tells the reader that the socket had nothing more (paho's
      ``loop_read`` returns success both after a packet and when there was none).
    - ``_handle_on_message``: paho matches every message's topic against per-topic callbacks
      (a recursive generator, ~7% of the ingest path) before calling ``on_message``; there are
      none here.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.rbuf = b""
        self.rpos = 0
        self.starved = False

    def _sock_recv(self, bufsize: int) -> bytes:
        buf = self.rbuf
        pos = self.rpos
        if pos >= len(buf):
            sock = self._sock
            if sock is None:
                raise ConnectionError("self._sock is None")
            try:
                buf = sock.recv(max(bufsize, RECV_CHUNK))
            except (BlockingIOError, ssl.SSLWantReadError) as err:
                self.starved = True
                raise BlockingIOError() from err
            except ssl.SSLWantWriteError as err:
                self.starved = True
                self._call_socket_register_write()
                raise BlockingIOError() from err
            if not buf:
                return buf  # end of stream: paho reports the connection lost
            pos = 0
            self.rbuf = buf
        end = pos + bufsize
        self.rpos = end
        if pos == 0 and end >= len(buf):
            return buf
        return buf[pos:end]

    def _handle_on_message(self, message: paho.MQTTMessage) -> None:
        on_message = self.on_message
        if on_message is not None:
            on_message(self, self._userdata, message)

    def drop_buffer(self) -> None:
        self.rbuf = b""
        self.rpos = 0

    def buffered(self) -> bool:
        """Bytes already received that the socket's readiness no longer announces."""
        if self.rpos < len(self.rbuf):
            return True
        sock = self._sock
        return isinstance(sock, ssl.SSLSocket) and sock.pending() > 0


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
        self._tls = broker_context(broker)  # files read now: a wrong path fails the start
        self._client_id = client_id
        self._subscriptions = subscriptions
        self._will = will
        self._keepalive_s = keepalive_s
        self._protocol = (
            MQTTProtocolVersion.MQTTv5 if prefer_mqtt5 else MQTTProtocolVersion.MQTTv311
        )
        self._monotonic = monotonic
        self._loop: asyncio.AbstractEventLoop | None = None
        self._client: _Client | None = None
        self._sock: Any = None
        """The socket the loop watches (the current client's), or None."""
        self._inbound: deque[Inbound] = deque()
        self._paused = False
        """The inbound deque is full: the socket is not read until it drains below half."""
        self._read_soon = False
        self._in_read = False
        self._waiting = False
        self._arrived = asyncio.Event()
        self._state_changed = asyncio.Event()
        self._ever_connected = False
        self._connacks = 0
        self._generation = 0
        self._closing = False
        self._connecting = False
        """A connect runs in the executor: nothing on the loop may touch the client meanwhile."""
        self._connect_task: asyncio.Task[None] | None = None
        self._backoff_s = RECONNECT_MIN_S
        self._misc_timer: asyncio.TimerHandle | None = None
        self._socket_closed: asyncio.Future[None] | None = None
        """Set once the socket closes, for ``__aexit__``."""
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
        self._loop = loop = asyncio.get_running_loop()
        self._misc_timer = loop.call_later(MISC_INTERVAL_S, self._misc)
        self._start_client()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._closing = True
        self._cancel_connack_timer()
        if self._misc_timer is not None:
            self._misc_timer.cancel()
            self._misc_timer = None
        task = self._connect_task
        if task is not None and not task.done():
            if not self._connecting:
                task.cancel()  # a backoff sleep; a connect in the executor is let finish
            await asyncio.gather(task, return_exceptions=True)
        client, self._client = self._client, None
        if client is None:
            return
        if client.socket() is not None:
            closed = self._socket_closed = asyncio.get_running_loop().create_future()
            with contextlib.suppress(Exception):
                client.disconnect()
                client.loop_write()  # usually written and closed on the spot
            if client.socket() is not None:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(CLOSE_TIMEOUT_S):
                        await closed
            self._force_close(client)
        self._set_connected(connected=False, reason="stopped")

    def _new_client(self) -> _Client:
        client = _Client(
            CallbackAPIVersion.VERSION2,
            client_id=self._client_id,
            protocol=self._protocol,
            clean_session=False if self._protocol is MQTTProtocolVersion.MQTTv311 else None,
            # No reconnect from inside paho (it would block the loop): this class reconnects.
            reconnect_on_failure=False,
        )
        client.connect_timeout = CONNECT_TIMEOUT_S
        # The publisher keeps its own, smaller window (publisher.MAX_IN_FLIGHT): paho never
        # needs to queue behind it.
        client.max_inflight_messages_set(1000)
        client.max_queued_messages_set(0)
        if self._will is not None:
            client.will_set(self._will.topic, self._will.payload, qos=1, retain=True)
        use_broker(client, self._broker, self._tls)
        client.on_socket_open = set_nodelay
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        client.on_unsubscribe = self._on_unsubscribe
        client.on_publish = self._on_publish
        return client

    def _start_client(self) -> None:
        self._client = self._new_client()
        self._schedule_connect(0.0)

    # --- connecting ----------------------------------------------------------------------

    def _schedule_connect(self, delay_s: float) -> None:
        if self._closing or self._loop is None:
            return
        task = self._connect_task
        if task is not None and not task.done():
            if self._connecting:
                return  # it connects again when it sees its client replaced
            task.cancel()  # a backoff sleep: this request replaces it
        self._connect_task = self._loop.create_task(
            self._connect(delay_s), name=f"fleetmq-mqtt-connect-{self._client_id}")

    def _next_backoff(self) -> float:
        delay, self._backoff_s = self._backoff_s, min(RECONNECT_MAX_S, self._backoff_s * 2)
        return delay

    async def _connect(self, delay_s: float) -> None:
        while not self._closing:
            if delay_s > 0:
                await asyncio.sleep(delay_s)
            client = self._client
            if client is None or self._closing:
                return
            error = await self._open(client)
            if self._closing or client is not self._client:
                self._abandon(client)  # stopped or replaced meanwhile: connect the new one
                delay_s = 0.0
                continue
            if error is None:
                self._attach(client)
                return
            self._note_error(f"cannot connect to {self._broker.describe()}: {error}")
            delay_s = self._next_backoff()

    async def _open(self, client: _Client) -> str | None:
        """Open the socket and send CONNECT, in the executor; the error, or None."""
        loop = asyncio.get_running_loop()
        sock = client.socket()
        if sock is not None:  # paho closes it when connecting again: unwatch it first
            self._forget(client, sock)
        # Off while paho connects on the executor thread: it writes CONNECT there itself.
        client.on_socket_register_write = None
        client.on_socket_unregister_write = None
        client.on_socket_close = None
        client.drop_buffer()
        mqtt5 = self._protocol is MQTTProtocolVersion.MQTTv5  # the client's: read here, not there
        self._connecting = True
        try:
            await loop.run_in_executor(None, self._blocking_connect, client, mqtt5)
        except Exception as exc:  # refused, unreachable, TLS, bad host
            return f"{type(exc).__name__}: {exc}"
        finally:
            self._connecting = False
        if client.socket() is None:
            return "connection closed while connecting"
        return None

    def _blocking_connect(self, client: _Client, mqtt5: bool) -> None:
        host, port = self._broker.host, self._broker.port
        if mqtt5:
            # Resume the session on every connect, the first included: registrations queued
            # while the manager restarted are applied, not lost.
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]  # paho leaves it untyped
            props.SessionExpiryInterval = SESSION_EXPIRY_S
            client.connect(host, port, keepalive=self._keepalive_s, clean_start=False,
                           properties=props)
        else:
            client.connect(host, port, keepalive=self._keepalive_s)

    def _attach(self, client: _Client) -> None:
        """Hand the freshly connected socket to the event loop."""
        loop = self._loop
        sock = client.socket()
        if loop is None or sock is None:
            return
        self._sock = sock
        client.on_socket_register_write = self._want_write
        client.on_socket_unregister_write = self._unwant_write
        client.on_socket_close = self._socket_closing
        if not self._paused:
            loop.add_reader(sock, self._readable, client)
        if client.want_write():
            loop.add_writer(sock, self._writable, client)
        self._socket_opened(client)

    def _abandon(self, client: _Client) -> None:
        """Close a client no longer in use: DISCONNECT if it can be written now, then close."""
        if client.socket() is None:
            return
        with contextlib.suppress(Exception):
            client.disconnect()
            client.loop_write()
        self._force_close(client)

    def _force_close(self, client: _Client) -> None:
        sock = client.socket()
        if sock is None:
            return
        self._forget(client, sock)
        # paho keeps the closed socket: none of its later calls (``__del__`` too) may reach us.
        client.on_socket_register_write = None
        client.on_socket_unregister_write = None
        client.on_socket_close = None
        with contextlib.suppress(OSError):
            sock.close()

    # --- the socket on the event loop ----------------------------------------------------

    def _want_write(self, client: paho.Client, _u: object, sock: Any) -> None:
        if self._in_read and client is self._client:
            return  # the reader writes (PUBACKs) once it is done reading
        if self._loop is not None:
            self._loop.add_writer(sock, self._writable, client)

    def _unwant_write(self, _c: paho.Client, _u: object, sock: Any) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(ValueError, OSError):
                loop.remove_writer(sock)

    def _socket_closing(self, client: paho.Client, _u: object, sock: Any) -> None:
        self._forget(client, sock)

    def _forget(self, client: paho.Client, sock: Any) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(ValueError, OSError):
                loop.remove_reader(sock)
                loop.remove_writer(sock)
        if sock is self._sock:
            self._sock = None
        if isinstance(client, _Client):
            client.drop_buffer()
        waiter = self._socket_closed
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _readable(self, client: _Client) -> None:
        self._read_soon = False
        if (client is not self._client or self._paused or self._connecting
                or client.socket() is None):
            return
        client.starved = False
        budget = READ_BUDGET
        self._in_read = True
        try:
            while budget > 0:
                budget -= 1
                if client.loop_read() or client.starved or self._paused:
                    break
        except Exception:
            log.exception("mqtt_read_failed broker=%s", self._broker.describe())
        finally:
            self._in_read = False
        sock = client.socket()
        if sock is None:
            return
        if client.want_write():
            # PUBACKs (and anything queued while reading) go out now, in one go.
            try:
                client.loop_write()
            except Exception:
                log.exception("mqtt_write_failed broker=%s", self._broker.describe())
            sock = client.socket()
            if sock is not None and client.want_write() and self._loop is not None:
                self._loop.add_writer(sock, self._writable, client)
        if (sock is not None and not self._paused and not client.starved
                and client.buffered() and not self._read_soon and self._loop is not None):
            # Packets already received: the socket's readiness would not announce them again.
            self._read_soon = True
            self._loop.call_soon(self._readable, client)

    def _writable(self, client: paho.Client) -> None:
        if self._connecting and client is self._client:
            return  # the executor thread owns it; its new socket is watched once connected
        try:
            client.loop_write()
        except Exception:
            log.exception("mqtt_write_failed broker=%s", self._broker.describe())

    def _misc(self) -> None:
        loop = self._loop
        if loop is None or self._closing:
            return
        self._misc_timer = loop.call_later(MISC_INTERVAL_S, self._misc)
        client = self._client
        # Not while a connect runs (another thread owns the client), nor while reading is
        # paused: the PINGRESP would wait unread and the ping time out.
        if client is None or self._connecting or self._paused or client.socket() is None:
            return
        try:
            client.loop_misc()
        except Exception:
            log.exception("mqtt_misc_failed broker=%s", self._broker.describe())

    def _pause_reading(self) -> None:
        self._paused = True
        if self._sock is not None and self._loop is not None:
            self._loop.remove_reader(self._sock)

    def _resume_reading(self) -> None:
        self._paused = False
        client, sock, loop = self._client, self._sock, self._loop
        if client is None or sock is None or loop is None or client.socket() is not sock:
            return
        loop.add_reader(self._sock, self._readable, client)
        if not self._read_soon:
            self._read_soon = True
            loop.call_soon(self._readable, client)  # what is buffered already

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

    # --- paho callbacks: on the event loop (paho runs no thread). They must not drive paho's
    # network calls (loop_read/loop_write) themselves: paho holds a lock around them. -------

    def _on_connect(self, client: paho.Client, _u: object, flags: Any, rc: ReasonCode,
                    _p: Properties | None) -> None:
        if client is not self._client:
            return
        self._connack_received()
        if rc.is_failure:
            self._connect_refused(rc.value, str(rc))
            return
        self._backoff_s = RECONNECT_MIN_S
        mids = []
        for topic in self._subscriptions:
            result, mid = client.subscribe(topic, qos=1)
            if result == MQTTErrorCode.MQTT_ERR_SUCCESS and mid is not None:
                mids.append(mid)
        self._connected_waiting_subacks(client, mids, bool(flags.session_present))

    def _on_disconnect(self, client: paho.Client, _u: object, _f: Any, rc: ReasonCode,
                       _p: Properties | None) -> None:
        self._set_connected_false(client, str(rc))
        if client is self._client and not self._closing:
            self._schedule_connect(self._next_backoff())

    def _on_message(self, _c: paho.Client, _u: object, msg: paho.MQTTMessage) -> None:
        props = getattr(msg, "properties", None)
        if props is None:
            inbound = Inbound(msg.topic, msg.payload, msg.retain, self._monotonic())
        else:
            inbound = Inbound(msg.topic, msg.payload, msg.retain, self._monotonic(),
                              getattr(props, "ResponseTopic", None),
                              getattr(props, "CorrelationData", None))
        queue = self._inbound
        queue.append(inbound)
        if self._waiting:
            self._waiting = False
            self._arrived.set()
        if len(queue) >= INBOUND_BOUND and not self._paused:
            self._pause_reading()

    def _on_subscribe(self, _c: paho.Client, _u: object, mid: int, codes: list[ReasonCode],
                      _p: Properties | None) -> None:
        self._suback(mid, [str(code) for code in codes if code.is_failure])

    def _on_unsubscribe(self, _c: paho.Client, _u: object, mid: int, _codes: Any,
                        _p: Properties | None) -> None:
        self._suback(mid, [])

    def _on_publish(self, _c: paho.Client, _u: object, _mid: int, _rc: ReasonCode,
                    _p: Properties | None) -> None:
        self._acked += 1
        if self._credit_waiter is not None:
            self._wake_credit()

    # --- connection state ----------------------------------------------------------------

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
            # Inside paho's callback: paho closes the refused connection itself right after.
            self._fall_back_to_mqtt311(abandon=False)
            return
        self._note_error(f"broker refused the connection: {reason}")

    def _may_fall_back(self) -> bool:
        return self._protocol is MQTTProtocolVersion.MQTTv5 and not self._ever_connected

    def _fall_back_to_mqtt311(self, *, abandon: bool) -> None:
        self._cancel_connack_timer()
        self._protocol = MQTTProtocolVersion.MQTTv311
        old = self._client
        self._client = None
        if old is not None and abandon:
            self._abandon(old)
        self._backoff_s = RECONNECT_MIN_S
        self._start_client()

    def _socket_opened(self, client: _Client) -> None:
        # Armed once per unanswered stretch: a broker that drops and re-accepts the connection
        # without ever answering must not keep postponing the fallback.
        if self._connack_timer is not None or not self._may_fall_back() or self._loop is None:
            return
        self._connack_timer = self._loop.call_later(
            CONNACK_TIMEOUT_S, self._connack_overdue, client, self._connacks)

    def _connack_received(self) -> None:
        self._connacks += 1
        self._cancel_connack_timer()

    def _connack_overdue(self, client: _Client, connacks: int) -> None:
        self._connack_timer = None
        if client is not self._client or connacks != self._connacks or not self._may_fall_back():
            return
        if self._connecting:
            # Another thread owns the client right now: look again once it is done.
            if self._loop is not None:
                self._connack_timer = self._loop.call_later(
                    0.1, self._connack_overdue, client, connacks)
            return
        log.info("broker_mqtt5_unanswered broker=%s timeout_s=%s fallback=3.1.1",
                 self._broker.describe(), CONNACK_TIMEOUT_S)
        self._fall_back_to_mqtt311(abandon=True)

    def _cancel_connack_timer(self) -> None:
        if self._connack_timer is not None:
            self._connack_timer.cancel()
            self._connack_timer = None

    def _connected_waiting_subacks(self, client: paho.Client, mids: list[int],
                                   session_present: bool) -> None:
        if client is not self._client or self._loop is None:
            return
        self._generation += 1
        generation = self._generation
        loop = self._loop
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
            await self._arrived.wait()

    def take_inbound(self, limit: int) -> list[Inbound]:
        queue = self._inbound
        batch = [queue.popleft() for _ in range(min(limit, len(queue)))]
        if self._paused and len(queue) < INBOUND_BOUND // 2:
            self._resume_reading()
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
        if client is None or not self.connected or self._connecting:
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
        if client is None or not self.connected or self._connecting:
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


def use_broker(client: paho.Client, broker: BrokerSettings,
               tls: ssl.SSLContext | None = None) -> None:
    """The credentials and TLS a broker URL asks for, on any of fleetmq's paho clients (the
    manager's links, the agent, the simulator). ``tls``: the context ``broker_context(broker)``
    made once (made here if not given): TLS 1.2+, the broker's certificate and host name checked
    against ``--broker-ca`` (else the system's CAs), ``--broker-cert`` presented if given."""
    if broker.username is not None:
        client.username_pw_set(broker.username, broker.password)
    if broker.scheme == "mqtts":
        client.tls_set_context(tls if tls is not None else broker_context(broker))


def set_nodelay(_c: paho.Client, _u: object, sock: Any) -> None:
    """paho's ``on_socket_open``: paho leaves Nagle on, so a small publish (a status, a
    heartbeat) would wait 40-90 ms for the ACK clock."""
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
