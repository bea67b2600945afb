"""``sqlite:///path``: the default store, one file, synced on every commit.

sqlite3 blocks, so each connection lives on its own thread: one writes (batches, schema,
loading, pruning), one reads (the events route), which WAL mode lets run side by side.
The file is locked for the process's lifetime: two managers must never share one fleet.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import sqlite3
from collections.abc import AsyncGenerator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import IO, TypeVar

import orjson

from fleetmq.errors import StoreDataError, StoreError
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

T = TypeVar("T")

SCHEMA = """
CREATE TABLE nodes (
    id TEXT PRIMARY KEY,
    type TEXT NOT NULL,
    name TEXT NOT NULL,
    capabilities TEXT NOT NULL,
    location TEXT,
    metadata TEXT NOT NULL,
    interval_s INTEGER NOT NULL,
    declared_interval INTEGER NOT NULL,
    timeout_s REAL NOT NULL,
    registered_at REAL NOT NULL,
    last_seen REAL NOT NULL,
    status TEXT NOT NULL,
    status_reason TEXT NOT NULL,
    status_since REAL NOT NULL,
    session TEXT,
    uptime_seconds INTEGER,
    free_memory_kb INTEGER,
    sensors_active INTEGER
) WITHOUT ROWID;
CREATE TABLE events (
    id INTEGER PRIMARY KEY,
    node_id TEXT NOT NULL,
    node_type TEXT,
    location TEXT,
    from_status TEXT,
    to_status TEXT NOT NULL,
    reason TEXT NOT NULL,
    at REAL NOT NULL,
    last_seen REAL
);
CREATE INDEX events_by_node ON events (node_id, id);
CREATE INDEX events_by_time ON events (at);
CREATE TABLE fleetmq_store (id TEXT NOT NULL);
INSERT INTO fleetmq_store (id) VALUES (lower(hex(randomblob(8))));
"""

MIGRATIONS: dict[int, str] = {
    # 1 -> 2: events keep the node's type, location and last_seen and take the manager's ids
    # (the dedup key goes); the store draws its id. Old events get the type and location of
    # their node as it is now (None once deleted) and no last_seen: nobody kept them.
    1: """
CREATE TABLE events_v2 (
    id INTEGER PRIMARY KEY,
    node_id TEXT NOT NULL,
    node_type TEXT,
    location TEXT,
    from_status TEXT,
    to_status TEXT NOT NULL,
    reason TEXT NOT NULL,
    at REAL NOT NULL,
    last_seen REAL
);
INSERT INTO events_v2 (id, node_id, node_type, location, from_status, to_status, reason, at)
    SELECT e.id, e.node_id, n.type, n.location, e.from_status, e.to_status, e.reason, e.at
    FROM events e LEFT JOIN nodes n ON n.id = e.node_id;
