"""The pace of the statuses of a mass expiry, as a subscriber of ``<root>/+/status`` sees them
(issue 9: the statuses of an expiry wave published at the pace the broker accepts).

The SQLite store is filled directly with ``--nodes`` online nodes whose timeout is
``--timeout`` seconds (shaped like bench/startup.py's), then a real ``fleetmq serve`` starts on
it against a Mosquitto of the bench's own. Every node gets a full timeout of grace at start, so
all of them fall due at once, about ``--timeout`` seconds after the manager is ready: one wave
of ``--nodes`` "offline" statuses, behind the start-up republish of every "online" status.
A gmqtt subscriber (its own process, on the load's core) counts the statuses it receives per
tenth of a second, by kind; the broker's and the manager's CPU during the wave (from the first
"offline" received to the last) are read from /proc.

    python bench/status_wave.py [--nodes 1000000] [--timeout 30] [--mqtt-version 5]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import sys
import tempfile
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path

from gmqtt import Client  # type: ignore[import-untyped]

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    PINNING,
    add_pin_option,
    machine,
    print_rows,
    start_manager,
    stop_process,
    write_result,
)
from bench.startup import fill
from tests.support import Mosquitto

BUCKET_S = 0.1
IDLE_S = 10.0
"""The subscriber stops once every node was seen offline, or this long after the last status
once the wave began (the bench's own bound on the whole wait catches a wave that never comes)."""


def count_statuses(port: int, root: str, nodes: int, pipe: Connection) -> None:
    """Child process: counts (online, offline) statuses per ``BUCKET_S`` of ``time.time()``."""
    async def run() -> None:
        buckets: dict[int, list[int]] = {}
        offline: set[str] = set()
        last = [time.monotonic()]

        def on_message(_c: object, topic: str, payload: bytes, *_a: object) -> int:
            if "/_manager/" in topic:
                return 0  # the manager's own presence
            kind = 1 if b'"offline"' in payload else 0
            bucket = buckets.setdefault(int(time.time() / BUCKET_S), [0, 0])
            bucket[kind] += 1
            if kind:
                offline.add(topic)
            last[0] = time.monotonic()
            return 0

        client = Client(f"bench-status-wave-{root}")
        client.on_message = on_message
        await client.connect("127.0.0.1", port, keepalive=120)
        client.subscribe(f"{root}/+/status", qos=0)
        await asyncio.sleep(0.5)
        pipe.send("ready")
        # A time condition as much as a count: polled (ASYNC110).
        while len(offline) < nodes and not (offline and time.monotonic() - last[0] > IDLE_S):  # noqa: ASYNC110
            await asyncio.sleep(0.1)
        await client.disconnect()
        pipe.send({"buckets": buckets, "offline_nodes": len(offline)})

    asyncio.run(run())


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100  # utime, stime in clock ticks (100 Hz)


def sample_cpu(pids: tuple[int, int], stop: threading.Event,
               samples: list[tuple[float, float, float]]) -> None:
    """(wall time, CPU s of the first pid, of the second) every ``BUCKET_S`` until ``stop``."""
    while not stop.is_set():
        try:
            samples.append((time.time(), cpu_s(pids[0]), cpu_s(pids[1])))
        except OSError:  # a process has exited
            return
        stop.wait(BUCKET_S)


def cpu_share(samples: list[tuple[float, float, float]], start: float,
              end: float) -> tuple[float, float]:
    """Each process's share of a core between ``start`` and ``end`` (wall times)."""
    inside = [s for s in samples if start <= s[0] <= end] or samples[-1:]
    (t0, a0, b0), (t1, a1, b1) = inside[0], inside[-1]
    span = max(t1 - t0, 1e-9)
    return (a1 - a0) / span, (b1 - b0) / span


def summarize(buckets: dict[int, list[int]], deadline: float) -> dict[str, float]:
    """The wave's figures from the subscriber's buckets; times relative to ``deadline``."""
    times = sorted(buckets)
    offline = [(k * BUCKET_S, buckets[k][1]) for k in times if buckets[k][1]]
    online = [(k * BUCKET_S, buckets[k][0]) for k in times if buckets[k][0]]
    first, last = offline[0][0], offline[-1][0] + BUCKET_S
    total = sum(n for _, n in offline)
    per_s: dict[int, int] = {}
    for t, n in offline:
        per_s[int(t)] = per_s.get(int(t), 0) + n
    return {
        "online": sum(n for _, n in online), "offline": total,
        "online_first": online[0][0] - deadline if online else float("nan"),
        "online_last": online[-1][0] + BUCKET_S - deadline if online else float("nan"),
        "offline_first": first - deadline, "offline_last": last - deadline,
        "offline_rate": total / (last - first),
        "offline_peak": max(per_s.values()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=1_000_000)
    parser.add_argument("--timeout", type=int, default=30,
                        help="every node's timeout (s): the wave falls this long after start")
    parser.add_argument("--mqtt-version", default="5", choices=["3.1.1", "5"])
    add_pin_option(parser)
    args = parser.parse_args()
    PINNING.start(args.pin)
    root = "wave"
    with tempfile.TemporaryDirectory(prefix="fleetmq-bench-status-wave-") as tmp:
        store = f"sqlite:///{tmp}/fleet.db"
        asyncio.run(fill(store, args.nodes, offline_share=0.0, interval_s=args.timeout // 3))
        broker = Mosquitto(Path(tmp))
        broker.start()
        assert broker.proc is not None
        theirs, ours = mp.Pipe()
        child = mp.Process(target=count_statuses, args=(broker.port, root, args.nodes, theirs))
        child.start()
        try:
            if ours.poll(30) and ours.recv() != "ready":
                raise RuntimeError("the status subscriber did not start")
            proc, _http = start_manager(broker.url, root, "--mqtt-version", args.mqtt_version,
                                        workdir=Path(tmp), store=store)
            deadline = time.time() + args.timeout  # the grace is granted as it gets ready
            samples: list[tuple[float, float, float]] = []
            stop = threading.Event()
            sampler = threading.Thread(target=sample_cpu,
                                       args=((broker.proc.pid, proc.pid), stop, samples))
            sampler.start()
            try:
                if not ours.poll(args.timeout + 600):
                    raise RuntimeError("the status subscriber never finished")
                seen = ours.recv()
            finally:
                stop.set()
                sampler.join()
                stop_process(proc)
        finally:
            child.join(10)
            if child.is_alive():
                child.kill()
            broker.stop()
    wave = summarize(seen["buckets"], deadline)
    cpu = cpu_share(samples, deadline + wave["offline_first"], deadline + wave["offline_last"])
    print()
    print_rows([
        ("machine", f"{machine()['cores']} cores, python {machine()['python']}, pinned: "
                    f"{PINNING.describe()}"),
        ("manager", f"fleetmq serve --store sqlite:///... --mqtt-version {args.mqtt_version}"),
        ("fleet", f"{args.nodes:,} online nodes loaded, timeout {args.timeout} s: all due "
                  f"about {args.timeout} s after ready"),
        ("start-up republish (online)",
         f"{wave['online']:,.0f} received, the last {wave['online_last']:+.1f} s from the "
         "deadline"),
        ("offline statuses", f"{wave['offline']:,.0f} received ({seen['offline_nodes']:,} "
                             f"nodes), from {wave['offline_first']:+.1f} s to "
                             f"{wave['offline_last']:+.1f} s after the deadline"),
        ("offline statuses/s", f"{wave['offline_rate']:,.0f} (best second "
                               f"{wave['offline_peak']:,})"),
        ("CPU during the wave",
         f"Mosquitto {100 * cpu[0]:.0f}%, manager {100 * cpu[1]:.0f}% of a core"),
    ])
    write_result("status_wave", {"machine": machine(), "nodes": args.nodes,
                                 "timeout": args.timeout, "mqtt_version": args.mqtt_version,
                                 **wave, "offline_nodes": seen["offline_nodes"],
                                 "mosquitto_cpu": cpu[0], "manager_cpu": cpu[1]})


if __name__ == "__main__":
    main()
