"""The registry state machine (contract §3): registration, conflicts, heartbeats, deletion.

Offline reports and sessions are in test_registry_offline.py, deadlines in
test_registry_expiry.py."""

from __future__ import annotations

import copy
import random

import pytest

from fleetmq.core import texts
from fleetmq.core.clock import FakeClock
from fleetmq.core.events import NodeDeleted, NodeTransitioned
from fleetmq.core.models import Status
from fleetmq.core.registry import NodeConflictError, NodeNotFoundError, Registry
from tests.unit.conftest import NODE, hb, node_of, reg

# --- register ------------------------------------------------------------------------------


def test_first_registration_is_an_online_transition_without_previous_state(
    registry: Registry, clock: FakeClock
) -> None:
    now = clock.now()
    result = registry.register(NODE, reg(), now)

    assert result.created is True
    assert result.events == [
        NodeTransitioned(NODE, "online", "registered", now.wall, now.wall, None, "microclaw", None)
    ]
    node = node_of(registry)
    assert (node.status, node.status_reason) == ("online", "registered")
    assert node.status_since == node.registered_at == node.last_seen == now.wall
    assert len(registry) == 1


def test_a_new_node_keeps_the_equal_id_held_elsewhere_instead_of_its_own_copy(
    clock: FakeClock,
) -> None:
    held = "".join(["microclaw-", "esp32-f4cfa210"])  # built: not the interned literal
    registry = Registry(30, held_id=lambda node_id: held if node_id == held else node_id)
    node = registry.register(NODE, reg(), clock.now()).node
    other = registry.register("other-1", reg(), clock.now()).node

    assert node.id is held
    assert other.id == "other-1"


def test_registration_defaults_name_to_id_and_interval_to_the_managers(clock: FakeClock) -> None:
    registry = Registry(30)
    node = registry.register(NODE, reg(), clock.now()).node

    assert node.name == NODE
    assert node.capabilities == ()
    assert node.location is None
    assert node.metadata == {}
    assert node.interval_s == 30
    assert (node.uptime_seconds, node.free_memory_kb, node.sensors_active) == (None, None, None)


def test_registration_stores_the_description(registry: Registry, clock: FakeClock) -> None:
    node = registry.register(NODE, reg(
        name="Desk sensor", capabilities=["dht22", "mqtt"], location="office-floor-2",
        metadata={"gateway": "nanoclaw-pi-01", "rev": 3}, heartbeat_interval_seconds=15,
    ), clock.now()).node

    assert node.type == "microclaw"
    assert node.name == "Desk sensor"
    assert node.capabilities == ("dht22", "mqtt")
    assert node.location == "office-floor-2"
    assert node.metadata == {"gateway": "nanoclaw-pi-01", "rev": 3}
    assert node.interval_s == 15


def test_reregistering_replaces_description_and_keeps_registered_at_and_telemetry(
    registry: Registry, clock: FakeClock
) -> None:
    first = clock.now()
    registry.register(NODE, reg(
        name="old", capabilities=["dht22"], location="lab", metadata={"fw": "v1"},
        heartbeat_interval_seconds=10,
    ), first)
    registry.heartbeat(NODE, hb(uptime_seconds=50, free_memory_kb=200, sensors_active=2),
                       clock.advance(5))
    later = clock.advance(5)

    result = registry.register(NODE, reg(capabilities=["mqtt"]), later)

    assert result.created is False
    assert result.events == [
        NodeTransitioned(NODE, "online", "registered", later.wall, later.wall, "online",
            "microclaw", None)
    ]
    node = result.node
    assert node.registered_at == first.wall
    assert node.last_seen == later.wall
    assert (node.uptime_seconds, node.free_memory_kb, node.sensors_active) == (50, 200, 2)
    assert node.capabilities == ("mqtt",)
    # What the new request omits is cleared.
    assert node.name == NODE
    assert node.location is None
    assert node.metadata == {}
    assert node.interval_s == 60


@pytest.mark.parametrize("state", ["degraded", "offline"])
def test_reregistering_makes_a_node_online_again(
    registry: Registry, clock: FakeClock, state: Status
) -> None:
    registry.register(NODE, reg(), clock.now())
    registry.heartbeat(NODE, hb(status=state), clock.advance(1))
    now = clock.advance(1)

    result = registry.register(NODE, reg(), now)

    assert result.events == [
        NodeTransitioned(NODE, "online", "registered", now.wall, now.wall, state, "microclaw", None)
    ]
    assert node_of(registry).status == "online"


