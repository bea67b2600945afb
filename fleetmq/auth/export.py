"""Static access control for a plain Mosquitto 2.0 (no plugin): a password file and an
``acl_file`` made from fleetmq's credentials (contract section 8, "Static export").

Pure: it turns credential records into two texts; writing them, and telling the broker to
reload them, is the caller's. The files are a snapshot: Mosquitto re-reads them on SIGHUP, and
even then it never ends a session that is already connected, so a revoked credential stays
connected until that client disconnects. Use ``--broker-auth dynsec`` or the HTTP hooks where
revocation must reach live sessions.

The ACL's ``pattern`` rules name ``%u`` only, never ``%c``: ``%u`` is what the password file
proved, while a client id is whatever the client presents. ``%u`` alone is still not enough:
the broker must run with ``use_username_as_clientid true``, so that a client's id is its
username and no one can take over (kick) another's session by claiming its client id.

The manager logs in as user ``_fleetmq`` (contract section 5: no node id or key identity can
begin with it): ``fleetmq serve --broker mqtt://_fleetmq:PASSWORD@host --broker-auth
external``. Its output connection then logs in as ``_fleetmq-out`` with the same password
(``FleetService``), because under ``use_username_as_clientid`` two connections of one user
would share a client id and kick each other. Pass the password's hash as ``manager_hash``
(``passwords.mosquitto_hash(PASSWORD)``) to have both users written to the password file;
without it both get their rights in the ACL but no password line, and the operator adds them
with ``mosquitto_passwd``.
"""

from __future__ import annotations

from fleetmq.auth.rules import BROKER_ROLES, KEY_IDENTITY_PREFIX, MANAGER_CLIENT_PREFIX
from fleetmq.auth.store import Credential
from fleetmq.config import OUTPUT_USER_SUFFIX
from fleetmq.core.clock import SystemClock
from fleetmq.core.topics import Topics, is_valid_node_id, is_valid_root

MANAGER_USERS = (MANAGER_CLIENT_PREFIX, MANAGER_CLIENT_PREFIX + OUTPUT_USER_SUFFIX)
"""The manager's broker usernames (ingest, output) in an exported password file."""
REQUIRED_BROKER_CONFIG = (
    "allow_anonymous false",
    "use_username_as_clientid true",
)
"""Lines the broker's configuration must hold for the exported ACL to mean what it says."""


def mosquitto_files(credentials: list[Credential], root: str, *,
                    manager_hash: str | None = None,
                    now: float | None = None) -> tuple[str, str]:
    """(password file text, acl file text) for the credentials that are valid ``now``.

    A node with two valid tokens (a rotation's grace) gets the newest one's hash: a password
    file holds one line per user. Credentials without a ``broker_hash`` (made before fleetmq
    kept one) are left out and listed in a comment: their holders need a new token.
    """
    if not is_valid_root(root):
        raise ValueError(f"invalid topic root {root[:64]!r}")
    at = SystemClock().now().wall if now is None else now
    newest: dict[str, Credential] = {}
    missing: list[str] = []
    for cred in credentials:
        if not cred.valid_at(at) or not _has_broker_rights(cred):
            continue
        identity = cred.broker_identity
        if cred.broker_hash is None or not _is_line_safe(cred.broker_hash):
            missing.append(identity)
            continue
        held = newest.get(identity)
        if held is None or (cred.created_at, cred.id) > (held.created_at, held.id):
            newest[identity] = cred
    passwords = [f"{identity}:{newest[identity].broker_hash}" for identity in sorted(newest)]
    if manager_hash is not None:
        if not _is_line_safe(manager_hash):
            raise ValueError("the manager's password hash must be one line without ':'")
        passwords[:0] = [f"{user}:{manager_hash}" for user in MANAGER_USERS]
    keys = sorted((c for c in newest.values() if c.is_key), key=lambda c: c.id)
    return "\n".join(passwords) + "\n" if passwords else "", _acl(root, keys, missing)


def _has_broker_rights(cred: Credential) -> bool:
    if cred.node_id is not None:
        return is_valid_node_id(cred.node_id)  # one topic level, so %u cannot escape it
    return cred.role in BROKER_ROLES


def _is_line_safe(text: str) -> bool:
    return bool(text) and not any(ch in text for ch in ":\n\r\0 ")


def _comment(text: str) -> str:
    """A name made safe inside a comment line: no line break can start a rule of its own."""
    return "".join(ch if ch.isprintable() else "?" for ch in text[:64])


def _acl(root: str, keys: list[Credential], missing: list[str]) -> str:
    t = Topics(root)
    lines = [
        "# fleetmq access control for Mosquitto 2.0 (fleetmq credentials export).",
        "# The broker's configuration must also hold:",
        *(f"#   {line}" for line in REQUIRED_BROKER_CONFIG),
        "# %u is safe only with use_username_as_clientid true: otherwise a client with a",
        "# password of its own could claim another node's client id and take over its session.",
        "# This file is a snapshot: after a revocation, export again and send the broker SIGHUP;",
        "# even then Mosquitto does not end sessions that are already connected.",
    ]
    if missing:
        lines.append("# Left out (no broker password hash kept; issue a new token): "
                     + ", ".join(sorted(missing)))
    lines += [
        "",
        "# Nodes: each speaks only for itself (its username, which is its node id).",
        f"pattern write {t.register('%u')}",
        f"pattern write {t.heartbeat('%u')}",
        f"pattern read {t.reply('%u')}",
        f"pattern read {t.status('%u')}",
        f"pattern read {t.manager_status}",
        "",
        "# The manager (ingest and output connections): reads what agents publish, writes",
        "# statuses, replies and its presence, nowhere outside the root.",
    ]
    for user in MANAGER_USERS:
        lines += [f"user {user}",
                  f"topic read {t.register_filter}",
                  f"topic read {t.heartbeat_filter}",
                  f"topic readwrite {t.status_filter}",
                  f"topic write {t.reply('+')}",
                  f"topic readwrite {t.sync}",
                  ""]
    for key in keys:
        lines += [f"# API key {key.id} ({key.role}{', ' + _comment(key.name) if key.name else ''})",
                  f"user {KEY_IDENTITY_PREFIX}{key.id}",
                  f"topic read {t.status_filter}"]
        if key.role in ("write", "admin"):
            lines += [f"topic write {t.register_filter}",
                      f"topic write {t.heartbeat_filter}",
                      f"topic read {t.reply('+')}"]
        lines.append("")
    return "\n".join(lines) + "\n"
