"""Deadline-based offline detection (contract §3): per-node timeouts, expiry exactly at the
deadline, the ingest limit, grace after a (re)start, and many nodes with mixed intervals."""

from __future__ import annotations

import random
from typing import Any

import pytest

from fleetmq.core.clock import FakeClock, Instant
from fleetmq.core.events import NodeTransitioned
from fleetmq.core.registry import Registry, Waiting
from tests.unit.conftest import hb, node_of, reg

EPS = 2**-10  # a power of two: FakeClock sums stay exact, so "just before" is really before


def expired_ids(registry: Registry, now: Instant, limit: float | None = None,
                waiting: Waiting | None = None) -> list[str]:
    return [event.node_id for event in registry.expire(now, limit, waiting=waiting)]


# --- timeouts --------------------------------------------------------------------------------


def test_default_timeout_is_three_intervals_unless_given() -> None:
    assert Registry(60).default_timeout_s == 180.0
    assert Registry(10).default_timeout_s == 30.0
    assert Registry(60, 45.0).default_timeout_s == 45.0


@pytest.mark.parametrize(
    ("registry", "fields", "timeout"),
    [
        (Registry(60), {"heartbeat_interval_seconds": 10}, 30),
        (Registry(60, 45.0), {"heartbeat_interval_seconds": 10}, 30),
        (Registry(60), {}, 180),
        (Registry(60, 45.0), {}, 45),
        (Registry(5), {}, 15),
    ],
)
def test_node_goes_offline_exactly_at_last_seen_plus_its_timeout(
    clock: FakeClock, registry: Registry, fields: dict[str, Any], timeout: float
) -> None:
    start = clock.now()
    registry.register("n1", reg(**fields), start)
    assert registry.next_deadline() == start.mono + timeout

    assert registry.expire(clock.advance(timeout - EPS)) == []
    assert node_of(registry, "n1").status == "online"

    now = clock.advance(EPS)
    assert registry.expire(now) == [
        NodeTransitioned("n1", "offline", "heartbeat_timeout", now.wall, start.wall, "online",
            "microclaw", None)
    ]
    node = node_of(registry, "n1")
    assert (node.status, node.status_reason, node.status_since) == (
        "offline", "heartbeat_timeout", now.wall)
    assert node.last_seen == start.wall
    assert registry.next_deadline() is None


def test_expired_event_carries_the_last_heartbeat_as_last_seen(clock: FakeClock) -> None:
    registry = Registry(10)
    registry.register("n1", reg(), clock.now())
    seen = clock.advance(20)
    registry.heartbeat("n1", hb(status="degraded"), seen)

    (event,) = registry.expire(clock.advance(30))

    assert event == NodeTransitioned(
        "n1", "offline", "heartbeat_timeout", clock.now().wall, seen.wall, "degraded",
            "microclaw", None)


def test_heartbeat_pushes_the_deadline_back(clock: FakeClock) -> None:
    registry = Registry(10)
    registry.register("n1", reg(), clock.now())
    clock.advance(20)
    registry.heartbeat("n1", hb(), clock.now())

    assert registry.expire(clock.advance(20)) == []  # 40 s after registering, 20 s of silence
    assert expired_ids(registry, clock.advance(10)) == ["n1"]


def test_expired_node_is_not_expired_twice(clock: FakeClock) -> None:
    registry = Registry(10)
    registry.register("n1", reg(), clock.now())
    assert expired_ids(registry, clock.advance(30)) == ["n1"]

    assert registry.expire(clock.advance(1000)) == []


def test_reported_offline_node_never_times_out(clock: FakeClock) -> None:
    registry = Registry(10)
    registry.register("n1", reg(), clock.now())
    registry.heartbeat("n1", hb(status="offline"), clock.advance(1))

    assert registry.next_deadline() is None
    assert registry.expire(clock.advance(1000)) == []
    assert node_of(registry, "n1").status_reason == "reported"


