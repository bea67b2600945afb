"""Wire models: what agents and tools send, validated once at the edge with pydantic.

Past this module there are models, not dicts. Nothing here knows about MQTT or HTTP; the
transports turn a ``ValidationError`` into their own reply with ``describe_error``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    AliasChoices,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    GetJsonSchemaHandler,
    StringConstraints,
    ValidationError,
    WithJsonSchema,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema, from_json

from fleetmq.core.topics import NODE_ID_PATTERN, is_valid_node_id

MAX_PAYLOAD_BYTES = 64 * 1024
QUOTE_LIMIT = 64
MAX_COUNTER = 2**63 - 1
MAX_SHORT_TEXT = 64
"""Characters of a session id or a reason, at most."""

Status = Literal["online", "degraded", "offline"]
STATUSES: tuple[Status, ...] = ("online", "degraded", "offline")
Scalar = str | int | float | bool | None


def integral(value: object) -> object:
    # JSON has one number type: 60.0 is the integer 60, 60.5 is not; "60" and true are refused.
    if isinstance(value, bool):
        raise ValueError("must be an integer, not a boolean")
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _no_nul(value: str) -> str:
    # No store can keep U+0000 in text (PostgreSQL refuses it outright): refuse it here, at
    # the edge, rather than let one device's registration block the store for everyone.
    if "\x00" in value:
        raise ValueError("must not contain the NUL character (\\u0000)")
    return value


def _check_metadata(value: dict[str, Scalar]) -> dict[str, Scalar]:
    for key, item in value.items():
        _no_nul(key)
        if isinstance(item, str):
            _no_nul(item)
        elif isinstance(item, float) and not math.isfinite(item):
            # The JSON parser takes NaN and Infinity, which JSON itself (and every reader of
            # the REST documents) does not.
            raise ValueError(f"value of {key!r} must be a finite number, not {item}")
    return value


def _printable(value: str) -> str:
    if not value.isprintable():
        raise ValueError("must contain printable characters only")
    return value


NO_NUL_PATTERN = r"^[^\u0000]*$"


@cache
def printable_pattern() -> str:
    """The JSON Schema pattern of the strings ``str.isprintable()`` accepts: the characters
    outside Unicode's "Other" and "Separator" categories, and the space (700 ranges, built from
    this Python's own tables so that the document and the check cannot disagree). Listed
    rather than negated: a fuzzer draws from a listed class ten times faster."""
    ranges: list[tuple[int, int]] = []

    def add(code: int, last: int) -> None:
        if ranges and ranges[-1][1] == code - 1:
            ranges[-1] = (ranges[-1][0], last)
        else:
            ranges.append((code, last))

    # By blocks, most of them all printable or all unassigned: ten times faster than by
    # character, and this runs at every start.
    for block in range(0, 0x110000, 1024):
        chars = "".join(map(chr, range(block, block + 1024)))
        if chars.isprintable():
            add(block, block + 1023)
        elif any(map(str.isprintable, chars)):
            for offset, one in enumerate(chars):
                if one.isprintable():
                    add(block + offset, block + offset)

    def char(code: int) -> str:
        # BMP as \uXXXX (ECMA-262 and Python alike); the rest as the character itself.
        return f"\\u{code:04x}" if code <= 0xFFFF else chr(code)

    body = "".join(char(a) if a == b else f"{char(a)}-{char(b)}" for a, b in ranges)
    return f"^[{body}]*$"


@dataclass(frozen=True, slots=True)
class Documented:
    """Puts into the JSON Schema what an ``AfterValidator`` checks (a pattern), so the OpenAPI
    document built from these models says exactly what the server accepts."""

    pattern: str | None = None
    printable: bool = False

    def __get_pydantic_json_schema__(self, core: CoreSchema,
                                     handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        schema: dict[str, Any] = handler(core)
        schema["pattern"] = printable_pattern() if self.printable else self.pattern
        return schema


NO_NUL = Documented(NO_NUL_PATTERN)
PRINTABLE = Documented(printable=True)
NodeId = Annotated[str, StringConstraints(pattern=NODE_ID_PATTERN)]
Counter = Annotated[int, BeforeValidator(integral), Field(strict=True, ge=0, le=MAX_COUNTER)]
Interval = Annotated[int, BeforeValidator(integral), Field(strict=True, ge=1, le=86_400)]
SessionId = Annotated[str, StringConstraints(min_length=1, max_length=MAX_SHORT_TEXT),
                      AfterValidator(_no_nul), NO_NUL]
Reason = Annotated[str, StringConstraints(min_length=1, max_length=MAX_SHORT_TEXT),
                   AfterValidator(_printable), PRINTABLE]
Text = Annotated[str, StringConstraints(max_length=256), AfterValidator(_no_nul), NO_NUL]
_METADATA_SCHEMA: JsonSchemaValue = {
    "type": "object", "propertyNames": {"pattern": NO_NUL_PATTERN},
    "additionalProperties": {"anyOf": [{"type": "string", "pattern": NO_NUL_PATTERN},
                                       {"type": ["number", "boolean", "null"]}]}}


class RegisterRequest(BaseModel):
    """A registration, from ``POST /register`` or ``<root>/<id>/register``."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    node_id: NodeId | None = None
    node_type: Annotated[
        str,
        StringConstraints(min_length=1, max_length=64),
        AfterValidator(_no_nul),
        NO_NUL,
        Field(validation_alias=AliasChoices("node_type", "type")),
    ]
    name: Annotated[Text | None, Field(validation_alias=AliasChoices("name", "node_name"))] = None
    capabilities: list[Annotated[str, StringConstraints(max_length=128),
                                 AfterValidator(_no_nul), NO_NUL]] = Field(
        default_factory=list, max_length=256
    )
    location: Text | None = None
    metadata: Annotated[dict[str, Scalar], AfterValidator(_check_metadata),
                        WithJsonSchema(_METADATA_SCHEMA)] = Field(
        default_factory=dict)
    heartbeat_interval_seconds: Interval | None = None
    session: SessionId | None = None


