"""Fixtures of the TLS and credential tests: a throwaway CA, and Mosquitto brokers of a test's
own with a TLS listener and/or password checks."""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fleetmq.auth.passwords import mosquitto_hash
from tests.conftest import _require_mosquitto
from tests.security.pki import Pair, Pki, make_pki
from tests.support import Mosquitto

MANAGER_USER = "_fleetmq-manager"
MANAGER_PASSWORD = "manager-password-for-tests"


@pytest.fixture(scope="session")
def pki() -> Iterator[Pki]:
    with tempfile.TemporaryDirectory(prefix="fleetmq-pki-") as tmp:
        yield make_pki(Path(tmp))


class ConfiguredMosquitto(Mosquitto):
    """The repo's Mosquitto config with this test's listener options (TLS) and logins."""

    def __init__(self, workdir: Path, listener: list[str],
                 passwords: dict[str, str] | None) -> None:
        super().__init__(workdir)
        self.listener = listener
        self.passwords = passwords

    def _write_config(self) -> None:
        super()._write_config()
        lines = []
        for line in self.conf.read_text().splitlines():
            if line.startswith("allow_anonymous"):
                continue
            lines.append(line)
            if line == f"listener {self.port} 127.0.0.1":
                lines += self.listener
        if self.passwords is None:
            lines.append("allow_anonymous true")
        else:
            password_file = self.workdir / "passwd"
            password_file.write_text("".join(f"{user}:{mosquitto_hash(secret)}\n"
                                             for user, secret in self.passwords.items()))
            password_file.chmod(0o600)
            lines += ["allow_anonymous false", f"password_file {password_file}"]
        self.conf.write_text("\n".join(lines) + "\n")

    def broker_url(self, scheme: str = "mqtt", login: bool = True) -> str:
        """The URL of this broker, with the manager's login if it checks passwords."""
        user = f"{MANAGER_USER}:{MANAGER_PASSWORD}@" if login and self.passwords else ""
        return f"{scheme}://{user}127.0.0.1:{self.port}"


MosquittoFactory = Callable[..., ConfiguredMosquitto]


@pytest.fixture
def mosquitto_with(tmp_path: Path) -> Iterator[MosquittoFactory]:
    """``mosquitto_with(tls=pki, server=pki.server, require_certificate=False,
    passwords={user: token})``: a Mosquitto of this test's own (a TLS listener with ``tls``,
    client certificates checked against ``tls.ca``); the manager's login joins ``passwords``."""
    _require_mosquitto()
    started: list[ConfiguredMosquitto] = []

    def start(*, tls: Pki | None = None, server: Pair | None = None,
              require_certificate: bool = False,
              passwords: dict[str, str] | None = None) -> ConfiguredMosquitto:
        listener: list[str] = []
        if tls is not None:
            pair = server or tls.server
            listener = [f"cafile {tls.ca}", f"certfile {pair.cert}", f"keyfile {pair.key}",
                        "tls_version tlsv1.2"]
            if require_certificate:
                listener.append("require_certificate true")
        # The manager's output connection logs in as <user>-out (see FleetService).
        logins = None if passwords is None else {
            MANAGER_USER: MANAGER_PASSWORD, f"{MANAGER_USER}-out": MANAGER_PASSWORD, **passwords}
        workdir = tmp_path / f"mosquitto-{len(started)}"
        workdir.mkdir()
        broker = ConfiguredMosquitto(workdir, listener, logins)
        started.append(broker)
        broker.start()
        return broker

    try:
        yield start
    finally:
        for broker in started:
            broker.stop()
