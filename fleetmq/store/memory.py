"""``memory://``: nothing survives the process (tests, demos). The registry itself holds the
nodes; this keeps only a bounded history, so the events route works the same everywhere."""

from __future__ import annotations

import itertools
from collections.abc import AsyncGenerator

from fleetmq.store.base import Batch, NodeRow, StoredEvent

EVENTS_PER_NODE = 100
"""History kept per node in memory; older events are forgotten first."""

_Event = tuple[int, str | None, str, str, float]
"""id, from, to, reason, at. A node's only event is kept as this tuple alone, more in a list:
about 170 bytes for a node with one event, where a ``StoredEvent`` in a ``deque`` cost over
1,000 (a million registered nodes: 0.8 GB)."""
_History = _Event | list[_Event]


def _listed(history: _History) -> list[_Event]:
    return history if isinstance(history, list) else [history]


class MemoryStore:
    keeps_nodes = False

    def __init__(self) -> None:
        self.url = "memory://"
        self._events: dict[str, _History] = {}
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
            event = (next(self._ids), e.from_status, e.to_status, e.reason, e.at)
            history = self._events.get(e.node_id)
            if history is None:
                self._events[e.node_id] = event
            elif isinstance(history, list):
                history.append(event)
                if len(history) > EVENTS_PER_NODE:
                    del history[0]
            else:
                self._events[e.node_id] = [history, event]

    async def events(self, node_id: str, limit: int, before: int | None) -> list[StoredEvent]:
        found = []
        history = self._events.get(node_id)
        for event_id, from_status, to_status, reason, at in reversed(
                _listed(history) if history is not None else []):
            if before is not None and event_id >= before:
                continue
            found.append(StoredEvent(event_id, node_id, from_status, to_status, reason, at))
            if len(found) == limit:
                break
        return found

    async def prune(self, older_than: float) -> int:
        dropped = 0
        for node_id in list(self._events):
            history = _listed(self._events[node_id])
            keep = 0
            while keep < len(history) and history[keep][4] < older_than:
                keep += 1
            if keep:
                dropped += keep
                if keep == len(history):
                    del self._events[node_id]
                else:
                    self._events[node_id] = history[keep:]
        return dropped

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        return None
