"""``postgresql://user@host/db``: the production store, on asyncpg (the ``postgres`` extra).

A small pool serves batches, loading, pruning and the events route; every commit is durable
with PostgreSQL's default ``synchronous_commit = on`` (never turned off here). Several managers
may open one store: the lease (``fleetmq.store.lease``) says which one is active, and every
write transaction of the active first checks that the lease still holds its epoch
(``epoch``). A standby reads only: the fleet at start, then what changed (``follow``).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any, TypeVar

import asyncpg

from fleetmq.errors import FencedError, StoreDataError, StoreError
from fleetmq.store.base import (
    EVENT_COLUMNS,
    LOAD_CHUNK,
    NODE_COLUMNS,
    SCHEMA_VERSION,
    TOUCH_COLUMNS,
    Batch,
    NodeRow,
    StoredEvent,
)
from fleetmq.store.lease import LOCK_KEY, check_epoch, server_settings

T = TypeVar("T")

CONNECT_TIMEOUT_S = 10.0
COMMAND_TIMEOUT_S = 60.0
"""A statement that runs longer is a hung server, not a slow one (a batch is 50,000 rows)."""
CLOSE_TIMEOUT_S = 5.0
POOL_MIN, POOL_MAX = 1, 4
PRUNE_CHUNK = 10_000

MIGRATE_KEY = LOCK_KEY + 1  # held by the transaction that creates or migrates the schema
# Advisory locks are scoped to one database: managers on other databases do not conflict.

_TYPES: dict[str, str] = {
    "id": "text", "type": "text", "name": "text", "capabilities": "text", "location": "text",
    "metadata": "text", "interval_s": "integer", "declared_interval": "boolean",
    "timeout_s": "double precision", "registered_at": "double precision",
    "last_seen": "double precision", "status": "text", "status_reason": "text",
    "status_since": "double precision", "session": "text", "uptime_seconds": "bigint",
    "free_memory_kb": "bigint", "sensors_active": "bigint",
}
_NULLABLE = {"location", "session", "uptime_seconds", "free_memory_kb", "sensors_active"}

_NEW_STORE_ID = "substr(md5(random()::text || clock_timestamp()::text), 1, 16)"
"""16 hex digits, drawn by the server (no extension needed)."""

_LEASE_TABLE = (
    "CREATE TABLE fleetmq_lease (\n"
    "    name text PRIMARY KEY,\n"
    "    holder text NOT NULL,\n"
    "    epoch bigint NOT NULL,\n"
    "    expires_at timestamptz NOT NULL,\n"
    "    advertise_url text,\n"
    "    locked boolean NOT NULL\n"
    ");\n"
    "ALTER TABLE fleetmq_store ADD COLUMN run_block bigint NOT NULL DEFAULT 0;\n"
)
"""Which manager is active (``fleetmq.store.lease``): one row, ``name = 'active'``; and the
last block of event ids a run took (``reserve_run``)."""

SCHEMA = (
    "CREATE TABLE nodes (\n    "
    + ",\n    ".join(
        f"{c} {_TYPES[c]}"
        + (" PRIMARY KEY" if c == "id" else "" if c in _NULLABLE else " NOT NULL")
        for c in NODE_COLUMNS)
    # Room in each page for the new versions of touched rows: heartbeats update columns no
    # index covers, so those updates stay on the page (HOT) and leave the index alone.
    + "\n) WITH (fillfactor = 70);\n"
    "CREATE TABLE events (\n"
    "    id bigint PRIMARY KEY,\n"
    "    node_id text NOT NULL,\n"
    "    node_type text,\n"
    "    location text,\n"
    "    from_status text,\n"
    "    to_status text NOT NULL,\n"
    "    reason text NOT NULL,\n"
    "    at double precision NOT NULL,\n"
    "    last_seen double precision\n"
    ");\n"
    "CREATE INDEX events_by_node ON events (node_id, id);\n"
    "CREATE INDEX events_by_time ON events (at);\n"
    "CREATE TABLE fleetmq_store (id text NOT NULL);\n"
    f"INSERT INTO fleetmq_store (id) VALUES ({_NEW_STORE_ID});\n"
    + _LEASE_TABLE
)
"""The same tables and columns as SQLite's; JSON stays text so rows round-trip unchanged."""

MIGRATIONS: dict[int, str] = {
    # 1 -> 2: as SQLite's (events keep the node's type, location and last_seen, take the
    # manager's ids, lose the dedup key; the store draws its id).
    1: "ALTER TABLE events ADD COLUMN node_type text, ADD COLUMN location text, "
       "ADD COLUMN last_seen double precision;\n"
       "UPDATE events SET node_type = n.type, location = n.location FROM nodes n "
       "WHERE n.id = events.node_id;\n"
       "ALTER TABLE events DROP COLUMN key;\n"
       "ALTER TABLE events ALTER COLUMN id DROP IDENTITY;\n"
       "CREATE TABLE fleetmq_store (id text NOT NULL);\n"
       f"INSERT INTO fleetmq_store (id) VALUES ({_NEW_STORE_ID});\n",
    # 2 -> 3: the lease of high availability (contract section 10).
    2: _LEASE_TABLE,
}
"""SQL that takes the schema from version N to N + 1."""


