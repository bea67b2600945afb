"""The embedded broker's ceiling with auth on vs off: connects/s, heartbeats applied/s, and
revocation latency with many credentials in the store.

Each run starts ``fleetmq serve --broker embedded://127.0.0.1:<free port>`` as a subprocess with
a fresh SQLite store; for auth on, the credentials are written into that store first (one
transaction, as ``fleetmq credentials issue`` would one by one) and the admin key comes from
``--admin-token-file``.

- connects/s: ``--connects`` clients (node credentials with auth on) send CONNECT at once from
  ``--publishers`` processes over raw sockets; from the first CONNECT to the last CONNACK.
- heartbeats/s: the nodes are registered, then ``--messages`` QoS 0 heartbeats are published by
  ``--publishers`` processes (with auth on each logs in with a write key, a gateway that may
  speak for every node); the rate is the manager's applied count from /metrics.
- revocation: a node logged in with its token; its credentials are revoked in the store from
  this process (as the CLI does; the manager polls the store every 0.2 s) and the time until
  the broker closes the node's socket is measured, ``--revocations`` times, with
  ``--credentials`` node credentials in the store (default 10,000 and 100,000).

    python bench/embedded_auth.py
    python bench/embedded_auth.py --connects 500 --messages 20000 --credentials 1000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import statistics
import struct
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import (
    fresh_store,
    machine,
    metric,
    print_rows,
    settle,
    start_manager,
    stop_process,
    wait_for,
    write_result,
)
from fleetmq.auth.service import AuthService
from fleetmq.auth.store import Credential
from fleetmq.auth.tokens import digest, new_key_id, new_token
from fleetmq.config import parse_store
from fleetmq.core.clock import SystemClock
from fleetmq.store import make_auth_store
from tests.support import free_port

IDLE_S = 5.0
ROOT = "bench"


@dataclass
class Run:
    auth: bool
    credentials: int
    connects: int
    connects_per_s: float
    connects_refused: int
    heartbeats_published: int
    heartbeats_applied: int
    heartbeats_per_s: float
    revocation_ms: list[float] = field(default_factory=list)


# --- credentials in the store ----------------------------------------------------------------


async def _provision(store_url: str, nodes: int, extra: int, keys: int
                     ) -> tuple[list[str], list[str]]:
    """``nodes`` node credentials whose tokens we keep, ``extra`` more (the store's bulk), and
    ``keys`` write keys; one transaction. Returns (node tokens, key tokens)."""
    store = make_auth_store(parse_store(store_url))
    await store.open()
    try:
        now = time.time()
        creds: list[Credential] = []
        node_tokens = [new_token("node") for _ in range(nodes)]
        for i, token in enumerate(node_tokens):
            creds.append(Credential(new_key_id(), digest(token), now, node_id=_node(i)))
        for i in range(extra):
            creds.append(Credential(new_key_id(), digest(new_token("node")), now,
                                    node_id=f"bulk-{i:07d}"))
        key_tokens = [new_token("key") for _ in range(keys)]
        for token in key_tokens:
            creds.append(Credential(new_key_id(), digest(token), now, role="write"))
        await store.save(creds, [])
    finally:
        await store.close()
    return node_tokens, key_tokens


def _node(i: int) -> str:
    return f"node-{i:07d}"


# --- raw CONNECT storm (one process per share) -----------------------------------------------


def _string(text: str) -> bytes:
    data = text.encode()
    return struct.pack("!H", len(data)) + data


def _connect_packet(client_id: str, password: str | None) -> bytes:
    flags = 0x02 | (0xC0 if password is not None else 0)
    payload = _string(client_id)
    if password is not None:
        payload += _string(client_id) + _string(password)
    body = _string("MQTT") + bytes([4, flags]) + struct.pack("!H", 120) + payload
    length, out = len(body), bytearray()
    while True:
        byte, length = length % 128, length // 128
        out.append(byte | (0x80 if length else 0))
        if not length:
            break
    return bytes([0x10]) + bytes(out) + body


async def _storm(port: int, logins: list[tuple[str, str | None]], start_at: float,
                 out: mp.Queue) -> None:  # type: ignore[type-arg]
    async def one(client_id: str, password: str | None) -> tuple[int, float]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(_connect_packet(client_id, password))
        await writer.drain()
        connack = await asyncio.wait_for(reader.readexactly(4), 60)
        done = time.time()
        writers.append(writer)
        return connack[3], done

    writers: list[asyncio.StreamWriter] = []
    await asyncio.sleep(max(0.0, start_at - time.time()))
    results = await asyncio.gather(*(one(c, p) for c, p in logins), return_exceptions=True)
    codes = [r[0] if isinstance(r, tuple) else -1 for r in results]
    last = max((r[1] for r in results if isinstance(r, tuple)), default=start_at)
    out.put((sum(1 for c in codes if c != 0), last))
    await asyncio.sleep(0.5)
    for writer in writers:
        writer.close()


def _storm_process(port: int, logins: list[tuple[str, str | None]], start_at: float,
                   out: mp.Queue) -> None:  # type: ignore[type-arg]
    asyncio.run(_storm(port, logins, start_at, out))


def connect_storm(port: int, logins: list[tuple[str, str | None]], procs: int
                  ) -> tuple[float, int]:
    """Connects/s and how many were refused."""
    out: mp.Queue = mp.Queue()  # type: ignore[type-arg]
    start_at = time.time() + 1.0
    shares = [logins[k::procs] for k in range(procs)]
    workers = [mp.Process(target=_storm_process, args=(port, share, start_at, out))
               for share in shares]
    for worker in workers:
        worker.start()
    reports = [out.get(timeout=120) for _ in workers]
    for worker in workers:
        worker.join(30)
    refused = sum(r[0] for r in reports)
    span = max(r[1] for r in reports) - start_at
    return len(logins) / span, refused


# --- heartbeats ------------------------------------------------------------------------------


def _client(port: int, client_id: str, password: str | None) -> paho.Client:
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id)
    if password is not None:
        client.username_pw_set(client_id, password)
    client.max_inflight_messages_set(1000)
    client.connect("127.0.0.1", port, keepalive=120)
    client.loop_start()
    return client


def _publish(port: int, client_id: str, password: str | None, first: int, count: int,
             nodes: int, leaf: str) -> None:
    client = _client(port, client_id, password)
    payload = json.dumps({"uptime_seconds": 1234} if leaf == "heartbeat"
                         else {"node_type": "microclaw"}).encode()
    qos = 0 if leaf == "heartbeat" else 1
    info = None
    for i in range(first, first + count):
        info = client.publish(f"{ROOT}/{_node(i % nodes)}/{leaf}", payload, qos=qos)
        if i % 1000 == 0:
            info.wait_for_publish(30)
    if info is not None:
        info.wait_for_publish(60)
    client.disconnect()
    client.loop_stop()


def _blast(port: int, logins: list[tuple[str, str | None]], messages: int, nodes: int,
           leaf: str) -> int:
    share = messages // len(logins)
    procs = [mp.Process(target=_publish, args=(port, cid, pw, k * share, share, nodes, leaf))
             for k, (cid, pw) in enumerate(logins)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join()
    if any(proc.exitcode != 0 for proc in procs):
        raise RuntimeError("a publisher process failed")
    return share * len(logins)


def heartbeats(port: int, http_port: int, logins: list[tuple[str, str | None]], nodes: int,
               messages: int) -> tuple[int, int, float]:
    _blast(port, logins[:1], nodes, nodes, "register")
    wait_for(lambda: metric(http_port, "fleetmq_nodes") >= nodes, 120, "nodes registered")
    wait_for(lambda: metric(http_port, "fleetmq_mqtt_backlog") == 0, 120, "statuses out")
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
        published = _blast(port, logins, messages, nodes, "heartbeat")
        settle(lambda: samples[-1][1], published, IDLE_S, 300, "heartbeats applied")
    finally:
        stop.set()
        sampler.join()
    final = samples[-1][1]
    moving = [(t, n) for t, n in samples if n > 0]
    rate = 0.0
    if moving:
        t0, n0 = moving[0]
        t1 = next(t for t, n in moving if n >= final)
        if t1 <= t0:
            t0, n0 = [(t, n) for t, n in samples if n == 0][-1]
        rate = (final - n0) / (t1 - t0) if t1 > t0 else 0.0
    return published, int(final), rate


# --- revocation ------------------------------------------------------------------------------


async def revocations(port: int, store_url: str, tokens: list[str], count: int) -> list[float]:
    auth = AuthService(make_auth_store(parse_store(store_url)), SystemClock())
    await auth.store.open()
    try:
        await auth.load()
        latencies = []
        for i in range(count):
            node_id = _node(len(tokens) - 1 - i)
            closed = threading.Event()
            client = paho.Client(CallbackAPIVersion.VERSION2, client_id=node_id)
            client.username_pw_set(node_id, tokens[len(tokens) - 1 - i])
            connected = threading.Event()
            client.on_connect = lambda *_a, ev=connected: ev.set()
            client.on_disconnect = lambda *_a, ev=closed: ev.set()
            client.reconnect_delay_set(60, 120)
            client.connect("127.0.0.1", port, keepalive=120)
            client.loop_start()
            try:
                if not await asyncio.to_thread(connected.wait, 10):
                    raise RuntimeError(f"{node_id} could not log in")
                started = time.monotonic()
                await auth.revoke_credentials(node_id, actor="bench")
                if not await asyncio.to_thread(closed.wait, 10):
                    raise RuntimeError(f"{node_id} was not cut off within 10 s")
                latencies.append((time.monotonic() - started) * 1000)
            finally:
                client.loop_stop()
        return latencies
    finally:
        await auth.store.close()


# --- one manager per run ---------------------------------------------------------------------


def run(auth_on: bool, credentials: int, args: argparse.Namespace, workdir: Path) -> Run:
    port = free_port()
    store_url = fresh_store(workdir, f"auth-{int(auth_on)}-{credentials}")
    nodes = max(args.connects, args.nodes)
    logins: list[tuple[str, str | None]] = [(_node(i), None) for i in range(args.connects)]
    publishers: list[tuple[str, str | None]] = [(f"bench-pub-{k}", None)
                                                for k in range(args.publishers)]
    options = ["--auth", "off"]
    tokens: list[str] = []
    if auth_on:
        tokens, keys = asyncio.run(_provision(store_url, nodes, max(0, credentials - nodes),
                                              args.publishers))
        logins = [(_node(i), tokens[i]) for i in range(args.connects)]
        # /metrics needs a token with auth on (the REST gate); the bench reads it bare.
        options = ["--auth", "on", "--admin-token-file", str(workdir / f"admin-{credentials}"),
                   "--metrics-public", "true"]
        publishers = []
        for token in keys:
            cred_id = _key_id(store_url, token)
            publishers.append((f"_key.{cred_id}", token))
    proc, http_port = start_manager(f"embedded://127.0.0.1:{port}", ROOT, *options,
                                    workdir=workdir, store=store_url)
    try:
        per_s, refused = connect_storm(port, logins, args.publishers)
        published, applied, rate = heartbeats(port, http_port, publishers, nodes, args.messages)
        latencies = asyncio.run(revocations(port, store_url, tokens, args.revocations)) \
            if auth_on else []
    finally:
        stop_process(proc)
    return Run(auth_on, credentials if auth_on else 0, len(logins), per_s, refused, published,
               applied, rate, latencies)


def _key_id(store_url: str, token: str) -> str:
    async def find() -> str:
        store = make_auth_store(parse_store(store_url))
        await store.open()
        try:
            changes = await store.changes(0)
        finally:
            await store.close()
        wanted = digest(token)
        return next(c.id for c in changes.credentials if c.digest == wanted)
    return asyncio.run(find())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connects", type=int, default=2000)
    parser.add_argument("--nodes", type=int, default=2000)
    parser.add_argument("--messages", type=int, default=40_000)
    parser.add_argument("--publishers", type=int, default=2)
    parser.add_argument("--revocations", type=int, default=10)
    parser.add_argument("--credentials", type=int, nargs="+", default=[10_000, 100_000])
    args = parser.parse_args()
    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="fleetmq-bench-auth-") as tmp:
        workdir = Path(tmp)
        runs.append(run(False, 0, args, workdir))
        for credentials in args.credentials:
            runs.append(run(True, credentials, args, workdir))
    rows = [("machine", f"{machine()['cores']} cores, python {machine()['python']}")]
    for r in runs:
        label = f"auth on, {r.credentials:,} credentials" if r.auth else "auth off"
        rows.append((f"{label}: connects", f"{r.connects:,} at once, {r.connects_per_s:,.0f}/s,"
                     f" {r.connects_refused} refused"))
        lost = r.heartbeats_published - r.heartbeats_applied
        rows.append((f"{label}: heartbeats applied", f"{r.heartbeats_per_s:,.0f} msg/s "
                     f"({r.heartbeats_applied:,} of {r.heartbeats_published:,}, {lost:,} lost)"))
        if r.revocation_ms:
            ms = sorted(r.revocation_ms)
            rows.append((f"{label}: revoke -> closed",
                         f"median {statistics.median(ms):.0f} ms, max {ms[-1]:.0f} ms "
                         f"({len(ms)} revocations through the store)"))
    print_rows(rows)
    write_result("embedded_auth", {"machine": machine(), "runs": [asdict(r) for r in runs]})


if __name__ == "__main__":
    main()
