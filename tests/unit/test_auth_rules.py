"""Who may do what (contract section 8): topic filters, broker topic rules, REST permissions."""

from __future__ import annotations

import ast
import itertools
import sys
from pathlib import Path

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from fleetmq.auth.rules import (
    ACTIONS,
    ROLES,
    Action,
    Principal,
    Role,
    TopicRules,
    filter_within,
    rest_allowed,
    split_shared,
    topic_matches,
)

NODE = "microclaw-esp32-f4cfa210"
OTHER = "picclaw-7"
RULES = TopicRules("fleet")
NODE_P = Principal("node", NODE)
MANAGER = Principal("manager", "_fleetmq-1a2b")


def key(role: Role, key_id: str = "0123456789ab") -> Principal:
    return Principal("key", key_id, role)


def test_auth_rules_and_tokens_import_only_the_standard_library_and_topics() -> None:
    package = Path(__file__).resolve().parents[2] / "fleetmq" / "auth"
    for name in ("tokens", "rules"):
        tree = ast.parse((package / f"{name}.py").read_text())
        modules = {alias.name for n in ast.walk(tree) if isinstance(n, ast.Import)
                   for alias in n.names}
        modules |= {n.module for n in ast.walk(tree)
                    if isinstance(n, ast.ImportFrom) and n.module and not n.level}
        foreign = {m for m in modules if m.split(".")[0] not in sys.stdlib_module_names}
        assert foreign <= {"fleetmq.core.topics"}, f"fleetmq/auth/{name}.py imports {foreign}"


# --- principals ----------------------------------------------------------------------------------


def test_principal_names_its_broker_identity() -> None:
    assert key("read").broker_identity == "_key.0123456789ab"
    assert NODE_P.broker_identity == NODE
    assert MANAGER.broker_identity is None


def test_only_an_admin_key_is_admin() -> None:
    assert key("admin").is_admin
    assert not any(key(role).is_admin for role in ROLES if role != "admin")
    assert not NODE_P.is_admin
    assert not MANAGER.is_admin


def test_a_key_needs_a_role_and_nothing_else_has_one() -> None:
    with pytest.raises(ValueError, match="needs a role"):
        Principal("key", "0123456789ab")
    with pytest.raises(ValueError, match="only keys have a role"):
        Principal("node", NODE, "admin")


# --- topic matching ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("filter_", "topic", "expected"),
    [
        ("fleet/+/status", "fleet/n1/status", True),
        ("fleet/+/status", "fleet/n1/x/status", False),
        ("fleet/#", "fleet", True),                      # `#` matches the parent level
        ("fleet/#", "fleet/a/b/c", True),
        ("#", "fleet/a", True),
        ("+", "fleet", True),
        ("+/+", "/fleet", True),                         # `+` matches an empty level
        ("#", "$SYS/broker/uptime", False),              # wildcards never open `$` topics
        ("+/broker/uptime", "$SYS/broker/uptime", False),
        ("$SYS/#", "$SYS/broker/uptime", True),
        ("fleet/n1", "fleet/n1/status", False),
        ("fleet/n1/status", "fleet/n1/status", True),
        ("fleet/n1/status", "Fleet/n1/status", False),
        ("a/#/b", "a/x/b", False),                       # invalid filters match nothing
        ("a/b#", "a/b#", False),
        ("fleet/+", "fleet/+", False),                   # a topic has no wildcards
        ("", "", False),
    ],
)
def test_topic_matches_follows_mqtt(filter_: str, topic: str, expected: bool) -> None:
    assert topic_matches(filter_, topic) is expected


@pytest.mark.parametrize(
    ("inner", "outer", "expected"),
    [
        ("fleet/n1/status", "fleet/+/status", True),
        ("fleet/+/status", "fleet/+/status", True),
        ("fleet/+/status", "fleet/n1/status", False),
        ("fleet/n1", "fleet/n1/#", True),                # the parent of `#`
        ("fleet/+/status", "fleet/#", True),
        ("fleet/#", "fleet/+/status", False),
        ("fleet/#", "fleet/#", True),
        ("#", "fleet/#", False),
        ("fleet/+/+", "fleet/+/status", False),
        ("fleet/a/status/x", "fleet/+/status", False),
        ("fleet", "fleet/+", False),
        ("$SYS/x", "#", False),
        ("$SYS/x", "+/x", False),
        ("$SYS/x", "$SYS/#", True),
        ("+/x", "+/x", True),
        ("a/#/b", "#", False),
        ("a/b#", "#", False),
        ("a+/b", "#", False),
        ("", "#", False),
        ("a/\0", "#", False),
        ("a/b", "a/#/b", False),
    ],
)
def test_filter_within(inner: str, outer: str, expected: bool) -> None:
    assert filter_within(inner, outer) is expected


