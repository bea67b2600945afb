"""One contract for every store: SQLite (a file), PostgreSQL (the session's own server) and,
where it applies, memory (which keeps only the history, no node rows).

Stores are built the way the manager builds them: ``make_store(parse_store(url))``.
"""

from __future__ import annotations

import asyncio
import itertools
import re
import sqlite3
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from fleetmq.config import parse_store
from fleetmq.core.clock import Instant
from fleetmq.core.models import HeartbeatRequest, RegisterRequest
from fleetmq.core.registry import Node, Registry
from fleetmq.errors import StoreDataError, StoreError
from fleetmq.store import SCHEMA_VERSION, Batch, HistoryEvent, Store, make_store
from fleetmq.store import sqlite as sqlite_store
from fleetmq.store.base import (
    LOAD_CHUNK,
    NODE_COLUMNS,
    TOUCH_COLUMNS,
    NodeRow,
    node_row,
    nodes_from_rows,
    touch_row,
)
from tests.support import Postgres, free_port

DURABLE = ["sqlite", "postgresql"]
"""Stores that keep node rows (``keeps_nodes``)."""
EVERY = [*DURABLE, "memory"]
"""Every store: the history contract holds for memory too."""

WALL = 1_771_230_600.0


@pytest.fixture
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    kind = request.param
    if kind == "sqlite":
        return f"sqlite:///{tmp_path / 'fleet.db'}"  # an absolute path: four slashes
    if kind == "postgresql":
        url: str = request.getfixturevalue("postgres_store_url")
        return url
    assert kind == "memory"
    return "memory://"


every = pytest.mark.parametrize("store_url", EVERY, indirect=True)
durable_only = pytest.mark.parametrize("store_url", DURABLE, indirect=True)


def make(url: str) -> Store:
    return make_store(parse_store(url))


@asynccontextmanager
async def opened(url: str) -> AsyncIterator[Store]:
    store = make(url)
    await store.open()
    try:
        yield store
    finally:
        await store.close()


async def load_all(store: Store) -> list[NodeRow]:
    """Every stored row, in the form ``node_row`` writes (a store may hand rows back as lists,
    and flags as integers)."""
    rows: list[NodeRow] = []
    async for chunk in store.load():
        rows.extend(tuple(row) for row in chunk)
    return [(*row[:7], bool(row[7]), *row[8:]) for row in rows]


async def set_schema_version(url: str, version: int) -> None:
    """Write into the version table behind the store's back."""
    if url.startswith("sqlite:"):
        conn = sqlite3.connect(parse_store(url).location)
        with conn:
            conn.execute("UPDATE fleetmq_schema SET version = ?", (version,))
        conn.close()
    else:
        pg = await asyncpg.connect(url)
        try:
            await pg.execute("UPDATE fleetmq_schema SET version = $1", version)
        finally:
            await pg.close()


async def schema_version(url: str) -> int:
    if url.startswith("sqlite:"):
        conn = sqlite3.connect(parse_store(url).location)
        try:
            return int(conn.execute("SELECT version FROM fleetmq_schema").fetchone()[0])
        finally:
            conn.close()
    pg = await asyncpg.connect(url)
    try:
        return int(await pg.fetchval("SELECT version FROM fleetmq_schema"))
    finally:
        await pg.close()


def fleet() -> list[Node]:
    """Nodes as the registry makes them: every column with a value worth round-tripping."""
    registry = Registry(60)
    now = Instant(1000.0, WALL)
    full = registry.register("esp32-a", RegisterRequest.model_validate({
        "node_type": "microclaw", "name": "Greenhouse ✓", "capabilities": ["temp", "humidity"],
        "location": "north", "metadata": {"fw": "1.2.3", "rev": 4, "beta": True, "x": None,
                                          "gain": 0.5},
        "heartbeat_interval_seconds": 30, "session": "s-1"}), now).node
    registry.heartbeat("esp32-a", HeartbeatRequest.model_validate({
        "uptime_seconds": 2**63 - 1, "free_memory_kb": 2**40, "sensors_active": 2**33}),
        Instant(1001.5, WALL + 1.5))
    bare = registry.register("bare-b", RegisterRequest.model_validate(
        {"node_type": "sensor"}), Instant(1002.0, WALL + 2.0)).node
    registry.heartbeat("bare-b", HeartbeatRequest.model_validate(
        {"status": "offline", "reason": "shutdown"}), Instant(1003.0, WALL + 3.25))
    third = registry.register("c-3", RegisterRequest.model_validate(
        {"node_type": "gateway", "metadata": {}}), Instant(1004.0, WALL + 4.0)).node
    return [full, bare, third]


