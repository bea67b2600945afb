"""The REST gate's route table against the OpenAPI document: every documented operation has
a rule, the open ones are exactly the contract's, and the document says what the gate does.
"""

from __future__ import annotations

import time
from collections import Counter

import pytest

from fleetmq.auth.rules import ACTIONS
from fleetmq.auth.service import AuthService
from fleetmq.auth.store import MemoryAuthStore
from fleetmq.config import AuthSettings
from fleetmq.core.clock import FakeClock
from fleetmq.errors import ConfigError
from fleetmq.http.auth import RULES, RestAccess
from fleetmq.http.openapi import openapi_document

HTTP_METHODS = {"get", "post", "delete", "put", "patch"}
OPEN = {("GET", "/healthz"), ("GET", "/readyz"), ("GET", "/api/v1/openapi.json"),
        ("GET", "/"), ("GET", "/dashboard/{name}")}  # the dashboard's files hold no fleet data


def _operations(document: dict[str, object]) -> set[tuple[str, str]]:
    paths = document["paths"]
    assert isinstance(paths, dict)
    return {(method.upper(), path) for path, item in paths.items() for method in item
            if method in HTTP_METHODS}


def test_every_documented_operation_has_an_access_rule() -> None:
    missing = _operations(openapi_document("fleet")) - set(RULES)
    assert not missing


def test_only_health_readiness_the_document_and_the_dashboard_files_are_open() -> None:
    assert {key for key, rule in RULES.items() if rule.action is None} == OPEN
    assert all(rule.action in ACTIONS for rule in RULES.values() if rule.action is not None)


def test_nodes_may_use_only_their_own_register_heartbeat_node_and_rotation() -> None:
    allowed = {key for key, rule in RULES.items() if rule.nodes_may}
    assert allowed == {
        ("POST", "/api/v1/fleet/register"), ("POST", "/api/v1/fleet/heartbeat"),
        ("GET", "/api/v1/fleet/nodes/{node_id}"),
        ("POST", "/api/v1/fleet/nodes/{node_id}/credentials"),
    }


def test_the_document_declares_bearer_tokens_only_when_auth_is_on() -> None:
    off = openapi_document("fleet")
    assert "securitySchemes" not in off["components"]
    on = openapi_document("fleet", auth=True)
    assert on["components"]["securitySchemes"]["bearer"] == {
        "type": "http", "scheme": "bearer",
        "description": on["components"]["securitySchemes"]["bearer"]["description"]}
    for path, item in on["paths"].items():
        for method, operation in item.items():
            if (method.upper(), path) in OPEN:
                assert operation["security"] == [], path
            else:
                assert operation["security"] == [{"bearer": []}], path
                assert {"401", "403"} <= set(operation["responses"]), path


def test_metrics_public_opens_metrics_in_the_document() -> None:
    doc = openapi_document("fleet", auth=True, metrics_public=True)
    assert doc["paths"]["/metrics"]["get"]["security"] == []


def test_a_trusted_proxy_that_is_not_a_cidr_is_a_config_error() -> None:
    auth = AuthService(MemoryAuthStore(), FakeClock())
    with pytest.raises(ConfigError, match="is not a CIDR"):
        RestAccess(auth, AuthSettings(trusted_proxies=("ten.0.0.0/8",)), time.monotonic,
                   Counter())
    RestAccess(auth, AuthSettings(trusted_proxies=("10.0.0.0/8", "::1", "192.168.1.7")),
               time.monotonic, Counter())
