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
from dataclasses import dataclass, field, replace
from itertools import chain
from typing import Protocol

from fleetmq.errors import StoreError


@dataclass(frozen=True, slots=True)
class Credential:
    """One token's record. ``node_id`` is set for a node credential, ``role`` for a key
    (``read``, ``write``, ``admin``, ``broker`` or ``enroll``)."""

    id: str
    digest: bytes
    created_at: float
    node_id: str | None = None
    role: str | None = None
    name: str = ""
    expires_at: float | None = None
    revoked_at: float | None = None
    """When it stops working: now at a revocation, later while a rotated-out token's grace runs."""
    last_used_at: float | None = field(default=None, compare=False)
    """Bookkeeping written behind, and the one field set in place (``note_use``): not part of
    a record's identity, so neither compared nor hashed."""
    uses: int = 0
    max_uses: int | None = None
    id_pattern: str | None = None
    node_type: str | None = None
    allow_registered: bool = False
    enrolled_by: str | None = None
    """The enroll key's id, for a node credential made by enrollment."""
    broker_hash: str | None = None
    """The token as a Mosquitto password-file hash (for ``credentials export``): the broker
    checks logins itself without fleetmq ever keeping the token."""
    needs_reissue: bool = False
    """The broker mirror (dynsec) lost this credential's client: fleetmq holds no token to
    re-create it, so MQTT logins fail until an admin issues a new credential."""
    seq: int = 0

    @property
    def is_key(self) -> bool:
        return self.node_id is None

    @property
    def broker_identity(self) -> str:
        """The MQTT username and client id: the node id, or ``_key.<id>``."""
        return self.node_id if self.node_id is not None else f"_key.{self.id}"

    def ends_at(self) -> float | None:
        """The earliest of expiry and revocation: from then on the token is refused."""
        ends = [t for t in (self.expires_at, self.revoked_at) if t is not None]
        return min(ends) if ends else None

    def valid_at(self, now: float) -> bool:
        ends = self.ends_at()
        return ends is None or now < ends

    def revoked(self, at: float) -> Credential:
        if self.revoked_at is not None and self.revoked_at <= at:
            return self
        return replace(self, revoked_at=at)


def note_use(cred: Credential, at: float) -> None:
    """Set the record's last use to ``at`` in place if that is later. A use is not a change
    (no sequence number, no listener) and the record's one copy is shared by the memory store
    and the verifier: a dict of last uses beside a million records cost ~86 bytes each."""
    if cred.last_used_at is None or at > cred.last_used_at:
        object.__setattr__(cred, "last_used_at", at)  # frozen for every other field


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

    It keeps the very records it is given when they carry its next sequence number (the
    ``Verifier`` stamps them so), and writes last uses into them: the manager's only copy of a
    credential is then shared by the store and the verifier."""

    url = "memory://"
    keeps_broker_hash = False
    """No other process can read this store, so nobody could export a hash from it."""

    def __init__(self) -> None:
        self._credentials: dict[str, Credential] = {}
        self._audit = PackedAuditLog()
        self._seq = 0
        self._required = False
        self._mirror = False
        self._outbox: list[OutboxRow] = []
        self._outbox_id = 0

    async def open(self) -> None:
        return None

    async def changes(self, since: int) -> AuthChanges:
        return AuthChanges(self._seq, self._required,
                           [c for c in self._credentials.values() if c.seq > since])

    async def seq(self) -> int:
        return self._seq

    async def save(self, credentials: list[Credential], audit: list[AuditEntry], *,
                   require: bool = False, keep_admin_at: float | None = None,
                   outbox: Sequence[OutboxRow] = ()) -> int:
        # Only the changed records are copied: a copy of every credential per save made
        # issuing a million node credentials one by one quadratic.
        seq = self._seq + 1
        changed: dict[str, Credential] = {}
        for c in credentials:
            held = changed.get(c.id) or self._credentials.get(c.id)
            used = _latest(c.last_used_at, None if held is None else held.last_used_at)
            changed[c.id] = c if c.seq == seq and c.last_used_at == used else replace(
                c, seq=seq, last_used_at=used)
        if keep_admin_at is not None and not any(
                c.role == "admin" and c.valid_at(keep_admin_at) for c in chain(
                    changed.values(), (c for c in self._credentials.values()
                                       if c.id not in changed))):
            raise LastAdminError("that would leave no valid admin key")
        self._seq = seq
        self._credentials.update(changed)
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
            c = self._credentials.get(cred_id)
            if c is not None:
                note_use(c, at)

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


def _latest(a: float | None, b: float | None) -> float | None:
    """The later of two last-use times, either of which may be unknown."""
    if a is None or b is None:
        return a if b is None else b
    return max(a, b)
