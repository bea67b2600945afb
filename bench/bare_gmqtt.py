"""A bare gmqtt subscriber that only counts: the ceiling of the manager's MQTT library.

Run by bench/ingest.py as a child process on the manager's core (``PINNING.manager``): it
connects, subscribes, prints ``ready``, counts messages until ``expected`` arrived or none came
for ``idle`` seconds after the first, then prints ``{"count": n, "span": seconds}`` and exits.

    python bench/bare_gmqtt.py <port> <topic filter> <5|3.1.1> <expected> <idle seconds>
"""

from __future__ import annotations

import asyncio
import json
import sys
import time

from gmqtt import Client  # type: ignore[import-untyped]
from gmqtt.mqtt.constants import MQTTv50, MQTTv311  # type: ignore[import-untyped]


async def count(port: int, topic: str, version: str, expected: int, idle: float) -> None:
    seen = 0
    first_at = last_at = 0.0

    def on_message(*_a: object) -> int:
        nonlocal seen, first_at, last_at
        seen += 1
        last_at = time.monotonic()
        if seen == 1:
            first_at = last_at
        return 0

    client = Client(f"bench-bare-gmqtt-{version}")
    client.on_message = on_message
    await client.connect("127.0.0.1", port, keepalive=120,
                         version=MQTTv50 if version == "5" else MQTTv311)
    client.subscribe(topic, qos=1)
    await asyncio.sleep(0.5)
    print("ready", flush=True)
    while seen < expected:
        await asyncio.sleep(0.05)
        if seen and time.monotonic() - last_at > idle:
            break
    await client.disconnect()
    print(json.dumps({"count": seen, "span": last_at - first_at}), flush=True)


if __name__ == "__main__":
    port, topic, version, expected, idle = sys.argv[1:6]
    asyncio.run(count(int(port), topic, version, int(expected), float(idle)))
