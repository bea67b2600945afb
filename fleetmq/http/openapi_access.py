"""The access-control part of the OpenAPI document: the bearer scheme, each route's
requirement, and the keys, credentials, enrollment and audit routes (contract section 8).

The requirement of each route comes from ``RULES``, the table the gate itself enforces, so
the document cannot say a route is open while the server guards it, or the other way round.
"""

from __future__ import annotations

from typing import Any

from fleetmq.auth.tokens import MAX_DURATION_S
from fleetmq.core.models import printable_pattern
from fleetmq.core.topics import NODE_ID_PATTERN
from fleetmq.http.access_models import ENROLL_ONLY, MAX_GRACE_S, MAX_USES, MIN_LIFETIME_S
from fleetmq.http.auth import RULES

_TS = {"type": "string", "format": "date-time", "example": "2026-02-16T08:30:00.000Z"}
_TS_OR_NULL = {"type": ["string", "null"], "format": "date-time"}
_SECONDS = {"type": "number", "minimum": MIN_LIFETIME_S, "maximum": MAX_DURATION_S}
_NODE_ID_PARAM = {"name": "node_id", "in": "path", "required": True,
                  "schema": {"type": "string", "pattern": NODE_ID_PATTERN}}
_ROLES = ["read", "write", "admin", "broker", "enroll"]


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def _error(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema":
                                                                         _ref("Error")}}}


def _ok(description: str, schema: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema":
                                                                         _ref(schema)}}}


def _body(schema: str, required: bool = True) -> dict[str, Any]:
    return {"required": required, "content": {"application/json": {"schema": _ref(schema)}}}


_REFUSALS = {
    "401": {**_error("Missing, malformed, unknown, expired or revoked token"),
            "headers": {"WWW-Authenticate": {"schema": {"type": "string"},
                                             "description": "Bearer"}}},
    "403": _error("The token is valid but may not do this"),
    "429": {**_error("Too many failed attempts from this address with this token"),
            "headers": {"Retry-After": {"schema": {"type": "integer"}}}},
}
_AUTH_OFF = _error("Access control is off on this manager (the message says how to turn it "
                   "on)")
_STORE_DOWN = _error("The store is unavailable: nothing was changed, retry")


def access_paths() -> dict[str, Any]:
    node = "/api/v1/fleet/nodes/{node_id}/credentials"
    bad = _error("Invalid JSON or field (the message names it)")
    return {
        "/api/v1/keys": {
            "post": {"summary": "Create an API key or an enroll key (admin); the token is "
                                "shown only in this answer",
                     "requestBody": _body("KeyRequest"),
                     "responses": {"201": _ok("Created", "KeyCreated"), "400": bad,
                                   "409": _AUTH_OFF, "413": _error("Body over 64 KiB"),
                                   "503": _STORE_DOWN}},
            "get": {"summary": "List the keys that are not revoked (admin); never a token",
                    "responses": {"200": _ok("Keys", "KeyList"), "409": _AUTH_OFF}},
        },
        "/api/v1/keys/{key_id}": {"delete": {
            "summary": "Revoke a key (admin); cascade=true also revokes the node credentials "
                       "it enrolled",
            "parameters": [{"name": "key_id", "in": "path", "required": True,
                            "schema": {"type": "string"}},
                           {"name": "cascade", "in": "query", "required": False,
                            "schema": {"type": "boolean", "default": False}}],
            "responses": {"204": {"description": "Revoked"},
                          "400": _error("Invalid cascade"),
                          "404": _error("No key with that id"),
                          "409": _error("The last valid admin key (auth stays on for good), "
                                        "or access control is off"),
                          "503": _STORE_DOWN}}},
        node: {
            "post": {"summary": "Issue a node credential, or rotate it (admin, or the node "
                                "itself); the node need not be registered",
                     "parameters": [_NODE_ID_PARAM],
                     "requestBody": _body("CredentialRequest", required=False),
                     "responses": {"201": _ok("Issued", "CredentialIssued"), "400": bad,
                                   "409": _AUTH_OFF, "503": _STORE_DOWN}},
            "get": {"summary": "A node's valid credentials (admin); never a token",
                    "parameters": [_NODE_ID_PARAM],
                    "responses": {"200": _ok("Credentials", "CredentialList"),
                                  "400": _error("Invalid node id"),
                                  "404": _error("The node has no valid credential"),
                                  "409": _AUTH_OFF}},
            "delete": {"summary": "Revoke every token of a node (admin)",
                       "parameters": [_NODE_ID_PARAM],
                       "responses": {"204": {"description": "Revoked"},
                                     "400": _error("Invalid node id"),
                                     "404": _error("The node has no valid credential"),
                                     "409": _AUTH_OFF, "503": _STORE_DOWN}},
        },
        "/api/v1/fleet/enroll": {"post": {
            "summary": "Enroll a node with an enroll key: register it and get its own "
                       "credential",
            "requestBody": _body("RegisterRequest"),
            "responses": {"201": _ok("Enrolled and registered", "EnrollResponse"), "400": bad,
                          "409": _error("The id already has a credential, is registered as "
                                        "another type, or access control is off"),
                          "413": _error("Body over 64 KiB"), "503": _STORE_DOWN}}},
        "/api/v1/audit": {"get": {
            "summary": "Changes of keys and credentials, newest first (admin)",
            "parameters": [
                {"name": "limit", "in": "query", "required": False,
                 "schema": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100}},
                {"name": "before", "in": "query", "required": False,
                 "schema": {"type": "integer", "minimum": 1, "maximum": 2**63 - 1},
                 "description": "only entries with a smaller id: the previous page's 'next'"}],
            "responses": {"200": _ok("Entries", "AuditList"),
                          "400": _error("Invalid limit or before"), "409": _AUTH_OFF,
                          "503": _error("The store cannot be read")}}},
    }


