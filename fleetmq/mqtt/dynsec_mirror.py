"""The dynsec mirror: keeps Mosquitto 2.0's dynamic security plugin in step with fleetmq's
credentials (contract section 8, "Brokers").

It hears every credential change (``AuthService.add_listener``) and runs ``DynsecOutbox``
(``dynsec_outbox.py``), which turns changes into rows of the store's durable outbox and sends
them, revocations first. On every admin (re)connect it provisions the manager's own clients
(fresh random passwords each start) and reconciles with ``listClients``/``listRoles``, and again
hourly; reconciliation runs in its own task after the manager is ready and never delays
readiness. Only the active manager runs one.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import secrets
from collections.abc import Callable
from dataclasses import replace

from fleetmq.auth.dynsec_acls import (
    DEFAULT_ACCESS,
    MANAGER,
    Wanted,
    drift,
    manager_acls,
    marker,
    role_name,
)
from fleetmq.auth.service import AuthService, on_broker
from fleetmq.auth.store import AuditEntry, Credential
from fleetmq.config import BrokerSettings
from fleetmq.core.clock import Clock
from fleetmq.errors import BrokerError, StoreError
from fleetmq.mqtt.dynsec import DynsecError
from fleetmq.mqtt.dynsec_outbox import IDLE_S, DynsecOutbox

log = logging.getLogger(__name__)

RECONCILE_EVERY_S = 3600.0
MANAGER_WAIT_S = 5.0
"""At start, how long to wait for the manager's own clients before its links try to log in
(they retry with backoff if the broker is not there yet)."""
RETRY_S = 1.0
CONNECTION_CHECK_S = 0.25


class DynsecMirror(DynsecOutbox):
    """Async context manager; ``on_first_use`` is the REST side's hook (``AuthService`` calls
    it on a credential's first accepted use)."""

    def __init__(self, auth: AuthService, admin: BrokerSettings, root: str,
                 manager_logins: dict[str, str], clock: Clock, *,
                 reconcile_every_s: float = RECONCILE_EVERY_S,
                 may_act: Callable[[], bool] = lambda: True) -> None:
        """``manager_logins``: the manager's client ids and this start's passwords;
        ``may_act``: False once this manager is not the active one (nothing more is sent)."""
        super().__init__(auth, admin, root, clock,
                         client_id=f"{next(iter(manager_logins))}-dynsec", may_act=may_act)
        self._managers = dict(manager_logins)
        self._reconcile_every_s = reconcile_every_s
        self._provisioned_for = 0
        self.manager_ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.reconciliations = 0
        """Finished reconciliations (tests and the benchmark wait on it)."""

    async def __aenter__(self) -> DynsecMirror:
        await self.auth.store.set_mirror(True)
        await self.admin.__aenter__()
        self.auth.add_listener(self._changed)
        self.auth.add_first_use_listener(self.on_first_use)
        self._task = asyncio.get_running_loop().create_task(self._run(), name="fleetmq-dynsec")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(MANAGER_WAIT_S):
                await self.manager_ready.wait()
        if not self.manager_ready.is_set():
            log.warning("dynsec_manager_not_provisioned yet=%s: the manager's links retry",
                        self.admin.link.last_error)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.admin.__aexit__(*exc_info)

    def request_reconcile(self) -> None:
        self._reconcile_at = self._clock.now().mono
        self._wake.set()

    # --- the loop -------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            try:
                await self._step()
            except (BrokerError, StoreError) as exc:
                log.warning("dynsec_step_failed error=%s retry_s=%g", exc, RETRY_S)
                await asyncio.sleep(RETRY_S)
            except Exception:
                log.exception("dynsec_step_failed")
                await asyncio.sleep(RETRY_S)

    async def _step(self) -> None:
        # Cleared before the work, not before the sleep: a change that lands while this step
        # runs keeps the event set, so the sleep below returns at once.
        self._wake.clear()
        await self._note_changes()
        if not self.admin.connected:
            await self.admin.wait_connected(IDLE_S)
            return
        if self.admin.connections != self._provisioned_for:
            await self._provision_manager()
            self._provisioned_for = self.admin.connections
            self.request_reconcile()
        wait_s = await self._drain()
        if self._reconcile_at is not None and self._clock.now().mono >= self._reconcile_at:
            await self._reconcile()
            await self._retry_sessions()
            self._reconcile_at = self._clock.now().mono + self._reconcile_every_s
            return
        if self._reconcile_at is not None:
            wait_s = min(wait_s, self._reconcile_at - self._clock.now().mono)
        await self._sleep(min(wait_s, IDLE_S * 60))

    async def _sleep(self, seconds: float) -> None:
        """Until woken, ``seconds`` pass, or the admin connection changes (a reconnect means
        provisioning and reconciliation are due)."""
        connections = self.admin.connections
        deadline = self._clock.now().mono + max(0.0, seconds)
        while self.admin.connections == connections and self.admin.connected:
            left = deadline - self._clock.now().mono
            if left <= 0:
                return
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(left, CONNECTION_CHECK_S)):
                    await self._wake.wait()
                    return

    # --- the manager's own clients ---------------------------------------------------------

    async def _provision_manager(self) -> None:
        await self.admin.set_default_acl_access(DEFAULT_ACCESS)
        await self._ensure_role(MANAGER, manager_acls(self.root))
        for client_id, password in self._managers.items():
            roles = [role_name(self.root, MANAGER)]
            try:
                await self.admin.create_client(client_id, password, clientid=client_id,
                                               roles=roles, textname=marker(self.root))
            except DynsecError as exc:
                if exc.error != "Client already exists":
                    raise
                await self.admin.modify_client(client_id, clientid=client_id, roles=roles,
                                               password=password, textname=marker(self.root))
        self.manager_ready.set()
        log.info("dynsec_manager_provisioned clients=%d", len(self._managers))

    # --- reconciliation -------------------------------------------------------------------

    async def _reconcile(self) -> None:
        started = self._clock.now().mono
        clients = await self.admin.list_clients()
        roles = await self.admin.list_roles()
        pending = {r.identity for r in await self.auth.store.outbox(10_000_000)
                   if r.action == "put"}
        wanted = self._wanted()
        found = drift(self.root, wanted, pending, clients, roles)
        for name in found.delete_clients:
            await self._remove(name)
            await self._between()
        for name in found.delete_roles:
            with contextlib.suppress(DynsecError):
                await self.admin.delete_role(name)
            await self._between()
        for want in found.fix_roles:
            await self._ensure_role(want.role_identity, want.acls)
            await self._between()
        for identity in found.fix_clients:
            await self.admin.modify_client(
                identity, clientid=identity,
                roles=[role_name(self.root, wanted[identity].role_identity)],
                textname=marker(self.root))
            await self._between()
        await self._flag_lost(found.lost)
        self.reconciliations += 1
        log.info("dynsec_reconciled clients=%d deleted=%d fixed=%d lost=%d seconds=%.2f",
                 len(clients), len(found.delete_clients),
                 len(found.fix_roles) + len(found.fix_clients), len(found.lost),
                 self._clock.now().mono - started)

    async def _between(self) -> None:
        """A revocation that arrives mid-reconciliation goes first."""
        if self._ended or self._first_used:
            await self._note_changes()
            await self._drain()

    async def _flag_lost(self, identities: list[str]) -> None:
        now = self._now()
        flagged: list[Credential] = []
        audit: list[AuditEntry] = []
        for identity in identities:
            for cred in self._valid_of(identity):
                if not cred.needs_reissue:
                    flagged.append(replace(cred, needs_reissue=True))
                    subject = (f"node:{cred.node_id}" if cred.node_id is not None
                               else f"key:{cred.id}")
                    audit.append(AuditEntry(now, "needs_reissue", "manager", None, subject))
                    log.warning("dynsec_needs_reissue identity=%s: the broker lost this client "
                                "and fleetmq holds no token to re-create it; issue a new "
                                "credential", identity)
        if flagged:
            await self.auth.save(flagged, audit)

    def _wanted(self) -> dict[str, Wanted]:
        wanted = {cid: Wanted(cid, manager_acls(self.root), MANAGER) for cid in self._managers}
        now = self._now()
        for cred in self.auth.credentials():
            if on_broker(cred) and cred.valid_at(now):
                wanted[cred.broker_identity] = Wanted(cred.broker_identity,
                                                      self._acls(cred.broker_identity))
        return wanted


def manager_logins(client_ids: list[str]) -> dict[str, str]:
    """A fresh random password for each of the manager's connections, for this start only
    (nothing keeps it: the next start provisions new ones through the admin)."""
    return {cid: secrets.token_urlsafe(32) for cid in client_ids}


def login_for(broker: BrokerSettings, logins: dict[str, str], client_id: str) -> BrokerSettings:
    """The broker URL with this connection's own dynsec login (username = client id)."""
    if client_id not in logins:
        return broker
    return dataclasses.replace(broker, username=client_id, password=logins[client_id])
