"""``fleetmq credentials issue|show|revoke|export``: node credentials, straight in the store.

``issue`` provisions a node before its first boot (or rotates its token) and prints the token
alone; ``export --format mosquitto`` writes a static password file and ACL for a Mosquitto
without fleetmq's plugins or hooks, which cannot end sessions already connected.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import orjson

from fleetmq.auth.export import mosquitto_files
from fleetmq.auth.passwords import mosquitto_hash
from fleetmq.auth.service import AuthService
from fleetmq.auth.store import Credential
from fleetmq.cli import env_name
from fleetmq.commands import table
from fleetmq.commands.authstore import (
    ACTOR,
    CommandError,
    add_store_option,
    duration,
    subcommands,
    when,
    with_auth,
)
from fleetmq.config import DEFAULT_STORE
from fleetmq.core.topics import is_valid_node_id, is_valid_root
from fleetmq.errors import ConfigError
from fleetmq.http.access_models import MAX_GRACE_S, credential_issued

HEADERS = ("ID", "CREATED", "LAST USED", "EXPIRES", "VALID UNTIL", "ENROLLED BY",
           "NEEDS REISSUE")
NO_LIVE_REVOCATION = (
    "note: a static password file cannot end sessions that are already connected: after a "
    "revocation, export again, reload Mosquitto (SIGHUP) and disconnect the client; use "
    "--broker-auth dynsec or the HTTP hooks where revocation must reach live sessions\n")


def add_command(subparsers: Any, env: Mapping[str, str]) -> None:
    parser = subparsers.add_parser(
        "credentials", help="issue, show, revoke and export node credentials (in the store)",
        description="Manage node credentials in the manager's store. Works while the manager "
                    f"runs: it sees the change within 250 ms. (default store: {DEFAULT_STORE})")
    actions = subcommands(parser)

    issue = actions.add_parser("issue", help="issue (or rotate) a node's token; print it alone")
    issue.add_argument("id", metavar="ID", help="the node id (it need not be registered yet)")
    issue.add_argument("--expires", metavar="DURATION", type=duration("--expires"),
                       help="lifetime: seconds or 90m, 12h, 30d (default: never)")
    issue.add_argument("--grace", metavar="DURATION", type=duration("--grace"),
                       help="on rotation, how long the previous token keeps working "
                            "(default: 0, revoked now; at most 30d)")
    issue.add_argument("--json", action="store_true",
                       help="print the REST answer (token, MQTT login, times) as JSON")
    add_store_option(issue, env)
    issue.set_defaults(run=run_issue)

    show = actions.add_parser("show", help="a node's credentials (never a token)")
    show.add_argument("id", metavar="ID")
    add_store_option(show, env)
    show.set_defaults(run=run_show)

    revoke = actions.add_parser("revoke", help="revoke every token of a node at once")
    revoke.add_argument("id", metavar="ID")
    add_store_option(revoke, env)
    revoke.set_defaults(run=run_revoke)

    export = actions.add_parser(
        "export", help="write a Mosquitto password file and ACL from the valid credentials")
    export.add_argument("--format", required=True, choices=("mosquitto",))
    export.add_argument("--out", metavar="DIR", required=True,
                        help="directory for 'passwords' (mode 0600) and 'acl'")
    var = env_name("--topic-root")
    export.add_argument("--topic-root", default=env.get(var) or "fleet",
                        help=f"first MQTT topic level (default: fleet) [env: {var}]")
    export.add_argument("--manager-password-file", metavar="FILE",
                        help="a file holding the password the manager will log in with (users "
                             "_fleetmq and _fleetmq-out: run serve with --broker "
                             "mqtt://_fleetmq:PASSWORD@host); without it, add them yourself "
                             "with mosquitto_passwd")
    add_store_option(export, env)
    export.set_defaults(run=run_export)


def _node_id(text: str) -> str:
    if not is_valid_node_id(text):
        raise ConfigError(f"{text[:64]!r} is not a valid node id: use 1 to 128 letters, "
                          "digits and '._:-', starting with a letter or digit")
    return text


def run_issue(args: argparse.Namespace) -> int:
    node_id = _node_id(args.id)
    grace = args.grace or 0.0
    if grace > MAX_GRACE_S:
        raise ConfigError(f"--grace {args.grace:g}s is over 30 days: a rotated-out token "
                          "should stop working soon")

    async def issue(auth: AuthService) -> tuple[Credential, str]:
        return await auth.issue_credential(node_id, expires_in_s=args.expires, grace_s=grace,
                                           actor=ACTOR)

    cred, token = with_auth(args, issue)
    if args.json:
        sys.stdout.write(orjson.dumps(credential_issued(cred, token)).decode() + "\n")
    else:
        sys.stdout.write(token + "\n")
        sys.stderr.write(f"issued a credential for node {node_id} (MQTT username and client "
                         "id: the node id; password: the token, shown only now)\n")
    return 0


def run_show(args: argparse.Namespace) -> int:
    node_id = _node_id(args.id)

    async def show(auth: AuthService) -> list[tuple[str, ...]]:
        return [(c.id, when(c.created_at), when(auth.last_used_at(c)), when(c.expires_at),
                 when(c.ends_at()), c.enrolled_by or "-",
                 "yes" if c.needs_reissue else "no")
                for c in auth.node_credentials(node_id)]

    rows = with_auth(args, show)
    if not rows:
        raise CommandError(f"node {node_id} has no valid credential")
    sys.stdout.write(table(HEADERS, rows))
    return 0


def run_revoke(args: argparse.Namespace) -> int:
    node_id = _node_id(args.id)

    async def revoke(auth: AuthService) -> int:
        return await auth.revoke_credentials(node_id, actor=ACTOR)

    if not with_auth(args, revoke):
        raise CommandError(f"node {node_id} has no valid credential")
    sys.stdout.write(f"revoked the credentials of node {node_id}\n")
    return 0


def run_export(args: argparse.Namespace) -> int:
    if not is_valid_root(args.topic_root):
        raise ConfigError(f"--topic-root {args.topic_root[:64]!r} is not a plain topic")
    manager_hash = None
    if args.manager_password_file:
        try:
            password = Path(args.manager_password_file).read_text().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise CommandError(f"--manager-password-file {args.manager_password_file}: "
                               f"{exc}") from None
        if len(password) < 16:
            raise CommandError("--manager-password-file: the password needs at least 16 "
                               "characters (the manager's login may publish every status)")
        manager_hash = mosquitto_hash(password)

    async def everything(auth: AuthService) -> list[Credential]:
        # Every record; the exporter keeps those valid now.
        return (await auth.store.changes(0)).credentials

    credentials = with_auth(args, everything)
    passwords, acl = mosquitto_files(credentials, args.topic_root, manager_hash=manager_hash)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _write(out / "passwords", passwords, 0o600)
    _write(out / "acl", acl, 0o644)
    sys.stdout.write(f"wrote {out / 'passwords'} and {out / 'acl'}\n")
    sys.stderr.write(NO_LIVE_REVOCATION)
    return 0


def _write(path: Path, text: str, mode: int) -> None:
    """Written whole under a temporary name, then renamed: a broker reloading meanwhile
    reads the old file or the new one, never half of one; the mode is set before any byte."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "w") as handle:
            os.fchmod(handle.fileno(), mode)  # O_CREAT's mode is masked by the umask
            handle.write(text)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
