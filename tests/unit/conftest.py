"""Builders and fixtures shared by the unit tests: requests, a fake clock, a registry."""

from __future__ import annotations

from typing import Any

import pytest

from fleetmq.core.clock import FakeClock
from fleetmq.core.models import HeartbeatRequest, RegisterRequest
from fleetmq.core.registry import Node, Registry

NODE = "microclaw-esp32-f4cfa210"


def reg(node_type: str = "microclaw", **fields: Any) -> RegisterRequest:
    return RegisterRequest.model_validate({"node_type": node_type, **fields})


def hb(**fields: Any) -> HeartbeatRequest:
    return HeartbeatRequest.model_validate(fields)


def node_of(registry: Registry, node_id: str = NODE) -> Node:
    node = registry.get(node_id)
    assert node is not None
    return node


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def registry() -> Registry:
    return Registry(60)
