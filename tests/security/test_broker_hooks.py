"""Attacks on the HTTP auth hooks a broker calls (contract section 8, "Brokers with HTTP auth
hooks"), over real HTTP in the shapes EMQX 5 sends: a manager with auth on and
``--broker-auth external`` on the session Mosquitto, a broker key as the hooks' caller.

Each refused attempt is followed by the victim's own check, which must still pass.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from fleetmq.app import FleetService
from fleetmq.auth.tokens import new_token
from fleetmq.config import AuthSettings
from fleetmq.http.broker_hooks import AUTHENTICATE_PATH, AUTHORIZE_PATH, CREDENTIAL_ATTR
from tests.conftest import eventually, make_settings, running
from tests.support import Mosquitto, metric_samples

NODE_A = "sensor-a"
NODE_B = "sensor-b"


@dataclass
class Node:
    id: str
    token: str
    credential: str


@dataclass
class Hooks:
    """The broker's side of the hooks: EMQX's requests, with the broker key as bearer."""

    service: FleetService
    http: aiohttp.ClientSession
    base: str
    bearer: str
    root: str
    a: Node
    b: Node

    async def call(self, path: str, fields: dict[str, Any], *, bearer: str | None = "",
                   form: bool = False) -> tuple[int, dict[str, Any], aiohttp.typedefs.LooseHeaders]:
        token = self.bearer if bearer == "" else bearer
        headers = {} if token is None else {"Authorization": f"Bearer {token}"}
        kwargs: dict[str, Any] = {"data": fields} if form else {"json": fields}
        async with self.http.post(self.base + path, headers=headers, **kwargs) as resp:
            return resp.status, await resp.json(), resp.headers

    async def login(self, username: str, password: str, clientid: str | None = None,
                    **kw: Any) -> str:
        status, body, _ = await self.call(AUTHENTICATE_PATH, {
            "username": username, "password": password,
            "clientid": username if clientid is None else clientid,
            "peerhost": "192.0.2.7"}, **kw)
        assert status == 200, body
        assert body["is_superuser"] is False
        return str(body["result"])

    async def may(self, username: str, action: str, topic: str, *, clientid: str | None = None,
                  credential: str | None = None, **kw: Any) -> str:
        fields = {"username": username, "clientid": username if clientid is None else clientid,
                  "action": action, "topic": topic, "qos": 1, "retain": False}
        if credential is not None:
            fields["credential"] = credential
        status, body, _ = await self.call(AUTHORIZE_PATH, fields, **kw)
        assert status == 200, body
        return str(body["result"])

    async def victim_untouched(self) -> None:
        """Node A still logs in and still publishes its heartbeat."""
        assert await self.login(self.a.id, self.a.token) == "allow"
        assert await self.may(self.a.id, "publish", f"{self.root}/{self.a.id}/heartbeat",
                              credential=self.a.credential) == "allow"


@pytest.fixture
async def hooks(mosquitto: Mosquitto, root: str, tmp_path: Path,
                http: aiohttp.ClientSession) -> AsyncIterator[Hooks]:
    settings = make_settings(mosquitto.url, root, auth=AuthSettings(
        broker_auth="external", admin_token_file=str(tmp_path / "admin-token")))
    async with running(settings) as service:
        assert service.auth_enabled
        _, broker_token = await service.auth.create_key("broker", actor="test")
        nodes = []
        for node_id in (NODE_A, NODE_B):
            cred, token = await service.auth.issue_credential(node_id, actor="test")
            nodes.append(Node(node_id, token, cred.id))
        yield Hooks(service, http, f"http://127.0.0.1:{service.http_port}", broker_token, root,
                    nodes[0], nodes[1])


# --- authenticate ----------------------------------------------------------------------------


async def test_node_logs_in_with_its_own_token_and_gets_its_credential_attr(
        hooks: Hooks) -> None:
    status, body, _ = await hooks.call(AUTHENTICATE_PATH, {
        "username": NODE_A, "password": hooks.a.token, "clientid": NODE_A,
        "peerhost": "192.0.2.7"})
    assert status == 200
    assert body == {"result": "allow", "is_superuser": False,
                    "client_attrs": {CREDENTIAL_ATTR: hooks.a.credential}}


async def test_form_bodies_are_judged_like_json(hooks: Hooks) -> None:
    assert await hooks.login(NODE_A, hooks.a.token, form=True) == "allow"
    assert await hooks.login(NODE_A, hooks.b.token, form=True) == "deny"
    assert await hooks.may(NODE_A, "publish", f"{hooks.root}/{NODE_A}/heartbeat",
                           form=True) == "allow"
    assert await hooks.may(NODE_A, "publish", f"{hooks.root}/{NODE_B}/heartbeat",
                           form=True) == "deny"


def _altered(token: str) -> str:
    return token[:-2] + ("A" if token[-2] != "A" else "B") + token[-1]


@pytest.mark.parametrize("attack", [
    "wrong_password", "another_nodes_token", "a_keys_token_under_a_node_name",
    "own_token_with_another_client_id", "truncated_token", "altered_token", "empty_password",
    "wildcard_username", "hash_username", "slash_username", "dollar_username", "nul_username",
    "10kb_username", "10kb_password", "manager_username_with_node_token",
])
async def test_login_attack_is_denied_and_the_victim_still_logs_in(hooks: Hooks,
                                                                   attack: str) -> None:
    a, b = hooks.a, hooks.b
    _, read_key = await hooks.service.auth.create_key("read", actor="test")
    username, password, clientid = {
        "wrong_password": (a.id, new_token("node"), a.id),
        "another_nodes_token": (a.id, b.token, a.id),
        "a_keys_token_under_a_node_name": (a.id, read_key, a.id),
        "own_token_with_another_client_id": (b.id, b.token, a.id),
        "truncated_token": (a.id, a.token[:-1], a.id),
        "altered_token": (a.id, _altered(a.token), a.id),
        "empty_password": (a.id, "", a.id),
        "wildcard_username": (f"{a.id}/+", a.token, a.id),
        "hash_username": ("#", a.token, a.id),
        "slash_username": (f"{a.id}/x", a.token, f"{a.id}/x"),
        "dollar_username": (f"$SYS{a.id}", a.token, a.id),
        "nul_username": (f"{a.id}\0", a.token, f"{a.id}\0"),
        "10kb_username": (a.id * 1300, a.token, a.id),
        "10kb_password": (a.id, a.token + "x" * 10_000, a.id),
        "manager_username_with_node_token": (hooks.service.settings.mqtt_client_id, a.token,
                                             hooks.service.settings.mqtt_client_id),
    }[attack]
    assert await hooks.login(username, password, clientid) == "deny"
    await hooks.victim_untouched()


async def test_expired_and_revoked_tokens_are_denied(hooks: Hooks) -> None:
    auth = hooks.service.auth
    _, short = await auth.issue_credential("sensor-c", expires_in_s=0.3, actor="test")
    assert await hooks.login("sensor-c", short) == "allow"

    async def expired() -> bool:
        return await hooks.login("sensor-c", short) == "deny"

    await eventually(expired, timeout=5)
    await auth.revoke_credentials(NODE_B, actor="test")
    assert await hooks.login(NODE_B, hooks.b.token) == "deny"
    await hooks.victim_untouched()


async def test_manager_login_needs_this_process_secret_and_a_manager_client_id(
        hooks: Hooks) -> None:
    login = hooks.service.manager_login
    assert login is not None
    assert await hooks.login(login.username, login.password) == "allow"
    assert await hooks.login(login.username + "-out", login.password,
                             login.username + "-out") == "allow"
    assert await hooks.login(login.username, new_token("node")) == "deny"
    assert await hooks.login("_fleetmq-other", login.password, "_fleetmq-other") == "deny"
    # The secret does not let anyone take a node's client id.
    assert await hooks.login(login.username, login.password, NODE_A) == "deny"
    await hooks.victim_untouched()


async def test_keys_log_in_as_their_own_identity_and_broker_keys_not_at_all(
        hooks: Hooks) -> None:
    auth = hooks.service.auth
    read, read_token = await auth.create_key("read", actor="test")
    broker, broker_token = await auth.create_key("broker", actor="test")
    assert await hooks.login(f"_key.{read.id}", read_token) == "allow"
    assert await hooks.login(f"_key.{read.id}", read_token, NODE_A) == "deny"
    assert await hooks.login(f"_key.{broker.id}", broker_token) == "deny"
    enroll, enroll_token = await auth.create_key("enroll", actor="test")
    assert await hooks.login(f"_key.{enroll.id}", enroll_token) == "deny"
    await hooks.victim_untouched()


# --- the hooks' own caller -------------------------------------------------------------------


@pytest.mark.parametrize("path", [AUTHENTICATE_PATH, AUTHORIZE_PATH])
async def test_hooks_refuse_callers_without_a_broker_key(hooks: Hooks, path: str) -> None:
    auth = hooks.service.auth
    _, read_key = await auth.create_key("read", actor="test")
    _, write_key = await auth.create_key("write", actor="test")
    fields = {"username": NODE_A, "password": hooks.a.token, "clientid": NODE_A,
              "action": "publish", "topic": f"{hooks.root}/{NODE_A}/heartbeat"}
    for bearer in (None, "nonsense", new_token("key"), _altered(hooks.bearer)):
        status, body, headers = await hooks.call(path, fields, bearer=bearer)
        assert (status, body["error"]) == (401, "Unauthorized")
        assert headers["WWW-Authenticate"].startswith("Bearer")
    for bearer in (hooks.a.token, read_key, write_key):
        status, body, _ = await hooks.call(path, fields, bearer=bearer)
        assert (status, body["error"]) == (403, "Forbidden")
    admin_file = Path(hooks.service.settings.auth.admin_token_file or "")
    admin_token = (await asyncio.to_thread(admin_file.read_text)).strip()
    status, body, _ = await hooks.call(path, fields, bearer=admin_token)
    assert (status, body["result"]) == (200, "allow")
    await hooks.victim_untouched()


@pytest.mark.parametrize(("content_type", "body"), [
    ("text/plain", b"username=x"),
    ("application/json", b'["username", "x"]'),
    ("application/x-www-form-urlencoded",
     b"username=sensor-b&password=x&username=sensor-a&clientid=sensor-a"),
    # A field the hook reads, of a type no broker sends (found by schemathesis): judging it
    # as missing would answer a misconfigured broker with a plausible "deny".
    ("application/json", b'{"username": "sensor-a", "password": "x", "peerhost": {}}'),
    ("application/json", b'{"username": null, "password": "x"}'),
    ("application/json", b'{"username": 5, "password": "x"}'),
])
async def test_a_body_that_is_not_one_json_object_or_an_unambiguous_form_is_a_400(
        hooks: Hooks, content_type: str, body: bytes) -> None:
    async with hooks.http.post(hooks.base + AUTHENTICATE_PATH, data=body,
                               headers={"Authorization": f"Bearer {hooks.bearer}",
                                        "Content-Type": content_type}) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"] == "Bad Request"
    await hooks.victim_untouched()


async def test_unknown_form_fields_may_repeat_and_hold_anything(hooks: Hooks) -> None:
    # Found by schemathesis: a repeated field the hook does not read was refused as ambiguous.
    body = (f"username={NODE_A}&password={hooks.a.token}&clientid={NODE_A}"
            "&x=1&x=2&peerport=%00").encode()
    async with hooks.http.post(hooks.base + AUTHENTICATE_PATH, data=body, headers={
            "Authorization": f"Bearer {hooks.bearer}",
            "Content-Type": "application/x-www-form-urlencoded"}) as resp:
        assert (resp.status, (await resp.json())["result"]) == (200, "allow")
    await hooks.victim_untouched()


@pytest.mark.parametrize(("fields", "status"), [
    ({"qos": 1.0, "retain": True}, 200),
    ({"qos": "1", "retain": "false"}, 200),
    ({"qos": True}, 400),
    ({"retain": 1}, 400),
    ({"credential": ["x"]}, 400),
    ({"topic": None}, 400),
])
async def test_authorize_takes_bare_qos_and_retain_and_refuses_other_types(
        hooks: Hooks, fields: dict[str, Any], status: int) -> None:
    body = {"username": NODE_A, "clientid": NODE_A, "action": "publish",
            "topic": f"{hooks.root}/{NODE_A}/heartbeat", **fields}
    async with hooks.http.post(hooks.base + AUTHORIZE_PATH, json=body,
                               headers={"Authorization": f"Bearer {hooks.bearer}"}) as resp:
        reply = await resp.json()
        assert resp.status == status, reply
        assert reply.get("result", "allow") == "allow"
        assert "error" in reply if status == 400 else reply["result"] == "allow"
    await hooks.victim_untouched()


# --- authorize -------------------------------------------------------------------------------


async def test_node_publishes_only_its_own_register_and_heartbeat(hooks: Hooks) -> None:
    r, a = hooks.root, NODE_A
    assert await hooks.may(a, "publish", f"{r}/{a}/heartbeat") == "allow"
    assert await hooks.may(a, "publish", f"{r}/{a}/register") == "allow"
    for topic in (f"{r}/{NODE_B}/heartbeat", f"{r}/{NODE_B}/register", f"{r}/{a}/status",
                  f"{r}/{NODE_B}/status", f"{r}/{a}/reply", f"{r}/_manager/status",
                  f"{r}/_manager/sync", f"other/{a}/heartbeat", f"{r}/+/heartbeat", "$SYS/x"):
        assert await hooks.may(a, "publish", topic) == "deny", topic
    # B's username with A's client id is not A.
    assert await hooks.may(NODE_B, "publish", f"{r}/{a}/heartbeat", clientid=a) == "deny"
    assert await hooks.may(NODE_B, "publish", f"{r}/{NODE_B}/heartbeat", clientid=a) == "deny"
    assert await hooks.may(a, "all", f"{r}/{a}/heartbeat") == "deny"
    await hooks.victim_untouched()


async def test_node_subscribes_only_to_its_reply_its_status_and_the_managers(
        hooks: Hooks) -> None:
    r, b = hooks.root, NODE_B
    for topic in (f"{r}/{b}/reply", f"{r}/{b}/status", f"{r}/_manager/status"):
        assert await hooks.may(b, "subscribe", topic) == "allow", topic
    for topic in (f"{r}/#", f"{r}/+/reply", f"{r}/{NODE_A}/reply", f"{r}/+/heartbeat",
                  f"{r}/{NODE_A}/heartbeat", "$SYS/#", "$CONTROL/#", "#", "+/+/reply",
                  f"$share/x/{r}/+/heartbeat", f"$share/x/{r}/#", f"$queue/{r}/+/heartbeat"):
        assert await hooks.may(b, "subscribe", topic) == "deny", topic
    await hooks.victim_untouched()


async def test_revoked_credential_is_denied_on_the_very_next_authorize(hooks: Hooks) -> None:
    r = hooks.root
    assert await hooks.may(NODE_B, "publish", f"{r}/{NODE_B}/heartbeat") == "allow"
    await hooks.service.auth.revoke_credentials(NODE_B, actor="test")
    assert await hooks.may(NODE_B, "publish", f"{r}/{NODE_B}/heartbeat") == "deny"
    assert await hooks.may(NODE_B, "subscribe", f"{r}/{NODE_B}/reply") == "deny"
    await hooks.victim_untouched()


async def test_revocation_by_the_cli_reaches_the_next_authorize_within_the_poll(
        hooks: Hooks) -> None:
    # Another AuthService on the same store stands for the CLI (memory store: shared object).
    from fleetmq.auth.service import AuthService
    from fleetmq.core.clock import SystemClock

    cli = AuthService(hooks.service.auth.store, SystemClock())
    await cli.load()
    await cli.revoke_credentials(NODE_B, actor="cli")

    async def denied() -> bool:
        return await hooks.may(NODE_B, "publish", f"{hooks.root}/{NODE_B}/heartbeat") == "deny"

    await eventually(denied, timeout=1)
    await hooks.victim_untouched()


async def test_rotation_ends_the_old_sessions_rights_when_the_broker_names_its_credential(
        hooks: Hooks) -> None:
    r = hooks.root
    old = hooks.b.credential
    new, new_token_ = await hooks.service.auth.issue_credential(NODE_B, actor="test")
    assert await hooks.may(NODE_B, "publish", f"{r}/{NODE_B}/heartbeat",
                           credential=old) == "deny"
    assert await hooks.may(NODE_B, "publish", f"{r}/{NODE_B}/heartbeat",
                           credential=new.id) == "allow"
    assert await hooks.login(NODE_B, hooks.b.token) == "deny"
    assert await hooks.login(NODE_B, new_token_) == "allow"
    # A's credential id under B's name is no pass either.
    assert await hooks.may(NODE_B, "publish", f"{r}/{NODE_B}/heartbeat",
                           credential=hooks.a.credential) == "deny"
    await hooks.victim_untouched()


async def test_keys_get_their_roles_broker_rights(hooks: Hooks) -> None:
    auth, r = hooks.service.auth, hooks.root
    read, _ = await auth.create_key("read", actor="test")
    write, _ = await auth.create_key("write", actor="test")
    broker, _ = await auth.create_key("broker", actor="test")
    rk, wk, bk = f"_key.{read.id}", f"_key.{write.id}", f"_key.{broker.id}"
    assert await hooks.may(rk, "subscribe", f"{r}/+/status") == "allow"
    assert await hooks.may(rk, "publish", f"{r}/{NODE_A}/heartbeat") == "deny"
    assert await hooks.may(rk, "subscribe", f"{r}/+/reply") == "deny"
    assert await hooks.may(wk, "publish", f"{r}/{NODE_A}/heartbeat") == "allow"
    assert await hooks.may(wk, "publish", f"{r}/{NODE_A}/status") == "deny"
    assert await hooks.may(wk, "subscribe", f"{r}/+/reply") == "allow"
    assert await hooks.may(wk, "subscribe", f"{r}/+/heartbeat") == "deny"
    assert await hooks.may(bk, "subscribe", f"{r}/+/status") == "deny"
    await auth.revoke_key(write.id, actor="test")
    assert await hooks.may(wk, "publish", f"{r}/{NODE_A}/heartbeat") == "deny"
    await hooks.victim_untouched()


async def test_manager_may_write_statuses_and_read_ingest_but_nothing_outside_its_root(
        hooks: Hooks) -> None:
    login = hooks.service.manager_login
    assert login is not None
    m, r = login.username, hooks.root
    assert await hooks.may(m, "subscribe", f"{r}/+/heartbeat") == "allow"
    assert await hooks.may(m, "publish", f"{r}/{NODE_A}/status") == "allow"
    assert await hooks.may(m + "-out", "publish", f"{r}/_manager/status",
                           clientid=m + "-out") == "allow"
    assert await hooks.may(m, "publish", f"other/{NODE_A}/status") == "deny"
    assert await hooks.may(m, "publish", f"{r}/{NODE_A}/heartbeat") == "deny"
    assert await hooks.may("_fleetmq-impostor", "publish", f"{r}/{NODE_A}/status",
                           clientid="_fleetmq-impostor") == "deny"
    assert await hooks.may(m, "publish", f"{r}/{NODE_A}/status", clientid=NODE_A) == "deny"


async def test_reconnect_storm_of_a_few_hundred_nodes_is_answered_concurrently(
        hooks: Hooks) -> None:
    tokens = []
    for i in range(200):
        _, token = await hooks.service.auth.issue_credential(f"storm-{i}", actor="test")
        tokens.append((f"storm-{i}", token))
    results = await asyncio.gather(*(hooks.login(n, t) for n, t in tokens))
    assert set(results) == {"allow"}


def test_a_manager_without_the_hooks_has_no_secret(mosquitto: Mosquitto, root: str) -> None:
    plain = FleetService(make_settings(mosquitto.url, root))
    assert plain.manager_login is None
    given = FleetService(make_settings(mosquitto.url.replace("://", "://ops:pw@"), root,
                                       auth=AuthSettings(broker_auth="external")))
    assert given.manager_login is None  # the operator's own login is used as given
    hooked = FleetService(replace(make_settings(mosquitto.url, root),
                                  auth=AuthSettings(broker_auth="external")))
    assert hooked.manager_login is not None
    assert "password=***" in repr(hooked.manager_login)


async def test_refused_logins_and_callers_are_counted_in_metrics(hooks: Hooks) -> None:
    assert await hooks.login(NODE_A, hooks.b.token) == "deny"
    assert await hooks.login(NODE_A, hooks.a.token, NODE_B) == "deny"
    status, _, _ = await hooks.call(AUTHENTICATE_PATH, {"username": NODE_A}, bearer=None)
    assert status == 401
    admin_file = Path(hooks.service.settings.auth.admin_token_file or "")
    admin_token = (await asyncio.to_thread(admin_file.read_text)).strip()
    async with hooks.http.get(hooks.base + "/metrics",
                              headers={"Authorization": f"Bearer {admin_token}"}) as resp:
        values = metric_samples(await resp.text())
    prefix = "fleetmq_broker_hook_answers_total"
    assert values[f'{prefix}{{hook="authenticate",reason="wrong_identity",result="deny"}}'] == 1
    assert values[f'{prefix}{{hook="authenticate",reason="client_id",result="deny"}}'] == 1
    # A caller without a token is refused by the REST gate before the hook itself runs.
    assert values['fleetmq_auth_refused_total{reason="missing",status="401"}'] == 1


async def test_the_hooks_answer_409_while_auth_is_off_and_allow_nobody(
        mosquitto: Mosquitto, root: str, http: aiohttp.ClientSession) -> None:
    # No broker checks its logins against an open fleetmq: the hooks refuse rather than
    # answer for tokens nobody presented a bearer for.
    async with running(make_settings(mosquitto.url, root)) as service:
        assert not service.auth_enabled
        base = f"http://127.0.0.1:{service.http_port}"
        for path in (AUTHENTICATE_PATH, AUTHORIZE_PATH):
            async with http.post(base + path, json={"username": "n1", "password": "x",
                                                    "clientid": "n1"}) as resp:
                assert resp.status == 409
                assert (await resp.json())["error"] == "Auth off"
