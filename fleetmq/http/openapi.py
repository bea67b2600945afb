"""The OpenAPI 3 document of the REST facade, served at ``/api/v1/openapi.json``.

Request schemas come from the pydantic models the server validates with, so they cannot drift;
responses are written out here beside the shapes ``views.py`` produces.
"""

from __future__ import annotations

from typing import Any

from fleetmq import __version__
from fleetmq.core.models import HeartbeatRequest, RegisterRequest
from fleetmq.core.topics import NODE_ID_PATTERN
from fleetmq.http.hook_fields import (
    AUTHENTICATE_FIELDS,
    AUTHENTICATE_PATH,
    AUTHORIZE_FIELDS,
    AUTHORIZE_PATH,
    Kinds,
)
from fleetmq.http.openapi_access import access_paths, access_schemas, secure

_TS = {"type": "string", "format": "date-time", "example": "2026-02-16T08:30:00.000Z"}
_COUNTER = {"type": ["integer", "null"], "minimum": 0}
MAX_ID = 2**63 - 1
"""The largest id a store keeps (a signed 64-bit integer): the highest ``before``."""


def _error(description: str) -> dict[str, Any]:
    return {"description": description,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}


def _ok(description: str, schema: str) -> dict[str, Any]:
    return {"description": description,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}}}


def _body(schema: str) -> dict[str, Any]:
    return {"required": True,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}}}


_NODE_ID_PARAM = {"name": "node_id", "in": "path", "required": True,
                  "schema": {"type": "string", "pattern": NODE_ID_PATTERN}}


_STORE_DOWN = _error("The node store is unavailable: the change was not acknowledged, retry")
_ACTIVE_URL = {"type": ["string", "null"],
               "description": "the active manager's --advertise-url; null if it has none"}
_STANDBY_TEXT = ("this manager is a standby (contract section 10): nothing was done; send the "
                 "request to the active manager, or through a load balancer that checks /readyz")


def _ref(schema: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{schema}"}


def _answer_standby(document: dict[str, Any]) -> None:
    """Every /api/v1 operation answers 503 Standby on a standby (before access control).
    Beside a 503 it already has (the store is unavailable), either body may come."""
    for path, item in document["paths"].items():
        if not path.startswith("/api/v1/"):
            continue
        for operation in item.values():
            responses = operation.setdefault("responses", {})
            other = responses.get("503")
            if other is None:
                responses["503"] = {"description": _STANDBY_TEXT[0].upper() + _STANDBY_TEXT[1:],
                                    "content": {"application/json": {"schema": _ref("Standby")}}}
            else:
                responses["503"] = {
                    "description": f"{other['description']}; or {_STANDBY_TEXT}",
                    "content": {"application/json": {"schema": {
                        "anyOf": [_ref("Error"), _ref("Standby")]}}}}
_EVENT_QUERY = [
    {"name": "limit", "in": "query", "required": False,
     "schema": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100}},
    {"name": "before", "in": "query", "required": False,
     "schema": {"type": "integer", "minimum": 1, "maximum": MAX_ID},
     "description": "only events with a smaller id: the 'next' value of the previous page"},
]


