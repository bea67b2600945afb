"""The HTTP auth hooks under a broker's load: a reconnect storm, authorize calls/s, revocation.

Fills a fresh SQLite store with ``--credentials`` node credentials (one token each), an admin
key and a broker key, starts its own Mosquitto on a free port and ``fleetmq serve --auth on
--broker-auth external`` on that store as a subprocess, then plays the broker's side with an
aiohttp client holding at most ``--concurrency`` connections (EMQX keeps a pool of HTTP
connections per node; 8 by default, more for large fleets):

- storm: ``--nodes`` nodes' authenticate calls all at once; time until every one is answered;
- authorize: ``--authorize`` calls (publish of each node's own heartbeat), calls/s;
- revocation: a node's credentials revoked through the store by a second process's
  ``AuthService`` (what ``fleetmq credentials revoke`` does) while one client asks authorize
  in a loop; time from the revoke's commit to the first deny, ``--revocations`` times.
  (A revocation through the manager's own REST route is applied before it answers, so there
  the next check denies by construction; the store path is the slow one.)

    python bench/hooks.py --nodes 10000 --credentials 100000 --concurrency 64
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import fresh_store, machine, print_rows, start_manager, stop_process, write_result
from fleetmq.auth.service import AuthService
from fleetmq.auth.store import Credential
from fleetmq.auth.tokens import digest, new_key_id, new_token
from fleetmq.config import parse_store
from fleetmq.core.clock import SystemClock
from fleetmq.store import make_auth_store
from tests.support import Mosquitto

ROOT = "bench"
AUTHENTICATE = "/api/v1/broker/authenticate"
AUTHORIZE = "/api/v1/broker/authorize"
SAVE_BATCH = 10_000


def node_id(i: int) -> str:
    return f"node-{i:06d}"


async def fill_store(url: str, credentials: int) -> tuple[AuthService, str, list[str]]:
    """The broker key's token and every node's token, written straight to the store in
    batches (issuing them one by one is one commit each: minutes at 100,000)."""
    auth = AuthService(make_auth_store(parse_store(url)), SystemClock())
    await auth.store.open()
    await auth.load()
    await auth.create_key("admin", actor="bench")
    _, broker_token = await auth.create_key("broker", actor="bench")
    tokens = [new_token("node") for _ in range(credentials)]
    now = time.time()
    for start in range(0, credentials, SAVE_BATCH):
        batch = [Credential(id=new_key_id(), digest=digest(tokens[i]), created_at=now,
                            node_id=node_id(i))
                 for i in range(start, min(start + SAVE_BATCH, credentials))]
        await auth.store.save(batch, [])
    await auth.refresh()
    return auth, broker_token, tokens


async def call(session: aiohttp.ClientSession, url: str, body: dict[str, Any],
               latencies: list[float]) -> str:
    started = time.perf_counter()
    async with session.post(url, json=body) as resp:
        answer = await resp.json()
    latencies.append(time.perf_counter() - started)
    return str(answer["result"]) if resp.status == 200 else f"http-{resp.status}"


def summary(latencies: list[float]) -> str:
    ordered = sorted(latencies)
    p50 = ordered[len(ordered) // 2] * 1000
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000
    return f"p50 {p50:.1f} ms, p99 {p99:.1f} ms, max {ordered[-1] * 1000:.1f} ms"


async def storm(session: aiohttp.ClientSession, base: str, tokens: list[str],
                nodes: int) -> dict[str, Any]:
    latencies: list[float] = []
    started = time.perf_counter()
    results = await asyncio.gather(*(
        call(session, base + AUTHENTICATE, {"username": node_id(i), "password": tokens[i],
                                            "clientid": node_id(i), "peerhost": "192.0.2.1"},
             latencies) for i in range(nodes)))
    seconds = time.perf_counter() - started
    return {"logins": nodes, "allowed": results.count("allow"), "seconds": round(seconds, 3),
            "per_s": round(nodes / seconds), "latency": summary(latencies)}


async def authorize_rate(session: aiohttp.ClientSession, base: str, calls: int,
                         nodes: int) -> dict[str, Any]:
    latencies: list[float] = []
    started = time.perf_counter()
    results = await asyncio.gather(*(
        call(session, base + AUTHORIZE, {
            "username": node_id(i % nodes), "clientid": node_id(i % nodes), "action": "publish",
            "topic": f"{ROOT}/{node_id(i % nodes)}/heartbeat", "qos": 0, "retain": False},
            latencies) for i in range(calls)))
    seconds = time.perf_counter() - started
    return {"calls": calls, "allowed": results.count("allow"), "seconds": round(seconds, 3),
            "per_s": round(calls / seconds), "latency": summary(latencies)}


async def revocation(session: aiohttp.ClientSession, base: str, cli: AuthService,
                     victim: int) -> float:
    """Seconds from the revoke's commit to the first authorize call that denies."""
    body = {"username": node_id(victim), "clientid": node_id(victim), "action": "publish",
            "topic": f"{ROOT}/{node_id(victim)}/heartbeat"}
    latencies: list[float] = []
    assert await call(session, base + AUTHORIZE, body, latencies) == "allow"
    committed = asyncio.Event()
    committed_at = 0.0

    async def revoke() -> None:
        nonlocal committed_at
        await cli.revoke_credentials(node_id(victim), actor="bench")
        committed_at = time.perf_counter()
        committed.set()

    async with asyncio.TaskGroup() as group:
        group.create_task(revoke())
        deadline = time.perf_counter() + 10
        while time.perf_counter() < deadline:
            result = await call(session, base + AUTHORIZE, body, latencies)
            if result == "deny":
                denied_at = time.perf_counter()
                break
        else:
            raise TimeoutError("the revocation was not seen within 10 s")
    await committed.wait()
    return max(0.0, denied_at - committed_at)


