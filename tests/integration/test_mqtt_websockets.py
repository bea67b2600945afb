"""MQTT over WebSockets for browser dashboards (contract section 9): MQTT.js, as a dashboard
uses it, subscribes to ``<root>/+/status`` over the embedded broker's WebSocket listener of a
real ``fleetmq serve``, and over Mosquitto's websockets listener from the repo's
mosquitto.conf, and gets the retained statuses and then the live changes.
"""

from __future__ import annotations

import json
import signal
import time
from typing import Any

import aiohttp

from fleetmq.config import BrokerWsSettings
from tests.conftest import free_port, make_settings, running
from tests.integration.test_cli import assert_no_traceback, exit_over_taken_port, managers
from tests.mqttjs import MqttJs, mqttjs
from tests.support import Mosquitto

__all__ = ["managers"]  # the fixture, shared with test_cli.py


async def register(http: aiohttp.ClientSession, port: int, node_id: str) -> None:
    async with http.post(f"http://127.0.0.1:{port}/api/v1/fleet/register",
                         json={"node_id": node_id, "type": "picclaw"}) as resp:
        assert resp.status in (200, 201), await resp.text()


async def delete(http: aiohttp.ClientSession, port: int, node_id: str) -> None:
    async with http.delete(f"http://127.0.0.1:{port}/api/v1/fleet/nodes/{node_id}") as resp:
        assert resp.status == 204, await resp.text()


def statuses(client: MqttJs, root: str, node_id: str) -> list[tuple[Any, bool]]:
    """(payload's status or None for a cleared one, retained) of each message received."""
    return [(json.loads(m["payload"])["status"] if m["payload"] else None, m["retain"])
            for m in client.messages(f"{root}/{node_id}/status")]


async def watch_statuses_then_changes(url: str, root: str, http: aiohttp.ClientSession,
                                      http_port: int) -> None:
    """Two nodes registered before MQTT.js connects: their retained statuses arrive, flagged
    retained; a node registered and one deleted after it subscribed arrive live."""
    await register(http, http_port, "ws-a")
    await register(http, http_port, "ws-b")
    async with mqttjs(url) as dashboard:
        await dashboard.connected()
        assert await dashboard.subscribe(f"{root}/+/status") == [1]
        for node_id in ("ws-a", "ws-b"):
            await dashboard.wait_for(lambda e, n=node_id: e["event"] == "message"
                                     and e["topic"] == f"{root}/{n}/status")
            assert statuses(dashboard, root, node_id) == [("online", True)]
        await dashboard.wait_for(lambda e: e.get("topic") == f"{root}/_manager/status")
        assert json.loads(dashboard.messages(f"{root}/_manager/status")[0]["payload"])[
            "status"] == "online"

        await register(http, http_port, "ws-c")
        await dashboard.wait_for(lambda e: e.get("topic") == f"{root}/ws-c/status")
        assert statuses(dashboard, root, "ws-c") == [("online", False)]
        await delete(http, http_port, "ws-a")
        await dashboard.wait_for(lambda e: len(dashboard.messages(f"{root}/ws-a/status")) > 1)
        assert statuses(dashboard, root, "ws-a")[-1] == (None, False)  # its status cleared


async def test_mqttjs_over_websockets_gets_statuses_from_fleetmq_serve_embedded_broker(
        managers: Any, http: aiohttp.ClientSession, root: str) -> None:
    http_port, ws_port = free_port(), free_port()
    manager = managers("--broker", f"embedded://127.0.0.1:{free_port()}",
                       "--http", f"127.0.0.1:{http_port}", "--topic-root", root,
                       "--broker-ws", f"127.0.0.1:{ws_port}")
    await manager.wait_ready(http_port, http)
    await watch_statuses_then_changes(f"ws://127.0.0.1:{ws_port}", root, http, http_port)
    assert f"ws=127.0.0.1:{ws_port}" in manager.log
    # Plain HTTP on the WebSocket port (a scanner, say) is refused without a traceback each.
    for _ in range(3):
        async with http.get(f"http://127.0.0.1:{ws_port}/") as resp:
            assert resp.status == 426
    # A dashboard still connected: the manager stops even so, promptly, and the dashboard
    # sees the manager's offline status before its connection ends.
    async with mqttjs(f"ws://127.0.0.1:{ws_port}") as dashboard:
        await dashboard.connected()
        assert await dashboard.subscribe(f"{root}/_manager/status") == [1]
        await dashboard.wait_for(lambda e: e.get("topic") == f"{root}/_manager/status")
        started = time.monotonic()
        manager.signal(signal.SIGTERM)
        assert await manager.wait_exit() == 0, manager.log
        stopped_s = time.monotonic() - started
        await dashboard.wait_for(lambda e: e["event"] == "close")
        manager_statuses = [json.loads(m["payload"])["status"]
                            for m in dashboard.messages(f"{root}/_manager/status")]
    assert manager_statuses == ["online", "offline"]
    assert stopped_s < 5, manager.log
    assert_no_traceback(manager.log)


