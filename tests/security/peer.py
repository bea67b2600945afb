"""An attacking (or victim) MQTT client for the security tests: any login, any client id, MQTT
5 or 3.1.1, and every reason code the broker answers with, so a test can assert a refusal."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tests.conftest import close_paho, kill_paho

NOT_AUTHORIZED = 0x87
V5 = MQTTProtocolVersion.MQTTv5
V311 = MQTTProtocolVersion.MQTTv311


@dataclass
class Peer:
    port: int
    client_id: str
    username: str | None = None
    password: str | None = None
    protocol: MQTTProtocolVersion = V5
    messages: list[tuple[str, bytes, bool]] = field(default_factory=list)
    connack: int | None = None
    session_present: bool | None = None
    """The CONNACK's session-present flag."""
    disconnected: threading.Event = field(default_factory=threading.Event)
    _client: paho.Client | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    async def connect(self, *, will: tuple[str, bytes, bool] | None = None, clean: bool = True,
                      session_expiry: int = 0) -> int:
        """The CONNACK's reason code (0 accepted); -1 if the broker closed without one."""
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id,
                             protocol=self.protocol,
                             clean_session=clean if self.protocol is V311 else None)
        if self.username is not None:
            client.username_pw_set(self.username, self.password)
        if will is not None:
            client.will_set(will[0], will[1], qos=1, retain=will[2])
        answered = threading.Event()

        def on_connect(_c: Any, _u: Any, _f: Any, rc: Any, _p: Any = None) -> None:
            self.connack = int(rc.value) if hasattr(rc, "value") else int(rc)
            self.session_present = bool(getattr(_f, "session_present", False))
            answered.set()

        def on_disconnect(*_a: Any) -> None:
            self.disconnected.set()
            answered.set()

        client.on_connect = on_connect
        client.on_disconnect = on_disconnect
        client.on_message = self._on_message
        props = None
        if self.protocol is V5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = session_expiry
        client.connect("127.0.0.1", self.port, keepalive=30, clean_start=clean
                       if self.protocol is V5 else paho.MQTT_CLEAN_START_FIRST_ONLY,
                       properties=props)
        client.loop_start()
        self._client = client
        if not await asyncio.to_thread(answered.wait, 10):
            raise RuntimeError("no CONNACK within 10 s")
        if self.connack is None:
            return -1
        if self.connack != 0:
            self.close()
        return self.connack

    def _on_message(self, _c: Any, _u: Any, msg: paho.MQTTMessage) -> None:
        with self._lock:
            self.messages.append((msg.topic, bytes(msg.payload), bool(msg.retain)))

    @property
    def connected(self) -> bool:
        return self._client is not None and self._client.is_connected()

    async def subscribe(self, topic: str) -> int:
        """The SUBACK's code: the granted QoS, 0x80 (3.1.1) or 0x87 (MQTT 5) when refused."""
        assert self._client is not None
        done = threading.Event()
        codes: list[int] = []

        def on_subscribe(_c: Any, _u: Any, _mid: Any, rcs: Any, _p: Any = None) -> None:
            codes.extend(int(getattr(rc, "value", rc)) for rc in rcs)
            done.set()

        self._client.on_subscribe = on_subscribe
        self._client.subscribe(topic, 1)
        if not await asyncio.to_thread(done.wait, 10):
            raise RuntimeError(f"no SUBACK for {topic}")
        return codes[0]

    async def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> int | None:
        """QoS 1; the PUBACK's reason code (MQTT 5), None over 3.1.1."""
        assert self._client is not None
        done = threading.Event()
        code: list[int] = []

        def on_publish(_c: Any, _u: Any, _mid: Any, rc: Any, _p: Any = None) -> None:
            code.append(int(getattr(rc, "value", 0)))
            done.set()

        self._client.on_publish = on_publish
        self._client.publish(topic, payload, qos=1, retain=retain)
        if not await asyncio.to_thread(done.wait, 10):
            raise RuntimeError(f"no PUBACK for {topic}")
        return code[0] if self.protocol is V5 else None

    def received(self, topic: str) -> list[bytes]:
        with self._lock:
            return [p for t, p, _r in self.messages if t == topic]

    def kill(self) -> None:
        """Drop the TCP connection without DISCONNECT: the broker fires the will."""
        assert self._client is not None
        kill_paho(self._client)
        self._client = None

    def close(self) -> None:
        client, self._client = self._client, None
        close_paho(client)
