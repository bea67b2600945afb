"""``/metrics`` as prometheus_client writes it from fleetmq's plain counters: every family with
HELP and TYPE, the names and labels dashboards rely on, node gauges by status read from the
registry's index, and one registry per app."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from fleetmq.broker.access import AccessCounters
from fleetmq.core.clock import FakeClock
from fleetmq.core.models import STATUSES
from fleetmq.core.registry import Registry
from fleetmq.metrics import (
    AUTH_REFUSALS,
    DROP_REASONS,
    LOGIN_REFUSALS,
    Metrics,
    Readings,
    exposition,
    render,
)
from tests.unit.conftest import hb, reg

FAMILIES = {
    "fleetmq_nodes": "gauge",
    "fleetmq_broker_connected": "gauge",
    "fleetmq_active": "gauge",
    "fleetmq_lease_epoch": "gauge",
    "fleetmq_takeovers_total": "counter",
    "fleetmq_mqtt_backlog": "gauge",
    "fleetmq_mqtt_messages_received_total": "counter",
    "fleetmq_mqtt_messages_applied_total": "counter",
    "fleetmq_mqtt_messages_ignored_total": "counter",
    "fleetmq_mqtt_messages_dropped_total": "counter",
    "fleetmq_transitions_total": "counter",
    "fleetmq_status_published_total": "counter",
    "fleetmq_replies_published_total": "counter",
    "fleetmq_replies_overflowed_total": "counter",
    "fleetmq_response_topics_refused_total": "counter",
    "fleetmq_broker_hook_answers_total": "counter",
    "fleetmq_auth_refused_total": "counter",
}
"""What /metrics showed before prometheus_client (names as written in the text format)."""
STORE_FAMILIES = {
    "fleetmq_store_available": "gauge",
    "fleetmq_store_backlog": "gauge",
    "fleetmq_store_commits_total": "counter",
    "fleetmq_store_rows_written_total": "counter",
    "fleetmq_store_failures_total": "counter",
    "fleetmq_store_events_dropped_total": "counter",
    "fleetmq_store_rows_rejected_total": "counter",
}
BROKER_FAMILIES = {f"fleetmq_broker_{name}_total": "counter" for name in (
    "logins_accepted", "logins_refused", "logins_delayed", "publishes_refused",
    "subscriptions_refused", "connections_revoked", "connections_cut",
    "publishes_rate_limited", "sessions_discarded", "queue_dropped")}


class Store:
    available = True
    backlog = 4
    commits = 7
    rows_written = 30
    failures = 0
    events_dropped = 0
    rows_rejected = 1


def readings(registry: Registry, *, store: Store | None = None) -> Readings:
    return Readings(nodes=registry.count, connected=lambda: True, backlog=lambda: 2,
                    store=store)


def scrape(metrics: Metrics, registry: Registry, *,
           store: Store | None = None) -> tuple[str, dict[str, list[Sample]], dict[str, str]]:
    """The text, samples by written name, and each family's type by written name."""
    text = render(exposition(metrics, readings(registry, store=store))).decode()
    samples: dict[str, list[Sample]] = {}
    types: dict[str, str] = {}
    for family in text_string_to_metric_families(text):
        # The parser names a counter's family without the "_total" its samples carry.
        types[family.name + ("_total" if family.type == "counter" else "")] = family.type
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(sample)
    return text, samples, types


def value(samples: dict[str, list[Sample]], name: str, **labels: str) -> float:
    (found,) = [s.value for s in samples[name] if s.labels == labels]
    return found


def test_every_family_has_help_and_type_and_keeps_its_name_and_type() -> None:
    metrics = Metrics()
    metrics.broker_access = AccessCounters()
    text, _, types = scrape(metrics, Registry(60), store=Store())

    wanted = FAMILIES | STORE_FAMILIES | BROKER_FAMILIES
    assert types == wanted
    for name, kind in wanted.items():
        assert f"# TYPE {name} {kind}\n" in text
        (help_line,) = [line for line in text.splitlines()
                        if line.startswith(f"# HELP {name} ")]
        assert len(help_line) > len(f"# HELP {name} ") + 10  # says something
    comments = [line.split()[2] for line in text.splitlines() if line.startswith("#")]
    assert len(comments) == 2 * len(wanted)  # one HELP and one TYPE each, nothing twice


