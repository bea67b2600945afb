"""The checking half of the live authority: holds every credential in memory, answers token
checks, and keeps itself current.

A token check is one SHA-256 and one lookup in a packed table (``table.py``): the memory
store's own table for ``memory://``, one of the verifier's own for a store on disk. It polls
the store's sequence number so that changes made by the CLI are seen within ``poll_s``, ends
what expires, and writes last-use times behind. Listeners hear of every credential that
changed or ended; they apply it at their edge (closing broker sessions, mirroring to
Mosquitto). Changes are made by ``AuthService``
(``service.py``) through ``_save``, which writes through the ``AuthStore`` before it answers.
It knows nothing of HTTP or MQTT.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Literal

from fleetmq.auth.rules import BROKER_ROLES, Principal, TopicRules
from fleetmq.auth.store import AuditEntry, AuthStore, Credential, MemoryAuthStore, OutboxRow
from fleetmq.auth.table import CredentialTable
from fleetmq.auth.tokens import digest, token_kind
from fleetmq.core.clock import Clock
from fleetmq.errors import StoreError

log = logging.getLogger(__name__)

POLL_S = 0.2
"""How often the store's sequence number is read: a change by the CLI is live within this."""
VERDICTS_KEPT = 65_536
"""Accepting verdicts kept for reuse; past this the memory starts over (each costs ~170 bytes:
a million nodes that all logged in once would otherwise keep one each for good)."""
USE_FLUSH_S = 5.0

Failure = Literal["missing", "malformed", "unknown", "expired", "revoked"]
Listener = Callable[[list[Credential]], None]


@dataclass(frozen=True, slots=True)
class Verdict:
    """What a presented token is: a principal, or why not."""

    principal: Principal | None
    credential: Credential | None = None
    failure: Failure | None = None


def principal_of(c: Credential) -> Principal:
    if c.node_id is not None:
        return Principal("node", c.node_id)
    return Principal("key", c.id, c.role)  # type: ignore[arg-type]  # role checked on create


