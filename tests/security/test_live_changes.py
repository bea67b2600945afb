"""Changes made beside a running manager: the CLI's keys work, and stop working, within 250 ms;
auth survives a restart once the store has held an admin key; proxies; auth off.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import aiohttp

from fleetmq.config import AuthSettings, StoreSettings
from tests.conftest import eventually, make_settings, running
from tests.security.conftest import FLEET, Client, guarded_manager
from tests.support import REPO, Mosquitto

LIVE_WITHIN_S = 0.25


async def _cli(*argv: str) -> tuple[int, str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "fleetmq", *argv, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_a_key_made_and_revoked_by_the_cli_is_live_within_250_ms(
        mosquitto: Mosquitto, root: str, tmp_path: Path, http: aiohttp.ClientSession) -> None:
    db = tmp_path / "fleet.db"
    store = f"sqlite:///{db}"
    async with guarded_manager(mosquitto, root, tmp_path, http, store=str(db)) as g:
        code, out, err = await _cli("keys", "create", "--role", "read", "--name", "cli-made",
                                    "--store", store)
        made = time.monotonic()
        assert code == 0, err
        token = out.strip()
        assert token.startswith("fmq_key_")
        assert "\n" not in token

        async def works() -> bool:
            return (await g.client.request("GET", f"{FLEET}/nodes", token)).status == 200

        await eventually(works, timeout=5, interval=0.01)
        latency = time.monotonic() - made
        assert latency <= LIVE_WITHIN_S, f"a new key took {latency:.3f} s to work"

        code, out, _ = await _cli("keys", "list", "--store", store)
        assert code == 0
        line = next(row for row in out.splitlines() if "cli-made" in row)
        assert token not in out
        key_id = line.split()[0]

        code, _, err = await _cli("keys", "revoke", key_id, "--store", store)
        revoked = time.monotonic()
        assert code == 0, err

        async def refused() -> bool:
            # 429 is a refusal too: the 401s this token got before the manager knew it
            # count as failed logins of its (address, identity) pair.
            status = (await g.client.request("GET", f"{FLEET}/nodes", token)).status
            return status in (401, 429)

        await eventually(refused, timeout=5, interval=0.01)
        latency = time.monotonic() - revoked
        assert latency <= LIVE_WITHIN_S, f"a revoked key took {latency:.3f} s to stop"
        audit = (await g.client.request("GET", "/api/v1/audit", g.admin)).json["entries"]
        assert (audit[0]["action"], audit[0]["actor"]) == ("key_revoked", "cli")


async def test_a_node_credential_issued_by_the_cli_registers(
        mosquitto: Mosquitto, root: str, tmp_path: Path, http: aiohttp.ClientSession) -> None:
    db = tmp_path / "fleet.db"
    async with guarded_manager(mosquitto, root, tmp_path, http, store=str(db)) as g:
        code, out, err = await _cli("credentials", "issue", "cli-node-1", "--store",
                                    f"sqlite:///{db}")
        assert code == 0, err
        token = out.strip()

        async def registered() -> bool:
            return (await g.client.register(token, "cli-node-1")).status == 200

        await eventually(registered, timeout=2)
        code, out, _ = await _cli("credentials", "show", "cli-node-1", "--store",
                                  f"sqlite:///{db}")
        assert code == 0
        assert token not in out
        code, _, err = await _cli("credentials", "revoke", "nobody-1", "--store",
                                  f"sqlite:///{db}")
        assert code == 1
        assert "no valid credential" in err


async def test_the_cli_refuses_the_last_admin_key_and_bad_input(tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path / 'fleet.db'}"
    code, _out, _ = await _cli("keys", "create", "--role", "admin", "--store", store)
    assert code == 0
    code, listing, _ = await _cli("keys", "list", "--store", store)
    admin_id = listing.splitlines()[1].split()[0]
    code, _, err = await _cli("keys", "revoke", admin_id, "--store", store)
    assert code == 1
    assert "last valid admin key" in err
    assert len(err.strip().splitlines()) == 1
    for argv in (("keys", "create", "--role", "root"),
                 ("keys", "create", "--role", "read", "--expires", "-1"),
                 ("keys", "create", "--role", "read", "--max-uses", "3"),
                 ("credentials", "issue", "a/b"),
                 ("credentials", "issue", "n1", "--grace", "90d")):
        code, _, err = await _cli(*argv, "--store", store)
        assert code == 2, (argv, err)
    code, _, err = await _cli("keys", "revoke", "000000000000", "--store", store)
    assert code == 1


async def test_auth_stays_on_after_the_last_admin_key_is_refused_and_after_every_admin_expired(
        mosquitto: Mosquitto, root: str, tmp_path: Path, http: aiohttp.ClientSession) -> None:
    db = tmp_path / "fleet.db"
    async with guarded_manager(mosquitto, root, tmp_path, http, store=str(db)) as g:
        keys = (await g.client.request("GET", "/api/v1/keys", g.admin)).json["keys"]
        (file_admin,) = [k["id"] for k in keys]
        assert (await g.client.request("DELETE", f"/api/v1/keys/{file_admin}",
                                       g.admin)).status == 409
        # A second admin key that expires soon lets the first go; then it expires too.
        brief = await g.client.key(g.admin, "admin", expires_in_seconds=1.0)
        assert (await g.client.request("DELETE", f"/api/v1/keys/{file_admin}",
                                       brief)).status == 204
        assert (await g.client.register(g.admin, "n1")).status == 401

        async def expired() -> bool:
            return (await g.client.node(brief, "n1")).status == 401

        await eventually(expired, timeout=3)

    # Restart with --auth auto and no admin token file: the store requires auth for good.
    settings = replace(make_settings(mosquitto.url, root),
                       store=StoreSettings("sqlite", str(db)),
                       auth=AuthSettings(mode="auto", broker_auth="external"))
    async with running(settings) as service:
        assert service.auth_enabled
        client = Client(http, f"http://127.0.0.1:{service.http_port}")
        assert (await client.register(None, "n1")).status == 401
        assert (await client.register(brief, "n1")).status == 401
        assert (await client.request("GET", "/healthz")).status == 200


async def test_behind_a_trusted_proxy_the_forwarded_address_is_audited_and_backed_off(
        mosquitto: Mosquitto, root: str, tmp_path: Path, http: aiohttp.ClientSession) -> None:
    async with guarded_manager(mosquitto, root, tmp_path, http,
                               trusted_proxies=("127.0.0.0/8",)) as g:
        c = g.client
        forwarded = {"X-Forwarded-For": "198.51.100.7, 203.0.113.9"}
        reply = await c.request("POST", f"{FLEET}/nodes/px-1/credentials", g.admin,
                                headers=forwarded)
        assert reply.status == 201
        audit = (await c.request("GET", "/api/v1/audit", g.admin)).json["entries"]
        assert audit[0]["address"] == "203.0.113.9"  # the hop the proxy saw, not a claim
        statuses = [(await c.request("GET", f"{FLEET}/nodes/px-1", "fmq_key_guess",
                                     headers={"X-Forwarded-For": "203.0.113.9"})).status
                    for _ in range(11)]
        assert statuses == [401] * 10 + [429]
        other = await c.request("GET", f"{FLEET}/nodes/px-1", "fmq_key_guess",
                                headers={"X-Forwarded-For": "203.0.113.10"})
        assert other.status == 401
        # An IPv6 scope id is no place for text: the proxy's own address is kept instead.
        forged = {"X-Forwarded-For": "fe80::1%eth0 actor=key:someone action=key_revoked"}
        reply = await c.request("POST", f"{FLEET}/nodes/px-3/credentials", g.admin,
                                headers=forged)
        assert reply.status == 201
        audit = (await c.request("GET", "/api/v1/audit", g.admin)).json["entries"]
        assert audit[0]["address"] == "127.0.0.1"


async def test_without_a_trusted_proxy_forwarded_addresses_are_ignored(
        mosquitto: Mosquitto, root: str, tmp_path: Path, http: aiohttp.ClientSession) -> None:
    async with guarded_manager(mosquitto, root, tmp_path, http) as g:
        reply = await g.client.request("POST", f"{FLEET}/nodes/px-2/credentials", g.admin,
                                       headers={"X-Forwarded-For": "203.0.113.9"})
        assert reply.status == 201
        audit = (await g.client.request("GET", "/api/v1/audit", g.admin)).json["entries"]
        assert audit[0]["address"] == "127.0.0.1"


async def test_while_auth_is_off_the_access_routes_say_how_to_turn_it_on(
        mosquitto: Mosquitto, root: str, http: aiohttp.ClientSession) -> None:
    async with running(make_settings(mosquitto.url, root)) as service:
        assert not service.auth_enabled
        c = Client(http, f"http://127.0.0.1:{service.http_port}")
        for method, path in (("POST", "/api/v1/keys"), ("GET", "/api/v1/keys"),
                             ("DELETE", "/api/v1/keys/0123456789ab"),
                             ("POST", f"{FLEET}/nodes/n1/credentials"),
                             ("GET", f"{FLEET}/nodes/n1/credentials"),
                             ("DELETE", f"{FLEET}/nodes/n1/credentials"),
                             ("POST", f"{FLEET}/enroll"), ("GET", "/api/v1/audit")):
            reply = await c.request(method, path, body={"role": "admin"})
            assert reply.status == 409, (method, path)
            assert reply.json["error"] == "Auth off"
            assert "fleetmq keys create --role admin" in reply.json["message"]
        assert (await c.register(None, "open-1")).status == 200


async def test_fleetmq_nodes_sends_its_token(
        mosquitto: Mosquitto, root: str, tmp_path: Path, http: aiohttp.ClientSession) -> None:
    async with guarded_manager(mosquitto, root, tmp_path, http) as g:
        assert (await g.client.register(g.admin, "listed-1")).status == 200
        read = await g.client.key(g.admin, "read")
        api = f"http://127.0.0.1:{g.service.http_port}"
        code, out, err = await _cli("nodes", "--api", api, "--token", read)
        assert code == 0, err
        assert "listed-1" in out
        code, _, err = await _cli("nodes", "--api", api)
        assert code == 1
        assert "401" in err
        assert "--token" in err


async def test_credentials_export_writes_a_private_password_file_and_an_acl(
        tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path / 'fleet.db'}"
    code, token, _ = await _cli("credentials", "issue", "exp-1", "--store", store)
    assert code == 0
    out = tmp_path / "mosq"
    manager_password = tmp_path / "manager.password"
    manager_password.write_text("a-manager-password-of-some-length\n")
    code, _, err = await _cli("credentials", "export", "--format", "mosquitto", "--out",
                              str(out), "--store", store,
                              "--manager-password-file", str(manager_password))
    assert code == 0, err
    lines = (out / "passwords").read_text().splitlines()
    assert {line.split(":")[0] for line in lines} == {"_fleetmq", "_fleetmq-out", "exp-1"}
    assert "a-manager-password" not in (out / "passwords").read_text()
    assert "cannot end sessions that are already connected" in err
    assert (out / "passwords").stat().st_mode & 0o777 == 0o600
    assert "exp-1:" in (out / "passwords").read_text()
    assert token.strip() not in (out / "passwords").read_text()
    assert (out / "acl").read_text()
