"""What each identity may do, written as Mosquitto 2.0 dynamic-security roles (contract
section 8, "Topic rules"), and how a broker's clients and roles differ from what they should be.

Pure: no I/O, no clock. 2.0 has no ``%u``/``%c`` in role ACLs, so every identity gets a role of
its own naming its own topics. Receiving is denied by default, so every subscription right is
paired with the matching ``publishClientReceive``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

Acl = dict[str, Any]

DEFAULT_ACCESS: list[Acl] = [
    {"acltype": "publishClientSend", "allow": False},
    {"acltype": "publishClientReceive", "allow": False},
    {"acltype": "subscribe", "allow": False},
    {"acltype": "unsubscribe", "allow": True},
]
"""Anything no role grants is refused, sending and receiving alike."""

MANAGER = "_manager"
"""The manager's role's identity part (its two clients share that role)."""


def marker(root: str) -> str:
    """The ``textname`` of every client and role fleetmq made for this root: reconciliation
    touches only those (the plugin's admin and anything an operator made are left alone)."""
    return f"fleetmq {root}"


def role_name(root: str, identity: str) -> str:
    return f"fleetmq:{root}:{identity}"


def _acl(acltype: str, topic: str) -> Acl:
    return {"acltype": acltype, "topic": topic, "priority": 0, "allow": True}


def _read(topics: Iterable[str], subscribe: str) -> list[Acl]:
    acls: list[Acl] = []
    for topic in topics:
        acls += [_acl(subscribe, topic), _acl("publishClientReceive", topic)]
    return acls


def node_acls(root: str, node_id: str) -> list[Acl]:
    """Publish its own register and heartbeat (its will too); read its reply and status and
    the manager's status. Literal subscriptions only: no filter can widen them."""
    own = f"{root}/{node_id}"
    return [_acl("publishClientSend", f"{own}/register"),
            _acl("publishClientSend", f"{own}/heartbeat"),
            *_read([f"{own}/reply", f"{own}/status", f"{root}/{MANAGER}/status"],
                   "subscribeLiteral")]


def key_acls(root: str, role: str) -> list[Acl]:
    """read: every status; write and admin: also any node's register and heartbeat, and the
    replies. ``broker`` and ``enroll`` keys have no broker login (no role is made)."""
    acls = _read([f"{root}/+/status"], "subscribePattern")
    if role in ("write", "admin"):
        acls += [_acl("publishClientSend", f"{root}/+/register"),
                 _acl("publishClientSend", f"{root}/+/heartbeat")]
        acls += _read([f"{root}/+/reply"], "subscribePattern")
    return acls


def manager_acls(root: str) -> list[Acl]:
    """Exactly what the manager's two connections need, and nothing outside ``<root>/``."""
    return [_acl("publishClientSend", f"{root}/+/status"),
            _acl("publishClientSend", f"{root}/+/reply"),
            _acl("publishClientSend", f"{root}/{MANAGER}/#"),
            *_read([f"{root}/+/register", f"{root}/+/heartbeat", f"{root}/+/status",
                    f"{root}/{MANAGER}/sync"], "subscribePattern")]


def acl_set(acls: Iterable[Mapping[str, Any]]) -> frozenset[tuple[str, str, bool]]:
    """ACLs compared as the plugin lists them (priorities aside)."""
    return frozenset((str(a.get("acltype", "")).lower(), str(a.get("topic", "")),
                      bool(a.get("allow", False))) for a in acls)


@dataclass(frozen=True, slots=True)
class Wanted:
    """One identity as the broker should hold it."""

    identity: str
    acls: list[Acl]
    role: str = ""
    """The identity part of its role's name: its own, or ``_manager`` for the manager's
    connections (they share one role)."""

    @property
    def role_identity(self) -> str:
        return self.role or self.identity


@dataclass(slots=True)
class Drift:
    """What reconciliation found: clients and roles to delete, identities to fix, identities
    the broker lost (fleetmq holds no token to re-create them)."""

    delete_clients: list[str] = field(default_factory=list)
    delete_roles: list[str] = field(default_factory=list)
    fix_roles: list[Wanted] = field(default_factory=list)
    fix_clients: list[str] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)


def drift(root: str, wanted: Mapping[str, Wanted], pending: set[str],
          clients: list[dict[str, Any]], roles: list[dict[str, Any]]) -> Drift:
    """Compare the broker's verbose ``listClients``/``listRoles`` with what fleetmq wants.
    ``pending`` identities have a ``put`` waiting in the outbox: neither lost nor unknown."""
    found = Drift()
    mark = marker(root)
    by_name = {str(c.get("username")): c for c in clients}
    roles_by_name = {str(r.get("rolename")): r for r in roles}
    for name, listed in by_name.items():
        if listed.get("textname") == mark and name not in wanted and name not in pending:
            found.delete_clients.append(name)
    wanted_roles = {role_name(root, w.role_identity) for w in wanted.values()}
    wanted_roles |= {role_name(root, p) for p in pending}
    for name, role in roles_by_name.items():
        if role.get("textname") == mark and name not in wanted_roles:
            found.delete_roles.append(name)
    for identity, want in wanted.items():
        if (client := by_name.get(identity)) is None:
            if identity not in pending:
                found.lost.append(identity)
            continue
        rname = role_name(root, want.role_identity)
        held = roles_by_name.get(rname)
        if held is None or acl_set(held.get("acls", ())) != acl_set(want.acls):
            found.fix_roles.append(want)
        client_roles = [str(r.get("rolename")) for r in client.get("roles", ())]
        if (client.get("clientid") != identity or client_roles != [rname]
                or client.get("textname") != mark or client.get("groups")):
            found.fix_clients.append(identity)
    return found
