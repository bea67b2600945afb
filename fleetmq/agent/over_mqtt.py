"""The agent's protocol over MQTT: connect with a will, register, heartbeat, answer replies,
reconnect with backoff, and say goodbye on a clean exit (contract section 5).

Runs on the event loop only; the paho side lives in ``fleetmq.agent.mqtt``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import ssl
from typing import Any

from fleetmq.agent.core import (
    NETWORK_TIMEOUT_S,
    SHUTDOWN_TIMEOUT_S,
    STABLE_AFTER_S,
    AgentSpec,
    AgentState,
    Backoff,
    Telemetry,
    Uptime,
    new_session,
    note_reply,
    read_telemetry,
    sleep_unless_stopped,
)
from fleetmq.agent.mqtt import AgentConnection, LoginRefused
from fleetmq.config import BrokerSettings
from fleetmq.core.topics import Topics
from fleetmq.errors import BrokerError

log = logging.getLogger(__name__)


def _json(body: dict[str, Any]) -> bytes:
    return json.dumps(body, separators=(",", ":")).encode()


class MqttTransport:
    """Runs until ``stop`` is set; one ``AgentConnection`` (and one session) per connection."""

    def __init__(self, spec: AgentSpec, broker: BrokerSettings, state: AgentState,
                 telemetry: Telemetry | None, uptime: Uptime,
                 tls: ssl.SSLContext | None = None) -> None:
        self._spec = spec
        self._broker = broker
        self._tls = tls
        self._state = state
        self._telemetry = telemetry
        self._uptime = uptime
        self._topics = Topics(spec.topic_root)
        self._register_again = asyncio.Event()
        # Long enough that a heartbeat every interval keeps the link alive; short enough that
        # a dead broker is noticed within a minute or two.
        self._keepalive_s = max(5, min(60, spec.interval_s + 5))

    async def run(self, stop: asyncio.Event) -> None:
        backoff = Backoff()
        while not stop.is_set():
            try:
                started = self._uptime.now()
                await self._one_connection(stop)
                if self._uptime.now() - started >= STABLE_AFTER_S:
                    backoff.reset()
            except LoginRefused as exc:
                log.error("agent_login_refused node_id=%s broker=%s error=%s",
                          self._spec.node_id, self._broker.describe(), exc)
            except BrokerError as exc:
                log.warning("agent_connection_failed node_id=%s broker=%s error=%s",
                            self._spec.node_id, self._broker.describe(), exc)
            except Exception:
                log.exception("agent_connection_crashed node_id=%s", self._spec.node_id)
            finally:
                self._state.connected = False
                self._state.registered.clear()
            if stop.is_set():
                return
            delay = backoff.next_delay()
            log.info("agent_reconnecting node_id=%s in_s=%.2f", self._spec.node_id, delay)
            await sleep_unless_stopped(stop, delay)

    async def _one_connection(self, stop: asyncio.Event) -> None:
        spec, topics = self._spec, self._topics
        session = new_session()
        will = _json({"status": "offline", "reason": "connection_lost", "session": session})
        conn = AgentConnection(self._broker, spec.node_id,
                               will_topic=topics.heartbeat(spec.node_id), will_payload=will,
                               keepalive_s=self._keepalive_s, on_message=self._on_message,
                               tls=self._tls)
        await conn.open(NETWORK_TIMEOUT_S)
        try:
            if stop.is_set():
                return  # stopped while connecting: a clean disconnect, nothing to announce
            self._state.session = session
            # Subscribe first so the register's reply cannot be missed; the register is the
            # first message we publish (docs/protocol.md section 6).
            await conn.subscribe(topics.reply(spec.node_id), NETWORK_TIMEOUT_S)
            self._state.connected = True
            log.info("agent_connected node_id=%s broker=%s session=%s", spec.node_id,
                     self._broker.describe(), session)
            self._register_again.clear()
            await conn.publish_acked(topics.register(spec.node_id),
                                     _json(spec.register_body(session)), NETWORK_TIMEOUT_S)
            await self._serve(conn, session, stop)
            if stop.is_set() and not conn.lost.is_set():
                await self._say_goodbye(conn, session)
        finally:
            await conn.close(SHUTDOWN_TIMEOUT_S if stop.is_set() else 0)

    async def _serve(self, conn: AgentConnection, session: str, stop: asyncio.Event) -> None:
        """Heartbeat every interval, register again on a 404, until stopped or disconnected."""
        spec, topics = self._spec, self._topics
        next_beat = self._uptime.now() + spec.interval_s
        waits = {"stop": stop, "lost": conn.lost, "register": self._register_again}
        while True:
            done = await _first_of(waits, next_beat - self._uptime.now())
            if "stop" in done:
                return
            if "lost" in done:
                raise BrokerError(f"connection lost: {conn.lost_reason}")
            if "register" in done:
                self._register_again.clear()
                conn.publish(topics.register(spec.node_id), _json(spec.register_body(session)))
                continue
            if not self._state.registered.is_set():
                # No acknowledgement yet (the manager may have been away): a register is
                # idempotent, so send it again with each beat until one is answered.
                conn.publish(topics.register(spec.node_id), _json(spec.register_body(session)))
            body = await read_telemetry(self._telemetry, self._uptime, spec.node_id)
            body["session"] = session
            del body["node_id"]  # the topic names the node
            if not conn.publish(topics.heartbeat(spec.node_id), _json(body)):
                raise BrokerError("heartbeat not sent: connection lost")
            # On schedule, not drifting; a stalled loop skips beats instead of bursting them.
            now = self._uptime.now()
            next_beat += spec.interval_s * max(1, math.ceil((now - next_beat) / spec.interval_s))

    async def _say_goodbye(self, conn: AgentConnection, session: str) -> None:
        spec = self._spec
        try:
            await conn.publish_acked(self._topics.heartbeat(spec.node_id),
                                     _json(spec.offline_body("shutdown", session)),
                                     SHUTDOWN_TIMEOUT_S)
            log.info("agent_offline_sent node_id=%s reason=shutdown", spec.node_id)
        except BrokerError as exc:
            log.warning("agent_offline_not_acknowledged node_id=%s error=%s", spec.node_id, exc)

    def _on_message(self, topic: str, payload: bytes, retain: bool) -> None:
        # amqtt may push retained messages of other sessions' filters: route by our own.
        if topic != self._topics.reply(self._spec.node_id) or retain:
            return
        try:
            reply = json.loads(payload)
        except ValueError:
            log.warning("agent_reply_invalid node_id=%s", self._spec.node_id)
            return
        if isinstance(reply, dict) and note_reply(self._state, reply, self._spec.node_id):
            self._register_again.set()


async def _first_of(events: dict[str, asyncio.Event], timeout_s: float) -> set[str]:
    """Names of the events set, waiting at most ``timeout_s`` for one (empty on timeout)."""
    ready = {name for name, event in events.items() if event.is_set()}
    if ready or timeout_s <= 0:
        return ready
    waiters = {asyncio.ensure_future(event.wait()): name for name, event in events.items()}
    try:
        done, _ = await asyncio.wait(waiters, timeout=timeout_s,
                                     return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)
    return {waiters[w] for w in done}
