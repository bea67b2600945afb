"""Shared fixtures: a real Mosquitto on a free port, the embedded broker, a running manager.

Every test gets its own topic root, so retained messages never leak between tests.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import os
import shutil
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from fleetmq.app import FleetService
from fleetmq.config import BrokerSettings, HttpSettings, Settings, StoreSettings, parse_store
from tests.support import Mosquitto, free_port


async def eventually(condition: Callable[[], Any], timeout: float = 5.0,
                     interval: float = 0.02) -> Any:
    """Poll until ``condition()`` is truthy; fail with the last value after ``timeout``.

    ``condition`` may be a plain function or return an awaitable (an async lambda's call).
    """
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s (last value: {value!r})")
        await asyncio.sleep(interval)


def _require_mosquitto() -> None:
    if shutil.which("mosquitto") is None:
        if os.environ.get("FLEETMQ_REQUIRE_MOSQUITTO"):
            pytest.fail("mosquitto is not installed but FLEETMQ_REQUIRE_MOSQUITTO is set")
        pytest.skip("mosquitto is not installed (apt-get install mosquitto)")


@pytest.fixture(scope="session")
def mosquitto() -> Iterator[Mosquitto]:
    """One Mosquitto for the whole session; tests isolate themselves by topic root."""
    _require_mosquitto()
    with tempfile.TemporaryDirectory(prefix="fleetmq-mosq-") as tmp:
        broker = Mosquitto(Path(tmp))
        broker.start()
        try:
            yield broker
        finally:
            broker.stop()


@pytest.fixture
def own_mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    """A Mosquitto for one test that may stop and restart it."""
    _require_mosquitto()
    broker = Mosquitto(tmp_path)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


_roots = itertools.count()


@pytest.fixture
def root() -> str:
    """A topic root of this test's own."""
    return f"t{next(_roots)}-{uuid.uuid4().hex[:8]}"


def make_settings(broker: str | BrokerSettings, root: str, **overrides: Any) -> Settings:
    from fleetmq.config import parse_broker

    settings = Settings(
        broker=parse_broker(broker) if isinstance(broker, str) else broker,
        http=HttpSettings(host="127.0.0.1", port=0),
        store=StoreSettings("memory", ""),
        topic_root=root,
    )
    return replace(settings, **overrides)


@asynccontextmanager
async def running(settings: Settings) -> AsyncIterator[FleetService]:
    """A manager, ready: REST bound and the broker connection up with subscriptions acked."""
    async with FleetService(settings) as service:
        await eventually(lambda: service.ready, timeout=10)
        yield service


@dataclass
class Received:
    topic: str
    payload: bytes
    retain: bool


def kill_paho(client: paho.Client) -> None:
    """Drop a paho client's TCP connection without DISCONNECT: the broker fires its will."""
    sock = client.socket()
    client.loop_stop()
    if sock is not None:
        sock.shutdown(socket.SHUT_RDWR)
        sock.close()


def close_paho(client: paho.Client | None) -> None:
    """Disconnect cleanly (no will) and stop its network thread."""
    if client is not None:
        client.disconnect()
        client.loop_stop()


@dataclass
class MqttClient:
    """A plain paho client for tests: an agent or a dashboard."""

    port: int
    client_id: str = ""
    protocol: MQTTProtocolVersion = MQTTProtocolVersion.MQTTv311
    messages: list[Received] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _client: paho.Client | None = None

    async def connect(self, will: tuple[str, bytes] | None = None) -> MqttClient:
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id,
                             protocol=self.protocol)
        if will is not None:
            client.will_set(will[0], will[1], qos=1, retain=False)
        connected = threading.Event()
        client.on_connect = lambda *_a: connected.set()
        client.on_message = self._on_message
        client.connect_async("127.0.0.1", self.port, keepalive=30)
        client.loop_start()
        # Wait off the event loop: the embedded broker runs on it.
        if not await asyncio.to_thread(connected.wait, 10):
            raise RuntimeError("test client could not connect")
        self._client = client
        return self

    def _on_message(self, _c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        with self._lock:
            self.messages.append(Received(msg.topic, msg.payload, bool(msg.retain)))

    async def subscribe(self, topic: str, qos: int = 1) -> None:
        assert self._client is not None
        done = threading.Event()
        self._client.on_subscribe = lambda *_a: done.set()
        self._client.subscribe(topic, qos)
        if not await asyncio.to_thread(done.wait, 10):
            raise RuntimeError(f"no SUBACK for {topic}")

    async def publish(self, topic: str, payload: bytes | str, qos: int = 1,
                      retain: bool = False, properties: Any = None) -> None:
        assert self._client is not None
        info = self._client.publish(topic, payload, qos=qos, retain=retain, properties=properties)
        if qos:
            await asyncio.to_thread(info.wait_for_publish, 10)

    def received(self, topic: str) -> list[Received]:
        with self._lock:
            return [m for m in self.messages if m.topic == topic]

    def kill(self) -> None:
        """Drop the TCP connection without DISCONNECT: the broker fires the will."""
        assert self._client is not None
        kill_paho(self._client)
        self._client = None

    def close(self) -> None:
        close_paho(self._client)
        self._client = None


@pytest.fixture
def mqtt_clients() -> Iterator[Callable[..., MqttClient]]:
    made: list[MqttClient] = []

    def make(port: int, client_id: str = "", **kw: Any) -> MqttClient:
        client = MqttClient(port, client_id, **kw)
        made.append(client)
        return client

    yield make
    # Closed together: once a broker is gone, each paho thread needs up to 1 s to notice.
    closers = [threading.Thread(target=client.close) for client in made]
    for closer in closers:
        closer.start()
    for closer in closers:
        closer.join()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
def embedded_url() -> str:
    return f"embedded://127.0.0.1:{free_port()}"


@pytest.fixture(params=["mosquitto", "embedded"])
def broker_url(request: pytest.FixtureRequest) -> str:
    """Each test that takes this runs against a real Mosquitto and the embedded amqtt."""
    if request.param == "mosquitto":
        broker: Mosquitto = request.getfixturevalue("mosquitto")
        return broker.url
    return f"embedded://127.0.0.1:{free_port()}"


def broker_port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


# --- PostgreSQL: a server of the session's own, a fresh database per test -------------------

from tests.support import Postgres, postgres_bindir  # noqa: E402 (appended with its fixtures)


def _require_postgres() -> Path:
    bindir = postgres_bindir()
    if bindir is None:
        if os.environ.get("FLEETMQ_REQUIRE_POSTGRES"):
            pytest.fail("the PostgreSQL server (initdb, postgres) is not installed but "
                        "FLEETMQ_REQUIRE_POSTGRES is set")
        pytest.skip("the PostgreSQL server is not installed (apt-get install postgresql)")
    return bindir


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[Postgres]:
    """One PostgreSQL for the whole session: initdb into a temporary directory, a free port."""
    server = Postgres(_require_postgres())
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def postgres_url(postgres_server: Postgres) -> str:
    """The session server's own database: ``postgresql://postgres@127.0.0.1:<port>/fleetmq``."""
    return postgres_server.url()


_pg_databases = itertools.count()


@pytest.fixture
def postgres_store_url(postgres_server: Postgres) -> Iterator[str]:
    """A fresh, empty database for this test, dropped after it."""
    name = f"t{next(_pg_databases)}_{uuid.uuid4().hex[:8]}"
    postgres_server.create_database(name)
    try:
        yield postgres_server.url(name)
    finally:
        postgres_server.drop_database(name)


@pytest.fixture(params=["sqlite", "postgresql"])
def durable_store(request: pytest.FixtureRequest, tmp_path: Path) -> StoreSettings:
    """Each test that takes this runs on a SQLite file of its own and on a fresh PostgreSQL
    database (flushing every 0.2 s)."""
    if request.param == "sqlite":
        return parse_store(f"sqlite:///{tmp_path / 'f.db'}", flush_interval_s=0.2)
    url: str = request.getfixturevalue("postgres_store_url")
    return parse_store(url, flush_interval_s=0.2)
