"""Memory and registration rate of the real ``fleetmq serve`` as a fleet grows (issue 9: a
million nodes in at most 1 GiB RSS after registering over MQTT and reading the whole fleet once;
registrations over MQTT at least 20,000/s up to 1,000,000 nodes).

A manager (``--store memory://`` by default, MQTT 3.1.1 by default) runs against a Mosquitto of
the bench's own; one client registers ``--nodes`` nodes over MQTT (QoS 1, the example
registration of the contract, distinct ids). The manager's RSS (/proc) and the registrations
applied (``fleetmq_nodes``) are sampled while they arrive; the rate is given per slice of the
fleet. Once every status is out, the whole fleet is read once over REST (streamed, discarded)
and the RSS read again.

``--credentials`` counts a node credential per node: the manager runs with ``--auth on``
(admin key from ``--admin-token-file``, ``--broker-auth external``) and, before the nodes
register, every node gets its credential the way a user gets one with ``memory://`` (whose
credentials live in the manager's process, so nothing can be written to its store from
outside): ``POST /api/v1/fleet/nodes/{id}/credentials`` with the admin key, ``--concurrency``
requests at a time. Each node then logs in once with its token as a broker asks fleetmq to
check a login (``POST /api/v1/broker/authenticate`` with a broker key, the HTTP hooks of
docs/broker-hooks.md), so the manager holds what a credential costs once it has been used.
The registrations still come over MQTT from one bench client that the bench's Mosquitto lets
in anonymously: a million MQTT connections, one per node identity, would measure the
broker and the load generator rather than the manager.

    python bench/serve_memory.py [--nodes 1000000] [--store memory://] [--mqtt-version 3.1.1]
                                 [--publishers 1] [--credentials] [--concurrency 32]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.auth_cost import auth_options, call
from bench.common import (
    PINNING,
    add_pin_option,
    machine,
    metric,
    print_rows,
    print_table,
    start_manager,
    stop_process,
    wait_for,
    write_result,
)
from bench.ingest import register
from bench.startup import rss_mb
from tests.support import Mosquitto

TARGET_MB = 1024
ISSUE = "/api/v1/fleet/nodes/{node_id}/credentials"
AUTHENTICATE = "/api/v1/broker/authenticate"
USE_FLUSH_S = 5.0
"""The manager writes last-use times behind every 5 s (``fleetmq.auth.verifier``)."""


def node_id(i: int) -> str:
    """The id ``bench.ingest.register`` gives node ``i``."""
    return f"node-{i:07d}"


def read_fleet(http_port: int, token: str | None = None) -> tuple[int, float]:
    """GET the whole fleet, discarding the bytes; returns (bytes, seconds)."""
    started = time.monotonic()
    size = 0
    req = urllib.request.Request(f"http://127.0.0.1:{http_port}/api/v1/fleet/nodes",
                                 headers={} if token is None
                                 else {"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=600) as resp:
        while chunk := resp.read(1 << 20):
            size += len(chunk)
    return size, time.monotonic() - started


async def each_node(base: str, token: str, nodes: int, concurrency: int,
                    send: Any) -> tuple[list[Any], float]:
    """``await send(session, base, i)`` for every node, ``concurrency`` at a time over one
    keep-alive pool authenticated with ``token``; the answers in node order and the rate."""
    answers: list[Any] = [None] * nodes
    next_node = iter(range(nodes))
    headers = {"Authorization": f"Bearer {token}"}
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(headers=headers, timeout=timeout,
                                     connector=aiohttp.TCPConnector(limit=concurrency)) as session:

        async def worker() -> None:
            for i in next_node:
                answers[i] = await send(session, base, i)

        started = time.monotonic()
        async with asyncio.TaskGroup() as group:
            for _ in range(concurrency):
                group.create_task(worker())
        seconds = time.monotonic() - started
    return answers, nodes / seconds


async def issue_one(session: aiohttp.ClientSession, base: str, i: int) -> str:
    async with session.post(base + ISSUE.format(node_id=node_id(i)), data=b"") as resp:
        body = await resp.json()
        if resp.status != 201:
            raise RuntimeError(f"issuing {node_id(i)}'s credential: {resp.status} {body}")
    return str(body["token"])


def log_in_with(tokens: list[str]) -> Any:
    async def log_in(session: aiohttp.ClientSession, base: str, i: int) -> None:
        body = {"username": node_id(i), "password": tokens[i], "clientid": node_id(i),
                "peerhost": "127.0.0.1"}
        async with session.post(base + AUTHENTICATE, json=body) as resp:
            answer = await resp.json()
        if answer.get("result") != "allow":
            raise RuntimeError(f"{node_id(i)}'s login was refused: {answer}")
    return log_in


def provision(pid: int, http_port: int, workdir: Path, nodes: int,
              concurrency: int) -> dict[str, float]:
    """A credential per node over REST, then one login per node through the broker hook:
    the rate of each and the manager's RSS after it."""
    admin = (workdir / "admin-token").read_text().strip()
    base = f"http://127.0.0.1:{http_port}"
    broker_key = json.loads(call(f"{base}/api/v1/keys", admin,
                                 json.dumps({"role": "broker", "name": "bench"}).encode()))
    tokens, issued = asyncio.run(each_node(base, admin, nodes, concurrency, issue_one))
    issued_mb = rss_mb(pid)
    _, logged_in = asyncio.run(each_node(base, broker_key["token"], nodes, concurrency,
                                         log_in_with(tokens)))
    time.sleep(USE_FLUSH_S + 1)  # the last uses are written behind to the store
    return {"issued_per_s": issued, "issued_mb": issued_mb, "logins_per_s": logged_in,
            "logged_in_mb": rss_mb(pid)}


