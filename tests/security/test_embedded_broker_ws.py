"""Attacks on the embedded broker's WebSocket listener with auth on (contract sections 8 and
9): MQTT over WebSockets has the same logins and topic rules as TCP, so nothing refused over
TCP is allowed over a WebSocket.

The attacker is MQTT.js (as a browser dashboard would run it) over the WebSocket listener; the
victim, node A, is a paho device over TCP. Each attack test asserts that the attack fails AND
that node A is untouched: still connected, still served, its node and status unchanged.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from fleetmq.config import BrokerWsSettings
from tests.conftest import eventually
from tests.mqttjs import MqttJs, mqttjs
from tests.security.broker_clients import AuthFleet, auth_fleet
from tests.support import free_port

REFUSED = 128
BAD_USERNAME_OR_PASSWORD = 4
NOT_AUTHORISED = 5


@pytest.fixture
async def fleet(tmp_path: Path, root: str, http: aiohttp.ClientSession
                ) -> AsyncIterator[AuthFleet]:
    async with auth_fleet(tmp_path, root, http,
                          broker_ws=BrokerWsSettings("127.0.0.1", free_port())) as made:
        yield made


def ws_url(fleet: AuthFleet) -> str:
    ws = fleet.svc.settings.broker_ws
    assert ws is not None
    return f"ws://{ws.host}:{ws.port}"


async def refused_logins(fleet: AuthFleet, reason: str) -> float:
    return (await fleet.metrics()).get(
        f'fleetmq_broker_logins_refused_total{{reason="{reason}"}}', 0.0)


def payloads(client: MqttJs, topic: str) -> list[dict[str, object]]:
    return [json.loads(m["payload"]) for m in client.messages(topic) if m["payload"]]


async def test_anonymous_and_bad_token_websocket_logins_are_refused(fleet: AuthFleet) -> None:
    a = await fleet.node("node-a")
    token_b = await fleet.node_token("node-b")
    missing = await refused_logins(fleet, "missing")
    attempts = [
        ("anonymous", "", None, None, BAD_USERNAME_OR_PASSWORD),
        ("anonymous, the victim's client id", "node-a", None, None, BAD_USERNAME_OR_PASSWORD),
        ("a made-up token as the victim", "node-a", "node-a", "fmq_node_" + "A" * 43,
         BAD_USERNAME_OR_PASSWORD),
        ("a token of another node as the victim", "node-a", "node-a", token_b, NOT_AUTHORISED),
        ("its own token under the victim's client id", "node-a", "node-b", token_b,
         NOT_AUTHORISED),
        ("the manager's username", fleet.svc.settings.mqtt_client_id, "_fleetmq", "guess",
         BAD_USERNAME_OR_PASSWORD),
    ]
    for name, client_id, username, password, code in attempts:
        async with mqttjs(ws_url(fleet), client_id=client_id, username=username,
                          password=password) as attacker:
            error = await attacker.refused()
            assert error.get("code") == code, (name, attacker.events)
    assert await refused_logins(fleet, "missing") >= missing + 2
    # amqtt's own order would have dropped the victim's session on the wrong passwords.
    assert fleet.svc.ready
    await fleet.still_serves(a, "node-a")


@pytest.mark.parametrize("pattern", ["{root}/#", "#", "{root}/+/status", "{root}/node-a/reply",
                                     "{root}/+/heartbeat", "$share/x/{root}/+/register",
                                     "$SYS/#"])
async def test_a_node_over_websockets_subscribes_only_to_its_own_topics(
        fleet: AuthFleet, pattern: str) -> None:
    a = await fleet.node("node-a")
    token_b = await fleet.node_token("node-b")
    async with mqttjs(ws_url(fleet), client_id="node-b", username="node-b",
                      password=token_b) as b:
        await b.connected()
        assert await b.subscribe(pattern.format(root=fleet.root)) == [REFUSED]
        assert await b.subscribe(fleet.topics.status("node-b")) == [1]
        assert await b.subscribe(fleet.topics.reply("node-b")) == [1]
        await fleet.still_serves(a, "node-a")  # A gets a reply and statuses: B none of them
        await b.publish(fleet.topics.register("node-b"), json.dumps({"type": "browser"}))
        await b.wait_for(lambda e: e.get("topic") == fleet.topics.reply("node-b"))
        assert not b.of("close")
        assert {m["topic"] for m in b.messages()} <= {fleet.topics.reply("node-b"),
                                                      fleet.topics.status("node-b")}


@pytest.mark.parametrize("target", ["heartbeat", "register", "retained_status",
                                    "manager_status"])
async def test_a_node_over_websockets_cannot_publish_as_another_node_or_the_manager(
        fleet: AuthFleet, target: str) -> None:
    a = await fleet.node("node-a")
    t = fleet.topics
    before = await fleet.rest_node("node-a")
    token_b = await fleet.node_token("node-b")
    topic, payload, retain = {
        "heartbeat": (t.heartbeat("node-a"), {"status": "offline", "reason": "forged"}, False),
        "register": (t.register("node-a"), {"type": "forged"}, False),
        "retained_status": (t.status("node-a"), {"node_id": "node-a", "status": "offline",
                                                 "reason": "forged"}, True),
        "manager_status": (t.manager_status, {"status": "offline", "reason": "forged"}, True),
    }[target]
    refused_before = await fleet.metrics_value("fleetmq_broker_publishes_refused_total")
    async with mqttjs(ws_url(fleet), client_id="node-b", username="node-b",
                      password=token_b) as b:
        await b.connected()
        assert await b.subscribe(t.status("node-b")) == [1]
        await b.publish(t.register("node-b"), json.dumps({"type": "browser"}))
        await b.wait_for(lambda e: e.get("topic") == t.status("node-b"))
        await b.publish(topic, json.dumps(payload), retain=retain)
        # B's own heartbeat after the forgery is applied, so the forgery was seen and dropped.
        await b.publish(t.heartbeat("node-b"),
                        json.dumps({"status": "degraded", "reason": "marker"}))
        await b.wait_for(lambda e: e.get("topic") == t.status("node-b")
                         and '"degraded"' in e["payload"])
        assert not b.of("close")
    assert await fleet.metrics_value("fleetmq_broker_publishes_refused_total") > refused_before
    assert [x["status"] for x in a.json_on(t.status("node-a"))] == ["online"]
    after = await fleet.rest_node("node-a")
    assert after is not None
    assert before is not None
    assert (after["status"], after["type"]) == (before["status"], before["type"])
    # A newcomer over WebSockets sees the manager's retained statuses, not a forged one.
    identity, token = await fleet.key("read")
    async with mqttjs(ws_url(fleet), client_id=identity, username=identity,
                      password=token) as watcher:
        await watcher.connected()
        assert await watcher.subscribe(t.status_filter) == [1]
        assert await watcher.subscribe(t.manager_status) == [1]
        await eventually(lambda: payloads(watcher, t.manager_status)
                         and payloads(watcher, t.status("node-a")))
        assert payloads(watcher, t.manager_status)[-1]["status"] == "online"
        assert payloads(watcher, t.status("node-a"))[-1]["status"] == "online"
    await fleet.still_serves(a, "node-a")


async def test_a_will_outside_its_own_topics_is_refused_at_connect_over_websockets(
        fleet: AuthFleet) -> None:
    a = await fleet.node("node-a")
    t = fleet.topics
    token_b = await fleet.node_token("node-b")
    forged = json.dumps({"node_id": "node-a", "status": "offline", "reason": "forged"})
    refused_before = await refused_logins(fleet, "will")
    async with mqttjs(ws_url(fleet), client_id="node-b", username="node-b", password=token_b,
                      will=(t.status("node-a"), forged, True)) as b:
        assert (await b.refused()).get("code") == NOT_AUTHORISED
    assert await refused_logins(fleet, "will") == refused_before + 1
    # Its own heartbeat as a will is the agent's normal will.
    async with mqttjs(ws_url(fleet), client_id="node-b", username="node-b", password=token_b,
                      will=(t.heartbeat("node-b"), '{"status": "offline"}', False)) as own:
        await own.connected()
    assert [x["status"] for x in a.json_on(t.status("node-a"))] == ["online"]
    await fleet.still_serves(a, "node-a")


async def test_a_read_key_over_websockets_gets_the_statuses_and_their_changes_only(
        fleet: AuthFleet) -> None:
    a = await fleet.node("node-a")
    t = fleet.topics
    identity, token = await fleet.key("read")
    async with mqttjs(ws_url(fleet), client_id=identity, username=identity,
                      password=token) as dashboard:
        await dashboard.connected()
        assert await dashboard.subscribe(t.status_filter) == [1]
        await dashboard.wait_for(lambda e: e.get("topic") == t.status("node-a"))
        [retained] = dashboard.messages(t.status("node-a"))
        assert retained["retain"]
        assert json.loads(retained["payload"])["status"] == "online"
        await fleet.node("node-c")  # a live change: a node registers
        await dashboard.wait_for(lambda e: e.get("topic") == t.status("node-c"))
        assert [m["retain"] for m in dashboard.messages(t.status("node-c"))] == [False]
        # A read key writes nothing and reads no replies.
        assert await dashboard.subscribe(t.reply("+")) == [REFUSED]
        await dashboard.publish(t.heartbeat("node-a"),
                                json.dumps({"status": "degraded", "reason": "forged"}))
        await fleet.still_serves(a, "node-a")
        assert "forged" not in json.dumps(payloads(dashboard, t.status("node-a")))
        assert not dashboard.of("close")


async def test_a_revoked_credentials_websocket_connection_is_closed_within_a_second(
        fleet: AuthFleet) -> None:
    a = await fleet.node("node-a")
    token_b = await fleet.node_token("node-b")
    async with mqttjs(ws_url(fleet), client_id="node-b", username="node-b",
                      password=token_b) as b:
        await b.connected()
        started = time.monotonic()
        assert await fleet.svc.auth.revoke_credentials("node-b", actor="test") == 1
        await b.wait_for(lambda e: e["event"] == "close", timeout=2)
        assert time.monotonic() - started < 1.0
    assert "node-b" not in (fleet.svc.embedded_broker.session_ids()
                            if fleet.svc.embedded_broker else [])
    await fleet.still_serves(a, "node-a")


async def test_a_node_flooding_over_websockets_is_cut_off_and_others_stay_served(
        fleet: AuthFleet) -> None:
    """Contract section 8, "Limits": past 10 x its rate for 10 s its connection is closed
    (a WebSocket too) and its logins refused for a minute."""
    victim = await fleet.node("node-a")
    token = await fleet.node_token("flooder")
    t = fleet.topics
    async with mqttjs(ws_url(fleet), client_id="flooder", username="flooder",
                      password=token) as flooder:
        await flooder.connected()
        await flooder.publish(t.register("flooder"), json.dumps({"type": "browser"}))
        started = time.monotonic()
        sent = 0
        while not flooder.of("close") and time.monotonic() - started < 20:
            await flooder.send(op="publish", topic=t.heartbeat("flooder"), qos=0,
                               payload=json.dumps({"uptime_seconds": sent}))
            sent += 1
            await asyncio.sleep(0.01)  # 100 a second: 20 x the default rate
        assert flooder.of("close"), "the flooding node was not disconnected within 20 s"
    assert time.monotonic() - started < 15
    assert (await fleet.metrics())["fleetmq_broker_connections_cut_total"] == 1
    async with mqttjs(ws_url(fleet), client_id="flooder", username="flooder",
                      password=token) as again:
        assert (await again.refused()).get("code") == NOT_AUTHORISED
    await fleet.still_serves(victim, "node-a")
