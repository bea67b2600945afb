"""Counters the manager keeps about itself, rendered for ``GET /metrics`` (Prometheus text).

Also the rate limiter for logging bad device input: one misbehaving device must not flood the
log, yet every drop stays counted.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Protocol

DROP_REASONS = (
    "invalid_json", "invalid_payload", "invalid_topic_id", "id_mismatch", "too_large",
    "retained", "unknown_node", "conflict", "late_will", "store_unavailable",
    "rate_limited",
)


class Metrics:
    def __init__(self) -> None:
        self.mqtt_received = 0
        self.mqtt_applied = 0
        self.mqtt_ignored_topic = 0
        self.dropped: Counter[str] = Counter()
        self.http_requests = 0
        self.transitions: Counter[str] = Counter()
        self.status_published = 0
        self.replies_published = 0
        self.replies_overflowed = 0
        self.expiry_passes = 0
        self.response_topics_refused = 0
        self.broker_hooks: Counter[tuple[str, str, str]] = Counter()
        """HTTP auth hook answers by (hook, result, reason); refused callers are the gate's
        (``auth_refused``)."""
        self.auth_refused: Counter[tuple[int, str]] = Counter()
        """REST requests refused by access control, by (status, reason)."""
        self.broker_access: BrokerAccessFigures | None = None
        """The embedded broker's refusals and cuts, when it runs with auth."""

    def render(self, *, nodes: int, connected: bool, backlog: int,
               store: StoreFigures | None = None) -> str:
        lines = [
            "# TYPE fleetmq_nodes gauge",
            f"fleetmq_nodes {nodes}",
            "# TYPE fleetmq_broker_connected gauge",
            f"fleetmq_broker_connected {int(connected)}",
            "# TYPE fleetmq_mqtt_backlog gauge",
            f"fleetmq_mqtt_backlog {backlog}",
            "# TYPE fleetmq_mqtt_messages_received_total counter",
            f"fleetmq_mqtt_messages_received_total {self.mqtt_received}",
            "# TYPE fleetmq_mqtt_messages_applied_total counter",
            f"fleetmq_mqtt_messages_applied_total {self.mqtt_applied}",
            "# TYPE fleetmq_mqtt_messages_ignored_total counter",
            f"fleetmq_mqtt_messages_ignored_total {self.mqtt_ignored_topic}",
            "# TYPE fleetmq_mqtt_messages_dropped_total counter",
        ]
        lines += [
            f'fleetmq_mqtt_messages_dropped_total{{reason="{reason}"}} {self.dropped[reason]}'
            for reason in DROP_REASONS
        ]
        lines.append("# TYPE fleetmq_transitions_total counter")
        lines += [
            f'fleetmq_transitions_total{{status="{status}"}} {self.transitions[status]}'
            for status in ("online", "degraded", "offline")
        ]
        lines += [
            "# TYPE fleetmq_status_published_total counter",
            f"fleetmq_status_published_total {self.status_published}",
            "# TYPE fleetmq_replies_published_total counter",
            f"fleetmq_replies_published_total {self.replies_published}",
            "# TYPE fleetmq_replies_overflowed_total counter",
            f"fleetmq_replies_overflowed_total {self.replies_overflowed}",
            "# TYPE fleetmq_response_topics_refused_total counter",
            f"fleetmq_response_topics_refused_total {self.response_topics_refused}",
        ]
        lines.append("# TYPE fleetmq_broker_hook_answers_total counter")
        lines += [
            f'fleetmq_broker_hook_answers_total{{hook="{hook}",result="{result}",'
            f'reason="{reason}"}} {count}'
            for (hook, result, reason), count in sorted(self.broker_hooks.items())
        ]
        lines += _refusals(self.auth_refused)
        if store is not None:
            lines += [
                "# TYPE fleetmq_store_available gauge",
                f"fleetmq_store_available {int(store.available)}",
                "# TYPE fleetmq_store_backlog gauge",
                f"fleetmq_store_backlog {store.backlog}",
                "# TYPE fleetmq_store_commits_total counter",
                f"fleetmq_store_commits_total {store.commits}",
                "# TYPE fleetmq_store_rows_written_total counter",
                f"fleetmq_store_rows_written_total {store.rows_written}",
                "# TYPE fleetmq_store_failures_total counter",
                f"fleetmq_store_failures_total {store.failures}",
                "# TYPE fleetmq_store_events_dropped_total counter",
                f"fleetmq_store_events_dropped_total {store.events_dropped}",
                "# TYPE fleetmq_store_rows_rejected_total counter",
                f"fleetmq_store_rows_rejected_total {store.rows_rejected}",
            ]
        if self.broker_access is not None:
            lines += _broker_access_lines(self.broker_access)
        return "\n".join(lines) + "\n"


