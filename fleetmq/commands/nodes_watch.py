"""``fleetmq nodes --watch``: the table kept live from the manager's watch stream.

List, then watch from the list's ``event_id`` (contract section 9), so no change falls between
the two. Each event updates the node it names; the table is drawn again at most twice a second.
``reset`` (the position is gone) lists again; ``overflow`` (too slow) and a dropped connection
resume from the last event seen, after a growing pause. Node data is shown with control
characters escaped, so a node cannot move the cursor or recolour the terminal.
"""

from __future__ import annotations

import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TextIO

import orjson

from fleetmq.commands.fleet_table import (
    ApiError,
    NodeListing,
    last_line,
    render_table,
    row_of,
)

REDRAW_EVERY_S = 0.5
STREAM_SILENCE_S = 45.0
"""The stream sends a comment every 15 s: three missed and the connection is taken for dead."""
RECONNECT_MIN_S = 1.0
RECONNECT_MAX_S = 15.0
CLEAR = "\x1b[H\x1b[2J"


class WatchedFleet:
    """The nodes the table shows, kept from the list and then from events."""

    def __init__(self, filters: Mapping[str, str], limit: int | None) -> None:
        self._status = filters.get("status", "").lower() or None
        self._type = filters.get("node_type", "").casefold() or None
        self._location = filters.get("location", "").casefold() or None
        self._limit = limit
        self.nodes: dict[str, dict[str, Any]] = {}
        self.total: int | None = None
        self.position: str | None = None
        self.lock = threading.Lock()
        """Held while the nodes change or are drawn (the drawing timer has its own thread)."""

    def load(self, listing: NodeListing) -> None:
        nodes = {node["id"]: node for node in listing}
        with self.lock:
            self.nodes = nodes
            self.total = listing.total
            self.position = listing.event_id

    def apply(self, event: Mapping[str, Any]) -> bool:
        """Applies the event; False when a table of the first N can no longer tell which
        nodes it holds (one came or went): it must be listed again."""
        node_id = event.get("node_id")
        if not isinstance(node_id, str):
            return True
        to = event.get("to")
        with self.lock:
            node = self.nodes.get(node_id)
            if to == "deleted" or not self._matches(event):
                if node is not None:
                    del self.nodes[node_id]
                    return self._limit is None
                return True
            if node is None:
                if self._limit is not None:
                    # Past the table's last id with the table full: not among the first N.
                    full = len(self.nodes) >= self._limit
                    return full and bool(self.nodes) and node_id > max(self.nodes)
                node = self.nodes[node_id] = {"id": node_id}
            node.update(
                type=event.get("node_type", node.get("type")), status=to,
                status_reason=event.get("reason"),
                last_seen=event.get("last_seen") or node.get("last_seen"),
                location=event.get("location", node.get("location")))
            return True

    def _matches(self, event: Mapping[str, Any]) -> bool:
        """The list's filters, on the node as the event leaves it (the stream is not filtered
        by location: a node that moves away must leave the table)."""
        location = event.get("location")
        node_type = event.get("node_type")
        return ((self._status is None or event.get("to") == self._status)
                and (self._type is None or (isinstance(node_type, str)
                                            and node_type.casefold() == self._type))
                and (self._location is None or (isinstance(location, str)
                                                and location.casefold() == self._location)))

    def render(self, now: float) -> str:
        with self.lock:
            rows = [row_of(node, now) for _, node in sorted(self.nodes.items())]
            total = self.total
        return render_table(rows) + last_line(rows, total, self._limit) + "\n"


