"""End-to-end lag at a fixed heartbeat rate: publish -> applied by the registry -> status out.

A background publisher sends heartbeats for N nodes at a fixed rate (10,000/s by default).
Meanwhile probe nodes alternate their heartbeat between "degraded" and "online", so each probe
is a transition: the manager applies it and publishes the node's retained status, which this
bench receives. The lag measured (publish -> status received) is an upper bound of the lag
to the registry's ``last_seen`` update, since it adds the status publish on top.

    python bench/lag.py --rate 10000 --seconds 20
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import (
    machine,
    metric,
    print_rows,
    start_manager,
    stop_process,
    wait_for,
    write_result,
)
from tests.support import Mosquitto

ROOT = "lag"


def _client(port: int, client_id: str) -> paho.Client:
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id)
    client.max_inflight_messages_set(1000)
    client.connect("127.0.0.1", port, keepalive=120)
    client.loop_start()
    return client


def _no_delay(_c: object, _u: object, sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _background(port: int, nodes: int, rate: int, seconds: float, stop_at: float) -> None:
    client = _client(port, "lag-background")
    payload = json.dumps({"uptime_seconds": 1, "free_memory_kb": 200}).encode()
    tick = 0.01
    per_tick = max(1, int(rate * tick))
    start = time.monotonic()
    sent = 0
    while time.monotonic() < min(start + seconds, stop_at):
        for _ in range(per_tick):
            client.publish(f"{ROOT}/bg-{sent % nodes:06d}/heartbeat", payload, qos=0)
            sent += 1
        next_at = start + (sent / per_tick) * tick
        delay = next_at - time.monotonic()
        if delay > 0:
            time.sleep(delay)
    client.disconnect()
    client.loop_stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=10_000)
    parser.add_argument("--rate", type=int, default=10_000, help="background heartbeats/s")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--probes", type=int, default=200, help="probe nodes")
    parser.add_argument("--probe-rate", type=float, default=50.0, help="probes/s")
    parser.add_argument("--mqtt-version", default="5", choices=("5", "3.1.1"))
    parser.add_argument("--store", default="sqlite",
                        help="the manager's store: sqlite (a fresh file, the default), "
                             "memory:// or a postgresql:// URL")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="fleetmq-lag-") as tmp:
        broker = Mosquitto(Path(tmp))
        broker.start()
        try:
            proc, http_port = start_manager(broker.url, ROOT, "--mqtt-version",
                                            args.mqtt_version, workdir=Path(tmp),
                                            store=args.store)
            try:
                lags = run(broker.port, http_port, args)
            finally:
                stop_process(proc)
        finally:
            broker.stop()

    lags.sort()
    if not lags:
        print("no probe was answered: the manager did not keep up with the offered rate")
        sys.exit(1)
    p = (lambda q: lags[min(len(lags) - 1, int(q * len(lags)))] * 1000)  # noqa: E731
    rows = [
        ("machine", f"{os.cpu_count()} cores, python {sys.version.split()[0]}"),
        ("background heartbeats", f"{args.rate:,}/s over {args.nodes:,} nodes, QoS 0"),
        ("manager protocol", f"MQTT {args.mqtt_version}"),
        ("probes answered", f"{len(lags):,}"),
        ("lag p50 / p99 / max", f"{p(0.5):.1f} / {p(0.99):.1f} / {lags[-1] * 1000:.1f} ms"),
        ("lag mean", f"{statistics.fmean(lags) * 1000:.1f} ms"),
    ]
    print_rows(rows)
    write_result("lag", {
        "machine": machine(), "nodes": args.nodes, "rate_per_s": args.rate,
        "seconds": args.seconds, "mqtt_version": args.mqtt_version, "store": args.store,
        "probes_answered": len(lags), "lag_p50_ms": p(0.5), "lag_p99_ms": p(0.99),
        "lag_max_ms": lags[-1] * 1000, "lag_mean_ms": statistics.fmean(lags) * 1000,
    })


def _probe(probe: paho.Client, args: argparse.Namespace, sent: dict[str, float],
           lock: threading.Lock, end: float) -> None:
    """Each probe flips its node between degraded and online: every one is a transition."""
    last: dict[str, str] = {}
    i = 0
    while time.monotonic() < end:
        time.sleep(1 / args.probe_rate)
        node_id = f"probe-{i % args.probes:04d}"
        i += 1
        with lock:
            if node_id in sent:  # its previous probe is still on its way
                continue
            status = "online" if last.get(node_id) == "degraded" else "degraded"
            last[node_id] = status
            sent[node_id] = time.monotonic()
        probe.publish(f"{ROOT}/{node_id}/heartbeat", json.dumps({"status": status}), qos=0)


def run(port: int, http_port: int, args: argparse.Namespace) -> list[float]:
    reg = _client(port, "lag-register")
    body = json.dumps({"node_type": "microclaw", "heartbeat_interval_seconds": 3600})
    for i in range(args.nodes):
        reg.publish(f"{ROOT}/bg-{i:06d}/register", body, qos=1)
    for i in range(args.probes):
        reg.publish(f"{ROOT}/probe-{i:04d}/register", body, qos=1)
    wait_for(lambda: metric(http_port, "fleetmq_nodes") >= args.nodes + args.probes, 120,
             "nodes registered")
    reg.disconnect()
    reg.loop_stop()

    sent: dict[str, float] = {}
    lags: list[float] = []
    lock = threading.Lock()

    def on_message(_c: object, _u: object, msg: paho.MQTTMessage) -> None:
        now = time.monotonic()
        node_id = msg.topic.split("/")[1]
        with lock:
            at = sent.pop(node_id, None)
            if at is not None:
                lags.append(now - at)

    probe = paho.Client(CallbackAPIVersion.VERSION2, client_id="lag-probe")
    # paho leaves Nagle on: each probe (one small publish now and then) would wait for the
    # broker's delayed ACK, ~20 ms that belong to the bench, not to the manager.
    probe.on_socket_open = _no_delay
    probe.on_message = on_message
    probe.connect("127.0.0.1", port, keepalive=120)
    probe.loop_start()
    probe.subscribe(f"{ROOT}/+/status", qos=1)
    time.sleep(1.0)  # let the retained statuses of the registration pass
    with lock:
        sent.clear()

    stop_at = time.monotonic() + args.seconds + 5
    background = mp.Process(target=_background,
                            args=(port, args.nodes, args.rate, args.seconds, stop_at))
    background.start()
    time.sleep(2.0)  # measure under the steady background load, not its ramp-up
    _probe(probe, args, sent, lock, time.monotonic() + args.seconds - 4)
    time.sleep(1.0)
    background.join()
    probe.disconnect()
    probe.loop_stop()
    return lags


if __name__ == "__main__":
    main()
