"""Start-up with a persisted fleet: how long ``fleetmq serve`` takes to be ready (/readyz 200)
with 100,000 and 1,000,000 nodes in SQLite and in PostgreSQL (goal: 1M ready within 10 s).

The store is filled directly (distinct ids, locations, capabilities and metadata shaped like
the seed's example registration), then a manager starts against a Mosquitto of the bench's own.
PostgreSQL is a server of the bench's own too (initdb into a temporary directory, a free port).

    python bench/startup.py [--nodes 100000 1000000] [--stores sqlite postgresql]
"""

from __future__ import annotations

import argparse
import asyncio
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    PINNING,
    add_pin_option,
    answers,
    machine,
    postgres_if,
    print_table,
    stop_process,
    wait_for,
    write_result,
)
from fleetmq.config import parse_store
from fleetmq.store import Batch, make_store
from tests.support import Mosquitto, free_port

FILL_BATCH = 50_000


def node_rows(start: int, count: int, now: float, offline_share: float = 0.1,
              interval_s: int = 60) -> list[tuple[object, ...]]:
    """Rows of nodes ``start`` to ``start + count``; one in ``1 / offline_share`` offline (none
    at 0), each declaring ``interval_s`` (its timeout three times that)."""
    every = round(1 / offline_share) if offline_share else 0
    rows = []
    for i in range(start, start + count):
        offline = bool(every) and i % every == 0
        rows.append((
            f"microclaw-esp32-{i:08x}", "microclaw", f"sensor {i}",
            f'["dht22","mqtt","bme{i % 997}"]', f"office-floor-{i % 50}-desk-{i}",
            f'{{"gateway":"nanoclaw-pi-{i % 300:03d}","firmware":"v1.{i % 7}.{i % 13}",'
            f'"serial":"SN{i:010d}"}}',
            interval_s, True, 3.0 * interval_s, now - 3600, now - (i % 60),
            "offline" if offline else "online",
            "heartbeat_timeout" if offline else "registered", now - 600, f"s{i}",
            i % 86_400, 200 + i % 100, i % 4,
        ))
    return rows


async def fill(url: str, nodes: int, offline_share: float = 0.1, interval_s: int = 60) -> float:
    store = make_store(parse_store(url))
    await store.open()
    started = time.monotonic()
    now = time.time()
    try:
        for start in range(0, nodes, FILL_BATCH):
            rows = node_rows(start, min(FILL_BATCH, nodes - start), now, offline_share,
                             interval_s)
            await store.write(Batch(upserts=rows))
    finally:
        await store.close()
    return time.monotonic() - started


def rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"VmRSS:\s+(\d+) kB", status)
    return int(match.group(1)) / 1024 if match else 0.0


def start_timed(broker: str, store_url: str, workdir: Path) -> dict[str, float]:
    http_port = free_port()
    log = workdir / f"serve-{http_port}.log"
    argv = [sys.executable, "-m", "fleetmq", "serve", "--broker", broker,
            "--http", f"127.0.0.1:{http_port}", "--store", store_url,
            "--topic-root", f"startup{http_port}", "--log-level", "info"]
    argv = PINNING.manager(argv)
    started = time.monotonic()
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    try:
        def ready() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"serve exited: {log.read_text()[-2000:]}")
            return answers(f"http://127.0.0.1:{http_port}/readyz")

        wait_for(ready, 120, "manager ready")
        ready_s = time.monotonic() - started
        rss = rss_mb(proc.pid)
    finally:
        stop_process(proc)
    loaded = re.search(r"store_loaded .* nodes=(\d+) seconds=([\d.]+)", log.read_text())
    return {"ready_s": round(ready_s, 2),
            "load_s": float(loaded.group(2)) if loaded else float("nan"),
            "loaded_nodes": int(loaded.group(1)) if loaded else 0,
            "rss_mb": round(rss)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--stores", nargs="+", default=["sqlite", "postgresql"],
                        choices=["sqlite", "postgresql"])
    add_pin_option(parser)
    args = parser.parse_args()
    PINNING.start(args.pin)
    results = []
    with tempfile.TemporaryDirectory(prefix="fleetmq-bench-startup-") as tmp:
        workdir = Path(tmp)
        broker = Mosquitto(workdir)
        broker.start()
        try:
            with postgres_if("postgresql" in args.stores) as postgres:
                for nodes in args.nodes:
                    for kind in args.stores:
                        if kind == "sqlite":
                            url = f"sqlite:///{workdir / f'startup-{nodes}.db'}"
                        else:
                            assert postgres is not None
                            name = f"startup_{nodes}"
                            postgres.create_database(name)
                            url = postgres.url(name)
                        fill_s = asyncio.run(fill(url, nodes))
                        timed = start_timed(broker.url, url, workdir)
                        results.append({"store": kind, "nodes": nodes,
                                        "fill_s": round(fill_s, 1), **timed})
                        print(f"{kind} {nodes}: {timed}", flush=True)
        finally:
            broker.stop()
    print()
    print_table(("store", "nodes", "ready (s)", "load (s)", "RSS (MB)"),
                [(r["store"], f"{r['nodes']:,}", f"{r['ready_s']:.2f}", f"{r['load_s']:.2f}",
                  f"{r['rss_mb']:,}") for r in results])
    write_result("startup", {"machine": machine(), "results": results})


if __name__ == "__main__":
    main()
