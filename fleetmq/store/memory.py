"""``memory://``: nothing survives the process (tests, demos). The registry itself holds the
nodes; this keeps only a bounded history, so the events route and the watch stream work the
same everywhere."""

from __future__ import annotations

import bisect
import itertools
import operator
import secrets
from collections import deque
from collections.abc import AsyncGenerator

from fleetmq.store.base import Batch, HistoryEvent, NodeRow, StoredEvent

EVENTS_PER_NODE = 100
"""History kept per node in memory; older events are forgotten first."""
RECENT_EVENTS = 100_000
"""Events of every node kept in order for the watch stream's resume (``events_after``): a
client further behind than this is told to reset."""

_History = HistoryEvent | list[HistoryEvent]
"""A node's only event is kept alone, more in a list: a list costs 88 bytes more per node, and a
million registered nodes mostly have one event each."""


_event_id = operator.attrgetter("id")


def _listed(history: _History) -> list[HistoryEvent]:
    return history if isinstance(history, list) else [history]


class MemoryStore:
    keeps_nodes = False

    def __init__(self) -> None:
        self.url = "memory://"
        self.store_id = secrets.token_hex(8)  # one per process: nothing outlives it
        self.last_event_id = 0
        self._events: dict[str, _History] = {}
        self._recent: deque[HistoryEvent] = deque(maxlen=RECENT_EVENTS)
        """The same records as ``_events`` (shared, not copied), in id order."""

    async def open(self) -> None:
        return None

    async def load(self) -> AsyncGenerator[list[NodeRow], None]:
        return
        yield []  # an async generator that yields nothing

    async def write(self, batch: Batch) -> None:
        self.append(batch)

    def append(self, batch: Batch) -> None:
        """Synchronous: the writer calls it in place of ``write`` for a store in memory."""
        for event in batch.events:
            history = self._events.get(event.node_id)
            if history is None:
                self._events[event.node_id] = event
            elif isinstance(history, list):
                history.append(event)
                if len(history) > EVENTS_PER_NODE:
                    del history[0]
            else:
                self._events[event.node_id] = [history, event]
        self._recent.extend(batch.events)

    async def events(self, node_id: str, limit: int, before: int | None) -> list[StoredEvent]:
        found = []
        history = self._events.get(node_id)
        for event in reversed(_listed(history) if history is not None else []):
            if before is not None and event.id >= before:
                continue
            found.append(event)
            if len(found) == limit:
                break
        return found

    async def events_after(self, after: int, upto: int, limit: int) -> list[StoredEvent]:
        recent = self._recent
        if not recent or recent[-1].id <= after:
            return []
        start = bisect.bisect_right(recent, after, key=_event_id)  # ids increase along it
        found: list[StoredEvent] = []
        for event in itertools.islice(recent, start, None):
            if event.id > upto or len(found) == limit:
                break
            found.append(event)
        return found

    async def first_event_id(self) -> int | None:
        return self._recent[0].id if self._recent else None

    async def prune(self, older_than: float) -> int:
        dropped = 0
        for node_id in list(self._events):
            history = _listed(self._events[node_id])
            keep = 0
            while keep < len(history) and history[keep].at < older_than:
                keep += 1
            if keep:
                dropped += keep
                if keep == len(history):
                    del self._events[node_id]
                else:
                    self._events[node_id] = history[keep:]
        recent = self._recent
        while len(recent) > 1 and recent[0].at < older_than:  # the newest stays, as elsewhere
            recent.popleft()
        return dropped

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        return None