class HeartbeatRequest(BaseModel):
    """A heartbeat (or an offline report, or a last will), from REST or MQTT."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    node_id: NodeId | None = None
    uptime_seconds: Counter | None = None
    free_memory_kb: Counter | None = None
    sensors_active: Counter | None = None
    status: Status | None = None
    reason: Reason | None = None
    session: SessionId | None = None


BARE_HEARTBEAT = HeartbeatRequest()


def parse_heartbeat(body: bytes | bytearray | str) -> HeartbeatRequest:
    """``HeartbeatRequest.model_validate_json(body)`` (same result, same ``ValidationError``),
    in about half the time for the bodies agents send.

    pydantic's own parser reads the body; each known field whose value is plainly valid (a
    whole number in range, a valid id, one of the statuses...) is taken as it is, and the
    model is built without running its validators. Anything else (a fraction, a string where
    a number goes, any invalid value, a body that is not a JSON object) goes through the
    model's validation, which accepts or answers it exactly as it always did. Unknown fields
    are ignored either way.
    """
    try:
        values = from_json(body)
    except ValueError:
        values = None
    if type(values) is dict:
        fields = _plain_heartbeat(values)
        if fields is not None:
            return _heartbeat_of(fields)
    return HeartbeatRequest.model_validate_json(body)


def _plain_node_id(value: object) -> bool:
    return value is None or (type(value) is str and is_valid_node_id(value))


def _plain_status(value: object) -> bool:
    return value is None or (type(value) is str and value in STATUSES)


def _plain_reason(value: object) -> bool:
    return value is None or (type(value) is str and 0 < len(value) <= MAX_SHORT_TEXT
                             and value.isprintable())


def _plain_session(value: object) -> bool:
    return value is None or (type(value) is str and 0 < len(value) <= MAX_SHORT_TEXT
                             and "\x00" not in value)


_HEARTBEAT_COUNTERS = frozenset({"uptime_seconds", "free_memory_kb", "sensors_active"})
_PLAIN_HEARTBEAT = {
    "node_id": _plain_node_id,
    "status": _plain_status,
    "reason": _plain_reason,
    "session": _plain_session,
}
"""What ``HeartbeatRequest`` accepts as it is, field by field, besides its counters (unit
tests hold the two to the same answers)."""
_HEARTBEAT_DEFAULTS = dict(BARE_HEARTBEAT.__dict__)
_new = object.__new__
_set = object.__setattr__


def _plain_heartbeat(values: dict[str, Any]) -> dict[str, Any] | None:
    """The known fields of ``values``, if each one is plainly valid; else None."""
    fields = {}
    for key, value in values.items():
        if key in _HEARTBEAT_COUNTERS:  # the usual fields: checked here, without a call
            # type(), not isinstance: a boolean is refused, a float goes to the model (60.0)
            if value is not None and not (type(value) is int and 0 <= value <= MAX_COUNTER):
                return None
        else:
            plain = _PLAIN_HEARTBEAT.get(key)
            if plain is None:
                continue  # unknown: ignored, as the model does (extra="ignore")
            if not plain(value):
                return None
        fields[key] = value
    return fields


def _heartbeat_of(fields: dict[str, Any]) -> HeartbeatRequest:
    """The model of fields known to be valid: what ``model_construct`` does, without its
    per-field loop over defaults and aliases (which costs as much as validating)."""
    request = _new(HeartbeatRequest)
    _set(request, "__dict__", {**_HEARTBEAT_DEFAULTS, **fields})
    _set(request, "__pydantic_fields_set__", set(fields))
    _set(request, "__pydantic_extra__", None)
    _set(request, "__pydantic_private__", None)
    return request


def quote(value: object, limit: int = QUOTE_LIMIT) -> str:
    """A value as error messages show it: escaped first, then cut to 64 characters (or
    ``limit``), so no quoted input can make a message longer. A printable string is shown as
    it is; anything else in its Python form (``'5'`` is a string, ``5`` a number)."""
    text = value if isinstance(value, str) and value.isprintable() else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class Rejection(Exception):
    """Input that cannot be accepted: an HTTP-style code, a short title and a detail."""

    def __init__(self, code: int, title: str, message: str, reason: str) -> None:
        super().__init__(message)
        self.code = code
        self.title = title
        self.message = message
        self.reason = reason
        """Counter label for dropped MQTT messages."""


def store_unavailable() -> Rejection:
    return Rejection(503, "Store unavailable",
                     "The node store is unavailable: the change is not acknowledged (it may "
                     "still be applied once the store is back); retry later",
                     "store_unavailable")


def rate_limited(retry_after_s: float) -> Rejection:
    return Rejection(429, "Too many requests",
                     f"The node is over its message rate; retry in {math.ceil(retry_after_s)} s",
                     "rate_limited")


def node_not_registered() -> Rejection:
    return Rejection(404, "Node not found", "Node must register first", "unknown_node")


def node_conflict(node_id: str, existing_type: str) -> Rejection:
    return Rejection(
        409, "Node conflict",
        # The type may be 64 multi-byte characters: keep the reply under PubSubClient's 512.
        f"Node {quote(node_id)} is registered with another node_type "
        f"({quote(existing_type, 32)}): delete it first to re-register it as another type",
        "conflict",
    )


def describe_error(exc: ValidationError) -> Rejection:
    """Turn pydantic's report into one sentence that names the field and the value."""
    first = exc.errors(include_url=False)[0]
    kind = first["type"]
    if kind == "json_invalid":
        detail = first.get("ctx", {}).get("error", "not valid JSON")
        return Rejection(400, "Invalid JSON", f"Request body is not valid JSON: {detail}",
                         "invalid_json")
    if kind in ("model_type", "model_attributes_type"):
        return Rejection(400, "Invalid JSON", "Request body must be a JSON object",
                         "invalid_json")
    loc = first["loc"]
    if len(loc) >= 2 and loc[0] == "metadata":
        # pydantic's loc holds the (device-chosen) key and a union member tag: name the key only.
        return Rejection(400, "Invalid field",
                         f"Field 'metadata.{quote(str(loc[1]))}' is invalid (values must be "
                         f"strings, numbers, booleans or null): {quote(repr(first.get('input')))}",
                         "invalid_payload")
    field = ".".join(quote(str(part)) for part in loc)
    if kind == "missing":
        return Rejection(400, "Missing field", f"Field '{field}' is required", "invalid_payload")
    message = first["msg"].removeprefix("Value error, ")
    shown = quote(repr(first.get("input")))
    return Rejection(400, "Invalid field", f"Field '{field}' is invalid ({message}): {shown}",
                     "invalid_payload")


def require_node_id(node_id: str | None) -> str:
    if node_id is None:
        raise Rejection(400, "Missing field", "Field 'node_id' is required", "invalid_payload")
    return node_id
