"""REST throughput: requests/s of ``fleetmq serve`` under wrk, next to a bare aiohttp handler.

Starts its own Mosquitto on a free port (tests/support.py), ``fleetmq serve`` against it as a
subprocess, and a bare aiohttp server (this file with ``--bare-server``: one heartbeat handler,
orjson, on the same event loop as the manager: ``--loop``, passed to the manager as
``FLEETMQ_LOOP``) on free ports; never 1883 or 8080. It registers ``--nodes`` (1,001) nodes over
REST and gives each one heartbeat, and with ``--fleet N`` registers the rest of a fleet of N over
MQTT (the same location, capabilities and metadata), then runs wrk (installed with apt-get when
missing) against each route:

- heartbeat: POST /heartbeat cycling through the nodes (a Lua script), bare and fleetmq;
- register: POST /register re-registering the same nodes (each one a transition published);
- get one: GET /nodes/{id};
- list 1,001: GET /nodes (the whole fleet; only for fleets up to 10,000 nodes);
- page 1,001: GET /nodes?limit=1001 (the first page);
- each list idle, then again while a paced publisher process sends ~10,000 heartbeats/s over
  MQTT across the whole fleet (each one invalidates that node's cached view); its ceiling is the
  bare server sending fleetmq's own document, fetched once, as it is.

    python bench/rest.py --duration 10 --threads 2 --connections 64
    python bench/rest.py --loop asyncio            # the manager and the bare handler on asyncio
    python bench/rest.py --fleet 100000 --only page-1001-bare,page-1001,page-1001-mqtt
    python bench/rest.py --only list-1001 --profile /tmp/prof    # py-spy raw stacks per run
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import importlib.util
import json
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import paho.mqtt.client as paho
from aiohttp import web
from paho.mqtt.enums import CallbackAPIVersion

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import (
    PINNING,
    UNLIMITED_NODES,
    add_pin_option,
    answers,
    fresh_store,
    machine,
    metric,
    paced,
    request,
    stop_process,
    wait_for,
    write_result,
)
from fleetmq.core.clock import SystemClock, format_timestamp
from tests.support import Mosquitto, free_port

PREFIX = "/api/v1/fleet"
ROOT = "bench"
TARGET_HEARTBEAT_RATIO = 0.75
TARGET_LIST_RPS = 4500.0
TARGET_LIST_LOADED_RPS = 1500.0
WHOLE_LIST_UP_TO = 10_000
"""The whole-fleet list (no ``limit``) is benched only up to this many nodes (above, it streams
megabytes per request)."""

HEARTBEAT_BODY = ('{"node_id":"node-%05d","uptime_seconds":%d,"free_memory_kb":200,'
                  '"sensors_active":2}')
REGISTER_BODY = ('{"node_id":"node-%05d","node_type":"microclaw","capabilities":["dht22","mqtt"],'
                 '"location":"office-floor-2","metadata":{"gateway":"nanoclaw-pi-01",'
                 '"firmware":"v1.0.%d"},"heartbeat_interval_seconds":60}')
MQTT_REGISTER_BODY = ('{"node_type":"microclaw","capabilities":["dht22","mqtt"],'
                      '"location":"office-floor-2","metadata":{"gateway":"nanoclaw-pi-01",'
                      '"firmware":"v1.0.%d"},"heartbeat_interval_seconds":600}')

LUA_DONE = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%d,"duration_us":%d,"bytes":%d,"connect":%d,"read":%d,'
    .. '"write":%d,"status":%d,"timeout":%d,"p50_us":%.0f,"p99_us":%.0f,"max_us":%.0f}\\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status,
    e.timeout, latency:percentile(50), latency:percentile(99), latency.max))
end
"""

LUA_POST = """
local threads = 0
function setup(thread)
  thread:set("tid", threads)
  threads = threads + 1
end
function init(args)
  n = tid * 7919
end
local headers = {["Content-Type"] = "application/json"}
function request()
  n = n + 1
  return wrk.format("POST", "%(path)s", headers, string.format([[%(body)s]], n %% %(nodes)d, n))
end
"""


