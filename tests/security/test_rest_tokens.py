"""Attacks on REST authentication (contract section 8 "REST", section 11 "Back-off"): every
bad token is refused with 401 before the body is read, and the victim node stays as it was.
"""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import aiohttp

from tests.conftest import eventually
from tests.security.conftest import FLEET, Guarded, Reply, guarded_manager
from tests.support import Mosquitto, metric_samples

VICTIM = "victim-node"


async def _victim(g: Guarded) -> object:
    assert (await g.client.register(g.admin, VICTIM, location="lab")).status == 200
    return await g.snapshot(VICTIM)


def _assert_401(reply: Reply, presented: bool) -> None:
    assert reply.status == 401, reply
    assert reply.json["error"] == "Unauthorized"
    assert reply.json["message"]
    challenge = reply.headers["WWW-Authenticate"]
    assert challenge.startswith("Bearer")
    assert ('error="invalid_token"' in challenge) is presented


async def _attack_everything(g: Guarded, token: str | None, presented: bool = True) -> None:
    """The token on every kind of route: reads, writes, deletes, keys."""
    c = g.client
    for reply in (
        await c.register(token, VICTIM, node_type="evil"),
        await c.heartbeat(token, VICTIM, status="offline", reason="forged"),
        await c.node(token, VICTIM),
        await c.request("GET", f"{FLEET}/nodes", token),
        await c.request("DELETE", f"{FLEET}/nodes/{VICTIM}", token),
        await c.request("POST", "/api/v1/keys", token, body={"role": "admin"}),
        await c.request("GET", "/api/v1/keys", token),
        await c.request("GET", "/metrics", token),
    ):
        _assert_401(reply, presented)


async def test_requests_without_a_token_are_refused_and_change_nothing(guarded: Guarded) -> None:
    before = await _victim(guarded)
    await _attack_everything(guarded, None, presented=False)
    assert await guarded.snapshot(VICTIM) == before


async def test_malformed_truncated_and_altered_tokens_are_refused(guarded: Guarded) -> None:
    before = await _victim(guarded)
    admin = guarded.admin
    altered = admin[:-2] + ("A" if admin[-2] != "A" else "B") + admin[-1]
    for token in (admin[:-1], admin[:20], altered, admin + "A", "fmq_key_", "not-a-token",
                  admin.replace("fmq_key_", "fmq_node_"), admin.upper()):
        await _attack_everything(guarded, token)
    assert await guarded.snapshot(VICTIM) == before


async def test_other_authorization_schemes_are_refused(guarded: Guarded) -> None:
    before = await _victim(guarded)
    for header in (f"Basic {guarded.admin}", f"Token {guarded.admin}", "Bearer",
                   f"Bearer {guarded.admin} extra", guarded.admin):
        reply = await guarded.client.request("DELETE", f"{FLEET}/nodes/{VICTIM}",
                                             headers={"Authorization": header})
        _assert_401(reply, presented=True)
    assert await guarded.snapshot(VICTIM) == before


async def test_a_token_in_the_url_never_authenticates(guarded: Guarded) -> None:
    before = await _victim(guarded)
    for name in ("token", "access_token", "api_key", "bearer"):
        reply = await guarded.client.request("DELETE", f"{FLEET}/nodes/{VICTIM}",
                                             params={name: guarded.admin})
        _assert_401(reply, presented=False)
    assert await guarded.snapshot(VICTIM) == before


async def test_a_revoked_key_stops_working_at_once(guarded: Guarded) -> None:
    c = guarded.client
    before = await _victim(guarded)
    created = await c.request("POST", "/api/v1/keys", guarded.admin, body={"role": "write"})
    token, key_id = created.json["token"], created.json["id"]
    assert (await c.node(token, VICTIM)).status == 200
    assert (await c.request("DELETE", f"/api/v1/keys/{key_id}", guarded.admin)).status == 204
    await _attack_everything(guarded, token)
    assert (await c.request("DELETE", f"/api/v1/keys/{key_id}", guarded.admin)).status == 404
    assert await guarded.snapshot(VICTIM) == before


async def test_an_expired_key_is_refused(guarded: Guarded) -> None:
    c = guarded.client
    before = await _victim(guarded)
    token = await c.key(guarded.admin, "write", expires_in_seconds=1.0)
    assert (await c.node(token, VICTIM)).status == 200

    async def refused() -> bool:
        return (await c.node(token, VICTIM)).status == 401

    await eventually(refused, timeout=3)
    reply = await c.node(token, VICTIM)
    assert reply.json["message"] == "The token has expired"
    await _attack_everything(guarded, token)
    assert await guarded.snapshot(VICTIM) == before


async def test_a_rotated_out_node_token_works_inside_its_grace_and_not_after(
        guarded: Guarded) -> None:
    c = guarded.client
    old = await c.credential(guarded.admin, VICTIM)
    assert (await c.register(old, VICTIM)).status == 200
    new = await c.credential(guarded.admin, VICTIM, grace_seconds=1.0)
    assert (await c.heartbeat(old, VICTIM)).status == 200  # inside the grace
    assert (await c.heartbeat(new, VICTIM)).status == 200
    before = await guarded.snapshot(VICTIM)

    async def old_refused() -> bool:
        return (await c.node(old, VICTIM)).status == 401

    await eventually(old_refused, timeout=4)
    reply = await c.heartbeat(old, VICTIM, status="offline")
    _assert_401(reply, presented=True)
    assert reply.json["message"] == "The token has been revoked"
    snap = await guarded.snapshot(VICTIM)
    assert (snap["status"], snap["last_seen"]) == (before["status"], before["last_seen"])
    assert (await c.heartbeat(new, VICTIM)).status == 200