_EVENT_POSITION = {
    "type": "string", "pattern": "^[0-9a-f]{1,32}\\.[0-9]{1,18}$",
    "example": "3f9a1c2b7d4e5f60.1042",
    "description": "<store id>.<event id>: the last event this answer includes; watch from "
                   "here (?since= or Last-Event-ID) to miss nothing",
}
_WATCH = {"get": {
    "summary": "Watch the fleet: committed events as Server-Sent Events",
    "description": (
        "text/event-stream. 'event: transition', 'data' an Event, 'id' <store id>.<event "
        "id>. With Last-Event-ID (or ?since=) every later event comes first, then live ones: "
        "nothing missed, nothing repeated; without either the stream starts at the next "
        "event. 'event: reset' (data {reason: gone | another_store | future, event_id}): that "
        "position cannot be resumed, reload the list; the stream goes on from event_id. "
        "'event: overflow' (data {reason, event_id}): the client fell more than 10,000 events "
        "behind; the stream closes, resume from the last id received. A comment line every "
        "15 s while quiet; while the store is unavailable the stream pauses."),
    "parameters": [
        {"name": "since", "in": "query", "required": False, "schema": _EVENT_POSITION},
        {"name": "Last-Event-ID", "in": "header", "required": False,
         "schema": _EVENT_POSITION, "description": "wins over since"},
        *({"name": name, "in": "query", "required": False, "schema": {"type": "string"},
           "description": description}
          for name, description in (
              ("node_type", "only events of nodes of this type (case-insensitive)"),
              ("location", "only events of nodes at this location (case-insensitive)"),
              ("node_id", "only this node's events"))),
    ],
    "responses": {"200": {"description": "The stream",
                          "content": {"text/event-stream": {"schema": {"type": "string"}}}},
                  "400": _error("A since or Last-Event-ID that is not an event id")},
}}


_READYZ = {"get": {
    "summary": "Readiness: the active manager, broker connected, subscriptions acked, store "
               "available",
    "description": "A load balancer that checks this sends traffic to the active manager only. "
                   "Every answer is a status object, never an Error (contract section 11).",
    "responses": {
        "200": {"description": "Ready: the active manager",
                "content": {"application/json": {"schema": _ref("Ready")}}},
        "503": {"description": "Not ready (the active, with the reason), or a standby (with "
                               "the active's URL)",
                "content": {"application/json": {"schema": {
                    "oneOf": [_ref("NotReady"), _ref("StandbyStatus")]}}}},
    },
}}


_JSON_TYPES = {str: "string", int: "integer", bool: "boolean"}


def _hook(summary: str, fields: dict[str, Kinds], answer: dict[str, Any]) -> dict[str, Any]:
    """A broker hook: EMQX 5 sends JSON or a form, fleetmq answers 200 with the verdict."""
    schema = {"type": "object", "properties": {
        name: {"type": [_JSON_TYPES[k] for k in kinds] if len(kinds) > 1 else "string"}
        for name, kinds in fields.items()},
        "description": "Other fields are ignored; a field named here given twice in a form "
                       "is refused"}
    return {"post": {
        "summary": summary,
        "description": "Called by the broker with a key of role broker (or admin) as bearer.",
        "requestBody": {"required": True, "content": {
            "application/json": {"schema": schema},
            "application/x-www-form-urlencoded": {"schema": schema}}},
        "responses": {"200": {"description": "The verdict", "content": {"application/json": {
                          "schema": {"type": "object", "properties": answer}}}},
                      "400": _error("A body that is neither JSON nor a form, or a field of "
                                    "the wrong type or given twice"),
                      "401": _error("No valid bearer token"),
                      "403": _error("The bearer is not a broker or admin key")},
    }}


_VERDICT = {"result": {"type": "string", "enum": ["allow", "deny"]}}
_BROKER_HOOK_PATHS = {
    AUTHENTICATE_PATH: _hook(
        "EMQX HTTP authentication: may this CONNECT log in?", AUTHENTICATE_FIELDS,
        {**_VERDICT, "is_superuser": {"type": "boolean"},
         "client_attrs": {"type": "object"}}),
    AUTHORIZE_PATH: _hook(
        "EMQX HTTP authorization: may this client publish or subscribe here?",
        AUTHORIZE_FIELDS, _VERDICT),
}


_JSON_SCHEMA_KEYS = {"ge": "minimum", "le": "maximum", "gt": "exclusiveMinimum",
                     "lt": "exclusiveMaximum"}


def _standard(schema: Any) -> Any:
    """pydantic leaks "ge"/"le" for constraints beside a BeforeValidator: use JSON Schema's."""
    if isinstance(schema, dict):
        return {_JSON_SCHEMA_KEYS.get(k, k): _standard(v) for k, v in schema.items()}
    if isinstance(schema, list):
        return [_standard(v) for v in schema]
    return schema


