"""Memory and registration rate of the real ``fleetmq serve`` as a fleet grows (issue 9: a
million nodes in at most 1 GiB RSS after registering over MQTT and reading the whole fleet once;
registrations over MQTT at least 20,000/s up to 1,000,000 nodes).

A manager (``--store memory://`` by default, MQTT 3.1.1 by default) runs against a Mosquitto of
the bench's own; one client registers ``--nodes`` nodes over MQTT (QoS 1, the example
registration of the contract, distinct ids). The manager's RSS (/proc) and the registrations
applied (``fleetmq_nodes``) are sampled while they arrive; the rate is given per slice of the
fleet. Once every status is out, the whole fleet is read once over REST (streamed, discarded)
and the RSS read again.

    python bench/serve_memory.py [--nodes 1000000] [--store memory://] [--mqtt-version 3.1.1]
                                 [--publishers 1]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    PINNING,
    add_pin_option,
    machine,
    metric,
    print_rows,
    print_table,
    start_manager,
    stop_process,
    wait_for,
    write_result,
)
from bench.ingest import register
from bench.startup import rss_mb
from tests.support import Mosquitto

TARGET_MB = 1024


def read_fleet(http_port: int) -> tuple[int, float]:
    """GET the whole fleet, discarding the bytes; returns (bytes, seconds)."""
    started = time.monotonic()
    size = 0
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/api/v1/fleet/nodes",
                                timeout=600) as resp:
        while chunk := resp.read(1 << 20):
            size += len(chunk)
    return size, time.monotonic() - started


def rate_by_slice(samples: list[tuple[float, float, float]], nodes: int,
                  count: int) -> list[tuple[str, str]]:
    """Registrations/s within each of ``count`` slices of the fleet, from the samples."""
    slices = []
    step = nodes / count
    for k in range(count):
        low, high = k * step, (k + 1) * step
        inside = [(t, n) for t, n, _ in samples if low <= n <= high]
        if inside:  # up to the first sample at the slice's highest count, not the wait after
            top = max(n for _, n in inside)
            inside = inside[:next(i for i, (_, n) in enumerate(inside) if n == top) + 1]
        if len(inside) >= 2 and inside[-1][0] > inside[0][0]:
            (t0, n0), (t1, n1) = inside[0], inside[-1]
            slices.append((f"{int(low):,} - {int(high):,}", f"{(n1 - n0) / (t1 - t0):,.0f}"))
        else:
            slices.append((f"{int(low):,} - {int(high):,}", "-"))
    return slices


def main() -> None:  # noqa: PLR0915  (one run, told in order)
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=1_000_000)
    parser.add_argument("--store", default="memory://")
    parser.add_argument("--mqtt-version", default="3.1.1", choices=["3.1.1", "5"])
    parser.add_argument("--publishers", type=int, default=1,
                        help="registering processes (one paho client each)")
    parser.add_argument("--slices", type=int, default=5,
                        help="the registration rate is given for this many slices of the fleet")
    add_pin_option(parser)
    args = parser.parse_args()
    PINNING.start(args.pin)
    samples: list[tuple[float, float, float]] = []  # (seconds, nodes, RSS MB)
    with tempfile.TemporaryDirectory(prefix="fleetmq-bench-serve-memory-") as tmp:
        broker = Mosquitto(Path(tmp))
        broker.start()
        try:
            proc, http_port = start_manager(broker.url, "servemem", "--mqtt-version",
                                            args.mqtt_version, workdir=Path(tmp),
                                            store=args.store)
            try:
                idle_mb = rss_mb(proc.pid)
                stop = threading.Event()
                started = time.monotonic()

                def sample() -> None:
                    while not stop.is_set():
                        try:
                            nodes = metric(http_port, "fleetmq_nodes")
                        except OSError:
                            nodes = samples[-1][1] if samples else 0.0
                        samples.append((time.monotonic() - started, nodes, rss_mb(proc.pid)))
                        time.sleep(0.5)

                sampler = threading.Thread(target=sample, daemon=True)
                sampler.start()
                try:
                    rate, done, dropped = register(broker.port, http_port, "servemem", args.nodes,
                                                    publishers=args.publishers)
                finally:
                    stop.set()
                    sampler.join()
                wait_for(lambda: metric(http_port, "fleetmq_mqtt_backlog") == 0, 600,
                         "statuses out")
                time.sleep(2)
                registered_mb = rss_mb(proc.pid)
                size, read_s = read_fleet(http_port)
                time.sleep(1)
                read_mb = rss_mb(proc.pid)
            finally:
                stop_process(proc)
        finally:
            broker.stop()
    slices = rate_by_slice(samples, args.nodes, args.slices)
    peak_mb = max((mb for _, _, mb in samples), default=0.0)
    print()
    print_rows([
        ("machine", f"{machine()['cores']} cores, python {machine()['python']}, pinned: "
                    f"{PINNING.describe()}"),
        ("manager", f"fleetmq serve --store {args.store} --mqtt-version {args.mqtt_version}"),
        ("nodes registered over MQTT", f"{args.nodes:,} from {args.publishers} processes "
                                       f"({rate:,.0f} registrations/s overall)"),
        ("stored, replied to and published", f"{done:,.0f}/s overall, {dropped:,} replies "
                                             "dropped"),
        ("RSS idle", f"{idle_mb:,.0f} MB"),
        ("RSS registered (statuses out)",
         f"{registered_mb:,.0f} MB ({registered_mb * 2**20 / args.nodes:,.0f} B per node; "
         f"peak while registering {peak_mb:,.0f} MB)"),
        ("whole fleet read once", f"{size / 1e6:,.0f} MB in {read_s:.1f} s"),
        ("RSS after the read",
         f"{read_mb:,.0f} MB ({read_mb * 2**20 / args.nodes:,.0f} B per node); target "
         f"<= {TARGET_MB:,} MB: {'met' if read_mb <= TARGET_MB else 'MISSED'}"),
    ])
    print()
    print_table(("nodes (slice)", "registrations/s"), slices)
    write_result("serve_memory", {
        "machine": machine(), "nodes": args.nodes, "store": args.store,
        "mqtt_version": args.mqtt_version, "rate": rate, "done": done, "dropped": dropped,
        "idle_mb": idle_mb,
        "registered_mb": registered_mb, "read_mb": read_mb, "peak_mb": peak_mb,
        "read_bytes": size, "read_s": read_s, "slices": slices, "samples": samples})


if __name__ == "__main__":
    main()
