"""High availability (contract section 10): how soon a standby takes over from an active that
was killed, at 10,000 to 1,000,000 nodes, and what following the active costs a standby.

Real processes throughout: a PostgreSQL of the bench's own (initdb into a temporary directory,
a free port), a Mosquitto of its own per run (the repo's mosquitto.conf, a free port) and two
``fleetmq serve --store postgresql://... --broker mqtt://...`` on the same database.

- **takeover**, for each ``--nodes``: the database is filled directly through the store's own
  API (bench/startup.py's rows, a one-hour heartbeat interval so that nothing expires during
  the run), then manager A starts (it takes the lease: active) and, once A is ready and has
  republished every status, manager B (standby); B counts as started when its ``/readyz``
  says standby and its ``/metrics`` shows the whole fleet loaded. A subscriber (a child
  process) on ``<root>/+/status``, which also matches ``<root>/_manager/status``, counts A's
  republished statuses; once they are all in, A gets ``kill -9``. From that moment: B's
  ``/readyz`` 200 (polled every 10 ms), the first node status and the first
  ``_manager/status`` message B publishes (an ``offline`` one would be the killed active's
  will: its 5 s delay should keep it from ever being sent), every status republished; and B's
  own ``takeover_started`` figure from its log (from taking the lease to its duties started).
  Each manager's start (process start -> ready, or standby with the fleet loaded), its
  ``store_loaded`` figure and its RSS are reported too.
- **follow**: ``--follow-nodes`` nodes in the store, A active and B standby, then
  ``--rate`` heartbeats/s (``--publishers`` processes, QoS 0) over those nodes and
  ``--registrations`` registrations/s of new nodes. After ``--warmup`` s, the CPU seconds of
  both managers over ``--window`` s (``/proc/<pid>/stat``), as a share of one core, next to the
  same window with no load; the messages A applied meanwhile; then how soon B's fleet counts
  the registrations A took.

    python bench/takeover.py [--nodes 10000 100000 1000000] [--follow-nodes 100000]
                             [--rate 20000] [--registrations 100] [--window 30]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from prometheus_client.parser import text_string_to_metric_families

from bench.common import (
    PINNING,
    UNLIMITED_NODES,
    add_pin_option,
    machine,
    metric,
    paced,
    postgres_if,
    print_rows,
    print_table,
    request,
    settle,
    stop_process,
    wait_for,
    write_result,
)
from bench.ingest import REGISTER_BODY, _client
from bench.startup import fill, node_rows, rss_mb
from tests.support import Mosquitto, Postgres, free_port

INTERVAL_S = 3600
"""The seeded and registered nodes' heartbeat interval: none expires while the bench runs."""
READY_TIMEOUT_S = 180
POLL_S = 0.01
TICK_S = os.sysconf("SC_CLK_TCK")
KEEP_LOGS: Path | None = None
"""Where the managers' logs are copied when they stop (``--logs``); else they go with the
bench's temporary directory."""


def node_id(i: int) -> str:
    """The id of bench/startup.py's ``i``-th row (checked in ``main``)."""
    return f"microclaw-esp32-{i:08x}"


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK_S  # utime + stime


def readyz(http_port: int) -> tuple[int, dict[str, Any]]:
    """``/readyz``'s status code and body (0 and {} while nothing answers)."""
    url = f"http://127.0.0.1:{http_port}/readyz"
    try:
        return 200, json.loads(request(url, timeout=2))
    except urllib.error.HTTPError as exc:
        try:
            return exc.code, json.loads(exc.read())
        except ValueError:
            return exc.code, {}
    except (urllib.error.URLError, OSError, ValueError):
        return 0, {}


def nodes_loaded(http_port: int) -> float:
    try:
        return metric(http_port, "fleetmq_nodes")
    except (urllib.error.URLError, OSError, KeyError):
        return -1


