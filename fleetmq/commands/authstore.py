"""What ``fleetmq keys`` and ``fleetmq credentials`` share: the store they open and how they
print times.

They open the access-control tables directly (no lock, so a running manager keeps running and
sees the change at its next poll, within 250 ms), load every credential, make one change as
actor ``cli`` and close.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import Any, TypeVar

from fleetmq.auth.service import AuthError, AuthService
from fleetmq.auth.tokens import parse_duration
from fleetmq.cli import env_name
from fleetmq.config import DEFAULT_STORE, parse_store
from fleetmq.core.clock import SystemClock
from fleetmq.core.models import Rejection
from fleetmq.errors import ConfigError, FleetmqError
from fleetmq.store import make_auth_store

ACTOR = "cli"
T = TypeVar("T")


class CommandError(FleetmqError):
    """The change was refused (unknown id, last admin key...): exit 1 with this sentence."""


def add_store_option(parser: argparse.ArgumentParser, env: Mapping[str, str]) -> None:
    var = env_name("--store")
    parser.add_argument("--store", metavar="URL", default=env.get(var) or DEFAULT_STORE,
                        help="the store of the manager: sqlite:///PATH, postgresql://... "
                             f"(default: {DEFAULT_STORE}, as `fleetmq serve`) [env: {var}]")


def with_auth(args: argparse.Namespace, action: Callable[[AuthService], Awaitable[T]]) -> T:
    """Open the store, load the credentials, run ``action``, close."""
    return asyncio.run(_with_auth(args.store, action))


async def _with_auth(url: str, action: Callable[[AuthService], Awaitable[T]]) -> T:
    settings = parse_store(url)
    if settings.scheme == "memory":
        raise ConfigError("--store memory:// keeps nothing: a key made here would be gone at "
                          "once; give the manager's sqlite:/// or postgresql:// store")
    store = make_auth_store(settings)
    await store.open()
    try:
        auth = AuthService(store, SystemClock())
        await auth.load()
        try:
            return await action(auth)
        except AuthError as exc:
            raise CommandError(exc.message) from None
    finally:
        await store.close()


def duration(option: str) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            return parse_duration(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"{option}: {exc}") from None
    return parse


def positive(option: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= 1_000_000_000:
            raise argparse.ArgumentTypeError(f"{option} {text[:64]!r} is not a whole number "
                                             "from 1 to 1000000000")
        return int(text)
    return parse


def usage_error(rejection: Rejection) -> ConfigError:
    """A request the REST model refused is a usage error here (exit 2)."""
    return ConfigError(rejection.message)


def when(wall: float | None) -> str:
    if wall is None:
        return "-"
    return datetime.fromtimestamp(wall, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def subcommands(parser: argparse.ArgumentParser) -> Any:
    return parser.add_subparsers(dest="action", required=True, metavar="ACTION")