def _key_request() -> dict[str, Any]:
    """Every role takes role, name and expiry; only an enroll key takes its limits (given on
    another role they are refused, unless null or false)."""
    limits = {
        "max_uses": {"type": ["integer", "null"], "minimum": 1, "maximum": MAX_USES},
        "id_pattern": {"anyOf": [{"type": "string", "minLength": 1, "maxLength": 256,
                                  "pattern": r"^[A-Za-z0-9._:*?\[\]!-]+$"}, {"type": "null"}]},
        "node_type": {"anyOf": [{"type": "string", "minLength": 1, "maxLength": 64,
                                 "pattern": printable_pattern()}, {"type": "null"}]},
        "allow_registered": {"type": "boolean"},
    }
    absent = {"max_uses": {"type": "null"}, "id_pattern": {"type": "null"},
              "node_type": {"type": "null"}, "allow_registered": {"const": False}}
    assert set(limits) == set(absent) == set(ENROLL_ONLY)
    return {
        "type": "object", "required": ["role"],
        "properties": {
            "role": {"enum": _ROLES},
            "name": {"type": "string", "maxLength": 64, "pattern": printable_pattern()},
            "expires_in_seconds": {"anyOf": [_SECONDS, {"type": "null"}]},
            **limits,
        },
        "anyOf": [{"properties": {"role": {"const": "enroll"}}},
                  {"properties": absent}],
        "description": "max_uses, id_pattern, node_type and allow_registered apply to "
                       "enroll keys only",
    }


def access_schemas() -> dict[str, Any]:
    key_fields = {"id": {"type": "string"}, "name": {"type": "string"},
                  "role": {"enum": _ROLES}, "created_at": _TS, "expires_at": _TS_OR_NULL}
    return {
        "KeyRequest": _key_request(),
        "KeyCreated": {"type": "object", "required": [*key_fields, "token"],
                       "properties": {**key_fields, "token": {"type": "string"}}},
        "KeyList": {"type": "object", "required": ["keys"], "properties": {"keys": {
            "type": "array", "items": {
                "type": "object",
                "required": [*key_fields, "last_used_at", "uses", "max_uses"],
                "properties": {**key_fields, "last_used_at": _TS_OR_NULL,
                               "uses": {"type": "integer", "minimum": 0},
                               "max_uses": {"type": ["integer", "null"]}}}}}},
        "CredentialRequest": {"type": "object", "properties": {
            "expires_in_seconds": {"anyOf": [_SECONDS, {"type": "null"}]},
            "grace_seconds": {"type": "number", "minimum": 0, "maximum": MAX_GRACE_S,
                              "default": 0}}},
        "CredentialIssued": {
            "type": "object",
            "required": ["node_id", "token", "mqtt", "created_at", "expires_at"],
            "properties": {
                "node_id": {"type": "string"}, "token": {"type": "string"},
                "mqtt": {"type": "object", "required": ["username", "password", "client_id"],
                         "properties": {"username": {"type": "string"},
                                        "password": {"type": "string"},
                                        "client_id": {"type": "string"}}},
                "created_at": _TS, "expires_at": _TS_OR_NULL}},
        "CredentialList": {"type": "object", "required": ["node_id", "credentials"],
                           "properties": {"node_id": {"type": "string"}, "credentials": {
                               "type": "array", "items": {
                                   "type": "object",
                                   "required": ["id", "created_at", "last_used_at",
                                                "expires_at", "valid_until", "enrolled_by",
                                                "needs_reissue"],
                                   "properties": {
                                       "id": {"type": "string"}, "created_at": _TS,
                                       "last_used_at": _TS_OR_NULL, "expires_at": _TS_OR_NULL,
                                       "valid_until": _TS_OR_NULL,
                                       "enrolled_by": {"type": ["string", "null"]},
                                       "needs_reissue": {
                                           "type": "boolean",
                                           "description": "The broker lost this credential "
                                           "(dynsec reconciliation): issue a new one"}}}}}},
        "EnrollResponse": {
            "type": "object", "required": ["node_id", "status", "message", "timestamp", "token"],
            "properties": {"node_id": {"type": "string"}, "status": {"const": "registered"},
                           "message": {"type": "string"}, "timestamp": _TS,
                           "token": {"type": "string"}}},
        "AuditList": {"type": "object", "required": ["entries", "next"], "properties": {
            "entries": {"type": "array", "items": {
                "type": "object",
                "required": ["id", "at", "action", "actor", "address", "subject"],
                "properties": {"id": {"type": "integer"}, "at": _TS,
                               "action": {"type": "string"}, "actor": {"type": "string"},
                               "address": {"type": ["string", "null"]},
                               "subject": {"type": "string"}}}},
            "next": {"type": ["integer", "null"]}}},
    }


def secure(document: dict[str, Any], metrics_public: bool = False) -> dict[str, Any]:
    """Declare the bearer scheme and each operation's requirement and refusals, in place."""
    document.setdefault("components", {})["securitySchemes"] = {"bearer": {
        "type": "http", "scheme": "bearer",
        "description": "fmq_key_..., fmq_node_... or fmq_enr_... tokens; never in a URL"}}
    document["security"] = [{"bearer": []}]
    for path, item in document["paths"].items():
        for method, operation in item.items():
            rule = RULES.get((method.upper(), path))
            open_route = (rule is not None and rule.action is None) or (
                rule is not None and rule.action == "metrics" and metrics_public)
            if open_route:
                operation["security"] = []
                continue
            operation["security"] = [{"bearer": []}]
            responses = operation.setdefault("responses", {})
            for code, response in _REFUSALS.items():
                responses.setdefault(code, response)
    return document
