"""Counters the manager keeps about itself, and their exposition for ``GET /metrics``.

The hot paths (MQTT ingest, REST heartbeats) add to plain ints in ``Metrics``: no lock, no call.
A scrape reads them through ``FleetCollector``, a prometheus_client custom collector registered
on the app's own ``CollectorRegistry`` (never the library's global one: tests run several apps
in one process), and ``generate_latest`` writes the Prometheus text format with ``# HELP`` and
``# TYPE`` lines. Every gauge it reads is kept as the state changes, so a scrape costs the same
for ten nodes or a million.

Also the rate limiter for logging bad device input: one misbehaving device must not flood the
log, yet every drop stays counted.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

from prometheus_client import generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from fleetmq.core.models import STATUSES, Status

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
"""The format ``generate_latest`` writes (prometheus_client's ``CONTENT_TYPE_LATEST`` names
a newer one in recent releases, which this is not)."""

DROP_REASONS = (
    "invalid_json", "invalid_payload", "invalid_topic_id", "id_mismatch", "too_large",
    "retained", "unknown_node", "conflict", "late_will", "store_unavailable",
    "rate_limited", "internal_error",
)
"""Always exposed (zero included), so a dashboard's rate() has a series from the start."""


class Metrics:
    def __init__(self) -> None:
        self.mqtt_received = 0
        """Messages MQTT ingest took from the link; each is then counted once more, as
        applied, ignored or dropped by reason, so received = applied + ignored + dropped."""
        self.mqtt_applied = 0
        self.mqtt_ignored_topic = 0
        """Not for ingest: topics outside ours, and the manager's own status and
        reconciliation traffic."""
        self.dropped: Counter[str] = Counter()
        """MQTT messages dropped, by reason (``DROP_REASONS``, or a Rejection's own)."""
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
        self.takeovers = 0
        """Times this process became the active manager of a store another one held."""
        self.active = 0
        """1 while this process is the active manager (high availability), else 0."""
        self.lease_epoch = 0
        """The lease epoch held while active (PostgreSQL), else 0."""


@dataclass(frozen=True, slots=True)
class Readings:
    """What a scrape reads besides ``Metrics``; each must cost O(1), whatever the fleet."""

    nodes: Callable[[Status], int]
    """Nodes with a status (the registry's index keeps the counts)."""
    connected: Callable[[], bool]
    backlog: Callable[[], int]
    store: StoreFigures | None = None


