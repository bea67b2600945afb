"""Access-control tables in the SQLite file of the fleet (``sqlite:///path``).

Its own connection on its own thread, and no file lock: ``fleetmq keys`` and ``fleetmq
credentials`` change credentials in the store of a running manager, which sees the change at
its next poll. SQLite serialises the writers (``BEGIN IMMEDIATE``, a busy timeout).
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from fleetmq.auth.store import (
    CREDENTIAL_COLUMNS,
    OUTBOX_COLUMNS,
    OUTBOX_ORDER,
    AuditEntry,
    AuthChanges,
    Credential,
    LastAdminError,
    OutboxRow,
    credential_from_row,
    credential_row,
    outbox_plan,
)
from fleetmq.errors import StoreError

T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS auth_meta (k TEXT PRIMARY KEY, v INTEGER NOT NULL);
INSERT OR IGNORE INTO auth_meta (k, v) VALUES ('seq', 0), ('required', 0);
CREATE TABLE IF NOT EXISTS credentials (
    id TEXT PRIMARY KEY,
    digest BLOB NOT NULL UNIQUE,
    created_at REAL NOT NULL,
    node_id TEXT,
    role TEXT,
    name TEXT NOT NULL,
    expires_at REAL,
    revoked_at REAL,
    last_used_at REAL,
    uses INTEGER NOT NULL,
    max_uses INTEGER,
    id_pattern TEXT,
    node_type TEXT,
    allow_registered INTEGER NOT NULL,
    enrolled_by TEXT,
    broker_hash TEXT,
    seq INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS credentials_by_seq ON credentials (seq);
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    action TEXT NOT NULL,
    actor TEXT NOT NULL,
    address TEXT,
    subject TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_by_time ON audit (at);
INSERT OR IGNORE INTO auth_meta (k, v) VALUES ('mirror', 0);
CREATE TABLE IF NOT EXISTS broker_outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    identity TEXT NOT NULL,
    action TEXT NOT NULL,
    cred_id TEXT,
    secret TEXT,
    not_before REAL,
    created_at REAL NOT NULL
);
"""

_SELECT = f"SELECT {', '.join(CREDENTIAL_COLUMNS)} FROM credentials"
_UPSERT = (
    f"INSERT INTO credentials ({', '.join(CREDENTIAL_COLUMNS)}) "
    f"VALUES ({', '.join('?' * len(CREDENTIAL_COLUMNS))}) ON CONFLICT (id) DO UPDATE SET "
    + ", ".join(f"{c} = excluded.{c}" for c in CREDENTIAL_COLUMNS
                if c not in ("id", "last_used_at"))
    # The latest use wins: a record saved from an older snapshot keeps a later recorded use.
    + ", last_used_at = COALESCE(max(excluded.last_used_at, credentials.last_used_at), "
      "excluded.last_used_at, credentials.last_used_at)")
_VALID_ADMINS = ("SELECT count(*) FROM credentials WHERE role = 'admin' "
                 "AND (revoked_at IS NULL OR revoked_at > ?) "
                 "AND (expires_at IS NULL OR expires_at > ?)")


