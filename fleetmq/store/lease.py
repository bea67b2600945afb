"""Who is the active manager of a store (contract section 10).

``PostgresLease``: a lease row (holder, epoch, expires_at in the database's time, the active's
advertised URL) renewed every lease / 4, and a session advisory lock on the same connection.
The active acts only until its last successful renewal + lease - 2 s by its own monotonic
clock. A standby takes the lease once ``expires_at`` has passed, or at once when it can take
the advisory lock while the row says its holder has it: the holder's database backend is gone,
so its process died (or lost its connection, which makes it stop acting at once, below).

``FileLease`` (SQLite): the file's lock; a standby on the same host waits for it. It covers a
crashed process, not a paused one (a paused process keeps its lock). ``SoleLease``: the memory
store, whose fleet nobody else can reach.

Fencing: ``check_epoch`` starts every write transaction of a manager holding a lease, and
refuses it (``FencedError``) once the row has another epoch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
from collections.abc import Callable
from typing import Any, Protocol

from fleetmq.errors import FencedError, StoreError

log = logging.getLogger(__name__)

LOCK_KEY = 0x666C6565746D71
"""The session advisory lock of the active manager ("fleetmq"), per database."""
SAFETY_S = 2.0
"""The active stops acting this long before its lease could have expired."""
POLL_S = 0.25
"""How often a standby looks for the lease (a dead holder's lock is seen within this)."""
STATEMENT_TIMEOUT_S = 2.0
"""A lease statement that takes longer counts as failed (the renewal is tried again)."""
CONNECT_TIMEOUT_S = 5.0
IDLE_IN_TRANSACTION_MS = 3000


def server_settings(application: str) -> dict[str, str]:
    """Settings of every connection of a manager to a shared store: the server ends a
    transaction whose client went quiet for 3 s, since a manager paused in the middle of a
    write (SIGSTOP) would hold the lease row's share lock and the takeover would wait for it
    (and a standby paused while taking the lease would hold the row from the active)."""
    return {"application_name": application,
            "idle_in_transaction_session_timeout": str(IDLE_IN_TRANSACTION_MS)}

_ROW = "SELECT holder, epoch, expires_at < now(), advertise_url, locked FROM fleetmq_lease " \
       "WHERE name = 'active'"
_TAKE = (
    "INSERT INTO fleetmq_lease (name, holder, epoch, expires_at, advertise_url, locked) "
    "VALUES ('active', $1, 1, now() + make_interval(secs => $2), $3, $4) "
    "ON CONFLICT (name) DO UPDATE SET holder = EXCLUDED.holder, "
    "epoch = fleetmq_lease.epoch + 1, expires_at = EXCLUDED.expires_at, "
    "advertise_url = EXCLUDED.advertise_url, locked = EXCLUDED.locked "
    "WHERE fleetmq_lease.epoch = $5 "
    "AND (fleetmq_lease.expires_at < now() OR (fleetmq_lease.locked AND $6)) "
    "RETURNING epoch"
)
_WAIT_FOR_WRITERS = "SELECT 1 FROM fleetmq_lease WHERE name = 'active' FOR UPDATE"
"""Taken before the epoch moves: waits for the write transactions the old holder has open
(each holds the row ``FOR KEY SHARE``; a paused one is ended by the server, see
``server_settings``)."""
TAKE_TIMEOUT_S = IDLE_IN_TRANSACTION_MS / 1000 + STATEMENT_TIMEOUT_S
_RENEW = (
    "UPDATE fleetmq_lease SET expires_at = now() + make_interval(secs => $1), locked = $2, "
    "advertise_url = $3 WHERE name = 'active' AND holder = $4 AND epoch = $5 RETURNING epoch"
)


async def check_epoch(conn: Any, epoch: int | None) -> None:
    """First statement of a write transaction: the lease still holds this manager's epoch.
    ``FOR KEY SHARE``: a takeover (which locks the row ``FOR UPDATE`` first) waits for this
    transaction and later ones see the new epoch, while the holder's own renewals (a plain
    ``UPDATE``) do not wait for its writes. None: no lease taken (a CLI command, or tests of
    the store alone)."""
    if epoch is None:
        return
    found = await conn.fetchval(
        "SELECT epoch FROM fleetmq_lease WHERE name = 'active' FOR KEY SHARE")
    if found != epoch:
        raise FencedError(f"the lease is at epoch {found}, not this manager's {epoch}: "
                          "another manager took over; this one steps down")


class Lease(Protocol):
    epoch: int | None
    """The epoch held (None while standby, and for stores without fencing)."""
    active_url: str | None
    """Standby: the active's advertised URL as last read (None if unknown or none)."""
    follows: bool
    """True when a standby keeps the fleet loaded and follows the store meanwhile."""

    @property
    def acting(self) -> bool:
        """True while this manager may expire, publish, write and connect as the active."""

    async def acquire(self) -> bool:
        """One attempt: True when this manager is now the active one."""

    async def hold(self) -> str:
        """Keep the lease until it is lost; returns why (never returns for a sole store)."""

    def lose(self, why: str) -> None:
        """A write was refused by fencing: ``hold`` returns with this reason."""

    async def close(self) -> None: ...


class SoleLease:
    """The memory store: one process, always active."""

    epoch: int | None = None
    active_url: str | None = None
    follows = False
    acting = True

    def __init__(self) -> None:
        self._lost = asyncio.Event()
        self._why = ""

    async def acquire(self) -> bool:
        return True

    async def hold(self) -> str:
        await self._lost.wait()  # no fencing without a lease: only an explicit lose()
        return self._why

    def lose(self, why: str) -> None:
        self._why = why
        self._lost.set()

    async def close(self) -> None:
        return None


class FileLease(SoleLease):
    """SQLite: the store's exclusive lock on its file, held for the process's lifetime."""

    def __init__(self, try_lock: Callable[[], bool]) -> None:
        super().__init__()
        self._try_lock = try_lock

    async def acquire(self) -> bool:
        return self._try_lock()

    async def close(self) -> None:
        return None  # the store lets the lock go when it closes


class PostgresLease:
    """The lease row and the advisory lock, on a connection of their own."""

    follows = True

    def __init__(self, dsn: str, url: str, lease_s: float, advertise_url: str | None,
                 monotonic: Callable[[], float]) -> None:
        self._dsn = dsn
        self.url = url
        self.lease_s = lease_s
        self.advertise_url = advertise_url
        self._monotonic = monotonic
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self._conn: Any = None
        self._locked = False
        self._until = 0.0
        self.epoch: int | None = None
        self.active_url: str | None = None
        self._lost = asyncio.Event()
        self._lost_why = ""
        self._failing = False
        self._warned_unleased = False
        self._connect_timeout_s = min(CONNECT_TIMEOUT_S, (lease_s - SAFETY_S) / 2)
        """A reconnect of the lease's connection must fit in the time the active may act."""

    @property
    def acting(self) -> bool:
        return (self.epoch is not None and not self._lost.is_set()
                and self._monotonic() < self._until)

    # --- the connection ----------------------------------------------------------------------

    async def _connection(self) -> Any:
        conn = self._conn
        if conn is not None and not conn.is_closed():
            return conn
        import asyncpg  # noqa: PLC0415 (the postgres extra; this module is loaded with it)

        self._conn = None
        self._locked = False
        try:
            conn = await asyncpg.connect(self._dsn, timeout=self._connect_timeout_s,
                                         command_timeout=STATEMENT_TIMEOUT_S,
                                         server_settings=server_settings("fleetmq-lease"))
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise StoreError(f"store {self.url}: cannot reach PostgreSQL for the lease: {exc}"
                             ) from exc
        conn.add_termination_listener(self._terminated)
        self._conn = conn
        return conn

    def _terminated(self, _conn: Any) -> None:
        """The lock went with the connection: an active stops acting at once (a standby may
        take over as soon as it sees the lock free)."""
        self._locked = False
        if self.epoch is not None:
            self._lose("the lease connection to PostgreSQL was lost (the advisory lock with it)")

    def _lose(self, why: str) -> None:
        self.active_url = None  # not this one any more; unknown until a standby reads
        if not self._lost.is_set():
            self._lost_why = why
            self._lost.set()

    async def _try_lock(self, conn: Any) -> bool:
        if not self._locked:
            self._locked = bool(await conn.fetchval("SELECT pg_try_advisory_lock($1::bigint)",
                                                    LOCK_KEY))
        return self._locked

    async def _unlock(self, conn: Any) -> None:
        if self._locked:
            await conn.fetchval("SELECT pg_advisory_unlock($1::bigint)", LOCK_KEY)
            self._locked = False

    # --- standby -----------------------------------------------------------------------------

    async def acquire(self) -> bool:
        try:
            taken = await self._acquire()
        except Exception as exc:  # StoreError, asyncpg's: the next attempt reconnects
            if not self._failing:  # once per outage, not four times a second
                log.warning("lease_unavailable store=%s error=%s (trying again every %g s)",
                            self.url, str(exc) or type(exc).__name__, POLL_S)
            self._failing = True
            await self._drop_connection()
            return False
        if self._failing:
            log.info("lease_reachable store=%s", self.url)
            self._failing = False
        return taken

    async def _acquire(self) -> bool:
        conn = await self._connection()
        locked = await self._try_lock(conn)
        row = await conn.fetchrow(_ROW)
        if row is None:
            if not locked:
                # The lock without a lease: a fleetmq from before high availability holds
                # the store, and checks no epoch. Never active beside it.
                if not self._warned_unleased:
                    log.warning("lease_waiting store=%s reason=another fleetmq holds the "
                                "store without a lease (a version before high availability?)"
                                "; this one stays a standby until it stops", self.url)
                    self._warned_unleased = True
                return False
            holder, previous = None, 0
        else:
            holder, epoch, expired, url, holder_locked = row
            self.active_url = url
            if not expired and not (locked and holder_locked):
                # Alive, or paused with its lock: wait. A lock we took from a deposed manager
                # that had kept it goes back, so the active can take it.
                if locked and not holder_locked:
                    await self._unlock(conn)
                return False
            previous = int(epoch)
        started = self._monotonic()
        async with conn.transaction():
            await conn.execute(_WAIT_FOR_WRITERS, timeout=TAKE_TIMEOUT_S)
            epoch = await conn.fetchval(_TAKE, self.holder, self.lease_s, self.advertise_url,
                                        locked, previous, locked, timeout=TAKE_TIMEOUT_S)
        if epoch is None:  # another standby was quicker, or the holder renewed meanwhile
            await self._unlock(conn)
            return False
        self.epoch = int(epoch)
        self._until = started + self.lease_s - SAFETY_S
        self._lost.clear()
        self.active_url = self.advertise_url
        log.info("lease_acquired epoch=%d takeover=%s previous_holder=%s locked=%s",
                 self.epoch, "yes" if holder is not None else "no", holder, locked)
        return True

    def lose(self, why: str) -> None:
        """This manager is not the active one any more (a write was refused): ``hold``
        returns at once."""
        self._lose(why)

    # --- active ------------------------------------------------------------------------------

    async def hold(self) -> str:
        """Renew every lease / 4 until the lease is lost: another holder, the lock's connection
        gone, or no renewal for lease - 2 s."""
        every = self.lease_s / 4
        while True:
            # Awake at the next renewal, or the moment acting ends if renewals keep failing:
            # a lapsed active steps down (and lets go of the broker) at once.
            wait = max(0.0, min(every, self._until - self._monotonic()))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._lost.wait()
            if self._lost.is_set():
                return self._lost_why
            if not self.acting:
                return (f"no lease renewal for {self.lease_s - SAFETY_S:g} s (paused, or cut off "
                        "from PostgreSQL)")
            started = self._monotonic()
            try:
                conn = await self._connection()
                locked = await self._try_lock(conn)
                renewed = await conn.fetchval(_RENEW, self.lease_s, locked, self.advertise_url,
                                              self.holder, self.epoch)
            except Exception as exc:
                log.warning("lease_renewal_failed epoch=%s error=%s", self.epoch,
                            str(exc) or type(exc).__name__)  # a timeout says nothing else
                continue
            if renewed is None:
                return "another manager holds the lease now"
            if self._monotonic() - started < self.lease_s - SAFETY_S:
                self._until = started + self.lease_s - SAFETY_S

    # --- plumbing ----------------------------------------------------------------------------

    async def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        self._locked = False
        if conn is not None:
            conn.terminate()

    async def close(self) -> None:
        """Let the lock go (a standby takes over at once when this one ends)."""
        self.epoch = None
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.remove_termination_listener(self._terminated)
            try:
                await asyncio.wait_for(conn.close(timeout=CONNECT_TIMEOUT_S), CONNECT_TIMEOUT_S)
            except Exception:  # closing a broken connection: nothing to keep
                conn.terminate()


