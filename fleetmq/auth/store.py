"""What access control keeps: credentials (API keys, enroll keys, node tokens), the audit log,
and the store protocol every backend (memory, SQLite, PostgreSQL) implements.

A store keeps SHA-256 digests, never tokens. Every change bumps one sequence number, and each
changed row carries it, so a running manager polls one integer and reloads only what changed
(the CLI writes to the same store while the manager runs). It decides nothing: ``AuthService``
does.
"""

from __future__ import annotations

from array import array
from bisect import bisect_left
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from itertools import chain
from typing import Protocol

# Credential is re-exported: every store and route imports it from here.
from fleetmq.auth.credential import Credential as Credential  # noqa: PLC0414
from fleetmq.auth.table import CredentialTable
from fleetmq.errors import StoreError

CREDENTIAL_COLUMNS: tuple[str, ...] = (
    "id", "digest", "created_at", "node_id", "role", "name", "expires_at", "revoked_at",
    "last_used_at", "uses", "max_uses", "id_pattern", "node_type", "allow_registered",
    "enrolled_by", "broker_hash", "needs_reissue", "seq",
)
"""The order of a credential row, in every SQL store (the dataclass's field order)."""


def credential_from_row(row: tuple[object, ...]) -> Credential:
    values = list(row)
    values[1] = bytes(values[1])  # type: ignore[call-overload]  # BLOB/bytea: bytes or memoryview
    values[13] = bool(values[13])
    values[16] = bool(values[16])
    return Credential(*values)  # type: ignore[arg-type]  # columns in field order


def credential_row(c: Credential) -> tuple[object, ...]:
    return (c.id, c.digest, c.created_at, c.node_id, c.role, c.name, c.expires_at,
            c.revoked_at, c.last_used_at, c.uses, c.max_uses, c.id_pattern, c.node_type,
            int(c.allow_registered), c.enrolled_by, c.broker_hash, int(c.needs_reissue), c.seq)


@dataclass(frozen=True, slots=True)
class AuditEntry:
    at: float
    action: str
    """``key_created``, ``key_revoked``, ``credential_issued``, ``credential_rotated``,
    ``credential_revoked``, ``credential_expired``, ``key_expired``, ``enrolled``,
    ``needs_reissue``, ``enrollment_refused``..."""
    actor: str
    """``key:<id>``, ``node:<id>``, ``cli`` or ``manager``."""
    address: str | None
    subject: str
    id: int = 0


@dataclass(frozen=True, slots=True)
class OutboxRow:
    """One pending change for a broker mirror (dynsec), durable until the broker
    acknowledged it. ``put`` gives ``identity`` the token ``secret`` of credential
    ``cred_id`` (the only place a token is ever kept, and only until it is sent: 2.0's plugin
    takes plaintext passwords only); ``remove`` deletes the identity from the broker;
    ``disable`` and ``enable`` cut a flooding node off and let it back. A row waits until
    ``not_before`` when set (a rotation's grace, the end of a cut-off)."""

    identity: str
    action: str
    cred_id: str | None = None
    secret: str | None = None
    not_before: float | None = None
    created_at: float = 0.0
    id: int = 0


OUTBOX_COLUMNS = ("identity", "action", "cred_id", "secret", "not_before", "created_at")
OUTBOX_ORDER = "ORDER BY (action = 'remove') DESC, COALESCE(not_before, 0), id"
"""Revocations first, then what is due in the order written, then what waits (a rotation's
grace) by when it is due: a batch never fills with waiting rows while due ones queue."""


def outbox_plan(rows: Sequence[OutboxRow]) -> list[tuple[str, tuple[object, ...]]]:
    """The statements (``?`` placeholders) that add ``rows``: a newer ``put`` supersedes the
    identity's older ones (their tokens are gone at once); a ``remove`` drops the pending
    ``put`` of the credential it ends, and is not added twice for one identity (the pending
    one keeps its place in the order; a retry the mirror deferred, ``not_before`` set, does
    not count: a new revocation must not wait for it)."""
    plan: list[tuple[str, tuple[object, ...]]] = []
    insert = (f"INSERT INTO broker_outbox ({', '.join(OUTBOX_COLUMNS)}) "
              "SELECT ?, ?, ?, ?, ?, ?")
    for r in rows:
        values = (r.identity, r.action, r.cred_id, r.secret, r.not_before, r.created_at)
        if r.action == "put":
            plan.append(("DELETE FROM broker_outbox WHERE identity = ? AND action = 'put'",
                         (r.identity,)))
            plan.append((insert, values))
        elif r.action in ("disable", "enable"):  # a flooding node's cut-off and its end
            plan.append((insert, values))
        else:
            plan.append(("DELETE FROM broker_outbox WHERE identity = ? AND action = 'put' "
                         "AND cred_id = ?", (r.identity, r.cred_id)))
            plan.append((f"{insert} WHERE NOT EXISTS (SELECT 1 FROM broker_outbox WHERE "
                         "identity = ? AND action = 'remove' AND not_before IS NULL)",
                         (*values, r.identity)))
    return plan


