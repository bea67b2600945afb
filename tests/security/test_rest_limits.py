"""Rates over REST (contract section 8 "Limits"): a node past its rate and a key past its rate
get 429 with Retry-After, counted; the others, and the broker's hook calls, are untouched."""

from __future__ import annotations

from pathlib import Path

import aiohttp

from tests.security.conftest import FLEET, guarded_manager
from tests.support import Mosquitto, metric_samples


async def test_a_node_past_its_rate_gets_429_and_another_node_is_untouched(
    mosquitto: Mosquitto, root: str, tmp_path: Path, http: aiohttp.ClientSession,
) -> None:
    # One message every 100 s past a burst of 3: nothing refills while the test runs.
    async with guarded_manager(mosquitto, root, tmp_path, http, node_rate=0.01,
                               node_burst=3) as g:
        c = g.client
        writer = await c.key(g.admin, "write")
        assert (await c.register(writer, "busy")).status == 200  # the first of its 3
        assert (await c.register(writer, "calm")).status == 200
        statuses = [(await c.heartbeat(writer, "busy", uptime_seconds=n)).status
                    for n in range(4)]
        assert statuses[:2] == [200, 200]
        limited = await c.heartbeat(writer, "busy", uptime_seconds=99)
        assert limited.status == 429
        assert limited.json["error"] == "Too many requests"
        assert 90 <= int(limited.headers["Retry-After"]) <= 100
        # The refused heartbeat changed nothing; another node is not held back.
        assert (await g.snapshot("busy"))["uptime_seconds"] != 99
        assert (await c.heartbeat(writer, "calm", uptime_seconds=7)).status == 200
        assert (await g.snapshot("calm"))["uptime_seconds"] == 7
        # A last will that takes it offline is never refused: the node is gone either way;
        # a second one changes nothing and is held to the rate like any message.
        offline = await c.heartbeat(writer, "busy", status="offline", reason="shutdown")
        assert offline.status == 200
        assert (await g.snapshot("busy"))["status"] == "offline"
        again = await c.heartbeat(writer, "busy", status="offline", reason="again")
        assert again.status == 429
        assert (await g.snapshot("busy"))["status_reason"] == "shutdown"
        metrics = metric_samples((await c.request("GET", "/metrics", g.admin)).raw.decode())
        assert 'fleetmq_auth_refused_total{reason="node_rate",status="429"}' in metrics


async def test_a_key_past_its_rate_gets_429_and_other_keys_are_untouched(
    mosquitto: Mosquitto, root: str, tmp_path: Path, http: aiohttp.ClientSession,
) -> None:
    async with guarded_manager(mosquitto, root, tmp_path, http, key_rate=0.01,
                               key_burst=5) as g:
        c = g.client
        # The admin key makes two keys and then reads with one of them: 3 of its 5.
        greedy = await c.key(g.admin, "read")
        other = await c.key(g.admin, "read")
        statuses = [(await c.request("GET", f"{FLEET}/nodes", greedy)).status
                    for _ in range(6)]
        assert statuses[:5] == [200] * 5
        assert statuses[5] == 429
        limited = await c.request("GET", f"{FLEET}/nodes", greedy)
        assert limited.status == 429
        assert int(limited.headers["Retry-After"]) >= 1
        assert (await c.request("GET", f"{FLEET}/nodes", other)).status == 200


async def test_the_brokers_hook_calls_are_not_held_to_its_keys_rate(
    mosquitto: Mosquitto, root: str, tmp_path: Path, http: aiohttp.ClientSession,
) -> None:
    # A reconnect storm is the fleet's logins, not the broker key's own traffic.
    async with guarded_manager(mosquitto, root, tmp_path, http, key_rate=0.01,
                               key_burst=2) as g:
        c = g.client
        broker = await c.key(g.admin, "broker")
        node_token = await c.credential(g.admin, "storm-1")
        login = {"username": "storm-1", "password": node_token, "clientid": "storm-1"}
        answers = [await c.request("POST", "/api/v1/broker/authenticate", broker, body=login)
                   for _ in range(20)]
        assert [a.status for a in answers] == [200] * 20
        assert {a.json["result"] for a in answers} == {"allow"}


async def test_a_key_speaking_for_a_node_cannot_use_up_the_nodes_own_rate(
    mosquitto: Mosquitto, root: str, tmp_path: Path, http: aiohttp.ClientSession,
) -> None:
    async with guarded_manager(mosquitto, root, tmp_path, http, node_rate=0.01,
                               node_burst=3) as g:
        c = g.client
        writer = await c.key(g.admin, "write")
        node_token = await c.credential(g.admin, "victim")
        assert (await c.register(node_token, "victim")).status == 200
        sent = [(await c.heartbeat(writer, "victim")).status for _ in range(6)]
        assert sent[:3] == [200] * 3
        assert set(sent[3:]) == {429}
        # The node's own budget is its own: 2 of its 3 are left after its registration.
        own = [(await c.heartbeat(node_token, "victim", uptime_seconds=n)).status
               for n in range(2)]
        assert own == [200, 200]
        assert (await g.snapshot("victim"))["uptime_seconds"] == 1
