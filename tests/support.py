"""Test and benchmark support that needs no pytest: a real Mosquitto on a free port.

The broker's config is derived from the repo's mosquitto.conf, so tests run what users run.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parent.parent
# Directives the test broker sets itself; the rest of the repo's mosquitto.conf is kept.
_OVERRIDDEN = {"listener", "protocol", "persistence", "persistence_location", "persistence_file",
               "autosave_interval", "log_dest", "user", "password_file", "acl_file", "pid_file",
               "allow_anonymous", "plugin", "plugin_opt_config_file"}
DYNSEC_PLUGIN = "/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so"


def metric_samples(text: str) -> dict[str, float]:
    """A ``/metrics`` text as prometheus_client parses it: ``{'name{a="1",b="2"}': value}``,
    labels sorted by name (as prometheus_client writes them)."""
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            values[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return values


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Mosquitto:
    """A Mosquitto process on a free port, configured from the repo's mosquitto.conf."""

    def __init__(self, workdir: Path, *, persistence: bool = False,
                 dynsec: bool = False) -> None:
        self.port = free_port()
        while self.port == 1883:
            self.port = free_port()
        self.ws_port: int | None = None
        """The port of the repo's websockets listener, moved to a free port; None if the
        repo's mosquitto.conf has none."""
        self.workdir = workdir
        self.persistence = persistence
        self.dynsec = dynsec
        """With the dynamic security plugin (its file made by ``mosquitto_ctrl dynsec init``,
        admin ``admin`` with ``admin_password``) and no anonymous logins."""
        self.dynsec_file = workdir / "dynamic-security.json"
        self.admin_password = os.urandom(12).hex()
        self.proc: subprocess.Popen[bytes] | None = None
        self.conf = workdir / "mosquitto.conf"
        self.log = workdir / "mosquitto.log"

    def _write_config(self) -> None:
        kept = []
        repo_conf = (REPO / "mosquitto.conf").read_text().splitlines()
        for line in repo_conf:
            words = line.split()
            if words and not words[0].startswith("#") and words[0] in _OVERRIDDEN:
                continue
            kept.append(line)
        if self.dynsec:
            kept += [f"plugin {DYNSEC_PLUGIN}", f"plugin_opt_config_file {self.dynsec_file}"]
        if _has_websockets_listener(repo_conf):
            # Before the TCP listener, which stays the last one: listener options that
            # subclasses append (use_username_as_clientid, TLS files) remain its own.
            self.ws_port = self.ws_port or _free_port_not(9001, self.port)
            kept += [f"listener {self.ws_port} 127.0.0.1", "protocol websockets"]
        kept += [
            f"listener {self.port} 127.0.0.1",
            f"allow_anonymous {'false' if self.dynsec else 'true'}",
            f"persistence {'true' if self.persistence else 'false'}",
            f"persistence_location {self.workdir}/",
            f"log_dest file {self.log}",
        ]

        if os.geteuid() == 0:
            kept.append("user root")  # as root Mosquitto would drop to its own user
        self.conf.write_text("\n".join(kept) + "\n")

    def init_dynsec(self) -> None:
        """A new plugin file holding only the admin (``mosquitto_ctrl dynsec init``)."""
        self.dynsec_file.unlink(missing_ok=True)
        subprocess.run(["mosquitto_ctrl", "dynsec", "init", str(self.dynsec_file), "admin",
                        self.admin_password], check=True, capture_output=True, timeout=30)

    @property
    def admin_url(self) -> str:
        return f"mqtt://admin:{self.admin_password}@127.0.0.1:{self.port}"

    def start(self) -> None:
        if self.dynsec and not self.dynsec_file.exists():
            self.init_dynsec()
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

    @property
    def ws_url(self) -> str:
        """The websockets listener (MQTT over WebSockets) of the repo's mosquitto.conf."""
        if self.ws_port is None:
            raise RuntimeError("the repo's mosquitto.conf has no `protocol websockets` listener")
        return f"ws://127.0.0.1:{self.ws_port}"


def _has_websockets_listener(conf: list[str]) -> bool:
    """Whether a `listener` of the config is followed by `protocol websockets`."""
    words = [line.split() for line in conf if line.split() and not line.startswith("#")]
    return any(w[:2] == ["protocol", "websockets"] and any(v[0] == "listener" for v in words[:i])
               for i, w in enumerate(words))


def _free_port_not(*taken: int) -> int:
    port = free_port()
    while port in (1883, *taken):
        port = free_port()
    return port


