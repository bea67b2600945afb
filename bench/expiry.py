"""Offline detection at scale: how late 1,000,000 silent nodes turn offline, and at what CPU cost.

In-process and without sockets. Nodes register with deadlines spread over a minute (and, as a
worst case, all at one moment, as after a reconnect's grace), then stay silent. The manager's
expiry loop is replayed on a ``FakeClock``: sleep ``EXPIRY_TICK_S`` (0.2 s), then expire in
batches of ``EXPIRY_BATCH`` (10,000) through the real ``Fleet`` (registry, counters, the
publisher's status queue) until a batch comes back short. Each ``expire()`` call is timed with
``time.process_time`` and the fake clock moves on by that CPU time, so a slow pass delays the
next tick as it would in the real loop. An offline transition's lateness is the moment its batch
finished minus its deadline (``last_seen + timeout``); the contract allows 1 s.

    python bench/expiry.py --nodes 1000000 --spread 60
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import machine, print_table, write_result
from fleetmq.app import EXPIRY_BATCH, EXPIRY_TICK_S, IN_HAND_MARGIN_S
from fleetmq.core.clock import FakeClock, Instant
from fleetmq.core.events import Event, NodeTransitioned
from fleetmq.core.models import RegisterRequest
from fleetmq.core.registry import Registry
from fleetmq.core.topics import Topics
from fleetmq.fleet import Fleet
from fleetmq.heap import Heap
from fleetmq.metrics import Metrics
from fleetmq.mqtt.publisher import Publisher
from fleetmq.rates import NodeRates
from fleetmq.store.writer import StoreWriter

TARGET_P99_S = 1.0
MONO0 = 1000.0
WALL0 = 1_771_230_600.0
# No heartbeat_interval_seconds: a node declaring one gets 3 x its interval, not --timeout.
REQUEST = RegisterRequest.model_validate_json(
    b'{"node_type": "microclaw", "capabilities": ["dht22", "mqtt"], '
    b'"location": "office-floor-2"}')


class RecordingPublisher(Publisher):
    """The real status queue, which also keeps each batch's events for the lateness count."""

    def __init__(self, registry: Registry, metrics: Metrics) -> None:
        super().__init__(link=None, topics=Topics("bench"), registry=registry,  # type: ignore[arg-type]  # never publishes here
                         metrics=metrics)
        self.batch: list[Event] = []

    def on_events(self, events: list[Event]) -> None:
        super().on_events(events)
        self.batch = events


@dataclass
class Outcome:
    scenario: str
    nodes: int
    spread_s: float
    lateness_s: list[float]
    cpu_s: float
    simulated_s: float
    ticks: int
    calls: int
    max_call_cpu_s: float
    max_pass_cpu_s: float

    def pct(self, q: float) -> float:
        ordered = self.lateness_s
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    def summary(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario, "nodes": self.nodes, "spread_s": self.spread_s,
            "expired": len(self.lateness_s),
            "lateness_p50_s": self.pct(0.50), "lateness_p99_s": self.pct(0.99),
            "lateness_max_s": self.lateness_s[-1],
            "cpu_s": self.cpu_s, "simulated_s": self.simulated_s,
            "cpu_s_per_simulated_s": self.cpu_s / self.simulated_s,
            "ticks": self.ticks, "expire_calls": self.calls,
            "max_call_cpu_s": self.max_call_cpu_s, "max_pass_cpu_s": self.max_pass_cpu_s,
        }


