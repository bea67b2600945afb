"""The watch stream's cost and delay (issue 10): MQTT ingest with 100 watch clients connected
against none, and how soon a watch client sees a transition at 10,000 heartbeats/s.

1. Ingest: bench/ingest.py's run (nodes registered over MQTT, then heartbeats from publisher
   processes, the applied rate from /metrics), on a fresh ``fleetmq serve`` with no watcher,
   then on another with ``--watchers`` streams of ``GET /api/v1/fleet/watch`` held open by a
   process of their own (on the load's cores), each reading every event.
2. Delay: bench/lag.py's load (background heartbeats at ``--rate``, probe nodes flipping
   between degraded and online, each flip a transition) with one watch client that times each
   probe from its publish to its event on the stream (the event is streamed once committed,
   so the store's commit is inside the figure).

    python bench/watch.py [--nodes 100000] [--messages 400000] [--watchers 100]
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import multiprocessing as mp
import os
import sys
import tempfile
import threading
import time
from multiprocessing.synchronize import Event as MpEvent
from pathlib import Path
from typing import Any

import aiohttp
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import lag
from bench.common import (
    PINNING,
    add_pin_option,
    machine,
    print_rows,
    start_manager,
    stop_process,
    wait_for,
    write_result,
)
from bench.ingest import applied, register
from tests.support import Mosquitto

WATCH_PATH = "/api/v1/fleet/watch"


def _hold(http_port: int, count: int, ready: MpEvent, stop: MpEvent,
          events: Any) -> None:
    """A process holding ``count`` watch streams open, reading every line of each."""
    async def main() -> None:
        timeout = aiohttp.ClientTimeout(total=None, sock_read=None)
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
            opened = 0

            async def one() -> None:
                nonlocal opened
                async with session.get(f"http://127.0.0.1:{http_port}{WATCH_PATH}") as resp:
                    if resp.status != 200:
                        raise RuntimeError(f"the watch stream answered {resp.status}")
                    opened += 1
                    if opened == count:
                        ready.set()
                    async for line in resp.content:
                        if line.startswith(b"event: transition"):
                            with events.get_lock():
                                events.value += 1

            tasks = [asyncio.create_task(one()) for _ in range(count)]
            await asyncio.get_running_loop().run_in_executor(None, stop.wait)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(main())


class Watchers:
    """``count`` watch clients in a process of their own, for the duration of a ``with``."""

    def __init__(self, http_port: int, count: int) -> None:
        self.ready = mp.Event()
        self.stop = mp.Event()
        self.events = mp.Value("q", 0)
        self.proc = mp.Process(target=_hold, args=(http_port, count, self.ready, self.stop,
                                                   self.events))

    def __enter__(self) -> Watchers:
        self.proc.start()
        if not self.ready.wait(30):
            self.proc.kill()
            raise RuntimeError("the watch clients did not all connect")
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop.set()
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()


def ingest(broker: Mosquitto, args: argparse.Namespace, watchers: int) -> dict[str, Any]:
    root = f"w{watchers}"
    proc, http_port = start_manager(broker.url, root, workdir=broker.workdir)
    try:
        register(broker.port, http_port, root, args.nodes, publishers=args.publishers)
        if watchers:
            with Watchers(http_port, watchers) as held:
                result = applied(broker.port, http_port, root, args, "w", "")
                events = held.events.value
        else:
            result, events = applied(broker.port, http_port, root, args, "w", ""), 0
    finally:
        stop_process(proc)
    return {"watchers": watchers, "applied_per_s": result.per_s, "lost": result.lost,
            "events_read": events}


def delay(broker: Mosquitto, args: argparse.Namespace) -> list[float]:
    """lag.py's probes, timed to their event on one watch stream."""
    proc, http_port = start_manager(broker.url, lag.ROOT, workdir=broker.workdir)
    try:
        return _timed_probes(broker.port, http_port, args)
    finally:
        stop_process(proc)


