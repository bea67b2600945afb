"""Test and benchmark support that needs no pytest: a real Mosquitto on a free port.

The broker's config is derived from the repo's mosquitto.conf, so tests run what users run.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# Directives the test broker sets itself; the rest of the repo's mosquitto.conf is kept.
_OVERRIDDEN = {"listener", "protocol", "persistence", "persistence_location", "persistence_file",
               "autosave_interval", "log_dest", "user", "password_file", "acl_file", "pid_file"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Mosquitto:
    """A Mosquitto process on a free port, configured from the repo's mosquitto.conf."""

    def __init__(self, workdir: Path, *, persistence: bool = False) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.persistence = persistence
        self.proc: subprocess.Popen[bytes] | None = None
        self.conf = workdir / "mosquitto.conf"
        self.log = workdir / "mosquitto.log"

    def _write_config(self) -> None:
        kept = []
        for line in (REPO / "mosquitto.conf").read_text().splitlines():
            words = line.split()
            if words and not words[0].startswith("#") and words[0] in _OVERRIDDEN:
                continue
            kept.append(line)
        kept += [
            f"listener {self.port} 127.0.0.1",
            "allow_anonymous true",
            f"persistence {'true' if self.persistence else 'false'}",
            f"persistence_location {self.workdir}/",
            f"log_dest file {self.log}",
        ]
        if os.geteuid() == 0:
            kept.append("user root")  # as root Mosquitto would drop to its own user
        self.conf.write_text("\n".join(kept) + "\n")

    def start(self) -> None:
        self._write_config()
        self.proc = subprocess.Popen(["mosquitto", "-c", str(self.conf)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited: {self.log.read_text(errors='replace')}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("mosquitto did not start listening within 10 s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"
