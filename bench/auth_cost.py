"""What access control costs: MQTT ingest and REST with auth off and on, in one run.

Target of issue 8: with auth on, MQTT ingest and the REST heartbeat each lose at most 10%.

- MQTT ingest (bench/ingest.py's measurement): auth off is ``fleetmq serve`` on an anonymous
  Mosquitto, as bench/ingest.py runs it; auth on is ``fleetmq serve --auth on --broker-auth
  dynsec`` on a Mosquitto with the dynamic security plugin, whose publishers log in as ``write``
  API keys (username = client id = ``_key.<id>``, password = the token; one key per publisher
  process, since a client id is connected once). The keys are made over REST with the admin
  token the manager wrote, and reach the broker through the manager's dynsec mirror. The bare
  count-only subscriber runs on both brokers too (on the dynsec one as a client made by hand
  with ``mosquitto_ctrl``): the broker's own cost of its ACL checks, apart from fleetmq's.
- REST (bench/rest.py's measurement, wrk): heartbeat with a ``write`` key as bearer, get one
  and list 1,001 with a ``read`` key, against a manager with auth off and one with auth on
  (on the same kind of anonymous Mosquitto, ``--broker-auth external``: the gate is what is
  measured), route by route, off then on.

Both managers run with ``--key-rate``/``--key-burst`` of a million (as the benches do with
``UNLIMITED_NODES``): one key stands for a whole fleet here; the limiter still runs. Their
/metrics is public (``--metrics-public true``): the bench reads its counters from it.

    python bench/auth_cost.py --nodes 100000 --messages 400000
    python bench/auth_cost.py --only rest --duration 10
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import ingest, rest
from bench.common import (
    PINNING,
    UNLIMITED_NODES,
    add_pin_option,
    answers,
    fresh_store,
    machine,
    print_rows,
    print_table,
    start_manager,
    stop_process,
    wait_for,
    write_result,
)
from tests.support import Mosquitto

UNLIMITED_KEYS = ("--key-rate", "1000000", "--key-burst", "1000000")
TARGET = 0.9
"""Auth on keeps at least 90% of the auth-off rate."""


def auth_options(workdir: Path, broker: Mosquitto | None) -> tuple[str, ...]:
    options = ("--auth", "on", "--admin-token-file", str(workdir / "admin-token"),
               "--metrics-public", "true", *UNLIMITED_KEYS)
    if broker is None:  # the REST half: the gate is measured, the broker takes anyone
        return (*options, "--broker-auth", "external")
    return (*options, "--broker-auth", "dynsec", "--broker-admin", broker.admin_url)


def call(url: str, token: str | None, body: bytes | None = None) -> bytes:
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=body, headers=headers,
                                 method="POST" if body is not None else "GET")
    with urllib.request.urlopen(req, timeout=10) as resp:
        return bytes(resp.read())


def make_keys(http_port: int, workdir: Path, role: str, count: int) -> list[ingest.Login]:
    """``count`` API keys of ``role`` over REST (admin token from the manager's file), as
    MQTT logins: (``_key.<id>``, token)."""
    admin = (workdir / "admin-token").read_text().strip()
    made = []
    for k in range(count):
        body = json.dumps({"role": role, "name": f"bench-{role}-{k}"}).encode()
        key = json.loads(call(f"http://127.0.0.1:{http_port}/api/v1/keys", admin, body))
        made.append((f"_key.{key['id']}", str(key["token"])))
    return made


def can_log_in(port: int, login: ingest.Login) -> bool:
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=login[0])
    client.username_pw_set(*login)
    try:
        client.connect("127.0.0.1", port, keepalive=10)
        client.loop_start()
        deadline = time.monotonic() + 5
        while not client.is_connected() and time.monotonic() < deadline:
            time.sleep(0.02)
        return bool(client.is_connected())
    finally:
        client.disconnect()
        client.loop_stop()


def ctrl(broker: Mosquitto, *words: str) -> None:
    admin = ("-h", "127.0.0.1", "-p", str(broker.port), "-u", "admin", "-P",
             broker.admin_password)
    subprocess.run(["mosquitto_ctrl", *admin, "dynsec", *words], check=True,
                   capture_output=True, timeout=30)


def bare_logins(broker: Mosquitto, root: str, publishers: int) -> list[ingest.Login]:
    """A role that may publish, subscribe and receive under ``root``, and clients holding it
    (made by hand, so fleetmq's reconciliation leaves them alone): subscriber first."""
    ctrl(broker, "createRole", "bench-bare")
    for acl in ("publishClientSend", "subscribePattern", "publishClientReceive"):
        ctrl(broker, "addRoleACL", "bench-bare", acl, f"{root}/#", "allow")
    logins = []
    for name in ["bench-bare", *(f"bench-bare-pub-{k}" for k in range(publishers))]:
        password = os.urandom(12).hex()
        ctrl(broker, "createClient", name, "-p", password)
        ctrl(broker, "addClientRole", name, "bench-bare")
        logins.append((name, password))
    return logins


# --- MQTT ingest -------------------------------------------------------------------------------

@dataclass
class Pair:
    """One measurement with auth off and on, repeated in alternation (off, on, off, on, ...):
    this box is shared, and a ratio of medians of interleaved rounds moves far less than two
    single runs minutes apart."""
    key: str
    label: str
    off: list[ingest.Result] = field(default_factory=list)
    on: list[ingest.Result] = field(default_factory=list)
    off_cpu: list[dict[str, float]] = field(default_factory=list)
    on_cpu: list[dict[str, float]] = field(default_factory=list)
    """CPU microseconds per message counted, by process (``manager``, ``broker``): unlike the
    rates, barely moved by other jobs on the box."""

    def measure(self, on: bool, pids: dict[str, int],
                run: Callable[[], ingest.Result]) -> None:
        before = {name: cpu_s(pid) for name, pid in pids.items()}
        result = run()
        used = {name: (cpu_s(pid) - before[name]) / max(result.counted, 1) * 1e6
                for name, pid in pids.items()}
        (self.on if on else self.off).append(result)
        (self.on_cpu if on else self.off_cpu).append(used)

    @staticmethod
    def median(side: list[ingest.Result]) -> float:
        return statistics.median(r.per_s for r in side)

    @property
    def ratio(self) -> float:
        return self.median(self.on) / self.median(self.off)

    def doc(self) -> dict[str, object]:
        return {"key": self.key, "label": self.label, "ratio": self.ratio,
                "off_median_per_s": self.median(self.off),
                "on_median_per_s": self.median(self.on),
                "off": [{**asdict(r), "lost": r.lost, "cpu_us_per_msg": c}
                        for r, c in zip(self.off, self.off_cpu, strict=True)],
                "on": [{**asdict(r), "lost": r.lost, "cpu_us_per_msg": c}
                       for r, c in zip(self.on, self.on_cpu, strict=True)]}


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far (/proc/<pid>/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def manager_on(broker: Mosquitto, root: str, args: argparse.Namespace, version: str,
               stack: ExitStack) -> tuple[int, int, list[ingest.Login]]:
    """``fleetmq serve --auth on --broker-auth dynsec``, its fleet registered by a write key;
    its pid, HTTP port and the publishers' write keys (provisioned in the broker)."""
    proc, http_port = start_manager(broker.url, root, "--mqtt-version", version,
                                    *auth_options(broker.workdir, broker),
                                    workdir=broker.workdir, wrap=args.wrap.split())
    stack.callback(stop_process, proc)
    keys = make_keys(http_port, broker.workdir, "write", args.publishers + 1)
    for login in keys:  # through the mirror into the broker: within a second
        wait_for(lambda login=login: can_log_in(broker.port, login), 30,  # type: ignore[misc]
                 "write key provisioned in the broker")
    ingest.register(broker.port, http_port, root, args.nodes, keys[0])
    return proc.pid, http_port, keys[1:]


def manager_off(broker: Mosquitto, root: str, args: argparse.Namespace, version: str,
                stack: ExitStack) -> tuple[int, int]:
    proc, http_port = start_manager(broker.url, root, "--mqtt-version", version,
                                    workdir=broker.workdir, wrap=args.wrap.split())
    stack.callback(stop_process, proc)
    ingest.register(broker.port, http_port, root, args.nodes)
    return proc.pid, http_port


def pid(broker: Mosquitto) -> int:
    assert broker.proc is not None
    return broker.proc.pid


def measure_ingest(args: argparse.Namespace, tmp: Path) -> list[Pair]:
    off_dir, on_dir = tmp / "off", tmp / "on"
    off_dir.mkdir()
    on_dir.mkdir()
    pairs: list[Pair] = []
    with ExitStack() as stack:
        off = Mosquitto(off_dir)
        on = Mosquitto(on_dir, dynsec=True)
        for broker in (off, on):
            broker.start()
            stack.callback(broker.stop)
        if not args.skip_bare:
            bare = Pair("bare", "bare paho subscriber, 3.1.1")
            logins = bare_logins(on, "bare", args.publishers)
            for _ in range(args.rounds):
                bare.measure(False, {"broker": pid(off)},
                             partial(ingest.bare_subscriber, off.port, "bare", args))
                bare.measure(True, {"broker": pid(on)},
                             partial(ingest.bare_subscriber, on.port, "bare", args,
                                     logins=logins))
            pairs.append(bare)
        for version in args.mqtt_versions:
            root = "fleet" if version == "5" else "fleet3"
            pair = Pair(f"fleetmq-{version}", f"fleetmq applied, MQTT {version}")
            with ExitStack() as managers:  # both alive, each idle while the other runs
                off_pid, off_http = manager_off(off, root, args, version, managers)
                on_pid, on_http, keys = manager_on(on, root, args, version, managers)
                for _ in range(args.rounds):
                    pair.measure(False, {"manager": off_pid, "broker": pid(off)},
                                 partial(ingest.applied, off.port, off_http, root, args, "off",
                                         ""))
                    pair.measure(True, {"manager": on_pid, "broker": pid(on)},
                                 partial(ingest.applied, on.port, on_http, root, args, "on", "",
                                         keys))
            pairs.append(pair)
    return pairs


def report_ingest(args: argparse.Namespace, pairs: list[Pair]) -> None:
    published = args.messages // args.publishers * args.publishers
    rows = [("machine", f"{os.cpu_count()} cores, python {sys.version.split()[0]}"),
            ("nodes, heartbeats per round (QoS 0)", f"{args.nodes:,}, {published:,}"),
            ("rounds (off, on alternating)", f"{args.rounds}; medians below")]
    for pair in pairs:
        sides = (("anonymous", "dynsec login") if pair.key == "bare" else
                 ("auth off", "auth on"))
        for side, runs, cpu in zip(sides, (pair.off, pair.on), (pair.off_cpu, pair.on_cpu),
                                   strict=True):
            lost = sum(r.lost for r in runs)
            rates = ", ".join(f"{r.per_s:,.0f}" for r in runs)
            rows.append((f"{pair.label}, {side}",
                         f"{Pair.median(runs):,.0f} msg/s ({rates}), {lost:,} lost"))
            used = " / ".join(f"{statistics.median(c[name] for c in cpu):.1f}"
                              for name in cpu[0])
            rows.append((f"  CPU us/msg, {' / '.join(cpu[0])}", used))
        verdict = ("" if pair.key == "bare" else
                   f"  (>= {TARGET:.2f}: {'met' if pair.ratio >= TARGET else 'MISSED'})")
        rows.append(("  auth on / auth off", f"{pair.ratio:.2f}{verdict}"))
    print_rows(rows)


# --- REST --------------------------------------------------------------------------------------

class GateBench(rest.Bench):
    """bench/rest.py's Bench with a manager of auth off or on, and its scenarios' requests
    carrying a bearer token (a write key for heartbeats, a read key for reads)."""

    def __init__(self, args: argparse.Namespace, workdir: Path, stack: ExitStack,
                 auth: bool) -> None:
        super().__init__(args, workdir, stack)
        self.auth = auth
        self.write: str | None = None
        self.read: str | None = None

    def start(self) -> None:
        self.broker.start()
        self.stack.callback(self.broker.stop)
        options = auth_options(self.workdir, None) if self.auth else ()
        self.server = self._spawn("fleetmq", [
            sys.executable, "-m", "fleetmq", "serve", "--broker", self.broker.url,
            "--http", f"127.0.0.1:{self.http_port}", "--store", fresh_store(self.workdir),
            "--topic-root", rest.ROOT, *UNLIMITED_NODES, "--log-level", "warning", *options])
        wait_for(lambda: answers(f"http://127.0.0.1:{self.http_port}/readyz"), 30,
                 "fleetmq serve ready (see its output in the work directory)")
        if self.auth:
            self.write = make_keys(self.http_port, self.workdir, "write", 1)[0][1]
            self.read = make_keys(self.http_port, self.workdir, "read", 1)[0][1]
        base = f"http://127.0.0.1:{self.http_port}{rest.PREFIX}"
        for i in range(self.args.nodes):
            call(f"{base}/register", self.write, (rest.REGISTER_BODY % (i, i)).encode())
            call(f"{base}/heartbeat", self.write, (rest.HEARTBEAT_BODY % (i, i)).encode())

    def _profile(self, scenario: rest.Scenario) -> subprocess.Popen[bytes] | None:
        """``--profile DIR``: DIR/off and DIR/on, one raw py-spy file per route."""
        if self.args.profile is None:
            return None
        base = self.args.profile
        self.args.profile = str(Path(base) / ("on" if self.auth else "off"))
        try:
            return super()._profile(scenario)
        finally:
            self.args.profile = base

    def scenarios(self) -> list[rest.Scenario]:
        nodes = self.args.nodes
        fleet = f"http://127.0.0.1:{self.http_port}{rest.PREFIX}"
        headers = '{["Content-Type"] = "application/json"}'
        post_hb = rest.LUA_POST % {"path": f"{rest.PREFIX}/heartbeat",
                                   "body": rest.HEARTBEAT_BODY, "nodes": nodes}
        get = ""
        if self.auth:
            post_hb = post_hb.replace(headers, '{["Content-Type"] = "application/json", '
                                      f'["Authorization"] = "Bearer {self.write}"}}')
            get = f'wrk.headers["Authorization"] = "Bearer {self.read}"\n'
        return [
            rest.Scenario("heartbeat", "heartbeat (write key)", f"{fleet}/heartbeat", post_hb),
            rest.Scenario("get-one", "get one (read key)",
                          f"{fleet}/nodes/node-{min(42, nodes - 1):05d}", get),
            rest.Scenario(f"list-{nodes}", f"list {nodes:,} (read key)", f"{fleet}/nodes", get),
        ]


def measure_rest(args: argparse.Namespace, tmp: Path) -> list[dict[str, Any]]:
    """Both managers up; each route run off, on, off, on, ... (``--rounds`` each)."""
    args.rate = 0  # no MQTT load scenario here
    rows: list[dict[str, Any]] = []
    with ExitStack() as stack:
        benches = {}
        for auth in (False, True):
            where = tmp / f"rest-{'on' if auth else 'off'}"
            where.mkdir()
            benches[auth] = GateBench(args, where, stack, auth)
            benches[auth].start()
        for off_s, on_s in zip(benches[False].scenarios(), benches[True].scenarios(),
                               strict=True):
            off: list[dict[str, float]] = []
            on: list[dict[str, float]] = []
            for _ in range(args.rounds):
                off.append(timed_run(benches[False], off_s))
                on.append(timed_run(benches[True], on_s))
            off_rps = statistics.median(r["rps"] for r in off)
            on_rps = statistics.median(r["rps"] for r in on)
            rows.append({"scenario": off_s.slug, "label": off_s.label, "off": off, "on": on,
                         "off_median_rps": off_rps, "on_median_rps": on_rps,
                         "ratio": on_rps / off_rps})
    return rows


def timed_run(bench: GateBench, scenario: rest.Scenario) -> dict[str, float]:
    """One wrk run, with the manager's CPU microseconds per request answered."""
    assert bench.server is not None
    before = cpu_s(bench.server.pid)
    run = bench.run(scenario)
    used = cpu_s(bench.server.pid) - before
    return {"rps": run.rps, "p50_ms": run.p50_ms, "p99_ms": run.p99_ms, "errors": run.errors,
            "non_2xx": run.non_2xx,
            "cpu_us_per_req": used / max(run.rps * bench.args.duration, 1) * 1e6}


def report_rest(args: argparse.Namespace, rows: list[dict[str, Any]]) -> None:
    print(f"machine: {os.cpu_count()} cores, python {sys.version.split()[0]}; wrk "
          f"{args.threads} threads, {args.connections} connections, {args.duration} s per run; "
          f"{args.nodes:,} nodes registered; {args.rounds} rounds (off, on alternating), "
          f"medians; pinned: {PINNING.describe()}\n")
    table = []
    for row in rows:
        off, on, ratio = row["off"], row["on"], row["ratio"]
        target = ""
        if row["scenario"] == "heartbeat":
            target = f">= {TARGET:.2f}: {'met' if ratio >= TARGET else 'MISSED'}"
        p99 = (statistics.median(r["p99_ms"] for r in off),
               statistics.median(r["p99_ms"] for r in on))
        cpu = (statistics.median(r["cpu_us_per_req"] for r in off),
               statistics.median(r["cpu_us_per_req"] for r in on))
        table.append((
            str(row["label"]), f"{row['off_median_rps']:,.0f}", f"{row['on_median_rps']:,.0f}",
            f"{ratio:.2f}", f"{p99[0]:.1f} / {p99[1]:.1f} ms", f"{cpu[0]:.0f} / {cpu[1]:.0f}",
            str(sum(r["errors"] for r in off + on)), str(sum(r["non_2xx"] for r in off + on)),
            target,
            " / ".join(f"{a['rps']:,.0f}-{b['rps']:,.0f}" for a, b in zip(off, on, strict=True))))
    print_table(("route", "off req/s", "on req/s", "on/off", "p99 off / on",
                 "CPU us/req off / on", "errors",
                 "non-2xx", "target", "rounds (off-on)"), table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("ingest", "rest"), help="one half only")
    parser.add_argument("--nodes", type=int, default=100_000, help="nodes for the ingest half")
    parser.add_argument("--messages", type=int, default=400_000)
    parser.add_argument("--publishers", type=int, default=2)
    parser.add_argument("--qos", type=int, default=0, choices=(0, 1))
    parser.add_argument("--mqtt-versions", nargs="+", default=["5", "3.1.1"],
                        choices=["5", "3.1.1"], help="the manager's protocols to measure")
    parser.add_argument("--rounds", type=int, default=3,
                        help="measurements per side, off and on alternating (default: 3)")
    parser.add_argument("--skip-bare", action="store_true", help="no bare subscribers")
    parser.add_argument("--wrap", default="", help="prefix for the managers' command (ingest)")
    parser.add_argument("--store", default="sqlite", help=argparse.SUPPRESS)
    parser.add_argument("--rest-nodes", type=int, default=1001)
    parser.add_argument("--duration", type=int, default=10, help="seconds per wrk run")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--profile", metavar="DIR",
                        help="record each REST run of a manager with py-spy into DIR")
    add_pin_option(parser)
    args = parser.parse_args()
    PINNING.start(args.pin)
    doc: dict[str, object] = {"machine": machine(), "target_ratio": TARGET}
    with tempfile.TemporaryDirectory(prefix="fleetmq-bench-auth-") as name:
        tmp = Path(name)
        if args.only in (None, "ingest"):
            pairs = measure_ingest(args, tmp)
            report_ingest(args, pairs)
            doc["ingest"] = {"nodes": args.nodes, "publishers": args.publishers,
                             "qos": args.qos, "rounds": args.rounds,
                             "results": [pair.doc() for pair in pairs]}
        if args.only in (None, "rest"):
            if "ingest" in doc:
                print()
            ingest_nodes, args.nodes = args.nodes, args.rest_nodes
            rows = measure_rest(args, tmp)
            report_rest(args, rows)
            args.nodes = ingest_nodes
            doc["rest"] = {"nodes": args.rest_nodes, "threads": args.threads,
                           "connections": args.connections, "duration_s": args.duration,
                           "results": rows}
    write_result("auth_cost", doc)


if __name__ == "__main__":
    main()
