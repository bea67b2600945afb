"""The embedded MQTT broker (amqtt) behind one small async context manager.

It is the zero-setup default for development and small fleets (a few thousand messages per
second, MQTT 3.1.1 only); production belongs on Mosquitto or EMQX. amqtt's configuration and
its log noise stay in here. With access control on it checks every login and topic against the
manager's own ``AuthService`` and ``TopicRules`` (``access.py``, ``amqtt_broker.py``) and cuts
the connections of a credential within a second of it ending.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from fleetmq.aio import wait_set
from fleetmq.auth.limits import LoginBackoff
from fleetmq.auth.rules import TopicRules
from fleetmq.auth.service import AuthService
from fleetmq.auth.store import Credential
from fleetmq.broker.access import AccessCounters, BrokerAccess
from fleetmq.config import BrokerTlsSettings, BrokerWsSettings
from fleetmq.core.clock import SystemClock
from fleetmq.errors import BrokerError
from fleetmq.ports import address_in_use, bind_error
from fleetmq.tls import BROKER_TLS_OPTIONS, server_context

log = logging.getLogger(__name__)

SWEEP_S = 1.0
"""How often the revoker looks at every session without being told of an ended credential."""

_NOISY_LOGGERS = ("amqtt", "transitions", "websockets.server")
"""Loggers that speak at INFO for every connection or state change."""
SHUTDOWN_GRACE_S = 1.0
"""How long amqtt may take to stop on its own before its clients' input is ended for it."""
SHUTDOWN_TIMEOUT_S = 5.0
MAX_QUEUED = 1000
"""Messages queued per offline persistent session; past it the oldest is dropped (a fleet's
newest status matters more than its oldest), and counted."""
SESSION_EXPIRY_S = 86_400
"""A persistent session left without a connection this long is dropped (amqtt does it)."""