def credential_rows(credentials: dict[str, float], nodes: int) -> list[tuple[str, str]]:
    if not credentials:
        return []
    return [
        ("node credentials issued (REST)",
         f"{nodes:,} ({credentials['issued_per_s']:,.0f}/s); RSS "
         f"{credentials['issued_mb']:,.0f} MB"),
        ("each used once (broker hook)",
         f"{nodes:,} logins ({credentials['logins_per_s']:,.0f}/s); RSS "
         f"{credentials['logged_in_mb']:,.0f} MB"),
    ]


def rate_by_slice(samples: list[tuple[float, float, float]], nodes: int,
                  count: int) -> list[tuple[str, str]]:
    """Registrations/s within each of ``count`` slices of the fleet, from the samples."""
    slices = []
    step = nodes / count
    for k in range(count):
        low, high = k * step, (k + 1) * step
        inside = [(t, n) for t, n, _ in samples if low <= n <= high]
        if inside:  # up to the first sample at the slice's highest count, not the wait after
            top = max(n for _, n in inside)
            inside = inside[:next(i for i, (_, n) in enumerate(inside) if n == top) + 1]
        if len(inside) >= 2 and inside[-1][0] > inside[0][0]:
            (t0, n0), (t1, n1) = inside[0], inside[-1]
            slices.append((f"{int(low):,} - {int(high):,}", f"{(n1 - n0) / (t1 - t0):,.0f}"))
        else:
            slices.append((f"{int(low):,} - {int(high):,}", "-"))
    return slices


