"""Attacks on a plain Mosquitto 2.0 that runs the static export's password file and ACL
(contract section 8, "Static export"), with ``use_username_as_clientid true`` and
``allow_anonymous false``: its own process on a free port.

Each attack is followed by proof that the victim is untouched: still connected, still
receiving its reply, its topics free of anything the attacker sent.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from fleetmq.auth.export import REQUIRED_BROKER_CONFIG
from fleetmq.auth.service import AuthService
from fleetmq.cli import main as cli_main
from fleetmq.config import AuthSettings
from fleetmq.core.clock import SystemClock
from fleetmq.store.auth_sqlite import SqliteAuthStore
from tests.conftest import (
    _require_mosquitto,
    close_paho,
    eventually,
    kill_paho,
    make_settings,
    running,
)
from tests.support import Mosquitto

MANAGER_PASSWORD = "correct-horse-battery-staple-for-tests"


class ExportedMosquitto(Mosquitto):
    """The repo's mosquitto.conf with the exported files instead of anonymous access."""

    def __init__(self, workdir: Path, passwd: Path, acl: Path) -> None:
        super().__init__(workdir)
        self.passwd, self.acl = passwd, acl

    def _write_config(self) -> None:
        super()._write_config()
        lines = []
        for line in self.conf.read_text().splitlines():
            if line.split()[:1] == ["allow_anonymous"]:
                continue
            lines.append(line)
            # After every listener line (the websockets one too): use_username_as_clientid
            # is a listener option (docs/broker-hooks.md).
            if line.split()[:1] == ["listener"]:
                lines.append("use_username_as_clientid true")
        lines += [*REQUIRED_BROKER_CONFIG, f"password_file {self.passwd}",
                  f"acl_file {self.acl}"]
        self.conf.write_text("\n".join(lines) + "\n")