@dataclass
class Manager:
    """One ``fleetmq serve`` of the pair, its log in the bench's directory."""

    name: str
    proc: subprocess.Popen[bytes]
    http_port: int
    log: Path
    started: float

    @classmethod
    def start(cls, name: str, broker: str, store: str, root: str, workdir: Path,
              options: list[str]) -> Manager:
        http_port = free_port()
        log = workdir / f"{root}-{name}.log"
        argv = [sys.executable, "-m", "fleetmq", "serve", "--broker", broker,
                "--http", f"127.0.0.1:{http_port}", "--store", store, "--topic-root", root,
                "--advertise-url", f"http://127.0.0.1:{http_port}", "--log-level", "info",
                *UNLIMITED_NODES, *options]
        argv = PINNING.manager(argv)
        started = time.monotonic()
        with log.open("wb") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
        return cls(name, proc, http_port, log, started)

    def alive(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"manager {self.name} exited with {self.proc.returncode}:\n"
                               f"{self.log_text()[-3000:]}")

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def logged(self, pattern: str) -> re.Match[str] | None:
        return re.search(pattern, self.log_text())

    def wait_active(self) -> float:
        """Until ``/readyz`` answers 200; seconds since the process started."""
        def ready() -> bool:
            self.alive()
            return readyz(self.http_port)[0] == 200

        wait_for(ready, READY_TIMEOUT_S, f"manager {self.name} active")
        return time.monotonic() - self.started

    def wait_standby(self, nodes: int) -> float:
        """Until ``/readyz`` says standby and the whole fleet is loaded; seconds since the
        process started."""
        def loaded() -> bool:
            self.alive()
            code, body = readyz(self.http_port)
            return (code == 503 and body.get("status") == "standby"
                    and nodes_loaded(self.http_port) >= nodes)

        wait_for(loaded, READY_TIMEOUT_S, f"manager {self.name} standby with {nodes:,} nodes")
        return time.monotonic() - self.started

    def load_s(self) -> float | None:
        """The manager's own ``store_loaded`` figure."""
        found = self.logged(r"store_loaded .*seconds=([\d.]+)")
        return float(found.group(1)) if found else None

    def rss_mb(self) -> float:
        return rss_mb(self.proc.pid)

    def stop(self) -> None:
        stop_process(self.proc)
        if KEEP_LOGS is not None:
            KEEP_LOGS.mkdir(parents=True, exist_ok=True)
            (KEEP_LOGS / self.log.name).write_bytes(self.log.read_bytes())


class Watch:
    """A subscriber in a child process (so that a million messages do not slow the bench's
    polling) on ``<root>/+/status``: node statuses counted before and after ``arm()``, and
    the monotonic moments (system-wide, comparable with the bench's) of the first node status,
    the first ``_manager/status`` online and offline, and the last node status after it."""

    def __init__(self, port: int, root: str) -> None:
        self.armed = mp.Value("d", 0.0, lock=False)
        self.before = mp.Value("q", 0, lock=False)
        self.after = mp.Value("q", 0, lock=False)
        self.first_node = mp.Value("d", 0.0, lock=False)
        self.last_node = mp.Value("d", 0.0, lock=False)
        self.first_online = mp.Value("d", 0.0, lock=False)
        self.first_offline = mp.Value("d", 0.0, lock=False)
        self.subscribed = mp.Event()
        self.stop = mp.Event()
        self.proc = mp.Process(target=_watch, args=(port, root, self))

    def start(self) -> None:
        self.proc.start()
        if not self.subscribed.wait(30):
            raise RuntimeError("the status subscriber did not subscribe within 30 s")

    def arm(self, at: float) -> None:
        self.armed.value = at

    def close(self) -> None:
        self.stop.set()
        self.proc.join(10)
        if self.proc.exitcode is None:
            self.proc.kill()
            self.proc.join()


def _watch(port: int, root: str, watch: Watch) -> None:
    manager_topic = f"{root}/_manager/status"

    def on_message(_c: object, _u: object, msg: Any) -> None:
        now = time.monotonic()
        armed = watch.armed.value
        if msg.topic == manager_topic:
            if armed and now >= armed:
                online = b'"online"' in msg.payload
                first = watch.first_online if online else watch.first_offline
                if not first.value:
                    first.value = now
            return
        if armed and now >= armed:
            if not watch.first_node.value:
                watch.first_node.value = now
            watch.after.value += 1
            watch.last_node.value = now
        else:
            watch.before.value += 1

    def on_subscribe(*_a: object) -> None:
        watch.subscribed.set()

    client = _client(f"bench-takeover-watch-{os.getpid()}", None)
    client.on_message = on_message
    client.on_subscribe = on_subscribe
    client.connect("127.0.0.1", port, keepalive=120)
    client.subscribe(f"{root}/+/status", qos=0)
    client.loop_start()
    watch.stop.wait()
    client.disconnect()
    client.loop_stop()