def main() -> None:  # noqa: PLR0915  (one run, told in order)
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=1_000_000)
    parser.add_argument("--store", default="memory://")
    parser.add_argument("--mqtt-version", default="3.1.1", choices=["3.1.1", "5"])
    parser.add_argument("--publishers", type=int, default=1,
                        help="registering processes (one paho client each)")
    parser.add_argument("--slices", type=int, default=5,
                        help="the registration rate is given for this many slices of the fleet")
    parser.add_argument("--credentials", action="store_true",
                        help="auth on: a node credential per node, issued over REST and used "
                             "once, before the nodes register")
    parser.add_argument("--concurrency", type=int, default=32,
                        help="REST requests in flight while issuing and logging in")
    add_pin_option(parser)
    args = parser.parse_args()
    PINNING.start(args.pin)
    samples: list[tuple[float, float, float]] = []  # (seconds, nodes, RSS MB)
    credentials: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="fleetmq-bench-serve-memory-") as tmp:
        workdir = Path(tmp)
        broker = Mosquitto(workdir)
        broker.start()
        try:
            auth = auth_options(workdir, None) if args.credentials else ()
            proc, http_port = start_manager(broker.url, "servemem", "--mqtt-version",
                                            args.mqtt_version, *auth, workdir=workdir,
                                            store=args.store)
            try:
                idle_mb = rss_mb(proc.pid)
                if args.credentials:
                    credentials = provision(proc.pid, http_port, workdir, args.nodes,
                                            args.concurrency)
                stop = threading.Event()
                started = time.monotonic()

                def sample() -> None:
                    while not stop.is_set():
                        try:
                            nodes = metric(http_port, "fleetmq_nodes")
                        except OSError:
                            nodes = samples[-1][1] if samples else 0.0
                        samples.append((time.monotonic() - started, nodes, rss_mb(proc.pid)))
                        time.sleep(0.5)

                sampler = threading.Thread(target=sample, daemon=True)
                sampler.start()
                try:
                    rate, done, dropped = register(broker.port, http_port, "servemem", args.nodes,
                                                    publishers=args.publishers)
                finally:
                    stop.set()
                    sampler.join()
                wait_for(lambda: metric(http_port, "fleetmq_mqtt_backlog") == 0, 600,
                         "statuses out")
                time.sleep(2)
                registered_mb = rss_mb(proc.pid)
                size, read_s = read_fleet(
                    http_port, (workdir / "admin-token").read_text().strip()
                    if args.credentials else None)
                time.sleep(1)
                read_mb = rss_mb(proc.pid)
            finally:
                stop_process(proc)
        finally:
            broker.stop()
    slices = rate_by_slice(samples, args.nodes, args.slices)
    peak_mb = max((mb for _, _, mb in samples), default=0.0)
    print()
    print_rows([
        ("machine", f"{machine()['cores']} cores, python {machine()['python']}, pinned: "
                    f"{PINNING.describe()}"),
        ("manager", f"fleetmq serve --store {args.store} --mqtt-version {args.mqtt_version}"
                    + (" --auth on --broker-auth external" if args.credentials else "")),
        ("RSS idle", f"{idle_mb:,.0f} MB"),
        *credential_rows(credentials, args.nodes),
        ("nodes registered over MQTT", f"{args.nodes:,} from {args.publishers} processes "
                                       f"({rate:,.0f} registrations/s overall)"),
        ("stored, replied to and published", f"{done:,.0f}/s overall, {dropped:,} replies "
                                             "dropped"),
        ("RSS registered (statuses out)",
         f"{registered_mb:,.0f} MB ({registered_mb * 2**20 / args.nodes:,.0f} B per node; "
         f"peak while registering {peak_mb:,.0f} MB)"),
        ("whole fleet read once", f"{size / 1e6:,.0f} MB in {read_s:.1f} s"),
        ("RSS after the read",
         f"{read_mb:,.0f} MB ({read_mb * 2**20 / args.nodes:,.0f} B per node); target "
         f"<= {TARGET_MB:,} MB: {'met' if read_mb <= TARGET_MB else 'MISSED'}"),
    ])
    print()
    print_table(("nodes (slice)", "registrations/s"), slices)
    write_result("serve_memory", {
        "machine": machine(), "nodes": args.nodes, "store": args.store,
        "mqtt_version": args.mqtt_version, "credentials": credentials, "rate": rate,
        "done": done, "dropped": dropped,
        "idle_mb": idle_mb,
        "registered_mb": registered_mb, "read_mb": read_mb, "peak_mb": peak_mb,
        "read_bytes": size, "read_s": read_s, "slices": slices, "samples": samples})


if __name__ == "__main__":
    main()
