"""``Agent``: the edge-agent library's one public class, an async context manager.

It validates its arguments, picks the transport (MQTT by default, REST with ``api=``), runs it
in one task, and on exit stops it cleanly (the offline ``shutdown`` message) and awaits it.
It never configures logging and keeps no global state.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping, Sequence
from typing import Any, Protocol
from urllib.parse import urlsplit

from fleetmq.agent.core import (
    NETWORK_TIMEOUT_S,
    SHUTDOWN_TIMEOUT_S,
    AgentSpec,
    AgentState,
    Telemetry,
    Uptime,
    capabilities_tuple,
    parse_interval,
)
from fleetmq.config import parse_broker
from fleetmq.errors import ConfigError

log = logging.getLogger(__name__)

DEFAULT_BROKER = "mqtt://127.0.0.1:1883"
_STOP_GRACE_S = NETWORK_TIMEOUT_S + SHUTDOWN_TIMEOUT_S + 2
"""Longest clean stop: a connect in progress, then the goodbye; past it the task is cancelled."""


class _Transport(Protocol):
    async def run(self, stop: asyncio.Event) -> None: ...


class Agent:
    """An edge agent: registers, heartbeats every ``interval_s``, and says goodbye.

    ``async with Agent("picclaw-01", "picclaw", broker="mqtt://127.0.0.1:1883") as agent:``
    starts it (it connects in the background, reconnecting with backoff); ``await
    agent.registered.wait()`` waits for the manager's acknowledgement. ``api="http://..."``
    uses the REST API instead of MQTT. ``telemetry`` is a sync or async callable returning a
    dict with ``uptime_seconds``, ``free_memory_kb``, ``sensors_active`` (any of them), or None.
    """

    def __init__(
        self,
        node_id: str,
        node_type: str,
        *,
        broker: str | None = None,
        api: str | None = None,
        interval_s: float = 60,
        telemetry: Telemetry | None = None,
        capabilities: Sequence[str] | None = None,
        location: str | None = None,
        metadata: Mapping[str, str | int | float | bool | None] | None = None,
        name: str | None = None,
        topic_root: str = "fleet",
    ) -> None:
        self.spec = AgentSpec(
            node_id=node_id, node_type=node_type, interval_s=parse_interval(interval_s),
            topic_root=topic_root, name=name, capabilities=capabilities_tuple(capabilities),
            location=location, metadata=dict(metadata or {}),
        )
        if telemetry is not None and not callable(telemetry):
            raise ConfigError("telemetry must be a callable returning a dict (or None)")
        if broker is not None and api is not None:
            raise ConfigError("give broker (MQTT) or api (REST), not both")
        self._telemetry = telemetry
        self._state = AgentState()
        self._api = _check_api(api) if api is not None else None
        self._broker = None
        if self._api is None:
            self._broker = parse_broker(broker or DEFAULT_BROKER)
            if self._broker.embedded:
                raise ConfigError(
                    f"--broker {broker!r}: an agent connects to a running broker: "
                    "use mqtt://host:port or mqtts://host:port")
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    # --- what the application reads ----------------------------------------------------------

    @property
    def node_id(self) -> str:
        return self.spec.node_id

    @property
    def registered(self) -> asyncio.Event:
        """Set while the manager has acknowledged this agent's registration."""
        return self._state.registered

    @property
    def connected(self) -> bool:
        return self._state.connected

    @property
    def last_reply(self) -> dict[str, Any] | None:
        return self._state.last_reply

    @property
    def session(self) -> str | None:
        return self._state.session

    @property
    def transport(self) -> str:
        return "rest" if self._api is not None else "mqtt"

    # --- lifecycle -------------------------------------------------------------------------

    async def __aenter__(self) -> Agent:
        if self._task is not None:
            raise RuntimeError("an Agent can be entered once")
        uptime = Uptime()
        transport: _Transport
        if self._api is not None:
            from fleetmq.agent.over_rest import RestTransport  # noqa: PLC0415 (aiohttp only here)

            transport = RestTransport(self.spec, self._api, self._state, self._telemetry, uptime)
        else:
            from fleetmq.agent.over_mqtt import MqttTransport  # noqa: PLC0415 (paho only here)

            assert self._broker is not None  # set whenever api is None
            transport = MqttTransport(self.spec, self._broker, self._state, self._telemetry,
                                      uptime)
        log.info("agent_starting node_id=%s transport=%s", self.node_id, self.transport)
        self._task = asyncio.create_task(transport.run(self._stop),
                                         name=f"fleetmq-agent-{self.node_id}")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def stop(self) -> None:
        """Say goodbye (offline, reason ``shutdown``) and disconnect; safe to call twice."""
        task = self._task
        if task is None:
            return
        self._stop.set()
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout=_STOP_GRACE_S)
        except TimeoutError:
            log.warning("agent_stop_timeout node_id=%s timeout_s=%s", self.node_id,
                        _STOP_GRACE_S)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        log.info("agent_stopped node_id=%s", self.node_id)

    async def wait_registered(self, timeout_s: float) -> bool:
        """True once registered, False if ``timeout_s`` passed first."""
        try:
            async with asyncio.timeout(timeout_s):
                await self._state.registered.wait()
        except TimeoutError:
            return False
        return True


def _check_api(api: str) -> str:
    parts = urlsplit(api)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"--api {api!r} is not an HTTP URL: use http://host:port "
                          "(for example http://127.0.0.1:8080)")
    return api
