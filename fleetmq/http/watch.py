"""The watch stream, ``GET /api/v1/fleet/watch`` (contract sections 9 and 11): committed events
as Server-Sent Events, resumable by id.

The store writer hands each commit's events to ``WatchHub.publish`` in id order (with no
watcher that is one assignment). The hub's own task frames each event once and fans it out to
every watcher's buffer, filtered, yielding between chunks: many watchers never stall the event
loop, and a watcher whose client reads slowly only fills its own buffer until it overflows;
nobody waits for it. Each request's handler just writes its buffer.

A watcher joins at a commit boundary: everything up to ``start`` is in the store, everything
after reaches its buffer. One that resumes from an id reads the events after that id up to
``start`` from the store first, then its buffer: nothing missed, nothing repeated.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from aiohttp import web

from fleetmq.core.models import Rejection, quote
from fleetmq.errors import StoreError
from fleetmq.store.base import HistoryEvent, Store
from fleetmq.store.writer import StoreWriter
from fleetmq.views import dumps, event_document

log = logging.getLogger(__name__)

BUFFER_EVENTS = 10_000
"""Events (after filtering) a watcher may have waiting to be written; past it, overflow."""
FAN_OUT_WORK = 20_000
"""Event-watcher pairs looked at between two yields to the event loop."""
FRAME_CHUNK = 2_000
"""Events framed between two yields (a mass expiry commits 50,000 at once)."""
MAX_QUEUED_EVENTS = 500_000
"""Committed events waiting for the fan-out at most (a mass expiry of a million commits in
slices); past it every watcher overflows and resumes from the store."""
MERGE_EVENTS = 50_000
"""Queued commits fanned out as one, up to this many events."""
BACKLOG_PAGE = 1_000
STORE_RETRY_S = 1.0
"""While the store cannot be read, a resuming watcher tries again this often (paused)."""

_EVENT_ID = re.compile(r"([0-9a-f]{1,32})\.([0-9]{1,18})")
T = TypeVar("T")
Match = Callable[[HistoryEvent], bool]
Frame = tuple[int, bytes]
"""An event's id and its SSE frame."""


class Watcher:
    """One client's place in the stream: its filter, its buffer and how it is doing."""

    __slots__ = ("frames", "joined", "match", "overflowed", "start", "transport", "wake")

    def __init__(self, match: Match | None, transport: asyncio.Transport | None = None
                 ) -> None:
        self.match = match
        self.transport = transport
        """Its connection: aborted at shutdown, so a client that stopped reading (a write
        waiting for it to drain) cannot hold the manager's stop."""
        self.frames: list[Frame] = []
        self.wake = asyncio.Event()
        self.joined = asyncio.Event()
        self.overflowed = False
        self.start = 0
        """The last event committed before it joined: later ones reach ``frames``."""


