"""The fleet as a table, read from a running manager's REST API: shared by ``fleetmq nodes``
and its ``--watch``.

A client of the API like any dashboard: it never touches the registry or the broker. It pages
through ``GET /api/v1/fleet/nodes`` with ``limit`` and ``after``, so a large fleet never asks the
manager for one huge response.
"""

from __future__ import annotations

import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from typing import Any

import orjson

from fleetmq.commands import table
from fleetmq.core.models import STATUSES
from fleetmq.errors import FleetmqError

DEFAULT_API = "http://127.0.0.1:8080"
PAGE_SIZE = 1000
REQUEST_TIMEOUT_S = 10.0
HEADERS = ("ID", "TYPE", "STATUS", "REASON", "LAST SEEN", "LOCATION")

CONTROL = dict.fromkeys([*range(0x20), 0x7F, *range(0x80, 0xA0)])
"""Characters a terminal would act on rather than show: escaped in node data."""


class ApiError(FleetmqError):
    """The manager's REST API cannot be reached or answered with an error."""


class NodeListing:
    """The matching nodes, sorted by id, one page at a time (at most ``limit`` of them);
    ``total`` is how many match in all, once the first page is read."""

    def __init__(self, api: str, filters: Mapping[str, str], token: str | None = None,
                 limit: int | None = None) -> None:
        self.total: int | None = None
        self.event_id: str | None = None
        """The first page's ``event_id``: where a watch of what follows starts."""
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
            page = get_json(f"{api}/api/v1/fleet/nodes?{urllib.parse.urlencode(query)}", api,
                             token)
            nodes, after, total = page.get("nodes"), page.get("next"), page.get("total")
            if not isinstance(nodes, list) or not (after is None or isinstance(after, str)):
                raise ApiError(f"{api} did not answer with a fleetmq node list: is --api the "
                               "address of `fleetmq serve`?")
            if self.total is None and isinstance(total, int):
                self.total = total
                event_id = page.get("event_id")
                self.event_id = event_id if isinstance(event_id, str) else None
            yield from nodes
            if left is not None:
                left -= len(nodes)
            if after is None:
                return


def render_table(rows: list[tuple[str, ...]]) -> str:
    return table(HEADERS, rows) if rows else ""


def last_line(rows: list[tuple[str, ...]], total: int | None, limit: int | None) -> str:
    """The line under the table: the nodes in each state, or, for the first ``limit`` of more,
    how many match in all."""
    if limit is not None and total is not None and total > len(rows):
        return f"first {len(rows)} of {total} nodes (--limit {limit})"
    return summary(len(rows), Counter(row[2] for row in rows))


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


def row_of(node: Mapping[str, Any], now: float) -> tuple[str, ...]:
    return tuple(map(shown, (
        str(node.get("id", "?")),
        str(node.get("type", "?")),
        str(node.get("status", "?")),
        str(node.get("status_reason") or "-"),
        ago(node.get("last_seen"), now),
        str(node.get("location") or "-"),
    )))


def shown(text: str) -> str:
    """``text`` with control characters escaped (``\\x1b``), so node data cannot drive the
    terminal."""
    if text.isprintable():
        return text
    return "".join(repr(c)[1:-1] if ord(c) in CONTROL else c for c in text)


def base_url(text: str) -> str:
    url = text.strip().rstrip("/")
    if "://" not in url:
        url = f"http://{url}"  # `--api 127.0.0.1:8080` means plain HTTP
    if urllib.parse.urlsplit(url).scheme not in ("http", "https"):
        raise ApiError(f"--api {text!r} is not an http:// or https:// URL "
                       f"(for example {DEFAULT_API})")
    return url


def get_json(url: str, api: str, token: str | None = None) -> dict[str, Any]:
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