def test_node_back_after_a_timeout_gets_a_fresh_deadline(clock: FakeClock) -> None:
    registry = Registry(10)
    registry.register("n1", reg(), clock.now())
    registry.expire(clock.advance(30))
    back = clock.advance(100)

    result = registry.heartbeat("n1", hb(), back)

    assert result.events == [
        NodeTransitioned("n1", "online", "heartbeat", back.wall, back.wall, "offline",
            "microclaw", None)]
    assert registry.next_deadline() == back.mono + 30
    assert registry.expire(clock.advance(30 - EPS)) == []
    assert expired_ids(registry, clock.advance(EPS)) == ["n1"]


def test_reregistering_with_another_interval_moves_the_deadline(clock: FakeClock) -> None:
    registry = Registry(60)
    registry.register("n1", reg(heartbeat_interval_seconds=10), clock.now())
    again = clock.advance(5)
    registry.register("n1", reg(heartbeat_interval_seconds=100), again)

    assert registry.expire(clock.advance(60)) == []
    assert registry.next_deadline() == again.mono + 300


def test_reregistering_without_an_interval_falls_back_to_the_default_timeout(
    clock: FakeClock,
) -> None:
    registry = Registry(60, 45.0)
    registry.register("n1", reg(heartbeat_interval_seconds=100), clock.now())
    again = clock.advance(5)
    registry.register("n1", reg(), again)

    assert registry.next_deadline() == again.mono + 45
    assert expired_ids(registry, clock.advance(45)) == ["n1"]


def test_deleted_node_never_expires(clock: FakeClock) -> None:
    registry = Registry(10)
    registry.register("n1", reg(), clock.now())
    registry.delete("n1", clock.now())

    assert registry.next_deadline() is None
    assert registry.expire(clock.advance(100)) == []


# --- the ingest limit ------------------------------------------------------------------------


def test_expire_never_passes_the_limit(clock: FakeClock) -> None:
    registry = Registry(10)
    start = clock.now()
    registry.register("n1", reg(), start)
    registry.register("n2", reg(), clock.advance(5))
    now = clock.advance(100)

    # A message received at start+30-EPS is still waiting: nothing due after it may expire.
    assert registry.expire(now, limit=start.mono + 30 - EPS) == []
    assert expired_ids(registry, now, limit=start.mono + 30) == ["n1"]
    assert expired_ids(registry, now, limit=start.mono + 35) == ["n2"]


def test_limit_after_now_does_not_expire_ahead_of_now(clock: FakeClock) -> None:
    registry = Registry(10)
    start = clock.now()
    registry.register("n1", reg(), start)

    assert registry.expire(clock.advance(10), limit=start.mono + 1000) == []


# --- grace after start or reconnect ----------------------------------------------------------


def test_grace_gives_every_node_a_full_timeout_from_that_moment(clock: FakeClock) -> None:
    registry = Registry(10)
    start = clock.now()
    registry.register("stale", reg(), start)  # due at +30
    registry.register("recent", reg(), clock.advance(90))  # due at +120
    grace = clock.advance(10)  # +100: the manager reconnects; "stale" is long overdue
    registry.grant_grace(grace)

    assert registry.expire(grace) == []
    assert registry.next_deadline() == grace.mono + 30
    assert registry.expire(clock.advance(30 - EPS)) == []  # not at +120 either
    assert sorted(expired_ids(registry, clock.advance(EPS))) == ["recent", "stale"]


def test_node_heard_after_the_grace_moment_keeps_its_own_deadline(clock: FakeClock) -> None:
    registry = Registry(10)
    registry.register("stale", reg(), clock.now())
    registry.register("fresh", reg(), clock.now())
    grace = clock.advance(100)
    registry.grant_grace(grace)
    registry.heartbeat("fresh", hb(), clock.advance(5))  # heard at grace + 5

    assert registry.expire(clock.advance(25 - EPS)) == []
    assert expired_ids(registry, clock.advance(EPS)) == ["stale"]  # grace + 30
    assert registry.next_deadline() == grace.mono + 35
    assert registry.expire(clock.advance(5 - EPS)) == []
    assert expired_ids(registry, clock.advance(EPS)) == ["fresh"]  # grace + 35


