"""``memory://``: nothing survives the process (tests, demos). The registry itself holds the
nodes; this keeps only a bounded history, so the events route works the same everywhere."""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import AsyncGenerator

from fleetmq.store.base import Batch, NodeRow, StoredEvent

EVENTS_PER_NODE = 100
"""History kept per node in memory; older events are forgotten first."""


class MemoryStore:
    keeps_nodes = False

    def __init__(self) -> None:
        self.url = "memory://"
        self._events: dict[str, deque[StoredEvent]] = {}
        self._ids = itertools.count(1)

    async def open(self) -> None:
        return None

    async def load(self) -> AsyncGenerator[list[NodeRow], None]:
        return
        yield []  # an async generator that yields nothing

    async def write(self, batch: Batch) -> None:
        self.append(batch)

    def append(self, batch: Batch) -> None:
        """Synchronous: the writer calls it in place of ``write`` for a store in memory."""
        for e in batch.events:
            history = self._events.get(e.node_id)
            if history is None:
                history = self._events[e.node_id] = deque(maxlen=EVENTS_PER_NODE)
            history.append(StoredEvent(next(self._ids), e.node_id, e.from_status, e.to_status,
                                       e.reason, e.at))

    async def events(self, node_id: str, limit: int, before: int | None) -> list[StoredEvent]:
        found = []
        for event in reversed(self._events.get(node_id, ())):
            if before is not None and event.id >= before:
                continue
            found.append(event)
            if len(found) == limit:
                break
        return found

    async def prune(self, older_than: float) -> int:
        dropped = 0
        for node_id in list(self._events):
            history = self._events[node_id]
            while history and history[0].at < older_than:
                history.popleft()
                dropped += 1
            if not history:
                del self._events[node_id]
        return dropped

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        return None
