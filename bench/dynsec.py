"""The dynsec mirror's ceiling on a real Mosquitto 2.0: provisioning rate, revocation latency
and reconciliation time with 1,000, 10,000 (and, with --sizes, 100,000) clients.

Provisioning a fleet command by command would take hours at 10,000 (the plugin rewrites its
whole JSON file per command), so each size is prepared offline: the plugin file is written
with N clients and roles exactly as the mirror makes them (PBKDF2-SHA512, 101 iterations, as
2.0 hashes), and the same N credentials go into fleetmq's store. Then, against a broker loaded
with that file, the real mirror: reconciles (timed), provisions new credentials (rate), and
revokes live connections (latency until the broker closes them).

    python bench/dynsec.py [--sizes 1000,10000,100000] [--puts 20] [--revokes 5]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from bench.common import machine, print_table, write_result
from fleetmq.auth.dynsec_acls import marker, node_acls, role_name
from fleetmq.auth.service import AuthService
from fleetmq.auth.store import Credential, MemoryAuthStore
from fleetmq.auth.tokens import digest, new_key_id, new_token
from fleetmq.config import parse_broker
from fleetmq.core.clock import SystemClock
from fleetmq.mqtt.dynsec_mirror import DynsecMirror, manager_logins
from tests.support import Mosquitto

ROOT = "bench"


def dynsec_hash(token: str) -> dict[str, object]:
    salt = os.urandom(12)
    hashed = hashlib.pbkdf2_hmac("sha512", token.encode(), salt, 101)
    return {"salt": base64.b64encode(salt).decode(), "password": base64.b64encode(hashed).decode(),
            "iterations": 101}


def write_fleet(broker: Mosquitto, n: int) -> tuple[list[Credential], dict[str, str]]:
    """N node clients and roles in the plugin file; their credentials and tokens."""
    config = json.loads(broker.dynsec_file.read_text())
    creds: list[Credential] = []
    tokens: dict[str, str] = {}
    now = time.time()
    for i in range(n):
        node = f"node-{i:06d}"
        token = new_token("node")
        creds.append(Credential(new_key_id(), digest(token), now, node_id=node))
        tokens[node] = token
        config["clients"].append({
            "username": node, "clientid": node, "textname": marker(ROOT),
            "roles": [{"rolename": role_name(ROOT, node)}], **dynsec_hash(token)})
        config["roles"].append({"rolename": role_name(ROOT, node), "textname": marker(ROOT),
                                "acls": node_acls(ROOT, node)})
    broker.dynsec_file.write_text(json.dumps(config))
    return creds, tokens


def connect(port: int, node: str, token: str) -> tuple[paho.Client, threading.Event]:
    gone = threading.Event()
    up = threading.Event()
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=node,
                         protocol=MQTTProtocolVersion.MQTTv5)
    client.username_pw_set(node, token)
    client.on_connect = lambda *_a: up.set()
    client.on_disconnect = lambda *_a: gone.set()
    client.connect("127.0.0.1", port, keepalive=30)
    client.loop_start()
    if not up.wait(10) or gone.is_set():
        raise RuntimeError(f"{node} could not log in")
    return client, gone


async def wait_until(condition: object, limit_s: float) -> None:
    deadline = time.monotonic() + limit_s
    while not await condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise TimeoutError("benchmark condition not met")
        await asyncio.sleep(0.005)


async def measure(n: int, puts: int, revokes: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="fleetmq-bench-dynsec-") as tmp:
        broker = Mosquitto(Path(tmp), dynsec=True)
        broker.init_dynsec()
        made = time.monotonic()
        creds, tokens = write_fleet(broker, n)
        prepare_s = time.monotonic() - made
        started = time.monotonic()
        broker.start()
        broker_start_s = time.monotonic() - started
        try:
            store = MemoryAuthStore()
            await store.save(creds, [])
            auth = AuthService(store, SystemClock())
            await auth.load()
            mirror = DynsecMirror(auth, parse_broker(broker.admin_url), ROOT,
                                  manager_logins(["_fleetmq-bench", "_fleetmq-bench-out"]),
                                  SystemClock())
            began = time.monotonic()
            async with mirror:
                async def reconciled() -> bool:
                    return mirror.reconciliations > 0
                await wait_until(reconciled, 3600)
                reconcile_s = time.monotonic() - began

                async def empty() -> bool:
                    await auth.refresh()
                    return not await store.outbox(1)
                began = time.monotonic()
                for i in range(puts):
                    await auth.issue_credential(f"new-{i:04d}", actor="bench")
                await wait_until(empty, 3600)
                put_s = (time.monotonic() - began) / puts

                latencies: list[float] = []
                for i in range(revokes):
                    node = f"node-{i * max(1, n // revokes):06d}"
                    client, gone = connect(broker.port, node, tokens[node])
                    began = time.monotonic()
                    await auth.revoke_credentials(node, actor="bench")
                    while not gone.is_set():
                        if time.monotonic() - began > 120:
                            raise TimeoutError(f"{node} was not kicked within 120 s")
                        await asyncio.sleep(0.002)
                    latencies.append(time.monotonic() - began)
                    client.loop_stop()
                    await wait_until(empty, 3600)  # each revocation measured on its own
        finally:
            broker.stop()
        return {"clients": n, "file_mb": broker.dynsec_file.stat().st_size / 1e6,
                "prepare_s": prepare_s, "broker_start_s": broker_start_s,
                "reconcile_s": reconcile_s, "put_ms": put_s * 1000, "puts_per_s": 1 / put_s,
                "revoke_ms_median": statistics.median(latencies) * 1000,
                "revoke_ms_max": max(latencies) * 1000}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1000,10000")
    parser.add_argument("--puts", type=int, default=20)
    parser.add_argument("--revokes", type=int, default=5)
    args = parser.parse_args()
    results = [asyncio.run(measure(int(size), args.puts, args.revokes))
               for size in args.sizes.split(",")]
    print_table(("clients", "file MB", "broker start s", "reconcile s", "put ms", "puts/s",
                 "revoke ms median", "revoke ms max"),
                [(f"{r['clients']:,.0f}", f"{r['file_mb']:.1f}", f"{r['broker_start_s']:.2f}",
                  f"{r['reconcile_s']:.2f}", f"{r['put_ms']:.1f}", f"{r['puts_per_s']:.1f}",
                  f"{r['revoke_ms_median']:.1f}", f"{r['revoke_ms_max']:.1f}")
                 for r in results])
    write_result("dynsec", {"machine": machine(), "puts": args.puts, "revokes": args.revokes,
                            "sizes": results})

if __name__ == "__main__":
    main()