@pytest.mark.parametrize(
    ("filter_", "expected"),
    [
        ("$share/g/fleet/+/status", "fleet/+/status"),
        ("$share/g/#", "#"),
        ("fleet/+/status", "fleet/+/status"),
        ("$share//fleet/+/status", None),
        ("$share/g+/fleet", None),
        ("$share/#/fleet", None),
        ("$share/g", None),
        ("$share/g/", None),
    ],
)
def test_split_shared_unwraps_a_shared_subscription(filter_: str, expected: str | None) -> None:
    assert split_shared(filter_) == expected


LEVELS = ["fleet", "a", "b", "_manager", "status", "reply", "heartbeat", "register", "$SYS",
          "", "+", "#"]
TOPIC_LEVELS = [level for level in LEVELS if level not in ("+", "#")]
# Wildcards weigh more, so that filters overlap in every way.
filters = st.lists(st.sampled_from([*LEVELS, "+", "#", "+", "#"]), min_size=1, max_size=4).map(
    "/".join)
topics = st.lists(st.sampled_from(TOPIC_LEVELS), min_size=1, max_size=5).map("/".join)


@st.composite
def nearby(draw: st.DrawFn, filter_: str) -> str:
    """`filter_` with a few levels changed (often to a wildcard), cut, or extended."""
    levels = [draw(st.sampled_from([level, level, level, "+", "#", *LEVELS]))
              for level in filter_.split("/")]
    cut = draw(st.integers(0, len(levels)))
    tail = draw(st.sampled_from([levels[cut:], levels[cut:], ["#"], ["+"], ["+", "#"]]))
    return "/".join(levels[:cut] + tail)


@st.composite
def instance(draw: st.DrawFn, filter_: str) -> str:
    """A topic that `filter_` may match: each wildcard filled with drawn levels."""
    levels: list[str] = []
    for level in filter_.split("/"):
        if level == "+":
            levels.append(draw(st.sampled_from(TOPIC_LEVELS)))
        elif level == "#":
            levels.extend(draw(st.lists(st.sampled_from(TOPIC_LEVELS), max_size=2)))
        else:
            levels.append(level)
    return "/".join(levels)


@given(filters, st.data())
def test_filter_within_is_sound(inner: str, data: st.DataObject) -> None:
    outer = data.draw(st.one_of(filters, nearby(inner)))
    if not filter_within(inner, outer):
        return
    for topic in data.draw(st.lists(st.one_of(topics, instance(inner)), max_size=20)):
        if topic_matches(inner, topic):
            assert topic_matches(outer, topic), topic


def test_filter_within_is_sound_over_every_pair_of_small_filters() -> None:
    # Exhaustive over a small universe: filters of up to 3 levels and every topic of up to 4
    # levels from the same literals, enough to hold a counterexample to any inclusion.
    def spell(alphabet: list[str], depth: int) -> list[str]:
        return ["/".join(p) for n in range(1, depth + 1)
                for p in itertools.product(alphabet, repeat=n)]

    literals = ["a", "b", "$SYS", ""]
    universe = spell(literals, 4)
    matched = {f: frozenset(t for t in universe if topic_matches(f, t))
               for f in spell([*literals, "+", "#"], 3)}
    for inner, outer in itertools.product(matched, repeat=2):
        if filter_within(inner, outer):
            assert matched[inner] <= matched[outer], (inner, outer)


@given(filters, st.lists(topics, min_size=1, max_size=20))
def test_every_valid_filter_is_within_itself(filter_: str, sample: list[str]) -> None:
    if filter_within(filter_, filter_):
        return
    # Refused only when invalid; an invalid filter matches nothing.
    assert not any(topic_matches(filter_, topic) for topic in sample)


# --- publish -------------------------------------------------------------------------------------


