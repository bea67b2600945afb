"""The durable registry through the running manager (issue 4): what was acknowledged survives a
restart, the history route, restart grace and republish, and a store that fails while running.

Each test gets its own SQLite file; the crash test (``test_crash.py``) kills real processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import jsonschema
import pytest

from fleetmq.app import FleetService
from fleetmq.config import Settings, StoreSettings, parse_store
from fleetmq.errors import StoreDataError, StoreError
from fleetmq.store import Batch, HistoryEvent, make_store
from fleetmq.store.base import NodeRow, Store, StoredEvent
from tests.conftest import eventually, make_settings, running
from tests.integration.mqtt_support import api, bodies, get_node, readyz
from tests.support import Mosquitto

MqttClients = Callable[..., Any]
EVENTS = "/api/v1/fleet/nodes/{}/events"


def sqlite_settings(path: Path) -> StoreSettings:
    return parse_store(f"sqlite:///{path}", flush_interval_s=0.2)


async def post(http: aiohttp.ClientSession, svc: FleetService, route: str,
               body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    async with http.post(api(svc, f"/api/v1/fleet/{route}"), json=body) as resp:
        return resp.status, await resp.json()


async def events(http: aiohttp.ClientSession, svc: FleetService, node_id: str,
                 query: str = "") -> tuple[int, dict[str, Any]]:
    async with http.get(api(svc, EVENTS.format(node_id) + query)) as resp:
        return resp.status, await resp.json()


async def test_acknowledged_changes_survive_a_restart(
    mosquitto: Mosquitto, root: str, durable_store: StoreSettings, http: aiohttp.ClientSession
) -> None:
    settings = make_settings(mosquitto.url, root, store=durable_store)
    async with running(settings) as svc:
        status, _ = await post(http, svc, "register", {
            "node_id": "gw-1", "node_type": "nanoclaw", "name": "Gateway", "location": "roof",
            "capabilities": ["lora"], "metadata": {"fw": "2.1", "rev": 3},
            "heartbeat_interval_seconds": 30})
        assert status == 200
        assert (await post(http, svc, "register", {"node_id": "gone", "type": "picclaw"}))[0] \
            == 200
        assert (await post(http, svc, "heartbeat", {"node_id": "gw-1", "status": "degraded",
                                                    "reason": "low_battery",
                                                    "uptime_seconds": 77}))[0] == 200
        async with http.delete(api(svc, "/api/v1/fleet/nodes/gone")) as resp:
            assert resp.status == 204
        before = await get_node(http, svc, "gw-1")

    async with running(settings) as svc:
        after = await get_node(http, svc, "gw-1")
        assert await get_node(http, svc, "gone") is None
        assert after == before
        assert after is not None
        assert (after["status"], after["status_reason"]) == ("degraded", "low_battery")
        assert (after["location"], after["metadata"], after["uptime_seconds"]) == (
            "roof", {"fw": "2.1", "rev": 3}, 77)
        # The deleted node's history stays readable, its deletion the last event (contract
        # section 9), each with the node as it was.
        status, doc = await events(http, svc, "gone")
        assert status == 200
        assert [(e["from"], e["to"], e["reason"], e["node_type"]) for e in doc["events"]] == [
            ("online", "deleted", "deleted", "picclaw"), (None, "online", "registered", "picclaw")]
        status, doc = await events(http, svc, "gw-1")
        assert [(e["to"], e["reason"], e["location"]) for e in doc["events"]] == [
            ("degraded", "low_battery", "roof"), ("online", "registered", "roof")]


async def test_a_node_deleted_and_registered_again_starts_without_its_old_telemetry(
    mosquitto: Mosquitto, root: str, durable_store: StoreSettings, http: aiohttp.ClientSession
) -> None:
    settings = make_settings(mosquitto.url, root, store=durable_store)
    telemetry = ("uptime_seconds", "free_memory_kb", "sensors_active")
    async with running(settings) as svc:
        assert (await post(http, svc, "register", {"node_id": "again", "type": "picclaw",
                                                   "location": "old-room"}))[0] == 200
        assert (await post(http, svc, "heartbeat", {
            "node_id": "again", "uptime_seconds": 42, "free_memory_kb": 200,
            "sensors_active": 3}))[0] == 200
        await eventually(lambda: svc.writer.backlog == 0)  # the old telemetry is stored
        async with http.delete(api(svc, "/api/v1/fleet/nodes/again")) as resp:
            assert resp.status == 204
        assert (await post(http, svc, "register", {"node_id": "again", "type": "picclaw"}))[0] \
            == 200
        fresh = await get_node(http, svc, "again")
        assert fresh is not None
        assert [fresh[k] for k in (*telemetry, "location")] == [None, None, None, None]

    async with running(settings) as svc:  # and as the store kept it
        assert await get_node(http, svc, "again") == fresh


async def test_an_mqtt_registration_is_stored_before_its_reply(
    mosquitto: Mosquitto, root: str, tmp_path: Path, mqtt_clients: MqttClients
) -> None:
    path = tmp_path / "f.db"
    settings = make_settings(mosquitto.url, root, store=sqlite_settings(path))
    async with running(settings):
        agent = await mqtt_clients(mosquitto.port, "picclaw-7").connect()
        await agent.subscribe(f"{root}/picclaw-7/reply")
        await agent.publish(f"{root}/picclaw-7/register",
                            json.dumps({"type": "picclaw", "location": "lab"}))
        await eventually(lambda: bodies(agent, f"{root}/picclaw-7/reply"))
        # The reply is out: the row must already be on disk, read by another connection.
        with contextlib.closing(sqlite3.connect(path)) as conn:
            rows = conn.execute("SELECT id, type, location FROM nodes").fetchall()
        assert rows == [("picclaw-7", "picclaw", "lab")]


async def test_events_route_pages_newest_first_and_checks_its_parameters(
    mosquitto: Mosquitto, root: str, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    settings = make_settings(mosquitto.url, root, store=sqlite_settings(tmp_path / "f.db"))
    async with running(settings) as svc:
        await post(http, svc, "register", {"node_id": "n1", "node_type": "microclaw"})
        for status in ("degraded", "online", "degraded", "online"):
            await post(http, svc, "heartbeat", {"node_id": "n1", "status": status})

        async def five() -> bool:
            return len((await events(http, svc, "n1"))[1]["events"]) == 5

        await eventually(five)
        status, page = await events(http, svc, "n1", "?limit=2")
        assert status == 200
        assert [e["to"] for e in page["events"]] == ["online", "degraded"]
        assert page["next"] == page["events"][-1]["id"]
        first = page["events"][0]
        assert set(first) == {"id", "node_id", "node_type", "location", "from", "to", "reason",
                              "at", "last_seen"}
        async with http.get(api(svc, "/api/v1/openapi.json")) as resp:
            schemas = (await resp.json())["components"]["schemas"]
        jsonschema.validate(page, {**schemas["EventList"], "components": {"schemas": schemas}})
        assert (first["node_id"], first["from"], first["reason"]) == ("n1", "degraded",
                                                                     "heartbeat")
        assert first["at"].endswith("Z")
        ids = [e["id"] for e in page["events"]]
        while page["next"] is not None:
            _, page = await events(http, svc, "n1", f"?limit=2&before={page['next']}")
            ids += [e["id"] for e in page["events"]]
        assert len(ids) == 5
        assert ids == sorted(ids, reverse=True)
        _, oldest = await events(http, svc, "n1", f"?before={ids[-2]}")
        assert [(e["from"], e["to"], e["reason"]) for e in oldest["events"]] == [
            (None, "online", "registered")]
        assert oldest["next"] is None

        for query in ("?limit=0", "?limit=1001", "?limit=x", "?before=-1", "?before=1e3"):
            status, doc = await events(http, svc, "n1", query)
            assert status == 400, query
            assert doc["error"] == "Invalid parameter"
        for query in ("", "?before=5"):
            status, doc = await events(http, svc, "never-seen", query)
            assert (status, doc["error"]) == (404, "Node not found")


async def test_restart_republishes_statuses_and_grants_grace(
    tmp_path: Path, root: str, http: aiohttp.ClientSession, mqtt_clients: MqttClients
) -> None:
    """A broker without persistence forgets retained statuses when it restarts, like the
    manager: on start the manager republishes them all, and no node goes offline by timeout
    before one full timeout after the start, however long ago it was last seen."""
    broker = Mosquitto(tmp_path)
    broker.start()
    try:
        store = sqlite_settings(tmp_path / "f.db")
        settings = make_settings(broker.url, root, store=store)
        async with running(settings) as svc:
            await post(http, svc, "register", {"node_id": "alive", "node_type": "picclaw",
                                               "heartbeat_interval_seconds": 1})
            await post(http, svc, "register", {"node_id": "quiet", "node_type": "picclaw",
                                               "heartbeat_interval_seconds": 1})
            await post(http, svc, "heartbeat", {"node_id": "quiet", "status": "offline",
                                                "reason": "shutdown"})
        # As if the manager had been down for an hour: without grace, "alive" (timeout 3 s)
        # would go offline at once.
        with contextlib.closing(sqlite3.connect(tmp_path / "f.db")) as conn, conn:
            conn.execute("UPDATE nodes SET last_seen = last_seen - 3600")
        broker.stop()
        broker.start()  # no persistence: every retained status is gone
        dashboard = await mqtt_clients(broker.port, "dashboard").connect()
        await dashboard.subscribe(f"{root}/+/status")
        async with running(settings) as svc:
            started = svc.clock.now().mono
            await eventually(lambda: bodies(dashboard, f"{root}/alive/status")
                             and bodies(dashboard, f"{root}/quiet/status"))
            assert bodies(dashboard, f"{root}/alive/status")[-1]["status"] == "online"
            quiet = bodies(dashboard, f"{root}/quiet/status")[-1]
            assert (quiet["status"], quiet["reason"]) == ("offline", "shutdown")
            # Timeout 3 s, counted from the start, not from the last heartbeat long ago.
            doc = await get_node(http, svc, "alive")
            assert doc is not None
            assert doc["status"] == "online"

            async def offline() -> bool:
                doc = await get_node(http, svc, "alive")
                return doc is not None and doc["status"] == "offline"

            await eventually(offline, timeout=8)
            assert svc.clock.now().mono - started >= 3.0
    finally:
        broker.stop()


class FlakyStore:
    """A real SQLite store that can be switched off, as a disk or a database server fails,
    held (its commits wait for ``gate``), or made to refuse one node's row."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.url = inner.url
        self.keeps_nodes = inner.keeps_nodes
        self.broken = False
        self.gate = asyncio.Event()
        self.gate.set()
        self.poison: str | None = None
        self.store_id = ""
        self.last_event_id = 0

    def _check(self) -> None:
        if self.broken:
            raise StoreError(f"store {self.url} failed: disk I/O error (switched off by test)")

    async def open(self) -> None:
        await self.inner.open()
        self.store_id = self.inner.store_id
        self.last_event_id = self.inner.last_event_id

    def load(self) -> AsyncGenerator[list[NodeRow], None]:
        return self.inner.load()

    async def write(self, batch: Batch) -> None:
        self._check()
        await self.gate.wait()
        if any(row[0] == self.poison for row in batch.upserts):
            raise StoreDataError(f"store {self.url} refused a value: bad row {self.poison}")
        await self.inner.write(batch)

    async def events(self, node_id: str, limit: int, before: int | None) -> list[StoredEvent]:
        self._check()
        return await self.inner.events(node_id, limit, before)

    async def events_after(self, after: int, upto: int, limit: int) -> list[StoredEvent]:
        self._check()
        return await self.inner.events_after(after, upto, limit)

    async def first_event_id(self) -> int | None:
        self._check()
        return await self.inner.first_event_id()

    async def prune(self, older_than: float) -> int:
        return await self.inner.prune(older_than)

    async def ping(self) -> None:
        self._check()

    async def close(self) -> None:
        await self.inner.close()


