"""Attacks on a real Mosquitto 2.0 whose dynamic security plugin fleetmq mirrors
(``--broker-auth dynsec``, contract section 8). Each asserts the attack fails AND the victim is
untouched."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import eventually
from tests.security.conftest import dynsec_settings, mirrored, settled
from tests.security.peer import NOT_AUTHORIZED, Peer
from tests.support import Mosquitto

pytestmark = pytest.mark.mosquitto


async def test_node_with_its_credential_connects_and_heartbeats(
        dynsec_mosquitto: Mosquitto, root: str, tmp_path: Path,
        peers: Callable[..., Peer]) -> None:
    async with mirrored(dynsec_settings(dynsec_mosquitto, root, tmp_path)) as service:
        node = f"a-{root}"
        _cred, token = await service.auth.issue_credential(node, actor="test")
        a = peers(dynsec_mosquitto, node, node, token)
        await settled(service)
        assert await a.connect() == 0
        assert await a.subscribe(f"{root}/{node}/status") == 1
        assert await a.publish(f"{root}/{node}/register",
                               json.dumps({"node_type": "esp32"}).encode()) == 0
        await eventually(lambda: service.registry.get(node) is not None)
