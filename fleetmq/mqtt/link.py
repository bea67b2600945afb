"""The manager's MQTT connections, over gmqtt (asyncio-native; with gmqtt_client.py, the only
modules that import it).

gmqtt reads and parses on the event loop and hands every message to the link's ``Inbox``
(inbox.py), a bounded queue that the ingest task drains in batches; past its bound the socket
is not read, so a backlog stays in the broker's queue for our persistent session.

This class owns reconnecting (gmqtt's own reconnect is turned off: its fixed delay, unbounded
connect and replacement of the connection under us do not fit): one gmqtt client per protocol
version, connected again after each loss with exponential back-off, so QoS 1 publishes not yet
acknowledged are sent again when the broker resumes our session.

With ``ack_after_apply`` the PUBACK of a QoS 1 message goes out only once the consumer has
taken it and come back for more (``take_inbound`` or ``wait_inbound`` again): the message was
applied (contract section 10). gmqtt does this with an ``async`` ``on_message``, one task per
message, QoS 0 too; see ``ACK_AFTER_APPLY`` for what that costs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gmqtt import Message, Subscription  # type: ignore[import-untyped]
from gmqtt.mqtt.constants import MQTTv50, MQTTv311  # type: ignore[import-untyped]
from gmqtt.mqtt.handler import MQTTConnectError  # type: ignore[import-untyped]

from fleetmq.config import BrokerSettings
from fleetmq.errors import BrokerError
from fleetmq.mqtt.gmqtt_client import GMQTT_LOG, NO_RECONNECT, GmqttClient, Outbox
from fleetmq.mqtt.inbox import Inbound, Inbox
from fleetmq.mqtt.paho_options import set_nodelay, use_broker
from fleetmq.tls import broker_context

__all__ = ["Inbound", "MqttLink", "Will", "set_nodelay", "use_broker"]
"""``use_broker`` and ``set_nodelay`` (paho options of the agent and simulator) are re-exported
from here for the modules that import them so."""

log = logging.getLogger(__name__)

SESSION_EXPIRY_S = 3600
"""MQTT 5: how long the broker keeps our session (and queues for it) while we are away."""
RECONNECT_MIN_S = 0.5
RECONNECT_MAX_S = 30.0
CONNACK_TIMEOUT_S = 5.0
"""An MQTT 5 CONNECT left unanswered this long counts as refused: amqtt (3.1.1 only) misreads
one that carries properties or a will and waits for bytes that never come, instead of refusing."""
CONNECT_TIMEOUT_S = 5.0
"""TCP connect and TLS handshake (gmqtt does both and waits for the CONNACK in one call: the
link watches the connection to tell the two apart)."""
WATCH_S = 0.05
"""How often a connect waiting for its CONNACK looks at its connection."""
CLOSE_TIMEOUT_S = 2.0
"""How long ``__aexit__`` waits for the DISCONNECT to be written before closing anyway."""
ACK_AFTER_APPLY = False
"""The default of ``MqttLink(ack_after_apply=...)``: off, since a task per message cost a third
of the ingest rate (bench/README.md section 10); the loss window is in docs/protocol.md."""
OUT_ID_RESERVE = 4
"""Packet ids kept free of publishes for SUBSCRIBE and UNSUBSCRIBE."""
_UNSUPPORTED_PROTOCOL = (1, 132)  # CONNACK codes: 3.1.1 "unacceptable protocol", MQTT 5 0x84


@dataclass(frozen=True, slots=True)
class Will:
    topic: str
    payload: bytes
    delay_s: int = 0
    """MQTT 5's will delay: a session resumed within it (a standby taking over) sends none."""


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
        ack_after_apply: bool | None = None,
        may_act: Callable[[], bool] = lambda: True,
    ) -> None:
        self._broker = broker
        self._may_act = may_act
        """Checked before every connect and publish: False once this manager is no longer
        the active one (contract section 10), so a deposed manager never takes its client id
        back from the new active."""
        self._tls = broker_context(broker)  # files read now: a wrong path fails the start
        self._client_id = client_id
        self._subscriptions = subscriptions
        self._will = will
        self._keepalive_s = keepalive_s
        self._version = MQTTv50 if prefer_mqtt5 else MQTTv311
        self._monotonic = monotonic
        self._ack_after_apply = ACK_AFTER_APPLY if ack_after_apply is None else ack_after_apply
        self._client: GmqttClient | None = None
        self._outbox = Outbox(self._wake_credit)
        self._inbox = Inbox(monotonic)
        self._state_changed = asyncio.Event()
        self._lost = asyncio.Event()
        self._ever_connected = False
        self._generation = 0
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        self._connect_timeout: asyncio.Timeout | None = None
        self._watch: asyncio.TimerHandle | None = None
        """While a connect waits for its CONNACK."""
        self._closed_early = False
        self._backoff_s = RECONNECT_MIN_S
        self._pending_subacks: dict[int, asyncio.Future[None]] = {}
        self._window = 65_535 - OUT_ID_RESERVE
        self._credit_waiter: asyncio.Future[None] | None = None
        self.connected = False
        """True while connected with our subscriptions acknowledged."""
        self.last_error = "not connected yet"
        self.connections = 0

    # --- lifecycle -----------------------------------------------------------------------

    async def __aenter__(self) -> MqttLink:
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name=f"fleetmq-mqtt-connect-{self._client_id}")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._closing = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        client = self._client
        if client is not None and client.is_connected_safe():
            with contextlib.suppress(Exception):
                async with asyncio.timeout(CLOSE_TIMEOUT_S):
                    await client.disconnect()
        self._set_connected(connected=False, reason="stopped")
        self._inbox.release_all()

    def _new_client(self) -> Any:
        will = None
        if self._will is not None:
            delay = ({"will_delay_interval": self._will.delay_s}
                     if self._version == MQTTv50 and self._will.delay_s else {})
            will = Message(self._will.topic, self._will.payload, qos=1, retain=True, **delay)
        props: dict[str, Any] = {}
        if self._version == MQTTv50:
            # Resume the session on every connect, the first included: registrations queued
            # while the manager restarted are applied, not lost.
            props["session_expiry_interval"] = SESSION_EXPIRY_S
        client = GmqttClient(self._client_id, clean_session=False, will_message=will,
                         persistent_storage=self._outbox, logger=GMQTT_LOG,
                         optimistic_acknowledgement=not self._ack_after_apply, **props)
        client.set_config({"reconnect_retries": NO_RECONNECT})
        if self._broker.username is not None:
            client.set_auth_credentials(self._broker.username, self._broker.password)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        inbox = self._inbox
        inbox.client = client
        client.on_message = inbox.on_message_acked if self._ack_after_apply else inbox.on_message
        client.on_subscribe = self._on_subscribe
        client.on_unsubscribe = self._on_unsubscribe
        return client

    # --- connecting ----------------------------------------------------------------------

    def _next_backoff(self) -> float:
        delay, self._backoff_s = self._backoff_s, min(RECONNECT_MAX_S, self._backoff_s * 2)
        return delay

    async def _run(self) -> None:
        delay_s = 0.0
        while not self._closing:
            if delay_s > 0:
                await asyncio.sleep(delay_s)
            if not self._may_act():
                self._note_error("not connecting: this manager is not the active one")
                delay_s = self._next_backoff()
                continue
            if self._client is None:
                self._client = self._new_client()
            self._lost.clear()
            error = await self._open(self._client)
            if error is None:
                await self._lost.wait()
                delay_s = self._next_backoff()
            elif error == "fallback":
                delay_s = 0.0
            else:
                self._note_error(f"cannot connect to {self._broker.describe()}: {error}")
                delay_s = self._next_backoff()

    async def _open(self, client: Any) -> str | None:
        """Connect and wait for the CONNACK: None, the error, or "fallback" (to 3.1.1)."""
        before = client.connection()
        self._closed_early = False
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_S + CONNACK_TIMEOUT_S) as timeout:
                self._connect_timeout = timeout
                self._watch = loop.call_later(WATCH_S, self._watch_connect, client, before,
                                              None)
                await client.connect(self._broker.host, self._broker.port,
                                     ssl=self._tls if self._tls is not None else False,
                                     keepalive=self._keepalive_s, version=self._version)
        except MQTTConnectError as exc:
            return self._refused(client, exc)
        except TimeoutError:
            return self._unanswered(client, made=client.connection() is not before)
        except Exception as exc:  # refused, unreachable, TLS, bad host
            client.drop()
            return f"{type(exc).__name__}: {exc}"
        finally:
            self._connect_timeout = None
            if self._watch is not None:
                self._watch.cancel()
                self._watch = None
        return None

    def _watch_connect(self, client: Any, before: object, connack_by: float | None) -> None:
        """While a connect waits: once TCP and TLS are up, the CONNACK has CONNACK_TIMEOUT_S;
        a connection closed before its CONNACK ends the wait (gmqtt misses a close that comes
        before it has set the connection up, and would wait for ever)."""
        self._watch = None
        timeout = self._connect_timeout
        if timeout is None:
            return
        loop = asyncio.get_running_loop()
        state = client.connection_state(before)
        if state == "closed":
            self._closed_early = True
            timeout.reschedule(loop.time())
            return
        if state == "open" and connack_by is None:
            connack_by = loop.time() + CONNACK_TIMEOUT_S
            when = timeout.when()
            if when is not None and connack_by < when:
                timeout.reschedule(connack_by)
        self._watch = loop.call_later(WATCH_S, self._watch_connect, client, before, connack_by)

    def _unanswered(self, client: Any, *, made: bool) -> str:
        """No CONNACK in time, or the connection closed before one."""
        refusal = client.refusal()  # the close that ended the wait followed a refusal
        if refusal is not None:
            return self._refused(client, refusal)
        client.drop()
        if made and self._may_fall_back():
            # amqtt closes an MQTT 5 CONNECT with a will, and leaves others unanswered.
            log.info("broker_mqtt5_unanswered client_id=%s broker=%s closed=%s fallback=3.1.1",
                     self._client_id, self._broker.describe(), self._closed_early)
            return self._fall_back(client)
        if self._closed_early:
            return "the broker closed the connection before answering"
        return "no answer from the broker in time"

    def _refused(self, client: Any, exc: Exception) -> str:
        code = getattr(exc, "_code", None)
        if code in _UNSUPPORTED_PROTOCOL and self._may_fall_back():
            log.info("broker_mqtt5_refused client_id=%s broker=%s fallback=3.1.1",
                     self._client_id, self._broker.describe())
            return self._fall_back(client)
        return f"broker refused the connection: {exc}"

    def _may_fall_back(self) -> bool:
        return self._version == MQTTv50 and not self._ever_connected

    def _fall_back(self, client: Any) -> str:
        self._version = MQTTv311
        self._client = None
        self._backoff_s = RECONNECT_MIN_S
        self._outbox.clear()
        client.drop()
        return "fallback"

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

    def _note_error(self, message: str) -> None:
        if message != self.last_error:
            log.warning("broker_unreachable client_id=%s broker=%s error=%s",
                        self._client_id, self._broker.describe(), message)
        self.last_error = message

    # --- gmqtt callbacks (on the event loop) ---------------------------------------------

    def _on_connect(self, client: GmqttClient, session_present: int, _rc: int,
                    props: dict[str, Any]) -> None:
        if client is not self._client:
            return
        if self._connect_timeout is not None:
            self._connect_timeout.reschedule(None)  # replaying our publishes may take longer
            self._connect_timeout = None
        self._backoff_s = RECONNECT_MIN_S
        self._window = max(1, props.get("receive_maximum", [65_535])[0] - OUT_ID_RESERVE)
        self._ever_connected = True
        self._generation += 1
        generation = self._generation
        loop = asyncio.get_running_loop()
        futures = []
        client.subscriptions = []  # gmqtt's list would grow by our filters on every connect
        for topic in self._subscriptions:
            fut: asyncio.Future[None] = loop.create_future()
            self._pending_subacks[client.subscribe(Subscription(topic, qos=1))] = fut
            futures.append(fut)
        log.info("broker_connected client_id=%s broker=%s protocol=%s session_present=%s",
                 self._client_id, self._broker.describe(), self.protocol_name,
                 bool(session_present))

        def ready(done: asyncio.Future[list[BaseException | None]]) -> None:
            if done.cancelled() or generation != self._generation:
                return  # the connection went away (or came again) meanwhile
            errors = [r for r in done.result() if isinstance(r, BaseException)]
            if errors:
                self._note_error(str(errors[0]))
                return
            self._set_connected(connected=True, reason="")

        asyncio.gather(*futures, return_exceptions=True).add_done_callback(ready)

    def _on_disconnect(self, client: Any, _packet: object, exc: object = None) -> None:
        if client is not self._client:
            return  # a client replaced by the 3.1.1 fallback: its news is not ours
        timeout = self._connect_timeout
        if timeout is not None:  # closed before its CONNACK: gmqtt would wait for ever
            self._closed_early = True
            timeout.reschedule(asyncio.get_running_loop().time())
        reason = str(exc) if exc else "closed"
        if self.connected:
            level = logging.INFO if self._closing else logging.WARNING
            log.log(level, "broker_disconnected client_id=%s broker=%s reason=%s",
                    self._client_id, self._broker.describe(), reason)
        self._set_connected(connected=False, reason=f"connection lost: {reason}")
        self._inbox.paused = False
        self._lost.set()

    def _on_subscribe(self, _c: Any, mid: int, granted: tuple[int, ...], _p: object) -> None:
        failed = [hex(code) for code in granted if code >= 0x80]
        self._suback(mid, [f"reason code {', '.join(failed)}"] if failed else [])

    def _on_unsubscribe(self, _c: Any, mid: int, _granted: object) -> None:
        self._suback(mid, [])

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
        """Return once at least one message is queued (what was taken before counts as
        applied)."""
        await self._inbox.wait()

    def take_inbound(self, limit: int) -> list[Inbound]:
        """Up to ``limit`` messages, oldest first; those taken before count as applied."""
        return self._inbox.take(limit)

    def oldest_pending(self) -> float | None:
        """Receipt time of the oldest message not yet taken, or None."""
        return self._inbox.oldest()

    def earliest_pending(self) -> dict[str, float]:
        """Each topic with messages not yet taken, and the receipt time of its oldest one."""
        return self._inbox.earliest_by_topic()

    # --- outbound --------------------------------------------------------------------------

    @property
    def protocol_name(self) -> str:
        return "5" if self._version == MQTTv50 else "3.1.1"

    @property
    def mqtt5(self) -> bool:
        return bool(self._version == MQTTv50)

    @property
    def in_flight(self) -> int:
        return int(self._outbox.size)

    def publish(self, topic: str, payload: bytes, *, retain: bool = False, qos: int = 1,
                correlation: bytes | None = None) -> bool:
        """Send one publish; False when not connected or the broker's window is full (nothing
        is queued then). A QoS 1 publish the connection loses on the way is sent again when
        the broker resumes the session."""
        client = self._client
        if (client is None or not self.connected or (qos and self.in_flight >= self._window)
                or not self._may_act()):
            return False
        try:
            if qos == 1:
                client.publish_qos1(topic, payload, retain=retain,
                                    correlation=correlation if self.mqtt5 else None)
            elif correlation is not None and self.mqtt5:
                client.publish(topic, payload, qos=qos, retain=retain,
                               correlation_data=correlation)
            else:
                client.publish(topic, payload, qos=qos, retain=retain)
        except (OverflowError, AttributeError):  # no packet id free; no connection
            return False
        return True

    async def wait_credit(self, limit: int) -> None:
        """Wait until fewer than ``limit`` QoS 1 publishes await their acknowledgement."""
        while True:
            limit = min(limit, self._window)
            if self.in_flight < limit and self.connected:
                return
            fut = asyncio.get_running_loop().create_future()
            self._credit_waiter = fut
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
        await self._request(lambda c: c.subscribe([Subscription(t, qos=1) for t in topics]),
                            timeout_s)

    async def unsubscribe(self, topics: list[str], timeout_s: float = 10.0) -> None:
        await self._request(lambda c: c.unsubscribe(topics), timeout_s)

    async def _request(self, send: Callable[[Any], int], timeout_s: float) -> None:
        client = self._client
        if client is None or not self.connected:
            raise BrokerError("not connected")
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        try:
            mid = send(client)
        except (OverflowError, AttributeError) as exc:
            raise BrokerError(f"request failed: {exc}") from None
        self._pending_subacks[mid] = fut
        async with asyncio.timeout(timeout_s):
            await fut

    async def let_go(self) -> None:
        """Disconnect now and stay away (a deposed manager, contract section 10): the session
        stays with the broker, and what arrives waits there for the next holder of this
        client id."""
        client = self._client
        if client is not None and client.is_connected_safe():
            with contextlib.suppress(Exception):
                async with asyncio.timeout(CLOSE_TIMEOUT_S):
                    await client.disconnect()

    async def flush(self, timeout_s: float) -> bool:
        """Wait until every QoS 1 publish so far is acknowledged; False on timeout."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self.wait_credit(1)
                return True
        return False
