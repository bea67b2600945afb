"""MQTT heartbeat ingest: fleetmq's applied-messages rate next to a bare paho subscriber.

Registers N nodes, then publishes heartbeats from separate processes as fast as they go. The
manager's rate is counted after the registry applied the messages
(``fleetmq_mqtt_messages_applied_total`` in /metrics); the ceiling is a bare paho subscriber that
only counts the same stream from the same broker. A count that stops moving short of what was
published is final: the rest was lost, and the table says how many.

- ``--broker mosquitto`` (default): its own Mosquitto on a free port (config derived from the
  repo's mosquitto.conf) and ``fleetmq serve`` against it as a subprocess, with MQTT 5 and 3.1.1.
- ``--broker embedded``: ``fleetmq serve --broker embedded://127.0.0.1:<free port>``, whose
  amqtt broker speaks MQTT 3.1.1 only. The bare subscriber counts its stream from that broker
  first (the manager, subscribed under another topic root, idle), then the manager ingests.

    python bench/ingest.py --nodes 100000 --messages 400000 --publishers 2
    python bench/ingest.py --broker embedded --nodes 10000 --messages 50000
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import (
    PINNING,
    add_pin_option,
    machine,
    metric,
    print_rows,
    settle,
    start_manager,
    stop_process,
    wait_for,
    write_result,
)
from tests.support import Mosquitto, free_port

IDLE_S = 5.0
"""A count that has not moved for this long after the publishers finished is final."""


@dataclass
class Result:
    key: str
    label: str
    per_s: float
    counted: int
    published: int

    @property
    def lost(self) -> int:
        return self.published - self.counted

    def cell(self) -> str:
        lost = f"{self.lost:,} lost ({self.lost / self.published:.1%})" if self.lost else "0 lost"
        return f"{self.per_s:,.0f} msg/s, {lost}"


@dataclass
class Run:
    broker: str
    results: list[Result]
    register_per_s: float | None = None
    registers: dict[str, tuple[float, float, int]] | None = None
    """By the manager's MQTT version (Mosquitto only): registrations/s in the registry, and
    stored, replied to and published."""
    puback_timeouts: int | None = None
    """amqtt's "Timeout waiting for PUBACK" lines in the manager's log (embedded only)."""


Login = tuple[str, str]
"""(username, password) for a broker with logins; the username is also the client id."""


def _client(default_id: str, login: Login | None,
            protocol: MQTTProtocolVersion = MQTTProtocolVersion.MQTTv311) -> paho.Client:
    client = paho.Client(CallbackAPIVersion.VERSION2,
                         client_id=login[0] if login else default_id, protocol=protocol)
    if login is not None:
        client.username_pw_set(*login)
    return client


def _publish(port: int, root: str, first: int, count: int, nodes: int, qos: int,
             login: Login | None = None) -> None:
    client = _client(f"bench-pub-{first}", login)
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


def _blast(port: int, root: str, messages: int, nodes: int, publishers: int, qos: int,
           logins: list[Login] | None = None) -> int:
    """Publish from ``publishers`` processes (each with its own login, if given: a client id
    can be connected only once); returns how many messages went out."""
    share = messages // publishers
    procs = [mp.Process(target=_publish, args=(port, root, k * share, share, nodes, qos,
                                               logins[k] if logins else None))
             for k in range(publishers)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join()
    failed = [proc.exitcode for proc in procs if proc.exitcode != 0]
    if failed:
        raise RuntimeError(f"publisher processes failed with exit codes {failed}")
    return share * publishers


def bare_subscriber(port: int, root: str, args: argparse.Namespace,
                    mqtt5: bool = False, logins: list[Login] | None = None) -> Result:
    """The ceiling: a paho client that only counts. With ``logins``, the first is the
    subscriber's and the others the publishers'."""
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
    client = _client("bench-bare", logins[0] if logins else None, protocol=protocol)
    client.on_message = on_message
    client.connect("127.0.0.1", port, keepalive=120)
    client.subscribe(f"{root}/+/heartbeat", qos=1)
    client.loop_start()
    try:
        time.sleep(0.5)
        published = _blast(port, root, args.messages, args.nodes, args.publishers, args.qos,
                           logins[1:] if logins else None)
        settle(lambda: seen, published, IDLE_S, 300, "messages seen by the bare subscriber")
    finally:
        client.disconnect()
        client.loop_stop()
    with lock:
        count, span = seen, last_at - first_at
    version = "5" if mqtt5 else "3.1.1"
    return Result(f"bare-mqtt-{version}", f"bare paho subscriber, MQTT {version}",
                  count / span if span > 0 else 0.0, count, published)


def bare_gmqtt(port: int, root: str, args: argparse.Namespace, mqtt5: bool) -> Result:
    """The ceiling of the manager's own library: a gmqtt client that only counts, in a child
    process on the manager's core (bench/bare_gmqtt.py)."""
    version = "5" if mqtt5 else "3.1.1"
    published = args.messages // args.publishers * args.publishers
    argv = PINNING.manager([sys.executable, str(Path(__file__).with_name("bare_gmqtt.py")),
                            str(port), f"{root}/+/heartbeat", version, str(published),
                            str(IDLE_S)])
    child = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        if child.stdout.readline().strip() != "ready":
            raise RuntimeError("the bare gmqtt subscriber did not start")
        _blast(port, root, args.messages, args.nodes, args.publishers, args.qos)
        out, _ = child.communicate(timeout=300)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    done = json.loads(out.strip().splitlines()[-1])
    count, span = int(done["count"]), float(done["span"])
    return Result(f"bare-gmqtt-{version}", f"bare gmqtt subscriber, MQTT {version}",
                  count / span if span > 0 else 0.0, count, published)


