"""What every benchmark needs: waiting on a condition, reading /metrics, starting a manager.

Benchmarks run from the repository root (``python bench/<name>.py``); each puts the root on
``sys.path`` and imports this module and ``tests.support`` (the Mosquitto launcher).
"""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence

from tests.support import free_port


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


def answers(url: str) -> bool:
    try:
        request(url, timeout=2)
    except (urllib.error.URLError, OSError):
        return False
    return True


def metric(http_port: int, name: str) -> float:
    text = request(f"http://127.0.0.1:{http_port}/metrics").decode()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)


def start_manager(broker_port: int, root: str, *options: str,
                  wrap: Sequence[str] = ()) -> tuple[subprocess.Popen[bytes], int]:
    """``fleetmq serve`` against a broker on this machine, ready; returns it and its HTTP port.
    ``wrap`` prefixes the command (a profiler, say). The caller terminates it."""
    http_port = free_port()
    proc = subprocess.Popen(
        [*wrap, sys.executable, "-m", "fleetmq", "serve",
         "--broker", f"mqtt://127.0.0.1:{broker_port}", "--http", f"127.0.0.1:{http_port}",
         "--topic-root", root, "--log-level", "warning", *options])
    try:
        wait_for(lambda: answers(f"http://127.0.0.1:{http_port}/readyz"), 30, "manager ready")
    except BaseException:
        proc.kill()
        raise
    return proc, http_port


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
