"""The REST gate remembers the token a kept-alive connection presented (so that a client's
every request does not pay for a SHA-256 and a clock): these attacks all ride one connection,
and each must be judged as if it were the connection's first request.

Every test pins its client to one TCP connection and asserts that it did stay on one, so that
the memory is what is attacked.
"""

from __future__ import annotations

import asyncio
import gc
import ssl
import time
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from fleetmq.config import HttpSettings
from tests.conftest import eventually, make_settings, running
from tests.security.conftest import FLEET, Guarded, Reply, auth_settings, guarded_manager
from tests.security.pki import Pki
from tests.security.test_live_changes import LIVE_WITHIN_S, _cli
from tests.support import Mosquitto


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


async def _refused_from(one: OneConnection, path: str, token: str, deadline: float,
                        message: str) -> None:
    """Reads ``path`` with ``token`` over the one connection until it is refused: nothing
    accepted once ``deadline`` (wall clock) has passed, and refused within 0.1 s of it."""
    accepted_late: list[float] = []
    refused_at = None
    while time.time() < deadline + 2.0:
        sent = time.time()
        reply = await one.request("GET", path, token)
        assert reply.status in (200, 401), reply.raw
        if reply.status == 200 and sent > deadline:
            accepted_late.append(sent - deadline)
        if reply.status == 401:
            refused_at = sent
            assert reply.json["message"] == message
            break
        await asyncio.sleep(0.005)  # pace: the key's own rate limit (--key-rate) stays out
    assert not accepted_late, (f"accepted {len(accepted_late)} requests up to "
                               f"{max(accepted_late):.3f} s after the token ended")
    assert refused_at is not None, "the token was never refused"
    assert refused_at - deadline < 0.1


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
    # Reads: heartbeats this fast would meet the node's rate limit (429) instead.
    await _refused_from(one, f"{FLEET}/nodes/other-1", write, deadline,
                        "The token has expired")


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


async def test_a_rotated_out_node_token_is_refused_on_its_connection_from_its_grace_end(
        guarded: Guarded, one: OneConnection) -> None:
    """Rotation with a grace: the old token's trust on its open connection ends at the grace's
    end (its revocation time, set in the future), not a second later."""
    await _victim(guarded, "own-1")
    old = await guarded.client.credential(guarded.admin, "own-1")
    assert (await one.request("GET", f"{FLEET}/nodes/own-1", old)).status == 200
    await guarded.client.credential(guarded.admin, "own-1", grace_seconds=1.5)
    [ending] = [c for c in guarded.service.auth.node_credentials("own-1")
                if c.revoked_at is not None]
    assert ending.revoked_at is not None
    deadline = ending.revoked_at
    await _refused_from(one, f"{FLEET}/nodes/own-1", old, deadline,
                        "The token has been revoked")


async def test_failed_attempts_on_a_connection_that_once_succeeded_are_all_counted(
        guarded: Guarded, one: OneConnection) -> None:
    """The memory of a good token lends nothing to a bad one: the 11th failure of a bad
    token in a minute gets 429 on the same connection, and the good token still passes."""
    before = await _victim(guarded)
    write = await guarded.client.key(guarded.admin, "write")
    assert (await one.heartbeat(write, "other-1")).status == 200
    wrong = "fmq_key_" + "A" * 43
    statuses = []
    for _ in range(11):
        statuses.append((await one.heartbeat(wrong, "victim-1")).status)
        assert (await one.request("GET", f"{FLEET}/nodes/other-1", write)).status == 200
    assert statuses == [401] * 10 + [429]
    assert await guarded.snapshot("victim-1") == before


async def test_duplicate_authorization_headers_are_judged_by_the_first_one_alone(
        guarded: Guarded, one: OneConnection) -> None:
    """A request with two Authorization headers is judged by the first, on a connection that
    has just had the second accepted as well as on a fresh one: the memory adds no other
    reading of a header."""
    before = await _victim(guarded)
    write = await guarded.client.key(guarded.admin, "write")
    read = await guarded.client.key(guarded.admin, "read")
    assert (await one.heartbeat(write, "other-1")).status == 200
    body = {"node_id": "victim-1", "uptime_seconds": 7}
    for first, expected in ((f"Bearer {read}", 403), ("Bearer " + "fmq_key_" + "B" * 43, 401),
                            ("", 401)):
        headers = [("Authorization", first), ("Authorization", f"Bearer {write}")]
        async with one.session.post(one.base + f"{FLEET}/heartbeat", json=body,
                                    headers=headers) as resp:
            assert resp.status == expected, (first[:20], await resp.read())
    assert await guarded.snapshot("victim-1") == before


