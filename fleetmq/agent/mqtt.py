"""One MQTT connection of an agent, over paho-mqtt; the only agent module that imports paho.

Each connection is a fresh paho client with that connection's will (a will is fixed when
CONNECT is sent), and paho's own reconnect is off: ``over_mqtt`` decides when to connect
again, with a new session. paho's callbacks run on its thread and only hand their news to the
event loop with ``call_soon_threadsafe``; every wait here has a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from fleetmq.config import BrokerSettings
from fleetmq.errors import BrokerError
from fleetmq.mqtt.link import set_nodelay, use_broker

log = logging.getLogger(__name__)

MessageHandler = Callable[[str, bytes, bool], None]
"""``(topic, payload, retain)``, called on the event loop."""
_LOGIN_REFUSED = (4, 5, 0x86, 0x87, 0x8C)
"""CONNACK codes for a refused login: 3.1.1 bad user name or password, not authorized; MQTT 5
bad user name or password, not authorized, bad authentication method."""


class LoginRefused(BrokerError):
    """The broker refused the agent's login: a wrong, missing or revoked token."""


class AgentConnection:
    """A connected paho client: ``await open()``, publish, subscribe, ``await close()``."""

    def __init__(self, broker: BrokerSettings, client_id: str, *, will_topic: str,
                 will_payload: bytes, keepalive_s: int, on_message: MessageHandler,
                 tls: ssl.SSLContext | None = None) -> None:
        self._broker = broker
        self._loop = asyncio.get_running_loop()
        self._on_message_cb = on_message
        self._pending: dict[int, asyncio.Future[None]] = {}
        self._connack: asyncio.Future[ReasonCode] = self._loop.create_future()
        self.lost = asyncio.Event()
        """Set when the connection is gone (or never came up)."""
        self.lost_reason = ""
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id,
                             protocol=MQTTProtocolVersion.MQTTv311, clean_session=True,
                             reconnect_on_failure=False)
        client.will_set(will_topic, will_payload, qos=1, retain=False)
        use_broker(client, broker, tls)
        client.on_socket_open = set_nodelay
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        client.on_publish = self._on_publish
        self._client = client
        self._keepalive_s = keepalive_s

    # --- lifecycle -----------------------------------------------------------------------

    async def open(self, timeout_s: float) -> None:
        """Connect and wait for the CONNACK; BrokerError if refused or unreachable."""
        client = self._client
        client.connect_timeout = timeout_s
        pending = self._loop.run_in_executor(
            None, client.connect, self._broker.host, self._broker.port, self._keepalive_s)
        try:
            async with asyncio.timeout(timeout_s + 1):
                await asyncio.shield(pending)
        except OSError as exc:
            raise BrokerError(f"cannot connect to {self._broker.describe()}: {exc}") from exc
        except BaseException as exc:
            # Cancelled or timed out while paho's connect ran on: drop it once it returns.
            pending.add_done_callback(lambda _f: self._abandon())
            if isinstance(exc, TimeoutError):
                raise BrokerError(f"cannot connect to {self._broker.describe()}: "
                                  f"no answer within {timeout_s} s") from None
            raise
        client.loop_start()
        try:
            async with asyncio.timeout(timeout_s):
                code = await self._connack
        except TimeoutError:
            await self.close(0)
            raise BrokerError(f"no CONNACK from {self._broker.describe()} "
                              f"within {timeout_s} s") from None
        if code.is_failure:
            await self.close(0)
            if code.value in _LOGIN_REFUSED:
                given = ("its token was not accepted: check --token (FLEETMQ_AGENT_TOKEN) and "
                         "that the node's credential is valid" if self._broker.password else
                         "no token was given: pass --token (FLEETMQ_AGENT_TOKEN) or "
                         "--enroll-key with --token-file")
                raise LoginRefused(f"{self._broker.describe()} refused the login ({code}): "
                                   f"{given}")
            raise BrokerError(f"{self._broker.describe()} refused the connection: {code}")

    async def close(self, timeout_s: float) -> None:
        """Disconnect cleanly (the broker then discards the will) and stop paho's thread."""
        client = self._client
        with contextlib.suppress(Exception):
            client.disconnect()
        if timeout_s > 0:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout_s):
                    await self.lost.wait()
        await asyncio.to_thread(client.loop_stop)
        self._lose("closed")

    def _abandon(self) -> None:
        with contextlib.suppress(Exception):
            self._client.disconnect()
            self._client.loop_stop()

    # --- requests --------------------------------------------------------------------------

    def publish(self, topic: str, payload: bytes) -> bool:
        """Send one QoS 1 message without waiting for its PUBACK; False if not sent."""
        info = self._client.publish(topic, payload, qos=1, retain=False)
        return info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS

    async def publish_acked(self, topic: str, payload: bytes, timeout_s: float) -> None:
        """Send one QoS 1 message and wait for its PUBACK; BrokerError otherwise."""
        info = self._client.publish(topic, payload, qos=1, retain=False)
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise BrokerError(f"publish failed: {paho.error_string(info.rc)}")
        fut: asyncio.Future[None] = self._loop.create_future()
        # PUBACK news comes through call_soon_threadsafe, so it runs after this line.
        self._pending[info.mid] = fut
        await self._wait(fut, info.mid, timeout_s, "PUBACK")

    async def subscribe(self, topic: str, timeout_s: float) -> None:
        """Subscribe at QoS 1 and wait for the SUBACK; BrokerError otherwise."""
        result, mid = self._client.subscribe(topic, qos=1)
        if result != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
            raise BrokerError(f"subscribe failed: {paho.error_string(result)}")
        fut: asyncio.Future[None] = self._loop.create_future()
        self._pending[mid] = fut
        await self._wait(fut, mid, timeout_s, "SUBACK")

    async def _wait(self, fut: asyncio.Future[None], mid: int, timeout_s: float,
                    what: str) -> None:
        try:
            async with asyncio.timeout(timeout_s):
                await fut
        except TimeoutError:
            raise BrokerError(f"no {what} within {timeout_s} s") from None
        finally:
            self._pending.pop(mid, None)

    # --- paho callbacks, on paho's thread: hand over only ------------------------------------

    def _call(self, fn: Callable[..., None], *args: Any) -> None:
        if not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed between check and call
                self._loop.call_soon_threadsafe(fn, *args)

    def _on_connect(self, _c: paho.Client, _u: object, _f: Any, rc: ReasonCode,
                    _p: Properties | None) -> None:
        self._call(self._connack_received, rc)

    def _on_disconnect(self, _c: paho.Client, _u: object, _f: Any, rc: ReasonCode,
                       _p: Properties | None) -> None:
        self._call(self._lose, str(rc))

    def _on_message(self, _c: paho.Client, _u: object, msg: paho.MQTTMessage) -> None:
        self._call(self._on_message_cb, msg.topic, bytes(msg.payload), bool(msg.retain))

    def _on_subscribe(self, _c: paho.Client, _u: object, mid: int, codes: list[ReasonCode],
                      _p: Properties | None) -> None:
        failed = [str(code) for code in codes if code.is_failure]
        self._call(self._acked, mid, ", ".join(failed))

    def _on_publish(self, _c: paho.Client, _u: object, mid: int, _rc: ReasonCode,
                    _p: Properties | None) -> None:
        self._call(self._acked, mid, "")

    # --- the same, on the event loop ---------------------------------------------------------

    def _connack_received(self, rc: ReasonCode) -> None:
        if not self._connack.done():
            self._connack.set_result(rc)

    def _acked(self, mid: int, failure: str) -> None:
        fut = self._pending.pop(mid, None)
        if fut is None or fut.done():
            return
        if failure:
            fut.set_exception(BrokerError(f"subscription refused: {failure}"))
        else:
            fut.set_result(None)

    def _lose(self, reason: str) -> None:
        if self.lost.is_set():
            return
        self.lost_reason = reason
        self.lost.set()
        pending, self._pending = self._pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(BrokerError(f"connection lost: {reason}"))
