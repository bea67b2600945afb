"""MQTT ingest with watch-stream clients connected (issue 10: within 10% of ingest with none).

For each count of watchers: a fresh ``fleetmq serve`` against its own Mosquitto, N nodes
registered over MQTT, then that many ``GET /api/v1/fleet/watch`` clients (one child process,
asyncio; each counts the events it receives; the first one also parses them and measures how
long after its ``at`` each event arrived, the commit included), then heartbeats from separate
processes as fast as they go. A share of the nodes (``--transitions``) alternate
degraded/online with each heartbeat, so that share of the messages are transitions, streamed
to every watcher. The rate is the manager's applied rate from /metrics, as bench/ingest.py
measures it.

With ``--rate N`` the heartbeats come from one process paced at N a second for ``--seconds``
(the lag target: a transition seen within 100 ms, p99, at 10,000 heartbeats/s).

    python bench/watch.py --nodes 20000 --messages 300000 --watchers 0 100 --rounds 2
    python bench/watch.py --nodes 20000 --watchers 100 --rate 10000 --seconds 20 --rounds 1
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import (
    PINNING,
    add_pin_option,
    machine,
    metric,
    paced,
    print_rows,
    settle,
    start_manager,
    stop_process,
    wait_for,
    write_result,
)
from bench.ingest import IDLE_S, register
from tests.support import Mosquitto

WATCH = "/api/v1/fleet/watch"


def _connected(port: int, client_id: str) -> paho.Client:
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id)
    client.max_inflight_messages_set(1000)
    client.connect("127.0.0.1", port, keepalive=120)
    client.loop_start()
    return client


def _heartbeats(root: str, nodes: int, changing: int) -> Callable[[int], tuple[str, bytes]]:
    """The i-th heartbeat's topic and payload: every node in turn; the first ``changing``
    nodes flip between degraded and online with each pass over the fleet (each of their
    heartbeats is a transition)."""
    plain = json.dumps({"uptime_seconds": 1234, "free_memory_kb": 200}).encode()
    flips = [json.dumps({"status": s, "uptime_seconds": 1234}).encode()
             for s in ("degraded", "online")]

    def heartbeat(i: int) -> tuple[str, bytes]:
        node = i % nodes
        return (f"{root}/node-{node:07d}/heartbeat",
                flips[(i // nodes) % 2] if node < changing else plain)

    return heartbeat


def _publish(port: int, root: str, first: int, count: int, nodes: int, changing: int,
             qos: int) -> None:
    """Heartbeats ``first`` to ``first + count`` (``_heartbeats``), as fast as they go."""
    client = _connected(port, f"bench-watch-pub-{first}")
    heartbeat = _heartbeats(root, nodes, changing)
    for i in range(first, first + count):
        info = client.publish(*heartbeat(i), qos=qos)
        if i % 1000 == 0:
            info.wait_for_publish(30)
    info.wait_for_publish(60)
    client.disconnect()
    client.loop_stop()


def _paced_publish(port: int, root: str, rate: int, nodes: int, changing: int, stop: Any,
                   sent: Any) -> None:
    client = _connected(port, "bench-watch-paced")
    heartbeat = _heartbeats(root, nodes, changing)
    def publish(i: int) -> None:
        client.publish(*heartbeat(i), qos=0)

    paced(rate, stop, sent, publish)
    client.disconnect()
    client.loop_stop()


def _paced(port: int, root: str, args: argparse.Namespace) -> int:
    stop, sent = mp.Event(), mp.Value("q", 0)
    proc = mp.Process(target=_paced_publish, args=(
        port, root, args.rate, args.nodes, int(args.nodes * args.transitions), stop, sent))
    proc.start()
    time.sleep(args.seconds)
    stop.set()
    proc.join()
    return int(sent.value)


def _blast(port: int, root: str, args: argparse.Namespace) -> int:
    # Each publisher takes whole passes over the fleet, so a changing node's heartbeats
    # alternate (a pass split between publishers could send one state twice).
    passes = max(1, args.messages // args.nodes)
    share = passes // args.publishers
    changing = int(args.nodes * args.transitions)
    procs = [mp.Process(target=_publish, args=(port, root, k * share * args.nodes,
                                               share * args.nodes, args.nodes, changing,
                                               args.qos))
             for k in range(args.publishers)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join()
    if any(proc.exitcode != 0 for proc in procs):
        raise RuntimeError("publisher processes failed")
    return share * args.nodes * args.publishers


async def _watch_all(http_port: int, watchers: int, ready: Any, stop: Any, out: Any) -> None:
    import aiohttp  # noqa: PLC0415 (the child's own)

    counts = [0] * watchers
    lags: list[float] = []
    opened = 0

    async def one(index: int, session: aiohttp.ClientSession) -> None:
        nonlocal opened
        async with session.get(f"http://127.0.0.1:{http_port}{WATCH}") as resp:
            assert resp.status == 200
            opened += 1
            if opened == watchers:
                ready.set()
            tail = b""
            async for chunk in resp.content.iter_any():
                now = time.time()
                counts[index] += chunk.count(b"event: transition")
                if index == 0:  # the first watcher measures how late each event is
                    text = tail + chunk
                    *lines, tail = text.split(b"\n")
                    for line in lines:
                        if line.startswith(b"data: "):
                            at = json.loads(line[6:])["at"]
                            lags.append(now - _epoch(at))

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector,
                                     timeout=aiohttp.ClientTimeout(total=None)) as session:
        tasks = [asyncio.create_task(one(i, session)) for i in range(watchers)]
        # A multiprocessing event: waited for in a thread, not polled.
        await asyncio.to_thread(stop.wait)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    lags.sort()
    out.put({"counts": counts, "lags": lags})


def _epoch(timestamp: str) -> float:
    from datetime import datetime  # noqa: PLC0415

    return datetime.fromisoformat(timestamp.replace("Z", "+00:00")).timestamp()


def _watchers_main(http_port: int, watchers: int, ready: Any, stop: Any, out: Any) -> None:
    asyncio.run(_watch_all(http_port, watchers, ready, stop, out))


def one_run(broker: Mosquitto, root: str, watchers: int, args: argparse.Namespace
            ) -> dict[str, Any]:
    proc, http_port = start_manager(broker.url, root, workdir=broker.workdir, store=args.store)
    child = None
    try:
        register(broker.port, http_port, root, args.nodes, publishers=args.publishers)
        ready, stop, out = mp.Event(), mp.Event(), mp.Queue()
        if watchers:
            child = mp.Process(target=_watchers_main,
                               args=(http_port, watchers, ready, stop, out))
            child.start()
            if not ready.wait(60):
                raise RuntimeError("the watch clients did not connect")
        base = metric(http_port, "fleetmq_mqtt_messages_applied_total")
        base_transitions = metric(http_port, "fleetmq_transitions_total")
        samples: list[tuple[float, float]] = [(time.monotonic(), 0.0)]
        started = time.monotonic()
        published = (_paced if args.rate else _blast)(broker.port, root, args)

        def applied() -> float:
            samples.append((time.monotonic(),
                            metric(http_port, "fleetmq_mqtt_messages_applied_total") - base))
            return samples[-1][1]

        settle(applied, published, IDLE_S, 300, "heartbeats applied")
        final = samples[-1][1]
        done_at = next(t for t, n in samples if n >= final)
        rate = final / (done_at - started)
        transitions = int(metric(http_port, "fleetmq_transitions_total") - base_transitions)
        result: dict[str, Any] = {"watchers": watchers, "applied_per_s": rate,
                                  "applied": int(final), "published": published,
                                  "transitions": transitions}
        if child is not None:
            wait_for(lambda: metric(http_port, "fleetmq_store_backlog") == 0, 60, "committed")
            time.sleep(2.0)  # the last events reach the clients
            stop.set()
            got = out.get(timeout=120)
            lags = got["lags"]
            result.update(
                events_min=min(got["counts"]), events_max=max(got["counts"]),
                lag_p50_ms=1000 * lags[len(lags) // 2] if lags else None,
                lag_p99_ms=1000 * lags[int(len(lags) * 0.99)] if lags else None)
        return result
    finally:
        if child is not None:
            stop.set()
            child.join(30)
            if child.is_alive():
                child.kill()
        stop_process(proc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nodes", type=int, default=20_000)
    parser.add_argument("--messages", type=int, default=300_000)
    parser.add_argument("--publishers", type=int, default=2)
    parser.add_argument("--qos", type=int, default=0)
    parser.add_argument("--watchers", type=int, nargs="+", default=[0, 100])
    parser.add_argument("--transitions", type=float, default=0.01,
                        help="share of the nodes whose every heartbeat is a transition")
    parser.add_argument("--rounds", type=int, default=2,
                        help="each count of watchers this many times, interleaved")
    parser.add_argument("--rate", type=int, default=0,
                        help="heartbeats a second from one paced publisher (0: as fast as "
                             "--publishers go)")
    parser.add_argument("--seconds", type=float, default=20.0, help="with --rate")
    parser.add_argument("--store", default="sqlite")
    add_pin_option(parser)
    args = parser.parse_args()
    PINNING.start(args.pin)
    runs = []
    with tempfile.TemporaryDirectory(prefix="fleetmq-bench-") as tmp:
        broker = Mosquitto(Path(tmp))
        broker.start()
        try:
            for round_no in range(args.rounds):
                for watchers in args.watchers:
                    runs.append(one_run(broker, f"w{watchers}r{round_no}", watchers, args))
        finally:
            broker.stop()
    rows = [("machine", f"{machine()['cores']} cores, python {machine()['python']}"),
            ("pinned", PINNING.describe()),
            ("nodes, heartbeats", f"{args.nodes:,}, {runs[0]['published']:,} (QoS {args.qos}), "
                                  f"{args.transitions:.0%} of them transitions")]
    for run in runs:
        cell = f"{run['applied_per_s']:,.0f} msg/s ({run['applied']:,} applied)"
        if run["watchers"]:
            cell += (f"; each watcher {run['events_min']:,}-{run['events_max']:,} events, "
                     f"lag p50 {run['lag_p50_ms']:.0f} ms p99 {run['lag_p99_ms']:.0f} ms")
        rows.append((f"{run['watchers']} watchers", cell))
    print_rows(rows)
    write_result("watch", {"machine": machine(), "args": vars(args), "runs": runs})


if __name__ == "__main__":
    main()
