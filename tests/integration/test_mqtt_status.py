"""What the manager publishes and keeps true (contract §3, §6, §7).

Retained statuses for dashboards, offline by timeout on time, reconciliation of stale retained
statuses on start, retained ingest messages that are no proof of life, and a broker restart:
reconnect, republish, and no false offline.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable
from functools import partial
from typing import Any, NamedTuple

import aiohttp
import pytest

from fleetmq.broker.embedded import EmbeddedBroker
from tests.conftest import (
    MqttClient,
    Received,
    broker_port,
    eventually,
    make_settings,
    running,
)
from tests.integration.mqtt_support import (
    api,
    bodies,
    dropped,
    get_node,
    metrics,
    offline_statuses,
    readyz,
)
from tests.support import Mosquitto, free_port

MqttClients = Callable[..., Any]
QUIET_WINDOW_S = 0.5
"""How long to keep listening for a message that must not come, after a later one arrived."""


class Preloaded(NamedTuple):
    url: str
    mqtt_protocol: str
    """What the manager should end up speaking with it."""


@pytest.fixture(params=["mosquitto", "amqtt"])
async def preloaded_broker(request: pytest.FixtureRequest) -> AsyncIterator[Preloaded]:
    """A broker that runs before the manager starts, so a test can leave retained messages.

    The amqtt one is fleetmq's own embedded broker reached as an external ``mqtt://`` broker
    (what the error for a taken port suggests): the manager tries MQTT 5 first and falls back
    to 3.1.1.
    """
    if request.param == "mosquitto":
        broker: Mosquitto = request.getfixturevalue("mosquitto")
        yield Preloaded(broker.url, "5")
        return
    port = free_port()
    async with EmbeddedBroker("127.0.0.1", port):
        yield Preloaded(f"mqtt://127.0.0.1:{port}", "3.1.1")


async def test_dashboard_gets_every_status_retained_then_each_change_live(
    broker_url: str, root: str, mqtt_clients: MqttClients
) -> None:
    port = broker_port(broker_url)
    ids = ["node-a", "node-b", "node-c"]
    async with running(make_settings(broker_url, root)):
        observer = await mqtt_clients(port).connect()
        await observer.subscribe(f"{root}/+/status")
        agent = await mqtt_clients(port, "agent").connect()
        for node_id in ids:
            await agent.publish(f"{root}/{node_id}/register", json.dumps({"type": "picclaw"}))
        # Once the observer has them, the broker holds them as retained messages.
        await eventually(lambda: all(bodies(observer, f"{root}/{n}/status") for n in ids))

        dashboard = await mqtt_clients(port).connect()
        await dashboard.subscribe(f"{root}/+/status")  # _manager/status included
        for node_id in ids:
            msg = await _retained(dashboard, f"{root}/{node_id}/status")
            body = json.loads(msg.payload)
            assert body["node_id"] == node_id
            assert (body["status"], body["reason"]) == ("online", "registered")
            assert body["since"].endswith("Z")
            assert body["last_seen"].endswith("Z")
        manager = await _retained(dashboard, f"{root}/_manager/status")
        assert json.loads(manager.payload)["status"] == "online"
        assert json.loads(manager.payload)["since"].endswith("Z")

        def live(node_id: str) -> list[Received]:
            # Copies of the retained state carry the flag (amqtt may send more than one).
            return [m for m in dashboard.received(f"{root}/{node_id}/status") if not m.retain]

        # A heartbeat that changes nothing publishes nothing. Statuses leave in the order of
        # their changes, so once node-b's change is here, none for node-a is still coming.
        await agent.publish(f"{root}/node-a/heartbeat", json.dumps({"status": "online"}))
        await agent.publish(f"{root}/node-b/heartbeat", json.dumps({"status": "degraded"}))
        [b] = await eventually(lambda: live("node-b"))
        assert live("node-a") == []
        # Each change arrives live.
        await agent.publish(f"{root}/node-c/heartbeat", json.dumps(
            {"status": "offline", "reason": "maintenance"}))
        await agent.publish(f"{root}/node-a/register", json.dumps({"type": "picclaw"}))
        [a] = await eventually(lambda: live("node-a"))
        [c] = live("node-c")
        assert json.loads(b.payload)["status"] == "degraded"
        assert json.loads(b.payload)["reason"] == "heartbeat"
        assert json.loads(c.payload)["status"] == "offline"
        assert json.loads(c.payload)["reason"] == "maintenance"
        assert json.loads(a.payload)["status"] == "online"
        assert json.loads(a.payload)["reason"] == "registered"  # every registration counts


async def _retained(client: MqttClient, topic: str) -> Received:
    """The first message on ``topic``, which must be a retained one."""
    msgs: list[Received] = await eventually(lambda: client.received(topic))
    assert msgs[0].retain, msgs
    return msgs[0]


async def test_silent_nodes_go_offline_within_a_second_of_their_deadlines(
    broker_url: str, root: str, http: aiohttp.ClientSession, mqtt_clients: MqttClients
) -> None:
    port = broker_port(broker_url)
    timeout = 3.0  # 3 x the declared interval of 1 s
    # Registrations spread over 1.3 s, so their deadlines fall at every phase of whatever
    # periodic work turns nodes offline: one slow pass (over 1 s) shows on some node.
    ids = [f"node-t{i}" for i in range(7)]
    spacing = 0.19
    async with running(make_settings(broker_url, root)) as svc:
        dashboard = await mqtt_clients(port).connect()
        await dashboard.subscribe(f"{root}/+/status")
        agent = await mqtt_clients(port, "agent-t").connect()
        window: dict[str, tuple[float, float]] = {}
        registered: dict[str, dict[str, Any]] = {}
        for node_id in ids:
            sent = time.monotonic()
            await agent.publish(f"{root}/{node_id}/register", json.dumps(
                {"type": "microclaw", "heartbeat_interval_seconds": 1}))
            registered[node_id] = await eventually(partial(get_node, http, svc, node_id))
            # The manager took the register in [sent, seen]: its deadline is in that + 3 s.
            window[node_id] = (sent, time.monotonic())
            await asyncio.sleep(spacing)  # the spread itself, not a wait for a condition

        polls = []  # (before the request, after the response, {id: status})
        last_seen = max(seen for _sent, seen in window.values())
        while time.monotonic() < last_seen + timeout + 3:
            before = time.monotonic()
            listing = await _list_nodes(http, svc)
            polls.append((before, time.monotonic(), {d["id"]: d["status"] for d in listing}))
            if all(d["status"] == "offline" for d in listing):
                break
            await asyncio.sleep(0.02)

        for node_id, (sent, seen) in window.items():
            online = [p for p in polls if p[2][node_id] == "online"]
            offline = [p for p in polls if p[2][node_id] == "offline"]
            assert offline, f"{node_id} never went offline"
            # Not before its deadline: a poll that ended before the earliest one saw it online.
            assert offline[0][1] >= sent + timeout, (node_id, offline[0][1] - sent)
            # Within 1 s after it: a poll that began after the latest one + 1 s saw it offline.
            if online:
                assert online[-1][0] <= seen + timeout + 1.0, (node_id, online[-1][0] - seen)
            doc = await get_node(http, svc, node_id)
            assert doc is not None
            assert doc["status_reason"] == "heartbeat_timeout"
            assert doc["last_seen"] == registered[node_id]["last_seen"]
            statuses = await eventually(
                partial(offline_statuses, dashboard, f"{root}/{node_id}/status"), timeout=2)
            assert statuses[-1]["reason"] == "heartbeat_timeout"


async def _list_nodes(http: aiohttp.ClientSession, svc: Any) -> list[dict[str, Any]]:
    async with http.get(api(svc, "/api/v1/fleet/nodes")) as resp:
        assert resp.status == 200
        nodes: list[dict[str, Any]] = (await resp.json())["nodes"]
        return nodes


async def test_start_clears_retained_statuses_of_unknown_nodes(
    preloaded_broker: Preloaded, root: str, http: aiohttp.ClientSession,
    mqtt_clients: MqttClients,
) -> None:
    port = broker_port(preloaded_broker.url)
    ghost = f"{root}/ghost-1/status"
    stale = await mqtt_clients(port, "old-tool").connect()
    await stale.publish(ghost, json.dumps({"node_id": "ghost-1", "status": "online"}),
                        retain=True)
    watcher = await mqtt_clients(port).connect()
    await watcher.subscribe(ghost)
    await eventually(lambda: watcher.received(ghost))  # the broker holds it

    async with running(make_settings(preloaded_broker.url, root)) as svc:
        status, ready = await readyz(http, svc)
        assert (status, ready["mqtt_protocol"]) == (200, preloaded_broker.mqtt_protocol)
        cleared = await eventually(lambda: [m for m in watcher.received(ghost) if not m.payload])
        assert len(cleared) == 1

        # A dashboard that subscribes now no longer sees the ghost: a node registered after it
        # subscribed shows up, and then a quiet window passes with no ghost.
        dashboard = await mqtt_clients(port).connect()
        await dashboard.subscribe(f"{root}/+/status")
        agent = await mqtt_clients(port, "real-1").connect()
        await agent.publish(f"{root}/real-1/register", json.dumps({"type": "picclaw"}))
        await eventually(lambda: dashboard.received(f"{root}/real-1/status"))
        await asyncio.sleep(QUIET_WINDOW_S)
        assert dashboard.received(ghost) == []
        assert await get_node(http, svc, "ghost-1") is None


async def test_delete_clears_the_retained_status(
    broker_url: str, root: str, http: aiohttp.ClientSession, mqtt_clients: MqttClients
) -> None:
    port = broker_port(broker_url)
    topic = f"{root}/node-d/status"
    async with running(make_settings(broker_url, root)) as svc:
        watcher = await mqtt_clients(port).connect()
        await watcher.subscribe(topic)
        agent = await mqtt_clients(port, "node-d").connect()
        await agent.publish(f"{root}/node-d/register", json.dumps({"type": "picclaw"}))
        await eventually(lambda: bodies(watcher, topic))

        url = api(svc, "/api/v1/fleet/nodes/node-d")
        async with http.delete(url) as resp:
            assert resp.status == 204
        [clear] = await eventually(lambda: [m for m in watcher.received(topic) if not m.payload])
        assert clear.payload == b""

        dashboard = await mqtt_clients(port).connect()
        await dashboard.subscribe(f"{root}/+/status")
        await agent.publish(f"{root}/node-e/register", json.dumps({"type": "picclaw"}))
        await eventually(lambda: dashboard.received(f"{root}/node-e/status"))
        await asyncio.sleep(QUIET_WINDOW_S)
        assert dashboard.received(topic) == []
        async with http.delete(url) as resp:
            assert resp.status == 404
            assert (await resp.json())["error"] == "Node not found"


async def test_retained_ingest_messages_are_no_proof_of_life(
    preloaded_broker: Preloaded, root: str, http: aiohttp.ClientSession,
    mqtt_clients: MqttClients,
) -> None:
    port = broker_port(preloaded_broker.url)
    firmware = await mqtt_clients(port, "firmware").connect()
    # Left on the broker by firmware that retains what it publishes, before the manager runs.
    await firmware.publish(f"{root}/node-r/heartbeat", json.dumps({"uptime_seconds": 999}),
                           retain=True)
    await firmware.publish(f"{root}/node-s/heartbeat", json.dumps(
        {"status": "offline", "reason": "connection_lost"}), retain=True)
    await firmware.publish(f"{root}/node-q/register", json.dumps({"type": "picclaw"}),
                           retain=True)

    async with running(make_settings(preloaded_broker.url, root)) as svc:
        agent = await mqtt_clients(port, "node-r").connect()
        await agent.subscribe(f"{root}/+/reply")
        for node_id in ("node-r", "node-s"):
            await agent.publish(f"{root}/{node_id}/register", json.dumps({"type": "picclaw"}))
        await agent.publish(f"{root}/node-r/heartbeat", json.dumps({"sensors_active": 1}))

        async def three_retained() -> bool:
            return dropped(await metrics(http, svc), "retained") == 3

        await eventually(three_retained)
        await eventually(lambda: _sensors(http, svc, "node-r"))
        values = await metrics(http, svc)
        assert dropped(values, "unknown_node") == 0
        assert await get_node(http, svc, "node-q") is None
        r = await get_node(http, svc, "node-r")
        s = await get_node(http, svc, "node-s")
        assert r is not None
        assert s is not None
        assert r["uptime_seconds"] is None
        assert (s["status"], s["status_reason"]) == ("online", "registered")
        want = {f"{root}/node-r/reply", f"{root}/node-s/reply"}
        await eventually(lambda: {m.topic for m in agent.messages
                                  if m.topic.endswith("/reply")} == want)


async def _sensors(http: aiohttp.ClientSession, svc: Any, node_id: str) -> bool:
    doc = await get_node(http, svc, node_id)
    return doc is not None and doc["sensors_active"] == 1


async def test_broker_restart_reconnects_republishes_and_causes_no_false_offline(
    own_mosquitto: Mosquitto, root: str, http: aiohttp.ClientSession,
    mqtt_clients: MqttClients,
) -> None:
    port = own_mosquitto.port
    timeout = 3.0  # interval 1 s
    outage = 4.0  # longer than the timeout: without the grace rule every node would expire
    ids = ["node-a", "node-b", "node-c"]
    alive = ids[:2]  # heartbeat again after the reconnect; node-c stays silent

    async def nodes() -> dict[str, dict[str, Any]]:
        docs = {n: await get_node(http, svc, n) for n in ids}
        return {n: d for n, d in docs.items() if d is not None}

    async with running(make_settings(own_mosquitto.url, root)) as svc:
        agent = await mqtt_clients(port, "agent-1").connect()
        for node_id in ids:
            await agent.publish(f"{root}/{node_id}/register", json.dumps(
                {"type": "picclaw", "heartbeat_interval_seconds": 1}))
        await eventually(lambda: _count(nodes(), len(ids)))
        for node_id in ids:
            await agent.publish(f"{root}/{node_id}/heartbeat", json.dumps({"uptime_seconds": 9}))
        await eventually(lambda: _all_uptime(nodes(), 9))
        agent.close()

        await asyncio.to_thread(own_mosquitto.stop)
        down = time.monotonic()
        await eventually(lambda: _status(readyz(http, svc), 503))
        status, body = await readyz(http, svc)
        assert status == 503
        assert "broker" in body["message"]
        # The outage itself: the manager sees no heartbeat, and no node goes offline.
        while time.monotonic() < down + outage:
            assert all(d["status"] == "online" for d in (await nodes()).values())
            await asyncio.sleep(0.2)
        last_down = time.monotonic()
        await asyncio.to_thread(own_mosquitto.start)

        # Reconnect: the manager regains the broker between the last 503 and the first 200.
        while True:
            asked = time.monotonic()
            status, _ = await readyz(http, svc)
            if status == 200:
                break
            last_down = asked
            assert asked < down + outage + 40, "the manager did not reconnect"
            await asyncio.sleep(0.05)
        back = time.monotonic()
        assert all(d["status"] == "online" for d in (await nodes()).values())

        agent = await mqtt_clients(port, "agent-2").connect()

        async def heartbeats() -> None:
            while True:
                for node_id in alive:
                    await agent.publish(f"{root}/{node_id}/heartbeat", b"")
                await asyncio.sleep(0.5)  # the agents' own cadence, twice per interval

        beating = asyncio.create_task(heartbeats())
        try:
            polls = []
            while time.monotonic() < back + timeout + 2:
                before = time.monotonic()
                docs = await nodes()
                polls.append((before, time.monotonic(), docs))
                assert all(docs[n]["status"] == "online" for n in alive), docs
                await asyncio.sleep(0.05)
        finally:
            beating.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await beating

        # node-c: offline only after max(last_seen, reconnect) + timeout, and within 1 s.
        online = [p for p in polls if p[2]["node-c"]["status"] == "online"]
        offline = [p for p in polls if p[2]["node-c"]["status"] == "offline"]
        assert offline, "node-c never went offline"
        assert offline[0][1] >= last_down + timeout, offline[0][1] - last_down
        assert online[-1][0] <= back + timeout + 1.0, online[-1][0] - back
        assert offline[0][2]["node-c"]["status_reason"] == "heartbeat_timeout"
        values = await metrics(http, svc)
        assert values['fleetmq_transitions_total{status="offline"}'] == 1

        # The broker kept nothing (no persistence), yet a new dashboard sees every node and the
        # manager as retained messages: the manager republished them after reconnecting (node-a
        # and node-b have not changed since they registered, before the outage).
        first = await mqtt_clients(port).connect()
        await first.subscribe(f"{root}/+/status")
        await eventually(lambda: all(first.received(f"{root}/{n}/status") for n in ids))
        dashboard = await mqtt_clients(port).connect()
        await dashboard.subscribe(f"{root}/+/status")  # _manager/status included
        for node_id in ids:
            msg = await _retained(dashboard, f"{root}/{node_id}/status")
            want = ("offline", "heartbeat_timeout") if node_id == "node-c" else (
                "online", "registered")
            body = json.loads(msg.payload)
            assert (body["status"], body["reason"]) == want
        manager = await _retained(dashboard, f"{root}/_manager/status")
        assert json.loads(manager.payload)["status"] == "online"


async def _count(docs: Any, n: int) -> bool:
    return len(await docs) == n


async def _all_uptime(docs: Any, uptime: int) -> bool:
    return all(d["uptime_seconds"] == uptime for d in (await docs).values())


async def _status(response: Any, want: int) -> bool:
    status, _ = await response
    return bool(status == want)
