"""What every node store offers, and how a node becomes a row and back.

A store keeps the registry across restarts: one row per node and one row per event (the
history: registrations, transitions, deletions). It never decides anything: the registry does,
and ``StoreWriter`` hands the store what changed, in batches, one transaction each.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol, runtime_checkable

from fleetmq.core.clock import Instant
from fleetmq.core.registry import Node

SCHEMA_VERSION = 3
"""Bumped with every change of the tables; each store migrates older versions on open and
refuses newer ones. 2: events keep the node's type, location and last_seen, take their id from
the manager, and the store has an id of its own (``fleetmq_store``). 3: PostgreSQL's lease
(``fleetmq_lease``, high availability); nothing changes in SQLite."""

NODE_COLUMNS: tuple[str, ...] = (
    "id", "type", "name", "capabilities", "location", "metadata", "interval_s",
    "declared_interval", "timeout_s", "registered_at", "last_seen", "status", "status_reason",
    "status_since", "session", "uptime_seconds", "free_memory_kb", "sensors_active",
)
"""The order of a node row, in every store."""

TOUCH_COLUMNS: tuple[str, ...] = (
    "last_seen", "session", "uptime_seconds", "free_memory_kb", "sensors_active",
)
"""What a heartbeat changes: written behind, in batches (a touch row ends with the id)."""

LOAD_CHUNK = 20_000
NodeRow = tuple[Any, ...]
TouchRow = tuple[Any, ...]


class HistoryEvent(NamedTuple):
    """One event as it is kept and served (contract section 9): a transition, a registration
    (``from_status`` None the first time) or a deletion (``to_status`` and ``reason``
    ``"deleted"``), with the node's type, location and last_seen as they were then. ``id`` is
    drawn by the manager (``StoreWriter``), increasing within one store: writing a batch twice
    (its commit was in doubt) keeps one copy. Events migrated from schema version 1 may lack
    ``node_type``, ``location`` and ``last_seen`` (None). The fields are in the order of
    ``EVENT_COLUMNS``, SQLite's insert (sqlite.py writes these tuples as they are)."""

    id: int
    node_id: str
    node_type: str | None
    location: str | None
    from_status: str | None
    to_status: str
    reason: str
    at: float
    last_seen: float | None


StoredEvent = HistoryEvent
"""The same record, read back."""

EVENT_COLUMNS: tuple[str, ...] = (
    "id", "node_id", "node_type", "location", "from_status", "to_status", "reason", "at",
    "last_seen",
)
"""The order of an event row, in every store (``HistoryEvent``'s fields)."""


@dataclass(slots=True)
class Batch:
    """Everything one transaction writes."""

    upserts: list[NodeRow] = field(default_factory=list)
    deletes: list[str] = field(default_factory=list)
    touches: list[TouchRow] = field(default_factory=list)
    events: list[HistoryEvent] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.upserts) + len(self.deletes) + len(self.touches) + len(self.events)

    def halves(self) -> tuple[Batch, Batch]:
        """Two batches with half the rows each (to find a row the store refuses). Safe to
        write apart: a node is never both deleted and upserted in one batch, and touches
        leave out the nodes being upserted."""
        items = ([("upserts", r) for r in self.upserts] + [("deletes", d) for d in self.deletes]
                 + [("touches", t) for t in self.touches] + [("events", e) for e in self.events])
        middle = len(items) // 2
        parts = (Batch(), Batch())
        for index, (kind, item) in enumerate(items):
            getattr(parts[index >= middle], kind).append(item)
        return parts


class Store(Protocol):
    """A place the fleet survives restarts in. Every method may raise ``StoreError``."""

    url: str
    """Where it is, without secrets (for logs and errors)."""
    keeps_nodes: bool
    """False for ``memory://``: nothing survives the process, only the history is kept."""

    async def open(self) -> None:
        """Connect, create or migrate the schema; a clear StoreError when impossible."""

    def load(self) -> AsyncGenerator[list[NodeRow], None]:
        """Every stored node, as chunks of rows in ``NODE_COLUMNS`` order (a million rows at
        once would cost a gigabyte in passing). ``capabilities`` and ``metadata`` are JSON
        text, as written."""

    async def write(self, batch: Batch) -> None:
        """Apply the batch in one transaction, durable (synced) when this returns."""

    store_id: str
    """Drawn when the store was created and kept in it (``memory://``: one per process), so
    that event ids of another store are recognised; known once open. Hex digits only."""
    last_event_id: int
    """The highest event id the store has ever held, as found at ``open`` (0: none yet): the
    manager numbers the next events from there."""

    async def events(self, node_id: str, limit: int, before: int | None) -> list[StoredEvent]:
        """A node's events, newest first, with ids below ``before`` when given."""

    async def events_after(self, after: int, upto: int, limit: int) -> list[StoredEvent]:
        """Every node's events with ids above ``after`` and at most ``upto``, oldest first, at
        most ``limit`` (the watch stream's backlog)."""

    async def first_event_id(self) -> int | None:
        """The oldest event id kept, None while there is none."""

    async def prune(self, older_than: float) -> int:
        """Drop events before that wall-clock moment, except the newest event of all (it keeps
        ``last_event_id`` across a restart); returns how many."""

    async def ping(self) -> None:
        """Raise StoreError unless the store answers now."""

    async def close(self) -> None: ...


@runtime_checkable
class SharedStore(Protocol):
    """A store several managers share (PostgreSQL): one active, standbys following it."""

    dsn: str
    url: str
    epoch: int | None
    """The lease epoch this manager holds: every write checks it first."""

    async def follow(self, after: int, limit: int) -> tuple[int, list[NodeRow], list[str]]:
        """What changed after event ``after``: the last event id seen, the rows of the nodes
        touched as they are now, and the ids of those no longer stored."""

    async def max_event_id(self) -> int:
        """The store's last event id now."""

    async def reserve_run(self, at_least: int) -> int:
        """The block of event ids a new active numbers from (never one a run before took)."""


def node_row(node: Node) -> NodeRow:
    return (
        node.id, node.type, node.name, node.capabilities_json, node.location,
        node.metadata_json, node.interval_s, node.declared_interval, node.timeout_s,
        node.registered_at, node.last_seen, node.status, node.status_reason, node.status_since,
        node.session, node.uptime_seconds, node.free_memory_kb, node.sensors_active,
    )


def touch_row(node: Node) -> TouchRow:
    return (node.last_seen, node.session, node.uptime_seconds, node.free_memory_kb,
            node.sensors_active, node.id)


def nodes_from_rows(rows: Iterable[Sequence[Any]], now: Instant) -> list[Node]:
    """Rows straight into the registry's own objects (no pydantic: a million must load in
    seconds). The monotonic moment a node was last seen is derived from the wall clock."""
    wall, mono = now.wall, now.mono
    nodes: list[Node] = []
    append = nodes.append
    for (node_id, node_type, name, capabilities, location, metadata, interval_s, declared,
         timeout_s, registered_at, last_seen, status, reason, since, session, uptime,
         free_kb, sensors) in rows:
        # Positional: keyword arguments cost a third more at a million nodes.
        append(Node(
            node_id, node_type, name, capabilities, location, metadata, interval_s,
            bool(declared), timeout_s, registered_at, last_seen,
            mono - max(0.0, wall - last_seen), status, reason, since, session, uptime, free_kb,
            sensors,
        ))
    return nodes
