"""Heartbeat ingest with each store, same run: ``memory://`` against SQLite and PostgreSQL, at
saturation (bench/ingest.py) and at a fixed rate (bench/lag.py). Target: the durable stores
within 20% of memory.

Each measurement is the other bench run as a subprocess with ``--store``; PostgreSQL is a server
of this bench's own (initdb into a temporary directory, a free port), a new database per run.

    python bench/store.py [--nodes 100000] [--messages 400000] [--rate 10000] [--seconds 20]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import machine, postgres_if, print_table, write_result

BENCH = Path(__file__).resolve().parent


def run_bench(script: str, args: list[str], results: Path) -> dict[str, Any]:
    """``bench/<script>.py args`` with its JSON written into ``results``; returns the JSON."""
    env = {**os.environ, "FLEETMQ_BENCH_RESULTS": str(results)}
    subprocess.run([sys.executable, str(BENCH / f"{script}.py"), *args], check=True, env=env,
                   cwd=BENCH.parent)
    name = "ingest" if script == "ingest" else script
    doc: dict[str, Any] = json.loads((results / f"{name}.json").read_text())
    return doc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=100_000)
    parser.add_argument("--messages", type=int, default=400_000)
    parser.add_argument("--rate", type=int, default=10_000, help="fixed heartbeats/s")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--mqtt-version", default="3.1.1", choices=("5", "3.1.1"))
    parser.add_argument("--stores", nargs="+", default=["memory", "sqlite", "postgresql"],
                        choices=["memory", "sqlite", "postgresql"])
    args = parser.parse_args()

    rows: list[dict[str, Any]] = []
    with (tempfile.TemporaryDirectory(prefix="fleetmq-bench-store-") as tmp,
          postgres_if("postgresql" in args.stores) as postgres):
        for number, kind in enumerate(args.stores):
            def url(run: str, kind: str = kind, number: int = number) -> str:
                if kind == "memory":
                    return "memory://"
                if kind == "sqlite":
                    return "sqlite"  # the benches make a fresh file of their own
                assert postgres is not None
                name = f"bench_{run}_{number}"
                postgres.create_database(name)
                return postgres.url(name)

            results = Path(tmp) / kind
            results.mkdir()
            ingest = run_bench("ingest", [
                "--skip-bare", "--mqtt-versions", args.mqtt_version,
                "--nodes", str(args.nodes), "--messages", str(args.messages),
                "--store", url("ingest")], results)
            lag = run_bench("lag", [
                "--mqtt-version", args.mqtt_version, "--rate", str(args.rate),
                "--seconds", str(args.seconds), "--store", url("lag")], results)
            result = ingest["results"][0]
            rows.append({"store": kind, "ingest_per_s": result["per_s"],
                         "lost": result["lost"],
                         "lag_p50_ms": lag["lag_p50_ms"], "lag_p99_ms": lag["lag_p99_ms"],
                         "probes_answered": lag["probes_answered"]})

    memory = next((r for r in rows if r["store"] == "memory"), None)
    print(f"\nmachine: {os.cpu_count()} cores; MQTT {args.mqtt_version}; {args.nodes:,} nodes; "
          f"fixed rate {args.rate:,}/s")
    print_table(
        ("store", "ingest (msg/s)", "x memory", "lost", "lag p50 (ms)", "lag p99 (ms)"),
        [(r["store"], f"{r['ingest_per_s']:,.0f}",
          f"{r['ingest_per_s'] / memory['ingest_per_s']:.2f}" if memory else "-",
          f"{r['lost']:,}", f"{r['lag_p50_ms']:.1f}", f"{r['lag_p99_ms']:.1f}") for r in rows])
    write_result("store", {"machine": machine(), "mqtt_version": args.mqtt_version,
                           "nodes": args.nodes, "messages": args.messages, "rate": args.rate,
                           "results": rows})


if __name__ == "__main__":
    main()