# --- the bare server ---------------------------------------------------------------------------

def resolve_loop(wanted: str) -> str:
    if wanted != "auto":
        return wanted
    return "uvloop" if importlib.util.find_spec("uvloop") is not None else "asyncio"


def new_loop(name: str) -> asyncio.AbstractEventLoop:
    if name == "uvloop":
        loop: asyncio.AbstractEventLoop = importlib.import_module("uvloop").new_event_loop()
        return loop
    return asyncio.new_event_loop()


def bare_server(port: int, list_dir: Path, loop: str) -> None:
    """A heartbeat handler with nothing else: the ceiling fleetmq's REST facade is held to.
    Also the ceiling for listing: fleetmq's own documents, read once, sent as they are."""
    clock = SystemClock()
    listing: dict[str, bytes] = {}

    async def heartbeat(request: web.Request) -> web.Response:
        body = orjson.loads(await request.read())
        reply = {"node_id": body["node_id"], "received": format_timestamp(clock.now().wall),
                 "next_check_seconds": 60}
        return web.Response(body=orjson.dumps(reply), content_type="application/json")

    async def list_nodes(request: web.Request) -> web.Response:
        name = "page.json" if "limit" in request.query else "list.json"
        body = listing.get(name)
        if body is None:
            body = listing[name] = await asyncio.to_thread((list_dir / name).read_bytes)
        return web.Response(body=body, content_type="application/json")

    async def healthz(_request: web.Request) -> web.Response:
        return web.Response(body=b'{"status":"ok"}', content_type="application/json")

    app = web.Application()
    app.router.add_post(f"{PREFIX}/heartbeat", heartbeat)
    app.router.add_get(f"{PREFIX}/nodes", list_nodes)
    app.router.add_get("/healthz", healthz)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None,
                loop=new_loop(loop))


# --- helpers -----------------------------------------------------------------------------------

def ensure_wrk() -> str:
    path = shutil.which("wrk")
    if path is not None:
        return path
    if os.geteuid() != 0:
        raise SystemExit("wrk is not installed: run `apt-get install -y wrk` as root")
    print("installing wrk with apt-get ...", flush=True)
    if subprocess.run(["apt-get", "install", "-y", "wrk"], check=False,
                      stdout=subprocess.DEVNULL).returncode != 0:
        subprocess.run(["apt-get", "update"], check=True, stdout=subprocess.DEVNULL)
        subprocess.run(["apt-get", "install", "-y", "wrk"], check=True,
                       stdout=subprocess.DEVNULL)
    path = shutil.which("wrk")
    if path is None:
        raise SystemExit("apt-get installed wrk, yet it is not on PATH")
    return path


def register_over_mqtt(port: int, first: int, last: int) -> None:
    """Registers nodes ``first`` to ``last - 1`` over MQTT (QoS 1, paced by the broker)."""
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id="bench-rest-reg")
    client.max_inflight_messages_set(1000)
    client.connect("127.0.0.1", port, keepalive=120)
    client.loop_start()
    try:
        for i in range(first, last):
            info = client.publish(f"{ROOT}/node-{i:05d}/register",
                                  (MQTT_REGISTER_BODY % i).encode(), qos=1)
            if i % 1000 == 0:
                info.wait_for_publish(30)
        info.wait_for_publish(30)
    finally:
        client.disconnect()
        client.loop_stop()


def paced_publisher(port: int, rate: int, nodes: int, stop: Any, sent: Any) -> None:
    """Heartbeats over MQTT at ``rate`` per second, in slices of 10 ms, until ``stop``."""
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id="bench-rest-pub")
    client.connect("127.0.0.1", port, keepalive=120)
    client.loop_start()

    def publish(i: int) -> None:
        payload = b'{"uptime_seconds": %d, "free_memory_kb": 200}' % i
        client.publish(f"{ROOT}/node-{i % nodes:05d}/heartbeat", payload, qos=0)

    paced(rate, stop, sent, publish)
    client.disconnect()
    client.loop_stop()