def test_registering_as_another_type_is_a_conflict_that_changes_nothing(
    registry: Registry, clock: FakeClock
) -> None:
    registry.register(NODE, reg("microclaw", name="original"), clock.now())

    with pytest.raises(NodeConflictError) as info:
        registry.register(NODE, reg("picclaw", name="intruder"), clock.advance(1))

    assert (info.value.node_id, info.value.existing_type, info.value.claimed_type) == (
        NODE, "microclaw", "picclaw")
    node = node_of(registry)
    assert (node.type, node.name) == ("microclaw", "original")


def test_node_type_comparison_ignores_case(registry: Registry, clock: FakeClock) -> None:
    registry.register(NODE, reg("MicroClaw"), clock.now())

    result = registry.register(NODE, reg("microclaw"), clock.advance(1))

    assert result.created is False
    assert result.node.status == "online"


def test_node_ids_are_case_sensitive(registry: Registry, clock: FakeClock) -> None:
    registry.register("node-a", reg("microclaw"), clock.now())

    result = registry.register("NODE-A", reg("picclaw"), clock.now())

    assert result.created is True
    assert len(registry) == 2


# --- heartbeat -----------------------------------------------------------------------------


@pytest.mark.parametrize("status", [None, "online", "degraded", "offline"])
def test_heartbeat_from_an_unknown_node_is_not_found(
    registry: Registry, clock: FakeClock, status: str | None
) -> None:
    with pytest.raises(NodeNotFoundError) as info:
        registry.heartbeat("ghost", hb(status=status), clock.now())
    assert info.value.node_id == "ghost"


def test_heartbeat_updates_last_seen_and_telemetry_without_an_event(
    registry: Registry, clock: FakeClock
) -> None:
    start = clock.now()
    registry.register(NODE, reg(), start)
    now = clock.advance(7)

    result = registry.heartbeat(
        NODE, hb(uptime_seconds=86400, free_memory_kb=200, sensors_active=2), now)

    assert result.events == []
    assert result.ignored is None
    node = result.node
    assert node.last_seen == now.wall
    assert (node.uptime_seconds, node.free_memory_kb, node.sensors_active) == (86400, 200, 2)
    assert (node.status_reason, node.status_since) == ("registered", start.wall)


def test_bare_heartbeat_keeps_every_telemetry_field(registry: Registry, clock: FakeClock) -> None:
    registry.register(NODE, reg(), clock.now())
    registry.heartbeat(NODE, hb(uptime_seconds=10, free_memory_kb=20, sensors_active=3),
                       clock.advance(1))

    registry.heartbeat(NODE, hb(), clock.advance(1))
    node = registry.heartbeat(NODE, hb(free_memory_kb=0), clock.advance(1)).node

    assert (node.uptime_seconds, node.free_memory_kb, node.sensors_active) == (10, 0, 3)
    assert node.last_seen == clock.now().wall


def test_degraded_and_back_to_online_are_heartbeat_transitions(
    registry: Registry, clock: FakeClock
) -> None:
    registry.register(NODE, reg(), clock.now())

    t1 = clock.advance(1)
    degraded = registry.heartbeat(NODE, hb(status="degraded"), t1)
    again = registry.heartbeat(NODE, hb(status="degraded"), clock.advance(1))
    t3 = clock.advance(1)
    recovered = registry.heartbeat(NODE, hb(), t3)

    assert degraded.events == [
        NodeTransitioned(NODE, "degraded", "heartbeat", t1.wall, t1.wall, "online",
            "microclaw", None)]
    assert again.events == []
    assert recovered.events == [
        NodeTransitioned(NODE, "online", "heartbeat", t3.wall, t3.wall, "degraded",
            "microclaw", None)]
    node = node_of(registry)
    assert (node.status, node.status_reason, node.status_since) == ("online", "heartbeat", t3.wall)


def test_a_degraded_node_s_reason_is_its_status_reason_and_a_new_one_is_an_event(
    registry: Registry, clock: FakeClock
) -> None:
    registry.register(NODE, reg(), clock.now())

    t1 = clock.advance(1)
    low = registry.heartbeat(NODE, hb(status="degraded", reason="low_battery"), t1)
    same = registry.heartbeat(NODE, hb(status="degraded", reason="low_battery"), clock.advance(1))
    silent = registry.heartbeat(NODE, hb(status="degraded"), clock.advance(1))
    t4 = clock.advance(1)
    hot = registry.heartbeat(NODE, hb(status="degraded", reason="overheating"), t4)
    t5 = clock.advance(1)
    fine = registry.heartbeat(NODE, hb(reason="ignored_when_online"), t5)

    assert low.events == [
        NodeTransitioned(NODE, "degraded", "low_battery", t1.wall, t1.wall, "online",
            "microclaw", None)]
    assert same.events == silent.events == []  # no reason says nothing new: it stays
    assert hot.events == [
        NodeTransitioned(NODE, "degraded", "overheating", t4.wall, t4.wall, "degraded",
            "microclaw", None)]
    assert fine.events == [
        NodeTransitioned(NODE, "online", "heartbeat", t5.wall, t5.wall, "degraded",
            "microclaw", None)]
    assert node_of(registry).status_reason == "heartbeat"


