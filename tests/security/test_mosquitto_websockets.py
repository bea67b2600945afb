"""Mosquitto's websockets listener from the repo's mosquitto.conf (``per_listener_settings
false``) with the dynamic security plugin fleetmq mirrors (``--broker-auth dynsec``): over
MQTT.js and a WebSocket, the same logins and topic rules as over TCP. Each attack asserts the
attack fails AND the victim, node A (paho over TCP), is untouched."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from fleetmq.app import FleetService
from tests.conftest import eventually
from tests.mqttjs import mqttjs
from tests.security.dynsec_support import (
    dynsec_broker,
    dynsec_settings,
    mirrored,
    peer_factory,
    settled,
)
from tests.security.peer import Peer
from tests.support import Mosquitto

pytestmark = pytest.mark.mosquitto
REFUSED = 128
REGISTER = json.dumps({"type": "esp32", "heartbeat_interval_seconds": 30})


@pytest.fixture(scope="module")
def broker() -> Iterator[Mosquitto]:
    with dynsec_broker() as made:
        yield made


@dataclass
class Fleet:
    service: FleetService
    broker: Mosquitto
    root: str
    a: Peer
    a_id: str
    peers: Callable[..., Peer]

    def a_node(self) -> tuple[object, ...]:
        node = self.service.registry.get(self.a_id)
        assert node is not None
        return (node.status, node.status_reason, node.last_seen, node.type)

    async def assert_a_untouched(self, before: tuple[object, ...]) -> None:
        assert self.a.connected
        assert self.a_node() == before
        replies = len(self.a.received(f"{self.root}/{self.a_id}/reply"))
        assert await self.a.publish(f"{self.root}/{self.a_id}/register",
                                    REGISTER.encode()) == 0
        await eventually(lambda: len(self.a.received(f"{self.root}/{self.a_id}/reply"))
                         > replies)


@pytest.fixture
async def fleet(broker: Mosquitto, root: str, tmp_path: Path) -> AsyncIterator[Fleet]:
    with peer_factory() as peers:
        async with mirrored(dynsec_settings(broker, root, tmp_path)) as service:
            a_id = f"a-{root}"
            _, token = await service.auth.issue_credential(a_id, actor="test")
            await settled(service)
            a = peers(broker, a_id, a_id, token)
            assert await a.connect() == 0
            for topic in (f"{root}/{a_id}/reply", f"{root}/{a_id}/status"):
                assert await a.subscribe(topic) == 1
            assert await a.publish(f"{root}/{a_id}/register", REGISTER.encode()) == 0
            await eventually(lambda: a.received(f"{root}/{a_id}/status"))
            yield Fleet(service, broker, root, a, a_id, peers)


async def test_anonymous_and_wrong_password_websocket_logins_are_refused(fleet: Fleet) -> None:
    before = fleet.a_node()
    for client_id, username, password in [("", None, None), (fleet.a_id, None, None),
                                          (fleet.a_id, fleet.a_id, "fmq_node_" + "A" * 43)]:
        async with mqttjs(fleet.broker.ws_url, client_id=client_id, username=username,
                          password=password) as attacker:
            error = await attacker.refused()
            assert error.get("code") in (4, 5), attacker.events
    await fleet.assert_a_untouched(before)


async def test_a_node_over_websockets_keeps_to_its_own_topics(fleet: Fleet) -> None:
    s, before = fleet, fleet.a_node()
    b_id = f"b-{s.root}"
    _, token = await s.service.auth.issue_credential(b_id, actor="test")
    await settled(s.service)
    forged = json.dumps({"node_id": s.a_id, "status": "offline", "reason": "forged"})
    async with mqttjs(s.broker.ws_url, client_id=b_id, username=b_id, password=token) as b:
        await b.connected()
        for pattern in (f"{s.root}/#", f"{s.root}/+/status", f"{s.root}/{s.a_id}/reply", "#"):
            assert await b.subscribe(pattern) == [REFUSED], pattern
        assert await b.subscribe(f"{s.root}/{b_id}/reply") == [1]
        await b.publish(f"{s.root}/{s.a_id}/status", forged, retain=True)
        await b.publish(f"{s.root}/{s.a_id}/heartbeat", forged)
        await b.publish(f"{s.root}/{b_id}/register", REGISTER)  # its own: answered
        await b.wait_for(lambda e: e.get("topic") == f"{s.root}/{b_id}/reply")
        assert {m["topic"] for m in b.messages()} == {f"{s.root}/{b_id}/reply"}
    await fleet.assert_a_untouched(before)
    assert "forged" not in b"".join(s.a.received(f"{s.root}/{s.a_id}/status")).decode()


async def test_a_read_key_over_websockets_gets_the_statuses_and_their_changes(
        fleet: Fleet) -> None:
    s, before = fleet, fleet.a_node()
    cred, token = await s.service.auth.create_key("read", actor="test")
    await settled(s.service)
    identity = cred.broker_identity
    async with mqttjs(s.broker.ws_url, client_id=identity, username=identity,
                      password=token) as dashboard:
        await dashboard.connected()
        assert await dashboard.subscribe(f"{s.root}/+/status") == [1]
        [retained] = [await dashboard.wait_for(
            lambda e: e.get("topic") == f"{s.root}/{s.a_id}/status")]
        assert retained["retain"]
        assert json.loads(retained["payload"])["status"] == "online"
        c_id = f"c-{s.root}"
        _, c_token = await s.service.auth.issue_credential(c_id, actor="test")
        await settled(s.service)
        c = s.peers(s.broker, c_id, c_id, c_token)
        assert await c.connect() == 0
        assert await c.publish(f"{s.root}/{c_id}/register", REGISTER.encode()) == 0
        live = await dashboard.wait_for(lambda e: e.get("topic") == f"{s.root}/{c_id}/status")
        assert not live["retain"]
        assert await dashboard.subscribe(f"{s.root}/+/reply") == [REFUSED]
    await fleet.assert_a_untouched(before)