def exposition(metrics: Metrics, readings: Readings) -> CollectorRegistry:
    """A registry of the app's own with its one collector: render it with ``render``."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FleetCollector(metrics, readings))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    """The Prometheus text format (``CONTENT_TYPE``)."""
    return generate_latest(registry)


class FleetCollector(Collector):
    """Reads ``Metrics`` and ``Readings`` at each scrape: the counting stays plain ints."""

    def __init__(self, metrics: Metrics, readings: Readings) -> None:
        self._metrics = metrics
        self._readings = readings

    def collect(self) -> Iterator[Metric]:
        m, r = self._metrics, self._readings
        nodes = GaugeMetricFamily("fleetmq_nodes", "Registered nodes by status "
                                  "(sum them for the fleet)", labels=["status"])
        for status in STATUSES:
            nodes.add_metric([status], r.nodes(status))
        yield nodes
        yield GaugeMetricFamily("fleetmq_broker_connected",
                                "1 while every broker connection of the manager is up",
                                value=int(r.connected()))
        yield GaugeMetricFamily("fleetmq_active",
                                "1 while this manager is the active one, 0 while standby "
                                "(summed over the managers of one store: exactly 1)",
                                value=m.active)
        yield GaugeMetricFamily("fleetmq_lease_epoch",
                                "The lease epoch this manager holds while active (PostgreSQL "
                                "store), else 0", value=m.lease_epoch)
        yield _counter("fleetmq_takeovers_total",
                       "Times this manager became active on a store another one held",
                       m.takeovers)
        yield GaugeMetricFamily("fleetmq_mqtt_backlog",
                                "Statuses and replies waiting to be published", value=r.backlog())
        yield _counter("fleetmq_mqtt_messages_received_total",
                       "MQTT messages taken by ingest; each is also counted once as applied, "
                       "ignored or dropped", m.mqtt_received)
        yield _counter("fleetmq_mqtt_messages_applied_total",
                       "MQTT registrations and heartbeats applied to the registry",
                       m.mqtt_applied)
        yield _counter("fleetmq_mqtt_messages_ignored_total",
                       "MQTT messages not for ingest (other topics, the manager's own status "
                       "and reconciliation traffic)", m.mqtt_ignored_topic)
        dropped = m.dropped
        yield _by_label("fleetmq_mqtt_messages_dropped_total",
                        "MQTT messages dropped, by reason", "reason",
                        {reason: dropped[reason] for reason in (*DROP_REASONS, *sorted(dropped))})
        transitions = m.transitions
        yield _by_label("fleetmq_transitions_total", "Node status transitions, by new status",
                        "status", {status: transitions[status] for status in STATUSES})
        yield _counter("fleetmq_status_published_total",
                       "Retained node statuses published (clears included)", m.status_published)
        yield _counter("fleetmq_replies_published_total", "Replies published to nodes",
                       m.replies_published)
        yield _counter("fleetmq_replies_overflowed_total",
                       "Replies dropped from a full reply queue (the oldest goes)",
                       m.replies_overflowed)
        yield _counter("fleetmq_response_topics_refused_total",
                       "MQTT 5 Response Topics refused (auth on: answers go to the node's own "
                       "reply topic)", m.response_topics_refused)
        hooks = CounterMetricFamily("fleetmq_broker_hook_answers_total",
                                    "Broker HTTP auth hook answers, by hook, result and reason",
                                    labels=["hook", "result", "reason"])
        for (hook, result, reason), count in sorted(m.broker_hooks.items()):
            hooks.add_metric([hook, result, reason], count)
        yield hooks
        refused = CounterMetricFamily("fleetmq_auth_refused_total",
                                      "REST requests refused by access control, by HTTP status "
                                      "and reason", labels=["status", "reason"])
        for code, reason in sorted(set(AUTH_REFUSALS) | set(m.auth_refused)):
            refused.add_metric([str(code), reason], m.auth_refused[(code, reason)])
        yield refused
        if r.store is not None:
            yield from _store_families(r.store)
        if m.broker_access is not None:
            yield from _broker_access_families(m.broker_access)


def _counter(name: str, documentation: str, value: int) -> CounterMetricFamily:
    return CounterMetricFamily(name, documentation, value=value)


def _by_label(name: str, documentation: str, label: str,
              values: dict[str, int]) -> CounterMetricFamily:
    family = CounterMetricFamily(name, documentation, labels=[label])
    for key, value in values.items():
        family.add_metric([key], value)
    return family


AUTH_REFUSALS: tuple[tuple[int, str], ...] = (
    (401, "missing"), (401, "malformed"), (401, "unknown"), (401, "expired"),
    (401, "revoked"), (403, "key"), (403, "node"), (429, "login_backoff"),
    (429, "enroll_rate"), (429, "key_rate"), (429, "node_rate"),
)
"""Always exposed (zero included), so a dashboard's rate() has a series from the start."""

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


def _broker_access_families(f: BrokerAccessFigures) -> Iterator[Metric]:
    broker = "Embedded broker (auth on): "
    yield _counter("fleetmq_broker_logins_accepted_total", broker + "logins accepted",
                   f.logins_accepted)
    yield _by_label("fleetmq_broker_logins_refused_total", broker + "logins refused, by reason",
                    "reason", {reason: f.logins_refused[reason] for reason in LOGIN_REFUSALS})
    for name, value, documentation in (
            ("logins_delayed", f.logins_delayed,
             "refused logins answered after the back-off delay"),
            ("publishes_refused", f.publishes_refused, "publishes refused by the topic rules"),
            ("subscriptions_refused", f.subscriptions_refused,
             "subscriptions refused by the topic rules"),
            ("connections_revoked", f.connections_revoked,
             "connections closed because their credential stopped working"),
            ("connections_cut", f.connections_cut, "connections of flooding nodes closed"),
            ("publishes_rate_limited", f.publishes_rate_limited,
             "publishes of an API key past its rate, dropped"),
            ("sessions_discarded", f.sessions_discarded, "persistent sessions dropped"),
            ("queue_dropped", f.queue_dropped,
             "messages dropped from a full offline queue")):
        yield _counter(f"fleetmq_broker_{name}_total", broker + documentation, value)


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


def _store_families(store: StoreFigures) -> Iterator[Metric]:
    yield GaugeMetricFamily("fleetmq_store_available", "1 while the node store accepts writes",
                            value=int(store.available))
    yield GaugeMetricFamily("fleetmq_store_backlog", "Changes waiting to be written to the store",
                            value=store.backlog)
    yield _counter("fleetmq_store_commits_total", "Store transactions committed", store.commits)
    yield _counter("fleetmq_store_rows_written_total", "Store rows written", store.rows_written)
    yield _counter("fleetmq_store_failures_total",
                   "Store writes that failed (each starts or prolongs an outage)", store.failures)
    yield _counter("fleetmq_store_events_dropped_total",
                   "History events dropped from the writer's full queue (the oldest go)",
                   store.events_dropped)
    yield _counter("fleetmq_store_rows_rejected_total",
                   "Rows the store refused as data and dropped alone", store.rows_rejected)


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
