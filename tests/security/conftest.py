"""Fixtures of the security tests: a manager with access control on, its admin token and a
raw REST client for attacks; a throwaway CA, and Mosquitto brokers of a test's own with a TLS
listener and/or password checks.

The guarded manager runs against the session Mosquitto with ``--broker-auth external`` (the
broker's own auth is not what the REST tests attack) and adopts its first admin key from an
``--admin-token-file`` in the test's tmp_path.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from fleetmq.app import FleetService
from fleetmq.auth.passwords import mosquitto_hash
from fleetmq.config import AuthSettings, StoreSettings
from tests.conftest import _require_mosquitto, make_settings, running
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


FLEET = "/api/v1/fleet"


@dataclass
class Reply:
    status: int
    headers: Mapping[str, str]
    raw: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.raw)


class Client:
    """Raw requests with an optional bearer token; nothing is retried or fixed up."""

    def __init__(self, session: aiohttp.ClientSession, base: str) -> None:
        self.session = session
        self.base = base

    async def request(self, method: str, path: str, token: str | None = None, *,
                      body: Any = None, data: bytes | None = None,
                      headers: dict[str, str] | None = None, params: Any = None) -> Reply:
        headers = dict(headers or {})
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        if body is not None:
            data = json.dumps(body).encode()
        async with self.session.request(method, self.base + path, data=data, headers=headers,
                                        params=params) as resp:
            return Reply(resp.status, resp.headers, await resp.read())

    async def register(self, token: str | None, node_id: str, node_type: str = "microclaw",
                       **fields: Any) -> Reply:
        return await self.request("POST", f"{FLEET}/register", token,
                                  body={"node_id": node_id, "node_type": node_type, **fields})

    async def heartbeat(self, token: str | None, node_id: str, **fields: Any) -> Reply:
        return await self.request("POST", f"{FLEET}/heartbeat", token,
                                  body={"node_id": node_id, **fields})

    async def node(self, token: str | None, node_id: str) -> Reply:
        return await self.request("GET", f"{FLEET}/nodes/{node_id}", token)

    async def key(self, admin: str, role: str, **fields: Any) -> str:
        reply = await self.request("POST", "/api/v1/keys", admin, body={"role": role, **fields})
        assert reply.status == 201, reply.raw
        token: str = reply.json["token"]
        return token

    async def credential(self, token: str, node_id: str, **fields: Any) -> str:
        reply = await self.request("POST", f"{FLEET}/nodes/{node_id}/credentials", token,
                                   body=fields)
        assert reply.status == 201, reply.raw
        issued: str = reply.json["token"]
        return issued


@dataclass
class Guarded:
    service: FleetService
    admin: str
    client: Client

    async def snapshot(self, node_id: str) -> Any:
        """The node as an admin sees it: an attack must leave it exactly so."""
        reply = await self.client.node(self.admin, node_id)
        assert reply.status == 200, reply.raw
        return reply.json


def auth_settings(tmp_path: Path, **overrides: Any) -> AuthSettings:
    return AuthSettings(admin_token_file=str(tmp_path / "admin.token"), broker_auth="external",
                        **overrides)


@asynccontextmanager
async def guarded_manager(mosquitto: Mosquitto, root: str, tmp_path: Path,
                          session: aiohttp.ClientSession, *, store: str | None = None,
                          **auth: Any) -> AsyncIterator[Guarded]:
    settings = make_settings(mosquitto.url, root, auth=auth_settings(tmp_path, **auth))
    if store is not None:
        settings = replace(settings, store=StoreSettings("sqlite", store))
    async with running(settings) as service:
        assert service.auth_enabled
        admin = (tmp_path / "admin.token").read_text().strip()
        yield Guarded(service, admin,
                      Client(session, f"http://127.0.0.1:{service.http_port}"))


@pytest.fixture
async def guarded(mosquitto: Mosquitto, root: str, tmp_path: Path,
                  http: aiohttp.ClientSession) -> AsyncIterator[Guarded]:
    async with guarded_manager(mosquitto, root, tmp_path, http) as g:
        yield g