@dataclass
class Scenario:
    slug: str
    label: str
    url: str
    script: str
    bare: bool = False
    mqtt_load: bool = False


@dataclass
class Run:
    scenario: Scenario
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    non_2xx: int
    mqtt_published_per_s: float | None = None
    mqtt_applied_per_s: float | None = None
    mqtt_published: int | None = None
    mqtt_eventually_applied: float | None = None
    mqtt_catch_up_s: float | None = None


class Bench:
    def __init__(self, args: argparse.Namespace, workdir: Path, stack: ExitStack) -> None:
        self.args = args
        self.workdir = workdir
        self.stack = stack
        self.wrk = ensure_wrk()
        self.broker = Mosquitto(workdir)
        self.http_port = free_port()
        self.bare_port = free_port()
        self.server: subprocess.Popen[bytes] | None = None
        self.register_s = 0.0

    def start(self) -> None:
        self.broker.start()
        self.stack.callback(self.broker.stop)
        self.server = self._spawn("fleetmq", [
            sys.executable, "-m", "fleetmq", "serve", "--broker", self.broker.url,
            "--http", f"127.0.0.1:{self.http_port}", "--store", fresh_store(self.workdir),
            "--topic-root", ROOT, *UNLIMITED_NODES,
            "--log-level", "warning"])
        self._spawn("bare", [sys.executable, __file__, "--bare-server", str(self.bare_port),
                             str(self.workdir), self.args.loop])
        wait_for(lambda: answers(f"http://127.0.0.1:{self.http_port}/readyz"), 30,
                 "fleetmq serve ready (see its stderr in the work directory)")
        wait_for(lambda: answers(f"http://127.0.0.1:{self.bare_port}/healthz"), 30,
                 "bare server ready")
        base = f"http://127.0.0.1:{self.http_port}{PREFIX}"
        began = time.monotonic()
        for i in range(self.args.nodes):
            request(f"{base}/register", (REGISTER_BODY % (i, i)).encode())
            request(f"{base}/heartbeat", (HEARTBEAT_BODY % (i, i)).encode())
        if self.args.fleet > self.args.nodes:
            register_over_mqtt(self.broker.port, self.args.nodes, self.args.fleet)
            wait_for(lambda: metric(self.http_port, "fleetmq_nodes") >= self.args.fleet, 600,
                     "the fleet registered over MQTT")
        self.register_s = time.monotonic() - began
        if self.args.fleet <= WHOLE_LIST_UP_TO:
            (self.workdir / "list.json").write_bytes(request(f"{base}/nodes"))
        (self.workdir / "page.json").write_bytes(
            request(f"{base}/nodes?limit={self.args.page}"))

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        """A server under test (the manager, the bare handler): on the manager's core, on
        the event loop ``--loop`` names (FLEETMQ_LOOP: a manager without the option ignores
        it, and runs asyncio)."""
        loop = getattr(self.args, "loop", None)  # bench/auth_cost.py: the manager's default
        env = {**os.environ, **({"FLEETMQ_LOOP": loop} if loop else {})}
        with (self.workdir / f"{name}.out").open("wb") as out:
            proc = subprocess.Popen(PINNING.manager(argv), stdout=out,
                                    stderr=subprocess.STDOUT, env=env)

        self.stack.callback(stop_process, proc)
        return proc

    def scenarios(self) -> list[Scenario]:
        nodes = self.args.nodes
        fleet = f"http://127.0.0.1:{self.http_port}{PREFIX}"
        post_hb = LUA_POST % {"path": f"{PREFIX}/heartbeat", "body": HEARTBEAT_BODY,
                              "nodes": nodes}
        post_reg = LUA_POST % {"path": f"{PREFIX}/register", "body": REGISTER_BODY,
                               "nodes": nodes}
        fleet_size = self.args.fleet
        listing = f"list {fleet_size:,}"
        page = f"page {self.args.page:,} of {fleet_size:,}"
        page_path = f"{PREFIX}/nodes?limit={self.args.page}"
        whole = [
            Scenario(f"list-{fleet_size}-bare", f"{listing}, bare aiohttp (one cached body)",
                     f"http://127.0.0.1:{self.bare_port}{PREFIX}/nodes", "", bare=True),
            Scenario(f"list-{fleet_size}", listing, f"{fleet}/nodes", ""),
            Scenario(f"list-{fleet_size}-mqtt", f"{listing} + {self.args.rate:,} hb/s MQTT",
                     f"{fleet}/nodes", "", mqtt_load=True),
        ] if fleet_size <= WHOLE_LIST_UP_TO else []
        return [
            Scenario("heartbeat-bare", "heartbeat, bare aiohttp",
                     f"http://127.0.0.1:{self.bare_port}{PREFIX}/heartbeat", post_hb, bare=True),
            Scenario("heartbeat", "heartbeat", f"{fleet}/heartbeat", post_hb),
            Scenario("register", "register (update)", f"{fleet}/register", post_reg),
            Scenario("get-one", "get one", f"{fleet}/nodes/node-{min(42, nodes - 1):05d}", ""),
            *whole,
            Scenario(f"page-{self.args.page}-bare", f"{page}, bare aiohttp (one cached body)",
                     f"http://127.0.0.1:{self.bare_port}{page_path}", "", bare=True),
            Scenario(f"page-{self.args.page}", page, f"http://127.0.0.1:{self.http_port}"
                     f"{page_path}", ""),
            Scenario(f"page-{self.args.page}-mqtt", f"{page} + {self.args.rate:,} hb/s MQTT",
                     f"http://127.0.0.1:{self.http_port}{page_path}", "", mqtt_load=True),
        ]

    def run(self, scenario: Scenario) -> Run:
        # Statuses queued by an earlier run (register) go out first: each run starts quiet.
        wait_for(lambda: metric(self.http_port, "fleetmq_mqtt_backlog") == 0, 60,
                 "publisher backlog drained")
        script = self.workdir / f"{scenario.slug}.lua"
        script.write_text(scenario.script + LUA_DONE)
        publisher = stop = sent = None
        before_load = metric(self.http_port, "fleetmq_mqtt_messages_applied_total")
        if scenario.mqtt_load:
            stop, sent = mp.Event(), mp.Value("q", 0)
            publisher = mp.Process(target=paced_publisher, args=(
                self.broker.port, self.args.rate, self.args.fleet, stop, sent))
            publisher.start()
            time.sleep(1.0)  # let the stream settle before measuring
        profiler = self._profile(scenario)
        applied0 = metric(self.http_port, "fleetmq_mqtt_messages_applied_total")
        sent0 = sent.value if sent is not None else 0
        began = time.monotonic()
        try:
            result = subprocess.run(
                [self.wrk, "-t", str(self.args.threads), "-c", str(self.args.connections),
                 "-d", f"{self.args.duration}s", "-s", str(script), scenario.url],
                capture_output=True, text=True, check=True)
        finally:
            elapsed = time.monotonic() - began
            if publisher is not None and stop is not None:
                stop.set()
                publisher.join(10)
                if publisher.is_alive():
                    publisher.kill()
                    publisher.join()
            if profiler is not None:
                profiler.wait(self.args.duration + 30)
        applied = metric(self.http_port, "fleetmq_mqtt_messages_applied_total") - applied0
        eventually = catch_up = None
        if sent is not None:
            # Messages still queued are applied after the run; what never arrives was dropped
            # (Mosquitto's queue for a slow QoS 0 subscriber, or the manager's inbound bound).
            settled, catch_up = self._settled_applied()
            eventually = settled - before_load
        line = next(x for x in result.stdout.splitlines() if x.startswith("WRKJSON "))
        w = json.loads(line.removeprefix("WRKJSON "))
        return Run(
            scenario, w["requests"] / (w["duration_us"] / 1e6), w["p50_us"] / 1000,
            w["p99_us"] / 1000, w["connect"] + w["read"] + w["write"] + w["timeout"],
            w["status"],
            (sent.value - sent0) / elapsed if sent is not None else None,
            applied / elapsed if scenario.mqtt_load else None,
            sent.value if sent is not None else None,
            eventually, catch_up,
        )

    def _settled_applied(self) -> tuple[float, float]:
        """The applied-messages counter once it stops moving (at most 60 s), and how long
        after the run it took to get there."""
        began = time.monotonic()
        last = metric(self.http_port, "fleetmq_mqtt_messages_applied_total")
        moved_at = began
        while time.monotonic() < began + 60:
            time.sleep(0.5)
            now = metric(self.http_port, "fleetmq_mqtt_messages_applied_total")
            if now == last:
                break
            last, moved_at = now, time.monotonic()
        return last, moved_at - began

    def _profile(self, scenario: Scenario) -> subprocess.Popen[bytes] | None:
        if self.args.profile is None or scenario.bare or self.server is None:
            return None
        out = Path(self.args.profile)
        out.mkdir(parents=True, exist_ok=True)
        py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        proc = subprocess.Popen(
            [py_spy, "record", "-r", "100", "-f", "raw", "-o", str(out / f"{scenario.slug}.raw"),
             "--pid", str(self.server.pid), "--duration", str(self.args.duration)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        def stop() -> None:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

        self.stack.callback(stop)
        return proc


def report(args: argparse.Namespace, runs: list[Run], register_s: float) -> None:
    bare = next((r.rps for r in runs if r.scenario.slug == "heartbeat-bare"), None)
    over_mqtt = (f" + {args.fleet - args.nodes:,} over MQTT" if args.fleet > args.nodes else "")
    print(f"machine: {os.cpu_count()} cores, python {sys.version.split()[0]}; wrk "
          f"{args.threads} threads, {args.connections} connections, {args.duration} s per run; "
          f"{args.nodes:,} nodes registered over REST{over_mqtt} in {register_s:.1f} s; "
          f"event loop {args.loop} (manager and bare); pinned: {PINNING.describe()}\n")
    header = ("route", "req/s", "p50", "p99", "errors", "non-2xx", "target", "")
    rows = []
    for r in runs:
        target = note = ""
        if r.scenario.slug == "heartbeat" and bare:
            ratio = r.rps / bare
            ok = ratio >= TARGET_HEARTBEAT_RATIO
            verdict = "met" if ok else "MISSED"
            target = f">= {TARGET_HEARTBEAT_RATIO} x bare: {ratio:.2f} x, {verdict}"
        elif r.scenario.slug.startswith(("list-", "page-")) and not r.scenario.bare:
            want = TARGET_LIST_LOADED_RPS if r.scenario.mqtt_load else TARGET_LIST_RPS
            ok = r.rps >= want
            target = f">= {want:,.0f} req/s: {'met' if ok else 'MISSED'}"
        if r.mqtt_applied_per_s is not None:
            note = (f"MQTT heartbeats published {r.mqtt_published_per_s:,.0f}/s, "
                    f"applied {r.mqtt_applied_per_s:,.0f}/s during the run")
            if r.mqtt_published and r.mqtt_eventually_applied is not None:
                note += (f"; {r.mqtt_eventually_applied / r.mqtt_published:.0%} of all "
                         f"{r.mqtt_published:,} applied in the end, "
                         f"{r.mqtt_catch_up_s:.1f} s after the run")
        rows.append((r.scenario.label, f"{r.rps:,.0f}", f"{r.p50_ms:.1f} ms",
                     f"{r.p99_ms:.1f} ms", str(r.errors), str(r.non_2xx), target, note))
    widths = [max(len(c) for c in col) for col in zip(header, *rows, strict=True)]
    for row in (header, *rows):
        cells = [row[0].ljust(widths[0])]
        cells += [c.rjust(w) for c, w in zip(row[1:6], widths[1:6], strict=True)]
        cells += [c.ljust(w) for c, w in zip(row[6:], widths[6:], strict=True)]
        print("  ".join(cells).rstrip())

    write_result("rest", {
        "machine": machine(),
        "wrk": {"threads": args.threads, "connections": args.connections,
                "duration_s": args.duration},
        "nodes": args.nodes, "fleet": args.fleet, "page": args.page, "loop": args.loop,
        "register_s": register_s, "mqtt_rate": args.rate,
        "targets": {"heartbeat_vs_bare": TARGET_HEARTBEAT_RATIO, "list_rps": TARGET_LIST_RPS,
                    "list_loaded_rps": TARGET_LIST_LOADED_RPS},
        "results": [{
            "scenario": r.scenario.slug, "rps": r.rps, "p50_ms": r.p50_ms, "p99_ms": r.p99_ms,
            "errors": r.errors, "non_2xx": r.non_2xx,
            "mqtt_published_per_s": r.mqtt_published_per_s,
            "mqtt_applied_per_s": r.mqtt_applied_per_s,
            "mqtt_published": r.mqtt_published,
            "mqtt_eventually_applied": r.mqtt_eventually_applied,
            "mqtt_catch_up_s": r.mqtt_catch_up_s,
        } for r in runs],
    })


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds per wrk run")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--nodes", type=int, default=1001,
                        help="nodes registered over REST (heartbeat and register cycle "
                             "through them; default: 1001)")
    parser.add_argument("--fleet", type=int, default=0,
                        help="the fleet's size: nodes beyond --nodes are registered over MQTT "
                             "(default: --nodes; at most 100000)")
    parser.add_argument("--page", type=int, default=1001, help="limit of the paged list")
    parser.add_argument("--loop", choices=("auto", "asyncio", "uvloop"), default="auto",
                        help="event loop of the manager and the bare handler (default: uvloop "
                             "if installed)")
    parser.add_argument("--rate", type=int, default=10_000,
                        help="MQTT heartbeats/s during the loaded listing (default: 10000)")
    parser.add_argument("--only", default="",
                        help="comma-separated scenarios: heartbeat-bare, heartbeat, register, "
                             "get-one, list-<fleet>-bare, list-<fleet>, list-<fleet>-mqtt, "
                             "page-<page>-bare, page-<page>, page-<page>-mqtt")
    parser.add_argument("--profile", metavar="DIR",
                        help="record each fleetmq run with py-spy (raw stacks) into DIR")
    parser.add_argument("--bare-server", nargs=3, metavar=("PORT", "LIST_DIR", "LOOP"),
                        help=argparse.SUPPRESS)
    add_pin_option(parser)
    args = parser.parse_args()
    if args.bare_server is not None:
        bare_server(int(args.bare_server[0]), Path(args.bare_server[1]), args.bare_server[2])
        return
    args.fleet = max(args.fleet, args.nodes)
    if args.fleet > 100_000:
        parser.error("--fleet: at most 100000 (ids are node-00000 to node-99999)")
    args.loop = resolve_loop(args.loop)
    PINNING.start(args.pin)
    with tempfile.TemporaryDirectory(prefix="fleetmq-bench-rest-") as tmp, ExitStack() as stack:
        bench = Bench(args, Path(tmp), stack)
        bench.start()
        chosen = {s for s in args.only.split(",") if s}
        runs = [bench.run(s) for s in bench.scenarios() if not chosen or s.slug in chosen]
    report(args, runs, bench.register_s)


if __name__ == "__main__":
    main()
