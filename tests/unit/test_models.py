"""Wire models and their error messages (contract §2, §4 register/heartbeat, §5)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from fleetmq.core.models import (
    MAX_COUNTER,
    HeartbeatRequest,
    RegisterRequest,
    Rejection,
    describe_error,
    quote,
)
from fleetmq.core.topics import is_valid_node_id

VALID_IDS = ["a", "Z", "0", "microclaw-esp32-f4cfa210", "a.b:c_d-e", "A" * 128, "9" + "z" * 127]
INVALID_IDS = [
    "", "a" * 129, "-a", ".a", "_a", ":a", "a/b", "a+b", "a#b", "a$b", "$SYS", "a b", " a",
    "a\x00", "a\n", "a\tb", "a\x7f", "nod\u00e9", "a\u200bb",
]


def register(**fields: Any) -> RegisterRequest:
    return RegisterRequest.model_validate_json(json.dumps({"node_type": "microclaw", **fields}))


def heartbeat(**fields: Any) -> HeartbeatRequest:
    return HeartbeatRequest.model_validate_json(json.dumps(fields))


def rejection(model: type[BaseModel], payload: str | bytes) -> Rejection:
    with pytest.raises(ValidationError) as info:
        model.model_validate_json(payload)
    return describe_error(info.value)


def register_rejection(**fields: Any) -> Rejection:
    return rejection(RegisterRequest, json.dumps({"node_type": "microclaw", **fields}))


def heartbeat_rejection(**fields: Any) -> Rejection:
    return rejection(HeartbeatRequest, json.dumps(fields))


def assert_invalid_field(rej: Rejection, field: str) -> None:
    assert (rej.code, rej.title, rej.reason) == (400, "Invalid field", "invalid_payload")
    assert f"'{field}'" in rej.message


# --- register ------------------------------------------------------------------------------


def test_register_accepts_the_contract_example() -> None:
    req = RegisterRequest.model_validate_json(
        b'{"node_id": "microclaw-esp32-f4cfa210", "node_type": "microclaw",'
        b' "capabilities": ["dht22", "mqtt"], "location": "office-floor-2",'
        b' "metadata": {"gateway": "nanoclaw-pi-01", "firmware": "v1.0.0"},'
        b' "heartbeat_interval_seconds": 60}')

    assert req.node_id == "microclaw-esp32-f4cfa210"
    assert req.node_type == "microclaw"
    assert req.capabilities == ["dht22", "mqtt"]
    assert req.location == "office-floor-2"
    assert req.metadata == {"gateway": "nanoclaw-pi-01", "firmware": "v1.0.0"}
    assert req.heartbeat_interval_seconds == 60
    assert (req.name, req.session) == (None, None)


def test_register_accepts_type_and_node_name_aliases() -> None:
    req = RegisterRequest.model_validate_json(b'{"type": "picclaw", "node_name": "Gateway"}')

    assert (req.node_type, req.name) == ("picclaw", "Gateway")


def test_register_optional_fields_default_to_empty() -> None:
    req = RegisterRequest.model_validate_json(b'{"node_type": "moltclaw"}')

    assert req.node_id is None
    assert req.capabilities == []
    assert req.metadata == {}
    assert (req.location, req.heartbeat_interval_seconds) == (None, None)


def test_missing_node_type_is_reported_by_name() -> None:
    rej = rejection(RegisterRequest, b'{"node_id": "n1"}')

    assert (rej.code, rej.title, rej.reason) == (400, "Missing field", "invalid_payload")
    assert "'node_type'" in rej.message


@pytest.mark.parametrize("node_type", ["", "x" * 65])
def test_node_type_must_be_1_to_64_characters(node_type: str) -> None:
    assert_invalid_field(register_rejection(node_type=node_type), "node_type")


@pytest.mark.parametrize("node_type", ["x", "x" * 64, "custom-sensor", "NanoClaw"])
def test_node_type_accepts_any_value_up_to_64_characters(node_type: str) -> None:
    assert register(node_type=node_type).node_type == node_type


@pytest.mark.parametrize("node_id", VALID_IDS)
def test_valid_node_ids_are_accepted_everywhere(node_id: str) -> None:
    assert register(node_id=node_id).node_id == node_id
    assert heartbeat(node_id=node_id).node_id == node_id
    assert is_valid_node_id(node_id)


@pytest.mark.parametrize("node_id", INVALID_IDS)
def test_invalid_node_ids_are_refused_everywhere(node_id: str) -> None:
    assert_invalid_field(register_rejection(node_id=node_id), "node_id")
    assert_invalid_field(heartbeat_rejection(node_id=node_id), "node_id")
    assert not is_valid_node_id(node_id)


def test_metadata_accepts_scalar_values_and_keeps_their_types() -> None:
    req = register(metadata={"s": "v1", "i": 3, "f": 1.5, "b": True, "n": None})

    assert req.metadata == {"s": "v1", "i": 3, "f": 1.5, "b": True, "n": None}
    assert type(req.metadata["b"]) is bool
    assert type(req.metadata["i"]) is int


@pytest.mark.parametrize("metadata", [{"gw": {"id": 1}}, {"gw": [1, 2]}, "flat", ["a"]])
def test_metadata_refuses_nested_values_and_non_objects(metadata: Any) -> None:
    rej = register_rejection(metadata=metadata)

    assert (rej.code, rej.reason) == (400, "invalid_payload")
    assert "metadata" in rej.message


@pytest.mark.parametrize("capabilities", ["dht22", [1], [["dht22"]], {"a": "b"}])
def test_capabilities_must_be_a_list_of_strings(capabilities: Any) -> None:
    rej = register_rejection(capabilities=capabilities)

    assert (rej.code, rej.reason) == (400, "invalid_payload")
    assert "capabilities" in rej.message


@pytest.mark.parametrize(("value", "expected"), [(1, 1), (86400, 86400), (60.0, 60), (30, 30)])
def test_heartbeat_interval_accepts_integers_from_1_to_86400(value: Any, expected: int) -> None:
    interval = register(heartbeat_interval_seconds=value).heartbeat_interval_seconds

    assert interval == expected
    assert type(interval) is int


@pytest.mark.parametrize("value", [0, -1, 86401, 60.5, "60", True, False, [60]])
def test_heartbeat_interval_refuses_non_integers_and_out_of_range(value: Any) -> None:
    assert_invalid_field(register_rejection(heartbeat_interval_seconds=value),
                         "heartbeat_interval_seconds")


def test_register_ignores_unknown_fields() -> None:
    req = register(firmware={"nested": [1, 2]}, extra=True, node_name="n")

    assert req.name == "n"


def test_register_session_is_at_most_64_characters() -> None:
    assert register(session="s" * 64).session == "s" * 64
    assert_invalid_field(register_rejection(session="s" * 65), "session")


# --- heartbeat -----------------------------------------------------------------------------


def test_empty_heartbeat_object_is_valid_and_reports_nothing() -> None:
    req = HeartbeatRequest.model_validate_json(b"{}")

    assert req.model_dump() == {
        "node_id": None, "uptime_seconds": None, "free_memory_kb": None,
        "sensors_active": None, "status": None, "reason": None, "session": None,
    }


COUNTERS = ["uptime_seconds", "free_memory_kb", "sensors_active"]


@pytest.mark.parametrize("field", COUNTERS)
@pytest.mark.parametrize(("value", "expected"), [(0, 0), (MAX_COUNTER, 2**63 - 1), (200.0, 200)])
def test_counters_accept_integers_from_0_to_2_63_minus_1(field: str, value: Any,
                                                         expected: int) -> None:
    got = getattr(heartbeat(**{field: value}), field)

    assert got == expected
    assert type(got) is int


@pytest.mark.parametrize("field", COUNTERS)
@pytest.mark.parametrize("value", [-1, 2**63, 1.5, "200", True, False, 1e19, {"v": 1}])
def test_counters_refuse_strings_booleans_fractions_and_out_of_range(field: str,
                                                                     value: Any) -> None:
    assert_invalid_field(heartbeat_rejection(**{field: value}), field)


@pytest.mark.parametrize("status", ["online", "degraded", "offline"])
def test_status_accepts_the_three_states(status: str) -> None:
    assert heartbeat(status=status).status == status


@pytest.mark.parametrize("status", ["ONLINE", "unknown", "", "dead", 1])
def test_status_refuses_anything_else(status: Any) -> None:
    assert_invalid_field(heartbeat_rejection(status=status), "status")


@pytest.mark.parametrize("reason", ["connection_lost", "shutdown", "battery low", "r" * 64])
def test_reason_accepts_up_to_64_printable_characters(reason: str) -> None:
    assert heartbeat(status="offline", reason=reason).reason == reason


@pytest.mark.parametrize("reason", ["r" * 65, "", "a\nb", "a\x00", "tab\t", "esc\x1b[31m"])
def test_reason_refuses_long_or_unprintable_text(reason: str) -> None:
    assert_invalid_field(heartbeat_rejection(status="offline", reason=reason), "reason")


def test_heartbeat_session_is_1_to_64_characters() -> None:
    assert heartbeat(session="s" * 64).session == "s" * 64
    assert_invalid_field(heartbeat_rejection(session="s" * 65), "session")
    assert_invalid_field(heartbeat_rejection(session=""), "session")


def test_heartbeat_ignores_unknown_fields() -> None:
    req = heartbeat(temperature=21.5, readings=[1, 2], uptime_seconds=5)

    assert req.uptime_seconds == 5


# --- errors --------------------------------------------------------------------------------


@pytest.mark.parametrize("payload", [b"", b"{", b"nope", b'{"node_type": }', b"\xff\xfe"])
@pytest.mark.parametrize("model", [RegisterRequest, HeartbeatRequest])
def test_invalid_json_is_a_400_invalid_json(model: type[BaseModel], payload: bytes) -> None:
    rej = rejection(model, payload)

    assert (rej.code, rej.title, rej.reason) == (400, "Invalid JSON", "invalid_json")
    assert rej.message


@pytest.mark.parametrize("payload", [b"[]", b'"x"', b"1", b"null", b"true", b'[{"type": "a"}]'])
@pytest.mark.parametrize("model", [RegisterRequest, HeartbeatRequest])
def test_json_that_is_not_an_object_is_a_400_invalid_json(model: type[BaseModel],
                                                          payload: bytes) -> None:
    rej = rejection(model, payload)

    assert (rej.code, rej.title, rej.reason) == (400, "Invalid JSON", "invalid_json")
    assert "object" in rej.message


def test_invalid_field_message_names_the_field_and_quotes_the_value() -> None:
    rej = register_rejection(heartbeat_interval_seconds=0)

    assert_invalid_field(rej, "heartbeat_interval_seconds")
    assert rej.message.endswith(": 0")


def test_invalid_field_message_cuts_the_value_to_64_characters() -> None:
    value = "x" * 30 + "y" * 300
    rej = register_rejection(node_type=value)

    assert_invalid_field(rej, "node_type")
    # Shown in its Python form (a string in quotes), then cut: 64 characters in all.
    assert rej.message.endswith(": '" + "x" * 30 + "y" * 30 + "...")
    assert "y" * 31 not in rej.message


@pytest.mark.parametrize(
    ("value", "shown"),
    [("short", "short"), ("a" * 64, "a" * 64), (12, "12"), (True, "True"), ([1], "[1]")],
)
def test_quote_shows_short_values_whole(value: object, shown: str) -> None:
    assert quote(value) == shown


@pytest.mark.parametrize("value", ["a" * 65, "b" * 10_000, list(range(100))])
def test_quote_cuts_long_values_to_64_characters(value: object) -> None:
    shown = quote(value)

    assert len(shown) == 64
    assert shown.endswith("...")


def test_error_message_never_echoes_more_than_64_characters_of_a_metadata_key() -> None:
    key = "k" * 1000
    rej = register_rejection(metadata={key: {"nested": True}})

    assert "metadata" in rej.message
    assert "k" * 65 not in rej.message


@pytest.mark.parametrize("body", [
    {"node_type": "a\x00b"},
    {"node_type": "x", "name": "n\x00"},
    {"node_type": "x", "location": "\x00"},
    {"node_type": "x", "capabilities": ["ok", "b\x00d"]},
    {"node_type": "x", "metadata": {"k\x00": "v"}},
    {"node_type": "x", "metadata": {"k": "v\x00"}},
    {"node_type": "x", "session": "s\x00"},
])
def test_the_nul_character_is_refused_in_every_text_field(body: dict[str, object]) -> None:
    """No store keeps U+0000 in text (PostgreSQL refuses it): one device must not be able to
    block the store for the whole fleet."""
    with pytest.raises(ValidationError) as info:
        RegisterRequest.model_validate_json(json.dumps(body))
    assert "NUL" in describe_error(info.value).message


@pytest.mark.parametrize("token", ["NaN", "Infinity", "-Infinity"])
def test_metadata_numbers_must_be_finite(token: str) -> None:
    """The JSON parser takes NaN and Infinity; JSON itself, and every reader of the REST
    documents, does not."""
    with pytest.raises(ValidationError) as info:
        RegisterRequest.model_validate_json(f'{{"node_type": "x", "metadata": {{"v": {token}}}}}')
    assert "finite" in describe_error(info.value).message
