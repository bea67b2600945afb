"""What the write path logs: a mass expiry is summarised, a lone expiry is logged at once."""

from __future__ import annotations

import logging

import pytest

from fleetmq.config import BrokerSettings
from fleetmq.core.clock import FakeClock
from fleetmq.core.registry import Registry
from fleetmq.core.topics import Topics
from fleetmq.fleet import EXPIRED_LOG_EVERY_S, Fleet
from fleetmq.metrics import Metrics
from fleetmq.mqtt.link import MqttLink
from fleetmq.mqtt.publisher import Publisher
from fleetmq.rates import NodeRates
from fleetmq.store.memory import MemoryStore
from fleetmq.store.writer import StoreWriter
from tests.unit.conftest import reg

TIMEOUT_S = 60.0
TICK_S = 0.2


def make_fleet(clock: FakeClock) -> Fleet:
    registry = Registry(TIMEOUT_S / 3)  # a node's timeout: three heartbeat intervals
    metrics = Metrics()
    link = MqttLink(BrokerSettings(port=1), "fleetmq-test-out", subscriptions=[], will=None,
                   monotonic=clock.monotonic)
    publisher = Publisher(link, Topics("fleet"), registry, metrics)
    writer = StoreWriter(MemoryStore(), registry, clock.monotonic)
    return Fleet(registry, clock, publisher, metrics, writer, NodeRates(100.0, 100))


def expired_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    lines = [r.getMessage() for r in caplog.records
             if r.name == "fleetmq.fleet" and r.getMessage().startswith("nodes_expired")]
    caplog.clear()
    return lines


def test_a_mass_expiry_logs_a_line_per_interval_and_the_rest_at_its_end(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="fleetmq.fleet")
    clock = FakeClock()
    fleet = make_fleet(clock)
    # 100 nodes a tick for 15 s of ticks: each pass expires 100 (a wave spread over 15 s).
    ticks = int(15 / TICK_S)
    for tick in range(ticks):
        for i in range(100):
            fleet.register(f"n-{tick}-{i}", reg())
        clock.advance(TICK_S)
    clock.advance(TIMEOUT_S - ticks * TICK_S)

    lines = []
    for _ in range(ticks):
        assert fleet.expire(None) == 100
        lines += expired_lines(caplog)
        clock.advance(TICK_S)
    # The first pass at once, then one line per EXPIRED_LOG_EVERY_S, not one per pass.
    assert lines[0] == "nodes_expired count=100"
    assert len(lines) == 1 + int(ticks * TICK_S / EXPIRED_LOG_EVERY_S)
    assert fleet.expire(None) == 0  # the wave is over: what was not logged yet is, now
    lines += expired_lines(caplog)
    assert sum(int(line.rsplit("=", 1)[1]) for line in lines) == ticks * 100
    assert fleet.expire(None) == 0
    assert expired_lines(caplog) == []  # nothing to say, nothing said


def test_a_lone_expiry_after_a_quiet_spell_is_logged_at_once(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="fleetmq.fleet")
    clock = FakeClock()
    fleet = make_fleet(clock)
    for node_id in ("a", "b"):
        fleet.register(node_id, reg())
        clock.advance(TIMEOUT_S + EXPIRED_LOG_EVERY_S)
        assert fleet.expire(None) == 1
        assert expired_lines(caplog) == ["nodes_expired count=1"]
