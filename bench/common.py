"""What every benchmark needs: waiting on a condition, reading /metrics, starting a manager.

Benchmarks run from the repository root (``python bench/<name>.py``); each puts the root on
``sys.path`` and imports this module and ``tests.support`` (the Mosquitto launcher).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tests.support import Postgres, free_port, postgres_bindir


def request(url: str, body: bytes | None = None, timeout: float = 10) -> bytes:
    req = urllib.request.Request(url, data=body, method="POST" if body is not None else "GET")
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return bytes(resp.read())


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"benchmark condition not met within {timeout:g} s: {what}")
        time.sleep(0.05)


def settle(count: Callable[[], float], target: float, idle: float, timeout: float,
           what: str) -> float:
    """Wait until ``count()`` reaches ``target`` or stops moving for ``idle`` seconds (what never
    arrives was lost); return its last value. Raise if it is still moving after ``timeout``."""
    deadline = time.monotonic() + timeout
    last = count()
    moved = time.monotonic()
    while last < target:
        time.sleep(0.05)
        now = time.monotonic()
        value = count()
        if value != last:
            last, moved = value, now
        elif now - moved > idle:
            break
        if now > deadline:
            raise TimeoutError(f"benchmark count still moving after {timeout:g} s: {what}")
    return last


def paced(rate: int, stop: Any, sent: Any, publish: Callable[[int], None],
          bursts_per_s: int = 100) -> None:
    """``publish(i)`` for i = 0, 1, 2... at ``rate`` a second, in bursts of ``rate /
    bursts_per_s``, until ``stop`` (a multiprocessing Event) is set; ``sent.value`` (a shared
    Value) follows the count. A late burst is caught up, not dropped."""
    burst = max(1, rate // bursts_per_s)
    started = time.monotonic()
    count = 0
    while not stop.is_set():
        for _ in range(burst):
            publish(count)
            count += 1
        sent.value = count
        ahead = started + count / rate - time.monotonic()
        if ahead > 0:
            time.sleep(ahead)


def answers(url: str) -> bool:
    try:
        request(url, timeout=2)
    except (urllib.error.URLError, OSError):
        return False
    return True


def metric(http_port: int, name: str) -> float:
    """The sum of a metric's series (``fleetmq_nodes``: the fleet, over its statuses)."""
    text = request(f"http://127.0.0.1:{http_port}/metrics").decode()
    values = [s.value for family in text_string_to_metric_families(text)
              for s in family.samples if s.name == name]
    if not values:
        raise KeyError(name)
    return sum(values)


def fresh_store(workdir: Path, name: str = "fleetmq") -> str:
    """The default store (SQLite), in a new file of the bench's temporary directory: never the
    working directory's fleetmq.db, whose nodes would load into the next run."""
    path = workdir.resolve() / f"{name}.db"
    for stale in (path, path.with_suffix(".db-wal"), path.with_suffix(".db-shm")):
        stale.unlink(missing_ok=True)
    return f"sqlite:///{path}"


UNLIMITED_NODES = ("--node-rate", "1000000", "--node-burst", "1000000")
"""The benches drive each node far faster than a device would (thousands of messages a second
over a few thousand ids): they measure the path, not the per-node limit, which still runs."""


