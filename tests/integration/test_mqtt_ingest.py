"""What agents publish (contract §5) and the replies they get (§6), against both brokers.

Register and heartbeat over MQTT, error replies with codes, last wills and late wills, bad
payloads dropped and counted while valid ones keep flowing, and MQTT 5 request/response
(Mosquitto only: the embedded amqtt speaks 3.1.1).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from fleetmq.config import AuthSettings
from tests.conftest import broker_port, eventually, make_settings, running
from tests.integration.mqtt_support import (
    V5Client,
    api,
    bodies,
    codes,
    dropped,
    get_node,
    metrics,
    offline_statuses,
    readyz,
    request_properties,
)
from tests.support import Mosquitto

MqttClients = Callable[..., Any]


async def test_register_and_heartbeats_over_mqtt_show_over_rest_and_get_no_reply(
    broker_url: str, root: str, http: aiohttp.ClientSession, mqtt_clients: MqttClients
) -> None:
    async with running(make_settings(broker_url, root)) as svc:
        agent = await mqtt_clients(broker_port(broker_url), "node-1").connect()
        reply_topic = f"{root}/node-1/reply"
        hb = f"{root}/node-1/heartbeat"
        await agent.subscribe(reply_topic)
        await agent.publish(f"{root}/node-1/register", json.dumps(
            {"type": "microclaw", "capabilities": ["dht22"], "heartbeat_interval_seconds": 30}))
        [registered] = await eventually(lambda: bodies(agent, reply_topic))
        assert not agent.received(reply_topic)[0].retain
        assert registered["node_id"] == "node-1"
        assert registered["status"] == "registered"
        assert registered["message"] == "Node successfully registered"

        await agent.publish(hb, json.dumps(
            {"uptime_seconds": 100, "free_memory_kb": 200, "sensors_active": 2}))

        async def node_with(**want: Any) -> dict[str, Any] | None:
            doc = await get_node(http, svc, "node-1")
            ok = doc is not None and all(doc[k] == v for k, v in want.items())
            return doc if ok else None

        doc = await eventually(lambda: node_with(uptime_seconds=100))
        assert doc["type"] == "microclaw"
        assert doc["capabilities"] == ["dht22"]
        assert doc["heartbeat_interval_seconds"] == 30
        assert (doc["free_memory_kb"], doc["sensors_active"]) == (200, 2)

        await agent.publish(hb, json.dumps({"status": "degraded", "uptime_seconds": 101}))
        doc = await eventually(lambda: node_with(status="degraded"))
        assert doc["status_reason"] == "heartbeat"

        # An empty payload is a bare heartbeat: back to online, and it wipes no telemetry.
        await agent.publish(hb, b"")
        doc = await eventually(lambda: node_with(status="online"))
        assert doc["status_reason"] == "heartbeat"
        assert (doc["uptime_seconds"], doc["free_memory_kb"], doc["sensors_active"]) == (
            101, 200, 2)

        # Accepted heartbeats got no reply over 3.1.1: replies go out in order, so once the
        # reply to this later bad message is here, any heartbeat reply would be here too.
        await agent.publish(hb, b"{not json")
        await eventually(lambda: len(bodies(agent, reply_topic)) >= 2)
        assert codes(agent, reply_topic) == [None, 400]


async def test_rejected_messages_get_error_replies_with_codes(
    broker_url: str, root: str, http: aiohttp.ClientSession, mqtt_clients: MqttClients
) -> None:
    async with running(make_settings(broker_url, root)) as svc:
        agent = await mqtt_clients(broker_port(broker_url), "node-2").connect()
        await agent.subscribe(f"{root}/+/reply")
        reply = f"{root}/node-2/reply"

        async def expect(topic: str, count: int) -> dict[str, Any]:
            """The ``count``-th reply on ``topic``, which must be the last one so far."""
            await eventually(lambda: len(bodies(agent, topic)) >= count)
            got = bodies(agent, topic)
            assert len(got) == count, got
            return got[-1]

        await agent.publish(f"{root}/stranger-1/heartbeat", json.dumps({"uptime_seconds": 5}))
        body = await expect(f"{root}/stranger-1/reply", 1)
        assert body == {"error": "Node not found", "message": "Node must register first",
                        "code": 404}

        await agent.publish(f"{root}/node-2/register", b'{"type": "picclaw",')
        body = await expect(reply, 1)
        assert (body["code"], body["error"]) == (400, "Invalid JSON")

        await agent.publish(f"{root}/node-2/register", json.dumps({"type": "picclaw"}))
        assert (await expect(reply, 2))["message"] == "Node successfully registered"

        await agent.publish(f"{root}/node-2/heartbeat", json.dumps({"node_id": "node-3"}))
        body = await expect(reply, 3)
        assert body["code"] == 400
        assert "node_id" in body["message"]

        await agent.publish(f"{root}/node-2/register", json.dumps({"node_type": "microclaw"}))
        body = await expect(reply, 4)
        assert body["code"] == 409
        assert body["error"]

        huge = json.dumps({"uptime_seconds": 7, "padding": "x" * (64 * 1024)})
        await agent.publish(f"{root}/node-2/heartbeat", huge)
        body = await expect(reply, 5)
        assert body["code"] == 413

        doc = await get_node(http, svc, "node-2")
        assert doc is not None
        assert doc["type"] == "picclaw"
        assert doc["uptime_seconds"] is None  # neither the mismatched nor the huge one applied
        values = await metrics(http, svc)
        for reason in ("unknown_node", "invalid_json", "id_mismatch", "conflict", "too_large"):
            assert dropped(values, reason) == 1, reason
        assert await get_node(http, svc, "stranger-1") is None
        assert await get_node(http, svc, "node-3") is None


async def test_last_will_takes_node_offline_at_once(
    broker_url: str, root: str, http: aiohttp.ClientSession, mqtt_clients: MqttClients
) -> None:
    port = broker_port(broker_url)
    async with running(make_settings(broker_url, root)) as svc:
        will = json.dumps({"status": "offline", "reason": "connection_lost", "session": "s1"})
        agent = await mqtt_clients(port, "node-w").connect(
            will=(f"{root}/node-w/heartbeat", will.encode()))
        await agent.subscribe(f"{root}/node-w/reply")
        await agent.publish(f"{root}/node-w/register", json.dumps(
            {"type": "nanoclaw", "heartbeat_interval_seconds": 60, "session": "s1"}))
        await eventually(lambda: agent.received(f"{root}/node-w/reply"))
        dashboard = await mqtt_clients(port).connect()
        await dashboard.subscribe(f"{root}/node-w/status")
        await eventually(lambda: bodies(dashboard, f"{root}/node-w/status"))
        before = await get_node(http, svc, "node-w")
        assert before is not None
        assert before["status"] == "online"

        killed = time.monotonic()
        agent.kill()

        async def offline() -> dict[str, Any] | None:
            doc = await get_node(http, svc, "node-w")
            return doc if doc is not None and doc["status"] == "offline" else None

        doc = await eventually(offline, timeout=10)
        # The timeout is 180 s: only the will explains an offline node within seconds.
        assert time.monotonic() - killed < 5
        assert doc["status_reason"] == "connection_lost"
        assert doc["last_seen"] == before["last_seen"]  # an offline message is no proof of life
        last = await eventually(
            lambda: offline_statuses(dashboard, f"{root}/node-w/status"))
        assert last[-1]["reason"] == "connection_lost"


async def test_late_will_of_an_old_session_is_ignored_and_counted(
    broker_url: str, root: str, http: aiohttp.ClientSession, mqtt_clients: MqttClients
) -> None:
    port = broker_port(broker_url)
    topic = f"{root}/node-l/heartbeat"
    async with running(make_settings(broker_url, root)) as svc:
        old = await mqtt_clients(port, "node-l").connect(will=(topic, json.dumps(
            {"status": "offline", "reason": "connection_lost", "session": "s1"}).encode()))
        await old.publish(f"{root}/node-l/register", json.dumps(
            {"type": "picclaw", "heartbeat_interval_seconds": 60, "session": "s1"}))
        await eventually(lambda: get_node(http, svc, "node-l"))
        # The agent came back on a new connection (session s2) before its old one timed out.
        new = await mqtt_clients(port, "node-l-2").connect()
        await new.publish(f"{root}/node-l/register", json.dumps(
            {"type": "picclaw", "heartbeat_interval_seconds": 60, "session": "s2"}))
        await new.publish(topic, json.dumps({"uptime_seconds": 42}))
        await eventually(lambda: _field(http, svc, "node-l", "uptime_seconds", 42))

        old.kill()  # the broker now fires the old connection's will, for session s1

        async def late_wills() -> bool:
            return dropped(await metrics(http, svc), "late_will") == 1

        await eventually(late_wills)
        doc = await get_node(http, svc, "node-l")
        assert doc is not None
        assert (doc["status"], doc["status_reason"]) == ("online", "registered")

        # The current session's own offline message is applied.
        await new.publish(topic, json.dumps(
            {"status": "offline", "reason": "shutdown", "session": "s2"}))
        await eventually(lambda: _field(http, svc, "node-l", "status_reason", "shutdown"))
        values = await metrics(http, svc)
        assert dropped(values, "late_will") == 1
        assert values['fleetmq_transitions_total{status="offline"}'] == 1


async def _field(http: aiohttp.ClientSession, svc: Any, node_id: str, name: str,
                 value: Any) -> bool:
    doc = await get_node(http, svc, node_id)
    return doc is not None and doc[name] == value


async def test_bad_payloads_are_dropped_and_counted_while_valid_ones_keep_flowing(
    broker_url: str, root: str, http: aiohttp.ClientSession, mqtt_clients: MqttClients
) -> None:
    rounds = 40
    port = broker_port(broker_url)
    hb = f"{root}/node-5/heartbeat"
    # node-5 sends its 40 valid heartbeats at once: far past a device's rate, not the point.
    unlimited = AuthSettings(node_rate=1000, node_burst=1000)
    async with running(make_settings(broker_url, root, auth=unlimited)) as svc:
        agent = await mqtt_clients(port, "node-5").connect()
        await agent.subscribe(f"{root}/+/reply")
        await agent.publish(f"{root}/node-5/register", json.dumps({"type": "picclaw"}))
        await eventually(lambda: agent.received(f"{root}/node-5/reply"))
        for i in range(1, rounds + 1):
            burst = [
                (hb, b"{oops"),  # invalid_json
                (hb, json.dumps({"uptime_seconds": "many"})),  # invalid_payload
                (hb, json.dumps({"sensors_active": True})),  # invalid_payload
                (hb, json.dumps({"status": "asleep", "free_memory_kb": 9})),  # invalid_payload
                (hb, json.dumps({"node_id": "node-6", "free_memory_kb": 9})),  # id_mismatch
                (f"{root}/-bad/heartbeat", json.dumps({"uptime_seconds": 1})),  # invalid id
                (f"{root}/bad id/heartbeat", b"{}"),  # invalid_topic_id
                (hb, json.dumps({"uptime_seconds": i})),  # valid
            ]
            # paho sends them in this order; only the PUBACK waits overlap.
            await asyncio.gather(*(agent.publish(topic, payload) for topic, payload in burst))

        await eventually(lambda: _field(http, svc, "node-5", "uptime_seconds", rounds),
                         timeout=10)
        doc = await get_node(http, svc, "node-5")
        assert doc is not None
        assert doc["status"] == "online"
        assert doc["free_memory_kb"] is None
        values = await metrics(http, svc)
        assert dropped(values, "invalid_json") == rounds
        assert dropped(values, "invalid_payload") == 3 * rounds
        assert dropped(values, "invalid_topic_id") == 2 * rounds
        assert dropped(values, "id_mismatch") == rounds
        assert values["fleetmq_mqtt_messages_applied_total"] == rounds + 1  # and the register
        # Each error reply went to node-5's own topic; an invalid topic id earns none, and
        # replies go out in order, so node-5's last one means none is still coming.
        replies = await eventually(
            lambda: len(codes(agent, f"{root}/node-5/reply")) >= 1 + 5 * rounds
            and codes(agent, f"{root}/node-5/reply"))
        assert replies == [None] + [400] * 5 * rounds
        # (amqtt also pushes the retained manager status to every new connection: not a reply.)
        assert {m.topic for m in agent.messages if m.topic.endswith("/reply")} == {
            f"{root}/node-5/reply"}

        # The manager is still fully alive.
        status, ready = await readyz(http, svc)
        assert status == 200, ready
        await agent.publish(f"{root}/node-6/register", json.dumps({"type": "picclaw"}))
        await eventually(lambda: get_node(http, svc, "node-6"))


def _has_answers(client: V5Client, topic: str, count: int) -> bool:
    return len(client.answers_on(topic)) >= count


# --- MQTT 5 request/response (Mosquitto only) ---------------------------------------------


@pytest.fixture
def v5_clients(mosquitto: Mosquitto) -> Iterator[Callable[[str], V5Client]]:
    made: list[V5Client] = []

    def make(client_id: str) -> V5Client:
        client = V5Client(mosquitto.port, client_id)
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


async def test_readyz_reports_mqtt5_with_mosquitto_and_311_with_embedded(
    mosquitto: Mosquitto, embedded_url: str, root: str, http: aiohttp.ClientSession
) -> None:
    async with running(make_settings(mosquitto.url, root)) as svc:
        status, body = await readyz(http, svc)
        assert (status, body["mqtt_protocol"]) == (200, "5")
    async with running(make_settings(embedded_url, root)) as svc:
        status, body = await readyz(http, svc)
        assert (status, body["mqtt_protocol"]) == (200, "3.1.1")


async def test_mqtt5_requests_are_answered_on_their_response_topic_with_correlation(
    mosquitto: Mosquitto, root: str, http: aiohttp.ClientSession,
    v5_clients: Callable[[str], V5Client],
) -> None:
    answers = f"answers/{root}/node-6"  # outside the root
    async with running(make_settings(mosquitto.url, root)) as svc:
        agent = await v5_clients("node-6").connect()
        await agent.subscribe(answers)
        await agent.subscribe(f"{root}/+/reply")

        await agent.publish(f"{root}/node-6/register", json.dumps({"type": "picclaw"}),
                            properties=request_properties(answers, b"\x00reg-1"))
        [reg] = await eventually(lambda: agent.answers_on(answers))
        assert reg.correlation == b"\x00reg-1"
        assert reg.body["message"] == "Node successfully registered"

        # An accepted heartbeat that asks for an answer gets one, over MQTT 5.
        await agent.publish(f"{root}/node-6/heartbeat", json.dumps({"uptime_seconds": 3}),
                            properties=request_properties(answers, b"hb-2"))
        await eventually(lambda: len(agent.answers_on(answers)) == 2)
        hb = agent.answers_on(answers)[1]
        assert hb.correlation == b"hb-2"
        assert hb.body["node_id"] == "node-6"
        assert hb.body["next_check_seconds"] == 60
        assert hb.body["received"].endswith("Z")

        # So does a rejected one, with its code.
        await agent.publish(f"{root}/ghost-6/heartbeat", b"{}",
                            properties=request_properties(answers, b"hb-3"))
        await eventually(lambda: len(agent.answers_on(answers)) == 3)
        err = agent.answers_on(answers)[2]
        assert (err.correlation, err.body["code"]) == (b"hb-3", 404)

        # Its own reply topic, under the root, is fine too.
        own = f"{root}/node-6/reply"
        await agent.publish(f"{root}/node-6/heartbeat", b"",
                            properties=request_properties(own, b"hb-4"))
        [mine] = await eventually(lambda: agent.answers_on(own))
        assert mine.correlation == b"hb-4"
        assert mine.body["node_id"] == "node-6"
        assert agent.received(f"{root}/ghost-6/reply") == []
        assert await get_node(http, svc, "node-6") is not None


async def test_mqtt5_response_topic_in_the_fleet_namespace_or_wildcard_is_never_written(
    mosquitto: Mosquitto, root: str, v5_clients: Callable[[str], V5Client],
) -> None:
    own = f"{root}/node-7/reply"
    forbidden = [
        f"{root}/node-8/reply",  # another node's reply topic
        f"{root}/node-7/inbox",  # under the root, not the sender's reply topic
        f"{root}/node-8/status",
        root,
        f"answers/{root}/+",  # wildcards cannot be published to
        f"answers/{root}/#",
        f"$answers/{root}/node-7",  # broker-reserved
    ]
    async with running(make_settings(mosquitto.url, root)):
        agent = await v5_clients("node-7").connect()
        for topic in (f"{root}/#", root, f"answers/{root}/#", f"$answers/{root}/#"):
            await agent.subscribe(topic)
        await agent.publish(f"{root}/node-7/register", json.dumps({"type": "picclaw"}))
        await eventually(lambda: agent.answers_on(own))
        for n, topic in enumerate(forbidden, start=1):
            await agent.publish(f"{root}/node-7/register", json.dumps({"type": "picclaw"}),
                                properties=request_properties(topic, b"c%d" % n))
            await eventually(partial(_has_answers, agent, own, 1 + n))
            assert agent.answers_on(own)[-1].body["message"] == "Node registration updated"
        # A request with an acceptable response topic comes last: replies leave in order, so
        # once its answer is here, nothing went to a forbidden topic before it.
        await agent.publish(f"{root}/node-7/heartbeat", b"",
                            properties=request_properties(f"answers/{root}/ok", b"last"))
        [last] = await eventually(lambda: agent.answers_on(f"answers/{root}/ok"))
        assert last.correlation == b"last"
        assert len(agent.answers_on(own)) == 1 + len(forbidden)
        seen = {m.topic for m in agent.messages}
        assert seen == {own, f"{root}/node-7/register", f"{root}/node-7/heartbeat",
                        f"{root}/node-7/status", f"{root}/_manager/status",
                        f"answers/{root}/ok"}


async def test_with_auth_on_only_the_senders_own_reply_topic_is_honoured(
    mosquitto: Mosquitto, root: str, tmp_path: Path, http: aiohttp.ClientSession,
    v5_clients: Callable[[str], V5Client],
) -> None:
    # Section 6: with auth on, any Response Topic but the sender's own reply topic is ignored
    # and counted, and the answer goes to the sender's reply topic instead.
    own = f"{root}/node-9/reply"
    elsewhere = f"answers/{root}/node-9"  # honoured with auth off (test above)
    settings = make_settings(mosquitto.url, root, auth=AuthSettings(
        admin_token_file=str(tmp_path / "admin.token"), broker_auth="external"))
    async with running(settings) as svc:
        assert svc.auth_enabled
        agent = await v5_clients("node-9").connect()
        await agent.subscribe(f"answers/{root}/#")
        await agent.subscribe(f"{root}/+/reply")
        await agent.publish(f"{root}/node-9/register", json.dumps({"type": "picclaw"}),
                            properties=request_properties(elsewhere, b"r1"))
        [reg] = await eventually(lambda: agent.answers_on(own))
        assert reg.correlation == b"r1"
        await agent.publish(f"{root}/node-9/heartbeat", b"",
                            properties=request_properties(f"{root}/node-10/reply", b"h2"))
        await eventually(lambda: len(agent.answers_on(own)) == 2)
        assert agent.answers_on(own)[1].correlation == b"h2"
        assert agent.answers_on(elsewhere) == []
        assert agent.received(f"{root}/node-10/reply") == []
        token = (tmp_path / "admin.token").read_text().strip()
        async with http.get(api(svc, "/metrics"),
                            headers={"Authorization": f"Bearer {token}"}) as resp:
            text = await resp.text()
        assert "fleetmq_response_topics_refused_total 2" in text