@dataclass(frozen=True, slots=True)
class AuthChanges:
    seq: int
    required: bool
    credentials: list[Credential]
    """Every credential whose row changed after the ``since`` asked for."""


class LastAdminError(StoreError):
    """The change would leave no valid admin key: refused (auth stays on for good)."""


class AuthStore(Protocol):
    """Where credentials live; each method may raise ``StoreError``. Opening takes no lock:
    the CLI manages keys in the store of a running manager."""

    url: str
    keeps_broker_hash: bool
    """Whether credentials made for this store carry a ``broker_hash``: only a store that
    another process can read (``fleetmq credentials export``) has a use for one."""

    async def open(self) -> None:
        """Connect and create the access-control tables if they are missing."""

    async def changes(self, since: int) -> AuthChanges:
        """The sequence number now, whether auth is required, and the credentials written
        after ``since`` (all of them for 0)."""

    async def seq(self) -> int:
        """The sequence number now: one cheap read, polled by the manager."""

    async def save(self, credentials: list[Credential], audit: list[AuditEntry], *,
                   require: bool = False, keep_admin_at: float | None = None,
                   outbox: Sequence[OutboxRow] = ()) -> int:
        """Write the rows and the audit entries in one transaction under a new sequence
        number (returned); ``require`` marks the store as requiring auth from now on.
        With ``keep_admin_at``, raise ``LastAdminError`` (and write nothing) if no admin
        key would still be valid at that moment. ``outbox`` rows are written in the same
        transaction if a broker mirror is active, and dropped otherwise."""

    async def set_mirror(self, active: bool) -> None:
        """Record whether a broker mirror runs; inactive also empties the outbox (no token
        waits for a mirror that will not come)."""

    async def outbox_add(self, rows: Sequence[OutboxRow]) -> None:
        """Add rows (if a mirror is active), superseding as ``outbox_plan`` says."""

    async def outbox(self, limit: int) -> list[OutboxRow]:
        """Pending rows, revocations first."""

    async def outbox_done(self, ids: Sequence[int]) -> None:
        """Delete rows the broker acknowledged (or that no longer apply)."""

    async def outbox_due(self, cred_ids: Sequence[str], at: float) -> int:
        """Bring the waiting ``put`` of these credentials forward to ``at``; how many moved."""

    async def record_use(self, used: list[tuple[str, float]]) -> None:
        """Set ``last_used_at`` (id, moment) without a new sequence number: bookkeeping,
        written behind."""

    async def audit(self, limit: int, before: int | None) -> list[AuditEntry]:
        """Newest first, ids below ``before`` when given."""

    async def prune_audit(self, older_than: float) -> int: ...

    async def close(self) -> None: ...


