"""The admin client of Mosquitto 2.0's dynamic security plugin: JSON commands on
``$CONTROL/dynamic-security/v1``, answers matched by ``correlationData``.

It owns one MQTT connection (an ``MqttLink``: reconnect with backoff) logged in as the plugin's
admin, sends one command at a time and waits for its answer with a timeout. It decides nothing
about who may do what: ``dynsec_mirror`` does. Commands carry passwords, so the admin URL must
be loopback or ``mqtts://`` (``check_admin_url``).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
from collections.abc import Callable
from typing import Any

from fleetmq.auth.startup import AuthSetupError, is_loopback
from fleetmq.config import BrokerSettings
from fleetmq.errors import BrokerError
from fleetmq.mqtt.link import MqttLink

log = logging.getLogger(__name__)

CONTROL_TOPIC = "$CONTROL/dynamic-security/v1"
RESPONSE_TOPIC = f"{CONTROL_TOPIC}/response"
COMMAND_TIMEOUT_S = 10.0
"""One command's answer; the plugin rewrites its whole file per command (tens of ms)."""
CONNECT_WAIT_S = 10.0
"""How long a command waits for the admin connection before failing."""
POLL_S = 0.05
PAGE = 1000
"""Clients or roles per listClients/listRoles answer (one MQTT message each)."""

Json = dict[str, Any]
Acl = dict[str, Any]


class DynsecError(BrokerError):
    """The plugin refused a command; ``error`` is its own sentence ("Client not found")."""

    def __init__(self, command: str, error: str) -> None:
        super().__init__(f"dynsec {command} refused: {error}")
        self.command = command
        self.error = error


def check_admin_url(admin: BrokerSettings | None) -> BrokerSettings:
    """The admin login, or AuthSetupError: it must exist, carry a username and password, and
    be loopback or TLS, because every command it sends may carry a password."""
    if admin is None:
        raise AuthSetupError("--broker-auth dynsec needs --broker-admin "
                             "mqtt://ADMIN:PASSWORD@127.0.0.1:PORT (the dynamic security "
                             "plugin's admin; loopback or mqtts:// only)")
    if admin.username is None or admin.password is None:
        raise AuthSetupError(f"--broker-admin {admin.describe()} has no username and password: "
                             "give the plugin admin's, mqtt://ADMIN:PASSWORD@HOST:PORT")
    if admin.scheme == "embedded":
        raise AuthSetupError("--broker-admin must be an mqtt:// or mqtts:// URL")
    if admin.scheme != "mqtts" and not is_loopback(admin.host):
        raise AuthSetupError(
            f"--broker-admin {admin.describe()} is cleartext to {admin.host}, beyond this "
            "machine: dynsec commands carry passwords; use mqtts:// or a loopback address")
    return admin


