"""Registry memory: resident bytes per node with 100,000 and 1,000,000 registered nodes.

In-process and without sockets: each fleet size is measured in a fresh child process, which
parses one registration per node with ``RegisterRequest.model_validate_json`` (as the server
does) and feeds it to a ``Registry``. Every node has its own id, location, capabilities and
metadata values shaped like the contract's example registration, so no string is shared between
nodes. RSS (from /proc/self/statm, after ``gc.collect()``) is read before and after each stage:

- registered: the registry alone;
- + views cached: each node's REST JSON (``views.node_json``), as the server keeps it after a GET;
- + telemetry: one heartbeat per node with its own counter values, then the views again.

    python bench/memory.py --nodes 100000 1000000
"""

from __future__ import annotations

import argparse
import gc
import multiprocessing as mp
import os
import sys
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import machine, print_table, write_result
from fleetmq.core.clock import FakeClock
from fleetmq.core.models import HeartbeatRequest, RegisterRequest
from fleetmq.core.registry import Node, Registry
from fleetmq.views import node_json

TARGET_BYTES = 1024


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def settled_rss() -> int:
    gc.collect()
    return rss_bytes()


REGISTER_BODY = (
    b'{"node_id": "microclaw-esp32-%08x", "node_type": "microclaw", '
    b'"capabilities": ["dht22-%d", "mqtt-%d"], "location": "office-floor-%d-desk-%d", '
    b'"metadata": {"gateway": "nanoclaw-pi-%06d", "firmware": "v1.0.%d"}, '
    b'"heartbeat_interval_seconds": 60}'
)


def register_body(i: int) -> bytes:
    """The contract's example registration, with values of this node's own."""
    return REGISTER_BODY % (i, i, i, i % 50, i, i, i)


def heartbeat_body(i: int) -> bytes:
    return b'{"uptime_seconds": %d, "free_memory_kb": %d, "sensors_active": %d}' % (
        86_400 + i, 200_000 + i, 1000 + i)


def cache_view(node: Node, exact: bool) -> int:
    view = node_json(node)
    if exact:
        # The proposed fix: orjson returns its output in a buffer of about 4 KiB shrunk in
        # place, and the malloc chunk keeps the rest; an exact-size copy holds only the bytes.
        view = node.view = bytes(memoryview(view))
    return len(view)


def measure(nodes: int, exact_views: bool, out: Connection) -> None:
    """Runs in a child process, so each fleet size starts from a clean heap."""
    clock = FakeClock()
    registry = Registry(60)
    gc.freeze()  # the imports' objects: keep them out of every later collection
    before = settled_rss()
    started = time.perf_counter()
    for i in range(nodes):
        req = RegisterRequest.model_validate_json(register_body(i))
        assert req.node_id is not None
        registry.register(req.node_id, req, clock.now())
    register_s = time.perf_counter() - started
    del req
    registered = settled_rss()
    ids = registry.sorted_ids()  # the server keeps this index once anyone lists the fleet
    sized = settled_rss()
    views = 0
    for node_id in ids:
        node = registry.get(node_id)
        assert node is not None
        views += cache_view(node, exact_views)
    with_views = settled_rss()
    for i in range(nodes):
        registry.heartbeat(f"microclaw-esp32-{i:08x}",
                           HeartbeatRequest.model_validate_json(heartbeat_body(i)), clock.now())
    for node_id in ids:
        node = registry.get(node_id)
        assert node is not None
        cache_view(node, exact_views)
    with_telemetry = settled_rss()
    out.send({
        "nodes": nodes,
        "exact_views": exact_views,
        "register_per_s": nodes / register_s,
        "registered": registered - before,
        "sorted_index": sized - registered,
        "views": with_views - sized,
        "view_bytes_avg": views / nodes,
        "telemetry": with_telemetry - with_views,
        "total_with_views": with_views - before,
        "total_with_telemetry": with_telemetry - before,
    })
    out.close()


def run_child(nodes: int, exact_views: bool) -> dict[str, Any]:
    ctx = mp.get_context("spawn")  # a fresh interpreter: no heap left over from the parent
    receiver, sender = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=measure, args=(nodes, exact_views, sender))
    proc.start()
    sender.close()
    try:
        result: dict[str, Any] = receiver.recv()
    finally:
        proc.join(60)
        if proc.is_alive():
            proc.kill()
            proc.join()
    return result


def per_node(total: int, nodes: int) -> str:
    return f"{total / nodes:,.0f} B"


def breakdown() -> list[tuple[str, int]]:
    """Where one node's bytes go (object sizes, before allocator overhead)."""
    registry = Registry(60)
    clock = FakeClock()
    for i in range(2):
        req = RegisterRequest.model_validate_json(register_body(i))
        assert req.node_id is not None
        registry.register(req.node_id, req, clock.now())
    node = registry.get("microclaw-esp32-00000001")
    assert node is not None
    view = node_json(node)
    floats = (node.registered_at, node.last_seen, node.seen_mono, node.status_since,
              node.deadline)
    return [
        ("Node object (slots)", sys.getsizeof(node)),
        ("id", sys.getsizeof(node.id)),
        ("capabilities (JSON text)", sys.getsizeof(node.capabilities_json)),
        ("location", sys.getsizeof(node.location)),
        ("metadata (JSON text)", sys.getsizeof(node.metadata_json)),
        ("floats (distinct among registered_at, last_seen, seen_mono, status_since, "
         "deadline)", sum(sys.getsizeof(f) for f in {id(f): f for f in floats}.values())),
        ("REST view (bytes object)", sys.getsizeof(view)),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--fix", choices=("smallest", "all", "none"), default="smallest",
                        help="fleet sizes also measured with exact-size view copies (the "
                             "proposed fix); default: the smallest only, to keep the run short")
    args = parser.parse_args()
    runs = [(n, False) for n in args.nodes]
    if args.fix != "none":
        runs += [(n, True) for n in (args.nodes if args.fix == "all" else [min(args.nodes)])]
    results = [run_child(n, exact) for n, exact in runs]

    print(f"machine: {os.cpu_count()} cores, python {sys.version.split()[0]}")
    print("bytes of RSS per node (one registration each, no shared strings; "
          f"target <= {TARGET_BYTES} B with the view cached)\n")
    header = ("nodes", "views as", "registered", "+ sorted index", "+ view cached",
              "= total", "+ telemetry", "= total", "target", "register/s")
    rows: list[tuple[str, ...]] = []
    for r in results:
        n = r["nodes"]
        ok = r["total_with_views"] / n <= TARGET_BYTES
        rows.append((
            f"{n:,}", "exact copy (fix)" if r["exact_views"] else "orjson (today)",
            per_node(r["registered"], n), per_node(r["sorted_index"], n),
            per_node(r["views"], n) + f" ({r['view_bytes_avg']:.0f} B JSON)",
            per_node(r["total_with_views"], n), per_node(r["telemetry"], n),
            per_node(r["total_with_telemetry"], n), "met" if ok else "MISSED",
            f"{r['register_per_s']:,.0f}",
        ))
    print_table(header, rows)

    parts = breakdown()
    print("\nwhere one node's bytes go (sys.getsizeof, before allocator and index overhead)\n")
    print_table(("part", "bytes"), [(name, f"{size:,}") for name, size in parts])

    write_result("memory", {
        "machine": machine(),
        "target_bytes_per_node": TARGET_BYTES,
        "results": results,
        "breakdown_bytes": dict(parts),
    })


if __name__ == "__main__":
    main()
