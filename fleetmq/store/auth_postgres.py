"""Access-control tables in the fleet's PostgreSQL database (the ``postgres`` extra).

A small pool of its own and no advisory lock: the CLI manages credentials in the store of a
running manager. Writers serialise on the ``auth_meta`` sequence row.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import asyncpg

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
from fleetmq.errors import FencedError, StoreError
from fleetmq.store.lease import check_epoch, server_settings

T = TypeVar("T")

CONNECT_TIMEOUT_S = 10.0
COMMAND_TIMEOUT_S = 10.0

SCHEMA = """
CREATE TABLE IF NOT EXISTS auth_meta (k text PRIMARY KEY, v bigint NOT NULL);
INSERT INTO auth_meta (k, v) VALUES ('seq', 0), ('required', 0) ON CONFLICT DO NOTHING;
CREATE TABLE IF NOT EXISTS credentials (
    id text PRIMARY KEY,
    digest bytea NOT NULL UNIQUE,
    created_at double precision NOT NULL,
    node_id text,
    role text,
    name text NOT NULL,
    expires_at double precision,
    revoked_at double precision,
    last_used_at double precision,
    uses bigint NOT NULL,
    max_uses bigint,
    id_pattern text,
    node_type text,
    allow_registered integer NOT NULL,
    enrolled_by text,
    broker_hash text,
    seq bigint NOT NULL
);
CREATE INDEX IF NOT EXISTS credentials_by_seq ON credentials (seq);
CREATE TABLE IF NOT EXISTS audit (
    id bigserial PRIMARY KEY,
    at double precision NOT NULL,
    action text NOT NULL,
    actor text NOT NULL,
    address text,
    subject text NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_by_time ON audit (at);
ALTER TABLE credentials ADD COLUMN IF NOT EXISTS needs_reissue integer NOT NULL DEFAULT 0;
INSERT INTO auth_meta (k, v) VALUES ('mirror', 0) ON CONFLICT DO NOTHING;
CREATE TABLE IF NOT EXISTS broker_outbox (
    id bigserial PRIMARY KEY,
    identity text NOT NULL,
    action text NOT NULL,
    cred_id text,
    secret text,
    not_before double precision,
    created_at double precision NOT NULL
);
"""

_SELECT = f"SELECT {', '.join(CREDENTIAL_COLUMNS)} FROM credentials"
_UPSERT = (
    f"INSERT INTO credentials ({', '.join(CREDENTIAL_COLUMNS)}) VALUES "
    f"({', '.join(f'${i}' for i in range(1, len(CREDENTIAL_COLUMNS) + 1))}) "
    "ON CONFLICT (id) DO UPDATE SET "
    + ", ".join(f"{c} = EXCLUDED.{c}" for c in CREDENTIAL_COLUMNS
                if c not in ("id", "last_used_at"))
    # The latest use wins: a record saved from an older snapshot keeps a later recorded use.
    + ", last_used_at = GREATEST(EXCLUDED.last_used_at, credentials.last_used_at)")
_VALID_ADMINS = ("SELECT count(*) FROM credentials WHERE role = 'admin' "
                 "AND (revoked_at IS NULL OR revoked_at > $1) "
                 "AND (expires_at IS NULL OR expires_at > $1)")
_FAILURES: tuple[type[BaseException], ...] = (
    asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError)


class PostgresAuthStore:
    keeps_broker_hash = True  # `fleetmq credentials export` reads this store

    def __init__(self, dsn: str, url: str) -> None:
        self.dsn = dsn
        self.url = url
        self._pool: Any = None
        self.epoch: int | None = None
        """The lease's epoch this manager holds: every write checks it first (None: the CLI,
        which holds no lease)."""
        self.on_fenced: Callable[[str], None] = lambda _why: None
        """Told when a write was refused for its epoch (the manager steps down)."""

    async def open(self) -> None:
        try:
            self._pool = await asyncpg.create_pool(
                self.dsn, min_size=1, max_size=2, timeout=CONNECT_TIMEOUT_S,
                command_timeout=COMMAND_TIMEOUT_S,
                server_settings=server_settings("fleetmq-auth"))
        except _FAILURES as exc:
            raise StoreError(f"cannot open store {self.url}: {exc}; pass --store with a "
                             "reachable postgresql:// URL") from exc

        async def create(conn: Any) -> None:
            # Two creators at once (CLI and manager) race on IF NOT EXISTS: serialise them.
            async with conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock(727274101)")
                await conn.execute(SCHEMA)
        await self._with(create, "creating the access-control tables in")

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            try:
                await pool.close()
            except _FAILURES:
                pool.terminate()

    async def changes(self, since: int) -> AuthChanges:
        async def read(conn: Any) -> AuthChanges:
            async with conn.transaction(isolation="repeatable_read", readonly=True):
                meta = dict(await conn.fetch("SELECT k, v FROM auth_meta"))
                rows = await conn.fetch(f"{_SELECT} WHERE seq > $1", since)
            return AuthChanges(int(meta["seq"]), bool(meta["required"]),
                               [credential_from_row(tuple(r)) for r in rows])
        return await self._with(read, "reading credentials from")

    async def seq(self) -> int:
        async def read(conn: Any) -> int:
            return int(await conn.fetchval("SELECT v FROM auth_meta WHERE k = 'seq'"))
        return await self._with(read, "reading")

    async def save(self, credentials: list[Credential], audit: list[AuditEntry], *,
                   require: bool = False, keep_admin_at: float | None = None,
                   outbox: Sequence[OutboxRow] = ()) -> int:
        async def write(conn: Any) -> int:
            async with conn.transaction():
                seq = int(await conn.fetchval(
                    "UPDATE auth_meta SET v = v + 1 WHERE k = 'seq' RETURNING v"))
                if credentials:
                    await conn.executemany(
                        _UPSERT, [(*credential_row(c)[:-1], seq) for c in credentials])
                if audit:
                    await conn.executemany(
                        "INSERT INTO audit (at, action, actor, address, subject) "
                        "VALUES ($1, $2, $3, $4, $5)",
                        [(e.at, e.action, e.actor, e.address, e.subject) for e in audit])
                if require:
                    await conn.execute("UPDATE auth_meta SET v = 1 WHERE k = 'required'")
                if keep_admin_at is not None and not await conn.fetchval(
                        _VALID_ADMINS, keep_admin_at):
                    raise LastAdminError("that would leave no valid admin key")
                await _add_outbox(conn, outbox)
            return seq
        return await self._write(write, "writing credentials to")

    # --- the broker mirror's outbox ---------------------------------------------------------

    async def set_mirror(self, active: bool) -> None:
        async def write(conn: Any) -> None:
            async with conn.transaction():
                await conn.execute("UPDATE auth_meta SET v = $1 WHERE k = 'mirror'",
                                   int(active))
                if not active:
                    await conn.execute("DELETE FROM broker_outbox")
        await self._write(write, "writing to")

    async def outbox_add(self, rows: Sequence[OutboxRow]) -> None:
        async def write(conn: Any) -> None:
            async with conn.transaction():
                await _add_outbox(conn, rows)
        await self._write(write, "writing the broker outbox to")

    async def outbox(self, limit: int) -> list[OutboxRow]:
        async def read(conn: Any) -> list[OutboxRow]:
            rows = await conn.fetch(f"SELECT {', '.join(OUTBOX_COLUMNS)}, id FROM broker_outbox "
                                    f"{OUTBOX_ORDER} LIMIT $1", limit)
            return [OutboxRow(*r) for r in rows]
        return await self._with(read, "reading the broker outbox from")

    async def outbox_done(self, ids: Sequence[int]) -> None:
        async def write(conn: Any) -> None:
            await conn.execute("DELETE FROM broker_outbox WHERE id = ANY($1::bigint[])",
                               list(ids))
        await self._write(write, "writing the broker outbox to")

    async def outbox_due(self, cred_ids: Sequence[str], at: float) -> int:
        async def write(conn: Any) -> int:
            status = await conn.execute(
                "UPDATE broker_outbox SET not_before = $1 WHERE action = 'put' "
                "AND cred_id = ANY($2::text[]) AND not_before > $1", at, list(cred_ids))
            return int(status.split()[-1])
        return await self._write(write, "writing the broker outbox to")

    async def record_use(self, used: list[tuple[str, float]]) -> None:
        async def write(conn: Any) -> None:
            await conn.executemany("UPDATE credentials SET last_used_at = $1 WHERE id = $2 "
                                   "AND (last_used_at IS NULL OR last_used_at < $1)",
                                   [(at, cred_id) for cred_id, at in used])
        await self._write(write, "writing to")

    async def audit(self, limit: int, before: int | None) -> list[AuditEntry]:
        async def read(conn: Any) -> list[AuditEntry]:
            rows = await conn.fetch(
                "SELECT at, action, actor, address, subject, id FROM audit WHERE id < $1 "
                "ORDER BY id DESC LIMIT $2",
                before if before is not None else 2**63 - 1, limit)
            return [AuditEntry(*r) for r in rows]
        return await self._with(read, "reading the audit log from")

    async def prune_audit(self, older_than: float) -> int:
        async def write(conn: Any) -> int:
            status = await conn.execute("DELETE FROM audit WHERE at < $1", older_than)
            return int(status.split()[-1])
        return await self._write(write, "pruning the audit log of")

    async def _write(self, fn: Callable[[Any], Awaitable[T]], doing: str) -> T:
        """A write transaction, refused once another manager holds the lease (``epoch``)."""
        async def fenced(conn: Any) -> T:
            async with conn.transaction():
                await check_epoch(conn, self.epoch)
                return await fn(conn)
        return await self._with(fenced, doing)

    async def _with(self, fn: Callable[[Any], Awaitable[T]], doing: str) -> T:
        if self._pool is None:
            raise StoreError(f"store {self.url} is not open")
        try:
            async with self._pool.acquire(timeout=CONNECT_TIMEOUT_S) as conn:
                return await fn(conn)
        except FencedError as exc:
            self.on_fenced(str(exc))
            raise
        except LastAdminError:
            raise
        except _FAILURES as exc:
            raise StoreError(f"store {self.url} failed {doing}: {exc}") from exc


async def _add_outbox(conn: Any, rows: Sequence[OutboxRow]) -> None:
    """Inside the caller's transaction; nothing unless a mirror is active."""
    if not rows or not await conn.fetchval("SELECT v FROM auth_meta WHERE k = 'mirror'"):
        return
    for statement, args in outbox_plan(rows):
        numbered = statement
        for i in range(1, statement.count("?") + 1):
            numbered = numbered.replace("?", f"${i}", 1)
        await conn.execute(numbered, *args)