def test_store_and_broker_families_appear_only_where_they_exist() -> None:
    _, _, types = scrape(Metrics(), Registry(60))

    assert types == FAMILIES


def test_node_gauges_by_status_follow_the_registry(clock: FakeClock) -> None:
    registry = Registry(60)
    for i in range(5):
        registry.register(f"node-{i}", reg(), clock.now())
    registry.heartbeat("node-1", hb(status="degraded", reason="battery low"), clock.now())
    registry.heartbeat("node-2", hb(status="offline"), clock.now())
    registry.heartbeat("node-3", hb(status="offline"), clock.now())
    registry.delete("node-4", clock.now())
    _, samples, _ = scrape(Metrics(), registry)

    assert [s.labels["status"] for s in samples["fleetmq_nodes"]] == list(STATUSES)
    assert value(samples, "fleetmq_nodes", status="online") == 1
    assert value(samples, "fleetmq_nodes", status="degraded") == 1
    assert value(samples, "fleetmq_nodes", status="offline") == 2
    assert sum(s.value for s in samples["fleetmq_nodes"]) == len(registry)


def test_counters_keep_their_labels_and_show_every_known_reason_at_zero() -> None:
    metrics = Metrics()
    metrics.mqtt_received = 9
    metrics.mqtt_applied = 5
    metrics.mqtt_ignored_topic = 1
    metrics.dropped["late_will"] += 2
    metrics.dropped["something_new"] += 1  # a reason not listed yet still adds up
    metrics.transitions["offline"] += 1
    metrics.auth_refused[(403, "key")] += 3
    metrics.broker_hooks[("authenticate", "deny", "client_id")] += 1
    _, samples, _ = scrape(metrics, Registry(60))

    dropped = {s.labels["reason"]: s.value
               for s in samples["fleetmq_mqtt_messages_dropped_total"]}
    assert set(dropped) == {*DROP_REASONS, "something_new"}
    assert dropped["late_will"] == 2
    assert value(samples, "fleetmq_mqtt_messages_received_total") == (
        value(samples, "fleetmq_mqtt_messages_applied_total")
        + value(samples, "fleetmq_mqtt_messages_ignored_total") + sum(dropped.values()))
    assert value(samples, "fleetmq_transitions_total", status="offline") == 1
    assert {s.labels["status"] for s in samples["fleetmq_transitions_total"]} == set(STATUSES)
    refused = {(s.labels["status"], s.labels["reason"]): s.value
               for s in samples["fleetmq_auth_refused_total"]}
    assert set(refused) == {(str(code), reason) for code, reason in AUTH_REFUSALS}
    assert refused[("403", "key")] == 3
    assert value(samples, "fleetmq_broker_hook_answers_total",
                 hook="authenticate", result="deny", reason="client_id") == 1
    assert value(samples, "fleetmq_broker_connected") == 1
    assert value(samples, "fleetmq_mqtt_backlog") == 2


def test_store_and_broker_figures_are_read_at_each_scrape() -> None:
    metrics = Metrics()
    counters = AccessCounters()
    metrics.broker_access = counters
    store = Store()
    counters.logins_refused["role"] += 2
    counters.connections_cut = 1
    _, samples, _ = scrape(metrics, Registry(60), store=store)

    assert value(samples, "fleetmq_store_available") == 1
    assert value(samples, "fleetmq_store_backlog") == 4
    assert value(samples, "fleetmq_store_rows_rejected_total") == 1
    refused = {s.labels["reason"]: s.value
               for s in samples["fleetmq_broker_logins_refused_total"]}
    assert set(refused) == set(LOGIN_REFUSALS)
    assert refused["role"] == 2
    assert value(samples, "fleetmq_broker_connections_cut_total") == 1


def test_each_app_has_its_own_registry() -> None:
    """Several apps in one process (the tests run so): no global registry, no clash."""
    first, second = Metrics(), Metrics()
    first.mqtt_received, second.mqtt_received = 3, 4
    scrapes = [scrape(m, Registry(60))[1] for m in (first, second, first)]

    assert [value(samples, "fleetmq_mqtt_messages_received_total")
            for samples in scrapes] == [3, 4, 3]
