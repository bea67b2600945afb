"""Enrollment (contract section 8): a device with an enroll key gets its own credential once,
within the key's limits; every attempt past them is refused and changes nothing.
"""

from __future__ import annotations

from typing import Any

from tests.security.conftest import FLEET, Guarded, Reply


async def _enroll_key(g: Guarded, **limits: Any) -> str:
    return await g.client.key(g.admin, "enroll", **limits)


async def _enroll(g: Guarded, token: str, node_id: str, node_type: str = "microclaw",
                  **fields: Any) -> Reply:
    return await g.client.request("POST", f"{FLEET}/enroll", token,
                                  body={"node_id": node_id, "node_type": node_type, **fields})


async def _credentials(g: Guarded, node_id: str) -> Any:
    reply = await g.client.request("GET", f"{FLEET}/nodes/{node_id}/credentials", g.admin)
    return reply.json if reply.status == 200 else None


async def test_a_device_enrolls_registers_and_then_uses_its_own_token(guarded: Guarded) -> None:
    key = await _enroll_key(guarded, max_uses=3, id_pattern="esp32-*", node_type="microclaw")
    reply = await _enroll(guarded, key, "esp32-a1", location="lab")
    assert reply.status == 201, reply.raw
    body = reply.json
    assert set(body) == {"node_id", "status", "message", "timestamp", "token"}
    assert body["message"] == "Node successfully registered"
    token = body["token"]
    assert token.startswith("fmq_node_")
    assert (await guarded.snapshot("esp32-a1"))["location"] == "lab"
    assert (await guarded.client.heartbeat(token, "esp32-a1")).status == 200
    shown = await _credentials(guarded, "esp32-a1")
    assert shown["credentials"][0]["enrolled_by"] is not None
    audit = (await guarded.client.request("GET", "/api/v1/audit", guarded.admin)).json
    assert audit["entries"][0]["action"] == "enrolled"
    keys = (await guarded.client.request("GET", "/api/v1/keys", guarded.admin)).json["keys"]
    assert [k["uses"] for k in keys if k["role"] == "enroll"] == [1]


async def test_an_id_that_already_has_a_credential_cannot_enroll_again(guarded: Guarded) -> None:
    key = await _enroll_key(guarded, max_uses=5, allow_registered=True)
    first = await _enroll(guarded, key, "dup-1")
    assert first.status == 201
    before = await guarded.snapshot("dup-1")
    creds = await _credentials(guarded, "dup-1")
    again = await _enroll(guarded, key, "dup-1", location="stolen")
    assert again.status == 409
    assert again.json["error"] == "Already enrolled"
    assert await guarded.snapshot("dup-1") == before
    assert await _credentials(guarded, "dup-1") == creds
    assert (await guarded.client.heartbeat(first.json["token"], "dup-1")).status == 200


async def test_a_registered_id_enrolls_only_with_allow_registered(guarded: Guarded) -> None:
    c = guarded.client
    write = await c.key(guarded.admin, "write")
    assert (await c.register(write, "known-1", location="lab")).status == 200
    before = await guarded.snapshot("known-1")
    strict = await _enroll_key(guarded, max_uses=5)
    reply = await _enroll(guarded, strict, "known-1", location="hijacked")
    assert reply.status == 403
    assert await guarded.snapshot("known-1") == before
    assert await _credentials(guarded, "known-1") is None
    lenient = await _enroll_key(guarded, max_uses=5, allow_registered=True)
    reply = await _enroll(guarded, lenient, "known-1", location="lab")
    assert reply.status == 201
    assert reply.json["message"] == "Node registration updated"


async def test_an_enroll_key_past_its_uses_is_refused(guarded: Guarded) -> None:
    key = await _enroll_key(guarded, max_uses=2)
    assert (await _enroll(guarded, key, "use-1")).status == 201
    assert (await _enroll(guarded, key, "use-2")).status == 201
    reply = await _enroll(guarded, key, "use-3")
    assert reply.status == 403
    assert (await guarded.client.node(guarded.admin, "use-3")).status == 404
    assert await _credentials(guarded, "use-3") is None


async def test_ids_and_types_outside_the_key_are_refused(guarded: Guarded) -> None:
    key = await _enroll_key(guarded, max_uses=10, id_pattern="esp32-*", node_type="microclaw")
    for node_id, node_type in (("rpi-1", "microclaw"), ("xesp32-1", "microclaw"),
                               ("esp32-9", "picclaw"),
                               ("esp32-8", "micro\u0441law"),  # a Cyrillic es
                               ("esp32-7", "microc\u212aaw")):  # KELVIN SIGN, folds to k
        reply = await _enroll(guarded, key, node_id, node_type)
        assert reply.status == 403, (node_id, reply.raw)
        assert (await guarded.client.node(guarded.admin, node_id)).status == 404
        assert await _credentials(guarded, node_id) is None
    audit = (await guarded.client.request("GET", "/api/v1/audit", guarded.admin)).json
    assert audit["entries"][0]["action"] == "enrollment_refused"


async def test_an_expired_or_revoked_enroll_key_cannot_enroll(guarded: Guarded) -> None:
    created = (await guarded.client.request("POST", "/api/v1/keys", guarded.admin,
                                            body={"role": "enroll"})).json
    assert (await guarded.client.request("DELETE", f"/api/v1/keys/{created['id']}",
                                         guarded.admin)).status == 204
    reply = await _enroll(guarded, created["token"], "late-1")
    assert reply.status == 401
    assert (await guarded.client.node(guarded.admin, "late-1")).status == 404


async def test_an_enroll_key_on_register_and_heartbeat_is_refused(guarded: Guarded) -> None:
    key = await _enroll_key(guarded)
    assert (await guarded.client.register(key, "wrong-kind")).status == 403
    assert (await guarded.client.heartbeat(key, "wrong-kind")).status == 403
    assert (await guarded.client.node(guarded.admin, "wrong-kind")).status == 404


async def test_enrollments_are_rate_limited_per_key(guarded: Guarded) -> None:
    key = await _enroll_key(guarded, max_uses=100)
    other = await _enroll_key(guarded, max_uses=100)
    statuses = [(await _enroll(guarded, key, f"burst-{i}")).status for i in range(25)]
    assert statuses[:20] == [201] * 20
    assert 429 in statuses[20:]
    limited = await _enroll(guarded, key, "burst-x")
    if limited.status == 429:
        assert int(limited.headers["Retry-After"]) >= 1
        assert (await guarded.client.node(guarded.admin, "burst-x")).status == 404
    assert (await _enroll(guarded, other, "burst-other")).status == 201


async def test_a_bad_enrollment_body_names_the_field(guarded: Guarded) -> None:
    key = await _enroll_key(guarded)
    for body, field in (({"node_type": "microclaw"}, "node_id"),
                        ({"node_id": "a/b", "node_type": "microclaw"}, "node_id"),
                        ({"node_id": "ok-1"}, "node_type")):
        reply = await guarded.client.request("POST", f"{FLEET}/enroll", key, body=body)
        assert reply.status == 400, reply.raw
        assert field in reply.json["message"]