class WatchHub:
    def __init__(self, writer: StoreWriter, keepalive_s: float) -> None:
        self._writer = writer
        self._store: Store = writer.store
        self._keepalive_s = keepalive_s
        self._watchers: set[Watcher] = set()
        self._joining: list[Watcher] = []
        self._queue: deque[list[HistoryEvent]] = deque()
        self._wake = asyncio.Event()
        self._queued = 0
        self._busy = False
        self._closed = False
        self.fanned_id = 0
        """The last committed event every watcher has been handed (or would have been)."""
        self.overflows = 0
        self.allowed: Callable[[web.Request], bool] | None = None
        """Whether a stream's token is still valid (auth on): checked at each wake and
        keep-alive, so a revoked or expired key's stream ends within a keep-alive."""
        writer.on_commit(self.publish)

    @property
    def watchers(self) -> int:
        return len(self._watchers) + len(self._joining)

    # --- the writer's side -------------------------------------------------------------------

    def publish(self, events: list[HistoryEvent]) -> None:
        """A commit's events, in id order (the writer's ``on_commit`` listener)."""
        if not (self._watchers or self._joining or self._queue or self._busy):
            self.fanned_id = events[-1].id  # nobody watches: nothing to frame
            return
        self._queue.append(events)
        self._queued += len(events)
        self._wake.set()
        if self._queued > MAX_QUEUED_EVENTS:
            self._give_up()

    def _give_up(self) -> None:
        """The fan-out is this far behind the commits: every watcher is behind by as much, so
        each is told it overflowed (it resumes from the store) and the queue goes."""
        log.warning("watch_fan_out_behind queued=%d watchers=%d", self._queued, self.watchers)
        self._activate()
        for watcher in self._watchers:
            if not watcher.overflowed:
                watcher.overflowed = True
                watcher.frames = []
                self.overflows += 1
                watcher.wake.set()
        self.fanned_id = self._queue[-1][-1].id
        self._queue.clear()
        self._queued = 0

    async def run(self) -> None:
        self.fanned_id = self._writer.committed_event_id
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                self._activate()
                # Commits queued meanwhile go out together (a store in memory commits each
                # registration alone: a yield per event would leave the hub behind).
                events = self._queue.popleft()
                if self._queue and len(events) < MERGE_EVENTS:
                    events = list(events)
                    while self._queue and len(events) < MERGE_EVENTS:
                        events += self._queue.popleft()
                self._queued -= len(events)
                self._busy = True
                try:
                    await self._fan_out(events)
                except Exception:
                    log.exception("watch_fan_out_failed")
                finally:
                    self._busy = False
                self.fanned_id = max(self.fanned_id, events[-1].id)
            self._activate()

    def close(self) -> None:
        """End every stream (shutdown): handlers return after their write in hand."""
        self._closed = True
        for watcher in (*self._watchers, *self._joining):
            watcher.joined.set()
            watcher.wake.set()
            if watcher.transport is not None:
                watcher.transport.abort()

    def _activate(self) -> None:
        for watcher in self._joining:
            watcher.start = self.fanned_id
            self._watchers.add(watcher)
            watcher.joined.set()
        self._joining.clear()

    async def _fan_out(self, events: list[HistoryEvent]) -> None:
        store_id = self._store.store_id.encode()
        work = 0
        for offset in range(0, len(events), FRAME_CHUNK):
            if offset:
                await asyncio.sleep(0)
            chunk = events[offset:offset + FRAME_CHUNK]
            framed = [(e, (e.id, _frame(store_id, e))) for e in chunk]
            everything = [frame for _, frame in framed]
            for watcher in list(self._watchers):
                if watcher.overflowed:
                    continue
                match = watcher.match
                work += len(chunk)
                mine = everything if match is None else [f for e, f in framed if match(e)]
                if mine:  # else no wake: others' news must not put off its keep-alive
                    watcher.frames += mine
                    if len(watcher.frames) > BUFFER_EVENTS:
                        watcher.overflowed = True
                        watcher.frames = []
                        self.overflows += 1
                    watcher.wake.set()
                if work >= FAN_OUT_WORK:
                    work = 0
                    await asyncio.sleep(0)

    def _join(self, watcher: Watcher) -> None:
        if self._closed:
            watcher.joined.set()
            return
        if self._busy or self._queue:
            self._joining.append(watcher)  # at the next commit boundary
            self._wake.set()
            return
        watcher.start = self.fanned_id
        self._watchers.add(watcher)
        watcher.joined.set()

    def _leave(self, watcher: Watcher) -> None:
        self._watchers.discard(watcher)
        with contextlib.suppress(ValueError):
            self._joining.remove(watcher)

    # --- the route -----------------------------------------------------------------------------

    async def handle(self, request: web.Request) -> web.StreamResponse:
        since = _since(request)
        transport = request.transport
        watcher = Watcher(_match(request.query),
                          transport if isinstance(transport, asyncio.Transport) else None)
        self._join(watcher)
        try:
            await watcher.joined.wait()  # at most until the commit being fanned out is done
            response = web.StreamResponse(headers={
                "Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no"})
            await response.prepare(request)
            try:
                await self._serve(request, response, watcher, since)
            except ConnectionError:  # reset, or lost while a write waited
                log.debug("watch_client_gone")
            return response
        finally:
            self._leave(watcher)

    async def _serve(self, request: web.Request, response: web.StreamResponse,
                     watcher: Watcher, since: tuple[str, int] | None) -> None:
        last = watcher.start
        if since is not None:
            reason = await self._refusal(response, watcher, since)
            if reason is not None:
                await response.write(self._signal("reset", reason, watcher.start))
            else:
                last = await self._backlog(response, watcher, since[1])
        await self._live(request, response, watcher, last)

    async def _refusal(self, response: web.StreamResponse, watcher: Watcher,
                       since: tuple[str, int]) -> str | None:
        """Why the stream cannot resume from ``since`` (a reset), None if it can."""
        store_id, event_id = since
        if store_id != self._store.store_id:
            return "another_store"
        if event_id > self._writer.last_event_id:
            return "future"
        if self._writer.stored_event_id < event_id < self._writer.run_start_id:
            return "gone"  # handed out by a run before this one, never committed: lost
        first = await self._reading(response, watcher, self._store.first_event_id)
        if first is not None and event_id < first - 1:
            return "gone"
        return None

    async def _backlog(self, response: web.StreamResponse, watcher: Watcher, after: int
                       ) -> int:
        """Write the stored events after ``after`` up to where the watcher joined; the id of
        the last event the client now has."""
        store_id = self._store.store_id.encode()
        match = watcher.match
        position = after
        while position < watcher.start:
            if self._closed or watcher.overflowed:
                return position  # the client has what came before, no more
            page: list[HistoryEvent] = await self._reading(
                response, watcher, functools.partial(self._store.events_after, position,
                                                     watcher.start, BACKLOG_PAGE))
            if not page:
                break
            frames = [_frame(store_id, e) for e in page if match is None or match(e)]
            if frames:
                await response.write(b"".join(frames))
            position = page[-1].id
        return max(after, watcher.start)

    async def _reading(self, response: web.StreamResponse, watcher: Watcher,
                       read: Callable[[], Awaitable[T]]) -> T:
        """``read()`` from the store, waiting (the stream paused, kept alive) while it fails."""
        while True:
            try:
                return await read()
            except StoreError as exc:
                if self._closed or watcher.overflowed:
                    raise ConnectionAbortedError("watch stream ended") from exc
                log.debug("watch_store_unavailable error=%s", exc)
                await response.write(b": store unavailable, paused\n\n")
                await asyncio.sleep(STORE_RETRY_S)

    async def _live(self, request: web.Request, response: web.StreamResponse,
                    watcher: Watcher, last: int) -> None:
        allowed = self.allowed
        while not self._closed:
            transport = request.transport
            if transport is None or transport.is_closing():
                return
            if allowed is not None and not allowed(request):
                log.info("watch_token_ended")  # revoked or expired meanwhile
                return
            if watcher.overflowed:
                log.info("watch_overflow buffer=%d last_event=%d", BUFFER_EVENTS, last)
                await response.write(self._signal("overflow", "too_slow", last))
                return
            frames, watcher.frames = watcher.frames, []
            if frames:
                out = [frame for event_id, frame in frames if event_id > last]
                if out:
                    await response.write(b"".join(out))
                last = max(last, frames[-1][0])
                continue
            watcher.wake.clear()
            try:
                async with asyncio.timeout(self._keepalive_s):
                    await watcher.wake.wait()
            except TimeoutError:
                await response.write(b": keep-alive\n\n")

    def _signal(self, kind: str, reason: str, event_id: int) -> bytes:
        """A ``reset`` or ``overflow`` event: ``event_id`` is where the client stands."""
        position = f"{self._store.store_id}.{event_id}"
        data = dumps({"reason": reason, "event_id": position})
        if kind == "reset":  # the client starts again from here
            return b"id: %s\nevent: reset\ndata: %s\n\n" % (position.encode(), data)
        return b"event: %s\ndata: %s\n\n" % (kind.encode(), data)


