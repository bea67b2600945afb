"""``parse_heartbeat``: the REST heartbeat's fast parse gives what ``model_validate_json`` gives,
model or error, for every body."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from fleetmq.core.models import MAX_COUNTER, HeartbeatRequest, describe_error, parse_heartbeat

FIELDS = list(HeartbeatRequest.model_fields)


def outcome(parse: Any, body: bytes) -> tuple[str, Any]:
    """What a parse gives, in a form that compares everything a caller can see."""
    try:
        req = parse(body)
    except ValidationError as exc:
        rejection = describe_error(exc)
        # repr: an input of NaN is not equal to itself
        return "error", (str(exc), repr(exc.errors(include_url=False, include_context=False)),
                         rejection.code, rejection.title, rejection.message)
    return "model", (repr(req), req.model_fields_set, req.model_dump_json(),
                     req == HeartbeatRequest.model_validate_json(body))


def assert_same(body: bytes) -> None:
    assert outcome(parse_heartbeat, body) == outcome(HeartbeatRequest.model_validate_json, body)


scalars = st.one_of(
    st.none(), st.booleans(),
    st.integers(min_value=-3, max_value=3),
    st.sampled_from([MAX_COUNTER - 1, MAX_COUNTER, MAX_COUNTER + 1, 2**64, -(2**63)]),
    st.integers(), st.floats(), st.sampled_from([0.0, 60.0, 60.5, -0.0, 1e300]),
    st.sampled_from(["online", "degraded", "offline", "Online", "", "node-1", "a b", "-a",
                     "a" * 64, "a" * 65, "a\x00b", "line\nbreak", "caf\u00e9", "\ud800x"]),
    st.text(max_size=70),
)
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=5), inner, max_size=3)),
    max_leaves=4)
keys = st.one_of(st.sampled_from(FIELDS), st.sampled_from(["extra", "NODE_ID", "status "]))
bodies = st.dictionaries(keys, values, max_size=6)


@settings(max_examples=500)
@given(bodies)
@example({"node_id": "node-00042", "uptime_seconds": 12345, "free_memory_kb": 200,
          "sensors_active": 2})
@example({"node_id": "n", "status": "offline", "reason": "shutdown", "session": "s-1"})
@example({"uptime_seconds": True})
@example({"uptime_seconds": 60.0})
@example({"status": None, "reason": None, "extra": [1, {"a": 2}]})
def test_any_object_parses_as_the_model_validates_it(body: dict[str, Any]) -> None:
    # surrogatepass: lone surrogates reach the parser as their escapes, as a client may send
    assert_same(json.dumps(body).encode())
    assert_same(json.dumps(body, ensure_ascii=False).encode("utf-8", "surrogatepass"))


@pytest.mark.parametrize("body", [
    b"", b" ", b"null", b"[]", b'"node"', b"42", b"{", b'{"node_id": "a"', b'{"node_id":"a"}x',
    b'\xef\xbb\xbf{"node_id":"a"}', b'{"node_id":"\\ud800"}', b'{"node_id":"a\xff"}',
    b'{"uptime_seconds": NaN}', b'{"uptime_seconds": Infinity}', b'{"uptime_seconds": -0}',
    b'{"uptime_seconds": 01}', b'{"uptime_seconds": 1e2}', b'{"uptime_seconds": 1.0E0}',
    b'{"uptime_seconds": 99999999999999999999999999}',
    b'{"node_id":"a","node_id":"b c"}', b'{"node_id":"b c","node_id":"a"}',
    b'{"uptime_seconds":1.5,"uptime_seconds":1}', b'{"status":"bad","status":"online"}',
    b'{"node_id":"a","x":' + b"[" * 300 + b"]" * 300 + b"}",
    b'{"node_id":"a","x":' + b"[" * 100 + b"]" * 100 + b"}",
    b'{"reason":"\\u0000"}', b'{"session":"\\u0000"}', b'{"reason":"tab\\there"}',
    b'{"node_id":"\\u0061"}', b'  {"node_id":"a"}  \n',
])
def test_edge_bodies_parse_as_the_model_validates_them(body: bytes) -> None:
    assert_same(body)


def test_text_bodies_parse_as_the_model_validates_them() -> None:
    text = '{"node_id": "n-1", "reason": "caf\u00e9"}'
    assert parse_heartbeat(text) == HeartbeatRequest.model_validate_json(text)
