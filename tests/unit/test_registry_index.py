"""Nodes by status (``Registry.ids_with_status``, ``Registry.count``): the sorted ids and counts
of each status, and by type, stay exact through registrations, heartbeats, status changes,
offline reports, expiry, deletes and a restore, whether or not the index has rebuilt itself."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from fleetmq.core import index
from fleetmq.core.clock import FakeClock
from fleetmq.core.models import STATUSES, Status
from fleetmq.core.registry import Registry
from fleetmq.store.base import node_row, nodes_from_rows
from tests.unit.conftest import hb, reg

TYPES = ("microclaw", "MicroClaw", "picclaw", "nanoclaw")


def expected_ids(registry: Registry, status: Status, after: str | None = None) -> list[str]:
    return [i for i in registry.sorted_ids()
            if (node := registry.get(i)) is not None and node.status == status
            and (after is None or i > after)]


def check(registry: Registry, rng: random.Random) -> None:
    by_type: Counter[tuple[str, str]] = Counter()
    for node_id in registry.ids():
        node = registry.get(node_id)
        assert node is not None
        by_type[node.status, node.type.casefold()] += 1
    assert registry.count() == len(registry)
    for status in STATUSES:
        assert list(registry.ids_with_status(status)) == expected_ids(registry, status)
        after = rng.choice(registry.ids()) if len(registry) else None
        assert list(registry.ids_with_status(status, after)) == expected_ids(
            registry, status, after)
        assert registry.count(status) == len(expected_ids(registry, status))
        for node_type in ("MICROCLAW", "picclaw", "none"):
            assert registry.count(status, node_type) == by_type[status, node_type.casefold()]
    for node_type in ("microclaw", "NanoClaw"):
        assert registry.count(None, node_type) == sum(
            n for (_, t), n in by_type.items() if t == node_type.casefold())


@pytest.fixture(params=["default", "tiny"])
def slack(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The index's thresholds as shipped, and tiny ones so that it rebuilds all the time."""
    if request.param == "tiny":
        monkeypatch.setattr(index, "SLACK", 2)
        monkeypatch.setattr(index, "PENDING_READ", 3)
    return str(request.param)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_ids_and_counts_by_status_follow_every_change(
    slack: str, seed: int, clock: FakeClock
) -> None:
    rng = random.Random(seed)
    registry = Registry(60)
    pool = [f"n{rng.randrange(1000):03d}" for _ in range(120)]
    types: dict[str, str] = {}
    for step in range(600):
        node_id = rng.choice(pool)
        known = registry.get(node_id) is not None
        action = rng.random()
        if not known or action < 0.15:
            node_type = types.get(node_id) if known else rng.choice(TYPES)
            assert node_type is not None
            types[node_id] = node_type
            registry.register(node_id, reg(
                node_type, heartbeat_interval_seconds=rng.choice([1, 2, 5])), clock.now())
        elif action < 0.55:
            registry.heartbeat(node_id, hb(status=rng.choice(["online", "degraded"])),
                               clock.now())
        elif action < 0.7:
            registry.heartbeat(node_id, hb(status="offline"), clock.now())
        elif action < 0.8:
            registry.delete(node_id, clock.now())
            if rng.random() < 0.5:
                types.pop(node_id)  # may come back as another type
        else:
            registry.expire(clock.advance(rng.choice([0.5, 1, 3])))
        if step % 7 == 0:
            check(registry, rng)
    check(registry, rng)


def test_a_mass_expiry_lists_every_node_offline_in_order(slack: str, clock: FakeClock) -> None:
    registry = Registry(60)
    ids = [f"node-{i:05d}" for i in range(3000)]
    for node_id in reversed(ids):
        registry.register(node_id, reg(heartbeat_interval_seconds=1), clock.now())
    assert list(registry.ids_with_status("online")) == ids
    assert len(registry.expire(clock.advance(3))) == 3000
    assert list(registry.ids_with_status("offline")) == ids
    assert list(registry.ids_with_status("online")) == []
    assert (registry.count("offline"), registry.count("online")) == (3000, 0)
    for node_id in ids[::2]:
        registry.heartbeat(node_id, hb(), clock.now())
    assert list(registry.ids_with_status("offline", "node-01000")) == ids[1001::2]
    assert list(registry.ids_with_status("online")) == ids[::2]
    assert registry.count("offline", "MICROCLAW") == 1500