def start_manager(broker_url: str, root: str, *options: str, workdir: Path,
                  wrap: Sequence[str] = (), log: Path | None = None,
                  store: str = "sqlite") -> tuple[subprocess.Popen[bytes], int]:
    """``fleetmq serve --broker broker_url`` (a broker on this machine, or
    ``embedded://127.0.0.1:<free port>`` for its own amqtt) with a fresh SQLite store in
    ``workdir``, ready; returns it and its HTTP port. ``wrap`` prefixes the command (a profiler,
    say); its output goes to ``log`` if given. ``store`` is ``sqlite`` (a fresh file) or a
    ``--store`` URL (``memory://``, ``postgresql://...``). The caller stops it
    (``stop_process``)."""
    http_port = free_port()
    argv = [*wrap, sys.executable, "-m", "fleetmq", "serve",
            "--broker", broker_url, "--http", f"127.0.0.1:{http_port}",
            "--store", fresh_store(workdir, root) if store == "sqlite" else store,
            "--topic-root", root, "--log-level", "warning", *UNLIMITED_NODES, *options]
    if broker_url.startswith("embedded") and "--broker-ws" not in options:
        argv += ["--broker-ws", "off"]  # not measured here; and 9001 may be anyone's
    argv = PINNING.manager(argv)
    if log is None:
        proc = subprocess.Popen(argv)
    else:
        with log.open("ab") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)

    def ready() -> bool:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:] if log is not None else ""
            raise RuntimeError(f"fleetmq serve exited with {proc.returncode}\n{tail}")
        return answers(f"http://127.0.0.1:{http_port}/readyz")

    try:
        wait_for(ready, 30, "manager ready")
    except BaseException:
        stop_process(proc)
        raise
    return proc, http_port


@contextmanager
def postgres_if(wanted: bool) -> Iterator[Postgres | None]:
    """A PostgreSQL server of the bench's own (initdb into a temporary directory, a free
    port) when ``wanted``, stopped afterwards; None otherwise."""
    if not wanted:
        yield None
        return
    bindir = postgres_bindir()
    if bindir is None:
        raise SystemExit("PostgreSQL server binaries not found (apt-get install postgresql)")
    server = Postgres(bindir)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    """Terminate, and kill if it has not exited within 20 s."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def results_dir() -> Path:
    """``bench/results`` (git-ignored), or ``$FLEETMQ_BENCH_RESULTS`` (the smoke test's)."""
    path = Path(os.environ.get("FLEETMQ_BENCH_RESULTS") or Path(__file__).parent / "results")
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_result(name: str, doc: Any) -> Path:
    """``<results>/<name>.json``; says where it went."""
    path = results_dir() / f"{name}.json"
    path.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"\nwritten: {path}")
    return path


def machine() -> dict[str, Any]:
    return {"cores": os.cpu_count(), "python": sys.version.split()[0],
            "pinned": PINNING.describe()}


class Pinning:
    """The manager on one core, everything else (the broker, wrk, publishers, the bench
    itself) on the others, as issue 9 measures: a manager that shares its core with its load
    reports the load's cost as its own. ``--no-pin`` turns it off; on a one-core machine it
    is off anyway."""

    MANAGER_CPU = 0

    def __init__(self) -> None:
        self.enabled = False

    def start(self, wanted: bool) -> None:
        """Move this process (and so every child started from now on) off the manager's
        core; the manager is started through ``manager``."""
        cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set()
        self.enabled = (wanted and self.MANAGER_CPU in cpus and len(cpus) >= 2
                        and shutil.which("taskset") is not None)
        if self.enabled:
            os.sched_setaffinity(0, cpus - {self.MANAGER_CPU})

    def manager(self, argv: Sequence[str]) -> list[str]:
        """The command of a process under test, on the manager's core (``taskset`` execs it,
        so the pid is the process's own)."""
        if not self.enabled:
            return list(argv)
        return ["taskset", "-c", str(self.MANAGER_CPU), *argv]

    def describe(self) -> str:
        if not self.enabled:
            return "no (manager and load share the cores)"
        return f"manager on cpu {self.MANAGER_CPU}, load on the others"


PINNING = Pinning()


def add_pin_option(parser: Any) -> None:
    parser.add_argument("--no-pin", dest="pin", action="store_false",
                        help="do not pin the manager to cpu 0 and the load to the others")


def print_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    """Columns aligned: the first left, the others right."""
    widths = [max(len(c) for c in col) for col in zip(header, *rows, strict=True)]
    for row in (header, *rows):
        cells = [row[0].ljust(widths[0])]
        cells += [c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)]
        print("  ".join(cells))


def print_rows(rows: Sequence[tuple[str, str]]) -> None:
    width = max(len(key) for key, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