_event_ids = itertools.count(1)


def event(node_id: str, at: float, to: str = "online", frm: str | None = None,
          reason: str = "registered") -> HistoryEvent:
    """An event as the writer numbers them (increasing; a fresh store per test)."""
    return HistoryEvent(next(_event_ids), node_id, "microclaw", "north", frm, to, reason, at,
                        at - 1)


def same_node(a: Node, b: Node) -> bool:
    skip = {"seen_mono", "deadline", "view"}
    return all(getattr(a, f) == getattr(b, f) for f in Node.__slots__ if f not in skip)


# --- schema ----------------------------------------------------------------------------------


@every
async def test_a_new_store_creates_its_schema_and_loads_nothing(store_url: str) -> None:
    async with opened(store_url) as store:
        assert await load_all(store) == []
        assert await store.events("nobody", 10, None) == []
        await store.ping()
        if store.keeps_nodes:
            assert await schema_version(store_url) == SCHEMA_VERSION
    async with opened(store_url) as store:  # an existing schema is kept as it is
        assert await load_all(store) == []
        if store.keeps_nodes:
            assert await schema_version(store_url) == SCHEMA_VERSION


@durable_only
async def test_a_newer_schema_is_refused(store_url: str) -> None:
    async with opened(store_url):
        pass
    await set_schema_version(store_url, SCHEMA_VERSION + 1)
    store = make(store_url)
    with pytest.raises(StoreError, match="newer"):
        await store.open()
    await store.close()  # harmless after a failed open
    # The refused open let everything go: with the version back, the store opens.
    await set_schema_version(store_url, SCHEMA_VERSION)
    async with opened(store_url) as store:
        assert await load_all(store) == []


@durable_only
async def test_a_second_open_of_a_store_in_use_is_refused_by_sqlite_and_shared_by_postgresql(
    store_url: str
) -> None:
    """SQLite's file lock is its lease: a second process waits for it. PostgreSQL's managers
    share the store, and the lease (not the open) says which one is active."""
    async with opened(store_url) as first:
        second = make(store_url)
        if store_url.startswith("sqlite"):
            with pytest.raises(StoreError, match="in use"):
                await second.open()
            await second.close()
            await first.write(Batch(upserts=[node_row(fleet()[0])]))
        else:
            await second.open()
            try:
                await first.write(Batch(upserts=[node_row(fleet()[0])]))
                assert len(await load_all(second)) == 1
            finally:
                await second.close()
    async with opened(store_url) as second:  # free again once the first is closed
        assert len(await load_all(second)) == 1


@durable_only
async def test_two_stores_opening_at_once_on_a_new_database(store_url: str) -> None:
    a, b = make(store_url), make(store_url)
    results = await asyncio.gather(a.open(), b.open(), return_exceptions=True)
    try:
        errors = [r for r in results if isinstance(r, BaseException)]
        if store_url.startswith("sqlite"):
            assert len(errors) == 1, results
            assert isinstance(errors[0], StoreError)
            assert "in use" in str(errors[0])
        else:  # the schema is created once, under its own lock
            assert errors == []
    finally:
        await a.close()
        await b.close()
    assert await schema_version(store_url) == SCHEMA_VERSION


# --- nodes -----------------------------------------------------------------------------------


