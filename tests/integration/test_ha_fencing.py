"""Fencing (contract section 10), in one process: two managers on one PostgreSQL store and one
Mosquitto. The lease row is moved under the active's feet (what a standby's takeover does), and
the deposed manager must refuse its own late writes, stop publishing, and step down."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import aiohttp
import asyncpg
import pytest

from fleetmq.app import FleetService
from fleetmq.config import parse_store
from fleetmq.errors import FencedError
from fleetmq.store.base import Batch
from fleetmq.store.lease import LOCK_KEY
from fleetmq.store.postgres import PostgresStore
from fleetmq.store.writer import RUN_IDS
from tests.conftest import MqttClient, eventually, make_settings, running
from tests.integration.mqtt_support import api, readyz
from tests.support import Mosquitto


def settings_on(mosquitto: Mosquitto, root: str, store_url: str, **overrides: Any) -> Any:
    return make_settings(mosquitto.url, root, store=parse_store(store_url, flush_interval_s=0.2),
                         lease_s=4.0, **overrides)


async def lease_row(store_url: str) -> tuple[str, int, str | None]:
    conn = await asyncpg.connect(store_url)
    try:
        row = await conn.fetchrow("SELECT holder, epoch, advertise_url FROM fleetmq_lease")
    finally:
        await conn.close()
    assert row is not None
    return row[0], int(row[1]), row[2]


async def take_lease(store_url: str) -> int:
    """What a standby's takeover does to the row: another holder, the next epoch."""
    conn = await asyncpg.connect(store_url)
    try:
        epoch = await conn.fetchval(
            "UPDATE fleetmq_lease SET holder = 'someone-else', epoch = epoch + 1, "
            "expires_at = now() + interval '1 hour', locked = false RETURNING epoch")
    finally:
        await conn.close()
    return int(epoch)


async def stored_ids(store_url: str) -> set[str]:
    conn = await asyncpg.connect(store_url)
    try:
        return {row[0] for row in await conn.fetch("SELECT id FROM nodes")}
    finally:
        await conn.close()


async def test_a_standby_answers_503_naming_the_active_and_follows_its_registrations(
    mosquitto: Mosquitto, root: str, postgres_store_url: str, http: aiohttp.ClientSession
) -> None:
    first = settings_on(mosquitto, root, postgres_store_url,
                        advertise_url="http://fleetmq-a.example:8080")
    async with running(first) as active, \
            FleetService(replace(first, advertise_url="http://fleetmq-b.example:8080")
                         ) as standby:
        assert (active.role, standby.role) == ("active", "standby")
        status, body = await readyz(http, standby)
        assert (status, body) == (503, {"status": "standby",
                                        "active": "http://fleetmq-a.example:8080"})
        for path in ("/api/v1/fleet/nodes", "/api/v1/fleet/summary", "/api/v1/openapi.json"):
            async with http.get(api(standby, path)) as resp:
                assert resp.status == 503
                refusal = await resp.json()
            assert refusal["error"] == "Standby"
            assert refusal["active"] == "http://fleetmq-a.example:8080"
        async with http.get(api(standby, "/healthz")) as resp:
            assert resp.status == 200

        async with http.post(api(active, "/api/v1/fleet/register"),
                             json={"node_id": "n1", "type": "picclaw", "location": "lab"}) as resp:
            assert resp.status == 200
        # The standby keeps the fleet loaded: the registration reaches its registry.
        await eventually(lambda: standby.registry.get("n1") is not None)
        followed = standby.registry.get("n1")
        assert followed is not None
        assert (followed.type, followed.location) == ("picclaw", "lab")
        async with http.delete(api(active, "/api/v1/fleet/nodes/n1")) as resp:
            assert resp.status in (200, 204)
        await eventually(lambda: standby.registry.get("n1") is None)


async def test_a_deposed_active_refuses_its_own_late_writes_and_steps_down(
    mosquitto: Mosquitto, root: str, postgres_store_url: str, http: aiohttp.ClientSession,
    mqtt_clients: Any
) -> None:
    watcher: MqttClient = await mqtt_clients(mosquitto.port).connect()
    await watcher.subscribe(f"{root}/+/status")
    async with running(settings_on(mosquitto, root, postgres_store_url)) as svc:
        holder, epoch, _ = await lease_row(postgres_store_url)
        assert epoch == 1
        async with http.post(api(svc, "/api/v1/fleet/register"),
                             json={"node_id": "before", "type": "picclaw"}) as resp:
            assert resp.status == 200
        await eventually(lambda: watcher.received(f"{root}/before/status"))

        await take_lease(postgres_store_url)
        # The next write of the deposed manager is refused by the store, not retried.
        async with http.post(api(svc, "/api/v1/fleet/register"),
                             json={"node_id": "late", "type": "picclaw"}) as resp:
            assert resp.status == 503  # never acknowledged: it is not stored
        await eventually(svc.deposed.is_set, timeout=5.0)
        assert "epoch" in svc.deposed_why
        assert svc.writer.fenced is not None
        status, body = await readyz(http, svc)
        assert (status, body["status"]) == (503, "standby")
        assert await stored_ids(postgres_store_url) == {"before"}
        # Deposed, it publishes nothing more on either connection.
        for link in (svc.link, svc.out):
            assert not link.publish(f"{root}/late/status", b"{}", retain=True)

    # And the store refuses a write stamped with the old epoch outright.
    store = PostgresStore(postgres_store_url, "test")
    await store.open()
    try:
        store.epoch = epoch
        with pytest.raises(FencedError, match="epoch"):
            await store.write(Batch(deletes=["before"]))
    finally:
        await store.close()
    assert await stored_ids(postgres_store_url) == {"before"}
    assert holder


async def test_a_manager_from_before_the_lease_keeps_a_new_one_standby_until_it_stops(
    mosquitto: Mosquitto, root: str, postgres_store_url: str, http: aiohttp.ClientSession
) -> None:
    """A fleetmq from before high availability holds the store's advisory lock and keeps no
    lease: a new manager beside it must not become a second active."""
    old = await asyncpg.connect(postgres_store_url)
    try:
        assert await old.fetchval("SELECT pg_try_advisory_lock($1::bigint)", LOCK_KEY)
        async with FleetService(settings_on(mosquitto, root, postgres_store_url)) as svc:
            assert svc.role == "standby"
            status, body = await readyz(http, svc)
            assert (status, body["status"]) == (503, "standby")
            await old.close()  # the old manager stops: its lock goes with it
            await eventually(lambda: svc.ready, timeout=5.0)
            assert (await lease_row(postgres_store_url))[1] == 1
    finally:
        if not old.is_closed():
            await old.close()


async def test_each_run_takes_a_block_of_event_ids_even_if_it_committed_nothing(
    mosquitto: Mosquitto, root: str, postgres_store_url: str
) -> None:
    """A run may show ids of its block (``event_id`` in ``GET /nodes``) before it commits any:
    the next active must not number other events with them."""
    settings = settings_on(mosquitto, root, postgres_store_url)
    for run in (1, 2, 3):
        async with running(settings) as svc:
            assert svc.writer.run_start_id == run * RUN_IDS
