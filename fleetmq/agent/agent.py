"""``Agent``: the edge-agent library's one public class, an async context manager.

It validates its arguments, picks the transport (MQTT by default, REST with ``api=``), runs it
in one task, and on exit stops it cleanly (the offline ``shutdown`` message) and awaits it.
It never configures logging and keeps no global state.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import replace
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
from fleetmq.agent.credentials import Credentials, read_token_file
from fleetmq.config import parse_broker
from fleetmq.errors import ConfigError, FleetmqError
from fleetmq.tls import API_OPTIONS, broker_context, client_context

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

    Credentials (contract section 8): ``token`` (a node token: the MQTT password, with the node
    id as username and client id; the REST bearer token), or ``token_file`` (a file that holds
    it), or ``enroll_key`` with ``token_file`` (enroll at ``enroll_api``, default ``api``, once;
    the token is kept in the file, mode 0600). TLS: ``ca_file`` (the CA of an ``mqtts://``
    broker), ``cert_file``/``key_file`` (a client certificate), ``api_ca_file`` (the CA of an
    ``https://`` API). A refused enrollment ends the agent: see ``error`` and ``ended``.
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
        token: str | None = None,
        token_file: str | None = None,
        enroll_key: str | None = None,
        enroll_api: str | None = None,
        ca_file: str | None = None,
        cert_file: str | None = None,
        key_file: str | None = None,
        api_ca_file: str | None = None,
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
        self._broker_tls: ssl.SSLContext | None = None
        if self._api is None:
            self._broker = parse_broker(broker or DEFAULT_BROKER, ca_file=ca_file,
                                        cert_file=cert_file, key_file=key_file)
            if self._broker.embedded:
                raise ConfigError(
                    f"--broker {broker!r}: an agent connects to a running broker: "
                    "use mqtt://host:port or mqtts://host:port")
            self._broker_tls = broker_context(self._broker)
        elif ca_file or cert_file or key_file:
            raise ConfigError("--broker-ca, --broker-cert and --broker-key are for MQTT agents: "
                              "a REST agent trusts --api-ca")
        self._credentials = Credentials(token=token, token_file=token_file,
                                        enroll_key=enroll_key,
                                        enroll_api=enroll_api or self._api)
        self._credentials.check()
        if enroll_key is not None and token_file is None:
            raise ConfigError("--enroll-key needs --token-file: the file the node keeps its token "
                              "in (an enroll key works once per node id)")
        if enroll_api is not None:
            _check_api(enroll_api, "--enroll-api")
        if (token or token_file or enroll_key) and self._broker is not None \
                and self._broker.username is not None:
            raise ConfigError("the broker URL carries a user name, and a node token was given: "
                              "with a token the agent logs in as its node id; drop the user "
                              "from --broker")
        if token_file is not None and enroll_key is None \
                and read_token_file(token_file) is None:
            raise ConfigError(f"--token-file {token_file} holds no token: give --enroll-key "
                              "to enroll and keep the token there")
        self._api_tls = _api_context(api_ca_file, enroll_api or self._api)
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._error: FleetmqError | None = None
        self._ended = asyncio.Event()

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

    @property
    def error(self) -> FleetmqError | None:
        """Why the agent gave up (an enrollment refused for good), or None."""
        return self._error

    @property
    def ended(self) -> asyncio.Event:
        """Set when the agent stopped on its own (see ``error``) or was stopped."""
        return self._ended

    # --- lifecycle -------------------------------------------------------------------------

    async def __aenter__(self) -> Agent:
        if self._task is not None:
            raise RuntimeError("an Agent can be entered once")
        log.info("agent_starting node_id=%s transport=%s", self.node_id, self.transport)
        self._task = asyncio.create_task(self._run(), name=f"fleetmq-agent-{self.node_id}")
        return self

    async def _run(self) -> None:
        try:
            token = await self._token()
            if self._stop.is_set():
                return  # stopped while enrolling
            await self._transport(token).run(self._stop)
        except FleetmqError as exc:
            self._error = exc
            log.error("agent_gave_up node_id=%s error=%s", self.node_id, exc)
        finally:
            self._ended.set()

    async def _token(self) -> str | None:
        """The node token: given, kept in the token file, or enrolled for; None without
        credentials or if stopped while enrolling."""
        credentials = self._credentials
        if credentials.enroll_key is None:
            if credentials.token_file is not None:
                return read_token_file(credentials.token_file) or credentials.token
            return credentials.token
        from fleetmq.agent.enroll import obtain_token  # noqa: PLC0415 (aiohttp only when used)

        return await obtain_token(credentials, self.spec.register_body(None), self._api_tls,
                                  self._stop)

    def _transport(self, token: str | None) -> _Transport:
        uptime = Uptime()
        if self._api is not None:
            from fleetmq.agent.over_rest import RestTransport  # noqa: PLC0415 (aiohttp only here)

            return RestTransport(self.spec, self._api, self._state, self._telemetry, uptime,
                                 token=token, tls=self._api_tls)
        from fleetmq.agent.over_mqtt import MqttTransport  # noqa: PLC0415 (paho only here)

        assert self._broker is not None  # set whenever api is None
        broker = self._broker
        if token is not None:
            # Contract section 5: username = client id = node id, the token as password.
            broker = replace(broker, username=self.node_id, password=token)
        return MqttTransport(self.spec, broker, self._state, self._telemetry, uptime,
                             tls=self._broker_tls)

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


def _check_api(api: str, option: str = "--api") -> str:
    parts = urlsplit(api)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{option} {api!r} is not an HTTP URL: use http://host:port "
                          "(for example http://127.0.0.1:8080) or https://host:port")
    return api


def _api_context(api_ca_file: str | None, api: str | None) -> ssl.SSLContext | None:
    """The HTTPS client context of the REST API (the transport's or enrollment's)."""
    https = api is not None and urlsplit(api).scheme == "https"
    if api_ca_file is not None and not https:
        raise ConfigError("--api-ca is for an https:// API: give --api https://host:port "
                          "(or --enroll-api), or drop --api-ca")
    return client_context(api_ca_file, None, None, API_OPTIONS) if https else None