@pytest.mark.parametrize("root", ["fleet", "acme/prod"])
def test_a_node_publishes_only_its_register_and_heartbeat(root: str) -> None:
    rules = TopicRules(root)

    assert rules.publish_allowed(NODE_P, f"{root}/{NODE}/register")
    assert rules.publish_allowed(NODE_P, f"{root}/{NODE}/heartbeat")
    for topic in [f"{root}/{NODE}/status", f"{root}/{NODE}/reply", f"{root}/{OTHER}/heartbeat",
                  f"{root}/_manager/status", f"{root}/{NODE}/heartbeat/x", f"{root}/+/heartbeat",
                  f"{root}/#", "$SYS/broker", f"other/{NODE}/heartbeat", f"{root}/{NODE}"]:
        assert not rules.publish_allowed(NODE_P, topic), topic


@pytest.mark.parametrize("role", ["write", "admin"])
def test_a_write_key_publishes_any_valid_nodes_register_and_heartbeat(role: Role) -> None:
    p = key(role)

    assert RULES.publish_allowed(p, f"fleet/{OTHER}/register")
    assert RULES.publish_allowed(p, f"fleet/{NODE}/heartbeat")
    for topic in ["fleet/_manager/heartbeat", "fleet/_key.x/register", f"fleet/{NODE}/status",
                  f"fleet/{NODE}/reply", "fleet/_manager/status", "fleet/+/heartbeat",
                  "fleet//heartbeat", "$SYS/x"]:
        assert not RULES.publish_allowed(p, topic), topic


@pytest.mark.parametrize("role", ["read", "broker", "enroll"])
def test_other_keys_publish_nothing(role: Role) -> None:
    assert not RULES.publish_allowed(key(role), f"fleet/{NODE}/heartbeat")
    assert not RULES.publish_allowed(key(role), "fleet/_manager/status")


def test_the_manager_publishes_statuses_replies_and_its_own_topics_only() -> None:
    for topic in [f"fleet/{NODE}/status", f"fleet/{NODE}/reply", "fleet/_manager/status",
                  "fleet/_manager/sync"]:
        assert RULES.publish_allowed(MANAGER, topic), topic
    for topic in [f"fleet/{NODE}/heartbeat", f"fleet/{NODE}/register", "fleet/_manager/reply",
                  "fleet/_x/status", "other/n1/status", f"{NODE}/status", "$SYS/x",
                  "fleet/+/status", "fleet/a\0/status"]:
        assert not RULES.publish_allowed(MANAGER, topic), topic


def test_a_will_is_judged_as_a_publish() -> None:
    assert RULES.will_allowed(NODE_P, f"fleet/{NODE}/heartbeat")
    assert not RULES.will_allowed(NODE_P, f"fleet/{OTHER}/heartbeat")
    assert not RULES.will_allowed(NODE_P, f"fleet/{NODE}/status")


node_ids = st.sampled_from([NODE, OTHER, "n1", "_manager"])
leaves = st.sampled_from(["register", "heartbeat", "status", "reply", "sync", ""])


@given(node_ids, leaves, st.sampled_from(["", "/x"]))
def test_a_node_can_publish_only_to_its_two_topics(node_id: str, leaf: str, tail: str) -> None:
    topic = f"fleet/{node_id}/{leaf}{tail}"
    own = topic in (f"fleet/{NODE}/register", f"fleet/{NODE}/heartbeat")

    assert RULES.publish_allowed(NODE_P, topic) is own


@given(st.text(max_size=60))
def test_a_node_publishes_to_no_random_topic(topic: str) -> None:
    assert not RULES.publish_allowed(NODE_P, topic)
    assert not RULES.publish_allowed(NODE_P, f"fleet/{topic}")


# --- subscribe -----------------------------------------------------------------------------------


def test_a_node_subscribes_to_its_reply_its_status_and_the_managers_status() -> None:
    for filter_ in [f"fleet/{NODE}/reply", f"fleet/{NODE}/status", "fleet/_manager/status",
                    f"$share/g/fleet/{NODE}/reply"]:
        assert RULES.subscribe_allowed(NODE_P, filter_), filter_


CLOSED = ["#", "+/#", "$SYS/#", "$CONTROL/#", "$CONTROL/dynamic-security/#",
          "$share/x/fleet/+/heartbeat", "fleet/#", "fleet/+/reply", "fleet/+/status",
          f"fleet/{OTHER}/reply", f"fleet/{NODE}/+", f"fleet/{NODE}/#", f"fleet/{NODE}/heartbeat",
          "fleet/+/register", "fleet/_manager/sync", "$share//fleet/x/reply", "$share/g+/a/b"]