async def test_mqttjs_over_websockets_gets_statuses_from_mosquitto_of_the_repo_config(
        mosquitto: Mosquitto, http: aiohttp.ClientSession, root: str) -> None:
    async with running(make_settings(mosquitto.url, root)) as svc:
        await watch_statuses_then_changes(mosquitto.ws_url, root, http, svc.http_port)


async def test_websocket_port_taken_exits_with_a_one_line_hint(managers: Any) -> None:
    line, busy = await exit_over_taken_port(lambda busy: managers(
        "--broker", f"embedded://127.0.0.1:{free_port()}", "--http", f"127.0.0.1:{free_port()}",
        "--broker-ws", f"127.0.0.1:{busy}"))
    assert "already in use" in line
    assert f"127.0.0.1:{busy}" in line
    assert "--broker-ws off" in line


async def test_websocket_address_of_another_machine_exits_with_one_error_line(
        managers: Any) -> None:
    manager = managers("--auth", "off", "--broker", f"embedded://127.0.0.1:{free_port()}",
                       "--http", f"127.0.0.1:{free_port()}",
                       "--broker-ws", "192.0.2.1:9001")  # TEST-NET-1: never this machine's
    assert await manager.wait_exit(timeout=10) == 1
    [line] = [x for x in manager.log.splitlines() if x.startswith("fleetmq: error:")]
    assert "--broker-ws 192.0.2.1:9001 cannot be listened on" in line
    assert_no_traceback(manager.log)


async def test_broker_ws_off_opens_no_websocket_listener(
        managers: Any, http: aiohttp.ClientSession, root: str) -> None:
    http_port = free_port()
    manager = managers("--broker", f"embedded://127.0.0.1:{free_port()}",
                       "--http", f"127.0.0.1:{http_port}", "--topic-root", root,
                       "--broker-ws", "off")
    await manager.wait_ready(http_port, http)
    assert "ws=off" in manager.log
    assert_no_traceback(manager.log)


async def test_without_auth_a_page_of_another_site_cannot_use_the_websocket_listener(
        root: str, http: aiohttp.ClientSession) -> None:
    """Auth off (no admin key): a browser page from any site could reach ws://127.0.0.1 and
    forge statuses; its handshake's Origin keeps it out, while a page served from this machine
    and a client that is no browser get in."""
    ws = BrokerWsSettings("127.0.0.1", free_port())
    settings = make_settings(f"embedded://127.0.0.1:{free_port()}", root, broker_ws=ws)
    url = f"ws://127.0.0.1:{ws.port}"
    async with running(settings) as svc:
        assert not svc.auth_enabled
        await register(http, svc.http_port, "ws-a")
        forged = json.dumps({"node_id": "ws-a", "status": "offline", "reason": "forged"})
        for origin in ("https://evil.example", "null"):
            async with mqttjs(url, origin=origin) as page:
                await page.refused()  # closed before its CONNECT is read
                await page.publish(f"{root}/ws-a/status", forged, retain=True)
        async with mqttjs(url, origin="http://localhost:5173") as own_page:
            await own_page.connected()
            assert await own_page.subscribe(f"{root}/+/status") == [1]
            await own_page.wait_for(lambda e: e.get("topic") == f"{root}/ws-a/status")
            assert statuses(own_page, root, "ws-a") == [("online", True)]
        async with http.get(f"http://127.0.0.1:{svc.http_port}/api/v1/fleet/nodes/ws-a") as r:
            assert (await r.json())["status"] == "online"
