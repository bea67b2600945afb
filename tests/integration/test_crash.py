"""Nothing acknowledged is lost (issue 4): ``kill -9`` of ``fleetmq serve`` at random moments
while registrations, transitions and deletes arrive over REST and MQTT, then a restart that must
show every change that was answered (a REST response or an MQTT reply)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.integration.test_cli import Manager, clean_env, managers  # noqa: F401 (fixture)
from tests.support import Mosquitto, free_port

MqttClients = Callable[..., Any]
ROUNDS = 4


class Ledger:
    """What the manager acknowledged, and what is in doubt (sent, never answered)."""

    def __init__(self) -> None:
        self.present: dict[str, dict[str, Any]] = {}
        """id -> fields the stored node must show."""
        self.deleted: set[str] = set()
        self.doubt: set[str] = set()


async def rest_load(http: aiohttp.ClientSession, base: str, ledger: Ledger, tag: str,
                    rng: random.Random) -> None:
    count = 0
    while True:
        count += 1
        touchable = [i for i in ledger.present if i not in ledger.doubt]
        op = rng.random()
        if op < 0.15 and touchable:
            node_id = rng.choice(touchable)
            ledger.doubt.add(node_id)
            async with http.delete(f"{base}/nodes/{node_id}") as resp:
                assert resp.status == 204, await resp.text()
            del ledger.present[node_id]
            ledger.deleted.add(node_id)
            ledger.doubt.discard(node_id)
        elif op < 0.3 and touchable:
            node_id = rng.choice(touchable)
            ledger.doubt.add(node_id)
            async with http.post(f"{base}/heartbeat", json={
                    "node_id": node_id, "status": "degraded", "reason": "low_battery"}) as resp:
                assert resp.status == 200, await resp.text()
            ledger.present[node_id].update(status="degraded", status_reason="low_battery")
            ledger.doubt.discard(node_id)
        else:
            node_id = f"rest-{tag}-{count}"
            body = {"node_id": node_id, "node_type": "picclaw", "location": f"rack-{count}",
                    "metadata": {"tag": tag, "n": count}}
            ledger.doubt.add(node_id)
            async with http.post(f"{base}/register", json=body) as resp:
                assert resp.status == 200, await resp.text()
            ledger.present[node_id] = {"location": f"rack-{count}", "status": "online",
                                       "metadata": {"tag": tag, "n": count}}
            ledger.doubt.discard(node_id)


async def mqtt_load(agent: Any, root: str, tag: str) -> None:
    for count in range(1, 100_000):
        await agent.publish(f"{root}/mqtt-{tag}-{count}/register",
                            json.dumps({"type": "microclaw", "location": f"shelf-{count}"}))
        await asyncio.sleep(0.005)


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'fleet.db'}"
    url: str = request.getfixturevalue("postgres_store_url")
    return url


async def test_kill_9_at_random_moments_loses_nothing_acknowledged(
    managers: Any,  # noqa: F811 (the fixture imported above)
    mosquitto: Mosquitto, root: str, store_url: str, mqtt_clients: MqttClients
) -> None:
    rng = random.Random()
    port = free_port()
    args = ["--broker", mosquitto.url, "--http", f"127.0.0.1:{port}", "--topic-root", root,
            "--store", store_url]
    env = clean_env()
    base = f"http://127.0.0.1:{port}/api/v1/fleet"
    ledger = Ledger()
    mqtt_acked: set[str] = set()
    agent = await mqtt_clients(mosquitto.port, "crash-agent").connect()
    await agent.subscribe(f"{root}/+/reply")
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        for round_no in range(ROUNDS):
            manager: Manager = managers(*args, env=env)
            await manager.wait_ready(port, http)
            tasks = [asyncio.create_task(rest_load(http, base, ledger, f"{round_no}{w}", rng))
                     for w in range(4)]
            tasks.append(asyncio.create_task(mqtt_load(agent, root, str(round_no))))
            await asyncio.sleep(rng.uniform(0.3, 1.5))  # the crash comes at a random moment
            manager.kill()  # SIGKILL: no shutdown code runs
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, aiohttp.ClientError,
                                         AssertionError, OSError):
                    await task
            for message in agent.messages:  # a reply is sent only once the change is stored
                body = json.loads(message.payload)
                if body.get("status") == "registered":
                    mqtt_acked.add(body["node_id"])

        manager = managers(*args, env=env)
        await manager.wait_ready(port, http)
        async with http.get(f"{base}/nodes") as resp:
            nodes = {n["id"]: n for n in (await resp.json())["nodes"]}
        # The history survived too: each acknowledged node's first event is its registration,
        # and its newest shows the state it is in.
        for node_id in rng.sample(sorted(set(ledger.present) - ledger.doubt),
                                  min(20, len(ledger.present))):
            async with http.get(f"{base}/nodes/{node_id}/events") as resp:
                history = (await resp.json())["events"]
            assert (history[-1]["from"], history[-1]["reason"]) == (None, "registered")
            assert history[0]["to"] == nodes[node_id]["status"], node_id
    assert len(ledger.present) > 20
    assert mqtt_acked
    for node_id, fields in ledger.present.items():
        if node_id in ledger.doubt:
            continue
        assert node_id in nodes, f"acknowledged registration of {node_id} was lost"
        shown = {key: nodes[node_id][key] for key in fields}
        assert shown == fields, node_id
    for node_id in ledger.deleted:
        assert node_id not in nodes, f"acknowledged delete of {node_id} was lost"
    for node_id in mqtt_acked:
        assert node_id in nodes, f"registration of {node_id} was answered over MQTT, then lost"
        assert nodes[node_id]["location"] == f"shelf-{node_id.rsplit('-', 1)[1]}"
