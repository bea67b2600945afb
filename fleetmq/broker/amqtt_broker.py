"""amqtt's ``Broker``, subclassed where its own order of events is unsafe or unbounded.

With access control on (a ``BrokerAccess``), a CONNECT is authenticated before amqtt touches
any session: amqtt itself deletes (clean session) or takes over (persistent) the session of the
client id a CONNECT names, and only then checks the password, so a wrong password could cut a
live client off (``notes/amqtt.md``). Here a refused CONNECT gets its CONNACK and its socket
closed and nothing else happens. A persistent session is resumed only by the identity that
created it; topic checks come from ``BrokerAccess``; a credential that ends cuts its
connections and drops their sessions. In every mode: offline queues are bounded, and a client
gets retained messages only for filters it holds itself. Every listener (TCP, TLS and
WebSocket) hands its connections to ``_client_connected``: one login path for all (and, with
auth off, a browser page from another site is kept off the WebSocket listener). Only this
module imports amqtt's broker internals; ``embedded.py`` imports it lazily.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
from collections.abc import Callable, Iterator
from typing import Any

from amqtt.adapters import WebSocketsReader
from amqtt.broker import Broker
from amqtt.contexts import Action, ListenerType
from amqtt.errors import BrokerError as AmqttBrokerError
from amqtt.mqtt.connack import ConnackPacket
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.session import Session

from fleetmq.auth.limits import LoginBackoff
from fleetmq.broker.access import (
    AccessCounters,
    Admitted,
    BrokerAccess,
    Login,
    Refused,
    origin_allowed_without_auth,
)
from fleetmq.metrics import RateLimitedLog

log = logging.getLogger(__name__)
_limited = RateLimitedLog(log)

CONNECT_TIMEOUT_S = 10.0
"""A client must send its CONNECT within this after opening the socket (amqtt waits forever)."""
BACKOFF_DELAY_S = 1.0
"""How long a failed CONNECT of a (address, username) pair in back-off waits for its CONNACK."""
TAKEOVER_TIMEOUT_S = 2.0
"""How long the old connection of a client id may take to end when a new login takes it over."""
CLOSE_TIMEOUT_S = 1.0
LISTEN_BACKLOG = 4096
"""Connections the kernel queues before amqtt accepts them. asyncio's default (100) drops the
SYNs of a reconnect storm, and each dropped one waits 1, 3, 7 s to retry."""
SESSIONS_CEILING = 5000
"""Sessions past which the embedded broker is beyond what was measured to carry it well
(docs/embedded-broker.md): a warning says to move to Mosquitto or EMQX."""
_ADMITTED = "fleetmq.admitted"
"""The ``Admitted`` of a session's latest login, in amqtt's ``Session.attributes``."""
_ENDED = "fleetmq.ended"
"""An ``asyncio.Event`` set once amqtt has ended the session's connection (take-over waits)."""


class SnapshotDict(dict[str, Any]):
    """amqtt 0.12 iterates its table of subscriptions with awaits inside the loop (when a
    client connects, when it broadcasts); another client subscribing meanwhile raises
    "dictionary changed size during iteration" and kills that client's session. Iterating
    over a snapshot makes both loops safe."""

    def __iter__(self) -> Iterator[str]:
        return iter(list(super().__iter__()))

    def items(self) -> list[tuple[str, Any]]:  # type: ignore[override]  # a snapshot, not a view
        return list(super().items())


def admitted_of(session: Session) -> Admitted | None:
    found = session.attributes.get(_ADMITTED)
    return found if isinstance(found, Admitted) else None


MAX_IDENTITY_CHARS = 128
"""A longer presented username (a 10 kB one) is remembered by its SHA-256 digest."""


def identity_key(username: str | None) -> str:
    """What a presented username is remembered as by the login back-off: itself, "none", or a
    digest when long."""
    if not username:
        return "none"
    if len(username) <= MAX_IDENTITY_CHARS:
        return username
    return "sha256:" + hashlib.sha256(username.encode("utf-8", "surrogatepass")).hexdigest()


