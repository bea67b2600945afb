"""The OpenAPI document's request schemas accept exactly what the server's models accept, on
the cases schemathesis found them to disagree (tests/security/test_fuzz_openapi.py fuzzes the
rest). JSON Schema patterns are ECMA-262, where ``$`` is the end of the text; Python's ``re``,
which ``jsonschema`` uses, lets it match before a final newline too, so no case here ends in
one."""

from __future__ import annotations

import re
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from fleetmq.core.models import HeartbeatRequest, RegisterRequest, Rejection, printable_pattern
from fleetmq.http.access_models import CredentialRequest, KeyRequest
from fleetmq.http.openapi import openapi_document

jsonschema = pytest.importorskip("jsonschema")
SCHEMAS = openapi_document("fleet", auth=True)["components"]["schemas"]


def _documented(schema: str, body: dict[str, Any]) -> bool:
    return bool(jsonschema.Draft202012Validator(SCHEMAS[schema]).is_valid(body))


def _served(model: type[BaseModel], body: dict[str, Any]) -> bool:
    try:
        request = model.model_validate(body)
    except ValidationError:
        return False
    if isinstance(request, KeyRequest):
        try:
            request.check_role()
        except Rejection:  # the server answers 400
            return False
    return True


REGISTER = [
    {"node_id": "a", "node_type": "t"},
    {"node_id": "a", "type": "t"},
    {"node_id": "a", "type": 5},
    {"node_id": "a", "node_type": "t", "type": 5},  # an alias beside its name is ignored
    {"node_id": "a", "node_type": "t", "name": None, "node_name": True},
    {"node_id": "a", "node_type": "t", "node_name": True},
    {"node_id": "a", "node_type": "t", "node_name": "x"},
    {"node_id": "a", "node_type": "t\u0000"},
    {"node_id": "a", "node_type": "<\u0001"},
    {"node_id": "a", "node_type": "t", "capabilities": ["x\u0000"]},
    {"node_id": "a", "node_type": "t", "location": "\u0000"},
    {"node_id": "a", "node_type": "t", "metadata": {"k\u0000": 1}},
    {"node_id": "a", "node_type": "t", "metadata": {"k": "v\u0000"}},
    {"node_id": "a", "node_type": "t", "metadata": {"k": [1]}},
    {"node_id": "a", "node_type": "t", "heartbeat_interval_seconds": 60.0},
    {"node_id": "a", "node_type": "t", "unknown": {"x": [None]}},
]
HEARTBEAT = [
    {"node_id": "a", "reason": "ok"},
    {"node_id": "a", "reason": "d\u00e9j\u00e0 vu"},
    {"node_id": "a", "reason": "a\tb"},
    {"node_id": "a", "reason": "\u2028"},
    {"node_id": "a", "reason": "\u0085"},
    {"node_id": "a", "reason": "\U000e0001"},
    {"node_id": "a", "uptime_seconds": 2**63},
]
KEYS = [
    {"role": "read"},
    {"role": "read", "max_uses": 1},
    {"role": "read", "max_uses": None, "allow_registered": False},
    {"role": "read", "allow_registered": True},
    {"role": "admin", "node_type": "x"},
    {"role": "enroll", "max_uses": 2.0, "node_type": "x", "allow_registered": True},
    {"role": "enroll", "max_uses": 2.5},
    {"role": "enroll", "node_type": "\u0085"},
    {"role": "read", "name": "a\u0000"},
    {"role": "read", "expires_in_seconds": 0.5},
    {"role": "read", "expires_in_seconds": 1},
    {"role": "read", "expires_in_seconds": 5e-324},
]
CREDENTIALS = [{}, {"expires_in_seconds": 5e-324}, {"expires_in_seconds": 1.5},
               {"grace_seconds": 0}, {"expires_in_seconds": None}]


@pytest.mark.parametrize(("schema", "model", "body"), [
    *(("RegisterRequest", RegisterRequest, b) for b in REGISTER),
    *(("HeartbeatRequest", HeartbeatRequest, b) for b in HEARTBEAT),
    *(("KeyRequest", KeyRequest, b) for b in KEYS),
    *(("CredentialRequest", CredentialRequest, b) for b in CREDENTIALS),
])
def test_the_document_accepts_a_body_exactly_when_the_server_does(
        schema: str, model: type[BaseModel], body: dict[str, Any]) -> None:
    assert _documented(schema, body) is _served(model, body)


@given(st.text(max_size=8).filter(lambda t: not t.endswith("\n")))
def test_the_printable_pattern_is_str_isprintable(text: str) -> None:
    assert jsonschema.Draft202012Validator({"pattern": printable_pattern()}).is_valid(
        text) is text.isprintable()


def test_the_printable_pattern_takes_every_printable_character_and_no_other() -> None:
    one = re.compile(printable_pattern())
    wrong = [hex(code) for code in range(0x110000)
             if (one.fullmatch(chr(code)) is not None) is not chr(code).isprintable()]
    assert not wrong