def test_grace_is_a_full_timeout_of_each_node(clock: FakeClock) -> None:
    registry = Registry(60)
    registry.register("slow", reg(heartbeat_interval_seconds=100), clock.now())  # due at +300
    registry.register("fast", reg(heartbeat_interval_seconds=10), clock.now())  # due at +30
    grace = clock.advance(50)
    registry.grant_grace(grace)

    assert registry.next_deadline() == grace.mono + 30
    assert expired_ids(registry, clock.advance(30)) == ["fast"]
    assert registry.next_deadline() == grace.mono + 300
    assert registry.expire(clock.advance(270 - EPS)) == []  # past its own +300
    assert expired_ids(registry, clock.advance(EPS)) == ["slow"]  # grace + 300


# --- many nodes --------------------------------------------------------------------------------


def test_next_deadline_is_the_earliest_over_all_timeouts(clock: FakeClock) -> None:
    registry = Registry(60)
    assert registry.next_deadline() is None
    start = clock.now()
    registry.register("a", reg(heartbeat_interval_seconds=20), start)  # +60
    registry.register("b", reg(heartbeat_interval_seconds=10), clock.advance(1))  # +31
    registry.register("c", reg(heartbeat_interval_seconds=10), clock.advance(1))  # +32
    assert registry.next_deadline() == start.mono + 31

    registry.heartbeat("b", hb(), clock.advance(1))  # b now due at +33
    assert registry.next_deadline() == start.mono + 32

    registry.delete("c", clock.now())
    assert registry.next_deadline() == start.mono + 33


def test_nodes_with_mixed_intervals_expire_in_deadline_order(clock: FakeClock) -> None:
    registry = Registry(60)
    for node_id, interval in (("slow", 20), ("fast", 5), ("mid", 10)):
        registry.register(node_id, reg(heartbeat_interval_seconds=interval), clock.now())

    order: list[str] = []
    for _ in range(60):
        order += expired_ids(registry, clock.advance(1))

    assert order == ["fast", "mid", "slow"]


def test_thousand_nodes_with_mixed_intervals_expire_exactly_when_due(clock: FakeClock) -> None:
    """A reference model (a dict of deadlines) against the registry, step by step."""
    registry = Registry(60)
    rng = random.Random(1234)
    intervals = (5, 10, 20)
    deadline: dict[str, float] = {}
    online: set[str] = set()
    expired_total = 0
    for tick in range(660):  # 0.25 s per tick: 165 s
        now = clock.now()
        if tick < 250:  # register 4 nodes per tick: 1000 nodes over 62.5 s
            for k in range(4):
                number = tick * 4 + k
                node_id = f"node-{number:04d}"
                interval = intervals[number % 3]
                registry.register(node_id, reg(heartbeat_interval_seconds=interval), now)
                deadline[node_id] = now.mono + 3 * interval
                online.add(node_id)
        if tick < 400:  # some nodes, online or already offline, send a heartbeat
            for node_id in rng.sample(sorted(deadline), min(15, len(deadline))):
                registry.heartbeat(node_id, hb(), now)
                deadline[node_id] = now.mono + 3 * node_of(registry, node_id).interval_s
                online.add(node_id)

        events = registry.expire(now)

        due = {node_id for node_id in online if deadline[node_id] <= now.mono}
        assert {e.node_id for e in events} == due, f"tick {tick}"
        assert len(events) == len(due)
        assert all(isinstance(e, NodeTransitioned) and e.reason == "heartbeat_timeout"
                   for e in events)
        online -= due
        expired_total += len(due)
        clock.advance(0.25)

    assert not online
    assert expired_total > 1000  # some came back and timed out again
    assert all(node_of(registry, n).status == "offline" for n in deadline)
    assert registry.next_deadline() is None


# --- messages still waiting to be applied ----------------------------------------------------


def waiting_for(received: dict[str, float]) -> Waiting:
    """A message of each of these nodes, received at that moment, is still queued."""
    return lambda node_id, deadline: received.get(node_id, float("inf")) <= deadline


def test_due_node_with_a_message_waiting_is_held_and_the_others_expire(
    clock: FakeClock,
) -> None:
    registry = Registry(10)
    start = clock.now()
    for node_id in ("n1", "n2", "n3"):
        registry.register(node_id, reg(), start)
    # n2's heartbeat came at its deadline and waits; n3's came after its deadline: too late.
    waiting = waiting_for({"n2": start.mono + 30, "n3": start.mono + 30 + EPS})

    assert [e.node_id for e in registry.expire(clock.advance(40), waiting=waiting)] == [
        "n1", "n3"]
    assert node_of(registry, "n2").status == "online"
    assert registry.expire(clock.advance(10), waiting=waiting) == []  # still waiting


