"""Nodes by status: sorted ids per status and counts by status and type, kept as the registry
changes, so that a filtered page or count costs O(limit), not O(matches) (contract §4).

A status change must stay cheap (a million nodes may go offline in one expiry wave), so each
status keeps a sorted ``base`` list and an unsorted ``pending`` list of ids that entered the
status since the base was built. Leaving a status costs nothing: an entry is valid only while
its node still has that status, and readers check it. Stale and duplicate entries are swept when
they outnumber the valid ones, by the next reader or by the next writer that adds an entry (the
lists only grow by additions, so memory stays within twice the most nodes a status has held):
O(1) amortized per change, and a registration storm or a mass expiry never waits for a sweep of
the status the nodes leave. A reader merges the base with the (few) pending ids; when there are
many, it rebuilds first.
"""

from __future__ import annotations

import bisect
import heapq
from collections.abc import Callable, Iterable, Iterator
from typing import Protocol

from fleetmq.core.models import STATUSES, Status

PENDING_READ = 4096
"""A reader sorts up to this many pending ids itself; more, and it rebuilds the base first."""
SLACK = 4096
"""Stale or pending entries tolerated beyond the valid ones before a rebuild."""


class Indexed(Protocol):
    @property
    def id(self) -> str: ...
    @property
    def type(self) -> str: ...
    @property
    def status(self) -> Status: ...


class _Ids:
    """The ids of one status: a sorted base, the ids added since, and how many are valid."""

    __slots__ = ("base", "count", "pending")

    def __init__(self) -> None:
        self.base: list[str] = []
        self.pending: list[str] = []
        self.count = 0


class StatusIndex:
    def __init__(self, lookup: Callable[[str], Indexed | None]) -> None:
        self._lookup = lookup
        self._by_status: dict[str, _Ids] = {status: _Ids() for status in STATUSES}
        self._types: dict[str, dict[str, int]] = {status: {} for status in STATUSES}
        """Per status, nodes by type as registered (case folded only when counted: a status
        change then costs two dict updates, not a case fold)."""

    # --- writing ---------------------------------------------------------------------------

    def add(self, node: Indexed) -> None:
        """A node now has ``node.status`` (new, or restored)."""
        ids = self._by_status[node.status]
        if not ids.count:  # whatever it lists is stale (all of a fleet that went offline)
            ids.base, ids.pending = [], []
        ids.pending.append(node.id)
        ids.count += 1
        types = self._types[node.status]
        types[node.type] = types.get(node.type, 0) + 1
        if len(ids.base) + len(ids.pending) > 2 * ids.count + SLACK:
            self._rebuild(node.status)

    def remove(self, node: Indexed, status: Status) -> None:
        """The node had ``status`` and has it no more (it changed, or the node is gone)."""
        ids = self._by_status[status]
        ids.count -= 1
        _drop(self._types[status], node.type)

    def restore(self, nodes: Iterable[Indexed]) -> None:
        """Fill an empty index with nodes loaded from a store, sorted in one go per status."""
        by_status: dict[str, list[str]] = {status: [] for status in STATUSES}
        for node in nodes:
            by_status[node.status].append(node.id)
            types = self._types[node.status]
            types[node.type] = types.get(node.type, 0) + 1
        for status, found in by_status.items():
            found.sort()
            ids = self._by_status[status]
            ids.base, ids.pending, ids.count = found, [], len(found)

    def move(self, node: Indexed, previous: Status) -> None:
        """The node's status changed from ``previous`` to ``node.status`` (one call on the
        expiry path, where a million may change at once)."""
        status = node.status
        old, new = self._by_status[previous], self._by_status[status]
        kind = node.type
        _drop(self._types[previous], kind)
        types = self._types[status]
        types[kind] = types.get(kind, 0) + 1
        old.count -= 1
        if not new.count:
            new.base, new.pending = [], []
        new.count += 1
        new.pending.append(node.id)
        if len(new.base) + len(new.pending) > 2 * new.count + SLACK:
            self._rebuild(status)

    # --- reading ---------------------------------------------------------------------------

    def count(self, status: Status | None = None, node_type: str | None = None) -> int:
        """Nodes with that status and type (type compared case-insensitively)."""
        if node_type is None:
            if status is None:
                return sum(ids.count for ids in self._by_status.values())
            return self._by_status[status].count
        want = node_type.casefold()
        statuses = STATUSES if status is None else (status,)
        return sum(n for s in statuses for kind, n in self._types[s].items()
                   if kind.casefold() == want)

    def by_type(self) -> dict[str, int]:
        """Nodes by type as registered (every status): O(types)."""
        counts: dict[str, int] = {}
        for types in self._types.values():
            for kind, n in types.items():
                counts[kind] = counts.get(kind, 0) + n
        return counts

    def ids_after(self, status: Status, after: str | None) -> Iterator[str]:
        """Ids of the nodes with ``status``, sorted, greater than ``after``.

        Reads a snapshot of the sorted ids, so a reader may pause (await) between items: each
        node is checked as it is when reached, and a node that came into the status later is
        not listed (as for the unfiltered list).
        """
        ids = self._by_status[status]
        if (len(ids.pending) > PENDING_READ
                or len(ids.base) + len(ids.pending) > 2 * ids.count + SLACK):
            self._rebuild(status)
        base = ids.base  # rebuilding makes a new list: this one stays as it is
        pending = sorted(ids.pending)
        start = bisect.bisect_right(base, after) if after is not None else 0
        extra = bisect.bisect_right(pending, after) if after is not None else 0
        merged: Iterator[str] = (
            heapq.merge(_tail(base, start), _tail(pending, extra)) if pending
            else _tail(base, start)
        )
        return self._valid(merged, status)

    # --- internals -------------------------------------------------------------------------

    def _valid(self, ids: Iterator[str], status: Status) -> Iterator[str]:
        lookup = self._lookup
        last = None
        for node_id in ids:
            if node_id == last:
                continue
            last = node_id
            node = lookup(node_id)
            if node is not None and node.status == status:
                yield node_id

    def _rebuild(self, status: Status) -> None:
        ids = self._by_status[status]
        if not ids.count:
            ids.base, ids.pending = [], []
            return
        lookup = self._lookup
        merged = sorted(ids.base + ids.pending) if ids.pending else ids.base
        fresh = [node_id for node_id in merged
                 if (node := lookup(node_id)) is not None and node.status == status]
        if ids.pending:  # a node may be listed twice (it left the status and came back)
            fresh = list(dict.fromkeys(fresh))
        ids.base = fresh
        ids.pending = []


def _drop(counts: dict[str, int], key: str) -> None:
    left = counts[key] - 1
    if left:
        counts[key] = left
    else:
        del counts[key]


def _tail(items: list[str], start: int) -> Iterator[str]:
    return iter(items) if start == 0 else (items[i] for i in range(start, len(items)))
