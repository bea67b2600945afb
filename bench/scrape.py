"""What a ``GET /metrics`` scrape costs the manager: rendering its collector registry (the node
gauges by status, every counter) with 10 nodes and with 1,000,000, in-process.

The registry is filled through ``Registry.register`` and a third of the nodes are then made
degraded or offline by heartbeats, so the index by status has had real changes. Each render is
the same call the route makes (``fleetmq.metrics.render``), timed with ``time.perf_counter``
after a warm-up; the table gives the median and the worst of ``--rounds`` renders.

    python bench/scrape.py --nodes 1000000
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import machine, print_table, write_result
from fleetmq.core.clock import FakeClock
from fleetmq.core.models import HeartbeatRequest, RegisterRequest
from fleetmq.core.registry import Registry
from fleetmq.metrics import Metrics, Readings, exposition, render

REQUEST = RegisterRequest.model_validate_json(b'{"node_type": "microclaw"}')
DEGRADED = HeartbeatRequest.model_validate({"status": "degraded", "reason": "hot"})
OFFLINE = HeartbeatRequest.model_validate({"status": "offline", "reason": "bye"})


def fleet(nodes: int) -> Registry:
    clock = FakeClock()
    registry = Registry(60)
    now = clock.now()
    for i in range(nodes):
        registry.register(f"node-{i:07d}", REQUEST, now)
    for i in range(0, nodes, 3):
        registry.heartbeat(f"node-{i:07d}", DEGRADED if i % 2 else OFFLINE, now)
    return registry


def timed(registry: Registry, rounds: int) -> tuple[float, float, int]:
    """Median and worst render time (µs), and the size of the text."""
    scrape = exposition(Metrics(), Readings(nodes=registry.count, connected=lambda: True,
                                            backlog=lambda: 0))
    text = render(scrape)
    for _ in range(50):
        render(scrape)
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        render(scrape)
        times.append((time.perf_counter() - start) * 1e6)
    return statistics.median(times), max(times), len(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=2000)
    args = parser.parse_args()
    print(machine())
    rows: list[tuple[str, ...]] = []
    results = []
    for nodes in (10, args.nodes):
        started = time.perf_counter()
        registry = fleet(nodes)
        built = time.perf_counter() - started
        median, worst, size = timed(registry, args.rounds)
        counts = "/".join(f"{registry.count(s):,}" for s in ("online", "degraded", "offline"))
        results.append({"nodes": nodes, "render_p50_us": median, "render_max_us": worst,
                         "bytes": size})
        rows.append((f"{nodes:,}", counts, f"{median:,.0f}", f"{worst:,.0f}", f"{size:,}",
                     f"{built:.1f}"))
    print_table(("nodes", "online/degraded/offline", "render p50 (µs)", "max (µs)",
                 "bytes", "fleet built in (s)"), rows)
    write_result("scrape", {"machine": machine(), "rounds": args.rounds, "results": results})


if __name__ == "__main__":
    main()