REGISTER_BODY = {"node_type": "microclaw", "capabilities": ["dht22", "mqtt"],
                 "location": "office-floor-2",
                 "metadata": {"gateway": "nanoclaw-pi-01", "firmware": "v1.0.0"}}


def _register_share(port: int, root: str, first: int, count: int,
                    login: Login | None = None) -> None:
    reg = _client(f"bench-reg-{first}", login)
    reg.max_inflight_messages_set(1000)
    reg.connect("127.0.0.1", port, keepalive=120)
    reg.loop_start()
    body = json.dumps(REGISTER_BODY)
    for i in range(first, first + count):
        info = reg.publish(f"{root}/node-{i:07d}/register", body, qos=1)
        if i % 1000 == 0:
            info.wait_for_publish(30)
    info.wait_for_publish(60)
    reg.disconnect()
    reg.loop_stop()


def register(port: int, http_port: int, root: str, nodes: int, login: Login | None = None,
             *, publishers: int = 1) -> tuple[float, float, int]:
    """Registers ``nodes`` nodes over MQTT from ``publishers`` processes (QoS 1; one when a
    ``login`` is given, whose username is the client id); returns
    (registered/s: in the registry, done/s: also stored, replied to and their statuses
    handed to the broker link, replies dropped). Replies go out once the store has the node,
    so the replies published count stored registrations too."""
    publishers = 1 if login is not None else publishers
    share = nodes // publishers
    procs = [mp.Process(target=_register_share,
                        args=(port, root, k * share, share if k < publishers - 1
                              else nodes - k * share, login))
             for k in range(publishers)]
    started = time.monotonic()
    for proc in procs:
        proc.start()
    wait_for(lambda: metric(http_port, "fleetmq_nodes") >= nodes, 300, "nodes registered")
    registered = nodes / (time.monotonic() - started)
    # A reply the broker link could not take in time is dropped past the reply queue's bound
    # (publisher.REPLY_BOUND) and counted: the row says how many.
    wait_for(lambda: metric(http_port, "fleetmq_replies_published_total")
             + metric(http_port, "fleetmq_replies_overflowed_total") >= nodes
             and metric(http_port, "fleetmq_status_published_total") >= nodes, 300,
             "registrations stored, replied to and published")
    done = nodes / (time.monotonic() - started)
    dropped = int(metric(http_port, "fleetmq_replies_overflowed_total"))
    for proc in procs:
        proc.join()
    failed = [proc.exitcode for proc in procs if proc.exitcode != 0]
    if failed:
        raise RuntimeError(f"registering processes failed with exit codes {failed}")
    # Let the statuses and replies be acknowledged first: measure ingest alone.
    wait_for(lambda: metric(http_port, "fleetmq_mqtt_backlog") == 0, 300, "statuses out")
    return registered, done, dropped