async def measure(base: str, cli: AuthService, broker_token: str, tokens: list[str],
                  args: argparse.Namespace) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {broker_token}"}
    connector = aiohttp.TCPConnector(limit=args.concurrency)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(headers=headers, connector=connector,
                                     timeout=timeout) as session:
        # Warm the connection pool, as a running broker's is.
        await storm(session, base, tokens, min(args.concurrency, args.nodes))
        logins = await storm(session, base, tokens, args.nodes)
        rate = await authorize_rate(session, base, args.authorize, args.nodes)
        seen = [await revocation(session, base, cli, args.credentials - 1 - i)
                for i in range(args.revocations)]
    return {"storm": logins, "authorize": rate,
            "revocation_s": {"median": round(statistics.median(seen), 3),
                             "max": round(max(seen), 3), "runs": len(seen)}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=10_000, help="logins in the storm")
    parser.add_argument("--credentials", type=int, default=100_000,
                        help="node credentials in the store")
    parser.add_argument("--concurrency", type=int, default=64,
                        help="HTTP connections the broker side holds")
    parser.add_argument("--authorize", type=int, default=10_000, help="authorize calls")
    parser.add_argument("--revocations", type=int, default=5)
    args = parser.parse_args()
    args.nodes = min(args.nodes, args.credentials - args.revocations)

    with tempfile.TemporaryDirectory(prefix="fleetmq-bench-hooks-") as tmp:
        workdir = Path(tmp)
        url = fresh_store(workdir, "hooks")
        loop = asyncio.new_event_loop()
        started = time.perf_counter()
        cli, broker_token, tokens = loop.run_until_complete(fill_store(url, args.credentials))
        filled_s = time.perf_counter() - started
        broker = Mosquitto(workdir)
        broker.start()
        try:
            started = time.perf_counter()
            proc, port = start_manager(broker.url, ROOT, "--auth", "on", "--broker-auth",
                                       "external", workdir=workdir, store=url,
                                       log=workdir / "serve.log")
            ready_s = time.perf_counter() - started
            try:
                figures = loop.run_until_complete(
                    measure(f"http://127.0.0.1:{port}", cli, broker_token, tokens, args))
            finally:
                stop_process(proc)
        finally:
            broker.stop()
            loop.run_until_complete(cli.store.close())
            loop.close()

    storm_f, rate_f, revoke_f = figures["storm"], figures["authorize"], figures["revocation_s"]
    print_rows([
        ("machine", f"{machine()['cores']} cores, python {machine()['python']}"),
        ("credentials in the store", f"{args.credentials:,} (written in {filled_s:.1f} s)"),
        ("manager ready (loads them all)", f"{ready_s:.2f} s"),
        ("broker-side HTTP connections", f"{args.concurrency} (latencies below include the "
                                          "wait for one)"),
        (f"reconnect storm: {storm_f['logins']:,} logins",
         f"all answered in {storm_f['seconds']:.2f} s ({storm_f['per_s']:,}/s), "
         f"{storm_f['allowed']:,} allowed; {storm_f['latency']}"),
        (f"authorize: {rate_f['calls']:,} calls",
         f"{rate_f['per_s']:,} calls/s, {rate_f['allowed']:,} allowed; {rate_f['latency']}"),
        (f"revocation by the CLI path, {revoke_f['runs']} runs",
         f"next authorize denies {revoke_f['median'] * 1000:.0f} ms (median), "
         f"{revoke_f['max'] * 1000:.0f} ms (max) after the commit"),
    ])
    write_result("hooks", {"machine": machine(), "credentials": args.credentials,
                           "concurrency": args.concurrency, "ready_s": round(ready_s, 3),
                           **figures})


if __name__ == "__main__":
    main()