def _timed_probes(port: int, http_port: int, args: argparse.Namespace) -> list[float]:
    reg = lag._client(port, "watch-register")
    body = json.dumps({"node_type": "microclaw", "heartbeat_interval_seconds": 3600})
    for i in range(args.lag_nodes):
        reg.publish(f"{lag.ROOT}/bg-{i:06d}/register", body, qos=1)
    for i in range(args.probes):
        reg.publish(f"{lag.ROOT}/probe-{i:04d}/register", body, qos=1)
    wait_for(lambda: _nodes(http_port) >= args.lag_nodes + args.probes, 120, "registered")
    reg.disconnect()
    reg.loop_stop()

    sent: dict[str, float] = {}
    delays: list[float] = []
    lock = threading.Lock()
    conn = http.client.HTTPConnection("127.0.0.1", http_port, timeout=60)
    conn.request("GET", WATCH_PATH, headers={"Accept": "text/event-stream"})
    stream = conn.getresponse()
    if stream.status != 200:
        raise RuntimeError(f"the watch stream answered {stream.status}")
    done = threading.Event()

    def read() -> None:
        while not done.is_set():
            line = stream.readline()
            if not line:
                return
            if line.startswith(b"data:"):
                now = time.monotonic()
                node_id = json.loads(line[5:])["node_id"]
                with lock:
                    at = sent.pop(node_id, None)
                    if at is not None:
                        delays.append(now - at)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    probe = paho.Client(CallbackAPIVersion.VERSION2, client_id="watch-probe")
    probe.on_socket_open = lag._no_delay  # Nagle would add the broker's delayed ACK (lag.py)
    probe.connect("127.0.0.1", port, keepalive=120)
    probe.loop_start()
    lag_args = argparse.Namespace(probe_rate=args.probe_rate, probes=args.probes)
    stop_at = time.monotonic() + args.seconds + 5
    background = mp.Process(target=lag._background,
                            args=(port, args.lag_nodes, args.rate, args.seconds, stop_at))
    background.start()
    time.sleep(2.0)  # measure under the steady background load, not its ramp-up
    lag._probe(probe, lag_args, sent, lock, time.monotonic() + args.seconds - 4)
    time.sleep(1.0)
    background.join()
    done.set()
    probe.disconnect()
    probe.loop_stop()
    conn.close()
    return delays


def _nodes(http_port: int) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", http_port, timeout=10)
    conn.request("GET", "/api/v1/fleet/nodes?limit=1")
    total = json.loads(conn.getresponse().read())["total"]
    conn.close()
    return int(total)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=100_000)
    parser.add_argument("--messages", type=int, default=400_000)
    parser.add_argument("--publishers", type=int, default=2)
    parser.add_argument("--watchers", type=int, default=100)
    parser.add_argument("--rate", type=int, default=10_000, help="heartbeats/s for the delay")
    parser.add_argument("--lag-nodes", type=int, default=10_000)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--probes", type=int, default=200)
    parser.add_argument("--probe-rate", type=float, default=50.0)
    add_pin_option(parser)
    args = parser.parse_args()
    args.qos = 0
    PINNING.start(args.pin)

    with tempfile.TemporaryDirectory(prefix="fleetmq-bench-watch-") as tmp:
        broker = Mosquitto(Path(tmp))
        broker.start()
        try:
            none = ingest(broker, args, 0)
            some = ingest(broker, args, args.watchers)
            delays = sorted(delay(broker, args))
        finally:
            broker.stop()
    if not delays:
        print("no probe reached the watch stream")
        sys.exit(1)

    def q(p: float) -> float:
        return delays[min(len(delays) - 1, int(p * len(delays)))] * 1000

    ratio = some["applied_per_s"] / none["applied_per_s"]
    rows = [
        ("machine", f"{os.cpu_count()} cores, python {sys.version.split()[0]}"),
        ("pinned", PINNING.describe()),
        ("ingest", f"{args.nodes:,} nodes registered over MQTT 5, {args.messages:,} QoS 0 "
                   f"heartbeats from {args.publishers} publishers, SQLite"),
        ("  no watch client", f"{none['applied_per_s']:,.0f} applied/s, {none['lost']:,} lost"),
        (f"  {args.watchers} watch clients",
         f"{some['applied_per_s']:,.0f} applied/s, {some['lost']:,} lost, "
         f"{some['events_read']:,} events read"),
        ("  ratio", f"{ratio:.2f}; target >= 0.90: {'met' if ratio >= 0.9 else 'MISSED'}"),
        ("delay", f"{args.rate:,} heartbeats/s over {args.lag_nodes:,} nodes, "
                  f"{args.probe_rate:g} transitions/s, one watch client"),
        ("  transitions timed", f"{len(delays):,}"),
        ("  publish -> event p50 / p99 / max",
         f"{q(0.5):.1f} / {q(0.99):.1f} / {delays[-1] * 1000:.1f} ms; target p99 <= 100 ms: "
         + ("met" if q(0.99) <= 100 else "MISSED")),
    ]
    print_rows(rows)
    write_result("watch", {"machine": machine(), "ingest": [none, some],
                           "delay_ms": {"p50": q(0.5), "p99": q(0.99),
                                        "max": delays[-1] * 1000, "count": len(delays)}})


if __name__ == "__main__":
    main()
