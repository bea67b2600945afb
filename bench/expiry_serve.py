"""Offline detection on the real process (issue 9): how late silent nodes turn offline, over
REST, while other messages arrive and while a registration storm saturates the manager.

A ``fleetmq serve`` (memory store, MQTT 5 by default) runs against a Mosquitto of the bench's
own. ``--nodes`` nodes register over MQTT (``bench/ingest.py``'s registration, no interval of
their own: ``--offline-after`` applies) and then stay silent, so their deadlines follow one
another as they registered. Before the first deadline the load starts and runs until every
silent node is offline:

- ``paced``: ``--rate`` other messages/s (10,000), one in five the registration of a new node,
  the others heartbeats of those nodes (they declare a one-hour interval: none expires here);
- ``storm``: three processes register as fast as they go (QoS 1, re-registering pools of 50,000
  ids with a one-hour interval), which keeps the manager at 100% of its core and, since each
  read of the socket brings more registrations than an ingest batch applies, its inbox full.

Lateness is read from the REST answers: each silent node's ``status_since - (last_seen +
timeout)`` once all are offline (the moment its state changed, which is when REST shows it).
While the wave runs (from the first expiry to the last), ``GET /nodes?status=offline&limit=1``
is polled: its ``total`` against the deadlines known afterwards gives how far behind REST was
at each poll. Over the wave, the manager's CPU share (/proc) and the messages it applied per
second, and at its end the load's messages not yet applied (queued in the broker or the
manager's inbox), say whether it kept up.

    python bench/expiry_serve.py --nodes 1000000 --offline-after 120
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import tempfile
import threading
import time
from bisect import bisect_right
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import orjson

from bench.common import (
    PINNING,
    add_pin_option,
    machine,
    metric,
    paced,
    print_rows,
    print_table,
    request,
    start_manager,
    stop_process,
    wait_for,
    write_result,
)
from bench.ingest import REGISTER_BODY, _client, register
from tests.support import Mosquitto

ROOT = "expiry"
TARGETS_S = {"paced": 1.0, "storm": 2.0}
LIVE_BODY = json.dumps({**REGISTER_BODY, "heartbeat_interval_seconds": 3600})
STORM_POOL = 50_000
STORM_PROCESSES = 3
TICKS = 100  # paced load: sleep between bursts of rate / TICKS messages
PAGE = 10_000


def _paced(port: int, root: str, rate: int, stop: Any, sent_total: Any) -> None:
    """``rate`` messages/s until ``stop``: every fifth registers ``live-<k>``, the others are
    heartbeats of the live nodes registered so far."""
    client = _client("bench-expiry-paced", None)
    client.max_inflight_messages_set(1000)
    client.connect("127.0.0.1", port, keepalive=120)
    client.loop_start()
    heartbeat = json.dumps({"uptime_seconds": 1, "free_memory_kb": 200})

    def publish(i: int) -> None:
        live = i // 5  # registered before message i: live-0 ... live-<live - 1>, and this one
        if i % 5 == 0:
            client.publish(f"{root}/live-{live:07d}/register", LIVE_BODY, qos=0)
        else:
            client.publish(f"{root}/live-{i % (live + 1):07d}/heartbeat", heartbeat, qos=0)

    paced(rate, stop, sent_total, publish, TICKS)
    client.disconnect()
    client.loop_stop()


def _storm(port: int, root: str, k: int, stop: Any, sent: Any) -> None:
    """Registrations as fast as the broker takes them (QoS 1, up to 1,000 in flight); counts
    them in ``sent`` as the broker acknowledges them."""
    client = _client(f"bench-expiry-storm-{k}", None)
    client.max_inflight_messages_set(1000)
    client.connect("127.0.0.1", port, keepalive=120)
    client.loop_start()
    i = 0
    while not stop.is_set():
        info = client.publish(f"{root}/storm-{k}-{i % STORM_POOL:05d}/register", LIVE_BODY,
                              qos=1)
        i += 1
        if i % 1000 == 0:
            info.wait_for_publish(30)
            with sent.get_lock():
                sent.value += 1000
    client.disconnect()
    client.loop_stop()


def _wall(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


def offline_nodes(http_port: int) -> list[dict[str, Any]]:
    """Every offline node over REST, a page at a time."""
    nodes: list[dict[str, Any]] = []
    after = ""
    while True:
        page = orjson.loads(request(f"http://127.0.0.1:{http_port}/api/v1/fleet/nodes"
                                    f"?status=offline&limit={PAGE}&after={after}", timeout=60))
        nodes += page["nodes"]
        if not page["next"]:
            return nodes
        after = page["next"]


def offline_total(http_port: int) -> int:
    url = f"http://127.0.0.1:{http_port}/api/v1/fleet/nodes?status=offline&limit=1"
    return int(orjson.loads(request(url))["total"])


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100  # utime + stime, in clock ticks


def pct(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def behind_at(polls: list[tuple[float, int]], deadlines: list[float]) -> list[float]:
    """For each poll (wall time, offline total): how long ago the deadline of the last node
    REST showed offline passed, beyond which it had shown them all; 0 when REST was up to
    date (every node due by then was offline)."""
    behind = []
    for at, total in polls:
        due = bisect_right(deadlines, at)
        if total >= due or due == 0:
            behind.append(0.0)
        else:
            behind.append(at - deadlines[total])  # the first node REST did not show yet
    return behind


def run(scenario: str, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    (tmp / scenario).mkdir()
    broker = Mosquitto(tmp / scenario)
    broker.start()
    try:
        proc, http_port = start_manager(
            broker.url, ROOT, "--mqtt-version", args.mqtt_version, "--offline-after",
            str(args.offline_after), workdir=tmp, store="memory://")
        try:
            return _wave(scenario, args, broker.port, http_port, proc.pid)
        finally:
            stop_process(proc)
    finally:
        broker.stop()


def _wave(scenario: str, args: argparse.Namespace, port: int, http_port: int,
          pid: int) -> dict[str, Any]:
    registered_from = time.time()
    reg_rate, _, _ = register(port, http_port, ROOT, args.nodes, publishers=2)
    registered_s = time.time() - registered_from
    if registered_s > args.offline_after - 5:
        raise SystemExit(f"registering took {registered_s:.0f} s: the first deadlines passed "
                         f"before the load; raise --offline-after above "
                         f"{registered_s + 10:.0f}")
    stop = mp.Event()
    sent = mp.Value("q", 0)
    applied0 = metric(http_port, "fleetmq_mqtt_messages_applied_total")
    if scenario == "paced":
        loads = [mp.Process(target=_paced, args=(port, ROOT, args.rate, stop, sent))]
    else:
        loads = [mp.Process(target=_storm, args=(port, ROOT, k, stop, sent))
                 for k in range(STORM_PROCESSES)]
    for load in loads:
        load.start()
    polls: list[tuple[float, int]] = []
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            at = time.time()
            polls.append((at, offline_total(http_port)))
            time.sleep(0.1)

    try:
        # The wave: from the first deadline until the last silent node is offline.
        wait_for(lambda: offline_total(http_port) > 0, args.offline_after + 60, "first expiry")
        cpu0, wall0 = cpu_seconds(pid), time.monotonic()
        applied1 = metric(http_port, "fleetmq_mqtt_messages_applied_total")
        poller = threading.Thread(target=poll)
        poller.start()
        try:
            wait_for(lambda: bool(polls) and polls[-1][1] >= args.nodes, registered_s + 600,
                     "every silent node offline")
        finally:
            done.set()
            poller.join()
        wave_s = time.monotonic() - wall0
        cpu_share = (cpu_seconds(pid) - cpu0) / wave_s
        applied_per_s = (metric(http_port, "fleetmq_mqtt_messages_applied_total")
                         - applied1) / wave_s
        # Sent by the load and not applied yet: queued in the broker or the manager's inbox.
        backlog = sent.value - (metric(http_port, "fleetmq_mqtt_messages_applied_total")
                                - applied0)
    finally:
        stop.set()
        for load in loads:
            load.join(60)
    silent = [n for n in offline_nodes(http_port) if n["id"].startswith("node-")]
    deadlines = sorted(_wall(n["last_seen"]) + args.offline_after for n in silent)
    lateness = sorted(_wall(n["status_since"]) - (_wall(n["last_seen"]) + args.offline_after)
                      for n in silent)
    behind = sorted(behind_at(polls, deadlines))
    target = TARGETS_S[scenario]
    return {
        "scenario": scenario, "nodes": args.nodes, "register_per_s": reg_rate,
        "registered_s": registered_s, "expired": len(silent), "cpu_share": cpu_share,
        "wave_s": wave_s, "applied_per_s": applied_per_s, "backlog": backlog,
        "late_p50_s": pct(lateness, 0.5), "late_p99_s": pct(lateness, 0.99),
        "late_max_s": lateness[-1], "late_over_target": sum(x > target for x in lateness),
        "polls": len(polls), "behind_p99_s": pct(behind, 0.99), "behind_max_s": behind[-1],
        "target_s": target,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=1_000_000)
    parser.add_argument("--offline-after", type=float, default=120.0,
                        help="the silent nodes' timeout; must exceed their registration time")
    parser.add_argument("--rate", type=int, default=10_000,
                        help="other messages/s in the paced scenario")
    parser.add_argument("--scenarios", nargs="+", default=["paced", "storm"],
                        choices=["paced", "storm"])
    parser.add_argument("--mqtt-version", default="5", choices=["3.1.1", "5"])
    add_pin_option(parser)
    args = parser.parse_args()
    PINNING.start(args.pin)
    with tempfile.TemporaryDirectory(prefix="fleetmq-bench-expiry-serve-") as tmp:
        results = [run(scenario, args, Path(tmp)) for scenario in args.scenarios]

    print()
    print_rows([
        ("machine", f"{machine()['cores']} cores, python {machine()['python']}, pinned: "
                    f"{PINNING.describe()}"),
        ("manager", f"fleetmq serve --store memory:// --mqtt-version {args.mqtt_version} "
                    f"--offline-after {args.offline_after:g}"),
        ("silent nodes", f"{args.nodes:,}, registered over MQTT"),
        ("paced load", f"{args.rate:,} messages/s, one in five a registration"),
        ("storm load", f"{STORM_PROCESSES} processes registering as fast as they go (QoS 1)"),
    ])
    print()
    header = ("scenario", "wave", "manager CPU", "applied/s", "load backlog", "late p50",
              "late p99", "late max", "over target", "target", "REST behind p99",
              "REST behind max")
    rows: list[tuple[str, ...]] = [(r["scenario"], f"{r['wave_s']:.1f} s", f"{r['cpu_share']:.0%}",
             f"{r['applied_per_s']:,.0f}", f"{r['backlog']:,}", f"{r['late_p50_s']:.3f} s",
             f"{r['late_p99_s']:.3f} s", f"{r['late_max_s']:.3f} s",
             f"{r['late_over_target']:,} ({r['late_over_target'] / r['expired']:.1%})",
             f"p99 <= {r['target_s']:g} s: "
             f"{'met' if r['late_p99_s'] <= r['target_s'] else 'MISSED'}",
             f"{r['behind_p99_s']:.3f} s", f"{r['behind_max_s']:.3f} s") for r in results]
    print_table(header, rows)
    write_result("expiry_serve", {"machine": machine(), "args": vars(args), "results": results})


if __name__ == "__main__":
    main()
