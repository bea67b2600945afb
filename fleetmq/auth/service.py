"""The live authority: checks tokens, makes and revokes credentials, and tells the brokers'
edges when a credential stops working.

It keeps every credential in memory (a token check is one SHA-256 and one dict lookup), writes
every change through the ``AuthStore`` before it answers, and polls the store's sequence number
so that changes made by the CLI are seen within ``poll_s``. Listeners hear of every credential
that changed or ended; they apply it at their edge (closing broker sessions, mirroring to
Mosquitto). It knows nothing of HTTP or MQTT.
"""

from __future__ import annotations

import asyncio
import fnmatch
import heapq
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Literal

from fleetmq.auth.passwords import mosquitto_hash
from fleetmq.auth.rules import BROKER_ROLES, Principal, TopicRules
from fleetmq.auth.store import AuditEntry, AuthStore, Credential, LastAdminError, OutboxRow
from fleetmq.auth.tokens import digest, new_key_id, new_token, token_kind
from fleetmq.core.clock import Clock
from fleetmq.errors import FleetmqError, StoreError

log = logging.getLogger(__name__)

POLL_S = 0.2
"""How often the store's sequence number is read: a change by the CLI is live within this."""
USE_FLUSH_S = 5.0
MAX_VALID_NODE_TOKENS = 2
SELF_ROTATION_GRACE_S = 300.0
"""The longest grace a node may give its old token when it rotates itself: a device switches
at once; a longer one would keep a stolen copy alive."""
MIN_LIFETIME_S = 1.0
KEY_ROLES = ("read", "write", "admin", "broker", "enroll")

Failure = Literal["missing", "malformed", "unknown", "expired", "revoked"]
Listener = Callable[[list[Credential]], None]


