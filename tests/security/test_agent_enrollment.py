"""An agent enrolls against the real manager (contract section 8, "Enrollment"): an enroll key
and a token file, the embedded broker with auth on; the node token it gets is its login from
then on, kept 0600 and reused at the next start without spending the key again."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp

from fleetmq.agent import Agent
from fleetmq.auth.tokens import token_kind
from tests.conftest import eventually
from tests.security.broker_clients import auth_fleet


async def test_an_agent_enrolls_once_with_an_enroll_key_then_logs_in_with_its_own_token(
    tmp_path: Path, root: str, http: aiohttp.ClientSession,
) -> None:
    async with auth_fleet(tmp_path, root, http) as fleet:
        key, enroll_key = await fleet.svc.auth.create_key(
            "enroll", max_uses=1, id_pattern="esp32-*", actor="test")
        token_file = tmp_path / "node.token"
        api = f"http://127.0.0.1:{fleet.svc.http_port}"
        broker = f"mqtt://127.0.0.1:{fleet.port}"
        for start in range(2):  # the second start reuses the file: the key has no use left
            agent = Agent("esp32-0001", "microclaw", broker=broker, topic_root=root,
                          interval_s=5, enroll_key=enroll_key, enroll_api=api,
                          token_file=str(token_file))
            async with agent:
                await asyncio.wait_for(agent.registered.wait(), 15)
                await eventually(lambda: fleet.node_has("esp32-0001", status="online"))
            token = token_file.read_text().strip()
            assert token_kind(token) == "node"
            assert token_file.stat().st_mode & 0o777 == 0o600
            verdict = fleet.svc.auth.verify(token)
            assert verdict.principal is not None
            assert verdict.principal.id == "esp32-0001", start
        used = fleet.svc.auth.key(key.id)
        assert used is not None
        assert used.uses == 1