def applied(port: int, http_port: int, root: str, args: argparse.Namespace, key: str,
            label: str, logins: list[Login] | None = None) -> Result:
    """Heartbeats for the registered nodes; the manager's applied rate from /metrics."""
    base = metric(http_port, "fleetmq_mqtt_messages_applied_total")
    samples: list[tuple[float, float]] = [(time.monotonic(), 0.0)]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            samples.append((time.monotonic(),
                            metric(http_port, "fleetmq_mqtt_messages_applied_total") - base))
            time.sleep(0.25)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        published = _blast(port, root, args.messages, args.nodes, args.publishers, args.qos,
                           logins)
        settle(lambda: samples[-1][1], published, IDLE_S, 300, "heartbeats applied")
    finally:
        stop.set()
        sampler.join()
    final = samples[-1][1]
    # From the first sample that saw messages applied to the first one that saw them all
    # (or, when a tiny run fits between two samples, from the last one that saw none).
    moving = [(t, n) for t, n in samples if n > 0]
    rate = 0.0
    if moving:
        t0, n0 = moving[0]
        t1 = next(t for t, n in moving if n >= final)
        if t1 <= t0:
            t0, n0 = [(t, n) for t, n in samples if n == 0][-1]
        rate = (final - n0) / (t1 - t0)
    return Result(key, label, rate, int(final), published)


def fleetmq_ingest(broker: Mosquitto, root: str, args: argparse.Namespace,
                   mqtt_version: str) -> tuple[Result, tuple[float, float, int]]:
    proc, http_port = start_manager(broker.url, root, "--mqtt-version", mqtt_version,
                                    workdir=broker.workdir, wrap=args.wrap.split(),
                                    store=args.store)
    try:
        reg = register(broker.port, http_port, root, args.nodes, publishers=args.publishers)
        label = ("fleetmq applied, MQTT 5 (default)" if mqtt_version == "5"
                 else "fleetmq applied, --mqtt-version 3.1.1")
        return applied(broker.port, http_port, root, args, f"fleetmq-mqtt-{mqtt_version}",
                       label), reg
    finally:
        stop_process(proc)


def with_mosquitto(args: argparse.Namespace) -> Run:
    results: list[Result] = []
    reg: float | None = None
    regs: dict[str, tuple[float, float, int]] = {}
    with tempfile.TemporaryDirectory(prefix="fleetmq-bench-") as tmp:
        broker = Mosquitto(Path(tmp))
        broker.start()
        try:
            if not args.skip_bare:
                results.append(bare_subscriber(broker.port, "bare", args))
                results.append(bare_subscriber(broker.port, "bare5", args, mqtt5=True))
                results.append(bare_gmqtt(broker.port, "bareg5", args, mqtt5=True))
                results.append(bare_gmqtt(broker.port, "bareg3", args, mqtt5=False))
            if not args.skip_fleetmq:
                for version in args.mqtt_versions:
                    root = "fleet" if version == "5" else "fleet3"
                    result, rate = fleetmq_ingest(broker, root, args, version)
                    results.append(result)
                    regs[version] = rate
                    reg = rate[1] if reg is None else reg
        finally:
            broker.stop()
    return Run("Mosquitto on a free port, the repo's mosquitto.conf", results, reg, regs)


def with_embedded(args: argparse.Namespace) -> Run:
    port = free_port()
    results: list[Result] = []
    reg: float | None = None
    with tempfile.TemporaryDirectory(prefix="fleetmq-bench-") as tmp:
        log = Path(tmp) / "manager.log"
        # The manager hosts the broker: it runs for both measurements.
        proc, http_port = start_manager(f"embedded://127.0.0.1:{port}", "fleet",
                                        "--mqtt-version", "3.1.1", workdir=Path(tmp),
                                        wrap=args.wrap.split(), log=log, store=args.store)
        try:
            if not args.skip_bare:
                results.append(bare_subscriber(port, "bare", args))
            if not args.skip_fleetmq:
                reg, _, _ = register(port, http_port, "fleet", args.nodes,
                                  publishers=args.publishers)
                results.append(applied(port, http_port, "fleet", args, "fleetmq-mqtt-3.1.1",
                                       "fleetmq applied, MQTT 3.1.1"))
        finally:
            stop_process(proc)
        # amqtt forwards QoS 0 messages at the subscription's QoS (1 for the manager) and logs
        # a warning (then an error with a traceback) for every PUBACK that takes over 5 s.
        timeouts = sum(1 for line in log.read_text(errors="replace").splitlines()
                       if "WARNING" in line and "Timeout waiting for PUBACK" in line)
    amqtt = importlib.metadata.version("amqtt")
    return Run(f"embedded amqtt {amqtt} in fleetmq serve --broker embedded://..., MQTT 3.1.1",
               results, reg, puback_timeouts=timeouts)


