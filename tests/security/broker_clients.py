"""MQTT 3.1.1 clients for attacking the embedded broker: a paho device with credentials that
tracks its connection, its CONNACK and SUBACK codes, and a raw-socket CONNECT that can send
what paho refuses to (NUL, 10 kB strings, any will) and reads the CONNACK return code.
"""

from __future__ import annotations

import asyncio
import json
import struct
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from fleetmq.app import FleetService
from fleetmq.config import AuthSettings
from fleetmq.core.topics import Topics
from tests.conftest import (
    Received,
    close_paho,
    eventually,
    kill_paho,
    make_settings,
    running,
)
from tests.support import free_port, metric_samples

ACCEPTED = 0
BAD_USERNAME_OR_PASSWORD = 4
NOT_AUTHORISED = 5
# paho 2 reports 3.1.1 CONNACK codes as MQTT 5 reason codes.
_PAHO_CONNACK = {0: 0, 134: BAD_USERNAME_OR_PASSWORD, 135: NOT_AUTHORISED}


@dataclass
class Device:
    """A paho client (MQTT 3.1.1) logging in with a username and password."""

    port: int
    client_id: str
    username: str | None = None
    password: str | None = None
    clean_session: bool = True
    will: tuple[str, bytes, bool] | None = None
    """(topic, payload, retain)"""
    messages: list[Received] = field(default_factory=list)
    connack: int | None = None
    session_present: bool | None = None
    disconnected: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _client: paho.Client | None = None

    async def connect(self) -> int:
        """The CONNACK code (0: accepted); a refused client is stopped."""
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id,
                             protocol=MQTTProtocolVersion.MQTTv311,
                             clean_session=self.clean_session)
        if self.username is not None:
            client.username_pw_set(self.username, self.password)
        if self.will is not None:
            client.will_set(self.will[0], self.will[1], qos=1, retain=self.will[2])
        answered = threading.Event()

        def on_connect(_c: Any, _u: Any, flags: Any, rc: Any, _p: Any) -> None:
            self.connack = _PAHO_CONNACK.get(rc.value, rc.value)
            self.session_present = bool(flags.session_present)
            answered.set()

        client.on_connect = on_connect
        client.on_disconnect = lambda *_a: self.disconnected.set()
        client.on_message = self._on_message
        client.reconnect_delay_set(30, 60)  # a refused or cut client stays away in a test
        client.connect_async("127.0.0.1", self.port, keepalive=30)
        client.loop_start()
        self._client = client
        if not await asyncio.to_thread(answered.wait, 10):
            raise RuntimeError(f"no CONNACK for {self.client_id!r}")
        if self.connack != ACCEPTED:
            await asyncio.to_thread(self.close)
        assert self.connack is not None
        return self.connack

    @property
    def connected(self) -> bool:
        return self._client is not None and not self.disconnected.is_set() \
            and self._client.is_connected()

    def _on_message(self, _c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        with self._lock:
            self.messages.append(Received(msg.topic, msg.payload, bool(msg.retain)))

    async def subscribe(self, topic: str, qos: int = 1) -> int:
        """The SUBACK code: the granted QoS, or 0x80 for a refusal."""
        assert self._client is not None
        done = threading.Event()
        codes: list[int] = []

        def on_subscribe(_c: Any, _u: Any, _mid: int, rcs: list[Any], _p: Any) -> None:
            codes.extend(rc.value for rc in rcs)
            done.set()

        self._client.on_subscribe = on_subscribe
        self._client.subscribe(topic, qos)
        if not await asyncio.to_thread(done.wait, 10):
            raise RuntimeError(f"no SUBACK for {topic}")
        return codes[0]

    async def publish(self, topic: str, payload: bytes | str | dict[str, Any], qos: int = 1,
                      retain: bool = False) -> None:
        assert self._client is not None
        if isinstance(payload, dict):
            payload = json.dumps(payload)
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if qos:
            await asyncio.to_thread(info.wait_for_publish, 10)

    def received(self, topic: str) -> list[Received]:
        with self._lock:
            return [m for m in self.messages if m.topic == topic]

    def json_on(self, topic: str) -> list[dict[str, Any]]:
        return [json.loads(m.payload) for m in self.received(topic) if m.payload]

    def kill(self) -> None:
        """Drop the TCP connection without DISCONNECT."""
        if self._client is not None:
            kill_paho(self._client)
            self._client = None

    def close(self) -> None:
        close_paho(self._client)
        self._client = None


# --- raw CONNECT ---------------------------------------------------------------------------


def _string(value: str | bytes) -> bytes:
    data = value.encode("utf-8", "surrogatepass") if isinstance(value, str) else value
    return struct.pack("!H", len(data)) + data


def _remaining_length(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def connect_packet(client_id: str | bytes, username: str | bytes | None = None,
                   password: str | bytes | None = None, *, clean: bool = True,
                   will: tuple[str, bytes, bool] | None = None) -> bytes:
    flags = 0x02 if clean else 0
    payload = _string(client_id)
    if will is not None:
        flags |= 0x04 | 0x08 | (0x20 if will[2] else 0)  # will, QoS 1, retain
        payload += _string(will[0]) + _string(will[1])
    if username is not None:
        flags |= 0x80
        payload += _string(username)
    if password is not None:
        flags |= 0x40
        payload += _string(password)
    variable = _string("MQTT") + bytes([4, flags]) + struct.pack("!H", 30)
    body = variable + payload
    return bytes([0x10]) + _remaining_length(len(body)) + body


async def raw_connect(port: int, client_id: str | bytes, username: str | bytes | None = None,
                      password: str | bytes | None = None, *, clean: bool = True,
                      will: tuple[str, bytes, bool] | None = None,
                      timeout: float = 5.0) -> int | None:
    """Send one CONNECT; the CONNACK return code, or None if the broker closed without one.
    An accepted connection is closed at once (without DISCONNECT)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(connect_packet(client_id, username, password, clean=clean, will=will))
        await writer.drain()
        async with asyncio.timeout(timeout):
            try:
                connack = await reader.readexactly(4)
            except (asyncio.IncompleteReadError, ConnectionError):
                return None
        assert connack[0] == 0x20, connack
        code = connack[3]
        if code != ACCEPTED:
            # A refused connection is closed by the broker: nothing more arrives.
            async with asyncio.timeout(timeout):
                assert await reader.read() == b""
        return code
    finally:
        writer.close()


# --- a manager with auth on and its embedded broker ------------------------------------------


@dataclass
class AuthFleet:
    """A running manager (auth on, embedded broker) and helpers to make identities on it."""

    svc: FleetService
    port: int
    root: str
    admin: str
    """The admin key's token (REST calls carry it)."""
    http: aiohttp.ClientSession
    made: list[Device] = field(default_factory=list)

    @property
    def topics(self) -> Topics:
        return self.svc.topics

    async def node_token(self, node_id: str, **kw: Any) -> str:
        _cred, token = await self.svc.auth.issue_credential(node_id, actor="test", **kw)
        return token

    async def key(self, role: str, **kw: Any) -> tuple[str, str]:
        """(broker identity ``_key.<id>``, token)"""
        cred, token = await self.svc.auth.create_key(role, actor="test", **kw)
        return cred.broker_identity, token

    def device(self, client_id: str, username: str | None = None, password: str | None = None,
               **kw: Any) -> Device:
        made = Device(self.port, client_id, username, password, **kw)
        self.made.append(made)
        return made

    async def node(self, node_id: str, token: str | None = None, **kw: Any) -> Device:
        """A node logged in with its own token, subscribed to its reply and status topics,
        registered (its reply received)."""
        token = token or await self.node_token(node_id)
        node = self.device(node_id, node_id, token, **kw)
        assert await node.connect() == ACCEPTED
        t = self.topics
        assert await node.subscribe(t.reply(node_id)) == 1
        assert await node.subscribe(t.status(node_id)) == 1
        await self.register(node, node_id)
        return node

    async def register(self, node: Device, node_id: str) -> None:
        replies = len(node.received(self.topics.reply(node_id)))
        await node.publish(self.topics.register(node_id), {"type": "picclaw"})
        await eventually(lambda: len(node.received(self.topics.reply(node_id))) > replies)

    async def rest_node(self, node_id: str) -> dict[str, Any] | None:
        url = f"http://127.0.0.1:{self.svc.http_port}/api/v1/fleet/nodes/{node_id}"
        async with self.http.get(url, headers={"Authorization": f"Bearer {self.admin}"}) as r:
            if r.status == 404:
                return None
            assert r.status == 200, await r.text()
            doc: dict[str, Any] = await r.json()
            return doc

    async def node_has(self, node_id: str, **fields: Any) -> bool:
        doc = await self.rest_node(node_id)
        return doc is not None and all(doc.get(k) == v for k, v in fields.items())

    async def metrics_value(self, name: str) -> float:
        return (await self.metrics())[name]

    async def metrics(self) -> dict[str, float]:
        url = f"http://127.0.0.1:{self.svc.http_port}/metrics"
        async with self.http.get(url, headers={"Authorization": f"Bearer {self.admin}"}) as r:
            assert r.status == 200
            text = await r.text()
        return metric_samples(text)

    async def still_serves(self, node: Device, node_id: str) -> None:
        """The victim is untouched: connected, and still receiving on its reply and status
        subscriptions (a register gets a reply; a degraded heartbeat a status)."""
        assert node.connected
        await self.register(node, node_id)
        status = self.topics.status(node_id)
        await node.publish(self.topics.heartbeat(node_id),
                           {"status": "degraded", "reason": "probe"})
        await eventually(lambda: any(b.get("status") == "degraded"
                                     for b in node.json_on(status)))
        await node.publish(self.topics.heartbeat(node_id), {"status": "online"})
        await eventually(lambda: node.json_on(status)[-1].get("status") == "online")
        assert node.connected


@asynccontextmanager
async def auth_fleet(tmp_path: Path, root: str, http: aiohttp.ClientSession,
                     auth: dict[str, Any] | None = None,
                     **overrides: Any) -> AsyncIterator[AuthFleet]:
    """``auth``: more AuthSettings fields (rates, say)."""
    admin_file = tmp_path / "admin.token"
    settings = make_settings(f"embedded://127.0.0.1:{free_port()}", root,
                             auth=AuthSettings(mode="on", admin_token_file=str(admin_file),
                                               **(auth or {})),
                             **overrides)
    async with running(settings) as svc:
        assert svc.auth_enabled
        fleet = AuthFleet(svc, settings.broker.port, root, admin_file.read_text().strip(), http)
        try:
            yield fleet
        finally:
            closers = [threading.Thread(target=d.close) for d in fleet.made]
            for closer in closers:
                closer.start()
            for closer in closers:
                closer.join()