@pytest.mark.parametrize("filter_", CLOSED)
def test_a_node_is_refused_every_other_filter(filter_: str) -> None:
    assert not RULES.subscribe_allowed(NODE_P, filter_)


def test_a_read_key_subscribes_to_statuses_only() -> None:
    p = key("read")

    assert RULES.subscribe_allowed(p, "fleet/+/status")
    assert RULES.subscribe_allowed(p, "fleet/_manager/status")
    assert RULES.subscribe_allowed(p, f"$share/dash/fleet/{NODE}/status")
    for filter_ in ["fleet/+/reply", "fleet/#", "#", "$SYS/#", "fleet/+/heartbeat", "fleet/+/+"]:
        assert not RULES.subscribe_allowed(p, filter_), filter_


@pytest.mark.parametrize("role", ["write", "admin"])
def test_a_write_key_also_subscribes_to_replies(role: Role) -> None:
    p = key(role)

    assert RULES.subscribe_allowed(p, "fleet/+/status")
    assert RULES.subscribe_allowed(p, "fleet/+/reply")
    for filter_ in ["fleet/+/register", "fleet/+/heartbeat", "$share/x/fleet/+/heartbeat",
                    "fleet/#", "#", "+/#", "$SYS/#", "$CONTROL/dynamic-security/#"]:
        assert not RULES.subscribe_allowed(p, filter_), filter_


@pytest.mark.parametrize("role", ["broker", "enroll"])
def test_broker_and_enroll_keys_subscribe_to_nothing(role: Role) -> None:
    assert not RULES.subscribe_allowed(key(role), "fleet/+/status")
    assert not RULES.subscribe_allowed(key(role), "fleet/_manager/status")


def test_only_the_manager_subscribes_to_ingest_topics() -> None:
    for filter_ in ["fleet/+/register", "fleet/+/heartbeat", "$share/managers/fleet/+/heartbeat",
                    "fleet/+/status", "fleet/_manager/sync", f"fleet/{NODE}/heartbeat"]:
        assert RULES.subscribe_allowed(MANAGER, filter_), filter_
    for filter_ in ["fleet/#", "#", "$SYS/#", "fleet/+/reply"]:
        assert not RULES.subscribe_allowed(MANAGER, filter_), filter_


NODE_FILTER_LEVELS = ["fleet", NODE, OTHER, "_manager", "status", "reply", "heartbeat",
                      "register", "sync", "$SYS", "", "+", "#"]


@st.composite
def near_node_filters(draw: st.DrawFn) -> str:
    """Filters near those a node, a write key or the manager may use, so many are allowed."""
    base = draw(st.sampled_from([*RULES.subscribe_filters(NODE_P) * 3,
                                 *RULES.subscribe_filters(key("write")),
                                 *RULES.subscribe_filters(MANAGER)]))
    levels = [draw(st.sampled_from([level] * 40 + NODE_FILTER_LEVELS))
              for level in base.split("/")]
    if draw(st.integers(0, 3)) == 0:
        levels.append(draw(st.sampled_from(NODE_FILTER_LEVELS)))
    return draw(st.sampled_from(["", "", "$share/g/", "$share//"])) + "/".join(levels)


fleet_topics = st.tuples(st.sampled_from([NODE, OTHER, "_manager"]),
                         st.sampled_from(["register", "heartbeat", "status", "reply", "sync"]))


@settings(max_examples=300)  # about one drawn filter in ten is allowed: those are the point
@given(near_node_filters(), st.lists(fleet_topics, min_size=1, max_size=10))
def test_a_node_never_subscribes_to_other_nodes_or_ingest_topics(
    filter_: str, sample: list[tuple[str, str]]
) -> None:
    if not RULES.subscribe_allowed(NODE_P, filter_):
        return
    inner = split_shared(filter_)
    assert inner is not None
    for node_id, leaf in sample:
        if topic_matches(inner, f"fleet/{node_id}/{leaf}"):
            assert (node_id, leaf) in {(NODE, "reply"), (NODE, "status"), ("_manager", "status")}


# --- client ids and response topics --------------------------------------------------------------


def test_client_ids_name_one_identity() -> None:
    assert RULES.client_id_allowed(NODE_P, NODE)
    assert not RULES.client_id_allowed(NODE_P, OTHER)
    assert not RULES.client_id_allowed(NODE_P, "_fleetmq-x")
    assert RULES.client_id_allowed(key("write"), "_key.0123456789ab")
    assert not RULES.client_id_allowed(key("write"), "_key.ffffffffffff")
    assert not RULES.client_id_allowed(key("write"), "0123456789ab")
    assert RULES.client_id_allowed(MANAGER, "_fleetmq-publisher")
    assert not RULES.client_id_allowed(MANAGER, NODE)


