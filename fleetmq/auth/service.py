"""The live authority's changes: makes and revokes API keys and node credentials, enrolls
nodes with enroll keys, and audits.

Each change takes the lock, reads the store's latest state, decides, and is written through the
``AuthStore`` (with the outbox rows a broker mirror needs) before it answers. Checking tokens,
polling the store and telling listeners of changes is ``Verifier``'s (``verifier.py``), which
``AuthService`` extends. It knows nothing of HTTP or MQTT.
"""

from __future__ import annotations

import fnmatch
import logging
from dataclasses import replace

from fleetmq.auth.passwords import mosquitto_hash
from fleetmq.auth.rules import BROKER_ROLES
from fleetmq.auth.store import AuditEntry, Credential, LastAdminError, OutboxRow
from fleetmq.auth.tokens import digest, new_key_id, new_token, token_kind
from fleetmq.auth.verifier import Verifier
from fleetmq.errors import FleetmqError

log = logging.getLogger(__name__)

MAX_VALID_NODE_TOKENS = 2
SELF_ROTATION_GRACE_S = 300.0
"""The longest grace a node may give its old token when it rotates itself: a device switches
at once; a longer one would keep a stolen copy alive."""
MIN_LIFETIME_S = 1.0
KEY_ROLES = ("read", "write", "admin", "broker", "enroll")


class AuthError(FleetmqError):
    """A credential change that cannot be made: ``code`` is the HTTP status to answer."""

    def __init__(self, code: int, title: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.title = title
        self.message = message


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


class AuthService(Verifier):
    """The live authority: ``Verifier``'s checks and polling, and every credential change
    (keys, node credentials, enrollment, audit), durable when it returns."""

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
            broker_hash=self._broker_hash(token),
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
            ended += [c.revoked(now) for c in self.enrolled_with(key_id) if c.valid_at(now)]
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
                          broker_hash=self._broker_hash(token))
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
                          broker_hash=self._broker_hash(token))
        await self._save([used, cred], [AuditEntry(now, "enrolled", actor, address,
                                                   f"node:{node_id} key:{key.id}")],
                         outbox=broker_put(cred, token))
        return cred, token

    async def audit(self, action: str, actor: str, address: str | None, subject: str) -> None:
        """An audit entry on its own (a refusal the store should remember)."""
        async with self._lock:
            await self._save([], [AuditEntry(self._now(), action, actor, address, subject)])

    def _broker_hash(self, token: str) -> str | None:
        """The token's Mosquitto hash for ``credentials export``, if the store keeps one."""
        return mosquitto_hash(token) if self.store.keeps_broker_hash else None

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
