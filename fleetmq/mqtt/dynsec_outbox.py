"""The dynsec outbox's drain: sends the store's durable outbox rows to Mosquitto 2.0's dynamic
security plugin, one at a time through ``DynsecAdmin``, revocations first (contract section 8,
"Brokers"); a row is deleted only once the broker acknowledged it.

What the hooks note (an ended credential, a first use, a cut-off) is made durable before
anything is sent: rows of the outbox, or a waiting password brought forward. New tokens reach
the outbox from the code that made them, in the same transaction (so the CLI's do too): 2.0's
plugin takes only plaintext passwords, so a token waits there until it is sent.
``DynsecMirror`` (``dynsec_mirror.py``) runs the drain in its loop, beside provisioning and
reconciliation.

Removing an identity (a ``remove`` row: it has no valid credential left) kicks its live
connections first, then discards its persistent session (``session_reset``: Mosquitto keeps
it past disableClient and deleteClient), then deletes the client and its role. A rotation keeps
the session: the new token is the same identity, and its ``put`` only kicks the connection.
A revocation that leaves the identity without a valid token discards it (its ``remove`` row
is written with the revocation), even if a new credential follows before the row is sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from fleetmq.auth.dynsec_acls import key_acls, marker, node_acls, role_name
from fleetmq.auth.service import AuthService, on_broker
from fleetmq.auth.store import Credential, OutboxRow
from fleetmq.config import BrokerSettings
from fleetmq.core.clock import Clock
from fleetmq.mqtt.dynsec import Acl, DynsecAdmin, DynsecError
from fleetmq.mqtt.session_reset import reset_dynsec_session
from fleetmq.tls import broker_context

log = logging.getLogger(__name__)

IDLE_S = 1.0
BATCH = 100
UNKNOWN_RETRY_S = 0.25
"""A put whose credential this manager has not loaded yet (the CLI made it a moment ago) is
retried this often; its row, and the token in it, are kept meanwhile."""
UNKNOWN_GIVE_UP_S = 300.0
ARRIVAL_CHECK_S = 0.05
"""While a removal waits on the broker, how often it looks for new revocations to kick."""
SESSION_RETRY_S = 30.0
"""A session that could not be discarded (the client itself is deleted all the same) is
tried again this much later, through a ``remove`` row of its own ..."""
SESSION_GIVE_UP_S = 3600.0
"""... until this long after the removal was asked for."""


class DynsecOutbox:
    """The outbox and the commands that apply it; ``DynsecMirror`` adds the loop, the
    manager's own clients and reconciliation."""

    def __init__(self, auth: AuthService, admin: BrokerSettings, root: str, clock: Clock, *,
                 client_id: str, may_act: Callable[[], bool] = lambda: True) -> None:
        """``client_id``: the admin connection's own; ``may_act``: see ``DynsecAdmin``."""
        self.auth = auth
        self.root = root
        self.admin = DynsecAdmin(admin, client_id, monotonic=clock.monotonic, may_act=may_act)
        self._broker = admin
        """The broker itself, where a removed identity's session is discarded."""
        self._tls = broker_context(admin)
        self._clock = clock
        self._wake = asyncio.Event()
        self._ended: dict[str, Credential] = {}
        self._session_retries: dict[str, float] = {}
        """Identities whose session discard failed: when their removal was first asked for."""
        self._first_used: set[str] = set()
        self._cuts: dict[str, float] = {}
        """Identities to cut off (a flooding node) and for how long, not yet in the outbox."""
        self._reconcile_at: float | None = None
        """When reconciliation is due (monotonic): a row the plugin refused brings it forward."""
        self.sent = 0

    # --- hooks (synchronous: they only note and wake) ---------------------------------------

    def on_first_use(self, cred: Credential) -> None:
        """A token was accepted for the first time: if its broker password waits for the end
        of a rotation's grace, it is sent now instead."""
        if cred.node_id is not None:
            self._first_used.add(cred.id)
            self._wake.set()

    def _changed(self, credentials: list[Credential]) -> None:
        now = self._now()
        for cred in credentials:
            if on_broker(cred) and not cred.valid_at(now):
                self._ended[cred.id] = cred
        self._wake.set()

    def cut_off(self, identity: str, seconds: float) -> None:
        """Disable a flooding node's client now and enable it again ``seconds`` later (both
        through the durable outbox: a restart in between still lets it back)."""
        self._cuts[identity] = seconds
        self._wake.set()


    # --- the outbox -----------------------------------------------------------------------

    async def _note_changes(self) -> None:
        """Durable first: an ended credential becomes a ``remove`` row (or brings its
        successor's waiting password forward); a first use brings its own forward."""
        ended, self._ended = self._ended, {}
        first, self._first_used = self._first_used, set()
        cuts, self._cuts = self._cuts, {}
        try:
            now = self._now()
            rows: list[OutboxRow] = []
            for identity, seconds in cuts.items():
                rows += [OutboxRow(identity, "disable", created_at=now),
                         OutboxRow(identity, "enable", not_before=now + seconds,
                                   created_at=now)]
            due: list[str] = []
            for cred in ended.values():
                successors = self._valid_of(cred.broker_identity)
                if successors:
                    due += [c.id for c in successors]
                else:
                    rows.append(OutboxRow(cred.broker_identity, "remove", cred.id,
                                          created_at=now))
            due += first
            if rows:
                await self.auth.store.outbox_add(rows)
            if due:
                await self.auth.store.outbox_due(due, now)
        except BaseException:
            self._ended = {**ended, **self._ended}
            self._first_used |= first
            self._cuts = {**cuts, **self._cuts}
            raise

    async def _drain(self) -> float:
        """Send every due row, revocations first; seconds until the next deferred one."""
        while True:
            rows = await self.auth.store.outbox(BATCH)
            now = self._now()
            due = [r for r in rows if r.not_before is None or r.not_before <= now]
            if not due:
                later = [r.not_before - now for r in rows if r.not_before is not None]
                return min(later, default=IDLE_S * 60)
            kicked = await self._kick(due)
            for row in due:
                try:
                    if not await self._send(row, kicked):
                        return UNKNOWN_RETRY_S  # made elsewhere, not loaded yet: kept
                except DynsecError as exc:
                    # The plugin answered and refused: retrying the same row would block every
                    # row behind it. Drop it; reconciliation repairs what it can (an unknown
                    # client is deleted, a lost one flagged needs_reissue).
                    log.error("dynsec_row_refused action=%s identity=%s error=%s", row.action,
                              row.identity, exc.error)
                    self._reconcile_at = self._clock.now().mono
                await self.auth.store.outbox_done([row.id])
                await self._retry_sessions()
                if self._ended or self._first_used:
                    await self._note_changes()
                    break  # a revocation may have arrived: it goes before the rest

    async def _kick(self, rows: list[OutboxRow]) -> dict[str, bool]:
        """Disable every identity these rows remove before any slower work (discarding a
        session, deleting), so each revoked connection closes at once; whether its client
        existed, by identity."""
        kicked: dict[str, bool] = {}
        for row in rows:
            if row.action != "remove" or row.identity in kicked or \
                    not await self._removing(row.identity):
                continue
            try:
                await self.admin.disable_client(row.identity)
                kicked[row.identity] = True
            except DynsecError as exc:
                if exc.error != "Client not found":
                    continue  # its own row tries again, and reports
                kicked[row.identity] = False
        return kicked

    async def _kick_arrivals(self, busy: str) -> None:
        """Between the slower steps of removing ``busy``: a revocation that arrived meanwhile
        is kicked now (its own row does the rest in turn), not after this removal's rewrites."""
        if not self._ended:
            return
        await self._note_changes()
        now = self._now()
        await self._kick([r for r in await self.auth.store.outbox(BATCH)
                          if r.action == "remove" and r.identity != busy
                          and (r.not_before is None or r.not_before <= now)])

    async def _kicking_meanwhile(self, busy: str,
                                 work: Coroutine[Any, Any, str | None]) -> str | None:
        """Await a session discard (two commands and a login, up to its timeout) while
        kicking every revocation that arrives meanwhile, within ``ARRIVAL_CHECK_S``."""
        task = asyncio.get_running_loop().create_task(work, name="fleetmq-dynsec-session")
        try:
            while not task.done():
                await asyncio.wait({task}, timeout=ARRIVAL_CHECK_S)
                await self._kick_arrivals(busy)
            return task.result()
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def _removing(self, identity: str) -> bool:
        """Whether a ``remove`` row still applies: the identity has no valid credential, or it
        has a new one whose ``put`` waits behind the removal (revocations go first), which
        re-creates the client once the old session is gone."""
        if not self._valid_of(identity):
            return True
        now = self._now()
        return any(r.identity == identity and r.action == "put"
                   and (r.not_before is None or r.not_before <= now)
                   for r in await self.auth.store.outbox(10_000_000))

    async def _retry_sessions(self) -> None:
        """A ``remove`` row, due later, for each session that could not be discarded."""
        retries, self._session_retries = self._session_retries, {}
        now = self._now()
        rows: list[OutboxRow] = []
        for identity, since in retries.items():
            if now - since > SESSION_GIVE_UP_S:
                log.error("dynsec_session_given_up identity=%s: its persistent session could "
                          "not be discarded for %g s", identity, SESSION_GIVE_UP_S)
            else:
                rows.append(OutboxRow(identity, "remove", None, not_before=now + SESSION_RETRY_S,
                                      created_at=since))
        try:
            if rows:
                await self.auth.store.outbox_add(rows)
        except BaseException:
            self._session_retries = {**retries, **self._session_retries}
            raise

    async def _send(self, row: OutboxRow, kicked: dict[str, bool]) -> bool:
        """Apply one row; False to keep it for later (its credential, made by the CLI, is not
        known here yet: the token it carries must not be thrown away)."""
        if row.action == "put" and row.cred_id is not None and \
                self.auth.credential(row.cred_id) is None:
            await self.auth.refresh()
            if self.auth.credential(row.cred_id) is None:
                if self._now() - row.created_at < UNKNOWN_GIVE_UP_S:
                    return False
                log.error("dynsec_row_dropped identity=%s: its credential never appeared in "
                          "the store", row.identity)
        if row.action in ("disable", "enable"):
            # Disabling kicks its sessions at once; enabling applies only to a client that
            # still has a credential (a revocation meanwhile removed it).
            if row.action == "disable" or self._valid_of(row.identity):
                try:
                    await (self.admin.disable_client if row.action == "disable"
                           else self.admin.enable_client)(row.identity)
                except DynsecError as exc:
                    if exc.error != "Client not found":
                        raise
                log.info("dynsec_%sd identity=%s", row.action, row.identity)
        elif row.action == "remove":
            if not await self._removing(row.identity):
                return True  # a newer credential's row put it back (and kicked): no removal
            await self._remove(row.identity, kicked.get(row.identity), since=row.created_at)
            log.info("dynsec_removed identity=%s", row.identity)
        elif row.cred_id is not None and row.secret is not None and self.auth.valid(row.cred_id):
            await self._put(row.identity, self._acls(row.identity), row.secret)
            log.info("dynsec_put identity=%s", row.identity)
        self.sent += 1
        return True

    # --- commands -------------------------------------------------------------------------

    async def _ensure_role(self, identity: str, acls: list[Acl]) -> None:
        name = role_name(self.root, identity)
        try:
            await self.admin.create_role(name, acls, marker(self.root))
        except DynsecError as exc:
            if exc.error != "Role already exists":
                raise
            await self.admin.modify_role(name, acls)

    async def _put(self, identity: str, acls: list[Acl], password: str) -> None:
        """Create or update the client and its role; a changed password kicks its sessions."""
        await self._ensure_role(identity, acls)
        roles = [role_name(self.root, identity)]
        try:
            await self.admin.create_client(identity, password, clientid=identity, roles=roles,
                                           textname=marker(self.root))
        except DynsecError as exc:
            if exc.error != "Client already exists":
                raise
            await self.admin.modify_client(identity, clientid=identity, roles=roles,
                                           password=password, textname=marker(self.root))

    async def _remove(self, identity: str, exists: bool | None = None, *,
                      since: float | None = None) -> None:
        """disableClient first (unless ``exists`` says it was done, and whether the client
        was there): 2.0 kicks the live sessions before it rewrites its file (where deleteClient
        kicks after the rewrite, hundreds of ms at 10,000 clients), so a revoked connection
        closes at once. Then its persistent session is discarded (a client that is gone
        already is made again for that: its session may outlive it), and the client and its
        role go. A session not discarded is retried later (``since``: when this removal was
        asked for); the client is deleted all the same."""
        if exists is None:
            exists = True
            try:
                await self.admin.disable_client(identity)
            except DynsecError as exc:
                if exc.error != "Client not found":
                    raise
                exists = False
        why = await self._kicking_meanwhile(identity, reset_dynsec_session(
            self.admin, self._broker, self._tls, identity, exists=exists,
            textname=marker(self.root)))
        if why is not None:
            log.warning("dynsec_session_not_discarded identity=%s error=%s retry_s=%g",
                        identity, why, SESSION_RETRY_S)
            self._session_retries.setdefault(identity, since if since is not None
                                             else self._now())
        await self._kick_arrivals(identity)
        try:
            await self.admin.delete_client(identity)
        except DynsecError as exc:
            if exc.error != "Client not found":
                raise
        await self._kick_arrivals(identity)
        try:
            await self.admin.delete_role(role_name(self.root, identity))
        except DynsecError as exc:
            if exc.error != "Role not found":
                raise

    # --- helpers --------------------------------------------------------------------------

    def _acls(self, identity: str) -> list[Acl]:
        if identity.startswith("_key."):
            key = self.auth.key(identity[len("_key."):])
            return key_acls(self.root, key.role if key is not None and key.role else "read")
        return node_acls(self.root, identity)

    def _valid_of(self, identity: str) -> list[Credential]:
        if identity.startswith("_key."):
            key_id = identity[len("_key."):]
            return [k for k in (self.auth.key(key_id),)
                    if k is not None and self.auth.valid(k.id) and on_broker(k)]
        return self.auth.node_credentials(identity)

    def _now(self) -> float:
        return self._clock.now().wall

