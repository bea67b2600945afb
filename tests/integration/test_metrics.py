"""``GET /metrics`` over real HTTP while real MQTT traffic, good and bad, reaches the manager
through a real broker: the Prometheus text format as prometheus_client parses it, node gauges by
status equal to REST's counts, and every received message counted once as applied, ignored or
dropped by reason."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any, NamedTuple

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from fleetmq.app import FleetService
from fleetmq.broker.embedded import EmbeddedBroker
from fleetmq.config import AuthSettings
from fleetmq.core.models import MAX_PAYLOAD_BYTES, STATUSES
from tests.conftest import broker_port, eventually, make_settings, running
from tests.integration.mqtt_support import api
from tests.support import Mosquitto, free_port

MqttClients = Callable[..., Any]
DROPPED = "fleetmq_mqtt_messages_dropped_total"


class Scrape(NamedTuple):
    text: str
    values: dict[tuple[str, frozenset[tuple[str, str]]], float]
    """By (sample name, labels)."""

    def get(self, name: str, **labels: str) -> float:
        return self.values[name, frozenset(labels.items())]

    def dropped(self) -> dict[str, float]:
        return {dict(labels)["reason"]: value for (name, labels), value in self.values.items()
                if name == DROPPED}

    def adds_up(self) -> bool:
        return self.get("fleetmq_mqtt_messages_received_total") == (
            self.get("fleetmq_mqtt_messages_applied_total")
            + self.get("fleetmq_mqtt_messages_ignored_total") + sum(self.dropped().values()))


async def scrape(http: aiohttp.ClientSession, svc: FleetService) -> Scrape:
    async with http.get(api(svc, "/metrics")) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
        text = await resp.text()
    values = {(s.name, frozenset(s.labels.items())): s.value
              for family in text_string_to_metric_families(text) for s in family.samples}
    return Scrape(text, values)


async def rest_count(http: aiohttp.ClientSession, svc: FleetService, status: str) -> int:
    async with http.get(api(svc, f"/api/v1/fleet/nodes?status={status}&limit=1")) as resp:
        assert resp.status == 200
        total: int = (await resp.json())["total"]
        return total


@pytest.fixture(params=["mosquitto", "amqtt"])
async def preloaded_url(request: pytest.FixtureRequest) -> AsyncIterator[str]:
    """A broker that runs before the manager starts, so a test can leave retained messages
    (the amqtt one is fleetmq's embedded broker reached as an external broker)."""
    if request.param == "mosquitto":
        broker: Mosquitto = request.getfixturevalue("mosquitto")
        yield broker.url
        return
    port = free_port()
    async with EmbeddedBroker("127.0.0.1", port):
        yield f"mqtt://127.0.0.1:{port}"


async def test_metrics_parse_and_add_up_under_real_traffic_good_and_bad(
    preloaded_url: str, root: str, http: aiohttp.ClientSession, mqtt_clients: MqttClients
) -> None:
    port = broker_port(preloaded_url)
    firmware = await mqtt_clients(port, "firmware").connect()
    # Left on the broker before the manager runs: a retained heartbeat (dropped when the
    # manager subscribes) and a ghost's retained status (reconciliation traffic: ignored).
    await firmware.publish(f"{root}/node-r/heartbeat", json.dumps({"uptime_seconds": 9}),
                           retain=True)
    await firmware.publish(f"{root}/ghost-1/status", json.dumps({"status": "online"}),
                           retain=True)
    unlimited = AuthSettings(node_rate=1000, node_burst=1000)
    async with running(make_settings(preloaded_url, root, auth=unlimited)) as svc:
        agent = await mqtt_clients(port, "agent").connect()
        for node_id in ("node-a", "node-b", "node-c", "node-d"):
            await agent.publish(f"{root}/{node_id}/register", json.dumps({"type": "picclaw"}))
        hb = f"{root}/node-a/heartbeat"
        good = [
            (hb, json.dumps({"uptime_seconds": 5})),
            (f"{root}/node-b/heartbeat", json.dumps({"status": "degraded", "reason": "hot"})),
            (f"{root}/node-c/heartbeat", json.dumps({"status": "offline", "reason": "bye"})),
        ]
        bad = [
            (hb, b"{oops"),  # invalid_json
            (hb, json.dumps({"uptime_seconds": "many"})),  # invalid_payload
            (hb, json.dumps({"node_id": "node-b"})),  # id_mismatch
            (f"{root}/stranger/heartbeat", json.dumps({"uptime_seconds": 1})),  # unknown_node
            (f"{root}/bad id/heartbeat", b"{}"),  # invalid_topic_id (a wrong topic)
            (hb, b" " * (MAX_PAYLOAD_BYTES + 1)),  # too_large
            (f"{root}/node-d/register", json.dumps({"type": "nanoclaw"})),  # conflict
        ]
        seen = []
        for topic, payload in good + bad:
            await agent.publish(topic, payload)
            seen.append(await scrape(http, svc))  # mid-traffic: it adds up at every scrape
        # Through REST too: the gauges count every node, the MQTT counters only MQTT's.
        async with http.post(api(svc, "/api/v1/fleet/register"),
                             json={"node_id": "node-e", "type": "picclaw"}) as resp:
            assert resp.status == 200
        async with http.post(api(svc, "/api/v1/fleet/heartbeat"),
                             json={"node_id": "node-e", "status": "degraded"}) as resp:
            assert resp.status == 200

        expected = {"retained": 1, "invalid_json": 1, "invalid_payload": 1, "id_mismatch": 1,
                    "unknown_node": 1, "invalid_topic_id": 1, "too_large": 1, "conflict": 1}

        async def all_counted() -> Scrape | None:
            now = await scrape(http, svc)
            counted = (now.get("fleetmq_mqtt_messages_applied_total") == 4 + len(good)
                       and {k: v for k, v in now.dropped().items() if v} == expected)
            return now if counted else None

        final = await eventually(all_counted)
        assert all(s.adds_up() for s in seen)
        assert final.adds_up()
        assert final.get("fleetmq_mqtt_messages_ignored_total") >= 1  # the ghost's status

        families = list(text_string_to_metric_families(final.text))
        assert families
        for family in families:
            name = family.name + ("_total" if family.type == "counter" else "")
            assert f"# HELP {name} " in final.text
            assert f"# TYPE {name} {family.type}\n" in final.text

        by_status = {status: final.get("fleetmq_nodes", status=status) for status in STATUSES}
        assert by_status == {"online": 2, "degraded": 2, "offline": 1}
        for status in STATUSES:
            assert by_status[status] == await rest_count(http, svc, status)