RATIOS = (("fleetmq-mqtt-5", "bare-mqtt-5", "  ratio to the bare paho MQTT 5 subscriber"),
          ("fleetmq-mqtt-5", "bare-gmqtt-5", "  ratio to the bare gmqtt MQTT 5 subscriber"),
          ("fleetmq-mqtt-3.1.1", "bare-mqtt-3.1.1", "  ratio to the bare paho 3.1.1 subscriber"),
          ("fleetmq-mqtt-3.1.1", "bare-gmqtt-3.1.1",
           "  ratio to the bare gmqtt 3.1.1 subscriber"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--broker", choices=("mosquitto", "embedded"), default="mosquitto",
                        help="mosquitto: its own Mosquitto, MQTT 5 and 3.1.1 (default); "
                             "embedded: the amqtt broker of fleetmq serve --broker "
                             "embedded://127.0.0.1:<free port>, MQTT 3.1.1")
    parser.add_argument("--nodes", type=int, default=100_000)
    parser.add_argument("--messages", type=int, default=400_000)
    parser.add_argument("--publishers", type=int, default=2)
    parser.add_argument("--qos", type=int, default=0, choices=(0, 1))
    parser.add_argument("--wrap", default="",
                        help="prefix for the manager's command, e.g. a profiler: "
                             "'py-spy record -f speedscope -o ingest.json --'")
    parser.add_argument("--store", default="sqlite",
                        help="the manager's store: sqlite (a fresh file, the default), "
                             "memory:// or a postgresql:// URL")
    parser.add_argument("--mqtt-versions", nargs="+", default=["5", "3.1.1"],
                        choices=["5", "3.1.1"], help="the manager's protocols to measure")
    parser.add_argument("--skip-bare", action="store_true", help="measure fleetmq only")
    parser.add_argument("--skip-fleetmq", action="store_true", help="measure the ceilings only")
    add_pin_option(parser)
    args = parser.parse_args()
    PINNING.start(args.pin)
    run = with_embedded if args.broker == "embedded" else with_mosquitto
    done = run(args)
    broker, results, reg = done.broker, done.results, done.register_per_s

    published = args.messages // args.publishers * args.publishers
    rows = [
        ("machine", f"{os.cpu_count()} cores, python {sys.version.split()[0]}"),
        ("pinned", PINNING.describe()),
        ("broker", broker),
    ]
    if done.registers:
        for version, (registered, replied, dropped) in done.registers.items():
            rows.append((f"nodes registered over MQTT {version}",
                         f"{args.nodes:,}: {registered:,.0f}/s in the registry, "
                         f"{replied:,.0f}/s stored, replied to and published, "
                         f"{dropped:,} replies dropped"))
    elif reg is not None:
        rows.append(("nodes registered over MQTT", f"{args.nodes:,} ({reg:,.0f} registrations/s)"))
    rows.append((f"heartbeats published (QoS {args.qos})", f"{published:,}"))
    by_key = {r.key: r for r in results}
    for r in results:
        rows.append((r.label, r.cell()))
        for fleet, bare, label in RATIOS:
            if r.key == fleet and bare in by_key:
                rows.append((label, f"{r.per_s / by_key[bare].per_s:.2f}"))
    timeouts = done.puback_timeouts
    if timeouts is not None:
        rows.append(("amqtt PUBACK timeouts (manager log)", f"{timeouts:,}"))
    print_rows(rows)
    write_result("ingest" if args.broker == "mosquitto" else f"ingest-{args.broker}", {
        "machine": machine(), "broker": args.broker, "broker_detail": broker,
        "nodes": args.nodes, "published": published, "publishers": args.publishers,
        "qos": args.qos, "register_per_s": reg,
        "register_per_s_by_version": done.registers, "amqtt_puback_timeouts": timeouts,
        "results": [{**asdict(r), "lost": r.lost} for r in results],
    })


if __name__ == "__main__":
    main()
