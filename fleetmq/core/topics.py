"""Builds and parses every MQTT topic fleetmq uses; no other module formats a topic string."""

from __future__ import annotations

import re
from enum import Enum
from typing import NamedTuple

NODE_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"
_NODE_ID = re.compile(NODE_ID_PATTERN)
_ROOT_LEVEL = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")


def is_valid_node_id(value: str) -> bool:
    return _NODE_ID.fullmatch(value) is not None


def is_valid_root(value: str) -> bool:
    """A root is one or more plain topic levels: no wildcards, no ``$``, no empty level."""
    return all(_ROOT_LEVEL.fullmatch(level) for level in value.split("/"))


class Kind(Enum):
    REGISTER = "register"
    HEARTBEAT = "heartbeat"
    STATUS = "status"
    SYNC = "sync"


class Parsed(NamedTuple):
    kind: Kind
    node_id: str
    """The topic's id level, not yet validated (may be anything but ``/``)."""


MANAGER_LEVEL = "_manager"


class Topics:
    """The topic layout under one root (``fleet`` by default)."""

    def __init__(self, root: str) -> None:
        self.root = root
        self._prefix = root + "/"
        self.register_filter = f"{root}/+/register"
        self.heartbeat_filter = f"{root}/+/heartbeat"
        self.status_filter = f"{root}/+/status"
        self.manager_status = f"{root}/{MANAGER_LEVEL}/status"
        self.sync = f"{root}/{MANAGER_LEVEL}/sync"

    def status(self, node_id: str) -> str:
        return f"{self._prefix}{node_id}/status"

    def reply(self, node_id: str) -> str:
        return f"{self._prefix}{node_id}/reply"

    def register(self, node_id: str) -> str:
        return f"{self._prefix}{node_id}/register"

    def heartbeat(self, node_id: str) -> str:
        return f"{self._prefix}{node_id}/heartbeat"

    def parse(self, topic: str) -> Parsed | None:
        """Map a received topic to what it is, or None for a topic we never subscribed to."""
        if not topic.startswith(self._prefix):
            return None
        rest = topic[len(self._prefix) :]
        node_id, sep, leaf = rest.partition("/")
        if not sep or "/" in leaf:
            return None
        if topic == self.sync:
            return Parsed(Kind.SYNC, node_id)
        try:
            kind = Kind(leaf)
        except ValueError:
            return None
        if kind is Kind.SYNC:
            return None
        return Parsed(kind, node_id)

    def is_foreign_reply_target(self, topic: str, sender_id: str) -> bool:
        """True where an MQTT 5 Response Topic must not be written to (section 6)."""
        if not topic or "+" in topic or "#" in topic or topic.startswith("$"):
            return True
        if topic == self.reply(sender_id):
            return False
        return topic == self.root or topic.startswith(self._prefix)