class SqliteAuthStore:
    keeps_broker_hash = True  # `fleetmq credentials export` reads this store

    def __init__(self, path: str) -> None:
        self.path = path
        self.url = f"sqlite:///{path}"
        self._executor: ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None

    async def open(self) -> None:
        self._check_directory()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="fleetmq-sqlite-auth")
        try:
            await self._run(self._connect)
        except StoreError:
            await self.close()
            raise

    def _check_directory(self) -> None:
        directory = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(directory):
            raise StoreError(f"cannot open store {self.url}: directory {directory!r} does not "
                             "exist; create it or pass --store with another path")

    def _connect(self) -> None:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA busy_timeout = 5000")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = FULL")
        conn.executescript(SCHEMA)  # idempotent: IF NOT EXISTS, OR IGNORE
        columns = {row[1] for row in conn.execute("PRAGMA table_info(credentials)")}
        if "needs_reissue" not in columns:  # a store made before the dynsec mirror
            conn.execute("ALTER TABLE credentials ADD COLUMN needs_reissue INTEGER NOT NULL "
                         "DEFAULT 0")
        self._conn = conn

    async def close(self) -> None:
        if self._executor is None:
            return
        if self._conn is not None:
            conn, self._conn = self._conn, None
            await asyncio.get_running_loop().run_in_executor(self._executor, conn.close)
        self._executor.shutdown(wait=True)
        self._executor = None

    async def changes(self, since: int) -> AuthChanges:
        def read(conn: sqlite3.Connection) -> AuthChanges:
            meta = dict(conn.execute("SELECT k, v FROM auth_meta").fetchall())
            rows = conn.execute(f"{_SELECT} WHERE seq > ?", (since,)).fetchall()
            return AuthChanges(int(meta["seq"]), bool(meta["required"]),
                               [credential_from_row(r) for r in rows])
        return await self._run(lambda: self._read(read))

    async def seq(self) -> int:
        return await self._run(lambda: int(self._db().execute(
            "SELECT v FROM auth_meta WHERE k = 'seq'").fetchone()[0]))

    async def save(self, credentials: list[Credential], audit: list[AuditEntry], *,
                   require: bool = False, keep_admin_at: float | None = None,
                   outbox: Sequence[OutboxRow] = ()) -> int:
        def write(conn: sqlite3.Connection) -> int:
            seq = int(conn.execute(
                "UPDATE auth_meta SET v = v + 1 WHERE k = 'seq' RETURNING v").fetchone()[0])
            conn.executemany(_UPSERT, ((*credential_row(c)[:-1], seq) for c in credentials))
            conn.executemany(
                "INSERT INTO audit (at, action, actor, address, subject) VALUES (?, ?, ?, ?, ?)",
                ((e.at, e.action, e.actor, e.address, e.subject) for e in audit))
            if require:
                conn.execute("UPDATE auth_meta SET v = 1 WHERE k = 'required'")
            if keep_admin_at is not None and not conn.execute(
                    _VALID_ADMINS, (keep_admin_at, keep_admin_at)).fetchone()[0]:
                raise LastAdminError("that would leave no valid admin key")
            self._add_outbox(conn, outbox)
            return seq
        return await self._run(lambda: self._transaction(write))

    # --- the broker mirror's outbox ---------------------------------------------------------

    @staticmethod
    def _add_outbox(conn: sqlite3.Connection, rows: Sequence[OutboxRow]) -> None:
        if not rows or not conn.execute(
                "SELECT v FROM auth_meta WHERE k = 'mirror'").fetchone()[0]:
            return
        for statement, args in outbox_plan(rows):
            conn.execute(statement, args)

    async def set_mirror(self, active: bool) -> None:
        def write(conn: sqlite3.Connection) -> None:
            conn.execute("UPDATE auth_meta SET v = ? WHERE k = 'mirror'", (int(active),))
            if not active:
                conn.execute("DELETE FROM broker_outbox")
        await self._run(lambda: self._transaction(write))

    async def outbox_add(self, rows: Sequence[OutboxRow]) -> None:
        await self._run(lambda: self._transaction(lambda conn: self._add_outbox(conn, rows)))

    async def outbox(self, limit: int) -> list[OutboxRow]:
        def read(conn: sqlite3.Connection) -> list[OutboxRow]:
            rows = conn.execute(f"SELECT {', '.join(OUTBOX_COLUMNS)}, id FROM broker_outbox "
                                f"{OUTBOX_ORDER} LIMIT ?", (limit,)).fetchall()
            return [OutboxRow(*row) for row in rows]
        return await self._run(lambda: self._read(read))

    async def outbox_done(self, ids: Sequence[int]) -> None:
        def write(conn: sqlite3.Connection) -> None:
            conn.executemany("DELETE FROM broker_outbox WHERE id = ?", ((i,) for i in ids))
        await self._run(lambda: self._transaction(write))

    async def outbox_due(self, cred_ids: Sequence[str], at: float) -> int:
        def write(conn: sqlite3.Connection) -> int:
            return sum(conn.execute(
                "UPDATE broker_outbox SET not_before = ? WHERE action = 'put' AND cred_id = ? "
                "AND not_before > ?", (at, c, at)).rowcount for c in cred_ids)
        return await self._run(lambda: self._transaction(write))

    async def record_use(self, used: list[tuple[str, float]]) -> None:
        def write(conn: sqlite3.Connection) -> None:
            conn.executemany("UPDATE credentials SET last_used_at = ? WHERE id = ? "
                             "AND (last_used_at IS NULL OR last_used_at < ?)",
                             ((at, cred_id, at) for cred_id, at in used))
        await self._run(lambda: self._transaction(write))

    async def audit(self, limit: int, before: int | None) -> list[AuditEntry]:
        def read(conn: sqlite3.Connection) -> list[AuditEntry]:
            rows = conn.execute(
                "SELECT at, action, actor, address, subject, id FROM audit WHERE id < ? "
                "ORDER BY id DESC LIMIT ?",
                (before if before is not None else 2**63 - 1, limit)).fetchall()
            return [AuditEntry(*row) for row in rows]
        return await self._run(lambda: self._read(read))

    async def prune_audit(self, older_than: float) -> int:
        def write(conn: sqlite3.Connection) -> int:
            return conn.execute("DELETE FROM audit WHERE at < ?", (older_than,)).rowcount
        return await self._run(lambda: self._transaction(write))

    # --- threads ---------------------------------------------------------------------------

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreError(f"store {self.url} is not open")
        return self._conn

    def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        conn = self._db()
        conn.execute("BEGIN")  # one snapshot for every statement of the read
        try:
            return fn(conn)
        finally:
            conn.execute("COMMIT")

    def _transaction(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        conn = self._db()
        conn.execute("BEGIN IMMEDIATE")
        try:
            result = fn(conn)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return result

    async def _run(self, fn: Callable[[], T]) -> T:
        if self._executor is None:
            raise StoreError(f"store {self.url} is not open")
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, fn)
        except sqlite3.Error as exc:
            raise StoreError(f"store {self.url} failed: {exc}") from exc