def postgres_bindir() -> Path | None:
    """Where the PostgreSQL server binaries are (``initdb`` and ``postgres``), None if absent:
    ``pg_config --bindir``, else the newest ``/usr/lib/postgresql/<version>/bin`` (Debian)."""
    candidates: list[Path] = []
    try:
        found = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True,
                               timeout=10, check=True).stdout.strip()
        if found:
            candidates.append(Path(found))
    except (OSError, subprocess.SubprocessError):
        pass

    def version(path: Path) -> tuple[int, ...]:
        return tuple(int(p) for p in path.parent.name.split(".") if p.isdigit())

    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=version, reverse=True)
    for bindir in candidates:
        if (bindir / "initdb").is_file() and (bindir / "postgres").is_file():
            return bindir
    return None


class Postgres:
    """A PostgreSQL server of the test session's own: ``initdb`` into a temporary directory,
    listening on 127.0.0.1 on a free port (never 5432) and a socket in that directory.

    PostgreSQL refuses to run as root: as root, the directory is given to the ``postgres``
    user and ``initdb`` and the server run as that user through ``runuser``.
    """

    user = "postgres"
    """The superuser of the cluster (trust authentication: no password)."""
    database = "fleetmq"

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.port = free_port()
        while self.port == 5432:  # a system PostgreSQL may listen there: never touch it
            self.port = free_port()
        self.dir: Path | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.pid: int | None = None
        """The postmaster's (``proc`` is runuser's when run as root)."""

    @property
    def data(self) -> Path:
        assert self.dir is not None
        return self.dir / "data"

    @property
    def log(self) -> Path:
        assert self.dir is not None
        return self.dir / "postgres.log"

    def _as_owner(self, argv: list[str]) -> list[str]:
        if os.geteuid() == 0:
            return ["runuser", "-u", "postgres", "--", *argv]
        return argv

    def start(self) -> None:
        import shutil
        import tempfile

        self.dir = Path(tempfile.mkdtemp(prefix="fleetmq-pg-"))
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres", "postgres")
        try:
            self._initdb()
            self._serve()
            self.create_database(self.database)
        except BaseException:
            self.stop()
            raise

    def _initdb(self) -> None:
        result = subprocess.run(
            self._as_owner([str(self.bindir / "initdb"), "-D", str(self.data), "-U", self.user,
                            "-A", "trust", "-E", "UTF8", "--locale=C", "--no-sync"]),
            check=False, capture_output=True, text=True, timeout=120, cwd=self.dir)
        if result.returncode != 0:
            raise RuntimeError(f"initdb failed ({result.returncode}): {result.stderr}")

    def _serve(self) -> None:
        assert self.dir is not None
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                self._as_owner([str(self.bindir / "postgres"), "-D", str(self.data),
                                "-p", str(self.port), "-k", str(self.dir),
                                "-c", "listen_addresses=127.0.0.1", "-c", "fsync=on",
                                "-c", "logging_collector=off"]),
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                cwd=self.dir, start_new_session=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"postgres exited ({self.proc.returncode}): "
                                   f"{self.log.read_text(errors='replace')}")
            if self.pid is None:
                self.pid = self._postmaster_pid()
            ready = subprocess.run(
                [str(self.bindir / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(self.port),
                 "-U", self.user, "-t", "1"], check=False, capture_output=True, timeout=10)
            if ready.returncode == 0 and self.pid is not None:
                return
            time.sleep(0.05)
        raise RuntimeError("postgres did not accept connections within 30 s: "
                           f"{self.log.read_text(errors='replace')}")

    def _postmaster_pid(self) -> int | None:
        try:
            first = (self.data / "postmaster.pid").read_text().split("\n", 1)[0]
            return int(first)
        except (OSError, ValueError):
            return None

    def _client(self, program: str, *args: str) -> None:
        result = subprocess.run(
            [str(self.bindir / program), "-h", "127.0.0.1", "-p", str(self.port),
             "-U", self.user, *args], check=False, capture_output=True, text=True, timeout=30)
        if result.returncode != 0:
            raise RuntimeError(f"{program} {' '.join(args)} failed: {result.stderr}")

    def create_database(self, name: str) -> None:
        self._client("createdb", name)

    def drop_database(self, name: str) -> None:
        self._client("dropdb", "--force", "--if-exists", name)

    def url(self, database: str | None = None) -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{database or self.database}"

    def stop(self) -> None:
        """Fast shutdown (SIGINT to the postmaster), killed after 10 s; the directory goes."""
        import contextlib
        import shutil
        import signal

        pid = self.pid
        if pid is None and self.dir is not None:
            pid = self._postmaster_pid()
        proc = self.proc
        if pid is not None and (proc is None or proc.poll() is None):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGINT)
        if proc is not None:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                if pid is not None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                proc.kill()
                proc.wait(10)
        self.proc = None
        self.pid = None
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None
