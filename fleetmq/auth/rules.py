"""Who may do what: topic rules for every broker and REST permissions (contract section 8).

Pure decisions over a `Principal`; the caller has already authenticated it. A rule refuses by
default: anything not granted below, or not understood (a malformed filter), is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from fleetmq.core.topics import Topics, is_valid_node_id, is_valid_root

Role = Literal["read", "write", "admin", "broker", "enroll"]
ROLES: tuple[Role, ...] = get_args(Role)
BROKER_ROLES: tuple[Role, ...] = ("read", "write", "admin")
"""Key roles with rights on a broker (broker and enroll keys serve REST only)."""

KEY_IDENTITY_PREFIX = "_key."
# The same prefix as config.CLIENT_ID_PREFIX, repeated so that this module stays pure.
MANAGER_CLIENT_PREFIX = "_fleetmq"
_SHARE_PREFIX = "$share/"


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated identity: an API key, a node credential, or the manager itself."""

    kind: Literal["key", "node", "manager"]
    id: str
    """The key id, the node id, or the manager's client id."""
    role: Role | None = None
    """Keys only."""

    def __post_init__(self) -> None:
        if self.kind == "key" and self.role is None:
            raise ValueError(f"key {self.id[:64]!r} needs a role, one of {ROLES}")
        if self.kind != "key" and self.role is not None:
            raise ValueError(f"only keys have a role, not the {self.kind} {self.id[:64]!r}")

    @property
    def broker_identity(self) -> str | None:
        """Username and client id on the broker; None for the manager (it has several)."""
        if self.kind == "key":
            return KEY_IDENTITY_PREFIX + self.id
        return self.id if self.kind == "node" else None

    @property
    def is_admin(self) -> bool:
        return self.kind == "key" and self.role == "admin"

    @property
    def writes_for_nodes(self) -> bool:
        """A write or admin key: a gateway or tool that speaks for any node."""
        return self.kind == "key" and self.role in ("write", "admin")


# --- MQTT topic filters (MQTT 3.1.1 section 4.7, MQTT 5 section 4.7) ---------------------------


def _is_valid_filter(text: str) -> bool:
    if not text or "\0" in text:
        return False
    levels = text.split("/")
    for i, level in enumerate(levels):
        if level == "#" and i != len(levels) - 1:
            return False  # `#` only as the last level
        if len(level) > 1 and ("+" in level or "#" in level):
            return False  # a wildcard fills its whole level
    return True


def _is_valid_topic(text: str) -> bool:
    return bool(text) and not any(ch in text for ch in "+#\0")


def topic_matches(filter: str, topic: str) -> bool:
    """True iff the subscription `filter` matches the concrete `topic`."""
    if not (_is_valid_filter(filter) and _is_valid_topic(topic)):
        return False
    levels, parts = filter.split("/"), topic.split("/")
    if topic.startswith("$") and levels[0] in ("+", "#"):
        return False  # wildcards in the first level never reach $SYS, $CONTROL, ...
    for i, level in enumerate(levels):
        if level == "#":
            return True  # also matches the parent: `a/#` matches `a`
        if i >= len(parts) or level not in ("+", parts[i]):
            return False
    return len(levels) == len(parts)


def filter_within(inner: str, outer: str) -> bool:
    """True iff every topic that `inner` can match is matched by `outer` too.

    Sound, not complete: where it says True the inclusion holds; a few exotic inclusions
    (`#` within `+/#`) are refused, which only ever refuses a subscription.
    """
    if not (_is_valid_filter(inner) and _is_valid_filter(outer)):
        return False
    ins, outs = inner.split("/"), outer.split("/")
    # Only a literal first level starting with `$` can match a `$` topic; a first-level
    # wildcard in `outer` would not match it.
    if ins[0].startswith("$") and outs[0] in ("+", "#"):
        return False
    for i, level in enumerate(ins):
        if i >= len(outs):
            return False
        if outs[i] == "#":
            return True
        if level == "#" or (outs[i] != "+" and level != outs[i]):
            return False  # a `+` in inner passes only a `+` (or `#`) in outer
    # `inner` matches topics of exactly its own depth; `a/#` also matches its parent `a`.
    return len(outs) == len(ins) or (len(outs) == len(ins) + 1 and outs[-1] == "#")


def split_shared(filter: str) -> str | None:
    """`$share/<group>/<filter>` -> `<filter>`, None for a malformed share, else unchanged."""
    if not filter.startswith(_SHARE_PREFIX):
        return filter
    group, sep, inner = filter[len(_SHARE_PREFIX):].partition("/")
    if not group or not sep or not inner or any(ch in group for ch in "+#\0"):
        return None
    return inner


# --- topic rules -------------------------------------------------------------------------------