def test_a_node_may_name_only_its_own_reply_as_response_topic() -> None:
    assert RULES.response_topic_allowed(NODE_P, NODE, f"fleet/{NODE}/reply")
    assert not RULES.response_topic_allowed(NODE_P, NODE, f"fleet/{OTHER}/reply")
    assert not RULES.response_topic_allowed(NODE_P, NODE, "answers/mine")
    assert not RULES.response_topic_allowed(NODE_P, OTHER, f"fleet/{OTHER}/reply")


def test_a_write_key_may_name_the_reply_of_the_node_it_speaks_for() -> None:
    assert RULES.response_topic_allowed(key("write"), OTHER, f"fleet/{OTHER}/reply")
    assert not RULES.response_topic_allowed(key("write"), OTHER, f"fleet/{NODE}/reply")
    assert not RULES.response_topic_allowed(key("read"), OTHER, f"fleet/{OTHER}/reply")
    assert not RULES.response_topic_allowed(key("write"), "_manager", "fleet/_manager/reply")


def test_topic_rules_refuse_an_invalid_root() -> None:
    with pytest.raises(ValueError, match="invalid topic root"):
        TopicRules("fleet/#")


# --- REST ----------------------------------------------------------------------------------------

EXPECTED: dict[Role, set[Action]] = {
    "read": {"fleet_read", "metrics"},
    "write": {"fleet_read", "metrics", "register", "heartbeat", "delete"},
    "admin": set(ACTIONS) - {"enroll"},
    "broker": {"broker_hooks"},
    "enroll": {"enroll"},
}


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("action", ACTIONS)
def test_a_key_may_do_what_its_role_grants(role: Role, action: Action) -> None:
    assert rest_allowed(key(role), action) is (action in EXPECTED[role])
    assert rest_allowed(key(role), action, NODE) is (action in EXPECTED[role])


@pytest.mark.parametrize("action", ACTIONS)
def test_a_node_acts_only_for_itself(action: Action) -> None:
    own = action in {"register", "heartbeat", "fleet_read", "credentials_issue"}

    assert rest_allowed(NODE_P, action, NODE) is own
    assert not rest_allowed(NODE_P, action, OTHER)
    assert not rest_allowed(NODE_P, action)  # a listing of the fleet, for instance


@pytest.mark.parametrize("action", ACTIONS)
def test_the_manager_has_no_rest_rights(action: Action) -> None:
    assert not rest_allowed(MANAGER, action, NODE)


# --- properties of the REST table and the topic matcher ---------------------------------------

any_node_id = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,20}", fullmatch=True)


@given(st.sampled_from(ROLES), st.sampled_from(ACTIONS), st.one_of(st.none(), any_node_id))
def test_a_keys_rights_are_its_roles_whatever_node_the_request_is_about(
        role: Role, action: Action, node_id: str | None) -> None:
    assert rest_allowed(key(role), action, node_id) is (action in EXPECTED[role])


@given(any_node_id, st.sampled_from(ACTIONS), st.one_of(st.none(), any_node_id))
def test_no_node_and_not_the_manager_acts_for_another_node(
        node_id: str, action: Action, other: str | None) -> None:
    assume(other != node_id)
    assert not rest_allowed(Principal("node", node_id), action, other)
    assert not rest_allowed(MANAGER, action, other)


@given(topics.filter(lambda t: t.strip("/") != ""), st.data())
def test_a_topic_matches_itself_with_any_levels_made_wildcards(topic: str,
                                                               data: st.DataObject) -> None:
    assume(topic_matches(topic, topic))  # a valid topic (no empty first level, ...)
    levels = [("+" if data.draw(st.booleans()) else level) for level in topic.split("/")]
    if data.draw(st.booleans()):  # `a/#` matches `a/b/c`, and `a` itself
        levels = [*levels[:data.draw(st.integers(0, len(levels)))], "#"]
    filter_ = "/".join(levels)
    # Only a `$` topic escapes a wildcard in the first level (MQTT 4.7.2).
    expected = not (topic.startswith("$") and levels[0] in ("+", "#"))
    assert topic_matches(filter_, topic) is expected
