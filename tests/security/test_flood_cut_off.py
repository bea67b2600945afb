"""A node flooding past 10 x its rate for 10 s is cut off at its broker for a minute (contract
section 8, "Limits"): the embedded broker closes its connection and refuses its logins;
Mosquitto's dynamic security plugin disables its client. The other nodes are untouched."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp

from tests.conftest import eventually
from tests.security.broker_clients import NOT_AUTHORISED, auth_fleet

FLOOD_PER_S = 100  # 20 x the default 5 a second: cut off after about 5 s


async def test_a_flooding_node_is_cut_off_by_the_embedded_broker_and_others_stay_served(
    tmp_path: Path, root: str, http: aiohttp.ClientSession,
) -> None:
    async with auth_fleet(tmp_path, root, http) as fleet:
        flooder = await fleet.node("flooder")
        victim = await fleet.node("victim")
        heartbeat = fleet.topics.heartbeat("flooder")
        started = time.monotonic()
        sent = 0
        while flooder.connected and time.monotonic() - started < 20:
            await flooder.publish(heartbeat, {"uptime_seconds": sent}, qos=0)
            sent += 1
            await asyncio.sleep(1 / FLOOD_PER_S)
        assert not flooder.connected, "the flooding node was not disconnected within 20 s"
        assert time.monotonic() - started < 15
        values = await fleet.metrics()
        assert values['fleetmq_mqtt_messages_dropped_total{reason="rate_limited"}'] > 0
        assert values["fleetmq_broker_connections_cut_total"] == 1
        # Its logins are refused for the cut-off, even with its valid token.
        again = fleet.device("flooder", "flooder", flooder.password)
        assert await again.connect() == NOT_AUTHORISED
        # Everyone else is untouched.
        await fleet.still_serves(victim, "victim")
        assert await fleet.node_has("victim", status="online")


async def test_a_write_key_flooding_a_nodes_topics_does_not_get_that_node_cut_off(
    tmp_path: Path, root: str, http: aiohttp.ClientSession,
) -> None:
    # The broker knows who sent the flood: the node's own connection did not, so the node
    # keeps its connection and its logins; the key is held to its own rate.
    async with auth_fleet(tmp_path, root, http, auth={"key_rate": 50.0, "key_burst": 50}) \
            as fleet:
        victim = await fleet.node("victim")
        identity, token = await fleet.key("write")
        gateway = fleet.device(identity, identity, token)
        assert await gateway.connect() == 0
        heartbeat = fleet.topics.heartbeat("victim")
        started = time.monotonic()

        async def flood_seen() -> bool:
            values = await fleet.metrics()
            return values["fleetmq_broker_publishes_rate_limited_total"] > 0 and values[
                'fleetmq_mqtt_messages_dropped_total{reason="rate_limited"}'] >= 450

        while time.monotonic() - started < 20 and not await flood_seen():
            for _ in range(10):
                await gateway.publish(heartbeat, {"uptime_seconds": 1}, qos=0)
            await asyncio.sleep(0.05)
        assert await flood_seen(), "the flood never reached the manager's flood threshold"
        gateway.kill()  # the flood ends here, with whatever paho still had queued
        # The manager named the victim as it counted the 450th refusal, and the broker
        # decided at once: nothing is still on its way.
        assert victim.connected
        assert (await fleet.metrics())["fleetmq_broker_connections_cut_total"] == 0
        # Over MQTT the manager cannot tell who sent a message on the victim's topics, so the
        # key's flood shared the victim's budget while it lasted (a write key is trusted to
        # speak for nodes); once it stops, the victim's own messages are applied again.

        async def applied_again() -> bool:
            await victim.publish(heartbeat, {"uptime_seconds": 4242}, qos=0)
            return await fleet.node_has("victim", uptime_seconds=4242)
        await eventually(applied_again, timeout=15, interval=0.5)
        await fleet.still_serves(victim, "victim")