class FleetBroker(Broker):  # type: ignore[misc]  # amqtt is untyped here
    def __init__(self, config: dict[str, Any], *, access: BrokerAccess | None,
                 counters: AccessCounters, backoff: LoginBackoff,
                 monotonic: Callable[[], float], max_queued: int) -> None:
        super().__init__(config)
        self._subscriptions = SnapshotDict()  # see SnapshotDict: an amqtt race
        self._access = access
        self._backoff = backoff
        self._monotonic = monotonic
        self._max_queued = max_queued
        self.counters = counters
        self._past_ceiling = False

    async def _create_server_instance(self, listener_name: str, listener_type: Any,
                                      address: str | None, port: int,
                                      ssl_context: Any) -> Any:
        if listener_type != ListenerType.TCP:
            return await super()._create_server_instance(listener_name, listener_type, address,
                                                         port, ssl_context)
        return await asyncio.start_server(
            functools.partial(self.stream_connected, listener_name=listener_name),
            address, port, reuse_address=True, ssl=ssl_context, backlog=LISTEN_BACKLOG)

    # --- CONNECT: authenticate first, then the session ------------------------------------

    async def _client_connected(self, listener_name: str, reader: Any, writer: Any) -> None:
        access = self._access
        if access is None:
            await self._open_client_connected(listener_name, reader, writer)
            return
        server = self._servers.get(listener_name)
        if server is None:
            raise AmqttBrokerError(f"Invalid listener name '{listener_name}'")
        await server.acquire_connection()
        try:
            peer = writer.get_peer_info()
            if peer is None:
                await _close(writer)
                return
            try:
                async with asyncio.timeout(CONNECT_TIMEOUT_S):
                    handler, session = await BrokerProtocolHandler.init_from_connect(
                        reader, writer, self.plugins_manager)
            except Exception as exc:  # any malformed first packet, or none in time
                log.debug("broker_connect_unreadable address=%s error=%.200r", peer[0], exc)
                await _close(writer)
                return
            try:
                admitted = await self._admit(access, session, writer, peer[0])
                if admitted is None:
                    return
                session = await self._resolve_session(session, admitted)
            except Exception:
                log.exception("broker_login_failed address=%s", peer[0])
                await _close(writer)
                return
            # A revocation that arrived during the login is caught here. amqtt itself may still
            # pause (up to a second, retrying a state change) before it registers the session,
            # where the revoker does not see it: every publish, subscription and delivery checks
            # the credential again, so such a session can do nothing until the revoker's
            # once-a-second sweep (``sweep_ended``) discards it.
            if not access.still_valid(admitted):
                access.counters.logins_refused["revoked"] += 1
                await self._refuse(writer, Refused("revoked", 4))
                return
            try:
                await self._handle_client_session(reader, writer, session, handler, server,
                                                  listener_name)
            except Exception as exc:
                log.debug("broker_client_ended client_id=%.64r error=%.200r",
                          session.client_id, exc)
        finally:
            server.release_connection()

    async def _open_client_connected(self, listener_name: str, reader: Any,
                                     writer: Any) -> None:
        """Auth off: amqtt's own path, once a WebSocket's origin is known to be this
        machine's (``origin_allowed_without_auth``)."""
        origin = _websocket_origin(writer)
        if not origin_allowed_without_auth(origin):
            _limited.warning("broker_ws_origin", self._monotonic(),
                             "broker_websocket_origin_refused origin=%.200r: auth is off, so "
                             "only pages served from this machine may connect", origin)
            await _close(writer)
            return
        await super()._client_connected(listener_name, reader, writer)

    async def _admit(self, access: BrokerAccess, session: Session, writer: Any,
                     address: str) -> Admitted | None:
        login = Login(address, session.client_id or "", session.username, session.password,
                      session.will_topic if session.will_flag else None)
        decided = access.check(login)
        if isinstance(decided, Admitted):
            session.attributes[_ADMITTED] = decided
            session.password = None  # the token is not needed past here: keep it nowhere
            return decided
        now = self._monotonic()
        identity = identity_key(session.username)
        self._backoff.failed(address, identity, now)  # the 11th failure in a minute and on
        in_backoff = self._backoff.retry_after(address, identity, now) > 0
        if in_backoff:
            self.counters.logins_delayed += 1
            await asyncio.sleep(BACKOFF_DELAY_S)
        await self._refuse(writer, decided)
        return None

    async def _refuse(self, writer: Any, refused: Refused) -> None:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(CLOSE_TIMEOUT_S):
                await ConnackPacket.build(0, refused.code).to_stream(writer)
        await _close(writer)

    async def _resolve_session(self, session: Session, admitted: Admitted) -> Session:
        """Take over a live connection of the same client id, then start clean or resume the
        stored session, which only its owner may resume."""
        client_id = session.client_id
        existing = self._sessions.get(client_id)
        if existing is not None and existing[0].transitions.is_connected():
            await self._take_over(*existing)
            existing = self._sessions.get(client_id)
        if session.clean_session:
            await self._delete_session(client_id)
            session.parent = 0
            return session
        if existing is not None:
            stored: Session = existing[0]
            owner = admitted_of(stored)
            if owner is not None and owner.owner == admitted.owner:
                for name in ("will_flag", "will_message", "will_topic", "will_qos",
                             "will_retain", "keep_alive", "username", "password"):
                    setattr(stored, name, getattr(session, name))
                stored.attributes[_ADMITTED] = admitted
                stored.parent = 1
                return stored
            await self.discard(client_id)
        session.parent = 0
        return session

    async def _take_over(self, old: Session, handler: Any) -> None:
        """[MQTT-3.1.4-2]: the older connection of a client id is closed; amqtt's own path
        ends it, its will included, before the new one goes on."""
        ended = asyncio.Event()
        old.attributes[_ENDED] = ended
        await handler.handle_connection_closed()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(TAKEOVER_TIMEOUT_S):
                await ended.wait()
                return
        log.warning("broker_takeover_slow client_id=%.64r", old.client_id)
        _abort(handler)

    async def _handle_disconnect(self, session: Session, handler: Any,
                                 disconnect_waiter: asyncio.Future[Any]) -> None:
        access = self._access
        admitted = admitted_of(session)
        if access is not None and session.will_flag and (
                admitted is None or not access.still_valid(admitted)):
            # A will is a publish at the moment the connection drops: a credential that ended
            # speaks no more, even where the revoker has not closed the session yet (an expiry
            # is noticed at the next poll; a session amqtt registered after the revoker looked).
            session.will_flag = False
            log.info("broker_will_of_ended_credential client_id=%.64r (not published)",
                     session.client_id)
        try:
            await super()._handle_disconnect(session, handler, disconnect_waiter)
        finally:
            ended = session.attributes.pop(_ENDED, None)
            if isinstance(ended, asyncio.Event):
                ended.set()

    async def _authenticate(self, session: Session, listener: Any) -> bool:
        self._warn_past_ceiling()
        if self._access is None:
            return bool(await super()._authenticate(session, listener))
        return True  # authenticated in _client_connected, before any session was touched

    def _warn_past_ceiling(self) -> None:
        sessions = len(self._sessions)
        if sessions >= SESSIONS_CEILING and not self._past_ceiling:
            log.warning("embedded_broker_past_ceiling sessions=%d ceiling=%d: the embedded "
                        "broker was measured up to about this many clients (see "
                        "docs/embedded-broker.md); run Mosquitto or EMQX and pass --broker",
                        sessions, SESSIONS_CEILING)
        # Warned again only after the fleet has come back well below the ceiling.
        self._past_ceiling = sessions >= SESSIONS_CEILING * 0.9 and (
            self._past_ceiling or sessions >= SESSIONS_CEILING)

    # --- topics ---------------------------------------------------------------------------

    async def _topic_filtering(self, session: Session, topic: str, action: Action) -> bool:
        access = self._access
        if access is None:
            return bool(await super()._topic_filtering(session, topic, action))
        admitted = admitted_of(session)
        if admitted is None or not access.still_valid(admitted):
            return False
        if action == Action.SUBSCRIBE:
            return access.may_subscribe(admitted, topic)
        if action == Action.PUBLISH:  # already counted in _handle_message_delivery
            return access.rules.publish_allowed(admitted.principal, topic)
        return True  # RECEIVE: the subscription was judged when it was made

    async def _handle_message_delivery(self, session: Session, handler: Any,
                                       wait_deliver: asyncio.Future[Any]) -> bool:
        access = self._access
        message = wait_deliver.result()
        if access is not None and message is not None:
            admitted = admitted_of(session)
            # Dropped (3.1.1 cannot say so) and counted; the connection stays, where amqtt
            # would stop serving a client that publishes to a `$` topic.
            if admitted is None or not access.still_valid(admitted) or (
                    not access.may_publish(admitted, message.topic or "")):
                return True
        return bool(await super()._handle_message_delivery(session, handler, wait_deliver))

    async def _publish_retained_messages_for_subscription(
            self, subscription: tuple[str, int], session: Session) -> None:
        """On every connect amqtt 0.12 sends the new client the retained messages matching
        *every* client's filters. An agent with a 512-byte buffer would get the whole fleet's
        statuses. Here a client gets retained messages for filters it holds itself only."""
        holders = self._subscriptions.get(subscription[0], ())
        if any(held.client_id == session.client_id for held, _qos in holders):
            await super()._publish_retained_messages_for_subscription(subscription, session)

    # --- bounds and revocation ------------------------------------------------------------

    async def _retain_broadcast_message(self, broadcast: dict[str, Any], qos: int,
                                        target_session: Session) -> None:
        queue = target_session.retained_messages
        while queue.qsize() >= self._max_queued:
            queue.get_nowait()
            self.counters.queue_dropped += 1
        await super()._retain_broadcast_message(broadcast, qos, target_session)

    async def cut_credentials(self, ended: set[str]) -> int:
        """Close every connection logged in with one of ``ended`` and drop its session, and
        every stored session last resumed with one; how many sessions went."""
        return await self._discard_where(lambda admitted: admitted.credential_id in ended)

    async def sweep_ended(self) -> int:
        """Discard every session whose credential no longer works, told or not (one amqtt
        registered after the revoker looked); how many went."""
        access = self._access
        if access is None:
            return 0
        return await self._discard_where(lambda admitted: not access.still_valid(admitted),
                                         untold=True)

    async def _discard_where(self, ended: Callable[[Admitted], bool], *,
                             untold: bool = False) -> int:
        gone = 0
        for client_id, (session, _handler) in list(self._sessions.items()):
            admitted = admitted_of(session)
            if admitted is not None and ended(admitted):
                if untold:
                    log.warning("broker_session_of_ended_credential client_id=%.64r "
                                "(discarded)", client_id)
                await self.discard(client_id)
                gone += 1
        return gone

    async def discard(self, client_id: str) -> None:
        """Drop a session with its subscriptions and queued messages; close its connection
        without its will (a credential that ended speaks no more)."""
        entry = self._sessions.pop(client_id, None)
        if entry is None:
            return
        session, handler = entry
        session.will_flag = False
        await self._del_all_subscriptions(session)
        session.clear_queues()
        session.inflight_out.clear()
        if not session.clean_session:
            self.counters.sessions_discarded += 1
        if session.transitions.is_connected():
            self.counters.connections_revoked += 1
            _abort(handler)

    def disconnect(self, client_id: str) -> bool:
        """Close the client's connection, keeping its session (its will goes out, as for any
        lost connection); whether it was connected."""
        entry = self._sessions.get(client_id)
        if entry is None or not entry[0].transitions.is_connected():
            return False
        _abort(entry[1])
        return True

    def session_ids(self) -> list[str]:
        """The client ids of every session the broker holds, connected or not."""
        return list(self._sessions)