@durable_only
async def test_written_rows_survive_a_reopen_unchanged(store_url: str) -> None:
    nodes = fleet()
    rows = [node_row(n) for n in nodes]
    async with opened(store_url) as store:
        assert store.keeps_nodes
        await store.write(Batch(upserts=rows, events=[event(n.id, n.registered_at)
                                                      for n in nodes]))
    async with opened(store_url) as store:
        loaded = await load_all(store)
    assert all(isinstance(row, tuple) and len(row) == len(NODE_COLUMNS) for row in loaded)
    assert sorted(loaded) == sorted(rows)
    restored = {n.id: n for n in nodes_from_rows(loaded, Instant(5000.0, WALL + 10))}
    assert restored.keys() == {n.id for n in nodes}
    for node in nodes:
        assert same_node(restored[node.id], node), (restored[node.id], node)
    assert restored["esp32-a"].declared_interval is True
    assert restored["bare-b"].declared_interval is False


@durable_only
async def test_an_upsert_replaces_the_whole_row(store_url: str) -> None:
    node = fleet()[0]
    async with opened(store_url) as store:
        await store.write(Batch(upserts=[node_row(node)]))
        node.name, node.location, node.metadata_json = "renamed", None, '{"k":"v"}'
        node.capabilities_json, node.status, node.session = "[]", "offline", None
        await store.write(Batch(upserts=[node_row(node)]))
        assert await load_all(store) == [node_row(node)]


@durable_only
async def test_touches_change_only_last_seen_telemetry_and_session(store_url: str) -> None:
    nodes = fleet()
    async with opened(store_url) as store:
        await store.write(Batch(upserts=[node_row(n) for n in nodes]))
        before = {row[0]: row for row in await load_all(store)}
        node = nodes[0]
        node.last_seen += 42.5
        node.session, node.uptime_seconds, node.free_memory_kb = "s-2", 7, None
        node.sensors_active = 3
        node.name, node.status = "not written by a touch", "offline"
        ghost = fleet()[2]
        ghost.id = "never-upserted"
        await store.write(Batch(touches=[touch_row(node), touch_row(ghost)]))
        after = {row[0]: row for row in await load_all(store)}
    assert after.keys() == before.keys()  # a touch never creates a row
    assert after["bare-b"] == before["bare-b"]
    assert after["c-3"] == before["c-3"]
    touched = dict(zip(NODE_COLUMNS, after["esp32-a"], strict=True))
    old = dict(zip(NODE_COLUMNS, before["esp32-a"], strict=True))
    assert {c: touched[c] for c in TOUCH_COLUMNS} == {
        "last_seen": old["last_seen"] + 42.5, "session": "s-2", "uptime_seconds": 7,
        "free_memory_kb": None, "sensors_active": 3}
    assert {c: v for c, v in touched.items() if c not in TOUCH_COLUMNS} == {
        c: v for c, v in old.items() if c not in TOUCH_COLUMNS}


@every
async def test_a_delete_removes_the_row_but_not_its_events(store_url: str) -> None:
    nodes = fleet()
    async with opened(store_url) as store:
        await store.write(Batch(upserts=[node_row(n) for n in nodes],
                                events=[event(n.id, WALL) for n in nodes]))
        await store.write(Batch(deletes=["esp32-a", "not-there"],
                                events=[event("esp32-a", WALL + 1, "deleted", "online",
                                              "deleted")]))
        if store.keeps_nodes:
            assert sorted(row[0] for row in await load_all(store)) == ["bare-b", "c-3"]
        history = await store.events("esp32-a", 10, None)
        assert [(e.from_status, e.to_status, e.reason) for e in history] == [
            ("online", "deleted", "deleted"), (None, "online", "registered")]


@durable_only
async def test_a_batch_deletes_before_it_upserts_and_the_last_upsert_wins(
        store_url: str) -> None:
    node = fleet()[0]
    first = node_row(node)
    node.name = "second"
    second = node_row(node)
    async with opened(store_url) as store:
        await store.write(Batch(upserts=[first]))
        await store.write(Batch(deletes=[node.id], upserts=[first, second]))
        assert await load_all(store) == [second]