class Verifier:
    """The credentials this process holds, their checks and their polling; ``AuthService``
    adds the changes."""

    def __init__(self, store: AuthStore, clock: Clock, poll_s: float = POLL_S) -> None:
        self.store = store
        self._clock = clock
        self._poll_s = poll_s
        self._shared = isinstance(store, MemoryAuthStore)
        self._table = store.table if isinstance(store, MemoryAuthStore) else CredentialTable()
        """Every credential known. The memory store's table is this process's only copy, kept
        current by its saves; a store on disk is read into a table of the verifier's own."""
        self._ends: list[tuple[float, str]] = []
        """(end, id) of credentials that will stop working: a heap, checked each poll."""
        self._seq = 0
        self.may_write: Callable[[], bool] = lambda: True
        """False while this manager is not the active one: it follows the store, and ends
        nothing and writes nothing itself (contract section 10)."""
        self.required = False
        """The store requires auth: it has held an admin key (for good)."""
        self._used: dict[int, float] = {}
        """Uses seen since the last flush, by row. ``record_use`` writes them behind without a
        sequence number, so the flush also notes them in the table."""
        self._listeners: list[Listener] = []
        self._first_use: list[Callable[[Credential], None]] = []
        self._seen: set[str] = set()
        """Credentials this process has accepted at least once (first-use hook)."""
        self._verdicts: dict[int, Verdict] = {}
        """The accepting verdict of each credential by row, made once (immutable, shared by its
        requests; good while the row's sequence number is its record's): a Principal and a
        Verdict per request cost ~1 us of the REST gate. At most ``VERDICTS_KEPT``."""
        self._lock = asyncio.Lock()
        """One change at a time: each reads the store's latest state, decides and writes
        while holding it, so two rotations of one node (or an enrollment racing an issue)
        never leave more tokens valid than the rules allow, and an older snapshot is never
        read over a newer one."""
        self._poll_failing = False
        self.generation = 0
        """Moves whenever a credential is written or stops working: a verdict remembered
        under another generation must be checked again (the REST gate's per-connection
        memory)."""

    # --- lifecycle -------------------------------------------------------------------------

    async def load(self) -> None:
        """Read every credential (the store must be open)."""
        changes = await self.store.changes(0)
        self._absorb(changes.credentials, changes.seq, changes.required, notify=False)

    async def run(self) -> None:
        """Poll for changes made elsewhere, end what expires, write last-use times behind."""
        since_flush = 0.0
        while True:
            await asyncio.sleep(self._poll_s)
            try:
                await self.refresh()
                if not self.may_write():
                    continue  # a standby only follows (contract section 10)
                await self._end_due()
                since_flush += self._poll_s
                if since_flush >= USE_FLUSH_S:
                    since_flush = 0.0
                    await self.flush_uses()
            except StoreError as exc:
                if not self._poll_failing:  # once per outage, not five times a second
                    log.warning("auth_poll_failed error=%s (retrying every %g s)", exc,
                                self._poll_s)
                self._poll_failing = True
            except Exception:
                log.exception("auth_poll_failed")
            else:
                if self._poll_failing:
                    log.info("auth_poll_recovered")
                self._poll_failing = False

    async def refresh(self) -> None:
        """Take in what others (the CLI) wrote since the last look."""
        async with self._lock:
            await self._refresh()

    async def _refresh(self) -> None:
        if await self.store.seq() != self._seq:
            changes = await self.store.changes(self._seq)
            self._absorb(changes.credentials, changes.seq, changes.required, notify=True)

    async def flush_uses(self) -> None:
        used, self._used = self._used, {}
        if not used:
            return
        try:
            await self.store.record_use([(self._table.id_of(row), at)
                                         for row, at in used.items()])
        finally:  # known to this process even if the store failed to take them
            for row, at in used.items():
                self._table.note_use(row, at)

    def add_listener(self, listener: Listener) -> None:
        """``listener(credentials)`` hears of every credential written (here or by the CLI)
        and of every one whose expiry, revocation or grace has just passed."""
        self._listeners.append(listener)

    def add_first_use_listener(self, listener: Callable[[Credential], None]) -> None:
        """``listener(credential)`` hears of a credential's first accepted use by this process
        that the store has not recorded yet (a rotated node's new token: the broker mirror
        then switches the broker's password at once instead of at the grace's end)."""
        self._first_use.append(listener)

    # --- checking --------------------------------------------------------------------------

    def verify(self, token: str | None) -> Verdict:
        if not token:
            return Verdict(None, failure="missing")
        if token_kind(token) is None:
            return Verdict(None, failure="malformed")
        # Looked up by the token's SHA-256: what a lookup's timing could tell is how a digest
        # the caller cannot choose compares with stored ones, which leads to no token (the
        # constant-time compare of section 8 is about this: nothing of a token leaks).
        table = self._table
        row = table.row_of_digest(digest(token))
        if row is None:
            return Verdict(None, failure="unknown")
        verdict = self._verdicts.get(row)
        cred = verdict.credential if verdict is not None else None
        if cred is None or cred.seq != table.seq(row):
            verdict, cred = None, table.record(row)
        now = self._now()
        if cred.revoked_at is not None and cred.revoked_at <= now:
            return Verdict(None, cred, "revoked")
        if cred.expires_at is not None and cred.expires_at <= now:
            return Verdict(None, cred, "expired")
        if self._first_use and table.last_used_at(row) is None and cred.id not in self._seen:
            self._seen.add(cred.id)
            for listener in self._first_use:
                try:
                    listener(cred)
                except Exception:
                    log.exception("auth_first_use_listener_failed")
        self._used[row] = now
        if verdict is None:
            if len(self._verdicts) >= VERDICTS_KEPT:
                self._verdicts.clear()
            verdict = self._verdicts[row] = Verdict(principal_of(cred), cred)
        return verdict

    def broker_login(self, rules: TopicRules, username: str | None, password: str | None,
                     client_id: str) -> tuple[Principal, Credential] | str:
        """Section 8's rule for a broker login with a token, on every broker that asks
        fleetmq (the embedded one, the HTTP hooks): the password is a valid token whose
        broker identity is the username, a key has broker rights, and the client id is that
        identity. The principal and credential, or why not: the token's failure, "identity",
        "role" or "client_id"."""
        verdict = self.verify(password)
        principal, cred = verdict.principal, verdict.credential
        if principal is None or cred is None:
            return verdict.failure or "unknown"
        if username != principal.broker_identity:
            return "identity"
        if principal.kind == "key" and principal.role not in BROKER_ROLES:
            return "role"  # broker and enroll keys serve REST only
        if not rules.client_id_allowed(principal, client_id):
            return "client_id"
        return principal, cred

    def remaining_s(self, cred: Credential) -> float:
        """Seconds until the credential stops working (expiry, revocation or the end of its
        grace); infinite if it never does."""
        ends = cred.ends_at()
        return math.inf if ends is None else ends - self._now()

    def credential(self, cred_id: str) -> Credential | None:
        """The record of that id, valid or not; None if this process has not seen it (yet)."""
        return self._table.get(cred_id)

    def valid(self, cred_id: str) -> bool:
        """Whether the credential of that id still works (sessions check it on revocation)."""
        cred = self._table.get(cred_id)
        return cred is not None and cred.valid_at(self._now())

    def last_used_at(self, cred: Credential) -> float | None:
        """The latest use known: by this process, or as the store last said."""
        row = self._table.row_of_id(cred.id)
        held = None if row is None else self._table.last_used_at(row)
        known = [t for t in (cred.last_used_at, held,
                             None if row is None else self._used.get(row)) if t is not None]
        return max(known) if known else None

    def keys(self) -> list[Credential]:
        return sorted((c for c in self._table.unusual() if c.is_key),
                      key=lambda c: (c.created_at, c.id))

    def key(self, key_id: str) -> Credential | None:
        cred = self._table.get(key_id)
        return cred if cred is not None and cred.is_key else None

    def node_credentials(self, node_id: str) -> list[Credential]:
        """The node's credentials that still work, the current one first (one in its grace
        after a rotation ends sooner)."""
        now = self._now()
        return sorted((c for c in self._table.node(node_id) if c.valid_at(now)),
                      key=lambda c: (c.revoked_at is None, c.created_at), reverse=True)

    def held_node_id(self, node_id: str) -> str:
        """The node id string a credential of the node holds, equal to ``node_id``; else
        ``node_id``. The registry keeps it for a new node: one string where there were two."""
        held = self._table.node_id_held(node_id)
        return node_id if held is None else held

    def enrolled_with(self, key_id: str) -> list[Credential]:
        """The node credentials made by enrollment with that key, valid or not."""
        return [c for c in self._table.unusual() if c.enrolled_by == key_id]

    def has_valid_admin(self) -> bool:
        now = self._now()
        return any(c.role == "admin" and c.valid_at(now) for c in self._table.unusual())

    # --- internals -------------------------------------------------------------------------

    async def save(self, credentials: list[Credential], audit: list[AuditEntry]) -> None:
        """Write changed records (a broker mirror flagging ``needs_reissue``) and audit them."""
        async with self._lock:
            await self._save(credentials, audit)

    def credentials(self) -> list[Credential]:
        """Every credential known, valid or not."""
        return list(self._table.records())

    async def _save(self, credentials: list[Credential], audit: list[AuditEntry], *,
                    require: bool = False, keep_admin_at: float | None = None,
                    outbox: list[OutboxRow] | None = None) -> None:
        # Stamped with the sequence number they get if nobody else writes meanwhile: what was
        # saved is then what is held, without reading it back.
        expected = self._seq + 1
        stamped = [c if c.seq == expected else replace(c, seq=expected) for c in credentials]
        seq = await self.store.save(stamped, audit, require=require,
                                    keep_admin_at=keep_admin_at, outbox=outbox or ())
        if seq == expected:  # nobody else wrote meanwhile: what was saved is all
            self._absorb(stamped, seq, self.required or require, notify=True)
        else:
            await self._refresh()

    def _absorb(self, credentials: list[Credential], seq: int, required: bool, *,
                notify: bool) -> None:
        now = self._now()
        fresh: list[Credential] = []
        table = self._table
        for cred in credentials:
            row = table.row_of_id(cred.id)
            if row is not None and table.seq(row) > cred.seq:
                continue  # an older snapshot of it: what is held is newer
            fresh.append(cred)
            if not self._shared:  # the memory store's save has put it already
                row = table.put(cred)  # keeps a later use this process noted, maybe unsaved
            if row is not None:
                self._verdicts.pop(row, None)
            ends = cred.ends_at()
            if ends is not None and ends > now:
                heapq.heappush(self._ends, (ends, cred.id))
        self._seq = max(self._seq, seq)
        self.required = self.required or required
        if fresh:
            self.generation += 1
        if notify and fresh:
            self._tell(fresh)

    async def _end_due(self) -> None:
        """Tell the listeners of every credential whose revocation, grace or expiry has just
        passed; an expiry is also audited (a revocation was, when it was made)."""
        now = self._now()
        ended: dict[str, Credential] = {}
        while self._ends and self._ends[0][0] <= now:
            _, cred_id = heapq.heappop(self._ends)
            cred = self._table.get(cred_id)
            if cred is not None and not cred.valid_at(now):
                ended[cred.id] = cred
        if not ended:
            return
        self.generation += 1
        self._tell(list(ended.values()))
        expired = [c for c in ended.values() if c.expires_at is not None
                   and c.expires_at <= now and (c.revoked_at is None or c.revoked_at > now)]
        for cred in expired:
            log.info("credential_expired identity=%s", cred.broker_identity)
        if expired:
            async with self._lock:
                await self._save([], [AuditEntry(
                    now, "key_expired" if c.is_key else "credential_expired", "manager", None,
                    f"key:{c.id}" if c.is_key else f"node:{c.node_id}") for c in expired])

    def _tell(self, credentials: list[Credential]) -> None:
        for listener in self._listeners:
            try:
                listener(credentials)
            except Exception:
                log.exception("auth_listener_failed")

    def _now(self) -> float:
        return self._clock.now().wall