def _rest_request(model: type[RegisterRequest | HeartbeatRequest],
                  aliases: dict[str, str]) -> dict[str, Any]:
    """A request model as REST takes it: node_id required, the agents' aliases accepted."""
    schema: dict[str, Any] = _standard(model.model_json_schema())
    props = schema["properties"]
    props["node_id"] = {"type": "string", "pattern": NODE_ID_PATTERN}
    required = ["node_id"]
    needed = schema.pop("required", [])
    either: list[dict[str, Any]] = []
    for alias, name in aliases.items():
        # The server reads the alias only when the name itself is absent (pydantic's
        # AliasChoices): beside the name, the alias is an unknown field, ignored whatever it is.
        alias_rule = {"properties": {alias: props[name]}}
        if name in needed:  # either spelling will do
            either.append({"anyOf": [{"required": [name]},
                                     {"required": [alias], **alias_rule}]})
        else:
            either.append({"anyOf": [{"required": [name]}, alias_rule]})
        props[alias] = {"description": f"accepted in place of {name} (ignored beside it)"}
    required += [name for name in needed if name not in aliases.values()]
    schema["required"] = required
    if either:
        schema["allOf"] = either
    return schema


def _schemas() -> dict[str, Any]:
    return {
        "RegisterRequest": _rest_request(RegisterRequest,
                                         {"type": "node_type", "node_name": "name"}),
        "HeartbeatRequest": _rest_request(HeartbeatRequest, {}),
        "Error": {
            "type": "object", "required": ["error", "message"],
            "properties": {"error": {"type": "string"}, "message": {"type": "string"}},
        },
        "Standby": {
            "type": "object", "required": ["error", "message", "active"],
            "description": "A standby's answer to every /api/v1 route",
            "properties": {"error": {"const": "Standby"}, "message": {"type": "string"},
                           "active": _ACTIVE_URL},
        },
        "Ready": {
            "type": "object", "required": ["status", "role", "nodes", "mqtt_protocol"],
            "description": "200: the active manager, broker connected, subscriptions "
                           "acknowledged, store available",
            "properties": {"status": {"const": "ready"}, "role": {"const": "active"},
                           "nodes": {"type": "integer", "minimum": 0},
                           "mqtt_protocol": {"enum": ["5", "3.1.1"]}},
        },
        "NotReady": {
            "type": "object", "required": ["status", "message"],
            "description": "503: the active manager while its broker connection or store is "
                           "down",
            "properties": {"status": {"const": "not_ready"},
                           "message": {"type": "string", "description": "why"}},
        },
        "StandbyStatus": {
            "type": "object", "required": ["status", "active"],
            "description": "503: a standby; a load balancer sends it nothing",
            "properties": {"status": {"const": "standby"}, "active": _ACTIVE_URL},
        },
        "RegisterResponse": {
            "type": "object", "required": ["node_id", "status", "message", "timestamp"],
            "properties": {
                "node_id": {"type": "string"}, "status": {"const": "registered"},
                "message": {"enum": ["Node successfully registered", "Node registration updated"]},
                "timestamp": _TS,
            },
        },
        "HeartbeatResponse": {
            "type": "object", "required": ["node_id", "received", "next_check_seconds"],
            "properties": {"node_id": {"type": "string"}, "received": _TS,
                           "next_check_seconds": {"type": "integer"}},
        },
        "Node": {
            "type": "object",
            "required": ["id", "name", "type", "capabilities", "location", "metadata", "status",
                         "status_reason", "status_since", "last_seen", "registered_at",
                         "heartbeat_interval_seconds", "uptime_seconds", "free_memory_kb",
                         "sensors_active"],
            "properties": {
                "id": {"type": "string", "pattern": NODE_ID_PATTERN},
                "name": {"type": "string"}, "type": {"type": "string"},
                "capabilities": {"type": "array", "items": {"type": "string"}},
                "location": {"type": ["string", "null"]},
                "metadata": {"type": "object", "additionalProperties": {
                    "type": ["string", "number", "boolean", "null"]}},
                "status": {"enum": ["online", "degraded", "offline"]},
                "status_reason": {"type": "string"},
                "status_since": _TS, "last_seen": _TS, "registered_at": _TS,
                "heartbeat_interval_seconds": {"type": "integer"},
                "uptime_seconds": _COUNTER, "free_memory_kb": _COUNTER,
                "sensors_active": _COUNTER,
            },
        },
        "Event": {
            "type": "object",
            "description": "A transition, a registration or a deletion, with the node as it "
                           "was then (contract section 9)",
            "required": ["id", "node_id", "node_type", "location", "from", "to", "reason", "at",
                         "last_seen"],
            "properties": {
                "id": {"type": "integer", "minimum": 1,
                       "description": "increasing within one store"},
                "node_id": {"type": "string", "pattern": NODE_ID_PATTERN},
                "node_type": {"type": ["string", "null"],
                              "description": "null only for an event stored before fleetmq "
                                             "kept it, whose node is gone"},
                "location": {"type": ["string", "null"]},
                "from": {"enum": ["online", "degraded", "offline", None],
                         "description": "null for a first registration"},
                "to": {"enum": ["online", "degraded", "offline", "deleted"]},
                "reason": {"type": "string",
                           "description": "'deleted' for a deletion"},
                "at": _TS,
                "last_seen": {**_TS, "type": ["string", "null"],
                              "description": "null only for an event stored before fleetmq "
                                             "kept it"},
            },
        },
        "EventList": {
            "type": "object", "required": ["events", "next"],
            "properties": {
                "events": {"type": "array", "items": {"$ref": "#/components/schemas/Event"}},
                "next": {"type": ["integer", "null"],
                         "description": "pass as 'before' for the next (older) page"},
            },
        },
        "NodeList": {
            "type": "object", "required": ["nodes", "count", "total", "next", "event_id"],
            "properties": {
                "nodes": {"type": "array", "items": {"$ref": "#/components/schemas/Node"}},
                "count": {"type": "integer"}, "total": {"type": "integer"},
                "next": {"type": ["string", "null"]},
                "event_id": _EVENT_POSITION,
            },
        },
        "Summary": {
            "type": "object", "required": ["total", "by_status", "by_type", "event_id"],
            "properties": {
                "total": {"type": "integer", "minimum": 0},
                "by_status": {"type": "object",
                              "required": ["online", "degraded", "offline"],
                              "properties": {s: {"type": "integer", "minimum": 0}
                                             for s in ("online", "degraded", "offline")}},
                "by_type": {"type": "object",
                            "additionalProperties": {"type": "integer", "minimum": 1},
                            "description": "nodes by type as registered"},
                "event_id": _EVENT_POSITION,
            },
        },
    }