# Version 1's events table, as fleetmq wrote it before events kept the node (its nodes table
# is today's).
_V1_EVENTS = {
    "sqlite": "CREATE TABLE events (id INTEGER PRIMARY KEY AUTOINCREMENT, node_id TEXT NOT NULL, "
              "from_status TEXT, to_status TEXT NOT NULL, reason TEXT NOT NULL, at REAL NOT NULL, "
              "key INTEGER UNIQUE);"
              "CREATE INDEX events_by_node ON events (node_id, id);"
              "CREATE INDEX events_by_time ON events (at);",
    "postgresql": "CREATE TABLE events (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, "
                  "node_id text NOT NULL, from_status text, to_status text NOT NULL, "
                  "reason text NOT NULL, at double precision NOT NULL, key bigint UNIQUE);"
                  "CREATE INDEX events_by_node ON events (node_id, id);"
                  "CREATE INDEX events_by_time ON events (at);",
}
_V1_EVENT_ROWS = [("esp32-a", None, "online", "registered", WALL, 11),
                  ("gone-1", None, "online", "registered", WALL + 1, 12),
                  ("esp32-a", "online", "offline", "heartbeat_timeout", WALL + 2, 13)]


async def make_version_1(url: str, node: NodeRow) -> None:
    """A store as fleetmq left it at schema version 1: one node, three events."""
    if url.startswith("sqlite:"):
        nodes_ddl = sqlite_store.SCHEMA.split("CREATE TABLE events")[0]
        conn = sqlite3.connect(parse_store(url).location)
        conn.executescript(nodes_ddl + _V1_EVENTS["sqlite"]
                           + "CREATE TABLE fleetmq_schema (version INTEGER NOT NULL);"
                           "INSERT INTO fleetmq_schema VALUES (1);")
        with conn:
            conn.execute(f"INSERT INTO nodes VALUES ({', '.join('?' * len(node))})", node)
            conn.executemany("INSERT INTO events (node_id, from_status, to_status, reason, at, "
                             "key) VALUES (?, ?, ?, ?, ?, ?)", _V1_EVENT_ROWS)
        conn.close()
        return
    from fleetmq.store import postgres
    pg = await asyncpg.connect(url)
    try:
        await pg.execute(postgres.SCHEMA.split("CREATE TABLE events")[0] + _V1_EVENTS["postgresql"]
                         + "CREATE TABLE fleetmq_schema (version integer NOT NULL);"
                         "INSERT INTO fleetmq_schema VALUES (1);")
        row = list(node)
        row[7] = bool(row[7])
        await pg.execute(f"INSERT INTO nodes VALUES "
                         f"({', '.join(f'${i}' for i in range(1, len(row) + 1))})", *row)
        await pg.executemany("INSERT INTO events (node_id, from_status, to_status, reason, at, "
                             "key) VALUES ($1, $2, $3, $4, $5, $6)", _V1_EVENT_ROWS)
    finally:
        await pg.close()


@durable_only
async def test_a_version_1_store_upgrades_in_place(store_url: str) -> None:
    node = fleet()[0]  # esp32-a, a microclaw in "north"
    await make_version_1(store_url, node_row(node))
    async with opened(store_url) as store:
        assert await schema_version(store_url) == SCHEMA_VERSION == 3
        assert await load_all(store) == [node_row(node)]
        assert store.last_event_id == 3
        store_id = store.store_id
        assert re.fullmatch("[0-9a-f]{16}", store_id)
        # Old events keep their ids and get their node's type and location as it is now;
        # nobody kept last_seen. A deleted node's events know neither.
        assert await store.events_after(0, 100, 100) == [
            HistoryEvent(1, "esp32-a", "microclaw", "north", None, "online", "registered",
                         WALL, None),
            HistoryEvent(2, "gone-1", None, None, None, "online", "registered", WALL + 1, None),
            HistoryEvent(3, "esp32-a", "microclaw", "north", "online", "offline",
                         "heartbeat_timeout", WALL + 2, None)]
        later = HistoryEvent(4, "esp32-a", "microclaw", "north", "offline", "online",
                             "heartbeat", WALL + 3, WALL + 3)
        await store.write(Batch(events=[later]))
    async with opened(store_url) as store:  # upgraded once: the same store from now on
        assert (store.store_id, store.last_event_id) == (store_id, 4)
        assert (await store.events("esp32-a", 1, None)) == [later]


# --- history ---------------------------------------------------------------------------------


