"""Offline reports, sessions and late wills in the registry (contract §3, §5)."""

from __future__ import annotations

import pytest

from fleetmq.core.clock import FakeClock
from fleetmq.core.events import NodeTransitioned
from fleetmq.core.models import HeartbeatRequest
from fleetmq.core.registry import Registry
from tests.unit.conftest import NODE, hb, node_of, reg

# --- offline reports -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reason", "expected"),
    [(None, "reported"), ("connection_lost", "connection_lost"), ("shutdown", "shutdown")],
)
def test_offline_report_takes_the_payload_reason_else_reported(
    registry: Registry, clock: FakeClock, reason: str | None, expected: str
) -> None:
    start = clock.now()
    registry.register(NODE, reg(), start)
    now = clock.advance(3)

    result = registry.heartbeat(NODE, hb(status="offline", reason=reason), now)

    assert result.events == [
        NodeTransitioned(NODE, "offline", expected, now.wall, start.wall, "online",
            "microclaw", None)]
    assert node_of(registry).status_reason == expected


def test_offline_report_moves_neither_last_seen_nor_telemetry(
    registry: Registry, clock: FakeClock
) -> None:
    registry.register(NODE, reg(), clock.now())
    seen = clock.advance(1)
    registry.heartbeat(NODE, hb(uptime_seconds=5, free_memory_kb=6, sensors_active=7), seen)

    node = registry.heartbeat(NODE, hb(status="offline", uptime_seconds=99, free_memory_kb=99,
                                       sensors_active=99), clock.advance(10)).node

    assert node.status == "offline"
    assert node.last_seen == seen.wall
    assert (node.uptime_seconds, node.free_memory_kb, node.sensors_active) == (5, 6, 7)


def test_offline_report_for_an_offline_node_is_not_a_transition(
    registry: Registry, clock: FakeClock
) -> None:
    registry.register(NODE, reg(), clock.now())
    registry.heartbeat(NODE, hb(status="offline", reason="shutdown"), clock.advance(1))

    result = registry.heartbeat(NODE, hb(status="offline", reason="connection_lost"),
                                clock.advance(1))

    assert result.events == []
    assert result.ignored is None
    assert node_of(registry).status_reason == "shutdown"


def test_heartbeat_after_an_offline_report_brings_the_node_back_online(
    registry: Registry, clock: FakeClock
) -> None:
    registry.register(NODE, reg(), clock.now())
    registry.heartbeat(NODE, hb(status="offline"), clock.advance(1))
    now = clock.advance(1)

    result = registry.heartbeat(NODE, hb(), now)

    assert result.events == [
        NodeTransitioned(NODE, "online", "heartbeat", now.wall, now.wall, "offline",
            "microclaw", None)]


# --- sessions and late wills (contract §5) ------------------------------------------------


def _will(session: str | None) -> HeartbeatRequest:
    return hb(status="offline", reason="connection_lost", session=session)


def test_will_from_an_older_session_is_ignored_as_late_will(
    registry: Registry, clock: FakeClock
) -> None:
    registry.register(NODE, reg(session="s1"), clock.now())
    registry.register(NODE, reg(session="s2"), clock.advance(1))

    result = registry.heartbeat(NODE, _will("s1"), clock.advance(1))

    assert result.ignored == "late_will"
    assert result.events == []
    assert node_of(registry).status == "online"


def test_will_from_the_current_session_is_accepted(registry: Registry, clock: FakeClock) -> None:
    start = clock.now()
    registry.register(NODE, reg(session="s1"), start)
    now = clock.advance(1)

    result = registry.heartbeat(NODE, _will("s1"), now)

    assert result.ignored is None
    assert result.events == [
        NodeTransitioned(NODE, "offline", "connection_lost", now.wall, start.wall, "online",
            "microclaw", None)]


@pytest.mark.parametrize("status", ["online", "degraded"])
def test_alive_heartbeat_with_a_session_becomes_the_current_session(
    registry: Registry, clock: FakeClock, status: str
) -> None:
    registry.register(NODE, reg(session="s1"), clock.now())
    registry.heartbeat(NODE, hb(status=status, session="s2"), clock.advance(1))

    assert registry.heartbeat(NODE, _will("s1"), clock.advance(1)).ignored == "late_will"
    assert registry.heartbeat(NODE, _will("s2"), clock.advance(1)).ignored is None
    assert node_of(registry).status == "offline"


def test_messages_without_session_leave_the_current_session(
    registry: Registry, clock: FakeClock
) -> None:
    registry.register(NODE, reg(session="s1"), clock.now())
    registry.heartbeat(NODE, hb(), clock.advance(1))
    registry.register(NODE, reg(), clock.advance(1))

    assert registry.heartbeat(NODE, _will("s0"), clock.advance(1)).ignored == "late_will"


def test_offline_message_does_not_set_the_session(registry: Registry, clock: FakeClock) -> None:
    registry.register(NODE, reg(), clock.now())
    registry.heartbeat(NODE, _will("s1"), clock.advance(1))
    registry.heartbeat(NODE, hb(), clock.advance(1))

    # Had the will's session become current, this one (s2) would be a late will.
    result = registry.heartbeat(NODE, _will("s2"), clock.advance(1))

    assert result.ignored is None
    assert node_of(registry).status == "offline"


@pytest.mark.parametrize(("node_session", "will_session"), [(None, "s1"), ("s1", None)])
def test_offline_is_accepted_where_either_side_has_no_session(
    registry: Registry, clock: FakeClock, node_session: str | None, will_session: str | None
) -> None:
    registry.register(NODE, reg(session=node_session), clock.now())

    result = registry.heartbeat(NODE, _will(will_session), clock.advance(1))

    assert result.ignored is None
    assert node_of(registry).status == "offline"


def test_late_will_for_an_offline_node_changes_nothing(
    registry: Registry, clock: FakeClock
) -> None:
    registry.register(NODE, reg(session="s2"), clock.now())
    registry.heartbeat(NODE, _will("s2"), clock.advance(1))

    result = registry.heartbeat(NODE, _will("s1"), clock.advance(1))

    assert result.events == []
    assert node_of(registry).status_reason == "connection_lost"
