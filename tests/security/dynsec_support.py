"""Helpers of the dynsec attack tests: a Mosquitto with the dynamic security plugin, and a
manager with auth on mirroring into it. The fixtures themselves are thin wrappers in the test
module (no conftest of its own here, so other security suites can keep theirs)."""

from __future__ import annotations

import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

from fleetmq.app import FleetService
from fleetmq.config import AuthSettings, Settings, parse_broker
from tests.conftest import _require_mosquitto, eventually, make_settings
from tests.security.peer import Peer
from tests.support import Mosquitto


@contextmanager
def dynsec_broker(workdir: Path | None = None) -> Iterator[Mosquitto]:
    """A Mosquitto with the dynsec plugin: in ``workdir`` (persistent, for a test that restarts
    it or edits its file), or in a temporary directory."""
    _require_mosquitto()
    with tempfile.TemporaryDirectory(prefix="fleetmq-dynsec-") as tmp:
        where = workdir if workdir is not None else Path(tmp)
        where.mkdir(parents=True, exist_ok=True)
        broker = Mosquitto(where, persistence=workdir is not None, dynsec=True)
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


@contextmanager
def peer_factory() -> Iterator[Callable[..., Peer]]:
    made: list[Peer] = []

    def make(broker: Mosquitto, client_id: str, username: str | None = None,
             password: str | None = None, **kw: Any) -> Peer:
        peer = Peer(broker.port, client_id, username, password, **kw)
        made.append(peer)
        return peer

    yield make
    for peer in made:
        peer.close()