class MemoryAuthStore:
    """``memory://``: nothing survives the process (auth then needs ``--admin-token-file``).

    Its credentials are a packed table (``table``), which the ``Verifier`` of this store reads
    instead of keeping its own: the manager's only copy of a credential."""

    url = "memory://"
    keeps_broker_hash = False
    """No other process can read this store, so nobody could export a hash from it."""

    def __init__(self) -> None:
        self.table = CredentialTable()
        self._audit = PackedAuditLog()
        self._seq = 0
        self._required = False
        self._mirror = False
        self._outbox: list[OutboxRow] = []
        self._outbox_id = 0

    async def open(self) -> None:
        return None

    async def changes(self, since: int) -> AuthChanges:
        return AuthChanges(self._seq, self._required, self.table.since(since))

    async def seq(self) -> int:
        return self._seq

    async def save(self, credentials: list[Credential], audit: list[AuditEntry], *,
                   require: bool = False, keep_admin_at: float | None = None,
                   outbox: Sequence[OutboxRow] = ()) -> int:
        seq = self._seq + 1
        changed = {c.id: c if c.seq == seq else replace(c, seq=seq) for c in credentials}
        if keep_admin_at is not None and not any(
                c.role == "admin" and c.valid_at(keep_admin_at) for c in chain(
                    changed.values(), (c for c in self.table.unusual()
                                       if c.id not in changed))):
            raise LastAdminError("that would leave no valid admin key")
        self._seq = seq
        for c in changed.values():
            self.table.put(c)  # keeps the later of its last use and the one held
        self._required = self._required or require
        self._audit.append(audit, {s: s for c in changed.values()
                                   for s in (c.id, c.node_id) if s is not None})
        await self.outbox_add(outbox)
        return self._seq

    async def set_mirror(self, active: bool) -> None:
        self._mirror = active
        if not active:
            self._outbox = []

    async def outbox_add(self, rows: Sequence[OutboxRow]) -> None:
        if not self._mirror:
            return
        for r in rows:
            if r.action == "put":
                self._outbox = [o for o in self._outbox
                                if not (o.identity == r.identity and o.action == "put")]
            elif r.action in ("disable", "enable"):
                pass
            else:
                self._outbox = [o for o in self._outbox if not (
                    o.identity == r.identity and o.action == "put" and o.cred_id == r.cred_id)]
                if any(o.identity == r.identity and o.action == "remove"
                       and o.not_before is None for o in self._outbox):
                    continue
            self._outbox_id += 1
            self._outbox.append(replace(r, id=self._outbox_id))

    async def outbox(self, limit: int) -> list[OutboxRow]:
        return sorted(self._outbox, key=lambda o: (o.action != "remove", o.not_before or 0,
                                                   o.id))[:limit]

    async def outbox_done(self, ids: Sequence[int]) -> None:
        gone = set(ids)
        self._outbox = [o for o in self._outbox if o.id not in gone]

    async def outbox_due(self, cred_ids: Sequence[str], at: float) -> int:
        moved = 0
        for i, o in enumerate(self._outbox):
            if o.action == "put" and o.cred_id in cred_ids and (
                    o.not_before is not None and o.not_before > at):
                self._outbox[i] = replace(o, not_before=at)
                moved += 1
        return moved

    async def record_use(self, used: list[tuple[str, float]]) -> None:
        for cred_id, at in used:
            row = self.table.row_of_id(cred_id)
            if row is not None:
                self.table.note_use(row, at)

    async def audit(self, limit: int, before: int | None) -> list[AuditEntry]:
        return self._audit.newest(limit, before)

    async def prune_audit(self, older_than: float) -> int:
        return self._audit.prune(older_than)

    async def close(self) -> None:
        return None


CONTEXTS_KEPT = 4096
"""Distinct contexts remembered for sharing; past this the memory starts over (entries keep
theirs). Many arise only when actors or addresses vary, e.g. enrollments from many devices."""

_Context = tuple[str, str, str | None, str]
"""(action, actor, address, the subject up to and with its first colon)."""


class PackedAuditLog:
    """The ``memory://`` store's audit log, packed: a million ``credential_issued`` entries
    cost ~180 bytes each as records (an object, an id, a ``node:<id>`` subject, a float) and
    ~35 here. Ids only grow (contract section 11: one store never gives an id twice, pruned
    or not).

    An entry is a moment and an id in arrays of machine numbers, a context shared by every
    entry with the same action, actor, address and subject kind (``node:``, ``key:``...), and
    the rest of its subject, which is the very string of the credential saved with it when
    there is one (the node id its record already holds). Entries are rebuilt when read."""

    def __init__(self) -> None:
        self._at = array("d")
        self._ids = array("q")
        self._contexts: list[_Context] = []
        self._rests: list[str] = []
        self._shared: dict[_Context, _Context] = {}
        self._last_id = 0

    def append(self, entries: Iterable[AuditEntry], names: Mapping[str, str]) -> None:
        """Add entries; ``names`` maps a string to an equal one already held (the ids and
        node ids of the credentials saved with them), to be kept instead of a copy."""
        for e in entries:
            head, colon, rest = e.subject.partition(":")
            if not colon:
                head, rest = "", e.subject
            context = (e.action, e.actor, e.address, head + colon)
            shared = self._shared.get(context)
            if shared is None:
                if len(self._shared) >= CONTEXTS_KEPT:
                    self._shared.clear()
                shared = self._shared[context] = context
            self._last_id += 1
            self._at.append(e.at)
            self._ids.append(self._last_id)
            self._contexts.append(shared)
            self._rests.append(names.get(rest, rest))

    def newest(self, limit: int, before: int | None) -> list[AuditEntry]:
        """Newest first, ids below ``before`` when given."""
        end = len(self._ids) if before is None else bisect_left(self._ids, before)
        return [self._entry(i) for i in range(end - 1, max(end - limit, 0) - 1, -1)]

    def prune(self, older_than: float) -> int:
        """Drop the entries before ``older_than``; how many were dropped."""
        kept = [i for i, at in enumerate(self._at) if at >= older_than]
        dropped = len(self._ids) - len(kept)
        if dropped:
            self._at = array("d", (self._at[i] for i in kept))
            self._ids = array("q", (self._ids[i] for i in kept))
            self._contexts = [self._contexts[i] for i in kept]
            self._rests = [self._rests[i] for i in kept]
        return dropped

    def _entry(self, i: int) -> AuditEntry:
        action, actor, address, head = self._contexts[i]
        return AuditEntry(self._at[i], action, actor, address, head + self._rests[i],
                          self._ids[i])
