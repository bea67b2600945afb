"""Wire documents (contract §4 node, §6 payloads), timestamps, and rate-limited logging."""

from __future__ import annotations

import json
import logging
import re
from collections import deque
from typing import Any

import pytest
from pydantic import ValidationError

from fleetmq import views
from fleetmq.core.clock import FakeClock, format_timestamp
from fleetmq.core.events import NodeTransitioned
from fleetmq.core.models import (
    RegisterRequest,
    describe_error,
    node_conflict,
    node_not_registered,
)
from fleetmq.core.registry import Node, NodeConflictError, Registry
from fleetmq.metrics import RateLimitedLog
from fleetmq.views import (
    dumps,
    error_body,
    heartbeat_reply,
    manager_status_payload,
    node_json,
    node_status_payload,
    register_reply,
    status_payload,
    transition_payload,
)
from tests.unit.conftest import hb, reg

NODE_KEYS = {
    "id", "name", "type", "capabilities", "location", "metadata", "status", "status_reason",
    "status_since", "last_seen", "registered_at", "heartbeat_interval_seconds",
    "uptime_seconds", "free_memory_kb", "sensors_active",
}
RFC3339_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
LONG_ID = "n" * 128
LONG_REASON = "r" * 64
PUBSUBCLIENT_BUFFER = 512


def document(node: Node) -> dict[str, Any]:
    return json.loads(node_json(node))  # type: ignore[no-any-return]


# --- timestamps ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("wall", "text"),
    [
        (1771230600.0, "2026-02-16T08:30:00.000Z"),
        (1771230660.5, "2026-02-16T08:31:00.500Z"),
        (1771230600.123, "2026-02-16T08:30:00.123Z"),
        (1771230600.0004, "2026-02-16T08:30:00.000Z"),
        (1771230600.0006, "2026-02-16T08:30:00.001Z"),
        (1771230600.9996, "2026-02-16T08:30:01.000Z"),
        (1767225599.9999, "2026-01-01T00:00:00.000Z"),
        (0.0, "1970-01-01T00:00:00.000Z"),
    ],
)
def test_format_timestamp_is_rfc3339_utc_with_rounded_milliseconds(wall: float,
                                                                   text: str) -> None:
    assert format_timestamp(wall) == text
    assert RFC3339_MS.match(text)


# --- the node document -----------------------------------------------------------------------


def test_node_document_has_exactly_the_contract_keys_and_null_telemetry() -> None:
    clock = FakeClock()
    registry = Registry(60)
    node = registry.register("microclaw-esp32-f4cfa210", reg(
        capabilities=["dht22", "mqtt"], location="office-floor-2",
        metadata={"gateway": "nanoclaw-pi-01", "firmware": "v1.0.0"},
    ), clock.now()).node

    doc = document(node)

    assert set(doc) == NODE_KEYS
    assert doc == {
        "id": "microclaw-esp32-f4cfa210", "name": "microclaw-esp32-f4cfa210",
        "type": "microclaw", "capabilities": ["dht22", "mqtt"], "location": "office-floor-2",
        "metadata": {"gateway": "nanoclaw-pi-01", "firmware": "v1.0.0"},
        "status": "online", "status_reason": "registered",
        "status_since": "2026-02-16T08:30:00.000Z", "last_seen": "2026-02-16T08:30:00.000Z",
        "registered_at": "2026-02-16T08:30:00.000Z", "heartbeat_interval_seconds": 60,
        "uptime_seconds": None, "free_memory_kb": None, "sensors_active": None,
    }


def test_node_document_shows_the_effective_interval() -> None:
    clock = FakeClock()
    registry = Registry(25)

    assert document(registry.register("a", reg(), clock.now()).node)[
        "heartbeat_interval_seconds"] == 25
    assert document(registry.register("b", reg(heartbeat_interval_seconds=5), clock.now()).node)[
        "heartbeat_interval_seconds"] == 5