class DynsecAdmin:
    """Async context manager: connects in the background; ``command`` waits for it."""

    def __init__(self, admin: BrokerSettings, client_id: str, *,
                 monotonic: Callable[[], float],
                 timeout_s: float = COMMAND_TIMEOUT_S,
                 may_act: Callable[[], bool] = lambda: True) -> None:
        """``may_act``: False once the manager is not the active one (contract section 10):
        no command is sent, and the admin's client id is left to the new active."""
        self.link = MqttLink(admin, client_id, subscriptions=[RESPONSE_TOPIC], will=None,
                             keepalive_s=30, prefer_mqtt5=True, monotonic=monotonic,
                             may_act=may_act)
        self._timeout_s = timeout_s
        self._lock = asyncio.Lock()
        self._waiting: dict[str, asyncio.Future[Json]] = {}
        self._ids = itertools.count(1)
        self._prefix = os.urandom(6).hex()
        """Answers to another admin session (or an earlier process) never match ours."""
        self._reader: asyncio.Task[None] | None = None

    async def __aenter__(self) -> DynsecAdmin:
        await self.link.__aenter__()
        self._reader = asyncio.get_running_loop().create_task(
            self._read(), name="fleetmq-dynsec-admin-reader")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        for fut in self._waiting.values():
            if not fut.done():
                fut.set_exception(BrokerError("dynsec admin connection closed"))
        await self.link.__aexit__(*exc_info)

    @property
    def connected(self) -> bool:
        return self.link.connected

    @property
    def connections(self) -> int:
        return self.link.connections

    async def wait_connected(self, timeout_s: float) -> bool:
        # Polled: the link's state-change event has one consumer (the mirror must not steal it).
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                while not self.link.connected:  # noqa: ASYNC110  # see the comment above
                    await asyncio.sleep(POLL_S)
        return self.link.connected

    # --- one command at a time --------------------------------------------------------------

    async def command(self, name: str, **fields: Any) -> Json:
        """Send one command and return its ``data`` (``{}`` if none); DynsecError if the
        plugin answered an error, BrokerError if no answer came within the timeout."""
        async with self._lock:
            if not await self.wait_connected(CONNECT_WAIT_S):
                raise BrokerError(f"dynsec {name}: no admin connection ({self.link.last_error})")
            correlation = f"{self._prefix}-{next(self._ids)}"
            fut: asyncio.Future[Json] = asyncio.get_running_loop().create_future()
            self._waiting[correlation] = fut
            try:
                body = {"commands": [{"command": name, **fields, "correlationData": correlation}]}
                if not self.link.publish(CONTROL_TOPIC, json.dumps(body).encode(), qos=1):
                    raise BrokerError(f"dynsec {name}: admin connection lost")
                try:
                    async with asyncio.timeout(self._timeout_s):
                        answer = await fut
                except TimeoutError:
                    raise BrokerError(f"dynsec {name}: no answer within "
                                      f"{self._timeout_s:g} s") from None
            finally:
                self._waiting.pop(correlation, None)
        if "error" in answer:
            raise DynsecError(name, str(answer["error"]))
        data = answer.get("data")
        return data if isinstance(data, dict) else {}

    async def _read(self) -> None:
        while True:
            await self.link.wait_inbound()
            for msg in self.link.take_inbound(100):
                if msg.topic != RESPONSE_TOPIC:
                    continue
                try:
                    responses = json.loads(msg.payload)["responses"]
                except (ValueError, KeyError, TypeError):
                    log.warning("dynsec_bad_response bytes=%d", len(msg.payload))
                    continue
                for answer in responses if isinstance(responses, list) else ():
                    if not isinstance(answer, dict):  # a malformed item must not end the reader
                        continue
                    fut = self._waiting.get(str(answer.get("correlationData", "")))
                    if fut is not None and not fut.done():
                        fut.set_result(answer)

    # --- the commands fleetmq uses ------------------------------------------------------------

    async def set_default_acl_access(self, acls: list[Acl]) -> None:
        await self.command("setDefaultACLAccess", acls=acls)

    async def create_role(self, rolename: str, acls: list[Acl], textname: str = "") -> None:
        await self.command("createRole", rolename=rolename, textname=textname, acls=acls)

    async def modify_role(self, rolename: str, acls: list[Acl]) -> None:
        await self.command("modifyRole", rolename=rolename, acls=acls)

    async def delete_role(self, rolename: str) -> None:
        await self.command("deleteRole", rolename=rolename)

    async def create_client(self, username: str, password: str, *, clientid: str,
                            roles: list[str], textname: str = "") -> None:
        await self.command("createClient", username=username, password=password,
                           clientid=clientid, textname=textname,
                           roles=[{"rolename": r, "priority": -1} for r in roles])

    async def modify_client(self, username: str, *, clientid: str, roles: list[str],
                            password: str | None = None, textname: str | None = None) -> None:
        """Setting a password or client id kicks the client's live sessions; any group
        membership is removed (fleetmq's clients have their rights from their one role)."""
        fields: Json = {"clientid": clientid, "groups": [],
                        "roles": [{"rolename": r, "priority": -1} for r in roles]}
        if password is not None:
            fields["password"] = password
        if textname is not None:
            fields["textname"] = textname
        await self.command("modifyClient", username=username, **fields)

    async def set_client_password(self, username: str, password: str) -> None:
        await self.command("setClientPassword", username=username, password=password)

    async def delete_client(self, username: str) -> None:
        await self.command("deleteClient", username=username)

    async def disable_client(self, username: str) -> None:
        await self.command("disableClient", username=username)

    async def enable_client(self, username: str) -> None:
        await self.command("enableClient", username=username)

    async def get_client(self, username: str) -> Json:
        client = (await self.command("getClient", username=username)).get("client")
        return client if isinstance(client, dict) else {}

    async def list_clients(self) -> list[Json]:
        """Every client, verbose (username, clientid, textname, roles, disabled), paged."""
        return await self._list("listClients", "clients")

    async def list_roles(self) -> list[Json]:
        """Every role, verbose (rolename, textname, acls), paged."""
        return await self._list("listRoles", "roles")

    async def _list(self, command: str, key: str) -> list[Json]:
        found: list[Json] = []
        while True:
            data = await self.command(command, verbose=True, count=PAGE, offset=len(found))
            page = [c for c in data.get(key, ()) if isinstance(c, dict)]
            found += page
            if len(page) < PAGE or len(found) >= int(data.get("totalCount", 0)):
                return found
