"""MQTT heartbeat ingest: fleetmq's applied-messages rate next to a bare paho subscriber.

Starts its own Mosquitto on a free port (config derived from the repo's mosquitto.conf), runs
``fleetmq serve`` as a subprocess against it, registers N nodes, then publishes heartbeats from
separate processes as fast as they go. The manager's rate is counted after the registry applied
the messages (``fleetmq_mqtt_messages_applied_total`` in /metrics); the ceiling is a bare paho
subscriber that only counts the same stream from the same broker.

    python bench/ingest.py --nodes 100000 --messages 400000 --publishers 2
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import metric, print_rows, start_manager, wait_for
from tests.support import Mosquitto


def _publish(port: int, root: str, first: int, count: int, nodes: int, qos: int) -> None:
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-pub-{first}")
    client.max_inflight_messages_set(1000)
    client.connect("127.0.0.1", port, keepalive=120)
    client.loop_start()
    payload = json.dumps({"uptime_seconds": 1234, "free_memory_kb": 200}).encode()
    for i in range(first, first + count):
        info = client.publish(f"{root}/node-{i % nodes:07d}/heartbeat", payload, qos=qos)
        if i % 1000 == 0:
            info.wait_for_publish(30)
    info.wait_for_publish(60)
    client.disconnect()
    client.loop_stop()


def _blast(port: int, root: str, messages: int, nodes: int, publishers: int, qos: int) -> None:
    share = messages // publishers
    procs = [mp.Process(target=_publish, args=(port, root, k * share, share, nodes, qos))
             for k in range(publishers)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join()


def bare_subscriber(port: int, root: str, messages: int, nodes: int, publishers: int,
                    qos: int, mqtt5: bool = False) -> float:
    seen = 0
    first_at = last_at = 0.0
    lock = threading.Lock()

    def on_message(*_a: object) -> None:
        nonlocal seen, first_at, last_at
        with lock:
            seen += 1
            last_at = time.monotonic()
            if seen == 1:
                first_at = last_at

    protocol = MQTTProtocolVersion.MQTTv5 if mqtt5 else MQTTProtocolVersion.MQTTv311
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id="bench-bare", protocol=protocol)
    client.on_message = on_message
    client.connect("127.0.0.1", port, keepalive=120)
    client.subscribe(f"{root}/+/heartbeat", qos=1)
    client.loop_start()
    time.sleep(0.5)
    _blast(port, root, messages, nodes, publishers, qos)
    wait_for(lambda: seen >= messages * 0.999, 300, "bare subscriber saw every message")
    client.disconnect()
    client.loop_stop()
    return seen / (last_at - first_at)


def fleetmq_ingest(port: int, root: str, messages: int, nodes: int, publishers: int,
                   qos: int, wrap: list[str], mqtt_version: str) -> tuple[float, float]:
    proc, http_port = start_manager(port, root, "--mqtt-version", mqtt_version, wrap=wrap)
    try:
        reg = paho.Client(CallbackAPIVersion.VERSION2, client_id="bench-reg")
        reg.max_inflight_messages_set(1000)
        reg.connect("127.0.0.1", port, keepalive=120)
        reg.loop_start()
        started = time.monotonic()
        body = {"node_type": "microclaw", "capabilities": ["dht22", "mqtt"],
                "location": "office-floor-2",
                "metadata": {"gateway": "nanoclaw-pi-01", "firmware": "v1.0.0"}}
        for i in range(nodes):
            info = reg.publish(f"{root}/node-{i:07d}/register", json.dumps(body), qos=1)
            if i % 1000 == 0:
                info.wait_for_publish(30)
        wait_for(lambda: metric(http_port, "fleetmq_nodes") >= nodes, 300, "nodes registered")
        register_rate = nodes / (time.monotonic() - started)
        # Let the registrations' statuses and replies go out first: measure ingest alone.
        wait_for(lambda: metric(http_port, "fleetmq_mqtt_backlog") == 0, 300, "statuses out")
        reg.disconnect()
        reg.loop_stop()

        base = metric(http_port, "fleetmq_mqtt_messages_applied_total")
        samples: list[tuple[float, int]] = []
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                samples.append((time.monotonic(),
                                metric(http_port, "fleetmq_mqtt_messages_applied_total") - base))
                time.sleep(0.25)

        sampler = threading.Thread(target=sample)
        sampler.start()
        _blast(port, root, messages, nodes, publishers, qos)
        wait_for(lambda: bool(samples) and samples[-1][1] >= messages * 0.999, 300,
                 "every heartbeat applied")
        stop.set()
        sampler.join()
        moving = [(t, n) for t, n in samples if n > 0]
        (t0, n0), (t1, n1) = moving[0], moving[-1]
        return (n1 - n0) / (t1 - t0), register_rate
    finally:
        proc.terminate()
        proc.wait(20)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=100_000)
    parser.add_argument("--messages", type=int, default=400_000)
    parser.add_argument("--publishers", type=int, default=2)
    parser.add_argument("--qos", type=int, default=0, choices=(0, 1))
    parser.add_argument("--wrap", default="",
                        help="prefix for the manager's command, e.g. a profiler: "
                             "'py-spy record -f speedscope -o ingest.json --'")
    parser.add_argument("--skip-bare", action="store_true", help="measure fleetmq only")
    parser.add_argument("--skip-fleetmq", action="store_true", help="measure the ceilings only")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fleetmq-bench-") as tmp:
        broker = Mosquitto(Path(tmp))
        broker.start()
        try:
            nan = float("nan")
            bare = nan if args.skip_bare else bare_subscriber(
                broker.port, "bare", args.messages, args.nodes, args.publishers, args.qos)
            bare5 = nan if args.skip_bare else bare_subscriber(
                broker.port, "bare5", args.messages, args.nodes, args.publishers, args.qos,
                mqtt5=True)
            fleet, reg = (nan, nan) if args.skip_fleetmq else fleetmq_ingest(
                broker.port, "fleet", args.messages, args.nodes, args.publishers, args.qos,
                args.wrap.split(), "5")
            fleet3, _ = (nan, nan) if args.skip_fleetmq else fleetmq_ingest(
                broker.port, "fleet3", args.messages, args.nodes, args.publishers, args.qos,
                args.wrap.split(), "3.1.1")
        finally:
            broker.stop()
    rows = [
        ("machine", f"{os.cpu_count()} cores, python {sys.version.split()[0]}"),
        ("nodes registered over MQTT", f"{args.nodes:,} ({reg:,.0f} registrations/s)"),
        (f"heartbeats published (QoS {args.qos})", f"{args.messages:,}"),
        ("bare paho subscriber, MQTT 3.1.1", f"{bare:,.0f} msg/s"),
        ("bare paho subscriber, MQTT 5", f"{bare5:,.0f} msg/s"),
        ("fleetmq applied, MQTT 5 (default)", f"{fleet:,.0f} msg/s"),
        ("  ratio to the bare MQTT 5 subscriber", f"{fleet / bare5:.2f}"),
        ("fleetmq applied, --mqtt-version 3.1.1", f"{fleet3:,.0f} msg/s"),
        ("  ratio to the bare 3.1.1 subscriber", f"{fleet3 / bare:.2f}"),
    ]
    print_rows(rows)


if __name__ == "__main__":
    main()
