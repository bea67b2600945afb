"""Attacks on REST authorization (contract section 8): valid tokens used beyond their rights
get 403, and the victim node, its credential and the keys stay as they were.
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta

from tests.conftest import eventually
from tests.security.conftest import FLEET, Guarded, Reply

VICTIM = "victim-node"
ATTACKER = "attacker-node"
TIMESTAMP = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")


def _assert_403(reply: Reply) -> None:
    assert reply.status == 403, reply
    assert reply.json["error"] == "Forbidden"
    assert reply.json["message"]


async def _two_nodes(g: Guarded) -> tuple[str, str]:
    c = g.client
    victim = await c.credential(g.admin, VICTIM)
    attacker = await c.credential(g.admin, ATTACKER)
    assert (await c.register(victim, VICTIM, location="lab")).status == 200
    assert (await c.register(attacker, ATTACKER)).status == 200
    return victim, attacker


async def test_a_node_token_cannot_act_for_another_node(guarded: Guarded) -> None:
    c = guarded.client
    victim_token, token = await _two_nodes(guarded)
    before = await guarded.snapshot(VICTIM)
    for reply in (
        await c.heartbeat(token, VICTIM, status="offline", reason="forged"),
        await c.register(token, VICTIM, node_type="microclaw", location="elsewhere"),
        await c.node(token, VICTIM),
        await c.request("DELETE", f"{FLEET}/nodes/{VICTIM}", token),
        await c.request("GET", f"{FLEET}/nodes/{VICTIM}/events", token),
        await c.request("POST", f"{FLEET}/nodes/{VICTIM}/credentials", token),
        await c.request("GET", f"{FLEET}/nodes/{VICTIM}/credentials", token),
        await c.request("DELETE", f"{FLEET}/nodes/{VICTIM}/credentials", token),
    ):
        _assert_403(reply)
    assert await guarded.snapshot(VICTIM) == before
    assert (await c.heartbeat(victim_token, VICTIM)).status == 200  # its credential works


async def test_a_node_token_cannot_list_delete_itself_or_touch_keys_and_audit(
        guarded: Guarded) -> None:
    c = guarded.client
    _, token = await _two_nodes(guarded)
    keys_before = _without_use(await _keys(guarded))
    for reply in (
        await c.request("GET", f"{FLEET}/nodes", token),
        await c.request("DELETE", f"{FLEET}/nodes/{ATTACKER}", token),
        await c.request("GET", f"{FLEET}/nodes/{ATTACKER}/credentials", token),
        await c.request("DELETE", f"{FLEET}/nodes/{ATTACKER}/credentials", token),
        await c.request("POST", "/api/v1/keys", token, body={"role": "admin"}),
        await c.request("GET", "/api/v1/keys", token),
        await c.request("GET", "/api/v1/audit", token),
        await c.request("GET", "/metrics", token),
        await c.request("POST", f"{FLEET}/enroll", token,
                        body={"node_id": "x1", "node_type": "microclaw"}),
    ):
        _assert_403(reply)
    assert _without_use(await _keys(guarded)) == keys_before


async def test_a_node_token_registers_heartbeats_and_reads_itself(guarded: Guarded) -> None:
    c = guarded.client
    token = await c.credential(guarded.admin, "self-node")
    assert (await c.register(token, "self-node")).status == 200
    assert (await c.heartbeat(token, "self-node", uptime_seconds=5)).status == 200
    reply = await c.node(token, "self-node")
    assert reply.status == 200
    assert reply.json["uptime_seconds"] == 5


async def test_the_picclaw_agent_registers_and_heartbeats_with_its_cloud_token(
        guarded: Guarded) -> None:
    # PicClaw sends its cloud_token as `Authorization: Bearer <cloud_token>`, its own body
    # (the `type` alias) and no Content-Type: a node credential there just works.
    c = guarded.client
    cloud_token = await c.credential(guarded.admin, "picclaw-rpi-01")
    headers = {"Authorization": f"Bearer {cloud_token}"}
    reply = await c.request(
        "POST", f"{FLEET}/register", headers=headers,
        data=b'{"node_id": "picclaw-rpi-01", "type": "picclaw", "capabilities": ["camera"]}')
    assert reply.status == 200, reply.raw
    reply = await c.request("POST", f"{FLEET}/heartbeat", headers=headers,
                            data=b'{"node_id": "picclaw-rpi-01", "uptime_seconds": 42}')
    assert reply.status == 200, reply.raw
    assert (await guarded.snapshot("picclaw-rpi-01"))["uptime_seconds"] == 42


async def test_a_read_key_reads_but_cannot_write_delete_or_manage(guarded: Guarded) -> None:
    c = guarded.client
    await _two_nodes(guarded)
    before = await guarded.snapshot(VICTIM)
    read = await c.key(guarded.admin, "read")
    assert (await c.node(read, VICTIM)).status == 200
    assert (await c.request("GET", f"{FLEET}/nodes", read)).status == 200
    assert (await c.request("GET", "/metrics", read)).status == 200
    for reply in (
        await c.register(read, VICTIM, location="elsewhere"),
        await c.heartbeat(read, VICTIM, status="offline"),
        await c.request("DELETE", f"{FLEET}/nodes/{VICTIM}", read),
        await c.request("GET", f"{FLEET}/nodes/{VICTIM}/credentials", read),
        await c.request("POST", f"{FLEET}/nodes/{VICTIM}/credentials", read),
        await c.request("POST", "/api/v1/keys", read, body={"role": "admin"}),
        await c.request("GET", "/api/v1/audit", read),
    ):
        _assert_403(reply)
    assert await guarded.snapshot(VICTIM) == before


async def test_a_write_key_writes_for_any_node_but_manages_nothing(guarded: Guarded) -> None:
    c = guarded.client
    write = await c.key(guarded.admin, "write")
    assert (await c.register(write, "gw-child")).status == 200
    assert (await c.heartbeat(write, "gw-child")).status == 200
    _assert_403(await c.request("POST", "/api/v1/keys", write, body={"role": "read"}))
    _assert_403(await c.request("POST", f"{FLEET}/nodes/gw-child/credentials", write))
    assert (await c.request("DELETE", f"{FLEET}/nodes/gw-child", write)).status == 204


async def test_enroll_and_broker_keys_cannot_use_fleet_routes(guarded: Guarded) -> None:
    c = guarded.client
    await _two_nodes(guarded)
    before = await guarded.snapshot(VICTIM)
    for role in ("enroll", "broker"):
        token = await c.key(guarded.admin, role)
        for reply in (
            await c.register(token, VICTIM, location="elsewhere"),
            await c.heartbeat(token, VICTIM),
            await c.node(token, VICTIM),
            await c.request("GET", "/api/v1/keys", token),
        ):
            _assert_403(reply)
    assert await guarded.snapshot(VICTIM) == before


async def test_an_admin_key_cannot_enroll(guarded: Guarded) -> None:
    reply = await guarded.client.request("POST", f"{FLEET}/enroll", guarded.admin,
                                         body={"node_id": "n1", "node_type": "microclaw"})
    _assert_403(reply)


async def test_keys_are_created_listed_and_revoked_without_showing_tokens(
        guarded: Guarded) -> None:
    c = guarded.client
    created = await c.request("POST", "/api/v1/keys", guarded.admin,
                              body={"role": "read", "name": "dashboard",
                                    "expires_in_seconds": 3600})
    assert created.status == 201
    key = created.json
    assert set(key) == {"id", "name", "role", "token", "created_at", "expires_at"}
    assert key["token"].startswith("fmq_key_")
    assert TIMESTAMP.match(key["created_at"])
    assert TIMESTAMP.match(key["expires_at"])
    assert (await c.node(key["token"], "nobody")).status == 404
    listing = (await c.request("GET", "/api/v1/keys", guarded.admin)).json["keys"]
    assert key["token"] not in str(listing)
    mine = next(k for k in listing if k["id"] == key["id"])
    assert set(mine) == {"id", "name", "role", "created_at", "last_used_at", "expires_at",
                         "uses", "max_uses"}
    assert mine["name"] == "dashboard"
    assert TIMESTAMP.match(mine["last_used_at"])
    assert (await c.request("DELETE", f"/api/v1/keys/{key['id']}", guarded.admin)).status == 204
    listing = (await c.request("GET", "/api/v1/keys", guarded.admin)).json["keys"]
    assert key["id"] not in {k["id"] for k in listing}


async def test_bad_key_requests_name_the_field(guarded: Guarded) -> None:
    c = guarded.client
    for body, field in (
        ({"role": "root"}, "role"),
        ({}, "role"),
        ({"role": "read", "expires_in_seconds": -1}, "expires_in_seconds"),
        ({"role": "read", "expires_in_seconds": 1e300}, "expires_in_seconds"),
        ({"role": "read", "expires_in_seconds": "60"}, "expires_in_seconds"),
        ({"role": "read", "expires_in_seconds": 0.999}, "expires_in_seconds"),
        ({"role": "read", "name": "a\u0000b"}, "name"),
        ({"role": "read", "name": "x" * 65}, "name"),
        ({"role": "enroll", "max_uses": 0}, "max_uses"),
        ({"role": "enroll", "max_uses": 10**30}, "max_uses"),
        ({"role": "enroll", "id_pattern": "a/#"}, "id_pattern"),
        ({"role": "enroll", "node_type": "\u0000"}, "node_type"),
        ({"role": "read", "max_uses": 3}, "max_uses"),
        ({"role": "admin", "allow_registered": True}, "allow_registered"),
    ):
        reply = await c.request("POST", "/api/v1/keys", guarded.admin, body=body)
        assert reply.status == 400, (body, reply.raw)
        assert field in reply.json["message"], (body, reply.json)
    for body, field in (({"grace_seconds": -1}, "grace_seconds"),
                        ({"grace_seconds": 10**9}, "grace_seconds"),
                        ({"expires_in_seconds": 0}, "expires_in_seconds"),
                        # Found by schemathesis: issued already expired, then "not found".
                        ({"expires_in_seconds": 5e-324}, "expires_in_seconds"),
                        ({"expires_in_seconds": 0.5}, "expires_in_seconds")):
        reply = await c.request("POST", f"{FLEET}/nodes/n1/credentials", guarded.admin,
                                body=body)
        assert reply.status == 400, (body, reply.raw)
        assert field in reply.json["message"]
    # A blank body is not JSON (found by schemathesis: it was taken as no body at all).
    reply = await c.request("POST", f"{FLEET}/nodes/n1/credentials", guarded.admin, data=b" ")
    assert (reply.status, reply.json["error"]) == (400, "Invalid JSON"), reply.raw
    assert (await c.request("GET", f"{FLEET}/nodes/n1/credentials", guarded.admin)).status == 404
    # cascade is true or false; "" and "1" were quietly taken as false or true.
    for cascade in ("maybe", "", "1", "0", "True"):
        reply = await c.request("DELETE", "/api/v1/keys/000000000000", guarded.admin,
                                params={"cascade": cascade})
        assert reply.status == 400, cascade
        assert "cascade" in reply.json["message"]
    reply = await c.request("DELETE", "/api/v1/keys/%00", guarded.admin)
    assert reply.status == 404


async def test_the_last_admin_key_cannot_be_revoked(guarded: Guarded) -> None:
    c = guarded.client
    keys = (await c.request("GET", "/api/v1/keys", guarded.admin)).json["keys"]
    (admin_id,) = [k["id"] for k in keys if k["role"] == "admin"]
    reply = await c.request("DELETE", f"/api/v1/keys/{admin_id}", guarded.admin)
    assert reply.status == 409
    assert reply.json["error"] == "Last admin key"
    assert (await c.request("GET", "/api/v1/keys", guarded.admin)).status == 200


async def test_credentials_are_issued_shown_and_revoked(guarded: Guarded) -> None:
    c = guarded.client
    issued = await c.request("POST", f"{FLEET}/nodes/prov-1/credentials", guarded.admin,
                             body={"expires_in_seconds": 86400})
    assert issued.status == 201
    body = issued.json
    assert body["node_id"] == "prov-1"
    assert body["mqtt"] == {"username": "prov-1", "password": body["token"],
                            "client_id": "prov-1"}
    assert body["token"].startswith("fmq_node_")
    assert TIMESTAMP.match(body["expires_at"])
    shown = await c.request("GET", f"{FLEET}/nodes/prov-1/credentials", guarded.admin)
    assert shown.status == 200
    assert body["token"] not in shown.raw.decode()
    (cred,) = shown.json["credentials"]
    assert cred["enrolled_by"] is None
    assert cred["expires_at"] == body["expires_at"]
    assert (await c.request("DELETE", f"{FLEET}/nodes/prov-1/credentials",
                            guarded.admin)).status == 204
    assert (await c.register(body["token"], "prov-1")).status == 401
    assert (await c.request("GET", f"{FLEET}/nodes/prov-1/credentials",
                            guarded.admin)).status == 404
    assert (await c.request("DELETE", f"{FLEET}/nodes/prov-1/credentials",
                            guarded.admin)).status == 404


async def test_a_node_rotates_its_own_credential_without_lengthening_it(
        guarded: Guarded) -> None:
    c = guarded.client
    old = await c.credential(guarded.admin, "field-1", expires_in_seconds=3600)
    reply = await c.request("POST", f"{FLEET}/nodes/field-1/credentials", old,
                            body={"grace_seconds": 30, "expires_in_seconds": 10**6})
    assert reply.status == 201
    new = reply.json
    # It ends when the old one would have (at most an hour), not in the 11 days it asked for.
    lifetime = _parse(new["expires_at"]) - _parse(new["created_at"])
    assert timedelta(minutes=59) < lifetime <= timedelta(hours=1)
    shown = (await c.request("GET", f"{FLEET}/nodes/field-1/credentials",
                             guarded.admin)).json["credentials"]
    assert len(shown) == 2  # the old one inside its grace
    assert (await c.register(old, "field-1")).status == 200
    assert (await c.register(new["token"], "field-1")).status == 200
    audit = (await c.request("GET", "/api/v1/audit", guarded.admin)).json["entries"]
    assert audit[0]["action"] == "credential_rotated"
    assert audit[0]["actor"] == "node:field-1"
    assert audit[0]["address"] == "127.0.0.1"


async def test_a_rotated_out_token_in_its_grace_cannot_mint_a_successor(
        guarded: Guarded) -> None:
    # After a suspected leak an admin rotates with a grace: whoever holds the old token must
    # not use the grace to take the node's identity from the admin's new token.
    c = guarded.client
    old = await c.credential(guarded.admin, "leaked-1")
    reply = await c.request("POST", f"{FLEET}/nodes/leaked-1/credentials", guarded.admin,
                            body={"grace_seconds": 600})
    assert reply.status == 201
    admins = reply.json["token"]
    stolen = await c.request("POST", f"{FLEET}/nodes/leaked-1/credentials", old, body={})
    assert stolen.status == 403
    assert (await c.register(admins, "leaked-1")).status == 200  # the admin's token works
    assert (await c.register(old, "leaked-1")).status == 200  # the old one, for its grace
    shown = (await c.request("GET", f"{FLEET}/nodes/leaked-1/credentials",
                             guarded.admin)).json["credentials"]
    assert len(shown) == 2


async def test_a_node_cannot_renew_past_its_expiry_or_give_itself_a_long_grace(
        guarded: Guarded) -> None:
    c = guarded.client
    token = await c.credential(guarded.admin, "renew-1", expires_in_seconds=600)
    ends = None
    for _ in range(3):  # renewing again and again never moves the end
        reply = await c.request("POST", f"{FLEET}/nodes/renew-1/credentials", token,
                                body={"grace_seconds": 86_400})
        assert reply.status == 201
        token = reply.json["token"]
        expires = _parse(reply.json["expires_at"])
        assert ends is None or expires <= ends
        ends = expires
    shown = (await c.request("GET", f"{FLEET}/nodes/renew-1/credentials",
                             guarded.admin)).json["credentials"]
    graces = [_parse(x["valid_until"]) - _parse(x["created_at"]) for x in shown
              if x["valid_until"] != x["expires_at"]]
    assert all(g <= timedelta(minutes=5, seconds=1) for g in graces)


async def test_deleting_a_node_revokes_its_credentials(guarded: Guarded) -> None:
    c = guarded.client
    token = await c.credential(guarded.admin, "gone-1")
    assert (await c.register(token, "gone-1")).status == 200
    assert (await c.request("DELETE", f"{FLEET}/nodes/gone-1", guarded.admin)).status == 204
    assert (await c.register(token, "gone-1")).status == 401


async def test_the_audit_log_pages_newest_first_with_actor_and_address(
        guarded: Guarded) -> None:
    c = guarded.client
    for i in range(5):
        await c.credential(guarded.admin, f"aud-{i}")
    page = await c.request("GET", "/api/v1/audit", guarded.admin, params={"limit": "3"})
    assert page.status == 200
    entries, after = page.json["entries"], page.json["next"]
    assert [e["subject"] for e in entries] == ["node:aud-4", "node:aud-3", "node:aud-2"]
    assert {e["actor"] for e in entries} == {"key:" + _key_id(await _keys(guarded))}
    assert all(TIMESTAMP.match(e["at"]) and e["address"] == "127.0.0.1" for e in entries)
    rest = (await c.request("GET", "/api/v1/audit", guarded.admin,
                            params={"limit": "3", "before": str(after)})).json
    assert [e["subject"] for e in rest["entries"]][:2] == ["node:aud-1", "node:aud-0"]
    for bad in ("0", "1001", "x", "-1"):
        assert (await c.request("GET", "/api/v1/audit", guarded.admin,
                                params={"limit": bad})).status == 400


async def _keys(g: Guarded) -> list[dict[str, object]]:
    keys: list[dict[str, object]] = (await g.client.request(
        "GET", "/api/v1/keys", g.admin)).json["keys"]
    return keys


def _parse(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def _without_use(keys: list[dict[str, object]]) -> list[dict[str, object]]:
    return [{k: v for k, v in key.items() if k != "last_used_at"} for key in keys]


def _key_id(keys: list[dict[str, object]]) -> str:
    return str(next(k["id"] for k in keys if k["role"] == "admin"))


async def test_revoking_an_enroll_key_with_cascade_revokes_what_it_enrolled(
        guarded: Guarded) -> None:
    c = guarded.client
    created = (await c.request("POST", "/api/v1/keys", guarded.admin,
                               body={"role": "enroll", "max_uses": 5})).json
    tokens = []
    for node_id in ("casc-1", "casc-2"):
        reply = await c.request("POST", f"{FLEET}/enroll", created["token"],
                                body={"node_id": node_id, "node_type": "microclaw"})
        assert reply.status == 201
        tokens.append(reply.json["token"])
    other = await c.credential(guarded.admin, "casc-other")
    assert (await c.request("DELETE", f"/api/v1/keys/{created['id']}", guarded.admin,
                            params={"cascade": "true"})).status == 204

    async def all_refused() -> bool:
        return all([(await c.heartbeat(t, n)).status == 401
                    for t, n in zip(tokens, ("casc-1", "casc-2"), strict=True)])

    await eventually(all_refused, timeout=2)
    assert (await c.register(other, "casc-other")).status == 200  # not enrolled by it