@dataclass
class Client:
    """A paho client logging in with a username and password, as a device or tool does."""

    port: int
    username: str
    password: str
    client_id: str = ""
    messages: list[tuple[str, bytes]] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _connected: threading.Event = field(default_factory=threading.Event)
    _result: list[Any] = field(default_factory=list)
    _client: paho.Client | None = None

    async def connect(self, will: tuple[str, bytes] | None = None) -> bool:
        """True if the broker accepted the login."""
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id or
                             self.username, protocol=MQTTProtocolVersion.MQTTv311)
        client.username_pw_set(self.username, self.password)
        if will is not None:
            client.will_set(will[0], will[1], qos=1, retain=True)
        answered = threading.Event()

        def on_connect(_c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
            self._result.append(reason)
            if not reason.is_failure:
                self._connected.set()
            answered.set()

        client.on_connect = on_connect
        client.on_disconnect = lambda *_a: self._connected.clear()
        client.on_message = self._on_message
        client.connect_async("127.0.0.1", self.port, keepalive=30)
        client.loop_start()
        self._client = client
        if not await asyncio.to_thread(answered.wait, 10):
            raise RuntimeError("no CONNACK within 10 s")
        if self._result[-1].is_failure:
            self.close()
            return False
        return True

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def _on_message(self, _c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        with self._lock:
            self.messages.append((msg.topic, msg.payload))

    async def subscribe(self, topic: str) -> bool:
        """True if the broker granted the subscription (SUBACK other than 0x80)."""
        assert self._client is not None
        done = threading.Event()
        granted: list[bool] = []

        def on_subscribe(_c: Any, _u: Any, _mid: Any, codes: Any, _p: Any) -> None:
            granted.append(not codes[0].is_failure)
            done.set()

        self._client.on_subscribe = on_subscribe
        self._client.subscribe(topic, 1)
        if not await asyncio.to_thread(done.wait, 10):
            raise RuntimeError(f"no SUBACK for {topic}")
        return granted[0]

    async def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        assert self._client is not None
        info = self._client.publish(topic, payload, qos=1, retain=retain)
        await asyncio.to_thread(info.wait_for_publish, 10)

    def got(self, topic: str) -> list[bytes]:
        with self._lock:
            return [p for t, p in self.messages if t == topic]

    def kill(self) -> None:
        """Drop the TCP connection without DISCONNECT: the broker sends the will, if any."""
        assert self._client is not None
        kill_paho(self._client)
        self._client = None

    def close(self) -> None:
        close_paho(self._client)
        self._client = None


@dataclass
class Fleet:
    broker: ExportedMosquitto
    root: str
    tokens: dict[str, str]
    """node id or key role -> token"""
    key_ids: dict[str, str]
    clients: list[Client]

    def client(self, who: str, *, client_id: str = "", password: str | None = None) -> Client:
        username = f"_key.{self.key_ids[who]}" if who in self.key_ids else who
        made = Client(self.broker.port, username,
                      self.tokens.get(who, MANAGER_PASSWORD) if password is None else password,
                      client_id)
        self.clients.append(made)
        return made


@pytest.fixture
async def fleet(tmp_path: Path, root: str) -> AsyncIterator[Fleet]:
    """Credentials made in a SQLite store, exported by the CLI as an operator would
    (``fleetmq credentials export``), and a Mosquitto running on what it wrote."""
    _require_mosquitto()
    db = tmp_path / "fleet.db"
    store = SqliteAuthStore(str(db))
    await store.open()
    auth = AuthService(store, SystemClock())
    tokens: dict[str, str] = {}
    key_ids: dict[str, str] = {}
    try:
        for node_id in ("sensor-a", "sensor-b"):
            _, tokens[node_id] = await auth.issue_credential(node_id, actor="test")
        for role in ("read", "write"):
            cred, tokens[role] = await auth.create_key(role, actor="test")
            key_ids[role] = cred.id
    finally:
        await store.close()
    password_file = tmp_path / "manager.password"
    password_file.write_text(MANAGER_PASSWORD + "\n")
    out = tmp_path / "export"
    code = await asyncio.to_thread(cli_main, [
        "credentials", "export", "--format", "mosquitto", "--out", str(out),
        "--store", f"sqlite:///{db}", "--topic-root", root,
        "--manager-password-file", str(password_file)])
    assert code == 0
    passwd, acl = out / "passwords", out / "acl"
    assert passwd.stat().st_mode & 0o777 == 0o600
    broker = ExportedMosquitto(tmp_path, passwd, acl)
    broker.start()
    made = Fleet(broker, root, tokens, key_ids, [])
    try:
        yield made
    finally:
        for client in made.clients:
            client.close()
        broker.stop()


async def _watching(fleet: Fleet) -> tuple[Client, Client]:
    """Node A connected and subscribed to its reply and status; the manager watching ingest
    and statuses. Returns (a, manager)."""
    r = fleet.root
    manager = fleet.client("_fleetmq")
    assert await manager.connect()
    for topic in (f"{r}/+/heartbeat", f"{r}/+/register", f"{r}/+/status"):
        assert await manager.subscribe(topic)
    a = fleet.client("sensor-a")
    assert await a.connect()
    assert await a.subscribe(f"{r}/sensor-a/reply")
    assert await a.subscribe(f"{r}/sensor-a/status")
    return a, manager


async def _assert_untouched(fleet: Fleet, a: Client, manager: Client) -> None:
    """A is still connected and still gets its reply; nothing reached A's topics but A's own
    marker heartbeat, which the manager does see."""
    r = fleet.root
    await a.publish(f"{r}/sensor-a/heartbeat", b"marker-from-a")
    await eventually(lambda: manager.got(f"{r}/sensor-a/heartbeat"))
    await manager.publish(f"{r}/sensor-a/reply", b"reply-for-a")
    await eventually(lambda: a.got(f"{r}/sensor-a/reply") == [b"reply-for-a"])
    assert a.connected
    assert manager.got(f"{r}/sensor-a/heartbeat") == [b"marker-from-a"]
    assert manager.got(f"{r}/sensor-a/register") == []
    assert manager.got(f"{r}/sensor-a/status") == []
    assert manager.got(f"{r}/_manager/status") == []
    assert a.got(f"{r}/sensor-a/status") == []


async def test_node_b_cannot_publish_as_a_or_as_the_manager(fleet: Fleet) -> None:
    a, manager = await _watching(fleet)
    r = fleet.root
    b = fleet.client("sensor-b")
    assert await b.connect()
    for topic in (f"{r}/sensor-a/heartbeat", f"{r}/sensor-a/register"):
        await b.publish(topic, b"forged")
    await b.publish(f"{r}/sensor-a/status", b'{"status":"offline"}', retain=True)
    await b.publish(f"{r}/_manager/status", b'{"status":"offline"}', retain=True)
    await b.publish(f"{r}/sensor-b/heartbeat", b"b-own")  # allowed: proves B's writes flow
    await eventually(lambda: manager.got(f"{r}/sensor-b/heartbeat") == [b"b-own"])
    await _assert_untouched(fleet, a, manager)
    # No forged retained status waits for the next subscriber either.
    late = fleet.client("_fleetmq-out")
    assert await late.connect()
    assert await late.subscribe(f"{r}/+/status")
    assert await late.subscribe(f"{r}/_manager/sync")
    await late.publish(f"{r}/_manager/sync", b"end")  # arrives after any retained status
    await eventually(lambda: late.got(f"{r}/_manager/sync"))
    assert late.got(f"{r}/sensor-a/status") == []
    assert late.got(f"{r}/_manager/status") == []


async def test_node_b_subscribed_to_the_whole_fleet_receives_only_its_own_reply(
        fleet: Fleet) -> None:
    # Mosquitto's acl_file grants every SUBSCRIBE and checks read access per message at
    # delivery (measured on 2.0.11): the wide filters are accepted, yet deliver nothing foreign.
    a, manager = await _watching(fleet)
    r = fleet.root
    b = fleet.client("sensor-b")
    assert await b.connect()
    for topic in (f"{r}/#", f"{r}/sensor-a/reply", f"{r}/+/reply", f"{r}/+/heartbeat",
                  f"$share/x/{r}/+/heartbeat", "$SYS/#", "#"):
        await b.subscribe(topic)
    await manager.publish(f"{r}/sensor-c/status", b"status-c", retain=True)
    await _assert_untouched(fleet, a, manager)  # A's heartbeat and reply flow meanwhile
    await manager.publish(f"{r}/sensor-b/reply", b"reply-for-b")
    await eventually(lambda: b.got(f"{r}/sensor-b/reply"))
    assert {t for t, _ in b.messages} == {f"{r}/sensor-b/reply"}
    await manager.publish(f"{r}/sensor-c/status", b"", retain=True)


async def test_b_with_as_client_id_acts_only_as_b_and_a_stays_connected(fleet: Fleet) -> None:
    a, manager = await _watching(fleet)
    r = fleet.root
    b = fleet.client("sensor-b", client_id="sensor-a")
    assert await b.connect()  # B's own valid password: the login works ...
    await b.publish(f"{r}/sensor-a/heartbeat", b"forged")  # ... but only as B
    await b.publish(f"{r}/sensor-b/heartbeat", b"b-as-itself")
    await eventually(lambda: manager.got(f"{r}/sensor-b/heartbeat") == [b"b-as-itself"])
    await b.subscribe(f"{r}/sensor-a/reply")
    await _assert_untouched(fleet, a, manager)  # A was not kicked by "its" client id
    assert b.got(f"{r}/sensor-a/reply") == []


async def test_b_will_on_as_topics_never_arrives(fleet: Fleet) -> None:
    a, manager = await _watching(fleet)
    r = fleet.root
    for topic in (f"{r}/sensor-a/heartbeat", f"{r}/sensor-a/status", f"{r}/_manager/status"):
        b = fleet.client("sensor-b")
        if await b.connect(will=(topic, b'{"status": "offline"}')):
            b.kill()  # the broker may take the login; the will must then go nowhere
    marker = fleet.client("sensor-b")
    assert await marker.connect(will=(f"{r}/sensor-b/heartbeat", b"b-will"))
    marker.kill()  # B's own will does arrive: proves wills are sent at all
    await eventually(lambda: manager.got(f"{r}/sensor-b/heartbeat") == [b"b-will"])
    await _assert_untouched(fleet, a, manager)


async def test_wrong_password_under_as_name_leaves_a_connected(fleet: Fleet) -> None:
    a, manager = await _watching(fleet)
    thief = fleet.client("sensor-a", password=fleet.tokens["sensor-b"])
    assert not await thief.connect()
    nobody = fleet.client("sensor-c", client_id="sensor-a", password=fleet.tokens["sensor-a"])
    assert not await nobody.connect()
    await _assert_untouched(fleet, a, manager)


async def test_read_key_cannot_publish_but_reads_statuses(fleet: Fleet) -> None:
    a, manager = await _watching(fleet)
    r = fleet.root
    reader = fleet.client("read")
    assert await reader.connect()
    for topic in (f"{r}/+/status", f"{r}/+/heartbeat", f"{r}/+/reply"):
        await reader.subscribe(topic)
    await reader.publish(f"{r}/sensor-a/heartbeat", b"forged")
    await reader.publish(f"{r}/sensor-a/status", b"forged", retain=True)
    await manager.publish(f"{r}/sensor-b/status", b"status-b", retain=True)
    await eventually(lambda: reader.got(f"{r}/sensor-b/status") == [b"status-b"])
    await _assert_untouched(fleet, a, manager)
    assert {t for t, _ in reader.messages} == {f"{r}/sensor-b/status"}
    await manager.publish(f"{r}/sensor-b/status", b"", retain=True)  # tidy the retained one


async def test_write_key_speaks_for_nodes_but_writes_no_status(fleet: Fleet) -> None:
    _a, manager = await _watching(fleet)
    r = fleet.root
    gateway = fleet.client("write")
    assert await gateway.connect()
    await gateway.publish(f"{r}/sensor-b/status", b"forged", retain=True)
    await gateway.publish(f"{r}/sensor-b/heartbeat", b"via-gateway")
    await eventually(lambda: manager.got(f"{r}/sensor-b/heartbeat") == [b"via-gateway"])
    assert manager.got(f"{r}/sensor-b/status") == []


async def test_the_manager_user_runs_the_fleet_on_the_exported_broker(
        fleet: Fleet, tmp_path: Path, http: aiohttp.ClientSession) -> None:
    r = fleet.root
    a = fleet.client("sensor-a")
    assert await a.connect()
    assert await a.subscribe(f"{r}/sensor-a/reply")
    assert await a.subscribe(f"{r}/sensor-a/status")
    settings = make_settings(
        f"mqtt://_fleetmq:{MANAGER_PASSWORD}@127.0.0.1:{fleet.broker.port}", r,
        auth=AuthSettings(broker_auth="external", admin_token_file=str(tmp_path / "admin")))
    async with running(settings) as service:
        await a.publish(f"{r}/sensor-a/register", b'{"node_type": "microclaw"}')
        await eventually(lambda: a.got(f"{r}/sensor-a/reply"), timeout=10)
        await eventually(lambda: a.got(f"{r}/sensor-a/status"), timeout=10)
        assert service.registry.get("sensor-a") is not None
        # A forged heartbeat for A by B never reaches the manager.
        b = fleet.client("sensor-b")
        assert await b.connect()
        await b.publish(f"{r}/sensor-a/heartbeat", b'{"status": "offline"}')
        await b.publish(f"{r}/sensor-b/register", b'{"node_type": "microclaw"}')
        await eventually(lambda: service.registry.get("sensor-b") is not None, timeout=10)
        node = service.registry.get("sensor-a")
        assert node is not None
        assert node.status == "online"
