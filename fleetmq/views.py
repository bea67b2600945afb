"""How fleetmq state looks on the wire: REST documents, status payloads and replies.

Every payload an agent may receive stays well under 512 bytes (PubSubClient's buffer).
"""

from __future__ import annotations

from collections import deque
from typing import Any

import orjson

from fleetmq.core.clock import format_timestamp
from fleetmq.core.events import NodeTransitioned
from fleetmq.core.models import Rejection
from fleetmq.core.registry import Node
from fleetmq.store.base import HistoryEvent

MSG_REGISTERED = "Node successfully registered"
MSG_UPDATED = "Node registration updated"


def dumps(value: Any) -> bytes:
    return orjson.dumps(value)


def node_document(node: Node) -> dict[str, Any]:
    return {
        "id": node.id,
        "name": node.name,
        "type": node.type,
        "capabilities": orjson.Fragment(node.capabilities_json),
        "location": node.location,
        "metadata": orjson.Fragment(node.metadata_json),
        "status": node.status,
        "status_reason": node.status_reason,
        "status_since": format_timestamp(node.status_since),
        "last_seen": format_timestamp(node.last_seen),
        "registered_at": format_timestamp(node.registered_at),
        "heartbeat_interval_seconds": node.interval_s,
        "uptime_seconds": node.uptime_seconds,
        "free_memory_kb": node.free_memory_kb,
        "sensors_active": node.sensors_active,
    }


VIEWS_KEPT = 100_000
"""At most this many REST forms are kept (about 0.5 KB each): a read of a whole large fleet
must not keep half a kilobyte per node for good (0.5 GB at 1,000,000 nodes)."""
_kept: deque[Node] = deque()
"""Nodes in the order their views were made; the oldest views go first. A node whose view was
dropped by a change and made again is in it twice: it may lose its view early, never late."""


def node_json(node: Node) -> bytes:
    """The node's REST form, serialized once per change of the node and kept for the
    ``VIEWS_KEPT`` most recently serialized nodes."""
    view = node.view
    if view is None:
        # An exact-size copy: orjson's own result keeps ~8 KiB of allocator chunk alive per
        # object (measured: 9 KB per node at 1M nodes instead of 0.5 KB).
        view = node.view = bytes(memoryview(orjson.dumps(node_document(node))))
        _kept.append(node)
        if len(_kept) > VIEWS_KEPT:
            _kept.popleft().view = None
    return view


def event_document(event: HistoryEvent) -> dict[str, Any]:
    """An event as the history route and the watch stream show it (contract section 9)."""
    return {
        "id": event.id,
        "node_id": event.node_id,
        "node_type": event.node_type,
        "location": event.location,
        "from": event.from_status,
        "to": event.to_status,
        "reason": event.reason,
        "at": format_timestamp(event.at),
        "last_seen": None if event.last_seen is None else format_timestamp(event.last_seen),
    }


def status_payload(node_id: str, status: str, reason: str, since: float, last_seen: float) -> bytes:
    return orjson.dumps({
        "node_id": node_id,
        "status": status,
        "reason": reason,
        "since": format_timestamp(since),
        "last_seen": format_timestamp(last_seen),
    })


def transition_payload(event: NodeTransitioned) -> bytes:
    return status_payload(event.node_id, event.status, event.reason, event.since, event.last_seen)


def node_status_payload(node: Node) -> bytes:
    return status_payload(node.id, node.status, node.status_reason, node.status_since,
                          node.last_seen)


def register_reply(node_id: str, *, created: bool, at: float) -> dict[str, Any]:
    return {
        "node_id": node_id,
        "status": "registered",
        "message": MSG_REGISTERED if created else MSG_UPDATED,
        "timestamp": format_timestamp(at),
    }


def heartbeat_reply(node: Node, at: float) -> dict[str, Any]:
    return {
        "node_id": node.id,
        "received": format_timestamp(at),
        "next_check_seconds": node.interval_s,
    }


def error_body(rejection: Rejection) -> dict[str, Any]:
    return {"error": rejection.title, "message": rejection.message}


def manager_status_payload(status: str, since: float | None, reason: str | None = None) -> bytes:
    body: dict[str, Any] = {"status": status}
    if since is not None:
        body["since"] = format_timestamp(since)
    if reason is not None:
        body["reason"] = reason
    return orjson.dumps(body)


def node_views(nodes: list[Node]) -> list[bytes]:
    """The REST form of each node (``node_json``), read in one pass: a page of nodes whose
    forms are cached costs a list, not a call per node."""
    return [node.view or node_json(node) for node in nodes]
