"""What the registry reports back: one event per transition or removal.

Each carries the node as it was then (type, location, last_seen): the history and the watch
stream keep it after the node has changed or gone (contract section 9).

Events are plain immutable records (named tuples: a mass expiry makes a million of them, and a
tuple is built in a third of the time of a frozen dataclass); publishers (retained status,
store, metrics) consume them and never write back to the registry.
"""

from __future__ import annotations

from typing import NamedTuple

from fleetmq.core.models import Status


class NodeTransitioned(NamedTuple):
    """A node entered a state (or registered): published as its retained status."""

    node_id: str
    status: Status
    reason: str
    since: float
    last_seen: float
    previous: Status | None
    """The state before, None for a node registered for the first time."""
    node_type: str
    location: str | None


class NodeDeleted(NamedTuple):
    """A node was decommissioned: its retained status is cleared."""

    node_id: str
    previous: Status
    """Its state when deleted."""
    at: float
    last_seen: float
    node_type: str
    location: str | None


Event = NodeTransitioned | NodeDeleted