DROP TABLE events;
ALTER TABLE events_v2 RENAME TO events;
CREATE INDEX events_by_node ON events (node_id, id);
CREATE INDEX events_by_time ON events (at);
CREATE TABLE fleetmq_store (id TEXT NOT NULL);
INSERT INTO fleetmq_store (id) VALUES (lower(hex(randomblob(8))));
""",
    # 2 -> 3: PostgreSQL's lease table; a SQLite store's lease is its file lock.
    2: "",
}
"""SQL that takes the schema from version N to N + 1."""

PRUNE_CHUNK = 10_000

_UPSERT = (
    f"INSERT OR REPLACE INTO nodes ({', '.join(NODE_COLUMNS)}) "
    f"VALUES ({', '.join('?' * len(NODE_COLUMNS))})"
)
_TOUCH = f"UPDATE nodes SET {', '.join(f'{c} = ?' for c in TOUCH_COLUMNS)} WHERE id = ?"
# JSON prints REALs with 15 digits (a timestamp would move by up to a millisecond): those
# columns come natively, beside the array of the others.
_REALS = ("timeout_s", "registered_at", "last_seen", "status_since")
_JSON_COLUMNS = [c for c in NODE_COLUMNS if c not in _REALS]
_LOAD = f"SELECT json_array({', '.join(_JSON_COLUMNS)}), {', '.join(_REALS)} FROM nodes"
_EVENT = (f"INSERT OR IGNORE INTO events ({', '.join(EVENT_COLUMNS)}) "
          f"VALUES ({', '.join('?' * len(EVENT_COLUMNS))})")
_SELECT_EVENTS = f"SELECT {', '.join(EVENT_COLUMNS)} FROM events"


class SqliteStore:
    keeps_nodes = True

    def __init__(self, path: str) -> None:
        self.path = path
        self.url = f"sqlite:///{path}"
        self._writer = self._reader = ThreadPoolExecutor(1)  # replaced in open()
        self._wconn: sqlite3.Connection | None = None
        self._rconn: sqlite3.Connection | None = None
        self._lock: IO[bytes] | None = None
        self._lock_file: IO[bytes] | None = None
        self.store_id = ""
        self.last_event_id = 0

    # --- lifecycle -------------------------------------------------------------------------

    async def open(self) -> None:
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="fleetmq-sqlite-write")
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="fleetmq-sqlite-read")
        self._take_lock()
        try:
            self._wconn = await self._write(self._connect)
            await self._write(self._migrate)
            self.store_id, self.last_event_id = await self._write(self._identity)
            self._rconn = await self._run(self._reader, self._connect)
        except StoreError as exc:
            await self.close()
            if isinstance(exc.__cause__, sqlite3.DatabaseError):
                raise StoreError(f"cannot open store {self.url}: {exc.__cause__} (is it a "
                                 "fleetmq SQLite file?); pass --store with another path"
                                 ) from exc.__cause__
            raise

    def _take_lock(self) -> None:
        if not self.try_lock():
            raise StoreError(f"store {self.url} is in use by another fleetmq: each manager "
                             "needs its own --store (a standby on the same file needs an "
                             "external broker, --broker mqtt://HOST:PORT)")

    def try_lock(self) -> bool:
        """Take the file's lock if it is free (kept until ``close``): False while another
        process holds it. A standby on the same host waits here (``FileLease``)."""
        if self._lock is not None:
            return True
        if self._lock_file is None:
            # Opened once and kept while waiting: closing a descriptor of the file would drop
            # this process's POSIX locks on it (SQLite's own, on the auth store's connections).
            directory = os.path.dirname(os.path.abspath(self.path))
            if not os.path.isdir(directory):
                raise StoreError(f"cannot open store {self.url}: directory {directory!r} does "
                                 "not exist; create it or pass --store with another path")
            try:
                self._lock_file = open(self.path, "ab")  # noqa: SIM115 (held until close)
            except OSError as exc:
                raise StoreError(f"cannot open store {self.url}: {exc.strerror}") from exc
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False
        self._lock = self._lock_file
        return True

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA busy_timeout = 5000")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")  # a commit is on disk when it returns
        return conn

    def _migrate(self) -> None:
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute("CREATE TABLE IF NOT EXISTS fleetmq_schema (version INTEGER NOT NULL)")
            row = conn.execute("SELECT version FROM fleetmq_schema").fetchone()
            version = 0 if row is None else int(row[0])
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"store {self.url} has schema version {version}, written by a newer "
                    f"fleetmq (this one knows up to {SCHEMA_VERSION}): upgrade fleetmq or "
                    "pass --store with another path")
            if version == 0:
                for statement in SCHEMA.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute("INSERT INTO fleetmq_schema (version) VALUES (?)",
                             (SCHEMA_VERSION,))
            else:
                for step in range(version, SCHEMA_VERSION):
                    for statement in MIGRATIONS[step].split(";"):
                        if statement.strip():
                            conn.execute(statement)
                conn.execute("UPDATE fleetmq_schema SET version = ?", (SCHEMA_VERSION,))
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def _identity(self) -> tuple[str, int]:
        conn = self._conn()
        store_id = conn.execute("SELECT id FROM fleetmq_store").fetchone()[0]
        last = conn.execute("SELECT max(id) FROM events").fetchone()[0]
        return str(store_id), int(last or 0)

    async def close(self) -> None:
        for executor, conn in ((self._reader, self._rconn), (self._writer, self._wconn)):
            if conn is not None:
                with contextlib.suppress(StoreError):  # a broken connection: nothing to save
                    await self._run(executor, conn.close)
            executor.shutdown(wait=True)
        self._rconn = self._wconn = None
        if self._lock_file is not None:
            self._lock_file.close()  # the lock with it
        self._lock = self._lock_file = None

    # --- reading and writing ---------------------------------------------------------------

    async def load(self) -> AsyncGenerator[list[NodeRow], None]:
        # Each row comes as one JSON array built by SQLite (without the GIL) and parsed by
        # orjson: half the time of sqlite3 making 18 objects per row (measured at 1M nodes).
        cursor = await self._write(lambda: self._conn().execute(_LOAD))

        def chunk() -> list[NodeRow]:
            loads = orjson.loads
            rows = []
            for text, timeout_s, registered_at, last_seen, since in cursor.fetchmany(LOAD_CHUNK):
                (node_id, node_type, name, capabilities, location, metadata, interval_s,
                 declared, status, reason, session, uptime, free_kb, sensors) = loads(text)
                rows.append((node_id, node_type, name, capabilities, location, metadata,
                             interval_s, declared, timeout_s, registered_at, last_seen, status,
                             reason, since, session, uptime, free_kb, sensors))
            return rows

        try:
            while rows := await self._write(chunk):
                yield rows
        finally:
            await self._write(cursor.close)

    async def write(self, batch: Batch) -> None:
        await self._write(lambda: self._write_batch(batch))

    def _write_batch(self, batch: Batch) -> None:
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            if batch.deletes:
                conn.executemany("DELETE FROM nodes WHERE id = ?", ((i,) for i in batch.deletes))
            if batch.upserts:
                conn.executemany(_UPSERT, batch.upserts)
            if batch.touches:
                conn.executemany(_TOUCH, batch.touches)
            if batch.events:
                # HistoryEvent is a tuple in _EVENT's column order: no Python generator in
                # this thread, which shares the GIL (and, pinned, the core) with the loop.
                conn.executemany(_EVENT, batch.events)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    async def events(self, node_id: str, limit: int, before: int | None) -> list[StoredEvent]:
        def query() -> list[StoredEvent]:
            assert self._rconn is not None
            rows = self._rconn.execute(
                f"{_SELECT_EVENTS} WHERE node_id = ? AND id < ? ORDER BY id DESC LIMIT ?",
                (node_id, before if before is not None else 2**63 - 1, limit)).fetchall()
            return [StoredEvent(*row) for row in rows]
        return await self._run(self._reader, query)

    async def events_after(self, after: int, upto: int, limit: int) -> list[StoredEvent]:
        def query() -> list[StoredEvent]:
            assert self._rconn is not None
            rows = self._rconn.execute(
                f"{_SELECT_EVENTS} WHERE id > ? AND id <= ? ORDER BY id LIMIT ?",
                (after, upto, limit)).fetchall()
            return [StoredEvent(*row) for row in rows]
        return await self._run(self._reader, query)

    async def first_event_id(self) -> int | None:
        def query() -> int | None:
            assert self._rconn is not None
            first = self._rconn.execute("SELECT min(id) FROM events").fetchone()[0]
            return None if first is None else int(first)
        return await self._run(self._reader, query)

    async def prune(self, older_than: float) -> int:
        def chunk() -> int:
            cursor = self._conn().execute(
                "DELETE FROM events WHERE id IN (SELECT id FROM events WHERE at < ? AND "
                "id < (SELECT max(id) FROM events) LIMIT ?)", (older_than, PRUNE_CHUNK))
            return cursor.rowcount
        total = 0
        while (dropped := await self._write(chunk)) > 0:  # short transactions between batches
            total += dropped
        return total

    async def ping(self) -> None:
        await self._write(lambda: self._conn().execute("SELECT 1").fetchone())

    # --- threads ---------------------------------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        if self._wconn is None:
            raise StoreError(f"store {self.url} is not open")
        return self._wconn

    async def _write(self, fn: Callable[[], T]) -> T:
        return await self._run(self._writer, fn)

    async def _run(self, executor: ThreadPoolExecutor, fn: Callable[[], T]) -> T:
        try:
            return await asyncio.get_running_loop().run_in_executor(executor, fn)
        except (sqlite3.DataError, sqlite3.IntegrityError, OverflowError,
                UnicodeEncodeError) as exc:  # a value it refuses: retrying cannot help
            raise StoreDataError(f"store {self.url} refused a value: {exc}") from exc
        except sqlite3.Error as exc:
            raise StoreError(f"store {self.url} failed: {exc}") from exc