@contextlib.asynccontextmanager
async def with_flaky_store(mosquitto: Mosquitto, root: str, tmp_path: Path
                           ) -> AsyncIterator[tuple[FleetService, FlakyStore, Settings]]:
    """A ready manager over a FlakyStore around SQLite; also the settings to start another
    manager on the same file afterwards."""
    settings = make_settings(mosquitto.url, root, store=sqlite_settings(tmp_path / "f.db"))
    flaky = FlakyStore(make_store(settings.store))
    async with FleetService(settings, store=flaky) as svc:
        await eventually(lambda: svc.ready, timeout=10)
        yield svc, flaky, settings


async def test_a_failing_store_refuses_registrations_and_catches_up(
    mosquitto: Mosquitto, root: str, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    async with with_flaky_store(mosquitto, root, tmp_path) as (svc, flaky, settings):
        assert (await post(http, svc, "register", {"node_id": "a", "type": "picclaw"}))[0] == 200
        flaky.broken = True
        # The first write to fail answers 503 once its commit is late; then the store is
        # known to be down and writes that need it are refused at once.
        status, doc = await post(http, svc, "register", {"node_id": "b", "type": "picclaw"})
        assert (status, doc["error"]) == (503, "Store unavailable")
        code, ready = await readyz(http, svc)
        assert code == 503
        assert "store" in ready["message"]
        status, _ = await post(http, svc, "register", {"node_id": "c", "type": "picclaw"})
        assert status == 503
        async with http.delete(api(svc, "/api/v1/fleet/nodes/a")) as resp:
            assert resp.status == 503
        # Heartbeats keep flowing in memory.
        status, _ = await post(http, svc, "heartbeat", {"node_id": "a", "uptime_seconds": 5})
        assert status == 200
        flaky.broken = False

        async def recovered() -> bool:
            return (await readyz(http, svc))[0] == 200

        await eventually(recovered, timeout=15)
    # Caught up: b (applied in memory, answered 503) and a's heartbeat reached the store.
    async with running(settings) as svc:
        a = await get_node(http, svc, "a")
        assert a is not None
        assert a["uptime_seconds"] == 5
        assert await get_node(http, svc, "b") is not None
        assert await get_node(http, svc, "c") is None


@pytest.mark.parametrize("url", ["sqlite:///{tmp}/missing-dir/f.db", "postgresql://h"])
async def test_an_unusable_store_is_a_clear_error_at_start(
    mosquitto: Mosquitto, root: str, tmp_path: Path, url: str
) -> None:
    url = url.format(tmp=tmp_path)
    if url.startswith("postgresql"):
        url = "postgresql://fleetmq@127.0.0.1:1/fleet"  # port 1: nothing listens
    settings = make_settings(mosquitto.url, root, store=parse_store(url))
    with pytest.raises(StoreError, match="store"):
        async with FleetService(settings):
            pass


async def test_answers_wait_for_the_commit_that_stores_them(
    mosquitto: Mosquitto, root: str, tmp_path: Path, http: aiohttp.ClientSession,
    mqtt_clients: MqttClients
) -> None:
    """A REST response and an MQTT reply acknowledge a change: neither goes out before the
    store has it (the store is held, then let go)."""
    async with with_flaky_store(mosquitto, root, tmp_path) as (svc, held, _):
        agent = await mqtt_clients(mosquitto.port, "m1").connect()
        await agent.subscribe(f"{root}/m1/reply")
        held.gate.clear()
        rest = asyncio.ensure_future(post(http, svc, "register", {"node_id": "r1",
                                                                  "type": "picclaw"}))
        await agent.publish(f"{root}/m1/register", json.dumps({"type": "microclaw"}))
        # Both are applied in memory (readers see them) but not answered.
        await eventually(lambda: svc.registry.get("m1") is not None
                         and svc.registry.get("r1") is not None)
        await asyncio.sleep(0.3)  # long enough for an answer that did not wait to arrive
        assert not rest.done()
        assert not bodies(agent, f"{root}/m1/reply")
        held.gate.set()
        assert (await rest)[0] == 200
        await eventually(lambda: bodies(agent, f"{root}/m1/reply"))


async def test_a_row_the_store_refuses_is_dropped_alone(
    mosquitto: Mosquitto, root: str, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    async with with_flaky_store(mosquitto, root, tmp_path) as (svc, picky, settings):
        picky.gate.clear()  # so both land in one batch
        picky.poison = "bad"
        pending = [asyncio.ensure_future(post(http, svc, "register",
                                              {"node_id": node_id, "type": "picclaw"}))
                   for node_id in ("good", "bad")]
        await eventually(lambda: svc.registry.get("bad") is not None
                         and svc.registry.get("good") is not None)
        picky.gate.set()
        assert [(await p)[0] for p in pending] == [200, 200]
        assert (await readyz(http, svc))[0] == 200
        assert (await post(http, svc, "register", {"node_id": "later", "type": "x"}))[0] == 200
        async with http.get(api(svc, "/metrics")) as resp:
            assert "fleetmq_store_rows_rejected_total 1" in await resp.text()
    async with running(settings) as svc:
        assert await get_node(http, svc, "good") is not None
        assert await get_node(http, svc, "later") is not None
        assert await get_node(http, svc, "bad") is None


async def test_an_idle_store_that_breaks_is_noticed_without_a_write(
    mosquitto: Mosquitto, root: str, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    async with with_flaky_store(mosquitto, root, tmp_path) as (svc, flaky, _):
        flaky.broken = True

        async def unready() -> bool:
            return (await readyz(http, svc))[0] == 503

        await eventually(unready, timeout=12)  # the writer pings an idle store every 5 s
        status, doc = await post(http, svc, "register", {"node_id": "n", "type": "picclaw"})
        assert (status, doc["error"]) == (503, "Store unavailable")
        assert svc.registry.get("n") is None  # refused up front: nothing applied
        flaky.broken = False

        async def ready() -> bool:
            return (await readyz(http, svc))[0] == 200

        await eventually(ready, timeout=15)


async def test_history_older_than_history_days_is_pruned(
    mosquitto: Mosquitto, root: str, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    store_settings = parse_store(f"sqlite:///{tmp_path / 'f.db'}", history_days=30)
    store = make_store(store_settings)
    await store.open()
    now = time.time()
    await store.write(Batch(events=[
        HistoryEvent(1, "n1", "gw", None, None, "online", "registered", now - 40 * 86_400,
                     now - 40 * 86_400),
        HistoryEvent(2, "n1", "gw", None, "online", "offline", "reported", now - 20 * 86_400,
                     now - 40 * 86_400)]))
    await store.close()
    async with running(make_settings(mosquitto.url, root, store=store_settings)) as svc:

        async def pruned() -> bool:
            status, doc = await events(http, svc, "n1")
            return status == 200 and [e["reason"] for e in doc["events"]] == ["reported"]

        await eventually(pruned)  # pruned on start, then every hour
