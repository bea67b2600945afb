"""What every agent transport shares: the validated description, payloads, telemetry, backoff
and the state the application sees (``registered``, ``connected``, ``last_reply``).

No I/O here and no logging configuration: the transports (``over_mqtt``, ``over_rest``) do
the talking, and only the CLI configures logging.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import random
import secrets
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from fleetmq.core.clock import SystemClock
from fleetmq.core.models import HeartbeatRequest, RegisterRequest, describe_error, quote
from fleetmq.core.topics import is_valid_node_id, is_valid_root
from fleetmq.errors import ConfigError

log = logging.getLogger(__name__)

RECONNECT_MIN_S = 0.5
RECONNECT_MAX_S = 30.0
STABLE_AFTER_S = 5.0
"""A connection that lived this long resets the backoff; a flapping one (two agents taking
the same client id from each other, say) keeps backing off."""
NETWORK_TIMEOUT_S = 10.0
"""Bound of every single network wait: connect, acknowledgement, HTTP request."""
TELEMETRY_TIMEOUT_S = 5.0
"""An async telemetry callable that takes longer costs its telemetry, not the heartbeat."""
SHUTDOWN_TIMEOUT_S = 5.0
"""How long a clean exit waits for the offline message to be acknowledged."""

TelemetryResult = Mapping[str, Any] | None
Telemetry = Callable[[], TelemetryResult | Awaitable[TelemetryResult]]
"""Returns ``uptime_seconds``, ``free_memory_kb``, ``sensors_active`` (any subset) and
optionally ``status`` (``online`` or ``degraded``); sync or async."""
_TELEMETRY_FIELDS = ("uptime_seconds", "free_memory_kb", "sensors_active", "status")


def new_session() -> str:
    """A fresh session string: one per MQTT connection (contract section 5)."""
    return secrets.token_hex(4)


@dataclass(frozen=True)
class AgentSpec:
    """What the agent says about itself, validated once when the agent is made."""

    node_id: str
    node_type: str
    interval_s: int
    topic_root: str = "fleet"
    name: str | None = None
    capabilities: tuple[str, ...] = ()
    location: str | None = None
    metadata: Mapping[str, str | int | float | bool | None] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.node_id, str) or not is_valid_node_id(self.node_id):
            raise ConfigError(
                f"node id {quote(self.node_id)} is invalid: use 1 to 128 letters, digits and "
                "'._:-', starting with a letter or digit (no '/', '+', '#', '$' or spaces)")
        if not is_valid_root(self.topic_root):
            raise ConfigError(
                f"topic root {quote(self.topic_root)} is not a plain topic: use letters, digits "
                "and '_.:-' in levels separated by '/', without wildcards, '$' or empty levels")
        if isinstance(self.interval_s, bool) or not isinstance(self.interval_s, int) \
                or not 1 <= self.interval_s <= 86_400:
            raise ConfigError(f"interval {quote(self.interval_s)} is out of range: "
                              "give whole seconds from 1 to 86400")
        try:
            RegisterRequest.model_validate(self.register_body(None))
        except ValidationError as exc:
            raise ConfigError(f"agent description is invalid: "
                              f"{describe_error(exc).message}") from exc

    def register_body(self, session: str | None) -> dict[str, Any]:
        body: dict[str, Any] = {
            "node_id": self.node_id, "node_type": self.node_type,
            "capabilities": list(self.capabilities), "metadata": dict(self.metadata),
            "heartbeat_interval_seconds": self.interval_s,
        }
        if self.name is not None:
            body["name"] = self.name
        if self.location is not None:
            body["location"] = self.location
        if session is not None:
            body["session"] = session
        return body

    def offline_body(self, reason: str, session: str | None) -> dict[str, Any]:
        body: dict[str, Any] = {"node_id": self.node_id, "status": "offline", "reason": reason}
        if session is not None:
            body["session"] = session
        return body


def parse_interval(value: float | int) -> int:
    """``interval_s`` as the manager takes it: whole seconds (60.0 is 60, 0.5 is refused)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value  # type: ignore[return-value]  # AgentSpec refuses anything else, by name