# --- delete and ordering -------------------------------------------------------------------


def test_delete_removes_the_node_and_a_second_delete_is_not_found(
    registry: Registry, clock: FakeClock
) -> None:
    registry.register("a", reg(), clock.now())
    registry.register(NODE, reg(), clock.now())

    gone = clock.now()
    assert registry.delete(NODE, gone) == [
        NodeDeleted(NODE, "online", gone.wall, gone.wall, "microclaw", None)]
    assert registry.get(NODE) is None
    assert registry.sorted_ids() == ["a"]
    assert registry.ids() == ["a"]
    assert len(registry) == 1
    with pytest.raises(NodeNotFoundError):
        registry.delete(NODE, clock.now())
    with pytest.raises(NodeNotFoundError):
        registry.heartbeat(NODE, hb(), clock.now())


def test_deleted_node_can_register_again_as_another_type(
    registry: Registry, clock: FakeClock
) -> None:
    first = clock.now()
    registry.register(NODE, reg("microclaw"), first)
    registry.delete(NODE, clock.now())
    later = clock.advance(1)

    result = registry.register(NODE, reg("picclaw"), later)

    assert result.created is True
    assert result.events[0] == NodeTransitioned(
        NODE, "online", "registered", later.wall, later.wall, None, "picclaw", None)
    assert (result.node.type, result.node.registered_at) == ("picclaw", later.wall)


def test_sorted_ids_stay_sorted_across_inserts_and_deletes(
    registry: Registry, clock: FakeClock
) -> None:
    rng = random.Random(42)
    ids = [f"{rng.choice('abcXYZ019')}{rng.randrange(10_000)}" for _ in range(500)]
    expected: set[str] = set()
    for node_id in ids:
        registry.register(node_id, reg(), clock.now())
        expected.add(node_id)
        if rng.random() < 0.3:
            victim = rng.choice(sorted(expected))
            registry.delete(victim, clock.now())
            expected.discard(victim)
        assert registry.sorted_ids() == sorted(expected)
    assert len(registry) == len(expected)


def test_nodes_with_the_same_description_share_its_texts(
    registry: Registry, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    body = {"capabilities": ["dht22", "mqtt"], "location": "office-floor-2",
            "metadata": {"gateway": "nanoclaw-pi-01"}}
    a = registry.register("a", reg(**body), clock.now()).node
    b = registry.register("b", reg(**body), clock.now()).node
    assert a.type is b.type
    assert a.location is b.location
    assert a.capabilities_json is b.capabilities_json
    assert a.metadata_json is b.metadata_json
    assert b.capabilities == ("dht22", "mqtt")
    assert b.metadata == {"gateway": "nanoclaw-pi-01"}

    monkeypatch.setattr(texts, "SHARED_TEXTS", 2)  # full: starts over, values stay right
    for i in range(5):
        node = registry.register(f"n{i}", reg(location=f"room-{i}"), clock.now()).node
        assert node.location == f"room-{i}"
    again = registry.register("a", reg(location="room-4", capabilities=["x"]), clock.now()).node
    assert (again.location, again.capabilities) == ("room-4", ("x",))


def test_restored_nodes_share_their_timeouts(clock: FakeClock) -> None:
    source = Registry(60)
    body = {"location": "hall", "capabilities": ["dht22"], "heartbeat_interval_seconds": 10}
    for node_id in ("a", "b"):
        source.register(node_id, reg(**body), clock.now())
    copies = []
    for node_id in ("a", "b"):
        node = source.get(node_id)
        assert node is not None
        copies.append(copy.copy(node))
        copies[-1].location = "".join(["ha", "ll"])  # equal text, another object (as loaded)
        copies[-1].timeout_s = float("30")
    restored = Registry(60)
    restored.restore(copies)
    a, b = node_of(restored, "a"), node_of(restored, "b")
    assert a.location == b.location == "hall"
    assert a.timeout_s is b.timeout_s
    assert restored.expire(clock.advance(30)) != []  # deadlines still from the timeout