def test_held_node_refreshed_by_its_message_keeps_its_new_deadline(clock: FakeClock) -> None:
    registry = Registry(10)
    start = clock.now()
    registry.register("n1", reg(), start)
    registry.expire(clock.advance(35), waiting=waiting_for({"n1": start.mono + 29}))

    applied = clock.now()
    registry.heartbeat("n1", hb(), applied)

    assert registry.next_deadline() == applied.mono + 30
    assert registry.expire(clock.advance(30 - EPS), waiting=waiting_for({})) == []
    assert expired_ids(registry, clock.advance(EPS)) == ["n1"]
    assert registry.expire(clock.advance(100)) == []


def test_held_node_expires_once_its_message_turned_out_not_to_refresh_it(
    clock: FakeClock,
) -> None:
    registry = Registry(10)
    start = clock.now()
    registry.register("n1", reg(), start)
    registry.register("n2", reg(), clock.advance(1))
    waiting = waiting_for({"n1": start.mono + 29})
    assert expired_ids(registry, clock.advance(40), waiting=waiting) == ["n2"]
    assert registry.next_deadline() == start.mono + 30  # overdue, still scheduled

    # The message was refused (bad payload, rate limit): nothing of n1 waits any more.
    now = clock.advance(0.2)
    assert registry.expire(now, waiting=waiting_for({})) == [
        NodeTransitioned("n1", "offline", "heartbeat_timeout", now.wall, start.wall, "online",
            "microclaw", None)]
    assert registry.next_deadline() is None
    assert registry.expire(clock.advance(100)) == []


@pytest.mark.parametrize("change", ["delete", "report_offline", "register"])
def test_held_node_changed_meanwhile_is_not_lost_nor_expired_twice(
    clock: FakeClock, change: str
) -> None:
    registry = Registry(10)
    start = clock.now()
    registry.register("n1", reg(), start)
    registry.expire(clock.advance(40), waiting=waiting_for({"n1": start.mono}))

    if change == "delete":
        registry.delete("n1", clock.now())
    elif change == "report_offline":
        registry.heartbeat("n1", hb(status="offline"), clock.now())
    else:
        registry.register("n1", reg(heartbeat_interval_seconds=100), clock.now())

    assert registry.expire(clock.advance(1), waiting=waiting_for({})) == []
    if change == "register":
        assert registry.next_deadline() == clock.now().mono - 1 + 300
        assert expired_ids(registry, clock.advance(300)) == ["n1"]
    else:
        assert registry.next_deadline() is None
    assert registry.expire(clock.advance(1000)) == []


def test_held_node_waits_for_a_grace_granted_meanwhile(clock: FakeClock) -> None:
    registry = Registry(10)
    start = clock.now()
    registry.register("n1", reg(), start)
    registry.expire(clock.advance(40), waiting=waiting_for({"n1": start.mono}))
    reconnected = clock.advance(1)
    registry.grant_grace(reconnected)

    assert registry.next_deadline() == reconnected.mono + 30
    assert registry.expire(clock.advance(30 - EPS), waiting=waiting_for({})) == []
    assert expired_ids(registry, clock.advance(EPS)) == ["n1"]


def test_held_nodes_count_against_no_batch_and_expire_within_one(clock: FakeClock) -> None:
    registry = Registry(10)
    start = clock.now()
    for i in range(10):
        registry.register(f"n{i}", reg(), start)
    held = {f"n{i}": start.mono for i in range(0, 10, 2)}

    assert expired_ids(registry, clock.advance(40), waiting=waiting_for(held)) == [
        "n1", "n3", "n5", "n7", "n9"]
    late = clock.advance(1)
    assert [e.node_id for e in registry.expire(late, max_events=3)] == ["n0", "n2", "n4"]
    assert [e.node_id for e in registry.expire(late, max_events=3)] == ["n6", "n8"]
