"""The agent's protocol over REST, for agents that cannot speak MQTT (contract section 4):
POST register, POST heartbeat every interval, register again on a 404, back off while the
manager is unreachable, and post an offline heartbeat (reason ``shutdown``) on a clean exit.

There is no last will over HTTP: an agent that dies goes offline by the manager's timeout.
"""

from __future__ import annotations

import asyncio
import logging
import math
import ssl
from typing import Any

import aiohttp

from fleetmq.agent.core import (
    NETWORK_TIMEOUT_S,
    SHUTDOWN_TIMEOUT_S,
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

log = logging.getLogger(__name__)

_CONNECTION_ERRORS = (aiohttp.ClientError, TimeoutError, OSError)


class Unreachable(Exception):
    """The manager did not answer (connection refused, reset, timeout, 5xx)."""


class RestTransport:
    """Runs until ``stop`` is set, with one HTTP session (keep-alive) for its whole life."""

    def __init__(self, spec: AgentSpec, api: str, state: AgentState,
                 telemetry: Telemetry | None, uptime: Uptime, *, token: str | None = None,
                 tls: ssl.SSLContext | None = None) -> None:
        self._spec = spec
        self._headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        self._tls = tls
        self._base = api.rstrip("/") + "/api/v1/fleet"
        self._state = state
        self._telemetry = telemetry
        self._uptime = uptime
        # One session string for the agent's life: it lets the manager match our goodbye.
        self._session = new_session()

    async def run(self, stop: asyncio.Event) -> None:
        self._state.session = self._session
        timeout = aiohttp.ClientTimeout(total=NETWORK_TIMEOUT_S)
        # ssl=True: the system's CAs; a context: --api-ca's. Either way verified.
        connector = aiohttp.TCPConnector(ssl=self._tls or True)
        async with aiohttp.ClientSession(timeout=timeout, headers=self._headers,
                                         connector=connector) as http:
            await self._loop(http, stop)
            await self._say_goodbye(http)

    async def _loop(self, http: aiohttp.ClientSession, stop: asyncio.Event) -> None:
        spec, backoff = self._spec, Backoff()
        next_beat: float | None = None
        while not stop.is_set():
            try:
                if not self._state.registered.is_set():
                    await self._post(http, "register", spec.register_body(self._session))
                    if not self._state.registered.is_set():
                        # Refused (409, 400): logged by note_reply; try again an interval on.
                        next_beat = None
                        if await sleep_unless_stopped(stop, spec.interval_s):
                            return
                        continue
                    next_beat = self._uptime.now() + spec.interval_s
                backoff.reset()
                assert next_beat is not None  # set by the registration just above
                if await sleep_unless_stopped(stop, next_beat - self._uptime.now()):
                    return
                body = await read_telemetry(self._telemetry, self._uptime, spec.node_id)
                body["session"] = self._session
                await self._post(http, "heartbeat", body)
                now = self._uptime.now()
                next_beat += spec.interval_s * max(1, math.ceil((now - next_beat)
                                                                / spec.interval_s))
            except Unreachable as exc:
                delay = backoff.next_delay()
                log.warning("agent_manager_unreachable node_id=%s api=%s error=%s retry_in_s=%.2f",
                            spec.node_id, self._base, exc, delay)
            except Exception:
                delay = backoff.next_delay()
                log.exception("agent_rest_crashed node_id=%s retry_in_s=%.2f", spec.node_id, delay)
            else:
                continue
            if await sleep_unless_stopped(stop, delay):
                return

    async def _post(self, http: aiohttp.ClientSession, path: str,
                    body: dict[str, Any]) -> None:
        try:
            async with http.post(f"{self._base}/{path}", json=body) as resp:
                status = resp.status
                try:
                    reply = await resp.json(content_type=None)
                except ValueError:
                    reply = None
        except _CONNECTION_ERRORS as exc:
            self._state.connected = False
            raise Unreachable(str(exc) or type(exc).__name__) from exc
        if status >= 500:
            self._state.connected = False
            raise Unreachable(f"HTTP {status} from {path}")
        self._state.connected = True
        if not isinstance(reply, dict):
            reply = {"error": "Invalid reply", "message": f"HTTP {status}, not a JSON object"}
        if status != 200:
            reply = {**reply, "code": status}
        note_reply(self._state, reply, self._spec.node_id)

    async def _say_goodbye(self, http: aiohttp.ClientSession) -> None:
        spec = self._spec
        if not self._state.connected:
            return  # the manager is unreachable: its timeout will tell
        body = spec.offline_body("shutdown", self._session)
        try:
            async with http.post(f"{self._base}/heartbeat", json=body,
                                 timeout=aiohttp.ClientTimeout(total=SHUTDOWN_TIMEOUT_S)) as resp:
                ok = resp.status == 200
        except _CONNECTION_ERRORS as exc:
            log.warning("agent_offline_not_sent node_id=%s error=%s", spec.node_id, exc)
            return
        finally:
            self._state.connected = False
            self._state.registered.clear()
        if ok:
            log.info("agent_offline_sent node_id=%s reason=shutdown", spec.node_id)
        else:
            log.warning("agent_offline_refused node_id=%s", spec.node_id)
