"""What the registry reports back: one event per transition or removal.

Events are plain frozen records; publishers (retained status, metrics) consume them and never
write back to the registry.
"""

from __future__ import annotations

from dataclasses import dataclass

from fleetmq.models import Status


@dataclass(frozen=True, slots=True)
class NodeTransitioned:
    """A node entered a state (or registered): published as its retained status."""

    node_id: str
    status: Status
    reason: str
    since: float
    last_seen: float
    previous: Status | None
    """The state before, None for a node registered for the first time."""


@dataclass(frozen=True, slots=True)
class NodeDeleted:
    """A node was decommissioned: its retained status is cleared."""

    node_id: str


Event = NodeTransitioned | NodeDeleted
