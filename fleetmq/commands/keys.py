"""``fleetmq keys create|list|revoke``: API keys and enroll keys, straight in the store.

Works before the first start (the first admin key) and while the manager runs (it sees the
change within 250 ms). A token is printed once, alone on stdout, and kept nowhere.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from fleetmq.auth.service import KEY_ROLES, AuthService
from fleetmq.auth.store import Credential
from fleetmq.commands import table
from fleetmq.commands.authstore import (
    ACTOR,
    add_store_option,
    duration,
    positive,
    subcommands,
    usage_error,
    when,
    with_auth,
)
from fleetmq.core.models import Rejection, describe_error
from fleetmq.http.access_models import KeyRequest

HEADERS = ("ID", "NAME", "ROLE", "CREATED", "LAST USED", "EXPIRES", "USES")


def add_command(subparsers: Any, env: Mapping[str, str]) -> None:
    parser = subparsers.add_parser(
        "keys", help="create, list and revoke API keys (in the store, live)",
        description="Manage API keys and enroll keys in the manager's store. Works while the "
                    "manager runs: it sees the change within 250 ms.")
    actions = subcommands(parser)

    create = actions.add_parser("create", help="create a key and print its token alone")
    create.add_argument("--role", required=True, choices=KEY_ROLES)
    create.add_argument("--name", default="", help="a label for people (at most 64 characters)")
    create.add_argument("--expires", metavar="DURATION", type=duration("--expires"),
                        help="lifetime: seconds or 90m, 12h, 30d (default: never)")
    create.add_argument("--max-uses", metavar="N", type=positive("--max-uses"),
                        help="enroll keys: how many nodes it may enroll")
    create.add_argument("--id-pattern", metavar="GLOB",
                        help="enroll keys: node ids it may enroll, e.g. 'esp32-*'")
    create.add_argument("--node-type", metavar="TYPE",
                        help="enroll keys: the only node_type it may enroll")
    create.add_argument("--allow-registered", action="store_true",
                        help="enroll keys: may enroll ids that are registered already")
    add_store_option(create, env)
    create.set_defaults(run=run_create)

    listing = actions.add_parser("list", help="list keys (never their tokens)")
    add_store_option(listing, env)
    listing.set_defaults(run=run_list)

    revoke = actions.add_parser("revoke", help="revoke a key at once")
    revoke.add_argument("id", metavar="ID")
    revoke.add_argument("--cascade", action="store_true",
                        help="also revoke the node credentials this enroll key made")
    add_store_option(revoke, env)
    revoke.set_defaults(run=run_revoke)


def run_create(args: argparse.Namespace) -> int:
    fields = {"role": args.role, "name": args.name, "expires_in_seconds": args.expires,
              "max_uses": args.max_uses, "id_pattern": args.id_pattern,
              "node_type": args.node_type, "allow_registered": args.allow_registered}
    try:
        # The REST route's model: one set of rules for both ways of making a key.
        req = KeyRequest.model_validate({k: v for k, v in fields.items() if v is not None})
        req.check_role()
    except ValidationError as exc:
        raise usage_error(describe_error(exc)) from None
    except Rejection as exc:
        raise usage_error(exc) from None

    async def create(auth: AuthService) -> tuple[Credential, str]:
        return await auth.create_key(
            req.role, name=req.name, expires_in_s=req.expires_in_seconds,
            max_uses=req.max_uses, id_pattern=req.id_pattern, node_type=req.node_type,
            allow_registered=req.allow_registered, actor=ACTOR)

    cred, token = with_auth(args, create)
    sys.stdout.write(token + "\n")
    sys.stderr.write(f"created key {cred.id} (role {cred.role}); the token above is shown "
                     "only now\n")
    return 0


def run_list(args: argparse.Namespace) -> int:
    async def listing(auth: AuthService) -> list[tuple[str, ...]]:
        return [(c.id, c.name or "-", c.role or "-", when(c.created_at),
                 when(auth.last_used_at(c)), when(c.expires_at),
                 str(c.uses) + (f"/{c.max_uses}" if c.max_uses is not None else ""))
                for c in auth.keys()  # noqa: SIM118 (AuthService.keys(), not a dict)
                if c.revoked_at is None]

    rows = with_auth(args, listing)
    sys.stdout.write(table(HEADERS, rows) if rows else "no keys\n")
    return 0


def run_revoke(args: argparse.Namespace) -> int:
    async def revoke(auth: AuthService) -> list[Credential]:
        return await auth.revoke_key(args.id, cascade=args.cascade, actor=ACTOR)

    ended = with_auth(args, revoke)
    extra = f" and {len(ended) - 1} node credential(s) it enrolled" if args.cascade else ""
    sys.stdout.write(f"revoked key {args.id}{extra}\n")
    return 0
