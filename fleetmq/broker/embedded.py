"""The embedded MQTT broker (amqtt) behind one small async context manager.

It is the zero-setup default for development and small fleets (a few thousand messages per
second, MQTT 3.1.1 only); production belongs on Mosquitto or EMQX. amqtt's configuration and
its log noise stay in here.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from typing import Any

from fleetmq.config import BrokerTlsSettings
from fleetmq.errors import BrokerError
from fleetmq.ports import address_in_use
from fleetmq.tls import BROKER_TLS_OPTIONS, server_context

log = logging.getLogger(__name__)

_NOISY_LOGGERS = ("amqtt", "transitions")
SHUTDOWN_GRACE_S = 1.0
"""How long amqtt may take to stop on its own before its clients' input is ended for it."""
SHUTDOWN_TIMEOUT_S = 5.0


def _config(host: str, port: int, tls: BrokerTlsSettings | None = None) -> dict[str, Any]:
    listeners: dict[str, Any] = {"default": {"type": "tcp", "bind": f"{host}:{port}"}}
    if tls is not None:
        # amqtt makes the context itself (TLS 1.2+, a client certificate optional and unused).
        listeners["tls"] = {"type": "tcp", "bind": f"{tls.host}:{tls.port}", "ssl": True,
                            "certfile": tls.cert_file, "keyfile": tls.key_file}
    return {
        "listeners": listeners,
        # An explicit plugin list: amqtt's defaults add $SYS, event and packet logging.
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    }


class _SnapshotDict(dict[str, Any]):
    """amqtt 0.12 iterates its table of subscriptions with awaits inside the loop (when a
    client connects, when it broadcasts); another client subscribing meanwhile raises
    "dictionary changed size during iteration" and kills that client's session. Iterating
    over a snapshot makes both loops safe."""

    def __iter__(self) -> Iterator[str]:
        return iter(list(super().__iter__()))

    def items(self) -> list[tuple[str, Any]]:  # type: ignore[override]  # a snapshot, not a view
        return list(super().items())


def _broker_class() -> Any:
    from amqtt.broker import Broker  # noqa: PLC0415 (heavy import, only when embedded)

    class OwnFiltersBroker(Broker):  # type: ignore[misc]  # amqtt is untyped here
        """On every connect amqtt 0.12 sends the new client the retained messages matching
        *every* client's filters. An agent with a 512-byte buffer would get the whole fleet's
        statuses. Here a client gets retained messages for filters it holds itself only."""

        async def _publish_retained_messages_for_subscription(
            self, subscription: tuple[str, int], session: Any
        ) -> None:
            holders = self._subscriptions.get(subscription[0], ())
            if any(held.client_id == session.client_id for held, _qos in holders):
                await super()._publish_retained_messages_for_subscription(subscription, session)

    return OwnFiltersBroker


class EmbeddedBroker:
    def __init__(self, host: str, port: int, tls: BrokerTlsSettings | None = None) -> None:
        self.host = host
        self.port = port
        self.tls = tls
        if tls is not None:  # read now, for a one-line error instead of amqtt's traceback
            server_context(tls.cert_file, tls.key_file, BROKER_TLS_OPTIONS)
        self._broker: Any = None

    async def __aenter__(self) -> EmbeddedBroker:
        for name in _NOISY_LOGGERS:
            logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLogger(name).level))
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
        broker = _broker_class()(_config(self.host, self.port, self.tls))
        broker._subscriptions = _SnapshotDict()  # see _SnapshotDict: an amqtt race
        try:
            await broker.start()
        except Exception as exc:
            raise BrokerError(f"cannot start the embedded MQTT broker on "
                              f"{self.host}:{self.port}: {exc}") from exc
        self._broker = broker
        log.info("embedded_broker_started address=%s:%d tls=%s", self.host, self.port,
                 f"{self.tls.host}:{self.tls.port}" if self.tls is not None else "off")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        broker = self._broker
        if broker is None:
            return
        self._broker = None
        # amqtt stops each client by cancelling its reader task and waiting for it to end. On
        # Python 3.11, asyncio.wait_for swallows that cancellation when a packet arrives at the
        # same moment, and the wait then lasts until the client hangs up: with agents still
        # connected, shutdown would never finish. Past a grace period, ending each client's
        # input (EOF) lets those readers finish. amqtt offers no public list of its clients.
        handlers = [handler for _session, handler in list(broker._sessions.values())]
        task = asyncio.ensure_future(broker.shutdown())
        try:
            try:
                async with asyncio.timeout(SHUTDOWN_GRACE_S):
                    await asyncio.shield(task)
            except TimeoutError:
                log.warning("embedded_broker_slow_shutdown clients=%d", len(handlers))
                for handler in handlers:
                    if handler.reader is not None:
                        handler.reader.feed_eof()
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