@contextmanager
def broker_of_own(workdir: Path) -> Iterator[Mosquitto]:
    """A fresh Mosquitto per run: no retained status of an earlier run is delivered."""
    broker_dir = Path(tempfile.mkdtemp(prefix="fleetmq-mosq-", dir=workdir))
    broker = Mosquitto(broker_dir)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@contextmanager
def database(postgres: Postgres, name: str) -> Iterator[str]:
    postgres.create_database(name)
    try:
        yield postgres.url(name)
    finally:
        postgres.drop_database(name)


@contextmanager
def pair(broker: Mosquitto, url: str, root: str, workdir: Path, nodes: int,
         options: list[str], settled: Callable[[], dict[str, Any]] | None = None,
         ) -> Iterator[tuple[Manager, Manager, dict[str, Any]]]:
    """Manager A (active), then manager B (standby), each started and loaded alone (B once
    ``settled()``, if given, has returned: its figures join the start figures); stops
    whichever is still running afterwards. The dict has each one's start figures."""
    started: list[Manager] = []
    try:
        a = Manager.start("A", broker.url, url, root, workdir, options)
        started.append(a)
        figures: dict[str, Any] = {"active_ready_s": round(a.wait_active(), 2)}
        wait_for(lambda: nodes_loaded(a.http_port) >= nodes, READY_TIMEOUT_S, "A's fleet")
        figures["active_load_s"] = a.load_s()
        if settled is not None:
            figures.update(settled())
        b = Manager.start("B", broker.url, url, root, workdir, options)
        started.append(b)
        figures["standby_ready_s"] = round(b.wait_standby(nodes), 2)
        figures["standby_load_s"] = b.load_s()
        yield a, b, figures
    finally:
        for manager in reversed(started):
            manager.stop()


def seed(url: str, nodes: int) -> float:
    return asyncio.run(fill(url, nodes, interval_s=INTERVAL_S))


def takeover(postgres: Postgres, nodes: int, workdir: Path,
             options: list[str]) -> dict[str, Any]:
    root = f"takeover{nodes}"
    result: dict[str, Any] = {"nodes": nodes}
    with database(postgres, root) as url, broker_of_own(workdir) as broker:
        result["seed_s"] = round(seed(url, nodes), 1)
        print(f"{nodes:,} nodes seeded in {result['seed_s']} s", flush=True)
        watch = Watch(broker.port, root)
        watch.start()
        try:
            def republished() -> dict[str, Any]:
                # Every status A republished has arrived: what comes after the kill is B's.
                return {"active_republished": int(settle(
                    lambda: watch.before.value, nodes, 5.0, 600, "A's republished statuses"))}

            with pair(broker, url, root, workdir, nodes, options, republished) as (a, b,
                                                                                  figures):
                result.update(figures)
                result["active_rss_mb"] = round(a.rss_mb())
                result["standby_rss_mb"] = round(b.rss_mb())
                result.update(kill_and_follow(a, b, watch, nodes))
        finally:
            watch.close()
    print(f"{nodes:,}: {result}", flush=True)
    return result


