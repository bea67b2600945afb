"""Carries registry changes to the store: group commits for what must be durable, write-behind
for heartbeats.

Registrations, deletes and transitions mark their node dirty and queue a history event; the
next commit writes every dirty node as it is *at that moment* (so a burst costs one sync, and
a node deleted meanwhile is deleted, not resurrected). Replies and REST answers wait for the
commit that covers them. Heartbeats only mark their node touched: ``last_seen`` and telemetry
go out at most ``flush_interval_s`` later, never one write per heartbeat.

When the store fails, everything stays queued and the writer retries with a backoff; the
registry keeps working in memory, and ``available`` tells writers that need the store to refuse.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable

from fleetmq.errors import StoreError
from fleetmq.events import Event, NodeTransitioned
from fleetmq.registry import Registry
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


class StoreUnavailableError(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class StoreWriter:
    def __init__(self, store: Store, registry: Registry, monotonic: Callable[[], float],
                 flush_interval_s: float = 1.0) -> None:
        self.store = store
        self._registry = registry
        self._monotonic = monotonic
        self._flush_interval_s = flush_interval_s
        self._sync_memory = isinstance(store, MemoryStore)
        self._dirty: dict[str, None] = {}
        self._touched: set[str] = set()
        self._events: deque[HistoryEvent] = deque()
        self._recorded = 0
        self._committed = 0
        self._callbacks: deque[tuple[int, Callable[[], None]]] = deque()
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()
        self._wake = asyncio.Event()
        self._failure: str | None = None
        self._stop = asyncio.Event()
        self.commits = 0
        self.rows_written = 0
        self.failures = 0
        self.events_dropped = 0

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

    def record(self, events: list[Event]) -> None:
        """Registrations, transitions and deletes: durable with the next commit."""
        history = [HistoryEvent(e.node_id, e.previous, e.status, e.reason, e.since)
                   for e in events if isinstance(e, NodeTransitioned)]
        if self._sync_memory:
            assert isinstance(self.store, MemoryStore)
            self.store.append(Batch(events=history))
            return
        for event in events:
            self._dirty[event.node_id] = None
        self._events.extend(history)
        if len(self._events) > MAX_QUEUED_EVENTS:
            overflow = len(self._events) - MAX_QUEUED_EVENTS
            for _ in range(overflow):
                self._events.popleft()
            self.events_dropped += overflow
        self._recorded += 1
        self._wake.set()

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
        ``timeout_s`` (the change stays queued and is written once the store is back)."""
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
        last_flush = self._monotonic()
        while not self._stop.is_set():
            if self._committed >= self._recorded:
                self._wake.clear()
                wait = (self._flush_interval_s - (self._monotonic() - last_flush)
                        if self._touched else None)
                if wait is None or wait > 0:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(wait):
                            await self._wake.wait()
                    continue
            try:
                await self.flush_once()
            except StoreError as exc:
                self.failures += 1
                if self._failure is None:
                    log.error("store_unavailable store=%s error=%s", self.store.url, exc)
                self._failure = str(exc)
                self._fail_waiters()
                with contextlib.suppress(TimeoutError):  # a stop request cuts the wait short
                    async with asyncio.timeout(delay):
                        await self._stop.wait()
                delay = min(delay * 2, RETRY_MAX_S)
                continue
            if self._failure is not None:
                log.warning("store_recovered store=%s", self.store.url)
                self._failure = None
            delay = RETRY_FIRST_S
            last_flush = self._monotonic()

    async def flush_once(self) -> None:
        """Write one batch of what is queued (dirty nodes, events, touched nodes)."""
        target = self._recorded
        dirty = list(self._dirty)[:MAX_BATCH] if len(self._dirty) > MAX_BATCH else list(
            self._dirty)
        for node_id in dirty:
            del self._dirty[node_id]
        events = [self._events.popleft() for _ in range(min(MAX_BATCH, len(self._events)))]
        complete = not self._dirty and not self._events
        touched = self._touched
        self._touched = set()
        batch = Batch(events=events)
        try:
            await self._build(batch, dirty, touched)
            if len(batch):
                await self.store.write(batch)
        except BaseException:
            # Nothing is lost: put it all back for the next attempt (current state is re-read).
            for node_id in dirty:
                self._dirty.setdefault(node_id, None)
            self._events.extendleft(reversed(events))
            self._touched |= touched
            raise
        self.commits += 1
        self.rows_written += len(batch)
        if complete:  # everything recorded up to target was in this batch
            self._committed = max(self._committed, target)
            self._release()

    def stop(self) -> None:
        """Let ``run`` return after the batch in hand (cancelling it mid-write could write a
        batch twice); ``close`` then writes the rest."""
        self._stop.set()
        self._wake.set()

    async def close(self, timeout_s: float) -> bool:
        """Write everything still queued (shutdown); False if that failed or took too long."""
        if self._sync_memory:
            return True
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
