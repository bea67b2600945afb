"""A takeover as REST clients see it through a load balancer (docs/ha.md section 5).

Two managers on one PostgreSQL store and one Mosquitto (servers of the bench's own, free
ports), with HAProxy running docs/examples/haproxy.cfg, or nginx running the snippet of
docs/ha.md (its ports moved to free ones). A client asks GET /api/v1/fleet/summary through the
proxy every 50 ms; the active manager is killed (``kill -9``), then the new one paused
(``SIGSTOP``, resumed after). Prints how long until the proxy answered 200 promptly again, its
slowest answer, and what it answered meanwhile. Needs the ``haproxy`` or ``nginx`` binary.

    python bench/ha_proxy.py [--proxy haproxy nginx] [--lease 10]
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import machine, print_table, stop_process, wait_for, write_result
from tests.support import Mosquitto, Postgres, free_port, postgres_bindir

REPO = Path(__file__).resolve().parent.parent


def status(url: str, timeout: float = 3.0) -> int:
    """The HTTP status, 0 when there was no answer."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError:
        return 0


def haproxy(work: Path, front: int, ports: list[int]) -> subprocess.Popen[bytes]:
    config = (REPO / "docs/examples/haproxy.cfg").read_text()
    config = config.replace("bind :8080", f"bind 127.0.0.1:{front}")
    config = config.replace("bind :8404", f"bind 127.0.0.1:{free_port()}")
    (work / "haproxy.cfg").write_text(config)
    env = {**os.environ, "FLEETMQ_A": f"127.0.0.1:{ports[0]}",
           "FLEETMQ_B": f"127.0.0.1:{ports[1]}"}
    with (work / "haproxy.log").open("ab") as log:
        return subprocess.Popen(["haproxy", "-db", "-f", str(work / "haproxy.cfg")], env=env,
                                stdout=log, stderr=subprocess.STDOUT)


def nginx(work: Path, front: int, ports: list[int]) -> subprocess.Popen[bytes]:
    doc = (REPO / "docs/ha.md").read_text()
    found = re.search(r"### nginx.*?```\n(upstream.*?)```", doc, re.DOTALL)
    if found is None:
        raise SystemExit("docs/ha.md has no nginx snippet")
    snippet = (found.group(1).replace("10.0.0.11:8080", f"127.0.0.1:{ports[0]}")
               .replace("10.0.0.12:8080", f"127.0.0.1:{ports[1]}")
               .replace("listen 8080;", f"listen 127.0.0.1:{front};"))
    (work / "nginx.conf").write_text(
        f"pid {work}/nginx.pid;\nerror_log {work}/nginx.log;\ndaemon off;\nevents {{}}\n"
        f"http {{\naccess_log off;\nclient_body_temp_path {work};\nproxy_temp_path {work};\n"
        f"{snippet}}}\n")
    return subprocess.Popen(["nginx", "-c", str(work / "nginx.conf"), "-p", str(work)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)


SLOW_S = 1.0
"""An answer that takes longer than this counts as part of the outage, even a 200."""


def outage(url: str, victim: subprocess.Popen[bytes], how: signal.Signals,
           limit_s: float) -> tuple[float, float, Counter[int]]:
    """Signal the active and poll through the proxy until it answers 200 promptly again,
    after at least one error or slow answer. Returns that time, the slowest answer and the
    answers seen."""
    seen: Counter[int] = Counter()
    started = time.monotonic()
    os.kill(victim.pid, how)
    failed = False
    slowest = 0.0
    while time.monotonic() - started < limit_s:
        asked = time.monotonic()
        code = status(url, timeout=15.0)  # longer than the proxies wait on a paused manager
        took = time.monotonic() - asked
        slowest = max(slowest, took)
        seen[code] += 1
        if code != 200 or took > SLOW_S:
            failed = True
        elif failed:
            break
        time.sleep(0.05)
    return time.monotonic() - started, slowest, seen


def run(proxy: str, lease: str, work: Path, pg: Postgres, mosq: Mosquitto) -> list[tuple[str, ...]]:
    ports = [free_port(), free_port()]
    procs: dict[int, subprocess.Popen[bytes]] = {}

    def start(port: int) -> None:
        with (work / f"manager-{port}.log").open("ab") as log:
            procs[port] = subprocess.Popen(
                [sys.executable, "-m", "fleetmq", "serve", "--store", pg.url(),
                 "--broker", mosq.url, "--http", f"127.0.0.1:{port}", "--lease", lease,
                 "--advertise-url", f"http://127.0.0.1:{port}", "--log-level", "warning"],
                stdout=log, stderr=subprocess.STDOUT, cwd=work)
        wait_for(lambda: status(f"http://127.0.0.1:{port}/healthz") == 200, 30, "manager up")

    def active() -> int:
        return next(p for p in ports if procs[p].poll() is None
                    and status(f"http://127.0.0.1:{p}/readyz") == 200)

    for port in ports:
        start(port)  # the first one is active when the second starts
    front = free_port()
    balancer = (haproxy if proxy == "haproxy" else nginx)(work, front, ports)
    url = f"http://127.0.0.1:{front}/api/v1/fleet/summary"
    rows = []
    try:
        wait_for(lambda: status(url) == 200, 10, "proxy answers 200")
        killed = active()
        seconds, slowest, seen = outage(url, procs[killed], signal.SIGKILL, float(lease) + 30)
        rows.append((proxy, "kill -9", f"{seconds:.2f}", f"{slowest:.2f}", _counts(seen)))
        procs[killed].wait()
        start(killed)  # back, as a standby
        wait_for(lambda: status(f"http://127.0.0.1:{killed}/readyz") == 503, 30, "standby")
        paused = active()
        seconds, slowest, seen = outage(url, procs[paused], signal.SIGSTOP, float(lease) + 30)
        os.kill(procs[paused].pid, signal.SIGCONT)
        rows.append((proxy, "SIGSTOP", f"{seconds:.2f}", f"{slowest:.2f}", _counts(seen)))
    finally:
        stop_process(balancer)
        for proc in procs.values():
            stop_process(proc)
    return rows


def _counts(seen: Counter[int]) -> str:
    return ", ".join(f"{code or 'none'}: {n}" for code, n in sorted(seen.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--proxy", nargs="+", default=["haproxy", "nginx"],
                        choices=["haproxy", "nginx"])
    parser.add_argument("--lease", default="10")
    args = parser.parse_args()
    bindir = postgres_bindir()
    if bindir is None:
        raise SystemExit("PostgreSQL server binaries not found (apt-get install postgresql)")
    rows: list[tuple[str, ...]] = []
    for proxy in args.proxy:
        work = Path(tempfile.mkdtemp(prefix="fleetmq-mosq-ha-proxy-"))
        pg, mosq = Postgres(bindir), Mosquitto(work)
        pg.start()
        try:
            mosq.start()
            try:
                rows += run(proxy, args.lease, work, pg, mosq)
            finally:
                mosq.stop()
        finally:
            pg.stop()
    print(f"lease {args.lease} s; GET /api/v1/fleet/summary through the proxy every 50 ms")
    print(f"outage: until a prompt 200 (within {SLOW_S:g} s) after an error or a slow answer")
    print_table(("proxy", "the active", "outage (s)", "slowest answer (s)",
                 "answers meanwhile"), rows)
    write_result("ha_proxy", {"machine": machine(), "lease_s": float(args.lease), "results": [
        {"proxy": proxy, "event": event, "outage_s": float(outage_s),
         "slowest_s": float(slowest_s), "answers": answers}
        for proxy, event, outage_s, slowest_s, answers in rows]})


if __name__ == "__main__":
    main()
