"""The REST gate remembers the token a kept-alive connection presented (so that a client's
every request does not pay for a SHA-256 and a clock): these attacks all ride one connection,
and each must be judged as if it were the connection's first request.

Every test pins its client to one TCP connection and asserts that it did stay on one, so that
the memory is what is attacked.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import aiohttp
import pytest

from tests.security.conftest import FLEET, Guarded, Reply


class OneConnection:
    """A client whose every request goes over one kept-alive TCP connection."""

    def __init__(self, session: aiohttp.ClientSession, base: str) -> None:
        self.session = session
        self.base = base
        self.connections = 0

    async def request(self, method: str, path: str, token: str | None = None, *,
                      body: Any = None, header: str | None = None) -> Reply:
        headers = {}
        if header is not None:
            headers["Authorization"] = header
        elif token is not None:
            headers["Authorization"] = f"Bearer {token}"
        async with self.session.request(method, self.base + path, json=body,
                                        headers=headers) as resp:
            return Reply(resp.status, resp.headers, await resp.read())

    async def heartbeat(self, token: str | None, node_id: str, **kw: Any) -> Reply:
        return await self.request("POST", f"{FLEET}/heartbeat", token,
                                  body={"node_id": node_id, "uptime_seconds": 7}, **kw)

    def assert_one_connection(self) -> None:
        assert self.connections == 1, f"the client opened {self.connections} connections"


@pytest.fixture
async def one(guarded: Guarded) -> AsyncIterator[OneConnection]:
    opened: list[object] = []

    async def count(*_: Any) -> None:
        opened.append(None)

    trace = aiohttp.TraceConfig()
    trace.on_connection_create_end.append(count)
    connector = aiohttp.TCPConnector(limit=1, keepalive_timeout=60)
    async with aiohttp.ClientSession(connector=connector, trace_configs=[trace]) as session:
        client = OneConnection(session, guarded.client.base)
        yield client
        client.connections = len(opened)
        client.assert_one_connection()


async def _victim(guarded: Guarded, node_id: str = "victim-1") -> Any:
    """The node under attack (and other-1, whose heartbeats are the attacker's own traffic)."""
    for registered in (node_id, "other-1"):
        reply = await guarded.client.register(guarded.admin, registered)
        assert reply.status in (200, 201), reply.raw
    return await guarded.snapshot(node_id)


async def test_a_key_revoked_while_its_connection_stays_open_is_refused_on_it(
        guarded: Guarded, one: OneConnection) -> None:
    before = await _victim(guarded)
    write = await guarded.client.key(guarded.admin, "write")
    for _ in range(3):
        assert (await one.heartbeat(write, "other-1")).status == 200
    key_id = next(k["id"] for k in (await guarded.client.request(
        "GET", "/api/v1/keys", guarded.admin)).json["keys"] if k["role"] == "write")
    revoked = await guarded.client.request("DELETE", f"/api/v1/keys/{key_id}", guarded.admin)
    assert revoked.status in (200, 204), revoked.raw

    attack = await one.heartbeat(write, "victim-1")

    assert attack.status == 401, attack.raw
    assert attack.json["message"] == "The token has been revoked"
    assert await guarded.snapshot("victim-1") == before


async def test_a_key_that_expires_while_its_connection_stays_open_is_refused_from_then(
        guarded: Guarded, one: OneConnection) -> None:
    """Not a second of grace: the memory ends at the token's own expiry."""
    await _victim(guarded)
    write = await guarded.client.key(guarded.admin, "write", expires_in_seconds=1.5)
    listed = (await guarded.client.request("GET", "/api/v1/keys", guarded.admin)).json["keys"]
    expires_at = next(k["expires_at"] for k in listed if k["role"] == "write")
    # Milliseconds on the wire: the true expiry is within 1 ms of what is shown.
    deadline = datetime.fromisoformat(expires_at).timestamp() + 0.001
    accepted_late: list[float] = []
    refused_at = None
    while time.time() < deadline + 2.0:
        sent = time.time()
        # Reads: heartbeats this fast would meet the node's rate limit (429) instead.
        reply = await one.request("GET", f"{FLEET}/nodes/other-1", write)
        assert reply.status in (200, 401), reply.raw
        if reply.status == 200 and sent > deadline:
            accepted_late.append(sent - deadline)
        if reply.status == 401:
            refused_at = sent
            assert reply.json["message"] == "The token has expired"
            break
        await asyncio.sleep(0.005)  # pace: the key's own rate limit (--key-rate) stays out
    assert not accepted_late, (f"accepted {len(accepted_late)} requests up to "
                               f"{max(accepted_late):.3f} s after its expiry")
    assert refused_at is not None, "the expired key was never refused"
    assert refused_at - deadline < 0.1


async def test_other_tokens_on_a_connection_that_presented_a_good_one_are_judged_alone(
        guarded: Guarded, one: OneConnection) -> None:
    """Behind a proxy one connection carries many clients: a good token earlier on it lends
    nothing to the requests after it."""
    before = await _victim(guarded)
    write = await guarded.client.key(guarded.admin, "write")
    read = await guarded.client.key(guarded.admin, "read")
    altered = write[:-1] + ("A" if write[-1] != "A" else "E")
    assert (await one.heartbeat(write, "other-1")).status == 200

    assert (await one.heartbeat(read, "victim-1")).status == 403
    assert (await one.heartbeat(altered, "victim-1")).status == 401
    assert (await one.heartbeat(write + "x", "victim-1")).status == 401
    assert (await one.heartbeat(None, "victim-1")).status == 401
    assert (await one.heartbeat(None, "victim-1", header=f"Basic {write}")).status == 401
    assert (await one.heartbeat(None, "victim-1", header=f"bearer  {write}")).status == 401
    assert (await one.heartbeat(None, "victim-1", header=f"Bearer {write}é")).status == 401
    assert await guarded.snapshot("victim-1") == before
    # ... and the good token still works after them, on the same connection.
    assert (await one.heartbeat(write, "victim-1")).status == 200


async def test_a_node_token_on_a_connection_keeps_to_its_own_node(
        guarded: Guarded, one: OneConnection) -> None:
    before = await _victim(guarded)
    own = await guarded.client.credential(guarded.admin, "own-1")
    assert (await one.request("POST", f"{FLEET}/register", own,
                              body={"node_id": "own-1", "node_type": "microclaw"})).status == 200
    assert (await one.heartbeat(own, "own-1")).status == 200
    for _ in range(3):
        attack = await one.heartbeat(own, "victim-1")
        assert attack.status == 403, attack.raw
    assert (await one.request("DELETE", f"{FLEET}/nodes/victim-1", own)).status == 403
    assert await guarded.snapshot("victim-1") == before
