"""The embedded broker's bounds with auth on: offline queues of at most ``max_queued``
messages per client (the oldest dropped, counted) and sessions that expire without a
connection. A broker of the test's own with small bounds, on the manager's AuthService."""

from __future__ import annotations

import secrets
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from fleetmq.auth.rules import TopicRules
from fleetmq.auth.service import AuthService
from fleetmq.auth.store import MemoryAuthStore
from fleetmq.broker.access import MANAGER_USERNAME
from fleetmq.broker.embedded import EmbeddedBroker
from fleetmq.core.clock import SystemClock
from tests.conftest import eventually
from tests.security.broker_clients import ACCEPTED, Device
from tests.support import free_port


@dataclass
class Bounded:
    broker: EmbeddedBroker
    auth: AuthService
    secret: str
    devices: list[Device]

    def device(self, client_id: str, username: str, password: str, **kw: object) -> Device:
        made = Device(self.broker.port, client_id, username, password, **kw)  # type: ignore[arg-type]
        self.devices.append(made)
        return made

    def gateway(self, token_identity: tuple[str, str]) -> Device:
        identity, token = token_identity
        return self.device(identity, identity, token, clean_session=False)

    async def manager(self) -> Device:
        made = self.device("_fleetmq-test", MANAGER_USERNAME, self.secret)
        assert await made.connect() == ACCEPTED
        return made


@pytest.fixture
async def bounded() -> AsyncIterator[Bounded]:
    auth = AuthService(MemoryAuthStore(), SystemClock())
    await auth.load()
    secret = secrets.token_urlsafe(32)
    broker = EmbeddedBroker("127.0.0.1", free_port(), auth=auth, rules=TopicRules("fleet"),
                            manager_secret=secret, session_expiry_s=1, max_queued=5)
    async with broker:
        made = Bounded(broker, auth, secret, [])
        try:
            yield made
        finally:
            closers = [threading.Thread(target=d.close) for d in made.devices]
            for closer in closers:
                closer.start()
            for closer in closers:
                closer.join()


async def write_key(auth: AuthService) -> tuple[str, str]:
    cred, token = await auth.create_key("write", actor="test")
    return cred.broker_identity, token


async def test_offline_queue_keeps_the_newest_messages_up_to_its_bound(
        bounded: Bounded) -> None:
    key = await write_key(bounded.auth)
    gateway = bounded.gateway(key)
    assert await gateway.connect() == ACCEPTED
    assert await gateway.subscribe("fleet/+/reply") == 1
    gateway.close()
    manager = await bounded.manager()
    for i in range(8):
        await manager.publish(f"fleet/node-{i}/reply", f"{i}")
    await eventually(lambda: bounded.broker.counters.queue_dropped == 3)
    back = bounded.gateway(key)
    assert await back.connect() == ACCEPTED
    assert back.session_present is True
    await eventually(lambda: len(back.messages) == 5)
    assert sorted(m.payload for m in back.messages) == [b"3", b"4", b"5", b"6", b"7"]


async def test_a_session_without_a_connection_expires(bounded: Bounded) -> None:
    key = await write_key(bounded.auth)
    gateway = bounded.gateway(key)
    assert await gateway.connect() == ACCEPTED
    assert await gateway.subscribe("fleet/+/reply") == 1
    assert key[0] in bounded.broker.session_ids()
    gateway.close()
    await eventually(lambda: key[0] not in bounded.broker.session_ids(), timeout=5)
    back = bounded.gateway(key)
    assert await back.connect() == ACCEPTED
    assert back.session_present is False