class HandshakeFailures(logging.Filter):
    """websockets logs every failed WebSocket handshake (plain HTTP, a port scanner, a client
    that asks for no ``mqtt`` subprotocol) as an ERROR with a traceback, so anyone reaching
    the listener could fill the log. Such a record becomes one line, kept at debug level only.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg != "opening handshake failed":
            return True
        error = record.exc_info[1] if record.exc_info else None
        record.msg, record.args = "broker_ws_handshake_failed error=%.200r", (error,)
        record.exc_info, record.exc_text = None, None
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return log.isEnabledFor(logging.DEBUG)


def _config(host: str, port: int, *, auth: bool, session_expiry_s: int,
            tls: BrokerTlsSettings | None = None,
            ws: BrokerWsSettings | None = None) -> dict[str, Any]:
    listeners: dict[str, Any] = {"default": {"type": "tcp", "bind": f"{host}:{port}"}}
    if tls is not None:
        # amqtt makes the context itself (TLS 1.2+, a client certificate optional and unused).
        listeners["tls"] = {"type": "tcp", "bind": f"{tls.host}:{tls.port}", "ssl": True,
                            "certfile": tls.cert_file, "keyfile": tls.key_file}
    if ws is not None:
        # Every listener's connections go through FleetBroker._client_connected: one login
        # check and one set of topic rules, whatever the transport.
        listeners["ws"] = {"type": "ws", "bind": f"{ws.host}:{ws.port}"}
    return {
        "listeners": listeners,
        # An explicit plugin list: amqtt's defaults add $SYS, event and packet logging. With
        # auth the broker subclass checks logins and topics itself: no plugin at all.
        "plugins": {} if auth else {
            "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
        "session_expiry_interval": session_expiry_s,
    }


class EmbeddedBroker:
    """``auth`` None: anonymous, for auth off. Otherwise every CONNECT needs a token (or, for
    the manager's own client ids, ``manager_secret``) and every topic follows ``rules``.
    ``tls``: a second listener with TLS; ``ws``: one for MQTT over WebSockets."""

    def __init__(self, host: str, port: int, *, auth: AuthService | None = None,
                 rules: TopicRules | None = None, manager_secret: str | None = None,
                 monotonic: Callable[[], float] = SystemClock.monotonic,
                 session_expiry_s: int = SESSION_EXPIRY_S, max_queued: int = MAX_QUEUED,
                 tls: BrokerTlsSettings | None = None, ws: BrokerWsSettings | None = None,
                 key_rate: float = 1000.0, key_burst: int = 2000) -> None:
        self.host = host
        self.port = port
        self.tls = tls
        self.ws = ws
        if tls is not None:  # read now, for a one-line error instead of amqtt's traceback
            server_context(tls.cert_file, tls.key_file, BROKER_TLS_OPTIONS)
        self._auth = auth
        self._access: BrokerAccess | None = None
        if auth is not None:
            if rules is None or manager_secret is None:
                raise ValueError("an embedded broker with auth needs the topic rules and the "
                                 "manager's secret")
            self._access = BrokerAccess(auth, rules, manager_secret, monotonic,
                                        key_rate=key_rate, key_burst=key_burst)
            auth.add_listener(self._credentials_changed)
        self.counters = self._access.counters if self._access is not None else AccessCounters()
        """Refusals, revocations and queue drops, for ``/metrics``."""
        self._monotonic = monotonic
        self._session_expiry_s = session_expiry_s
        self._max_queued = max_queued
        self._broker: Any = None
        self._ended: set[str] = set()
        self._ended_event = asyncio.Event()
        self._revoker: asyncio.Task[None] | None = None

    @property
    def auth_enabled(self) -> bool:
        return self._access is not None

    def session_ids(self) -> list[str]:
        """Client ids of every session held, connected or not (empty when stopped)."""
        return [] if self._broker is None else list(self._broker.session_ids())

    def cut_off(self, node_id: str, seconds: float, sent_at_least: int) -> None:
        """A flooding node (contract section 8, "Limits"): its connection is closed and its
        logins refused for ``seconds`` — if the flood is its own (``sent_at_least`` publishes
        in the current window). A flood of its topics sent by a write key costs the node
        nothing: the key is held to its own rate here. Only with auth: without it, nothing
        ties a connection to a node."""
        if self._access is None or self._broker is None:
            return
        if self._access.sent_recently(node_id) < sent_at_least:
            log.warning("broker_flood_not_the_nodes node_id=%s: its own connection did not "
                        "send it; not cut off", node_id)
            return
        self._access.cut_off(node_id, seconds)
        if self._broker.disconnect(node_id):
            self.counters.connections_cut += 1
            log.warning("broker_node_cut_off node_id=%s seconds=%g", node_id, seconds)

    def _credentials_changed(self, credentials: list[Credential]) -> None:
        """AuthService listener: remember the credentials that no longer work; the revoker
        task closes their connections (a listener cannot await)."""
        auth = self._auth
        if auth is None or self._broker is None:
            return
        ended = {c.id for c in credentials if not auth.valid(c.id)}
        if ended:
            self._ended |= ended
            self._ended_event.set()

    async def _revoke_loop(self) -> None:
        """Close the sessions of credentials that ended as soon as the listener hears of
        them; and once every ``SWEEP_S`` without news, look at every session, for one amqtt
        registered after the listener looked (an idle one would otherwise keep its socket)."""
        while True:
            told = await wait_set(self._ended_event, SWEEP_S)
            self._ended_event.clear()
            ended, self._ended = self._ended, set()
            broker = self._broker
            if broker is None:
                continue
            try:
                gone = (await broker.cut_credentials(ended) if told
                        else await broker.sweep_ended())
            except Exception:
                log.exception("embedded_broker_revocation_failed")
                continue
            if gone:
                log.info("broker_sessions_revoked credentials=%d sessions=%d", len(ended), gone)

    async def __aenter__(self) -> EmbeddedBroker:
        for name in _NOISY_LOGGERS:
            logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLogger(name).level))
        ws_log = logging.getLogger("websockets.server")
        if not any(isinstance(f, HandshakeFailures) for f in ws_log.filters):
            ws_log.addFilter(HandshakeFailures())
        if address_in_use(self.host, self.port):
            raise BrokerError(
                f"cannot start the embedded MQTT broker: {self.host}:{self.port} is already in "
                f"use; another MQTT broker may be running there: pass "
                f"--broker mqtt://{self.host}:{self.port} to use it, or "
                f"--broker embedded://{self.host}:<free port> to run the embedded one elsewhere"
            )
        if self.tls is not None and address_in_use(self.tls.host, self.tls.port):
            raise BrokerError(f"cannot start the embedded MQTT broker's TLS listener: "
                              f"{self.tls.host}:{self.tls.port} is already in use: pass "
                              "--broker-tls HOST:PORT with a free port")
        if self.ws is not None and address_in_use(self.ws.host, self.ws.port):
            raise BrokerError(f"cannot start the embedded MQTT broker's WebSocket listener: "
                              f"{self.ws.host}:{self.ws.port} is already in use (another "
                              "broker's websockets listener?): pass --broker-ws HOST:PORT with "
                              "a free port, or --broker-ws off to run without it")
        self._check_bindable()
        from fleetmq.broker.amqtt_broker import FleetBroker  # noqa: PLC0415 (heavy import)

        broker = FleetBroker(
            _config(self.host, self.port, auth=self._access is not None,
                    session_expiry_s=self._session_expiry_s, tls=self.tls, ws=self.ws),
            access=self._access, counters=self.counters, backoff=LoginBackoff(),
            monotonic=self._monotonic, max_queued=self._max_queued)
        try:
            await broker.start()
        except Exception as exc:
            raise BrokerError(f"cannot start the embedded MQTT broker on "
                              f"{self.host}:{self.port}: {exc}") from exc
        self._broker = broker
        if self._access is not None:
            self._revoker = asyncio.create_task(self._revoke_loop(), name="fleetmq-broker-revoke")
        log.info("embedded_broker_started address=%s:%d tls=%s ws=%s auth=%s", self.host,
                 self.port, f"{self.tls.host}:{self.tls.port}" if self.tls is not None else "off",
                 f"{self.ws.host}:{self.ws.port}" if self.ws is not None else "off",
                 self._access is not None)
        return self

    def _check_bindable(self) -> None:
        """Any other reason a listener cannot bind (an address of another machine, a name
        that does not resolve) as one sentence naming its option, not amqtt's traceback."""
        listeners = [("--broker", self.host, self.port)]
        if self.tls is not None:
            listeners.append(("--broker-tls", self.tls.host, self.tls.port))
        if self.ws is not None:
            listeners.append(("--broker-ws", self.ws.host, self.ws.port))
        for option, host, port in listeners:
            error = bind_error(host, port)
            if error is not None:
                raise BrokerError(f"cannot start the embedded MQTT broker: {option} "
                                  f"{host}:{port} cannot be listened on "
                                  f"({error.strerror or error}): give an address of this "
                                  "machine (127.0.0.1 for this machine only)")

    async def __aexit__(self, *exc_info: object) -> None:
        broker = self._broker
        if broker is None:
            return
        self._broker = None
        if self._revoker is not None:
            self._revoker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._revoker
            self._revoker = None
        # amqtt stops each client by cancelling its reader task and waiting for it to end. On
        # Python 3.11, asyncio.wait_for swallows that cancellation when a packet arrives at the
        # same moment, and the wait then lasts until the client hangs up: with agents still
        # connected, shutdown would never finish. Past a grace period, ending each client's
        # input (EOF) lets those readers finish. amqtt offers no public list of its clients.
        from fleetmq.broker.amqtt_broker import end_input  # noqa: PLC0415 (heavy import)

        handlers = [handler for _session, handler in list(broker._sessions.values())]
        task = asyncio.ensure_future(broker.shutdown())
        try:
            try:
                async with asyncio.timeout(SHUTDOWN_GRACE_S):
                    await asyncio.shield(task)
            except TimeoutError:
                log.warning("embedded_broker_slow_shutdown clients=%d", len(handlers))
                for handler in handlers:
                    end_input(handler)
                async with asyncio.timeout(SHUTDOWN_TIMEOUT_S):
                    await task
        except TimeoutError:
            task.cancel()
            log.error("embedded_broker_shutdown_timeout timeout_s=%g", SHUTDOWN_TIMEOUT_S)
            return
        except asyncio.CancelledError:
            task.cancel()
            raise
        log.info("embedded_broker_stopped")