async def test_rotating_without_grace_revokes_the_old_token_now(guarded: Guarded) -> None:
    c = guarded.client
    old = await c.credential(guarded.admin, VICTIM)
    new = await c.credential(guarded.admin, VICTIM)
    _assert_401(await c.register(old, VICTIM), presented=True)
    assert (await c.register(new, VICTIM)).status == 200


async def test_open_routes_need_no_token_and_metrics_does(guarded: Guarded) -> None:
    c = guarded.client
    for path in ("/healthz", "/readyz", "/api/v1/openapi.json"):
        assert (await c.request("GET", path)).status == 200, path
    _assert_401(await c.request("GET", "/metrics"), presented=False)
    assert (await c.request("GET", "/metrics", guarded.admin)).status == 200
    # Unknown routes under /api/v1 tell nothing without a token.
    _assert_401(await c.request("GET", "/api/v1/secret"), presented=False)
    assert (await c.request("GET", "/api/v1/secret", guarded.admin)).status == 404


async def test_metrics_public_serves_metrics_alone_without_a_token(
    mosquitto: Mosquitto, root: str, tmp_path: Path, http: aiohttp.ClientSession,
) -> None:
    async with guarded_manager(mosquitto, root, tmp_path, http, metrics_public=True) as g:
        reply = await g.client.request("GET", "/metrics")
        assert reply.status == 200
        assert reply.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
        values = metric_samples(reply.raw.decode())
        assert values['fleetmq_auth_refused_total{reason="missing",status="401"}'] == 0
        _assert_401(await g.client.request("GET", f"{FLEET}/nodes"), presented=False)


async def test_a_bad_token_is_refused_before_the_body_is_read(guarded: Guarded) -> None:
    # Headers only, with a Content-Length promising a body that never comes: the answer
    # must arrive anyway.
    port = guarded.service.http_port
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /api/v1/fleet/register HTTP/1.1\r\nHost: x\r\n"
                 b"Authorization: Bearer fmq_key_nope\r\nContent-Length: 60000\r\n\r\n")
    await writer.drain()
    status_line = await asyncio.wait_for(reader.readline(), 5)
    writer.close()
    assert status_line.startswith(b"HTTP/1.1 401"), status_line


async def test_huge_authorization_headers_are_refused_and_change_nothing(
        guarded: Guarded) -> None:
    before = await _victim(guarded)
    c = guarded.client
    # Within aiohttp's header limit: the gate refuses it by its length.
    reply = await c.request("DELETE", f"{FLEET}/nodes/{VICTIM}",
                            headers={"Authorization": "Bearer " + "A" * 6000})
    _assert_401(reply, presented=True)
    # 10 kB: past the HTTP parser's limit, refused before any route runs.
    reply = await c.request("DELETE", f"{FLEET}/nodes/{VICTIM}",
                            headers={"Authorization": "Bearer " + "A" * 10_240})
    assert 400 <= reply.status < 500
    reply = await c.request("DELETE", f"{FLEET}/nodes/{VICTIM}",
                            headers={"Authorization": "Bearer " + guarded.admin + "A" * 10_240})
    assert 400 <= reply.status < 500
    assert await guarded.snapshot(VICTIM) == before


def _raw_request(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(request)
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


async def test_nul_bytes_in_the_authorization_header_are_refused(guarded: Guarded) -> None:
    before = await _victim(guarded)
    port = guarded.service.http_port
    for header in (b"Bearer \x00", b"Bearer " + guarded.admin.encode() + b"\x00",
                   b"Bearer \x00" + guarded.admin.encode()):
        answer = await asyncio.to_thread(
            _raw_request, port,
            b"DELETE /api/v1/fleet/nodes/" + VICTIM.encode() + b" HTTP/1.1\r\nHost: x\r\n"
            b"Authorization: " + header + b"\r\nConnection: close\r\n\r\n")
        # Refused by the HTTP parser (400, or the connection closed unanswered) or the gate.
        assert answer == b"" or int(answer.split(b" ", 2)[1]) in (400, 401), answer[:200]
    assert await guarded.snapshot(VICTIM) == before


async def test_the_eleventh_failure_in_a_minute_gets_429_and_a_valid_token_still_works(
        guarded: Guarded) -> None:
    c = guarded.client
    before = await _victim(guarded)
    for _ in range(10):
        _assert_401(await c.node("fmq_key_guess", VICTIM), presented=True)
    for _ in range(3):
        reply = await c.node("fmq_key_guess", VICTIM)
        assert reply.status == 429
        assert reply.json["error"] == "Too many requests"
        assert 1 <= int(reply.headers["Retry-After"]) <= 60
    # Another identity from the same address is its own pair; a valid token always works.
    _assert_401(await c.node("fmq_key_other", VICTIM), presented=True)
    assert (await c.node(guarded.admin, VICTIM)).status == 200
    # No token at all is the identity "none": also its own pair.
    for _ in range(10):
        _assert_401(await c.node(None, VICTIM), presented=False)
    assert (await c.node(None, VICTIM)).status == 429
    assert await guarded.snapshot(VICTIM) == before


async def test_refusals_are_counted_by_reason_in_metrics(guarded: Guarded) -> None:
    c = guarded.client
    await c.node(None, VICTIM)
    await c.node("fmq_key_nope", VICTIM)
    read = await c.key(guarded.admin, "read")
    assert (await c.request("DELETE", f"{FLEET}/nodes/{VICTIM}", read)).status == 403
    values = metric_samples((await c.request("GET", "/metrics", guarded.admin)).raw.decode())

    def count(status: int, reason: str) -> float:
        return values[f'fleetmq_auth_refused_total{{reason="{reason}",status="{status}"}}']

    assert count(401, "missing") == 1
    assert count(401, "malformed") == 1
    assert count(403, "key") == 1
    assert count(429, "login_backoff") == 0