@every
async def test_events_come_newest_first_in_pages(store_url: str) -> None:
    async with opened(store_url) as store:
        written = [event("a", WALL + i, "offline" if i % 2 else "online",
                         None if i == 0 else "online", f"r{i}") for i in range(25)]
        await store.write(Batch(events=[*written[:10], event("b", WALL)]))
        await store.write(Batch(events=[*written[10:], event("b", WALL + 1)]))

        pages, before = [], None
        while page := await store.events("a", 10, before):
            pages.append(page)
            before = page[-1].id
        assert [len(p) for p in pages] == [10, 10, 5]
        seen = [e for p in pages for e in p]
        ids = [e.id for e in seen]
        assert ids == sorted(ids, reverse=True)
        assert len(set(ids)) == 25
        assert [(e.node_id, e.from_status, e.to_status, e.reason, e.at) for e in seen] == [
            (e.node_id, e.from_status, e.to_status, e.reason, e.at) for e in reversed(written)]
        assert [e.at for e in await store.events("b", 1, None)] == [WALL + 1]
        assert await store.events("a", 10, min(ids)) == []
        assert await store.events("nobody", 10, None) == []


@durable_only
async def test_an_event_written_twice_is_kept_once(store_url: str) -> None:
    """A batch whose commit was in doubt is written again: its events keep their ids."""
    async with opened(store_url) as store:
        twice = event("a", WALL)
        other = event("a", WALL + 1, "offline", "online", "reported")
        await store.write(Batch(events=[twice]))
        await store.write(Batch(events=[twice, other]))
        assert await store.events("a", 10, None) == [other, twice]


@every
async def test_events_keep_the_node_as_it_was_and_read_back_in_id_order(store_url: str
                                                                         ) -> None:
    async with opened(store_url) as store:
        assert store.last_event_id == 0
        assert await store.first_event_id() is None
        assert re.fullmatch("[0-9a-f]{16}", store.store_id)
        written = [event(f"n{i % 3}", WALL + i) for i in range(7)]
        gone = HistoryEvent(next(_event_ids), "n0", "picclaw", None, "offline", "deleted",
                            "deleted", WALL + 8, WALL + 2.5)
        await store.write(Batch(events=[*written[:4]]))
        await store.write(Batch(events=[*written[4:], gone]))
        every_event = [*written, gone]
        assert await store.events_after(0, 2**62, 100) == every_event
        assert await store.events_after(written[2].id, written[5].id, 100) == written[3:6]
        assert await store.events_after(written[2].id, 2**62, 2) == written[3:5]
        assert await store.events_after(gone.id, 2**62, 100) == []
        assert await store.first_event_id() == written[0].id
        assert await store.events("n0", 1, None) == [gone]


@durable_only
async def test_the_store_keeps_its_id_and_last_event_id_across_a_reopen(store_url: str
                                                                        ) -> None:
    async with opened(store_url) as store:
        store_id = store.store_id
        first = event("a", WALL - 1)
        last = event("a", WALL)
        await store.write(Batch(events=[first, last]))
    async with opened(store_url) as store:
        assert (store.store_id, store.last_event_id) == (store_id, last.id)
        assert await store.prune(WALL + 10) == 1  # the newest event stays: ids keep rising
    async with opened(store_url) as store:
        assert store.last_event_id == last.id
        assert await store.first_event_id() == last.id


def test_each_memory_store_has_its_own_id() -> None:
    assert make("memory://").store_id != make("memory://").store_id


def test_halves_split_a_batch_without_losing_a_row() -> None:
    batch = Batch(upserts=[("u1",), ("u2",)], deletes=["d1"], touches=[("t1",)],
                  events=[event("e", WALL), event("f", WALL)])
    first, second = batch.halves()
    assert (len(first), len(second)) == (3, 3)
    for kind in ("upserts", "deletes", "touches", "events"):
        assert getattr(first, kind) + getattr(second, kind) == getattr(batch, kind)