class TopicRules:
    """Publish, will, subscribe, client id and response topic decisions under one root."""

    def __init__(self, root: str) -> None:
        if not is_valid_root(root):
            raise ValueError(f"invalid topic root {root[:64]!r}: expected plain topic levels")
        self.topics = Topics(root)
        self._prefix = root + "/"
        t = self.topics
        # Building filters through the topic layout with `+` as the id keeps one layout.
        self._read_filters = (t.status_filter,)  # covers <root>/_manager/status too
        self._write_filters = (t.status_filter, t.reply("+"))
        self._manager_filters = (t.register_filter, t.heartbeat_filter, t.status_filter, t.sync)

    def _id_level(self, topic: str) -> str | None:
        """The id level of `<root>/<id>/<leaf>`, when it is a valid node id."""
        if not topic.startswith(self._prefix):
            return None
        node_id, _, _ = topic[len(self._prefix):].partition("/")
        return node_id if is_valid_node_id(node_id) else None

    def publish_allowed(self, p: Principal, topic: str) -> bool:
        if not _is_valid_topic(topic) or topic.startswith("$"):
            return False
        t = self.topics
        if p.kind == "node":
            return is_valid_node_id(p.id) and topic in (t.register(p.id), t.heartbeat(p.id))
        node_id = self._id_level(topic)
        if p.kind == "manager":
            if topic in (t.manager_status, t.sync):
                return True
            return node_id is not None and topic in (t.status(node_id), t.reply(node_id))
        if p.writes_for_nodes:
            return node_id is not None and topic in (t.register(node_id), t.heartbeat(node_id))
        return False

    def will_allowed(self, p: Principal, topic: str) -> bool:
        """A will is judged as a publish at CONNECT, so no one leaves a will they could not send."""
        return self.publish_allowed(p, topic)

    def subscribe_filters(self, p: Principal) -> tuple[str, ...]:
        """The widest filters `p` may subscribe to; every allowed filter lies within one."""
        t = self.topics
        if p.kind == "manager":
            return self._manager_filters
        if p.kind == "node":
            if not is_valid_node_id(p.id):
                return ()
            return (t.reply(p.id), t.status(p.id), t.manager_status)
        if p.writes_for_nodes:
            return self._write_filters
        return self._read_filters if p.role == "read" else ()

    def subscribe_allowed(self, p: Principal, filter: str) -> bool:
        inner = split_shared(filter)
        if inner is None:
            return False
        return any(filter_within(inner, allowed) for allowed in self.subscribe_filters(p))

    def client_id_allowed(self, p: Principal, client_id: str) -> bool:
        """A client id names one identity only, so no one can take over another's session."""
        if p.kind == "manager":
            return client_id.startswith(MANAGER_CLIENT_PREFIX)
        return p.broker_identity is not None and client_id == p.broker_identity

    def response_topic_allowed(self, p: Principal, sender_node_id: str, topic: str) -> bool:
        """With auth on, an MQTT 5 Response Topic is honoured only if it is the sender's reply."""
        if not is_valid_node_id(sender_node_id) or topic != self.topics.reply(sender_node_id):
            return False
        if p.kind == "node":
            return sender_node_id == p.id
        return p.writes_for_nodes


# --- REST --------------------------------------------------------------------------------------

Action = Literal[
    "fleet_read",  # GET nodes, a node, events, summary, the watch stream
    "register",
    "heartbeat",
    "delete",
    "credentials_read",
    "credentials_issue",
    "credentials_revoke",
    "keys",
    "audit",
    "metrics",
    "enroll",
    "broker_hooks",
]
ACTIONS: tuple[Action, ...] = get_args(Action)

_READ: frozenset[Action] = frozenset({"fleet_read", "metrics"})
_WRITE: frozenset[Action] = _READ | {"register", "heartbeat", "delete"}
_BY_ROLE: dict[Role, frozenset[Action]] = {
    "read": _READ,
    "write": _WRITE,
    # Only enroll keys enroll: an enrollment must be traceable to the key that allowed it.
    "admin": frozenset(ACTIONS) - {"enroll"},
    "broker": frozenset({"broker_hooks"}),
    "enroll": frozenset({"enroll"}),
}
# A node speaks for itself only: register, heartbeat, GET its own node, rotate its credential.
_NODE_OWN: frozenset[Action] = frozenset({"register", "heartbeat", "fleet_read",
                                          "credentials_issue"})


def rest_allowed(p: Principal, action: Action, node_id: str | None = None) -> bool:
    """Whether `p` may perform `action`; `node_id` is the node the request is about, if one.

    Routes that list or stream the whole fleet pass `node_id=None`, which no node may read.
    """
    if p.kind == "key" and p.role is not None:
        return action in _BY_ROLE[p.role]
    if p.kind == "node":
        return action in _NODE_OWN and node_id is not None and node_id == p.id
    return False