def _frame(store_id: bytes, event: HistoryEvent) -> bytes:
    return b"id: %s.%d\nevent: transition\ndata: %s\n\n" % (
        store_id, event.id, dumps(event_document(event)))


def _since(request: web.Request) -> tuple[str, int] | None:
    """Where the client stands: ``Last-Event-ID`` (a reconnecting client's), else
    ``?since=``; None for neither (start at the next event)."""
    header = request.headers.get("Last-Event-ID")
    text = header if header is not None else request.query.get("since")
    if text is None or text == "":
        return None
    found = _EVENT_ID.fullmatch(text)
    if found is None:
        name = "header 'Last-Event-ID'" if header is not None else "parameter 'since'"
        raise Rejection(400, "Invalid parameter",
                        f"The {name} must be an event id as the stream sends it "
                        f"(<store id>.<event id>), not {quote(repr(text))}", "invalid_query")
    return found.group(1), int(found.group(2))


def _match(query: Any) -> Match | None:
    """Filters on the event's own fields: ``node_type`` and ``location`` case-insensitive
    (as ``GET /nodes``), ``node_id`` exact (ids are case-sensitive)."""
    node_type = query.get("node_type")
    location = query.get("location")
    node_id = query.get("node_id")
    if node_type is None and location is None and node_id is None:
        return None
    want_type = node_type.casefold() if node_type is not None else None
    want_location = location.casefold() if location is not None else None

    def match(event: HistoryEvent) -> bool:
        return ((node_id is None or event.node_id == node_id)
                and (want_type is None or (event.node_type is not None
                                           and event.node_type.casefold() == want_type))
                and (want_location is None or (event.location is not None
                                               and event.location.casefold() == want_location)))

    return match