class AuthError(FleetmqError):
    """A credential change that cannot be made: ``code`` is the HTTP status to answer."""

    def __init__(self, code: int, title: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.title = title
        self.message = message


@dataclass(frozen=True, slots=True)
class Verdict:
    """What a presented token is: a principal, or why not."""

    principal: Principal | None
    credential: Credential | None = None
    failure: Failure | None = None


def on_broker(c: Credential) -> bool:
    """Whether the credential is a broker login (a node, or a read/write/admin key)."""
    return c.node_id is not None or c.role in BROKER_ROLES


def broker_put(cred: Credential, token: str, not_before: float | None = None) -> list[OutboxRow]:
    """The outbox row that hands a new token to a broker mirror, if one is active (the store
    drops it otherwise): written in the same transaction as the credential, so a credential
    made by the CLI reaches the broker too."""
    if not on_broker(cred):
        return []
    return [OutboxRow(cred.broker_identity, "put", cred.id, token, not_before, cred.created_at)]


def same_type(given: str, allowed: str) -> bool:
    """An enroll key's type matches exactly, or ignoring ASCII case only: Unicode case folding
    would let "\u017fensor" (a long s) pass for "sensor" and be stored as a type of its own."""
    return given == allowed or (given.isascii() and allowed.isascii()
                                and given.lower() == allowed.lower())


def principal_of(c: Credential) -> Principal:
    if c.node_id is not None:
        return Principal("node", c.node_id)
    return Principal("key", c.id, c.role)  # type: ignore[arg-type]  # role checked on create


class AuthService:
    def __init__(self, store: AuthStore, clock: Clock, poll_s: float = POLL_S) -> None:
        self.store = store
        self._clock = clock
        self._poll_s = poll_s
        self._by_digest: dict[bytes, Credential] = {}
        self._by_id: dict[str, Credential] = {}
        self._by_node: dict[str, list[Credential]] = {}
        self._ends: list[tuple[float, str]] = []
        """(end, id) of credentials that will stop working: a heap, checked each poll."""
        self._seq = 0
        self.required = False
        """The store requires auth: it has held an admin key (for good)."""
        self._used: dict[str, float] = {}
        self._last_used: dict[str, float] = {}
        """Uses seen by this process: ``record_use`` writes them behind without a sequence
        number, so the in-memory records would otherwise never show them."""
        self._listeners: list[Listener] = []
        self._first_use: list[Callable[[Credential], None]] = []
        self._seen: set[str] = set()
        """Credentials this process has accepted at least once (first-use hook)."""
        self._verdicts: dict[str, Verdict] = {}
        """The accepting verdict of each credential, made once (immutable, shared by its
        requests): a Principal and a Verdict per request cost ~1 us of the REST gate."""
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
        if used:
            await self.store.record_use(list(used.items()))

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
        cred = self._by_digest.get(digest(token))
        if cred is None:
            return Verdict(None, failure="unknown")
        now = self._now()
        if cred.revoked_at is not None and cred.revoked_at <= now:
            return Verdict(None, cred, "revoked")
        if cred.expires_at is not None and cred.expires_at <= now:
            return Verdict(None, cred, "expired")
        if cred.last_used_at is None and self._first_use and cred.id not in self._seen:
            self._seen.add(cred.id)
            for listener in self._first_use:
                try:
                    listener(cred)
                except Exception:
                    log.exception("auth_first_use_listener_failed")
        self._used[cred.id] = self._last_used[cred.id] = now
        verdict = self._verdicts.get(cred.id)
        if verdict is None or verdict.credential is not cred:
            verdict = self._verdicts[cred.id] = Verdict(principal_of(cred), cred)
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
        return self._by_id.get(cred_id)

    def valid(self, cred_id: str) -> bool:
        """Whether the credential of that id still works (sessions check it on revocation)."""
        cred = self._by_id.get(cred_id)
        return cred is not None and cred.valid_at(self._now())

    def last_used_at(self, cred: Credential) -> float | None:
        """The latest use known: by this process, or as the store last said."""
        seen = self._last_used.get(cred.id)
        if seen is None or (cred.last_used_at is not None and cred.last_used_at > seen):
            return cred.last_used_at
        return seen

    def keys(self) -> list[Credential]:
        return sorted((c for c in self._by_id.values() if c.is_key),
                      key=lambda c: (c.created_at, c.id))

    def key(self, key_id: str) -> Credential | None:
        cred = self._by_id.get(key_id)
        return cred if cred is not None and cred.is_key else None

    def node_credentials(self, node_id: str) -> list[Credential]:
        """The node's credentials that still work, the current one first (one in its grace
        after a rotation ends sooner)."""
        now = self._now()
        return sorted((c for c in self._by_node.get(node_id, ()) if c.valid_at(now)),
                      key=lambda c: (c.revoked_at is None, c.created_at), reverse=True)

    def has_valid_admin(self) -> bool:
        now = self._now()
        return any(c.role == "admin" and c.valid_at(now) for c in self._by_id.values())

    # --- changes (durable when they return) -----------------------------------------------

    async def create_key(self, role: str, *, name: str = "", expires_in_s: float | None = None,
                         max_uses: int | None = None, id_pattern: str | None = None,
                         node_type: str | None = None, allow_registered: bool = False,
                         actor: str, address: str | None = None,
                         token: str | None = None) -> tuple[Credential, str]:
        """A new API key (or enroll key); ``token`` adopts a given one (``--admin-token-file``)."""
        async with self._lock:
            await self._refresh()
            return await self._create_key(role, name=name, expires_in_s=expires_in_s,
                                          max_uses=max_uses, id_pattern=id_pattern,
                                          node_type=node_type,
                                          allow_registered=allow_registered, actor=actor,
                                          address=address, token=token)

    async def _create_key(self, role: str, *, name: str, expires_in_s: float | None,
                          max_uses: int | None, id_pattern: str | None, node_type: str | None,
                          allow_registered: bool, actor: str, address: str | None,
                          token: str | None) -> tuple[Credential, str]:
        if role not in KEY_ROLES:
            raise AuthError(400, "Invalid field", f"Field 'role' must be one of "
                            f"{', '.join(KEY_ROLES)}, not {role[:64]!r}")
        kind = "enr" if role == "enroll" else "key"
        if token is None:
            token = new_token(kind)
        elif token_kind(token) != kind:
            raise AuthError(400, "Invalid token", f"not a well-formed fmq_{kind}_ token")
        now = self._now()
        cred = Credential(
            id=new_key_id(), digest=digest(token), created_at=now, role=role, name=name,
            broker_hash=mosquitto_hash(token),
            expires_at=None if expires_in_s is None else now + expires_in_s,
            max_uses=max_uses, id_pattern=id_pattern, node_type=node_type,
            allow_registered=allow_registered)
        await self._save([cred], [AuditEntry(now, "key_created", actor, address,
                                             f"key:{cred.id} role={role}")],
                         require=role == "admin", outbox=broker_put(cred, token))
        return cred, token

    async def revoke_key(self, key_id: str, *, cascade: bool = False, actor: str,
                         address: str | None = None) -> list[Credential]:
        """Revoke a key (and, with ``cascade``, the node credentials it enrolled). Refuses
        (409) to revoke the last valid admin key."""
        async with self._lock:
            await self._refresh()
            return await self._revoke_key(key_id, cascade=cascade, actor=actor,
                                          address=address)

    async def _revoke_key(self, key_id: str, *, cascade: bool, actor: str,
                          address: str | None) -> list[Credential]:
        cred = self.key(key_id)
        if cred is None:
            raise AuthError(404, "Key not found", f"No API key with ID {key_id[:64]}")
        now = self._now()
        ended = [cred.revoked(now)]
        if cascade:
            ended += [c.revoked(now) for c in self._by_id.values()
                      if c.enrolled_by == key_id and c.valid_at(now)]
        removals = self._removals(ended, now)
        audit = [AuditEntry(now, "key_revoked", actor, address, f"key:{key_id}")]
        audit += [AuditEntry(now, "credential_revoked", actor, address,
                             f"node:{c.node_id} cascade=key:{key_id}") for c in ended[1:]]
        try:
            await self._save(ended, audit, keep_admin_at=now if cred.role == "admin" else None,
                             outbox=removals)
        except LastAdminError:
            raise AuthError(409, "Last admin key",
                            "Revoking the last valid admin key is refused: auth stays on for "
                            "good; create another admin key first") from None
        return ended

    async def issue_credential(self, node_id: str, *, expires_in_s: float | None = None,
                               grace_s: float = 0.0, actor: str, address: str | None = None,
                               enrolled_by: str | None = None,
                               rotated_by: Credential | None = None) -> tuple[Credential, str]:
        """A new token for the node. An older one stays valid for ``grace_s`` more (0: it is
        revoked now); at most two tokens of a node are valid at once.

        ``rotated_by``: the node's own credential, when the node rotates itself. Only its
        current token may (one in its grace was rotated out: whoever still holds it must not
        mint a successor), the new token ends no later than that one (a node renews its
        secret; it cannot outlive what an admin gave it), and the grace is short."""
        async with self._lock:
            await self._refresh()
            if rotated_by is not None:
                current = self.node_credentials(node_id)
                if not current or current[0].id != rotated_by.id \
                        or current[0].revoked_at is not None:
                    raise AuthError(403, "Forbidden", "Only the node's current token may "
                                    "rotate its credential; this one has been rotated out")
                grace_s = min(grace_s, SELF_ROTATION_GRACE_S)
                ends = rotated_by.expires_at
                if ends is not None:
                    left = max(ends - self._now(), MIN_LIFETIME_S)
                    expires_in_s = left if expires_in_s is None else min(expires_in_s, left)
            return await self._issue(node_id, expires_in_s=expires_in_s, grace_s=grace_s,
                                     actor=actor, address=address, enrolled_by=enrolled_by)

    async def _issue(self, node_id: str, *, expires_in_s: float | None, grace_s: float,
                     actor: str, address: str | None,
                     enrolled_by: str | None) -> tuple[Credential, str]:
        now = self._now()
        token = new_token("node")
        cred = Credential(id=new_key_id(), digest=digest(token), created_at=now,
                          node_id=node_id, expires_at=None if expires_in_s is None
                          else now + expires_in_s, enrolled_by=enrolled_by,
                          broker_hash=mosquitto_hash(token))
        older = self.node_credentials(node_id)
        ending: list[Credential] = []
        for index, old in enumerate(older):
            # The current one keeps its grace; any other goes now (two valid at most).
            keeps_grace = index < MAX_VALID_NODE_TOKENS - 1 and grace_s > 0
            end = now + grace_s if keeps_grace else now
            ending.append(old.revoked(end))
        action = "credential_rotated" if older else "credential_issued"
        if enrolled_by is not None:
            action = "enrolled"
        subject = f"node:{node_id}" + (f" grace={grace_s:g}s" if older and grace_s else "")
        # The broker keeps one password per client: it changes when the old token's grace
        # ends (or at the new token's first use). With two older tokens valid (a rotation
        # within a grace) the oldest, the broker's, is revoked now: the switch is at once.
        deferred = now + grace_s if grace_s > 0 and len(older) == 1 else None
        await self._save([*ending, cred], [AuditEntry(now, action, actor, address, subject)],
                         outbox=broker_put(cred, token, deferred))
        return cred, token

    async def revoke_credentials(self, node_id: str, *, actor: str,
                                 address: str | None = None) -> int:
        """Revoke every token of the node; how many still worked."""
        async with self._lock:
            await self._refresh()
            return await self._revoke_node(node_id, actor=actor, address=address)

    async def _revoke_node(self, node_id: str, *, actor: str, address: str | None) -> int:
        now = self._now()
        ended = [c.revoked(now) for c in self.node_credentials(node_id)]
        if ended:
            await self._save(ended, [AuditEntry(now, "credential_revoked", actor, address,
                                                f"node:{node_id}")],
                             outbox=self._removals(ended, now))
        return len(ended)

    async def enroll(self, key: Credential, node_id: str, node_type: str, *, registered: bool,
                     actor: str, address: str | None = None) -> tuple[Credential, str]:
        """A node credential made with an enroll key, within the key's limits. The key's own
        limits are judged first, so a key that may not enroll an id learns nothing of it."""
        async with self._lock:
            await self._refresh()
            current = self.key(key.id)
            return await self._enroll(current or key, node_id, node_type,
                                      registered=registered, actor=actor, address=address)

    async def _enroll(self, key: Credential, node_id: str, node_type: str, *, registered: bool,
                      actor: str, address: str | None) -> tuple[Credential, str]:
        now = self._now()

        def refuse(code: int, title: str, message: str) -> AuthError:
            log.info("enrollment_refused key=%s node_id=%s reason=%s", key.id, node_id, title)
            return AuthError(code, title, message)

        if not key.valid_at(now):
            raise refuse(403, "Forbidden", "This enroll key is no longer valid")
        if key.max_uses is not None and key.uses >= key.max_uses:
            raise refuse(403, "Forbidden", "This enroll key has been used up")
        if key.id_pattern is not None and not fnmatch.fnmatchcase(node_id, key.id_pattern):
            raise refuse(403, "Forbidden",
                         f"Node id {node_id} is outside this enroll key's id pattern")
        if key.node_type is not None and not same_type(node_type, key.node_type):
            raise refuse(403, "Forbidden",
                         f"Node type {node_type[:64]} is outside this enroll key's type")
        if registered and not key.allow_registered:
            raise refuse(403, "Forbidden", f"Node {node_id} is registered already and this "
                         "enroll key does not allow registered ids")
        if self.node_credentials(node_id):
            raise refuse(409, "Already enrolled",
                         f"Node {node_id} already has a credential; an admin can rotate it")
        used = replace(key, uses=key.uses + 1, last_used_at=now)
        token = new_token("node")
        cred = Credential(id=new_key_id(), digest=digest(token), created_at=now,
                          node_id=node_id, enrolled_by=key.id,
                          broker_hash=mosquitto_hash(token))
        await self._save([used, cred], [AuditEntry(now, "enrolled", actor, address,
                                                   f"node:{node_id} key:{key.id}")],
                         outbox=broker_put(cred, token))
        return cred, token

    async def audit(self, action: str, actor: str, address: str | None, subject: str) -> None:
        """An audit entry on its own (a refusal the store should remember)."""
        async with self._lock:
            await self._save([], [AuditEntry(self._now(), action, actor, address, subject)])

    # --- internals -------------------------------------------------------------------------

    async def save(self, credentials: list[Credential], audit: list[AuditEntry]) -> None:
        """Write changed records (a broker mirror flagging ``needs_reissue``) and audit them."""
        async with self._lock:
            await self._save(credentials, audit)

    def credentials(self) -> list[Credential]:
        """Every credential known, valid or not."""
        return list(self._by_id.values())

    async def _save(self, credentials: list[Credential], audit: list[AuditEntry], *,
                    require: bool = False, keep_admin_at: float | None = None,
                    outbox: list[OutboxRow] | None = None) -> None:
        seq = await self.store.save(credentials, audit, require=require,
                                    keep_admin_at=keep_admin_at, outbox=outbox or ())
        if seq == self._seq + 1:  # nobody else wrote meanwhile: what was saved is all
            self._absorb([replace(c, seq=seq) for c in credentials], seq,
                         self.required or require, notify=True)
        else:
            await self._refresh()

    def _removals(self, ended: list[Credential], now: float) -> list[OutboxRow]:
        """Outbox rows that take identities left without a valid token off a broker mirror,
        written with the revocation (so a CLI revocation is durable for the mirror too)."""
        gone = {c.id for c in ended}
        rows: list[OutboxRow] = []
        for c in ended:
            if not on_broker(c) or (c.node_id is not None and any(
                    o.id not in gone for o in self.node_credentials(c.node_id))):
                continue
            rows.append(OutboxRow(c.broker_identity, "remove", c.id, created_at=now))
        return rows

    def _absorb(self, credentials: list[Credential], seq: int, required: bool, *,
                notify: bool) -> None:
        now = self._now()
        fresh: list[Credential] = []
        for cred in credentials:
            old = self._by_id.get(cred.id)
            if old is not None and old.seq > cred.seq:
                continue  # an older snapshot of it: what is held is newer
            fresh.append(cred)
            self._verdicts.pop(cred.id, None)
            if old is not None:
                self._by_digest.pop(old.digest, None)
                siblings = self._by_node.get(old.node_id or "", [])
                if old in siblings:
                    siblings.remove(old)
            self._by_id[cred.id] = cred
            self._by_digest[cred.digest] = cred
            if cred.node_id is not None:
                self._by_node.setdefault(cred.node_id, []).append(cred)
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
            cred = self._by_id.get(cred_id)
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
