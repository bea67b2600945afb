"""MQTT.js (the npm ``mqtt`` package) over WebSockets, as a browser dashboard uses it: the
Node.js client ``tests/js/mqtt_ws_client.mjs`` in a subprocess, driven line by line.

``.ci/run`` installs the pinned package (``npm ci`` in ``tests/js``) and sets
``FLEETMQ_REQUIRE_MQTTJS``: there a missing Node.js or package fails the test instead of
skipping it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import eventually

JS = Path(__file__).resolve().parent / "js"
SCRIPT = JS / "mqtt_ws_client.mjs"


def require_mqttjs() -> str:
    """The path of ``node``, or a skip (a failure under ``FLEETMQ_REQUIRE_MQTTJS``)."""
    node = shutil.which("node")
    missing = ("Node.js is not installed (apt-get install nodejs npm)" if node is None
               else None if (JS / "node_modules" / "mqtt" / "package.json").exists()
               else "MQTT.js is not installed: run `npm ci` in tests/js")
    if missing is not None:
        if os.environ.get("FLEETMQ_REQUIRE_MQTTJS"):
            pytest.fail(f"{missing} but FLEETMQ_REQUIRE_MQTTJS is set")
        pytest.skip(missing)
    assert node is not None
    return node


class MqttJs:
    """One MQTT.js connection; ``events`` is everything it reported, in order."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self._proc = proc
        self.events: list[dict[str, Any]] = []
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self._proc.stdout is not None
        async for line in self._proc.stdout:
            self.events.append(json.loads(line))

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["event"] == kind]

    def messages(self, topic: str | None = None) -> list[dict[str, Any]]:
        return [e for e in self.of("message") if topic is None or e["topic"] == topic]

    async def wait_for(self, match: Callable[[dict[str, Any]], bool],
                       timeout: float = 10.0) -> dict[str, Any]:
        def found() -> dict[str, Any] | None:
            return next((e for e in self.events if match(e)), None)

        try:
            event: dict[str, Any] = await eventually(found, timeout=timeout)
        except AssertionError:
            raise AssertionError(f"MQTT.js did not report it within {timeout}s; it reported "
                                 f"{self.events!r}") from None
        return event

    async def connected(self) -> None:
        """Wait for CONNACK (or fail with what it got instead)."""
        event = await self.wait_for(lambda e: e["event"] in ("connect", "error", "close"))
        assert event["event"] == "connect", self.events

    async def refused(self) -> dict[str, Any]:
        """Wait for the connection's end without a CONNACK that accepted it."""
        await self.wait_for(lambda e: e["event"] == "close")
        assert not self.of("connect"), self.events
        return self.of("error")[0] if self.of("error") else {}

    async def send(self, **command: Any) -> None:
        assert self._proc.stdin is not None
        self._proc.stdin.write((json.dumps(command) + "\n").encode())
        await self._proc.stdin.drain()

    async def subscribe(self, topic_filter: str) -> list[int]:
        """The QoS granted (128: refused)."""
        await self.send(op="subscribe", filter=topic_filter)
        event = await self.wait_for(lambda e: e["event"] == "suback"
                                    and e["filter"] == topic_filter)
        granted: list[int] = event["granted"]
        return granted

    async def publish(self, topic: str, payload: str, retain: bool = False) -> None:
        await self.send(op="publish", topic=topic, payload=payload, retain=retain)
        await self.wait_for(lambda e: e["event"] in ("published", "close")
                            and e.get("topic", topic) == topic)

    async def close(self) -> None:
        if self._proc.returncode is None:
            with contextlib.suppress(ConnectionError):
                await self.send(op="end")
            try:
                async with asyncio.timeout(5):
                    await self._proc.wait()
            except TimeoutError:
                self._proc.kill()
                await self._proc.wait()
        await self._reader


@asynccontextmanager
async def mqttjs(url: str, *, client_id: str = "", username: str | None = None,
                 password: str | None = None,
                 will: tuple[str, str, bool] | None = None,
                 origin: str | None = None) -> AsyncIterator[MqttJs]:
    """An MQTT.js client connecting to ``url`` (``ws://host:port``), MQTT 3.1.1; ``will``:
    (topic, payload, retain); ``origin``: the ``Origin`` its handshake names, as a browser
    page's would."""
    node = require_mqttjs()
    options: dict[str, Any] = {"url": url, "clientId": client_id, "username": username,
                               "password": password}
    if origin is not None:
        options["origin"] = origin
    if will is not None:
        options["will"] = {"topic": will[0], "payload": will[1], "retain": will[2]}
    proc = await asyncio.create_subprocess_exec(
        node, str(SCRIPT), json.dumps(options), cwd=JS, stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE)
    client = MqttJs(proc)
    try:
        yield client
    finally:
        await client.close()