def test_a_reader_gets_each_node_as_it_is_when_reached(clock: FakeClock) -> None:
    registry = Registry(60)
    for i in range(10):
        registry.register(f"n{i}", reg(), clock.now())
    for i in range(10):
        registry.heartbeat(f"n{i}", hb(status="degraded"), clock.now())
    reader = registry.ids_with_status("degraded", "n2")
    assert next(reader) == "n3"
    registry.heartbeat("n4", hb(), clock.now())  # leaves "degraded" before it is reached
    registry.delete("n5", clock.now())
    registry.register("n55", reg(), clock.now())
    registry.heartbeat("n55", hb(status="degraded"), clock.now())  # came after the snapshot
    assert list(reader) == ["n6", "n7", "n8", "n9"]
    assert list(registry.ids_with_status("degraded", "n2")) == [
        "n3", "n55", "n6", "n7", "n8", "n9"]


def test_restore_indexes_every_node_by_its_status(clock: FakeClock) -> None:
    source = Registry(60)
    for i in range(50):
        source.register(f"n{i:02d}", reg(TYPES[i % 4]), clock.now())
        if i % 3 == 0:
            source.heartbeat(f"n{i:02d}", hb(status="offline"), clock.now())
        elif i % 3 == 1:
            source.heartbeat(f"n{i:02d}", hb(status="degraded"), clock.now())
    restored = Registry(60)
    restored.restore(source.get(i) for i in reversed(source.ids()))  # type: ignore[misc]
    for status in STATUSES:
        assert list(restored.ids_with_status(status)) == list(source.ids_with_status(status))
        for node_type in TYPES:
            assert restored.count(status, node_type) == source.count(status, node_type)
    check(restored, random.Random(0))
    restored.register("n00", reg("microclaw"), clock.now())
    assert "n00" in list(restored.ids_with_status("online"))
    assert "n00" not in list(restored.ids_with_status("offline"))


def test_a_standby_following_the_store_matches_the_active(clock: FakeClock) -> None:
    """``Registry.follow`` (contract section 10): what the active stored, node by node,
    replaces what the standby knew; deleted nodes go; counts, ids and deadlines stay exact."""
    active, standby = Registry(60), Registry(60)
    for i in range(30):
        active.register(f"n{i:02d}", reg(TYPES[i % 4]), clock.now())
    standby.restore(nodes_from_rows([node_row(active.get(i))  # type: ignore[arg-type]
                                     for i in active.ids()], clock.now()))
    changed = ["n00", "n01", "n02", "n40"]
    active.heartbeat("n00", hb(status="offline"), clock.now())
    active.heartbeat("n01", hb(status="degraded", reason="hot"), clock.now())
    active.delete("n02", clock.now())
    active.register("n40", reg("picclaw"), clock.now())
    rows = [node_row(node) for i in changed if (node := active.get(i)) is not None]
    gone = [i for i in changed if active.get(i) is None]
    standby.follow(nodes_from_rows(rows, clock.now()), gone)

    assert sorted(standby.ids()) == sorted(active.ids())
    for status in STATUSES:
        assert list(standby.ids_with_status(status)) == list(active.ids_with_status(status))
        for node_type in TYPES:
            assert standby.count(status, node_type) == active.count(status, node_type)
    followed = standby.get("n01")
    assert followed is not None
    assert (followed.status, followed.status_reason) == ("degraded", "hot")
    offline = standby.get("n00")
    assert offline is not None
    assert offline.deadline is None  # offline: nothing to expire
    check(standby, random.Random(1))
    # Following the same change again changes nothing; a deletion of an unknown id is a no-op.
    standby.follow(nodes_from_rows(rows, clock.now()), ["n02", "never-there"])
    assert sorted(standby.ids()) == sorted(active.ids())
    check(standby, random.Random(2))
    # After a takeover the standby is the registry that changes, as any other.
    standby.heartbeat("n00", hb(), clock.now())
    assert "n00" in list(standby.ids_with_status("online"))
