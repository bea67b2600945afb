"""``fleetmq nodes``: the fleet as a table, read from a running manager's REST API, once or
kept live (``--watch``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from typing import Any

from fleetmq.cli import env_name
from fleetmq.commands.fleet_table import (
    DEFAULT_API,
    NodeListing,
    base_url,
    last_line,
    render_table,
    row_of,
)
from fleetmq.commands.nodes_watch import watch
from fleetmq.core.clock import SystemClock
from fleetmq.errors import ConfigError

# option, metavar, default, help; the environment variable is FLEETMQ_<OPTION>.
OPTIONS: tuple[tuple[str, str, str | None, str], ...] = (
    ("--api", "URL", DEFAULT_API, f"base URL of the manager's REST API (default: {DEFAULT_API})"),
    ("--token", "TOKEN", None, "an API key (role read or above), sent as a bearer token"),
    ("--status", "S", None, "only nodes in this state: online, degraded or offline"),
    ("--type", "T", None, "only nodes of this node_type (case-insensitive)"),
    ("--location", "L", None, "only nodes at this location (case-insensitive)"),
    ("--limit", "N", None, "show the first N nodes by id, and how many match in all"),
)
def add_command(subparsers: Any, env: Mapping[str, str]) -> None:
    parser = subparsers.add_parser(
        "nodes", help="list the fleet of a running manager as a table",
        description="List the nodes of a running manager (over its REST API) as a table, then "
                    "the number of nodes in each state. Every option can also be set with the "
                    "environment variable shown; flags win over the environment.")
    for option, metavar, default, text in OPTIONS:
        var = env_name(option)
        parser.add_argument(option, metavar=metavar, default=env.get(var) or default,
                            help=f"{text} [env: {var}]")
    parser.add_argument("--watch", action="store_true",
                        help="keep the table live from the manager's watch stream (Ctrl-C "
                             "ends it)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    api = base_url(args.api)
    filters = {key: value for key, value in (("status", args.status), ("node_type", args.type),
                                              ("location", args.location)) if value}
    limit = _limit(args.limit)
    if args.watch:
        return watch(api, filters, args.token, limit)
    now = SystemClock().now().wall
    listing = NodeListing(api, filters, args.token, limit)
    rows = [row_of(node, now) for node in listing]
    try:
        sys.stdout.write(render_table(rows))
        sys.stdout.write(last_line(rows, listing.total, limit) + "\n")
        sys.stdout.flush()
    except BrokenPipeError:  # `fleetmq nodes | head`: the reader has all it wanted
        return 0
    return 0


def _limit(text: str | None) -> int | None:
    if text is None or text == "":
        return None
    try:
        limit = int(text)
    except ValueError:
        limit = 0
    if limit < 1:
        raise ConfigError(f"--limit {text!r} is not a whole number of nodes from 1 up")
    return limit


