"""``fleetmq nodes``: the fleet as a table, read from a running manager's REST API.

A client of the API like any dashboard: it never touches the registry or the broker. It pages
through ``GET /api/v1/fleet/nodes`` with ``limit`` and ``after``, so a large fleet never asks the
manager for one huge response.
"""

from __future__ import annotations

import argparse
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from typing import Any

import orjson

from fleetmq.cli import env_name
from fleetmq.commands import table
from fleetmq.core.clock import SystemClock
from fleetmq.core.models import STATUSES
from fleetmq.errors import ConfigError, FleetmqError

DEFAULT_API = "http://127.0.0.1:8080"
PAGE_SIZE = 1000
REQUEST_TIMEOUT_S = 10.0
HEADERS = ("ID", "TYPE", "STATUS", "REASON", "LAST SEEN", "LOCATION")

# option, metavar, default, help; the environment variable is FLEETMQ_<OPTION>.
OPTIONS: tuple[tuple[str, str, str | None, str], ...] = (
    ("--api", "URL", DEFAULT_API, f"base URL of the manager's REST API (default: {DEFAULT_API})"),
    ("--token", "TOKEN", None, "an API key (role read or above), sent as a bearer token"),
    ("--status", "S", None, "only nodes in this state: online, degraded or offline"),
    ("--type", "T", None, "only nodes of this node_type (case-insensitive)"),
    ("--location", "L", None, "only nodes at this location (case-insensitive)"),
    ("--limit", "N", None, "show the first N nodes by id, and how many match in all"),
)


class ApiError(FleetmqError):
    """The manager's REST API cannot be reached or answered with an error."""


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
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    api = _base_url(args.api)
    filters = {key: value for key, value in (("status", args.status), ("node_type", args.type),
                                              ("location", args.location)) if value}
    limit = _limit(args.limit)
    now = SystemClock().now().wall
    listing = NodeListing(api, filters, args.token, limit)
    rows = [_row(node, now) for node in listing]
    counts = Counter(row[2] for row in rows)
    if limit is not None and listing.total is not None and listing.total > len(rows):
        last = f"first {len(rows)} of {listing.total} nodes (--limit {limit})"
    else:
        last = summary(len(rows), counts)
    try:
        sys.stdout.write(render_table(rows))
        sys.stdout.write(last + "\n")
        sys.stdout.flush()
    except BrokenPipeError:  # `fleetmq nodes | head`: the reader has all it wanted
        return 0
    return 0


class NodeListing:
    """The matching nodes, sorted by id, one page at a time (at most ``limit`` of them);
    ``total`` is how many match in all, once the first page is read."""

    def __init__(self, api: str, filters: Mapping[str, str], token: str | None = None,
                 limit: int | None = None) -> None:
        self.total: int | None = None
        self._pages = self._read(api, filters, token, limit)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self._pages

    def _read(self, api: str, filters: Mapping[str, str], token: str | None,
              limit: int | None) -> Iterator[dict[str, Any]]:
        after: str | None = None
        left = limit
        while left is None or left > 0:
            query = {**filters, "limit": str(PAGE_SIZE if left is None else min(left, PAGE_SIZE))}
            if after is not None:
                query["after"] = after
            page = _get_json(f"{api}/api/v1/fleet/nodes?{urllib.parse.urlencode(query)}", api,
                             token)
            nodes, after, total = page.get("nodes"), page.get("next"), page.get("total")
            if not isinstance(nodes, list) or not (after is None or isinstance(after, str)):
                raise ApiError(f"{api} did not answer with a fleetmq node list: is --api the "
                               "address of `fleetmq serve`?")
            if self.total is None and isinstance(total, int):
                self.total = total
            yield from nodes
            if left is not None:
                left -= len(nodes)
            if after is None:
                return


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


def render_table(rows: list[tuple[str, ...]]) -> str:
    return table(HEADERS, rows) if rows else ""


def summary(total: int, counts: Mapping[str, int]) -> str:
    if not total:
        return "no nodes"
    noun = "node" if total == 1 else "nodes"
    states = ", ".join(f"{counts.get(status, 0)} {status}" for status in STATUSES)
    return f"{total} {noun}: {states}"


def ago(timestamp: str | None, now: float) -> str:
    """``12s ago``, ``5m ago``, ``3h ago``, ``2d ago``: how long since an RFC 3339 moment."""
    if not timestamp:
        return "-"
    try:
        then = datetime.fromisoformat(timestamp.replace("Z", "+00:00")).astimezone(UTC)
    except ValueError:
        return timestamp
    seconds = max(0, int(now - then.timestamp()))
    for unit, size in (("d", 86_400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit} ago"
    return f"{seconds}s ago"


def _row(node: dict[str, Any], now: float) -> tuple[str, ...]:
    return (
        str(node.get("id", "?")),
        str(node.get("type", "?")),
        str(node.get("status", "?")),
        str(node.get("status_reason") or "-"),
        ago(node.get("last_seen"), now),
        str(node.get("location") or "-"),
    )


def _base_url(text: str) -> str:
    url = text.strip().rstrip("/")
    if "://" not in url:
        url = f"http://{url}"  # `--api 127.0.0.1:8080` means plain HTTP
    if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        raise ApiError(f"--api {text!r} is not an http:// or https:// URL "
                       f"(for example {DEFAULT_API})")
    return url


def _get_json(url: str, api: str, token: str | None = None) -> dict[str, Any]:
    headers = {"Accept": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token.strip()}"
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as response:
            body = response.read()
    except urllib.error.HTTPError as exc:
        hint = ""
        if exc.code in (401, 403):
            hint = "; pass --token (or set FLEETMQ_TOKEN) with a key of role read or above"
        raise ApiError(f"the fleetmq API at {api} answered {exc.code}: "
                       f"{_error_detail(exc)}{hint}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ApiError(f"cannot reach the fleetmq API at {api}: {reason}; is `fleetmq serve` "
                       "running there? pass --api URL (or set FLEETMQ_API)") from None
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError:
        document = None
    if not isinstance(document, dict):
        raise ApiError(f"{api} did not answer with JSON: is --api the address of "
                       "`fleetmq serve`?")
    return document


def _error_detail(exc: urllib.error.HTTPError) -> str:
    try:
        body = orjson.loads(exc.read())
    except (orjson.JSONDecodeError, OSError):
        body = None
    if isinstance(body, dict) and "message" in body:
        return f"{body.get('error', exc.reason)}: {body['message']}"
    return str(exc.reason)
