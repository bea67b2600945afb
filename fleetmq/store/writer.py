"""Carries registry changes to the store: group commits for what must be durable, write-behind
for heartbeats.

Registrations, deletes and transitions mark their node dirty and queue a history event; the
next commit writes every dirty node as it is *at that moment* (so a burst costs one sync, and
a node deleted meanwhile is deleted, not resurrected). Replies and REST answers wait for the
commit that covers them. Heartbeats only mark their node touched: ``last_seen`` and telemetry
go out at most ``flush_interval_s`` later, never one write per heartbeat.

When the store fails, everything stays queued and the writer retries with a backoff; the
registry keeps working in memory, and ``available`` tells writers that need the store to refuse.
A write refused by fencing (another manager took the lease, contract section 10) is never
retried: the writer stops, tells ``on_fenced``, and what was queued is this manager's no more.

Events are numbered here, as they are recorded (so a reader of the registry knows the last
event its state includes), and handed to ``on_commit`` listeners (the watch stream) in that
order once committed.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections import deque
from collections.abc import Callable

from fleetmq.core.events import Event, NodeDeleted, NodeTransitioned
from fleetmq.core.registry import Registry
from fleetmq.errors import FencedError, StoreDataError, StoreError
from fleetmq.store.base import Batch, HistoryEvent, Store, node_row, touch_row
from fleetmq.store.memory import MemoryStore

log = logging.getLogger(__name__)

MAX_BATCH = 50_000
"""Rows and events per transaction: a mass expiry of a million goes out in slices."""
BUILD_SLICE = 5_000
"""Rows serialized between two yields to the event loop."""
MAX_QUEUED_EVENTS = 2_000_000
"""History events kept while the store is down; past it the oldest are dropped (counted)."""
MAX_CALLBACKS = 100_000
RETRY_FIRST_S = 0.5
RETRY_MAX_S = 10.0
WRITE_DEADLINE_S = 10.0
"""A batch (or a ping) that takes longer counts as a failure: a hung database is noticed."""
PING_EVERY_S = 5.0


class StoreUnavailableError(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


RUN_IDS = 1_000_000_000
"""Each run of a durable store numbers its events from a fresh multiple of this."""


class StoreWriter:
    def __init__(self, store: Store, registry: Registry, monotonic: Callable[[], float],
                 flush_interval_s: float = 1.0, may_write: Callable[[], bool] = lambda: True
                 ) -> None:
        self.store = store
        self._may_write = may_write
        """The lease still held (checked before every batch; the store checks the epoch)."""
        self.fenced: str | None = None
        """Why writing stopped for good (deposed), None while this manager may write."""
        self.on_fenced: Callable[[str], None] = lambda _why: None
        self._registry = registry
        self._monotonic = monotonic
        self._flush_interval_s = flush_interval_s
        self._sync_memory = isinstance(store, MemoryStore)
        # Both queues are in the order of ``_recorded`` (the sequence number of each record()
        # call): a node recorded again moves to the back with its new number.
        self._dirty: dict[str, int] = {}
        self._events: deque[tuple[int, HistoryEvent]] = deque()
        self._touched: set[str] = set()
        self._recorded = 0
        self._committed = 0
        """Every record() up to this number is in the store."""
        self.last_event_id = 0
        """The id of the last event recorded (committed or not): what the registry's state
        includes. Continues from the store's (``continue_from``)."""
        self.committed_event_id = 0
        """The id of the last event committed and handed to the listeners."""
        self.stored_event_id = 0
        """The store's last event when it was opened: ids between it and this run's first
        were handed out by a run before and lost (``continue_from``)."""
        self.run_start_id = 0
        """Where this run's ids start: its first event is the one after."""
        self._listeners: list[Callable[[list[HistoryEvent]], None]] = []
        self._rejected: set[int] = set()
        self._callbacks: deque[tuple[int, Callable[[], None]]] = deque()
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()
        self._wake = asyncio.Event()
        self._failure: str | None = None
        self._stop = asyncio.Event()
        self.commits = 0
        self.rows_written = 0
        self.failures = 0
        self.events_dropped = 0
        self.rows_rejected = 0

    # --- what the write path calls (synchronous, cheap) --------------------------------------

    @property
    def available(self) -> bool:
        return self._failure is None

    @property
    def failure(self) -> str | None:
        """Why the store is unavailable, None while it works."""
        return self._failure

    @property
    def backlog(self) -> int:
        return len(self._dirty) + len(self._touched) + len(self._events)

    def check_available(self) -> None:
        if self._failure is not None:
            raise StoreUnavailableError(self._failure)

    def continue_from(self, last_event_id: int, run_block: int | None = None) -> None:
        """Number this run's events after the store's last one (once it is open, before any
        record), from the next multiple of ``RUN_IDS``: a run before may have handed out ids
        past the store's last (``GET /nodes``'s ``event_id`` counts events not yet committed)
        and lost them in a stop or a crash; never used again, a client that holds one is told
        its position is gone rather than silently skipping the events that now bear it.
        ``memory://`` starts a new store with each process: no run came before. ``run_block``:
        the block the store reserved for this run (a shared store, ``reserve_run``)."""
        self.stored_event_id = last_event_id
        if run_block is not None:
            last_event_id = run_block * RUN_IDS
        elif not self._sync_memory:
            last_event_id = (last_event_id // RUN_IDS + 1) * RUN_IDS
        self.last_event_id = self.committed_event_id = self.run_start_id = last_event_id

    def on_commit(self, listener: Callable[[list[HistoryEvent]], None]) -> None:
        """Call ``listener`` with the events of each commit, in id order, once committed. It
        runs in the writer's task: it must be quick and must not raise."""
        self._listeners.append(listener)

    def record(self, events: list[Event]) -> None:
        """Registrations, transitions and deletes: durable with the next commit."""
        if self._sync_memory:
            assert isinstance(self.store, MemoryStore)
            history = [self._history(e) for e in events]
            self.store.append(Batch(events=history))
            self._announce(history)
            return
        # One pass, no list in between: this runs once per registration (bench/README.md
        # section 20).
        self._recorded += 1
        seq = self._recorded
        dirty = self._dirty
        queue = self._events
        for event in events:
            node_id = event.node_id
            dirty.pop(node_id, None)
            dirty[node_id] = seq
            queue.append((seq, self._history(event)))
        if len(self._events) > MAX_QUEUED_EVENTS:
            overflow = len(self._events) - MAX_QUEUED_EVENTS
            for _ in range(overflow):
                self._events.popleft()
            self.events_dropped += overflow
        self._wake.set()

    def _history(self, event: Event) -> HistoryEvent:
        """The event as it is kept, numbered after the last one recorded."""
        self.last_event_id = event_id = self.last_event_id + 1
        if type(event) is NodeTransitioned:
            return HistoryEvent(event_id, event.node_id, event.node_type, event.location,
                                event.previous, event.status, event.reason, event.since,
                                event.last_seen)
        assert isinstance(event, NodeDeleted)
        return HistoryEvent(event_id, event.node_id, event.node_type, event.location,
                            event.previous, "deleted", "deleted", event.at, event.last_seen)

    def touch(self, node_id: str) -> None:
        """A heartbeat changed ``last_seen`` and telemetry: written behind."""
        if not self._sync_memory:
            self._touched.add(node_id)

    def when_durable(self, callback: Callable[[], None]) -> None:
        """Call ``callback`` once everything recorded so far is committed."""
        if self._committed >= self._recorded:
            callback()
            return
        if len(self._callbacks) >= MAX_CALLBACKS:
            self._callbacks.popleft()  # the oldest reply is dropped; its agent asks again
        self._callbacks.append((self._recorded, callback))

    async def durable(self, timeout_s: float) -> None:
        """Wait until everything recorded so far is committed; StoreUnavailableError after
        ``timeout_s`` or as soon as the store fails (the change stays queued and is written
        once the store is back)."""
        if self._committed >= self._recorded:
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((self._recorded, future))
        if self._failure is not None:
            future.set_exception(StoreUnavailableError(self._failure))
        try:
            async with asyncio.timeout(timeout_s):
                await future
        except TimeoutError:
            raise StoreUnavailableError(
                self._failure or f"the store did not commit within {timeout_s:g} s") from None

    # --- the loop ----------------------------------------------------------------------------

    async def run(self) -> None:
        delay = RETRY_FIRST_S
        last_flush = last_ping = self._monotonic()
        while not self._stop.is_set():
            touches = False
            try:
                now = self._monotonic()
                if now - last_ping >= PING_EVERY_S:
                    # Watched even when idle or busy: a broken store is known (and /readyz
                    # says so) before a registration has to find out, and a PostgreSQL lock
                    # lost with its connection is taken back (or the store is refused).
                    last_ping = now
                    async with asyncio.timeout(WRITE_DEADLINE_S):
                        await self.store.ping()
                    if self._committed >= self._recorded and not self._touched:
                        self._recovered()
                    continue
                if self._committed >= self._recorded:
                    self._wake.clear()
                    wait = PING_EVERY_S - (now - last_ping)
                    if self._touched:
                        wait = min(wait, self._flush_interval_s - (now - last_flush))
                    if wait > 0:
                        with contextlib.suppress(TimeoutError):
                            async with asyncio.timeout(wait):
                                await self._wake.wait()
                        continue
                # A commit for registrations and transitions carries the heartbeats' touches
                # only once they are due: writing every touched node with each one made it
                # take tens of milliseconds under load, and an acknowledgement (or the watch
                # stream) waits for it.
                touches = (self._committed >= self._recorded
                           or now - last_flush >= self._flush_interval_s)
                if not self._may_write():
                    raise FencedError("the lease lapsed before this write")
                async with asyncio.timeout(WRITE_DEADLINE_S):
                    await self.flush_once(touches)
            except FencedError as exc:
                self._fence(str(exc))
                return
            except (StoreError, TimeoutError) as exc:
                self._failed(exc if isinstance(exc, StoreError) else StoreError(
                    f"store {self.store.url} did not answer within {WRITE_DEADLINE_S:g} s"))
                with contextlib.suppress(TimeoutError):  # a stop request cuts the wait short
                    async with asyncio.timeout(delay):
                        await self._stop.wait()
                delay = min(delay * 2, RETRY_MAX_S)
                continue
            self._recovered()
            delay = RETRY_FIRST_S
            if touches:
                last_flush = self._monotonic()

    def _fence(self, why: str) -> None:
        self.fenced = why
        log.warning("store_writes_fenced store=%s backlog=%d reason=%s", self.store.url,
                    self.backlog, why)
        self._failed(StoreError(f"this manager is no longer the active one: {why}"))
        self.on_fenced(why)

    def _failed(self, exc: StoreError) -> None:
        self.failures += 1
        if self._failure is None:
            log.error("store_unavailable store=%s error=%s", self.store.url, exc)
        self._failure = str(exc)
        self._fail_waiters()

    def _recovered(self) -> None:
        if self._failure is not None:
            log.warning("store_recovered store=%s", self.store.url)
            self._failure = None

    async def flush_once(self, touches: bool = True) -> None:
        """Write one batch of what is queued: dirty nodes, events and, with ``touches``, the
        touched nodes."""
        target = self._recorded
        taken = list(itertools.islice(self._dirty.items(), MAX_BATCH))
        for node_id, _ in taken:
            del self._dirty[node_id]
        events = [self._events.popleft() for _ in range(min(MAX_BATCH, len(self._events)))]
        touched: set[str] = set()
        if touches:
            touched, self._touched = self._touched, touched
        batch = Batch(events=[e for _, e in events])
        try:
            await self._build(batch, [node_id for node_id, _ in taken], touched)
            if len(batch):
                self._rejected.clear()
                await self._write_isolating(batch)
        except BaseException:
            # Nothing is lost: put it all back, in front, for the next attempt (the nodes'
            # current state is read again then).
            merged = {node_id: min(seq, self._dirty.get(node_id, seq)) for node_id, seq in taken}
            for node_id, seq in self._dirty.items():
                merged.setdefault(node_id, seq)
            self._dirty = merged
            self._events.extendleft(reversed(events))
            self._touched |= touched
            raise
        self.commits += 1
        self.rows_written += len(batch)
        if batch.events:
            rejected = self._rejected
            self._announce([e for e in batch.events if e.id not in rejected] if rejected
                            else batch.events)
        # Everything recorded before the oldest change still queued is in the store now.
        oldest = min((seq for seq in (next(iter(self._dirty.values()), None),
                                      self._events[0][0] if self._events else None)
                      if seq is not None), default=None)
        committed = target if oldest is None else min(target, oldest - 1)
        if committed > self._committed:
            self._committed = committed
            self._release()

    async def _write_isolating(self, batch: Batch) -> None:
        """Write the batch; if the store refuses some value in it, write the rest and drop
        that row alone (counted and logged), so one bad row never blocks the fleet."""
        try:
            await self.store.write(batch)
        except StoreDataError as exc:
            if len(batch) == 1:
                self.rows_rejected += 1
                if batch.events:
                    self._rejected.add(batch.events[0].id)
                log.error("store_row_rejected store=%s error=%s batch=%r", self.store.url, exc,
                          batch)
                return
            for half in batch.halves():
                await self._write_isolating(half)

    def _announce(self, events: list[HistoryEvent]) -> None:
        if not events:
            return
        self.committed_event_id = events[-1].id
        for listener in self._listeners:
            try:
                listener(events)
            except Exception:
                log.exception("store_commit_listener_failed")

    def stop(self) -> None:
        """Let ``run`` return after the batch in hand (cancelling it mid-write could write a
        batch twice); ``close`` then writes the rest."""
        self._stop.set()
        self._wake.set()

    async def close(self, timeout_s: float) -> bool:
        """Write everything still queued (shutdown); False if that failed or took too long."""
        if self._sync_memory:
            return True
        if self.fenced is not None or not self._may_write():
            if self.backlog:
                log.warning("store_not_flushed store=%s backlog=%d reason=not the active "
                            "manager any more", self.store.url, self.backlog)
            return False
        try:
            async with asyncio.timeout(timeout_s):
                while self._dirty or self._events or self._touched:
                    await self.flush_once()
        except (StoreError, TimeoutError) as exc:
            log.error("store_not_flushed store=%s backlog=%d error=%s", self.store.url,
                      self.backlog, exc)
            return False
        return True

    async def _build(self, batch: Batch, dirty: list[str], touched: set[str]) -> None:
        nodes = self._registry
        for start in range(0, len(dirty), BUILD_SLICE):
            for node_id in dirty[start:start + BUILD_SLICE]:
                node = nodes.get(node_id)
                if node is None:
                    batch.deletes.append(node_id)
                else:
                    batch.upserts.append(node_row(node))
                    touched.discard(node_id)
            if start + BUILD_SLICE < len(dirty):
                await asyncio.sleep(0)
        for count, node_id in enumerate(touched, 1):
            node = nodes.get(node_id)
            if node is not None:
                batch.touches.append(touch_row(node))
            if not count % (4 * BUILD_SLICE):
                await asyncio.sleep(0)

    def _fail_waiters(self) -> None:
        """Answer everyone waiting at once (503); their changes stay queued for the retry."""
        assert self._failure is not None
        while self._waiters:
            _, future = self._waiters.popleft()
            if not future.done():
                future.set_exception(StoreUnavailableError(self._failure))

    def _release(self) -> None:
        committed = self._committed
        while self._waiters and self._waiters[0][0] <= committed:
            _, future = self._waiters.popleft()
            if not future.done():
                future.set_result(None)
        while self._callbacks and self._callbacks[0][0] <= committed:
            _, callback = self._callbacks.popleft()
            try:
                callback()
            except Exception:
                log.exception("store_callback_failed")
