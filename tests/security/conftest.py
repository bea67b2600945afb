"""Fixtures of the dynsec attack tests: a Mosquitto with the dynamic security plugin, and a
manager with auth on mirroring into it."""

from __future__ import annotations

import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from fleetmq.app import FleetService
from fleetmq.config import AuthSettings, Settings, parse_broker
from tests.conftest import _require_mosquitto, eventually, make_settings
from tests.security.peer import Peer
from tests.support import Mosquitto


@pytest.fixture(scope="session")
def dynsec_mosquitto() -> Iterator[Mosquitto]:
    """One dynsec broker for the attack tests that leave it running (each on its own root
    and its own node ids)."""
    _require_mosquitto()
    with tempfile.TemporaryDirectory(prefix="fleetmq-dynsec-") as tmp:
        broker = Mosquitto(Path(tmp), dynsec=True)
        broker.start()
        try:
            yield broker
        finally:
            broker.stop()


@pytest.fixture
def own_dynsec(tmp_path: Path) -> Iterator[Mosquitto]:
    """A dynsec broker for one test that restarts it or edits its file."""
    _require_mosquitto()
    broker = Mosquitto(tmp_path / "broker", persistence=True, dynsec=True)
    broker.workdir.mkdir()
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


def dynsec_settings(broker: Mosquitto, root: str, tmp_path: Path, **auth: Any) -> Settings:
    return make_settings(
        broker.url, root,
        auth=AuthSettings(mode="on", admin_token_file=str(tmp_path / "admin-token"),
                          broker_auth="dynsec", broker_admin=parse_broker(broker.admin_url),
                          **auth))


@asynccontextmanager
async def mirrored(settings: Settings, **kw: Any) -> AsyncIterator[FleetService]:
    """A ready manager whose mirror has provisioned and reconciled once."""
    async with FleetService(settings, **kw) as service:
        await eventually(lambda: service.ready, timeout=15)
        assert service.dynsec is not None
        await eventually(lambda: service.dynsec is not None
                         and service.dynsec.reconciliations > 0, timeout=15)
        yield service


async def settled(service: FleetService) -> None:
    """Every outbox row sent and acknowledged."""
    async def empty() -> bool:
        return not await service.auth.store.outbox(1)
    await eventually(empty, timeout=10)


@pytest.fixture
def peers() -> Iterator[Callable[..., Peer]]:
    made: list[Peer] = []

    def make(broker: Mosquitto, client_id: str, username: str | None = None,
             password: str | None = None, **kw: Any) -> Peer:
        peer = Peer(broker.port, client_id, username, password, **kw)
        made.append(peer)
        return peer

    yield make
    for peer in made:
        peer.close()


__all__ = ["dynsec_settings", "mirrored", "replace", "settled"]