AUTH_REFUSALS: tuple[tuple[int, str], ...] = (
    (401, "missing"), (401, "malformed"), (401, "unknown"), (401, "expired"),
    (401, "revoked"), (403, "key"), (403, "node"), (429, "login_backoff"),
    (429, "enroll_rate"), (429, "key_rate"), (429, "node_rate"),
)
"""Always rendered (zero included), so a dashboard's rate() has a series from the start."""


def _refusals(refused: Counter[tuple[int, str]]) -> list[str]:
    lines = ["# TYPE fleetmq_auth_refused_total counter"]
    for status, reason in sorted(set(AUTH_REFUSALS) | set(refused)):
        lines.append(f'fleetmq_auth_refused_total{{status="{status}",reason="{reason}"}} '
                     f"{refused[(status, reason)]}")
    return lines


LOGIN_REFUSALS = ("missing", "malformed", "unknown", "expired", "revoked", "manager",
                  "identity", "role", "client_id", "will", "cut_off")
"""Why the embedded broker refused a CONNECT (``fleetmq.broker.access``)."""


class BrokerAccessFigures(Protocol):
    """What the embedded broker counts about access (``fleetmq.broker.access.AccessCounters``)."""

    logins_accepted: int
    logins_refused: Counter[str]
    logins_delayed: int
    publishes_refused: int
    subscriptions_refused: int
    connections_revoked: int
    connections_cut: int
    publishes_rate_limited: int
    sessions_discarded: int
    queue_dropped: int


def _broker_access_lines(f: BrokerAccessFigures) -> list[str]:
    lines = ["# TYPE fleetmq_broker_logins_accepted_total counter",
             f"fleetmq_broker_logins_accepted_total {f.logins_accepted}",
             "# TYPE fleetmq_broker_logins_refused_total counter"]
    lines += [f'fleetmq_broker_logins_refused_total{{reason="{reason}"}} '
              f"{f.logins_refused[reason]}" for reason in LOGIN_REFUSALS]
    for name, value in (("logins_delayed", f.logins_delayed),
                        ("publishes_refused", f.publishes_refused),
                        ("subscriptions_refused", f.subscriptions_refused),
                        ("connections_revoked", f.connections_revoked),
                        ("connections_cut", f.connections_cut),
                        ("publishes_rate_limited", f.publishes_rate_limited),
                        ("sessions_discarded", f.sessions_discarded),
                        ("queue_dropped", f.queue_dropped)):
        lines += [f"# TYPE fleetmq_broker_{name}_total counter",
                  f"fleetmq_broker_{name}_total {value}"]
    return lines


class StoreFigures(Protocol):
    """What the store writer tells about itself (``StoreWriter``)."""

    @property
    def available(self) -> bool: ...
    @property
    def backlog(self) -> int: ...
    commits: int
    rows_written: int
    failures: int
    events_dropped: int
    rows_rejected: int


class RateLimitedLog:
    """At most ``burst`` lines per ``window_s`` per key; the rest are summed into the next."""

    def __init__(self, logger: logging.Logger, burst: int = 5, window_s: float = 10.0) -> None:
        self._log = logger
        self._burst = burst
        self._window_s = window_s
        self._windows: dict[str, tuple[float, int, int]] = {}

    def warning(self, key: str, now: float, msg: str, *args: object) -> None:
        start, shown, suppressed = self._windows.get(key, (now, 0, 0))
        if now - start >= self._window_s:
            if suppressed:
                self._log.warning("log_suppressed key=%s count=%d", key, suppressed)
            start, shown, suppressed = now, 0, 0
        if shown < self._burst:
            self._log.warning(msg, *args)
            shown += 1
        else:
            suppressed += 1
        self._windows[key] = (start, shown, suppressed)