def _array_type(column: str) -> str:
    return f"{_TYPES[column]}[]".replace("double precision", "float8")


_UPSERT = (
    f"INSERT INTO nodes ({', '.join(NODE_COLUMNS)}) SELECT * FROM unnest("
    + ", ".join(f"${i}::{_array_type(c)}" for i, c in enumerate(NODE_COLUMNS, 1))
    + ") ON CONFLICT (id) DO UPDATE SET "
    + ", ".join(f"{c} = EXCLUDED.{c}" if c not in TOUCH_COLUMNS else
                f"{c} = CASE WHEN EXCLUDED.last_seen >= nodes.last_seen THEN EXCLUDED.{c} "
                f"ELSE nodes.{c} END"
                for c in NODE_COLUMNS if c != "id")
)
"""A node's row as the registry has it, except that ``last_seen`` and telemetry never go
back: a manager that took over knows them as of its last follow (heartbeats are written
behind, not followed), and the store may hold newer ones."""
_TOUCH_ORDER = (*TOUCH_COLUMNS, "id")  # a touch row ends with the id
_TOUCH = (
    f"UPDATE nodes SET {', '.join(f'{c} = t.{c}' for c in TOUCH_COLUMNS)} FROM unnest("
    + ", ".join(f"${i}::{_array_type(c)}" for i, c in enumerate(_TOUCH_ORDER, 1))
    + f") AS t({', '.join(_TOUCH_ORDER)}) WHERE nodes.id = t.id"
)
_DELETE = "DELETE FROM nodes WHERE id = ANY($1::text[])"
_EVENTS = (
    f"INSERT INTO events ({', '.join(EVENT_COLUMNS)}) "
    "SELECT * FROM unnest($1::int8[], $2::text[], $3::text[], $4::text[], $5::text[], "
    "$6::text[], $7::text[], $8::float8[], $9::float8[]) ON CONFLICT (id) DO NOTHING"
)
_SELECT_EVENTS = f"SELECT {', '.join(EVENT_COLUMNS)} FROM events"
_DECLARED = NODE_COLUMNS.index("declared_interval")

# What asyncpg raises when the server, the network or the connection fails.
_FAILURES: tuple[type[BaseException], ...] = (
    asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.exceptions.InternalClientError,
    OSError, TimeoutError,
)