def logged_at(asctime: str) -> float:
    """The wall-clock moment of a log line (``logging``'s asctime, local time)."""
    return datetime.strptime(asctime, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def kill_and_follow(a: Manager, b: Manager, watch: Watch, nodes: int) -> dict[str, Any]:
    a.alive()
    b_code, b_body = readyz(b.http_port)
    if b_code != 503 or b_body.get("status") != "standby":
        raise RuntimeError(f"B is not standby before the kill: {b_code} {b_body}")
    killed, killed_wall = time.monotonic(), time.time()
    watch.arm(killed)
    os.kill(a.proc.pid, signal.SIGKILL)
    a.proc.wait()
    while True:
        b.alive()
        if readyz(b.http_port)[0] == 200:
            ready = time.monotonic()
            break
        if time.monotonic() - killed > READY_TIMEOUT_S:
            raise TimeoutError(f"B not ready {READY_TIMEOUT_S} s after the kill:\n"
                               f"{b.log_text()[-3000:]}")
        time.sleep(POLL_S)
    wait_for(lambda: bool(watch.first_node.value and watch.first_online.value), 120,
             "B's first node status and its _manager/status online")
    received = int(settle(lambda: watch.after.value, nodes, 5.0, 900,
                          "B's republished statuses"))
    own = b.logged(r"takeover_started .*seconds=([\d.]+)")
    finished = b.logged(r"\n(\S+ \S+) INFO \S+ republish_finished")

    def since_kill(moment: float) -> float | None:
        return round(moment - killed, 3) if moment else None

    return {
        "kill_to_ready_s": round(ready - killed, 3),
        "kill_to_first_status_s": since_kill(watch.first_node.value),
        "kill_to_manager_online_s": since_kill(watch.first_online.value),
        "kill_to_manager_offline_s": since_kill(watch.first_offline.value),
        "kill_to_all_statuses_s": since_kill(watch.last_node.value) if received >= nodes
        else None,
        "statuses_received": received,
        "kill_to_republish_finished_logged_s":
            round(logged_at(finished.group(1)) - killed_wall, 2) if finished else None,
        "takeover_started_logged_s": float(own.group(1)) if own else None,
        "new_active_rss_mb": round(b.rss_mb()),
        "takeovers_total": metric(b.http_port, "fleetmq_takeovers_total"),
    }


def _heartbeats(port: int, root: str, k: int, publishers: int, rate: int, nodes: int,
                stop: Any, sent: Any) -> None:
    """Publisher ``k`` of ``publishers``: heartbeats of nodes k, k + publishers, ..."""
    client = _client(f"bench-takeover-hb-{k}", None)
    client.max_inflight_messages_set(1000)
    client.connect("127.0.0.1", port, keepalive=120)
    client.loop_start()
    payload = json.dumps({"uptime_seconds": 1234, "free_memory_kb": 200}).encode()
    ids = [f"{root}/{node_id(i)}/heartbeat" for i in range(k, nodes, publishers)]

    def publish(i: int) -> None:
        client.publish(ids[i % len(ids)], payload, qos=0)

    paced(rate, stop, sent, publish)
    client.disconnect()
    client.loop_stop()


def _registrations(port: int, root: str, rate: int, stop: Any, sent: Any) -> None:
    client = _client("bench-takeover-reg", None)
    client.connect("127.0.0.1", port, keepalive=120)
    client.loop_start()
    body = json.dumps({**REGISTER_BODY, "heartbeat_interval_seconds": INTERVAL_S})
    last: list[Any] = []

    def publish(i: int) -> None:
        last[:] = [client.publish(f"{root}/follow-new-{i:07d}/register", body, qos=1)]

    paced(rate, stop, sent, publish)
    if last:
        last[0].wait_for_publish(30)  # every registration counted in ``sent`` reached the broker
    client.disconnect()
    client.loop_stop()


def dropped(http_port: int) -> dict[str, float]:
    """The messages a manager dropped, by reason."""
    text = request(f"http://127.0.0.1:{http_port}/metrics").decode()
    return {sample.labels.get("reason", ""): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == "fleetmq_mqtt_messages_dropped_total" and sample.value}


def metric_or_none(http_port: int, name: str) -> float | None:
    """None while the manager does not answer (one that steps down serves again shortly)."""
    try:
        return metric(http_port, name)
    except (urllib.error.URLError, OSError, KeyError):
        return None


def roles_held(a: Manager, b: Manager) -> bool:
    """A active, B standby and never taken over."""
    return (metric_or_none(a.http_port, "fleetmq_active") == 1
            and metric_or_none(b.http_port, "fleetmq_active") == 0
            and metric_or_none(b.http_port, "fleetmq_takeovers_total") == 0)


def cpu_window(a: Manager, b: Manager, seconds: float) -> dict[str, Any]:
    """Both managers' CPU share of one core and A's applied messages/s over ``seconds``, and
    whether (and when) the roles changed meanwhile (checked every second)."""
    t0 = time.monotonic()
    a0, b0 = cpu_seconds(a.proc.pid), cpu_seconds(b.proc.pid)
    applied0 = metric(a.http_port, "fleetmq_mqtt_messages_applied_total")
    changed_at: float | None = None
    held = (t0, b0)  # the last check that found the roles held, and B's CPU then
    end = t0 + seconds
    while (now := time.monotonic()) < end:
        time.sleep(min(1.0, end - now))  # the window's pace, not a synchronisation
        if changed_at is None:
            b_cpu = cpu_seconds(b.proc.pid)
            if roles_held(a, b):
                held = (time.monotonic(), b_cpu)
            else:
                changed_at = round(time.monotonic() - t0, 1)
    t1 = time.monotonic()
    a1, b1 = cpu_seconds(a.proc.pid), cpu_seconds(b.proc.pid)
    applied1 = metric_or_none(a.http_port, "fleetmq_mqtt_messages_applied_total")
    span = t1 - t0
    return {"window_s": round(span, 1),
            "active_cpu_pct": round(100 * (a1 - a0) / span, 1),
            "standby_cpu_pct": round(100 * (b1 - b0) / span, 1),
            "standby_cpu_s": round(b1 - b0, 2),
            "active_applied_per_s": None if changed_at is not None or applied1 is None
            else round((applied1 - applied0) / span),
            "roles_changed_at_s": changed_at,
            # B's share while it was still standby (the whole window if nothing changed).
            "standby_cpu_pct_as_standby": round(100 * (held[1] - b0) / (held[0] - t0), 1)
            if held[0] > t0 else None}


def lease_trouble(a: Manager) -> dict[str, Any]:
    """What A's log says about its lease: failed renewals, and why it stepped down."""
    text = a.log_text()
    down = re.search(r"stepping_down epoch=\S+ reason=(.*)", text)
    return {"renewals_failed": text.count("lease_renewal_failed"),
            "stepped_down": down.group(1) if down else None}


def follow(postgres: Postgres, args: argparse.Namespace, workdir: Path,
           options: list[str]) -> dict[str, Any]:
    root = "follow"
    nodes = args.follow_nodes
    result: dict[str, Any] = {"nodes": nodes, "rate": args.rate,
                              "registrations_rate": args.registrations,
                              "publishers": args.publishers}
    with database(postgres, root) as url, broker_of_own(workdir) as broker:
        seed(url, nodes)
        with pair(broker, url, root, workdir, nodes, options) as (a, b, figures):
            result.update(figures)
            result["idle"] = cpu_window(a, b, args.idle_window)
            stop = mp.Event()
            heartbeats_sent = [mp.Value("q", 0) for _ in range(args.publishers)]
            registered_sent = mp.Value("q", 0)
            share = args.rate // args.publishers
            procs = [mp.Process(target=_heartbeats,
                                args=(broker.port, root, k, args.publishers, share, nodes,
                                      stop, heartbeats_sent[k]))
                     for k in range(args.publishers)]
            procs.append(mp.Process(target=_registrations,
                                    args=(broker.port, root, args.registrations, stop,
                                          registered_sent)))
            for proc in procs:
                proc.start()
            try:
                time.sleep(args.warmup)  # a steady load, not its ramp-up, is measured
                sent0 = sum(v.value for v in heartbeats_sent)
                reg0 = registered_sent.value
                t0 = time.monotonic()
                loaded = cpu_window(a, b, args.window)
                span = time.monotonic() - t0
                loaded["heartbeats_sent_per_s"] = round(
                    (sum(v.value for v in heartbeats_sent) - sent0) / span)
                loaded["registrations_sent_per_s"] = round(
                    (registered_sent.value - reg0) / span, 1)
            finally:
                stop.set()
                for proc in procs:
                    proc.join(30)
            result["loaded"] = loaded
            result["registrations_sent"] = registered_sent.value
            result["lease"] = lease_trouble(a)
            # Whichever is active now (A, unless it stepped down) holds the fleet; what it has
            # not registered once its count stops moving was lost (the table says how many,
            # and /metrics why). The other, standby, must then hold as much.
            wait_for(lambda: 200 in (readyz(a.http_port)[0], readyz(b.http_port)[0]), 60,
                     "a manager active after the load")
            active, standby = (a, b) if readyz(a.http_port)[0] == 200 else (b, a)
            held = int(settle(lambda: nodes_loaded(active.http_port),
                              nodes + registered_sent.value, 5.0, 120, "registrations"))
            stopped = time.monotonic()
            wait_for(lambda: nodes_loaded(standby.http_port) >= held, 60,
                     "the standby followed every registration the active took")
            result["standby_caught_up_s"] = round(time.monotonic() - stopped, 2)
            result["registered"] = held - nodes
            result["active_at_end"] = active.name
            result["active_dropped"] = dropped(active.http_port)
            result["standby_rss_mb"] = round(b.rss_mb())
            result["active_rss_mb"] = round(a.rss_mb())
    print(f"follow: {result}", flush=True)
    return result


def _opt(value: float | None, unit: str = "s", digits: int = 2) -> str:
    return "-" if value is None else f"{value:,.{digits}f}{unit}"


def print_takeovers(results: list[dict[str, Any]]) -> None:
    rows: list[tuple[str, ...]] = []

    def row(label: str, key: str, fmt: Any) -> None:
        rows.append((label, *(fmt(r.get(key)) for r in results)))

    row("seeded into PostgreSQL", "seed_s", lambda v: _opt(v, " s", 1))
    row("A: start -> active (/readyz 200)", "active_ready_s", lambda v: _opt(v, " s"))
    row("A: store_loaded", "active_load_s", lambda v: _opt(v, " s"))
    row("A: RSS", "active_rss_mb", lambda v: _opt(v, " MB", 0))
    row("B: start -> standby, fleet loaded", "standby_ready_s", lambda v: _opt(v, " s"))
    row("B: store_loaded", "standby_load_s", lambda v: _opt(v, " s"))
    row("B: RSS as standby", "standby_rss_mb", lambda v: _opt(v, " MB", 0))
    row("kill -9 A -> B /readyz 200", "kill_to_ready_s", lambda v: _opt(v, " s", 3))
    row("kill -> first node status from B", "kill_to_first_status_s",
        lambda v: _opt(v, " s", 3))
    row("kill -> _manager/status online", "kill_to_manager_online_s",
        lambda v: _opt(v, " s", 3))
    row("kill -> _manager/status offline (will)", "kill_to_manager_offline_s",
        lambda v: "never" if v is None else _opt(v, " s", 3))
    row("kill -> every status republished", "kill_to_all_statuses_s",
        lambda v: _opt(v, " s", 1))
    row("kill -> B's republish_finished (its log)", "kill_to_republish_finished_logged_s",
        lambda v: _opt(v, " s", 1))
    row("B: lease -> takeover_started (its log)", "takeover_started_logged_s",
        lambda v: _opt(v, " s", 2))
    row("statuses received after the kill", "statuses_received", lambda v: f"{v:,}")
    row("B: RSS as active, after the republish", "new_active_rss_mb",
        lambda v: _opt(v, " MB", 0))
    print_table(("nodes", *(f"{r['nodes']:,}" for r in results)), rows)


def print_follow(r: dict[str, Any], args: argparse.Namespace) -> None:
    idle, loaded = r["idle"], r["loaded"]
    print_rows([
        ("fleet in the store", f"{r['nodes']:,} nodes; A active, B standby"),
        (f"idle ({args.idle_window:g} s)",
         f"A {idle['active_cpu_pct']:.1f}%, B {idle['standby_cpu_pct']:.1f}% of one core"),
        ("load offered", f"{loaded['heartbeats_sent_per_s']:,} heartbeats/s (QoS 0, "
                         f"{args.publishers} publishers) + "
                         f"{loaded['registrations_sent_per_s']:g} registrations/s (QoS 1)"),
        ("A applied", "-" if loaded["active_applied_per_s"] is None
         else f"{loaded['active_applied_per_s']:,} messages/s"),
        ("roles", "A active, B standby throughout" if loaded["roles_changed_at_s"] is None
         else f"CHANGED {loaded['roles_changed_at_s']:g} s into the window; active at the end: "
              f"{r['active_at_end']}"),
        ("A's lease", f"{r['lease']['renewals_failed']} renewals failed; "
                      + (f"stepped down: {r['lease']['stepped_down']}"
                         if r["lease"]["stepped_down"] else "held")),
        (f"A's CPU ({args.window:g} s window)",
         f"{loaded['active_cpu_pct']:.1f}% of one core"),
        (f"B's CPU ({args.window:g} s window)",
         f"{loaded['standby_cpu_pct']:.1f}% of one core ({loaded['standby_cpu_s']:.2f} CPU s)"
         + ("" if loaded["roles_changed_at_s"] is None else
            f"; {_opt(loaded['standby_cpu_pct_as_standby'], '%', 1)} while still standby")),
        ("registrations", f"{r['registrations_sent']:,} sent, {r['registered']:,} "
                          f"registered; the active dropped {r['active_dropped'] or 'nothing'}"),
        ("standby's fleet after the load", f"{r['nodes'] + r['registered']:,} nodes, as the "
                                            f"active's within {r['standby_caught_up_s']:.2f} s"),
        ("RSS A / B", f"{r['active_rss_mb']:,} / {r['standby_rss_mb']:,} MB"),
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, nargs="*", default=[10_000, 100_000, 1_000_000],
                        help="fleet sizes of the takeover runs (none: skip them)")
    parser.add_argument("--follow-nodes", type=int, default=100_000,
                        help="fleet of the follow run (0: skip it)")
    parser.add_argument("--rate", type=int, default=20_000, help="heartbeats/s to the active")
    parser.add_argument("--registrations", type=int, default=100,
                        help="registrations/s of new nodes during the follow run")
    parser.add_argument("--publishers", type=int, default=2, help="heartbeat processes")
    parser.add_argument("--window", type=float, default=30.0, help="CPU window, seconds")
    parser.add_argument("--idle-window", type=float, default=10.0,
                        help="CPU window without load, seconds")
    parser.add_argument("--warmup", type=float, default=5.0,
                        help="seconds of load before the window")
    parser.add_argument("--mqtt-version", default="5", choices=("5", "3.1.1"))
    parser.add_argument("--lease", type=float, default=None,
                        help="the managers' --lease (default: theirs)")
    parser.add_argument("--logs", type=Path, default=None,
                        help="copy the managers' logs into this directory")
    add_pin_option(parser)
    args = parser.parse_args()
    global KEEP_LOGS  # noqa: PLW0603 (one setting of the run, read by Manager.stop)
    KEEP_LOGS = args.logs
    if node_rows(7, 1, 0.0)[0][0] != node_id(7):
        raise SystemExit("bench/startup.py's node ids changed: update node_id()")
    PINNING.start(args.pin)
    options = ["--mqtt-version", args.mqtt_version]
    if args.lease is not None:
        options += ["--lease", f"{args.lease:g}"]
    takeovers: list[dict[str, Any]] = []
    followed: dict[str, Any] | None = None
    with tempfile.TemporaryDirectory(prefix="fleetmq-bench-takeover-") as tmp, \
            postgres_if(True) as postgres:
        assert postgres is not None
        workdir = Path(tmp)
        for nodes in args.nodes:
            takeovers.append(takeover(postgres, nodes, workdir, options))
        if args.follow_nodes:
            followed = follow(postgres, args, workdir, options)
    print()
    print(f"machine: {os.cpu_count()} cores, python {sys.version.split()[0]}; "
          f"pinned: {PINNING.describe()}; PostgreSQL and Mosquitto of the bench's own; "
          f"managers on MQTT {args.mqtt_version}"
          + (f", --lease {args.lease:g}" if args.lease is not None else ""))
    if takeovers:
        print()
        print_takeovers(takeovers)
    if followed is not None:
        print()
        print_follow(followed, args)
    write_result("takeover", {"machine": machine(), "mqtt_version": args.mqtt_version,
                              "lease": args.lease, "takeovers": takeovers,
                              "follow": followed})


if __name__ == "__main__":
    main()