def watch(api: str, filters: Mapping[str, str], token: str | None, limit: int | None,
          out: TextIO = sys.stdout, clock: Callable[[], float] = time.time) -> int:
    """Until interrupted (Ctrl-C: exit 0)."""
    fleet = WatchedFleet(filters, limit)
    fleet.load(NodeListing(api, filters, token, limit))
    if fleet.position is None:
        raise ApiError(f"{api} does not give the list's event_id: it has no watch stream "
                       "(a fleetmq older than this command?)")
    draw = _Drawing(out, fleet, clock)
    draw.now()
    pause = RECONNECT_MIN_S
    # A node's type never changes (a delete comes first), so the stream may filter on it; a
    # location does, so the table checks that itself.
    stream_filters = {k: v for k, v in filters.items() if k == "node_type"}
    listed_at = time.monotonic()
    try:
        while True:
            try:
                for kind, data, event_id in _events(api, token, fleet.position,
                                                    stream_filters):
                    pause = RECONNECT_MIN_S
                    if kind == "transition" and data is not None:
                        if not fleet.apply(data):
                            # Which N are first changed: list again (at most twice a second),
                            # then watch from that list's position.
                            time.sleep(max(0.0, listed_at + REDRAW_EVERY_S - time.monotonic()))
                            fleet.load(NodeListing(api, filters, token, limit))
                            listed_at = time.monotonic()
                            draw.soon()
                            break
                        if event_id:
                            fleet.position = event_id
                    elif kind == "reset":
                        fleet.load(NodeListing(api, filters, token, limit))
                        draw.now()
                        break  # watch again from the new list's position
                    elif kind == "overflow":
                        break
                    draw.soon()
            except (ApiError, OSError, TimeoutError) as exc:
                draw.now(f"reconnecting in {pause:.0f} s: {exc}")
                time.sleep(pause)
                pause = min(pause * 2, RECONNECT_MAX_S)
    except KeyboardInterrupt:
        return 0


class _Drawing:
    """Draws the table again at most every REDRAW_EVERY_S (a timer draws what came since);
    on a terminal in place, else one table after the other (for a pipe or a log)."""

    def __init__(self, out: TextIO, fleet: WatchedFleet, clock: Callable[[], float]) -> None:
        self._out = out
        self._fleet = fleet
        self._clock = clock
        self._tty = out.isatty()
        self._drawn_at = 0.0
        self._timer: threading.Timer | None = None
        self._lock = threading.Lock()  # the timer's thread and the reader's draw in turn

    def soon(self) -> None:
        with self._lock:
            wait = self._drawn_at + REDRAW_EVERY_S - time.monotonic()
            if wait <= 0:
                self._draw("")
            elif self._timer is None:
                self._timer = threading.Timer(wait, self._on_timer)
                self._timer.daemon = True
                self._timer.start()

    def now(self, note: str = "") -> None:
        with self._lock:
            self._draw(note)

    def _on_timer(self) -> None:
        with self._lock:
            self._timer = None
            self._draw("")

    def _draw(self, note: str) -> None:
        self._drawn_at = time.monotonic()
        text = self._fleet.render(self._clock()) + (note + "\n" if note else "")
        self._out.write((CLEAR + text) if self._tty else text + "\n")
        self._out.flush()


def _events(api: str, token: str | None, since: str | None,
            filters: Mapping[str, str]) -> Iterator[tuple[str, Any, str | None]]:
    """The stream's events as (kind, data, id), until it ends."""
    url = f"{api}/api/v1/fleet/watch"
    if filters:
        url += "?" + urllib.parse.urlencode(filters)
    headers = {"Accept": "text/event-stream"}
    if token:
        headers["Authorization"] = f"Bearer {token.strip()}"
    if since:
        headers["Last-Event-ID"] = since
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=STREAM_SILENCE_S)
    except urllib.error.HTTPError as exc:
        raise ApiError(f"the watch stream at {api} answered {exc.code}") from None
    with response:
        kind, event_id = "message", None
        data: list[str] = []
        for raw in response:
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            if not line:
                if data or kind != "message":
                    yield kind, _json("\n".join(data)), event_id
                kind, data, event_id = "message", [], None
                continue
            if line.startswith(":"):
                continue
            field, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if field == "event":
                kind = value
            elif field == "data":
                data.append(value)
            elif field == "id":
                event_id = value


def _json(text: str) -> Any:
    try:
        return orjson.loads(text) if text else None
    except orjson.JSONDecodeError:
        return None