class PostgresStore:
    keeps_nodes = True

    def __init__(self, dsn: str, url: str) -> None:
        self.dsn = dsn
        self.url = url
        """The DSN without its password: for logs and errors."""
        self._pool: Any = None
        self.epoch: int | None = None
        """The lease's epoch this manager holds: every write checks it first (None: no
        lease, for the CLI's own writes and tests)."""
        self.on_fenced: Callable[[str], None] = lambda _why: None
        """Told when a write was refused for its epoch (the manager steps down)."""
        self.store_id = ""
        self.last_event_id = 0

    # --- lifecycle -------------------------------------------------------------------------

    async def open(self) -> None:
        try:
            setup = await self._connect()
            try:
                await self._migrate(setup)
                self.store_id = str(await self._guard(setup.fetchval(
                    "SELECT id FROM fleetmq_store"), "cannot open store"))
                self.last_event_id = await self._guard(self._max_event_id(setup),
                                                       "cannot open store")
            finally:
                await setup.close(timeout=CLOSE_TIMEOUT_S)
            self._pool = await self._guard(asyncpg.create_pool(
                self.dsn, min_size=POOL_MIN, max_size=POOL_MAX, timeout=CONNECT_TIMEOUT_S,
                command_timeout=COMMAND_TIMEOUT_S,
                server_settings=server_settings("fleetmq")), "cannot open store")
        except BaseException:
            await self.close()
            raise

    @staticmethod
    async def _max_event_id(conn: Any) -> int:
        return int(await conn.fetchval("SELECT coalesce(max(id), 0) FROM events"))

    async def _connect(self) -> Any:
        fix = "pass --store with a reachable postgresql:// URL"
        try:
            return await asyncpg.connect(
                self.dsn, timeout=CONNECT_TIMEOUT_S, command_timeout=COMMAND_TIMEOUT_S,
                server_settings=server_settings("fleetmq"))
        except asyncpg.InvalidCatalogNameError as exc:
            raise StoreError(f"cannot open store {self.url}: {exc}; create the database "
                             f"(createdb) or {fix}") from exc
        except asyncpg.InvalidAuthorizationSpecificationError as exc:
            raise StoreError(f"cannot open store {self.url}: PostgreSQL refused the login "
                             f"({exc}); check the user and password (or PGPASSWORD, "
                             "~/.pgpass, pg_hba.conf)") from exc
        except TimeoutError as exc:  # before OSError, its base
            raise StoreError(f"cannot open store {self.url}: PostgreSQL did not answer within "
                             f"{CONNECT_TIMEOUT_S:g} s; start the server or {fix}") from exc
        except OSError as exc:
            raise StoreError(f"cannot open store {self.url}: cannot reach PostgreSQL "
                             f"({exc.strerror or exc}); start the server or {fix}") from exc
        except ValueError as exc:  # asyncpg's ClientConfigurationError: a malformed DSN
            raise StoreError(f"cannot open store {self.url}: {exc}; {fix}") from exc
        except _FAILURES as exc:
            raise StoreError(f"cannot open store {self.url}: {exc}; {fix}") from exc

    async def _migrate(self, conn: Any) -> None:
        async def migrate() -> None:
            async with conn.transaction():
                # Two managers starting at once (or a migration tool) wait for each other here.
                await conn.execute("SELECT pg_advisory_xact_lock($1::bigint)", MIGRATE_KEY)
                await conn.execute(
                    "CREATE TABLE IF NOT EXISTS fleetmq_schema (version integer NOT NULL)")
                found = await conn.fetchval("SELECT max(version) FROM fleetmq_schema")
                version = 0 if found is None else int(found)
                if version > SCHEMA_VERSION:
                    raise StoreError(
                        f"store {self.url} has schema version {version}, written by a newer "
                        f"fleetmq (this one knows up to {SCHEMA_VERSION}): upgrade fleetmq or "
                        "pass --store with another database")
                if version == 0:
                    await conn.execute(SCHEMA)
                    await conn.execute("INSERT INTO fleetmq_schema (version) VALUES ($1)",
                                       SCHEMA_VERSION)
                elif version < SCHEMA_VERSION:
                    for step in range(version, SCHEMA_VERSION):
                        await conn.execute(MIGRATIONS[step])
                    await conn.execute("UPDATE fleetmq_schema SET version = $1", SCHEMA_VERSION)

        try:
            await migrate()
        except asyncpg.InsufficientPrivilegeError as exc:
            raise StoreError(f"cannot open store {self.url}: {exc}; grant the user CREATE on "
                             "the database's schema, or create the tables as its owner"
                             ) from exc
        except _FAILURES as exc:
            raise StoreError(f"cannot open store {self.url}: creating the schema failed: "
                             f"{exc}") from exc

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            try:
                await asyncio.wait_for(pool.close(), CLOSE_TIMEOUT_S)
            except _FAILURES:  # wait_for's TimeoutError too
                pool.terminate()  # a hung or broken server: nothing left to save

    # --- reading and writing ---------------------------------------------------------------

    async def load(self) -> AsyncGenerator[list[NodeRow], None]:
        pool = self._open_pool()
        query = f"SELECT {', '.join(NODE_COLUMNS)} FROM nodes"
        try:
            async with pool.acquire(timeout=CONNECT_TIMEOUT_S) as conn, \
                    conn.transaction(isolation="repeatable_read", readonly=True):
                cursor = await conn.cursor(query)  # server-side: a chunk in memory at a time
                while records := await cursor.fetch(LOAD_CHUNK):
                    yield list(map(tuple, records))
        except _FAILURES as exc:
            raise StoreError(f"store {self.url} failed loading nodes: {exc}") from exc

    async def write(self, batch: Batch) -> None:
        async def apply(conn: Any) -> None:
            async with conn.transaction():
                await check_epoch(conn, self.epoch)
                if batch.deletes:
                    await conn.execute(_DELETE, batch.deletes)
                if batch.upserts:
                    # Last wins, as with SQLite's INSERT OR REPLACE (one statement may not
                    # update a row twice).
                    rows = list({row[0]: row for row in batch.upserts}.values())
                    columns = [list(c) for c in zip(*rows, strict=True)]
                    columns[_DECLARED] = [bool(v) for v in columns[_DECLARED]]
                    await conn.execute(_UPSERT, *columns)
                if batch.touches:
                    rows = list({row[-1]: row for row in batch.touches}.values())
                    await conn.execute(_TOUCH, *(list(c) for c in zip(*rows, strict=True)))
                if batch.events:
                    await conn.execute(
                        _EVENTS, *(list(c) for c in zip(*batch.events, strict=True)))
        await self._with_conn(apply, "writing")

    async def events(self, node_id: str, limit: int, before: int | None) -> list[StoredEvent]:
        async def query(conn: Any) -> list[StoredEvent]:
            rows = await conn.fetch(
                f"{_SELECT_EVENTS} WHERE node_id = $1 AND id < $2 ORDER BY id DESC LIMIT $3",
                node_id, before if before is not None else 2**63 - 1, limit)
            return [StoredEvent(*row) for row in rows]
        return await self._with_conn(query, "reading events")

    async def events_after(self, after: int, upto: int, limit: int) -> list[StoredEvent]:
        async def query(conn: Any) -> list[StoredEvent]:
            rows = await conn.fetch(
                f"{_SELECT_EVENTS} WHERE id > $1 AND id <= $2 ORDER BY id LIMIT $3",
                after, upto, limit)
            return [StoredEvent(*row) for row in rows]
        return await self._with_conn(query, "reading events")

    async def first_event_id(self) -> int | None:
        async def query(conn: Any) -> int | None:
            first = await conn.fetchval("SELECT min(id) FROM events")
            return None if first is None else int(first)
        return await self._with_conn(query, "reading events")

    async def prune(self, older_than: float) -> int:
        async def chunk(conn: Any) -> int:
            async with conn.transaction():
                await check_epoch(conn, self.epoch)
                status = await conn.execute(
                    "DELETE FROM events WHERE id IN (SELECT id FROM events WHERE at < $1 AND "
                    "id < (SELECT max(id) FROM events) LIMIT $2)", older_than, PRUNE_CHUNK)
            return int(str(status).rsplit(" ", 1)[-1])  # "DELETE <count>"
        total = 0
        while (dropped := await self._with_conn(chunk, "pruning")) > 0:  # short transactions
            total += dropped
        return total

    async def ping(self) -> None:
        async def one(conn: Any) -> None:
            await conn.fetchval("SELECT 1", timeout=CONNECT_TIMEOUT_S)
        await self._with_conn(one, "answering")

    # --- following (a standby) ---------------------------------------------------------------

    async def follow(self, after: int, limit: int) -> tuple[int, list[NodeRow], list[str]]:
        """What registrations, transitions and deletions changed after event ``after``: the
        last event id seen, the rows of the nodes they touched as they are now, and the ids of
        those no longer stored. A node row and its events commit together, so a node read
        here is at least as new as the events seen."""
        async def read(conn: Any) -> tuple[int, list[NodeRow], list[str]]:
            events = await conn.fetch(
                "SELECT id, node_id FROM events WHERE id > $1 ORDER BY id LIMIT $2",
                after, limit)
            if not events:
                return after, [], []
            ids = list({row[1]: None for row in events})
            rows = [tuple(r) for r in await conn.fetch(
                f"SELECT {', '.join(NODE_COLUMNS)} FROM nodes WHERE id = ANY($1::text[])", ids)]
            found = {row[0] for row in rows}
            return int(events[-1][0]), rows, [i for i in ids if i not in found]
        return await self._with_conn(read, "following")

    async def reserve_run(self, at_least: int) -> int:
        """The block of event ids this run numbers from: the next one after any run before
        took, and at least ``at_least``. Kept in the store, fenced: a run that committed
        nothing before it was deposed still used its block (its ids may have been shown)."""
        async def take(conn: Any) -> int:
            async with conn.transaction():
                await check_epoch(conn, self.epoch)
                return int(await conn.fetchval(
                    "UPDATE fleetmq_store SET run_block = greatest(run_block + 1, $1) "
                    "RETURNING run_block", at_least))
        return await self._with_conn(take, "reserving event ids")

    async def max_event_id(self) -> int:
        """The store's last event id now (a new active numbers its events after it)."""
        return await self._with_conn(self._max_event_id, "reading events")

    # --- plumbing --------------------------------------------------------------------------

    def _open_pool(self) -> Any:
        if self._pool is None:
            raise StoreError(f"store {self.url} is not open")
        return self._pool

    async def _with_conn(self, fn: Callable[[Any], Awaitable[T]], doing: str) -> T:
        pool = self._open_pool()
        try:
            async with pool.acquire(timeout=CONNECT_TIMEOUT_S) as conn:
                return await fn(conn)
        except FencedError as exc:
            self.on_fenced(str(exc))
            raise
        except asyncpg.DataError as exc:  # a value it refuses: retrying cannot help
            raise StoreDataError(f"store {self.url} refused a value {doing}: {exc}") from exc
        except _FAILURES as exc:
            raise StoreError(f"store {self.url} failed {doing}: {exc}") from exc

    async def _guard(self, awaitable: Awaitable[T], doing: str) -> T:
        try:
            return await awaitable
        except _FAILURES as exc:
            raise StoreError(f"{doing} {self.url}: {exc}") from exc

