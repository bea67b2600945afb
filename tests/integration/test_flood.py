"""A node flooding the manager costs the rest of the fleet nothing (contract section 8 "Limits",
which section 11 applies whether auth is on or off): its messages past its rate are refused and
counted, and every other node's heartbeats are applied on time.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from datetime import datetime

import aiohttp

from fleetmq.app import FleetService
from tests.conftest import eventually, make_settings, running
from tests.integration.mqtt_support import api, dropped, metrics
from tests.support import Mosquitto

NODES = 1000
SECONDS = 10.0
FLOOD_RATE = 10_000
WARM_UP_S = 5.0
CHECK_S = 8.0

PUBLISHER = """
import sys, time
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
port, root, mode = sys.argv[1], sys.argv[2], sys.argv[3]
rate, seconds = int(sys.argv[4]), float(sys.argv[5])
client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"flood-test-{mode}")
client.connect("127.0.0.1", int(port), keepalive=60)
client.loop_start()
started = time.monotonic()
sent = 0
while time.monotonic() - started < seconds:
    for _ in range(max(1, rate // 100)):
        if mode == "flood":
            topic = f"{root}/flooder/heartbeat"
        else:
            topic = f"{root}/node-{sent % 1000:04d}/heartbeat"
        client.publish(topic, b'{"uptime_seconds": %d}' % sent, qos=0)
        sent += 1
    ahead = started + sent / rate - time.monotonic()
    if ahead > 0:
        time.sleep(ahead)
client.disconnect()
client.loop_stop()
print(sent)
"""


def publisher(mosquitto: Mosquitto, root: str, mode: str, rate: int,
              seconds: float) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", PUBLISHER, str(mosquitto.port), root, mode, str(rate),
         str(seconds)], stdout=subprocess.PIPE, text=True)


async def test_a_flooding_node_is_limited_and_the_others_stay_online_and_on_time(
    mosquitto: Mosquitto, root: str, http: aiohttp.ClientSession,
) -> None:
    async with running(make_settings(mosquitto.url, root)) as svc:
        for n in range(NODES):
            body = {"node_id": f"node-{n:04d}", "node_type": "microclaw",
                    "heartbeat_interval_seconds": 1}  # offline 3 s after its last heartbeat
            async with http.post(api(svc, "/api/v1/fleet/register"), json=body) as resp:
                assert resp.status == 200
        async with http.post(api(svc, "/api/v1/fleet/register"),
                             json={"node_id": "flooder", "node_type": "microclaw"}) as resp:
            assert resp.status == 200

        # Each node once a second; once all are online (the first ones registered may have
        # gone offline meanwhile), the flood starts. The steady heartbeats go on while the
        # fleet is checked after the flood.
        steady = publisher(mosquitto, root, "steady", NODES, WARM_UP_S + SECONDS + CHECK_S)
        flood = None
        try:
            await eventually(lambda: _all_online(http, svc), timeout=WARM_UP_S,
                             interval=0.2)
            before = await metrics(http, svc)
            flood = publisher(mosquitto, root, "flood", FLOOD_RATE, SECONDS)
            # Waited for in a thread: the manager under test runs on this event loop.
            flood_sent = int((await asyncio.to_thread(flood.communicate,
                                                      timeout=SECONDS + 30))[0])
            ended = time.time()

            # The flood arrived, and was refused past the node's burst and rate, counted.
            allowed = 20 + 5 * (SECONDS + 5)

            async def flood_counted() -> dict[str, float] | None:
                values = await metrics(http, svc)
                return values if dropped(values, "rate_limited") >= flood_sent - allowed \
                    else None

            values = await eventually(flood_counted, timeout=CHECK_S / 2)
            assert flood_sent > FLOOD_RATE * SECONDS * 0.3, "the flood publisher fell behind"
            # Nobody else went offline, and every other node was last seen on time.
            offline = 'fleetmq_transitions_total{status="offline"}'
            assert values[offline] == before[offline]
            async with http.get(api(svc, "/api/v1/fleet/nodes?node_type=microclaw")) as resp:
                nodes = (await resp.json())["nodes"]
            late = [n["id"] for n in nodes if n["id"] != "flooder"
                    and ended - _epoch(n["last_seen"]) > 2.0]
            assert late == []
            steady_sent = int((await asyncio.to_thread(steady.communicate,
                                                       timeout=CHECK_S + 30))[0])
            assert steady_sent >= NODES * (WARM_UP_S + SECONDS) * 0.9
        finally:
            for proc in (steady, flood):
                if proc is not None:
                    proc.kill()


async def _all_online(http: aiohttp.ClientSession, svc: FleetService) -> bool:
    async with http.get(api(svc, "/api/v1/fleet/nodes?status=offline&limit=1")) as resp:
        return bool((await resp.json())["total"] == 0)


def _epoch(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