async def test_postgresql_refusing_a_value_is_a_data_error(postgres_store_url: str) -> None:
    """Not an outage: retrying the same row cannot succeed (the writer drops it alone)."""
    async with opened(postgres_store_url) as store:
        row = list(node_row(fleet()[0]))
        row[4] = "bad\x00location"
        with pytest.raises(StoreDataError):
            await store.write(Batch(upserts=[tuple(row)]))
        await store.write(Batch(upserts=[node_row(fleet()[0])]))  # still usable


@every
async def test_prune_drops_only_old_events(store_url: str) -> None:
    async with opened(store_url) as store:
        old = [event(f"n{i % 200}", WALL - 1000 + i / 100) for i in range(12_000)]
        new = [event(f"n{i}", WALL + i) for i in range(200)]
        await store.write(Batch(events=old + new))
        assert await store.prune(WALL) == len(old)  # more than one chunk (10,000)
        assert await store.prune(WALL) == 0
        for i in (0, 7, 199):
            assert [e.at for e in await store.events(f"n{i}", 100, None)] == [WALL + i]


# --- failures --------------------------------------------------------------------------------


async def test_an_unreachable_postgresql_is_a_store_error_naming_it() -> None:
    port = free_port()  # nothing listens there
    store = make(f"postgresql://fleet:s3cret@127.0.0.1:{port}/fleet")
    started = time.monotonic()
    with pytest.raises(StoreError) as caught:
        await store.open()
    assert time.monotonic() - started < 5
    message = str(caught.value)
    assert f"127.0.0.1:{port}/fleet" in message
    assert "s3cret" not in message
    assert "cannot reach" in message
    await store.close()


async def test_a_missing_database_or_role_is_a_store_error(postgres_server: Postgres) -> None:
    store = make(postgres_server.url("no_such_database"))
    with pytest.raises(StoreError, match=r"does not exist.*createdb"):
        await store.open()
    await store.close()
    store = make(postgres_server.url().replace("postgres@", "no_such_role@"))
    with pytest.raises(StoreError, match="refused the login"):
        await store.open()
    await store.close()


async def test_a_garbage_file_is_not_an_sqlite_store(tmp_path: Path) -> None:
    path = tmp_path / "garbage.db"
    path.write_bytes(b"this is not a database\n" * 500)
    store = make(f"sqlite:///{path}")
    with pytest.raises(StoreError, match="cannot open store"):
        await store.open()
    await store.close()


async def test_a_store_not_open_is_a_store_error(tmp_path: Path, postgres_url: str) -> None:
    for url in (f"sqlite:///{tmp_path / 'closed.db'}", postgres_url):
        store = make(url)
        with pytest.raises(StoreError, match="not open"):
            await store.write(Batch(deletes=["x"]))


@pytest.mark.parametrize("store_url", ["postgresql"], indirect=True)
async def test_postgresql_recovers_from_lost_connections(store_url: str) -> None:
    node = fleet()[0]
    async with opened(store_url) as store:
        await store.write(Batch(upserts=[node_row(node)]))
        admin = await asyncpg.connect(store_url)
        try:
            killed = await admin.fetchval(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()")
        finally:
            await admin.close()
        assert killed >= 1  # the pool's connection
        # The first use may meet a dead connection: a StoreError, never anything else.
        for _ in range(2):
            try:
                await store.ping()
                break
            except StoreError:
                await asyncio.sleep(0.05)
        await store.ping()
        await store.write(Batch(touches=[touch_row(node)]))
        assert await load_all(store) == [node_row(node)]


# --- many nodes ------------------------------------------------------------------------------


@durable_only
async def test_loading_more_rows_than_a_chunk(store_url: str) -> None:
    template = list(node_row(fleet()[0]))
    count = LOAD_CHUNK + 5_000
    rows: list[tuple[Any, ...]] = []
    for i in range(count):
        template[0] = f"node-{i:06d}"
        rows.append(tuple(template))
    async with opened(store_url) as store:
        await store.write(Batch(upserts=rows))
    async with opened(store_url) as store:
        sizes, ids = [], set()
        async for chunk in store.load():
            sizes.append(len(chunk))
            ids.update(row[0] for row in chunk)
    assert max(sizes) <= LOAD_CHUNK
    assert len(sizes) >= 2
    assert sum(sizes) == count
    assert len(ids) == count