def test_node_json_is_cached_until_the_node_changes() -> None:
    clock = FakeClock()
    registry = Registry(60)
    node = registry.register("n1", reg(), clock.now()).node
    first = node_json(node)
    assert node_json(node) is first  # serialized once per change

    registry.heartbeat("n1", hb(uptime_seconds=42), clock.advance(61.25))

    doc = document(node)
    assert doc["last_seen"] == "2026-02-16T08:31:01.250Z"
    assert doc["uptime_seconds"] == 42
    assert doc["status_since"] == "2026-02-16T08:30:00.000Z"


def test_only_the_most_recently_serialized_views_are_kept(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(views, "VIEWS_KEPT", 3)
    monkeypatch.setattr(views, "_kept", deque())
    clock = FakeClock()
    registry = Registry(60)
    nodes = [registry.register(f"n{i}", reg(), clock.now()).node for i in range(5)]
    served = [node_json(node) for node in nodes]
    assert [node.view is not None for node in nodes] == [False, False, True, True, True]
    assert node_json(nodes[0]) == served[0]  # made again on demand, the same bytes
    assert [node.view is not None for node in nodes] == [True, False, False, True, True]
    registry.heartbeat("n4", hb(uptime_seconds=1), clock.advance(1))  # drops its view
    assert json.loads(node_json(nodes[4]))["uptime_seconds"] == 1
    assert sum(node.view is not None for node in nodes) <= 3


@pytest.mark.parametrize(
    ("change", "status", "reason"),
    [
        (lambda r, c: r.heartbeat("n1", hb(status="degraded"), c.advance(1)),
         "degraded", "heartbeat"),
        (lambda r, c: r.heartbeat("n1", hb(status="offline"), c.advance(1)),
         "offline", "reported"),
        (lambda r, c: r.expire(c.advance(180)), "offline", "heartbeat_timeout"),
        (lambda r, c: r.register("n1", reg(name="renamed"), c.advance(1)),
         "online", "registered"),
    ],
)
def test_node_json_follows_every_transition(change: Any, status: str, reason: str) -> None:
    clock = FakeClock()
    registry = Registry(60)
    node = registry.register("n1", reg(session="s1"), clock.now()).node
    node_json(node)

    change(registry, clock)

    doc = document(node)
    assert (doc["status"], doc["status_reason"]) == (status, reason)
    assert doc["status_since"] == format_timestamp(clock.now().wall)


def test_reregistration_shows_the_new_description_in_json() -> None:
    clock = FakeClock()
    registry = Registry(60)
    node = registry.register("n1", reg(location="lab"), clock.now()).node
    node_json(node)

    registry.register("n1", reg(name="Desk"), clock.now())

    doc = document(node)
    assert (doc["name"], doc["location"]) == ("Desk", None)


# --- status payloads and replies -------------------------------------------------------------


def test_status_payload_has_the_contract_fields() -> None:
    event = NodeTransitioned("n1", "offline", "heartbeat_timeout", 1771230780.0, 1771230600.0,
                             "online", "microclaw", None)

    assert json.loads(transition_payload(event)) == {
        "node_id": "n1", "status": "offline", "reason": "heartbeat_timeout",
        "since": "2026-02-16T08:33:00.000Z", "last_seen": "2026-02-16T08:30:00.000Z",
    }


def test_node_status_payload_repeats_the_last_transition() -> None:
    clock = FakeClock()
    registry = Registry(60)
    registry.register("n1", reg(), clock.now())
    (event,) = registry.heartbeat("n1", hb(status="degraded"), clock.advance(2)).events
    node = registry.get("n1")
    assert node is not None
    assert isinstance(event, NodeTransitioned)

    assert json.loads(node_status_payload(node)) == json.loads(transition_payload(event))


def test_status_payload_with_longest_id_and_reason_fits_512_bytes() -> None:
    payloads = [
        status_payload(LONG_ID, "degraded", LONG_REASON, 1771230600.0, 1771230600.0),
        status_payload(LONG_ID, "degraded", "\U0001f600" * 64, 1771230600.0, 1771230600.0),
        status_payload(LONG_ID, "offline", '"\\' * 32, 4102444800.0, 4102444800.0),
    ]

    assert all(len(payload) < PUBSUBCLIENT_BUFFER for payload in payloads)


def test_replies_with_longest_id_fit_512_bytes() -> None:
    clock = FakeClock()
    registry = Registry(60)
    node = registry.register(LONG_ID, reg(heartbeat_interval_seconds=86400), clock.now()).node
    with pytest.raises(ValidationError) as info:
        RegisterRequest.model_validate_json(b'{"node_type": "' + b"x" * 500 + b'"}')
    invalid = describe_error(info.value)
    replies = [
        register_reply(LONG_ID, created=False, at=clock.now().wall),
        heartbeat_reply(node, clock.now().wall),
        {**error_body(node_not_registered()), "code": 404},
        {**error_body(invalid), "code": 400},
        {**error_body(node_conflict(LONG_ID, "t" * 64)), "code": 409},
    ]

    sizes = [len(dumps(reply)) for reply in replies]
    assert all(size < PUBSUBCLIENT_BUFFER for size in sizes), sizes


def test_conflict_reply_with_non_ascii_types_fits_512_bytes() -> None:
    exc = NodeConflictError(LONG_ID, "\u6e29\u5ea6" * 32, "\u6e7f\u5ea6" * 32)

    body = error_body(node_conflict(exc.node_id, exc.existing_type))
    assert len(dumps({**body, "code": 409})) < PUBSUBCLIENT_BUFFER


def test_register_reply_message_depends_on_first_registration() -> None:
    assert register_reply("n1", created=True, at=1771230600.0) == {
        "node_id": "n1", "status": "registered", "message": "Node successfully registered",
        "timestamp": "2026-02-16T08:30:00.000Z",
    }
    assert register_reply("n1", created=False, at=0.0)["message"] == "Node registration updated"


def test_manager_status_payloads() -> None:
    assert json.loads(manager_status_payload("online", 1771230600.0)) == {
        "status": "online", "since": "2026-02-16T08:30:00.000Z"}
    assert json.loads(manager_status_payload("offline", None, "connection_lost")) == {
        "status": "offline", "reason": "connection_lost"}


# --- rate-limited logging and counters --------------------------------------------------------


@pytest.fixture
def logger(caplog: pytest.LogCaptureFixture) -> logging.Logger:
    caplog.set_level(logging.WARNING, logger="fleetmq.test.ratelimit")
    return logging.getLogger("fleetmq.test.ratelimit")


def messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "fleetmq.test.ratelimit"]


