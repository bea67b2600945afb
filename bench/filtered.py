"""Filtered lists and counts on a large fleet: how long ``GET /nodes?status=...&limit=...``
takes on the real ``fleetmq serve`` (goal, issue 9: milliseconds at any fleet size, O(limit)
rather than O(matches)).

The store (SQLite) is filled directly with ``--nodes`` nodes shaped like startup.py's, a share
of them offline, then a manager starts on it against a Mosquitto of the bench's own; each query
is timed ``--repeat`` times over one kept-alive HTTP connection (the first answer, which builds
the sorted ids, is left out and shown apart) once the start-up republish of every status is
done.

    python bench/filtered.py [--nodes 1000000] [--offline 0.2 1.0] [--repeat 20]
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    PINNING,
    add_pin_option,
    machine,
    metric,
    print_table,
    start_manager,
    stop_process,
    wait_for,
    write_result,
)
from bench.startup import fill
from tests.support import Mosquitto

QUERIES = (
    ("status=offline&limit=1", "offline, limit 1"),
    ("status=offline&limit=100", "offline, limit 100"),
    ("status=offline&limit=100&after=microclaw-esp32-00080000", "offline, limit 100, after"),
    ("status=offline&node_type=MICROCLAW&limit=1", "offline + type, limit 1"),
    ("status=online&limit=1", "online, limit 1"),
    ("status=degraded&limit=1", "degraded (none), limit 1"),
    ("status=offline&location=office-floor-0-desk-0&limit=1", "offline + location, limit 1"),
)


def timed_get(conn: http.client.HTTPConnection, path: str) -> tuple[float, dict[str, object]]:
    started = time.perf_counter()
    conn.request("GET", path)
    response = conn.getresponse()
    body = response.read()
    elapsed = time.perf_counter() - started
    if response.status != 200:
        raise RuntimeError(f"GET {path}: {response.status} {body[:200]!r}")
    return elapsed, json.loads(body)


def measure(http_port: int, repeat: int) -> list[dict[str, object]]:
    # After start the manager republishes every node's status: wait until it is done, so
    # that the figures are the queries' own.
    wait_for(lambda: metric(http_port, "fleetmq_mqtt_backlog") == 0, 600, "republish done")
    conn = http.client.HTTPConnection("127.0.0.1", http_port, timeout=120)
    first, _ = timed_get(conn, "/api/v1/fleet/nodes?limit=1")
    rows: list[dict[str, object]] = [{"query": "limit=1 (first read)", "first_ms": first * 1e3}]
    for query, label in QUERIES:
        path = f"/api/v1/fleet/nodes?{query}"
        times = []
        doc: dict[str, object] = {}
        for _ in range(repeat):
            elapsed, doc = timed_get(conn, path)
            times.append(elapsed * 1e3)
        times.sort()
        rows.append({"query": label, "path": path, "total": doc["total"],
                     "count": doc["count"], "p50_ms": statistics.median(times),
                     "max_ms": times[-1]})
    conn.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=1_000_000)
    parser.add_argument("--offline", type=float, nargs="+", default=[0.2, 1.0],
                        help="shares of the fleet that are offline, one run each")
    parser.add_argument("--repeat", type=int, default=20)
    add_pin_option(parser)
    args = parser.parse_args()
    PINNING.start(args.pin)
    results = []
    with tempfile.TemporaryDirectory(prefix="fleetmq-bench-filtered-") as tmp:
        workdir = Path(tmp)
        broker = Mosquitto(workdir)
        broker.start()
        try:
            for share in args.offline:
                url = f"sqlite:///{workdir / f'filtered-{share}.db'}"
                asyncio.run(fill(url, args.nodes, share))
                proc, http_port = start_manager(broker.url, f"filtered{round(share * 100)}",
                                                workdir=workdir, store=url)
                try:
                    rows = measure(http_port, args.repeat)
                finally:
                    stop_process(proc)
                results.append({"nodes": args.nodes, "offline_share": share, "rows": rows})
        finally:
            broker.stop()
    print(f"\n{args.nodes:,} nodes (SQLite, loaded at start); {args.repeat} GETs per query, "
          f"one kept-alive connection; pinned: {PINNING.describe()}\n")
    table = []
    for result in results:
        offline = f"{round(float(result['offline_share']) * args.nodes):,}"
        for row in result["rows"]:
            if "first_ms" in row:
                table.append((offline, str(row["query"]), "", "", f"{row['first_ms']:.1f}", ""))
                continue
            table.append((offline, str(row["query"]), f"{row['total']:,}", str(row["count"]),
                          f"{row['p50_ms']:.1f}", f"{row['max_ms']:.1f}"))
    print_table(("offline", "query", "total", "count", "p50 ms", "max ms"), table)
    write_result("filtered", {"machine": machine(), "results": results})


if __name__ == "__main__":
    main()