async def test_the_memory_ends_with_its_connections(guarded: Guarded) -> None:
    """Many short-lived connections leave nothing behind in the gate's memory."""
    write = await guarded.client.key(guarded.admin, "write")
    accepted = guarded.service.access._accepted
    baseline = len(accepted)  # the fixtures' own kept-alive connections
    for _ in range(3):
        clients = [aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1))
                   for _ in range(20)]
        try:
            for session in clients:
                async with session.get(guarded.client.base + f"{FLEET}/nodes",
                                       headers={"Authorization": f"Bearer {write}"}) as resp:
                    assert resp.status == 200
            assert len(accepted) >= baseline + 20
        finally:
            for session in clients:
                await session.close()

    def forgotten() -> bool:
        # A closed connection's transport sits in a reference cycle (asyncio's and aiohttp's
        # own) until the cyclic collector runs: the memory holds no reference of its own.
        gc.collect()
        return len(accepted) <= baseline

    await eventually(forgotten, timeout=5)


async def test_a_node_token_revoked_by_the_cli_stops_on_its_busy_connection_within_250_ms(
        mosquitto: Mosquitto, root: str, tmp_path: Path, http: aiohttp.ClientSession) -> None:
    """The CLI writes the store from another process; the manager polls it. A connection
    that keeps its memory fresh with a request every few ms gets no extra life from it."""
    db = tmp_path / "fleet.db"
    async with guarded_manager(mosquitto, root, tmp_path, http, store=str(db)) as g:
        own = await g.client.credential(g.admin, "own-1")
        connector = aiohttp.TCPConnector(limit=1, keepalive_timeout=60)
        async with aiohttp.ClientSession(connector=connector) as session:
            one = OneConnection(session, g.client.base)
            assert (await one.request("GET", f"{FLEET}/nodes/own-1", own)).status == 404
            replies: list[tuple[float, int]] = []
            stop = asyncio.Event()

            async def busy() -> None:
                while not stop.is_set():
                    reply = await one.request("GET", f"{FLEET}/nodes/own-1", own)
                    replies.append((time.monotonic(), reply.status))
                    if reply.status != 404:  # 404: accepted (the node is not registered)
                        return
                    await asyncio.sleep(0.003)

            task = asyncio.create_task(busy())
            try:
                code, _, err = await _cli("credentials", "revoke", "own-1", "--store",
                                          f"sqlite:///{db}")
                revoked = time.monotonic()
                assert code == 0, err
                await asyncio.wait_for(task, 5)
            finally:
                stop.set()
                await asyncio.gather(task, return_exceptions=True)
            last_at, last = replies[-1]
            assert last == 401, replies[-3:]
            accepted_after = [at - revoked for at, status in replies
                              if status == 404 and at > revoked + LIVE_WITHIN_S]
            assert not accepted_after, f"accepted up to {max(accepted_after):.3f} s after"
            assert last_at - revoked <= LIVE_WITHIN_S + 0.05
            assert len(replies) > 50  # the memory was hot throughout


async def test_over_https_the_memory_holds_per_connection_and_a_revocation_ends_it(
        mosquitto: Mosquitto, root: str, tmp_path: Path, pki: Pki) -> None:
    """A TLS connection's transport is remembered like a plain one, and forgotten the same."""
    settings = make_settings(mosquitto.url, root, auth=auth_settings(tmp_path), http=HttpSettings(
        host="127.0.0.1", port=0, tls_cert=pki.server.cert, tls_key=pki.server.key))
    async with running(settings) as service:
        admin = (tmp_path / "admin.token").read_text().strip()
        accepted = service.access._accepted
        trusting = ssl.create_default_context(cafile=pki.ca)
        base = f"https://127.0.0.1:{service.http_port}"
        connector = aiohttp.TCPConnector(limit=1, keepalive_timeout=60, ssl=trusting)
        async with aiohttp.ClientSession(connector=connector) as session:
            one = OneConnection(session, base)
            made = await one.request("POST", "/api/v1/keys", admin, body={"role": "write"})
            assert made.status == 201, made.raw
            write, key_id = made.json["token"], made.json["id"]
            assert (await one.request("GET", f"{FLEET}/nodes", write)).status == 200
            assert len(accepted) == 1  # the TLS transport took a weak reference
            assert (await one.request("DELETE", f"/api/v1/keys/{key_id}", admin)).status == 204
            refused = await one.request("GET", f"{FLEET}/nodes", write)
            assert refused.status == 401, refused.raw
            assert refused.json["message"] == "The token has been revoked"

        def forgotten() -> bool:
            gc.collect()  # see test_the_memory_ends_with_its_connections
            return len(accepted) == 0

        await eventually(forgotten, timeout=5)