def _transport(writer: Any) -> Any:
    """The connection's transport under amqtt's writer adapter: a TCP stream's
    (``StreamWriterAdapter._writer``) or a WebSocket's (``WebSocketsWriter._protocol``)."""
    stream = getattr(writer, "_writer", None) or getattr(writer, "_protocol", None)
    return getattr(stream, "transport", None)


def _websocket_origin(writer: Any) -> str | None:
    """The ``Origin`` header of a WebSocket connection's handshake (None: none, or TCP)."""
    request = getattr(getattr(writer, "_protocol", None), "request", None)
    headers = getattr(request, "headers", None)
    origin = headers.get("Origin") if headers is not None else None
    return origin if isinstance(origin, str) else None


def _abort(handler: Any) -> None:
    """Close the client's socket at once: its reader sees EOF and amqtt ends the connection.
    Over WebSockets too: amqtt's WebSocket reader ignores ``feed_eof``, so a revoked or cut
    off browser client would otherwise keep its socket."""
    transport = _transport(getattr(handler, "writer", None))
    if transport is not None:
        transport.abort()
    elif getattr(handler, "reader", None) is not None:
        handler.reader.feed_eof()


def end_input(handler: Any) -> None:
    """End a client's input so that its reader task finishes (shutdown): EOF for a TCP
    stream; a WebSocket reader ignores EOF, so its socket is closed instead."""
    reader = getattr(handler, "reader", None)
    if isinstance(reader, WebSocketsReader):
        _abort(handler)
    elif reader is not None:
        reader.feed_eof()


async def _close(writer: Any) -> None:
    try:
        async with asyncio.timeout(CLOSE_TIMEOUT_S):
            await writer.close()
    except Exception:  # a client that reads nothing: drop the socket instead
        transport = _transport(writer)
        if transport is not None:
            transport.abort()