def test_rate_limited_log_shows_a_burst_then_suppresses(
    logger: logging.Logger, caplog: pytest.LogCaptureFixture
) -> None:
    warn = RateLimitedLog(logger, burst=3, window_s=10.0)

    for i in range(10):
        warn.warning("invalid_json", 100.0 + i * 0.5, "dropped n=%d", i)

    assert messages(caplog) == ["dropped n=0", "dropped n=1", "dropped n=2"]


def test_rate_limited_log_summarises_suppressed_lines_after_the_window(
    logger: logging.Logger, caplog: pytest.LogCaptureFixture
) -> None:
    warn = RateLimitedLog(logger, burst=2, window_s=10.0)
    for i in range(6):
        warn.warning("too_large", 100.0 + i, "dropped n=%d", i)
    warn.warning("too_large", 110.0 - 2**-10, "dropped late")  # still inside the window
    caplog.clear()

    warn.warning("too_large", 110.0, "dropped again")

    assert messages(caplog) == ["log_suppressed key=too_large count=5", "dropped again"]
    assert all(r.levelno == logging.WARNING for r in caplog.records)


def test_rate_limited_log_without_suppression_writes_no_summary(
    logger: logging.Logger, caplog: pytest.LogCaptureFixture
) -> None:
    warn = RateLimitedLog(logger, burst=2, window_s=10.0)
    warn.warning("k", 0.0, "one")
    warn.warning("k", 50.0, "two")

    assert messages(caplog) == ["one", "two"]


def test_rate_limited_log_counts_each_key_apart(
    logger: logging.Logger, caplog: pytest.LogCaptureFixture
) -> None:
    warn = RateLimitedLog(logger, burst=1, window_s=10.0)
    for key in ("a", "a", "b", "a", "b", "c"):
        warn.warning(key, 1.0, "drop %s", key)

    assert messages(caplog) == ["drop a", "drop b", "drop c"]