class AgentState:
    """What the application reads; written on the event loop only."""

    def __init__(self) -> None:
        self.registered = asyncio.Event()
        """Set once the manager acknowledged the registration; cleared on a 404 reply and on
        every disconnect, set again by the next acknowledged registration."""
        self.connected = False
        """MQTT: connected and subscribed. REST: the last request reached the manager."""
        self.last_reply: dict[str, Any] | None = None
        """The last reply from the manager (errors carry ``code``)."""
        self.session: str | None = None
        """This connection's session string."""


class Backoff:
    """Exponential backoff with full jitter: 0.5 s doubling to 30 s, each delay random below."""

    def __init__(self, first_s: float = RECONNECT_MIN_S, max_s: float = RECONNECT_MAX_S) -> None:
        self._first_s = first_s
        self._max_s = max_s
        self._attempt = 0

    def next_delay(self) -> float:
        cap = min(self._max_s, self._first_s * 2 ** min(self._attempt, 32))
        self._attempt += 1
        return random.uniform(0, cap)  # jitter, not cryptography

    def reset(self) -> None:
        self._attempt = 0


async def sleep_unless_stopped(stop: asyncio.Event, delay_s: float) -> bool:
    """Sleep ``delay_s``; True if ``stop`` was set meanwhile (return at once then)."""
    try:
        await asyncio.wait_for(stop.wait(), timeout=max(0.0, delay_s))
    except TimeoutError:
        return False
    return True


class Uptime:
    """Seconds since the agent started, from the monotonic clock."""

    def __init__(self) -> None:
        self._clock = SystemClock()
        self._started = self._clock.now().mono

    def seconds(self) -> int:
        return int(self._clock.now().mono - self._started)

    def now(self) -> float:
        return self._clock.now().mono


async def read_telemetry(telemetry: Telemetry | None, uptime: Uptime,
                         node_id: str) -> dict[str, Any]:
    """The heartbeat body: the callable's fields (validated), uptime by default.

    A callable that fails or returns something invalid costs its telemetry, not the heartbeat:
    the node stays alive, and the error is logged.
    """
    body: dict[str, Any] = {"node_id": node_id, "uptime_seconds": uptime.seconds()}
    if telemetry is None:
        return body
    try:
        result = telemetry()
        if inspect.isawaitable(result):
            async with asyncio.timeout(TELEMETRY_TIMEOUT_S):
                result = await result
        if result is None:
            return body
        fields = {k: v for k, v in dict(result).items() if k in _TELEMETRY_FIELDS}
        if fields.get("status") not in (None, "online", "degraded"):
            raise ValueError(f"status {quote(fields['status'])} is not online or degraded")
        HeartbeatRequest.model_validate(fields)
    except ValidationError as exc:
        log.warning("agent_telemetry_invalid node_id=%s error=%s", node_id,
                    describe_error(exc).message)
        return body
    except TimeoutError:
        log.warning("agent_telemetry_timeout node_id=%s timeout_s=%s", node_id,
                    TELEMETRY_TIMEOUT_S)
        return body
    except Exception:
        log.exception("agent_telemetry_failed node_id=%s", node_id)
        return body
    body.update(fields)
    return body


def reply_code(reply: Mapping[str, Any]) -> int | None:
    code = reply.get("code")
    return code if isinstance(code, int) and not isinstance(code, bool) else None


def note_reply(state: AgentState, reply: dict[str, Any], node_id: str) -> bool:
    """Record a reply; True when the agent must register again (a 404)."""
    state.last_reply = reply
    code = reply_code(reply)
    if code is None and reply.get("status") == "registered":
        if not state.registered.is_set():
            log.info("agent_registered node_id=%s message=%s", node_id, reply.get("message"))
        state.registered.set()
        return False
    if code == 404:
        log.info("agent_unknown_to_manager node_id=%s action=register", node_id)
        state.registered.clear()
        return True
    if code is not None:
        log.error("agent_rejected node_id=%s code=%s error=%s message=%s", node_id, code,
                  reply.get("error"), reply.get("message"))
    return False


def capabilities_tuple(value: Sequence[str] | None) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        raise ConfigError(f"capabilities {quote(value)} must be a list of strings, not a string")
    return tuple(value)