def run(scenario: str, nodes: int, spread_s: float, timeout_s: float) -> Outcome:
    registry = Registry(60, timeout_s)
    step = spread_s / nodes
    for i in range(nodes):
        at = i * step
        registry.register(f"node-{i:07d}", REQUEST, Instant(MONO0 + at, WALL0 + at))
    first_deadline = MONO0 + timeout_s
    # As the running manager does once its fleet has grown: the nodes leave the cyclic GC.
    Heap().settle(len(registry))

    start = first_deadline - 1.0
    clock = FakeClock(wall=WALL0 + (start - MONO0), mono=start)
    metrics = Metrics()
    publisher = RecordingPublisher(registry, metrics)
    # As with the default SQLite store: expire() queues each transition for the next commit
    # (dirty node, history event); the commits run in a task of their own, not measured here.
    writer = StoreWriter(store=None, registry=registry,  # type: ignore[arg-type]  # never flushed here
                         monotonic=clock.monotonic)
    fleet = Fleet(registry, clock, publisher, metrics, writer, NodeRates(1e6, 1_000_000))
    lateness: list[float] = []
    cpu = max_call = max_pass = 0.0
    ticks = calls = 0
    pass_cpu = 0.0
    while len(lateness) < nodes:
        # The loop sleeps a tick after the previous pass ended: the pass's CPU time delays it.
        clock.advance(EXPIRY_TICK_S)
        ticks += 1
        pass_cpu = 0.0
        while True:
            limit = clock.now().mono - IN_HAND_MARGIN_S  # nothing queued: the in-hand margin
            publisher.batch = []
            began = time.process_time()
            expired = fleet.expire(limit, EXPIRY_BATCH)
            spent = time.process_time() - began
            calls += 1
            pass_cpu += spent
            max_call = max(max_call, spent)
            done_at = clock.advance(spent).mono
            for event in publisher.batch:
                assert isinstance(event, NodeTransitioned)
                index = int(event.node_id[5:])
                lateness.append(done_at - (MONO0 + index * step + timeout_s))
            if expired < EXPIRY_BATCH:
                break
        cpu += pass_cpu
        max_pass = max(max_pass, pass_cpu)
    lateness.sort()
    return Outcome(scenario, nodes, spread_s, lateness, cpu, clock.now().mono - start, ticks,
                   calls, max_call, max_pass)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=1_000_000)
    parser.add_argument("--spread", type=float, default=60.0,
                        help="seconds over which the deadlines are spread (default: 60)")
    parser.add_argument("--timeout", type=float, default=180.0,
                        help="each node's timeout in seconds (default: 180, 3 x 60)")
    parser.add_argument("--skip-burst", action="store_true",
                        help="skip the worst case of every deadline at one moment")
    args = parser.parse_args()
    scenarios = [(f"deadlines over {args.spread:g} s", args.spread)]
    if not args.skip_burst:
        scenarios.append(("all deadlines at once", 0.0))
    outcomes = [run(name, args.nodes, spread, args.timeout) for name, spread in scenarios]

    print(f"machine: {os.cpu_count()} cores, python {sys.version.split()[0]}")
    print(f"{args.nodes:,} silent nodes; expiry tick {EXPIRY_TICK_S:g} s, batch "
          f"{EXPIRY_BATCH:,}, in-hand margin {IN_HAND_MARGIN_S:g} s; "
          f"target: p99 lateness <= {TARGET_P99_S:g} s\n")
    header = ("scenario", "late p50", "late p99", "late max", "target", "expiry CPU",
              "CPU s / sim s", "longest call", "longest pass", "ticks", "calls")
    rows: list[tuple[str, ...]] = []
    for o in outcomes:
        s = o.summary()
        rows.append((
            o.scenario, f"{s['lateness_p50_s']:.3f} s", f"{s['lateness_p99_s']:.3f} s",
            f"{s['lateness_max_s']:.3f} s",
            "met" if s["lateness_p99_s"] <= TARGET_P99_S else "MISSED",
            f"{o.cpu_s:.2f} s", f"{s['cpu_s_per_simulated_s']:.3f}",
            f"{o.max_call_cpu_s * 1000:.1f} ms", f"{o.max_pass_cpu_s * 1000:.0f} ms",
            f"{o.ticks:,}", f"{o.calls:,}",
        ))
    print_table(header, rows)

    write_result("expiry", {
        "machine": machine(),
        "tick_s": EXPIRY_TICK_S, "batch": EXPIRY_BATCH, "in_hand_margin_s": IN_HAND_MARGIN_S,
        "target_p99_s": TARGET_P99_S,
        "results": [o.summary() for o in outcomes],
    })


if __name__ == "__main__":
    main()
