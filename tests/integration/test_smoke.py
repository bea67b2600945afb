"""Register over MQTT, see it over REST, and see the retained status: against both brokers."""

from __future__ import annotations

import json
from typing import Any

import aiohttp

from tests.conftest import broker_port, eventually, make_settings, running


async def test_register_over_mqtt_is_visible_over_rest_and_as_retained_status(
    broker_url: str, root: str, http: aiohttp.ClientSession, mqtt_clients: Any
) -> None:
    async with running(make_settings(broker_url, root)) as svc:
        agent = await mqtt_clients(broker_port(broker_url), "node-1").connect()
        await agent.subscribe(f"{root}/node-1/reply")
        await agent.publish(f"{root}/node-1/register", json.dumps({"type": "picclaw"}))
        url = f"http://127.0.0.1:{svc.http_port}/api/v1/fleet/nodes/node-1"

        async def fetch() -> Any:
            async with http.get(url) as resp:
                return await resp.json() if resp.status == 200 else None

        doc = await eventually(fetch)
        assert doc["type"] == "picclaw"
        assert doc["status"] == "online"
        replies = await eventually(lambda: agent.received(f"{root}/node-1/reply"))
        assert json.loads(replies[0].payload)["message"] == "Node successfully registered"

        dashboard = await mqtt_clients(broker_port(broker_url)).connect()
        await dashboard.subscribe(f"{root}/+/status")
        statuses = await eventually(lambda: dashboard.received(f"{root}/node-1/status"))
        assert statuses[0].retain
        assert json.loads(statuses[0].payload)["status"] == "online"
