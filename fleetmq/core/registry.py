"""The node registry: a pure state machine over nodes, deadlines and sessions (contract §3).

It takes validated requests and an ``Instant`` and returns the events they caused. It does no
I/O and reads no clock, and it has exactly one writer (the app's ingest path on the event loop),
so readers on the same loop always see a consistent node.

Expiry is deadline-based and costs O(expired) per call: nodes sharing a timeout sit in one
insertion-ordered map, and since every refresh happens at a later moment than the one before,
each map is ordered by deadline; expiry only looks at the front of each map. A due node that
a message still waiting to be applied may refresh is set aside in one more map, looked at again
by each call until that message has refreshed it or turned out not to.
"""

from __future__ import annotations

import itertools
import json
import operator
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from pydantic_core import to_json

from fleetmq.core.clock import Instant
from fleetmq.core.events import Event, NodeDeleted, NodeTransitioned
from fleetmq.core.index import StatusIndex
from fleetmq.core.models import HeartbeatRequest, RegisterRequest, Scalar, Status
from fleetmq.core.texts import SharedTexts

TIMEOUT_FACTOR = 3
def _dump(value: object) -> str:
    """Compact JSON text (pydantic's serializer: 8 times as fast as json.dumps here)."""
    return to_json(value).decode()
_seen_mono = operator.attrgetter("seen_mono")

Waiting = Callable[[str, float], bool]
"""``waiting(node_id, deadline)``: is a message that may refresh that node, received at or
before that deadline, still waiting to be applied?"""


@dataclass(slots=True, eq=False)
class Node:
    """Registry state of one node. Slotted: a fleet of a million must fit in memory."""

    id: str
    type: str
    name: str
    capabilities_json: str
    """Kept as JSON text: a third of the memory of a tuple of strings, stored and served as
    is (only the REST view and the store read it)."""
    location: str | None
    metadata_json: str
    """JSON text too: a dict of a few entries costs several hundred bytes per node."""
    interval_s: int
    """Effective heartbeat interval: declared, else the manager's default."""
    declared_interval: bool
    timeout_s: float
    registered_at: float
    last_seen: float
    seen_mono: float
    status: Status
    status_reason: str
    status_since: float
    session: str | None = None
    uptime_seconds: int | None = None
    free_memory_kb: int | None = None
    sensors_active: int | None = None
    deadline: float | None = None
    """Monotonic moment of silence after which the node is offline; None while offline."""
    view: bytes | None = field(default=None, repr=False)
    """Serialized REST form, kept until the node changes (the HTTP layer fills it)."""

    @property
    def capabilities(self) -> tuple[str, ...]:
        return tuple(json.loads(self.capabilities_json))

    @property
    def metadata(self) -> dict[str, Scalar]:
        result: dict[str, Scalar] = json.loads(self.metadata_json)
        return result


class NodeNotFoundError(LookupError):
    def __init__(self, node_id: str) -> None:
        super().__init__(node_id)
        self.node_id = node_id


class NodeConflictError(Exception):
    def __init__(self, node_id: str, existing_type: str, claimed_type: str) -> None:
        super().__init__(node_id)
        self.node_id = node_id
        self.existing_type = existing_type
        self.claimed_type = claimed_type


@dataclass(frozen=True, slots=True)
class Registered:
    node: Node
    created: bool
    events: list[Event]


# Not frozen: a frozen dataclass sets each field through object.__setattr__ (0.5 instead of
# 0.17 us for each heartbeat).
@dataclass(slots=True)
class HeartbeatApplied:
    node: Node
    events: list[Event]
    ignored: str | None = None
    """Why the message changed nothing on purpose (``late_will``), else None."""