def openapi_document(topic_root: str, *, auth: bool = False,
                     metrics_public: bool = False) -> dict[str, Any]:
    """The document; with ``auth``, each route's bearer requirement and refusals too."""
    document = _document(topic_root)
    document["paths"].update(access_paths())
    document["components"]["schemas"].update(access_schemas())
    _answer_standby(document)
    return secure(document, metrics_public) if auth else document


def _document(topic_root: str) -> dict[str, Any]:
    query = [
        {"name": name, "in": "query", "required": False, "schema": schema,
         "description": description}
        for name, schema, description in (
            ("node_type", {"type": "string"}, "exact match, case-insensitive"),
            ("status", {"enum": ["online", "degraded", "offline"]}, "exact match"),
            ("location", {"type": "string"}, "exact match, case-insensitive"),
            ("q", {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"},
             "ids that start with this (case-sensitive, as ids sort)"),
            ("limit", {"type": "integer", "minimum": 1, "maximum": 10000},
             "page size; without it every match is returned"),
            ("after", {"type": "string"}, "the 'next' value of the previous page"),
        )
    ]
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "fleetmq REST API",
            "version": __version__,
            "description": (
                "REST facade of the fleetmq node registry. The same registry is fed over MQTT "
                f"({topic_root}/<id>/register, {topic_root}/<id>/heartbeat); request bodies are "
                "JSON whatever the Content-Type says, unknown fields are ignored, bodies over "
                "64 KiB get 413. A standby manager (high availability) answers every /api/v1 "
                "route 503 with {\"error\": \"Standby\", \"message\", \"active\": the active "
                "manager's advertised URL or null}."
            ),
        },
        "paths": {
            "/api/v1/fleet/register": {"post": {
                "summary": "Register a node, or update its registration",
                "requestBody": _body("RegisterRequest"),
                "responses": {"200": _ok("Registered (and stored)", "RegisterResponse"),
                              "400": _error("Invalid JSON or field"),
                              "409": _error("The id is registered with another node_type"),
                              "413": _error("Body over 64 KiB"),
                              "503": _STORE_DOWN},
            }},
            "/api/v1/fleet/heartbeat": {"post": {
                "summary": "Report that a node is alive (or degraded, or going offline)",
                "requestBody": _body("HeartbeatRequest"),
                "responses": {"200": _ok("Received", "HeartbeatResponse"),
                              "400": _error("Invalid JSON or field"),
                              "404": _error("Node must register first"),
                              "413": _error("Body over 64 KiB")},
            }},
            "/api/v1/fleet/nodes": {"get": {
                "summary": "List nodes, sorted by id",
                "parameters": query,
                "responses": {"200": _ok("Matching nodes", "NodeList"),
                              "400": _error("Invalid status or limit")},
            }},
            "/api/v1/fleet/nodes/{node_id}": {
                "get": {"summary": "One node", "parameters": [_NODE_ID_PARAM],
                        "responses": {"200": _ok("The node", "Node"),
                                      "400": _error("Invalid node id"),
                                      "404": _error("No node with that id")}},
                "delete": {"summary": "Decommission a node and clear its retained status",
                           "parameters": [_NODE_ID_PARAM],
                           "responses": {"204": {"description": "Deleted (and stored)"},
                                         "400": _error("Invalid node id"),
                                         "404": _error("No node with that id"),
                                         "503": _STORE_DOWN}},
            },
            "/api/v1/fleet/nodes/{node_id}/events": {"get": {
                "summary": "A node's history (registrations, transitions, its deletion), "
                           "newest first; a deleted node's history stays readable until pruned",
                "parameters": [_NODE_ID_PARAM, *_EVENT_QUERY],
                "responses": {"200": _ok("Events", "EventList"),
                              "400": _error("Invalid node id, limit or before"),
                              "404": _error("No node with that id, and no history"),
                              "503": _error("The store cannot be read")},
            }},
            "/api/v1/fleet/summary": {"get": {
                "summary": "Counts by status and type, and the last event they include",
                "responses": {"200": _ok("The counts", "Summary")},
            }},
            "/api/v1/fleet/watch": _WATCH,
            "/healthz": {"get": {"summary": "Liveness",
                                 "responses": {"200": {"description": "The process serves"}}}},
            "/readyz": _READYZ,
            "/api/v1/openapi.json": {"get": {
                "summary": "This OpenAPI document",
                "responses": {"200": {"description": "The OpenAPI 3 document",
                                      "content": {"application/json": {}}}}}},
            "/metrics": {"get": {
                "summary": "Counters and gauges in the Prometheus text format",
                "description": "Written by prometheus_client (`text/plain; version=0.0.4`), "
                               "with `# HELP` and `# TYPE` lines for every metric, and the "
                               "gauges `fleetmq_nodes{status=\"online\"|\"degraded\"|"
                               "\"offline\"}`.",
                "responses": {"200": {"description": "Metrics",
                                      "content": {"text/plain": {}}}}}},
            **_BROKER_HOOK_PATHS,
        },
        "components": {"schemas": _schemas()},
    }