class Registry:
    """All known nodes, their states and their deadlines."""

    def __init__(
        self, default_interval_s: int = 60, default_timeout_s: float | None = None,
        held_id: Callable[[str], str] | None = None,
    ) -> None:
        self.default_interval_s = default_interval_s
        self._held_id = held_id
        """An equal node id held elsewhere (a credential's, issued before the node registered),
        kept for a new node instead of the message's copy: ~60 bytes a node."""
        self.default_timeout_s = (
            default_timeout_s
            if default_timeout_s is not None
            else float(TIMEOUT_FACTOR * default_interval_s)
        )
        self._nodes: dict[str, Node] = {}
        # Sorted ids are rebuilt on read when nodes came or went: timsort merges the sorted
        # base with the few new ids in about O(n), where bisect.insort would cost O(n) for
        # every registration (a million re-registering after a restart).
        self._sorted: list[str] = []
        self._added: set[str] = set()
        self._removed: set[str] = set()
        self._queues: dict[float, OrderedDict[str, None]] = {}
        self._held: dict[str, None] = {}
        """Due nodes taken off their queue because a message of theirs was still waiting: each
        keeps its deadline until it expires or is scheduled again."""
        self._grace_from = float("-inf")
        self._index = StatusIndex(self._nodes.get)
        self._share = SharedTexts()
        self._timeouts: dict[float, float] = {}
        self.version = 0
        """Bumped by every change of any node: readers may cache what they derive from it."""

    # --- reading -------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._nodes)

    def get(self, node_id: str) -> Node | None:
        return self._nodes.get(node_id)

    def sorted_ids(self) -> list[str]:
        """Every id in sorted order, as of now. Later changes build a new list, so a reader
        may keep this one across awaits; it must not mutate it."""
        if self._added or self._removed:
            removed = self._removed
            base = [i for i in self._sorted if i not in removed] if removed else self._sorted
            self._sorted = sorted(itertools.chain(base, self._added))
            self._added = set()
            self._removed = set()
        return self._sorted

    def ids_with_status(self, status: Status, after: str | None = None) -> Iterator[str]:
        """Sorted ids greater than ``after`` of the nodes with ``status``, in O(1) per id read.
        A snapshot like ``sorted_ids``: a reader may await between items, and gets each node
        as it is then (skipping a node that has left the status meanwhile)."""
        return self._index.ids_after(status, after)

    def count(self, status: Status | None = None, node_type: str | None = None) -> int:
        """How many nodes have that status and type (case-insensitive), kept as they change."""
        return self._index.count(status, node_type)

    def counts_by_type(self) -> dict[str, int]:
        """How many nodes of each type (as registered), kept as they change: O(types)."""
        return self._index.by_type()

    def ids(self) -> list[str]:
        """Every id, in no particular order (cheaper than ``sorted_ids``)."""
        return list(self._nodes)

    def next_deadline(self) -> float | None:
        """The earliest deadline (monotonic), for sleeping until something can expire."""
        firsts = (self._nodes[next(iter(queue))] for queue in self._queues.values() if queue)
        held = (self._nodes[node_id] for node_id in self._held)
        return min(map(self._due, itertools.chain(firsts, held)), default=None)

    # --- writing -------------------------------------------------------------------------

    def register(self, node_id: str, req: RegisterRequest, now: Instant) -> Registered:
        self.version += 1
        interval = req.heartbeat_interval_seconds
        timeout = (
            self._timeout_of(float(TIMEOUT_FACTOR * interval)) if interval is not None
            else self.default_timeout_s
        )
        share = self._share
        node = self._nodes.get(node_id)
        created = node is None
        if node is None:
            if self._held_id is not None:
                node_id = self._held_id(node_id)
            node = Node(
                id=node_id, type=share(req.node_type), name=req.name or node_id,
                capabilities_json=share(_dump(req.capabilities)),
                location=share.optional(req.location), metadata_json=share(_dump(req.metadata)),
                interval_s=interval or self.default_interval_s,
                declared_interval=interval is not None, timeout_s=timeout,
                registered_at=now.wall, last_seen=now.wall, seen_mono=now.mono,
                status="online", status_reason="registered", status_since=now.wall,
                session=req.session,
            )
            self._nodes[node_id] = node
            self._index.add(node)
            if node_id in self._removed:
                self._removed.discard(node_id)  # deleted and back before a read: still listed
            else:
                self._added.add(node_id)
        else:
            if node.type.casefold() != req.node_type.casefold():
                raise NodeConflictError(node_id, node.type, req.node_type)
            self._unschedule(node)
            node.type = share(req.node_type)
            node.name = req.name or node_id
            node.capabilities_json = share(_dump(req.capabilities))
            node.location = share.optional(req.location)
            node.metadata_json = share(_dump(req.metadata))
            node.interval_s = interval or self.default_interval_s
            node.declared_interval = interval is not None
            node.timeout_s = timeout
            node.last_seen = now.wall
            node.seen_mono = now.mono
            if req.session is not None:
                node.session = req.session
        self._schedule(node)
        event = self._transition(node, "online", "registered", now, first=created)
        return Registered(node, created, [event])

    def heartbeat(self, node_id: str, req: HeartbeatRequest, now: Instant) -> HeartbeatApplied:
        node = self._nodes.get(node_id)
        if node is None:
            raise NodeNotFoundError(node_id)
        self.version += 1
        if req.status == "offline":
            return self._report_offline(node, req, now)
        node.last_seen = now.wall
        node.seen_mono = now.mono
        node.view = None
        if req.uptime_seconds is not None:
            node.uptime_seconds = req.uptime_seconds
        if req.free_memory_kb is not None:
            node.free_memory_kb = req.free_memory_kb
        if req.sensors_active is not None:
            node.sensors_active = req.sensors_active
        if req.session is not None:
            node.session = req.session
        self._reschedule(node)
        status: Status = req.status or "online"
        # A degraded node says why (contract sections 4 and 11); a new reason is news too.
        reason = req.reason if status == "degraded" and req.reason else "heartbeat"
        if status == node.status and reason in (node.status_reason, "heartbeat"):
            return HeartbeatApplied(node, [])
        return HeartbeatApplied(node, [self._transition(node, status, reason, now)])

    def restore(self, nodes: Iterable[Node]) -> None:
        """Put back nodes loaded from a store, into an empty registry. Nodes that were alive
        get their deadline back (the grace after start still applies); offline ones wait until
        they speak. A million take about two seconds."""
        assert not self._nodes, "restore() fills an empty registry"
        by_timeout: dict[float, list[Node]] = {}
        table = self._nodes
        # Texts are not shared here: four lookups per node cost start-up more than a second
        # at 1,000,000 (bench/startup.py, 6.98 -> 8.23 s); registrations share them again.
        for node in nodes:
            node.deadline = None
            node.view = None
            node.timeout_s = self._timeout_of(node.timeout_s)
            table[node.id] = node
            if node.status != "offline":
                node.deadline = node.seen_mono + node.timeout_s
                group = by_timeout.get(node.timeout_s)
                if group is None:
                    group = by_timeout[node.timeout_s] = []
                group.append(node)
        # Each deadline queue must be in deadline order: within one timeout, that is the order
        # of last_seen. Built in one go (OrderedDict.fromkeys runs in C).
        for timeout, group in by_timeout.items():
            group.sort(key=_seen_mono)
            self._queues[timeout] = OrderedDict.fromkeys(node.id for node in group)
        self._index.restore(table.values())
        # Sorted ids are built by the first read that needs them, not before being ready.
        self._sorted = []
        self._added = set(table)
        self._removed = set()
        self.version += 1

    def follow(self, nodes: Iterable[Node], gone: Iterable[str]) -> None:
        """A standby takes in what the active stored: nodes as they are stored now (each
        replaces the one known), and ids no longer stored. No events: they were the active's.
        A followed node joins the back of its deadline queue (a standby expires nothing; after
        a takeover the grace covers every node, and heartbeats put them in order again)."""
        table = self._nodes
        for node in nodes:
            known = table.get(node.id)
            if known is not None:
                self._unschedule(known)
                self._index.remove(known, known.status)
            elif node.id in self._removed:
                self._removed.discard(node.id)
            else:
                self._added.add(node.id)
            node.deadline = None
            node.view = None
            node.timeout_s = self._timeout_of(node.timeout_s)
            table[node.id] = node
            self._index.add(node)
            if node.status != "offline":
                self._schedule(node)
        for node_id in gone:
            self._drop(node_id)
        self.version += 1

    def delete(self, node_id: str, now: Instant) -> list[Event]:
        node = self._drop(node_id)
        if node is None:
            raise NodeNotFoundError(node_id)
        self.version += 1
        return [NodeDeleted(node_id, node.status, now.wall, node.last_seen, node.type,
                            node.location)]

    def _drop(self, node_id: str) -> Node | None:
        """Take a node out of the table, its deadline queue and the index (None: unknown)."""
        node = self._nodes.pop(node_id, None)
        if node is None:
            return None
        self._unschedule(node)
        self._index.remove(node, node.status)
        if node_id in self._added:
            self._added.discard(node_id)
        else:
            self._removed.add(node_id)
        return node

    def expire(
        self, now: Instant, limit: float | None = None, max_events: int | None = None,
        waiting: Waiting | None = None,
    ) -> list[Event]:
        """Take offline nodes whose deadline is at or before ``limit`` (default: now), at most
        ``max_events`` of them (call again while it returns that many).

        Expiry never runs ahead of ingest: a due node for which ``waiting`` says a message
        received by its deadline is still to be applied is set aside, not expired. Applying
        that message schedules it again (a heartbeat or a registration); a later call expires
        it once nothing of its is waiting any more (the message was refused, say). Cost:
        O(expired + set aside + distinct timeouts).
        """
        cutoff = now.mono if limit is None else min(limit, now.mono)
        budget = max_events if max_events is not None else len(self._nodes)
        events: list[Event] = []
        if self._held:
            self._expire_held(now, cutoff, budget, waiting, events)
        held = self._held
        for timeout, queue in self._queues.items():
            if self._grace_from + timeout > cutoff:
                continue
            while queue and len(events) < budget:
                node = self._nodes[next(iter(queue))]
                assert node.deadline is not None
                if node.deadline > cutoff:
                    break
                queue.popitem(last=False)
                if waiting is not None and waiting(node.id, node.deadline):
                    held[node.id] = None
                else:
                    events.append(self._time_out(node, now))
        if events:
            self.version += 1
        return events

    def grant_grace(self, now: Instant) -> None:
        """After a start or reconnect nobody could see heartbeats: no node expires before
        ``max(last_seen, now) + its timeout``."""
        self._grace_from = now.mono

    # --- internals -----------------------------------------------------------------------

    def _expire_held(self, now: Instant, cutoff: float, budget: int, waiting: Waiting | None,
                     events: list[Event]) -> None:
        """Expire the set-aside nodes whose message is no longer waiting (a grace granted
        since, or a lower limit, keeps them aside a while longer)."""
        for node_id in list(self._held):
            if len(events) >= budget:
                return
            node = self._nodes[node_id]
            deadline = node.deadline
            assert deadline is not None
            if self._due(node) > cutoff or (waiting is not None and waiting(node_id, deadline)):
                continue
            del self._held[node_id]
            events.append(self._time_out(node, now))

    def _due(self, node: Node) -> float:
        """When a scheduled node can expire: its deadline, or the end of a grace after it."""
        assert node.deadline is not None
        return max(node.deadline, self._grace_from + node.timeout_s)

    def _time_out(self, node: Node, now: Instant) -> Event:
        """The node, off its deadline queue already, goes offline for its silence."""
        node.deadline = None
        return self._transition(node, "offline", "heartbeat_timeout", now)

    def _timeout_of(self, timeout: float) -> float:
        """One float object per distinct timeout, not one per node (24 bytes each)."""
        return self._timeouts.setdefault(timeout, timeout)

    def _report_offline(self, node: Node, req: HeartbeatRequest, now: Instant) -> HeartbeatApplied:
        # An offline report is not proof of life: last_seen and telemetry stay as they are.
        if req.session is not None and node.session is not None and req.session != node.session:
            return HeartbeatApplied(node, [], ignored="late_will")
        if node.status == "offline":
            return HeartbeatApplied(node, [])
        self._unschedule(node)
        event = self._transition(node, "offline", req.reason or "reported", now)
        return HeartbeatApplied(node, [event])

    def _transition(
        self, node: Node, status: Status, reason: str, now: Instant, *, first: bool = False
    ) -> NodeTransitioned:
        previous = None if first else node.status
        if previous is not None and previous != status:
            node.status = status
            self._index.move(node, previous)
        node.status = status
        node.status_reason = reason
        node.status_since = now.wall
        node.view = None
        return NodeTransitioned(node.id, status, reason, now.wall, node.last_seen, previous,
                                node.type, node.location)

    def _schedule(self, node: Node) -> None:
        node.deadline = node.seen_mono + node.timeout_s
        queue = self._queues.get(node.timeout_s)
        if queue is None:
            queue = self._queues[node.timeout_s] = OrderedDict()
        queue[node.id] = None

    def _reschedule(self, node: Node) -> None:
        queue = self._queues.get(node.timeout_s) if node.deadline is not None else None
        if (self._held and self._release(node)) or queue is None:  # no call while none held
            self._schedule(node)
            return
        node.deadline = node.seen_mono + node.timeout_s
        queue.move_to_end(node.id)

    def _unschedule(self, node: Node) -> None:
        if node.deadline is not None:
            if not (self._held and self._release(node)):
                queue = self._queues[node.timeout_s]
                del queue[node.id]
                if not queue:
                    del self._queues[node.timeout_s]
            node.deadline = None

    def _release(self, node: Node) -> bool:
        """Take a scheduled node out of the set-aside ones; False if it is in its queue."""
        if node.id in self._held:
            del self._held[node.id]
            return True
        return False
