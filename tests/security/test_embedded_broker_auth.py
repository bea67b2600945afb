"""Attacks on the embedded broker with auth on (contract section 8: Brokers, Topic rules).

Each attack test asserts that the attack fails AND that the victim, node A, is untouched: still
connected, still receiving on its subscriptions, its node and status unchanged. Everything runs
through a real manager (FleetService) with its real embedded amqtt broker; identities are made
on the manager's own AuthService.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from fleetmq.broker.embedded import SWEEP_S, EmbeddedBroker
from tests.conftest import eventually
from tests.security.broker_clients import (
    ACCEPTED,
    BAD_USERNAME_OR_PASSWORD,
    NOT_AUTHORISED,
    AuthFleet,
    Device,
    auth_fleet,
    raw_connect,
)

REFUSED = 0x80


@pytest.fixture
async def fleet(tmp_path: Path, root: str, http: aiohttp.ClientSession
                ) -> AsyncIterator[AuthFleet]:
    async with auth_fleet(tmp_path, root, http) as made:
        yield made


async def refused_logins(fleet: AuthFleet, reason: str) -> float:
    values = await fleet.metrics()
    return values[f'fleetmq_broker_logins_refused_total{{reason="{reason}"}}']


# --- what must keep working ------------------------------------------------------------------


async def test_node_with_its_token_registers_and_heartbeats_over_mqtt_and_the_manager_sees_it(
        fleet: AuthFleet) -> None:
    node = await fleet.node("node-a")
    [reply] = node.json_on(fleet.topics.reply("node-a"))
    assert reply["status"] == "registered"
    await node.publish(fleet.topics.heartbeat("node-a"), {"uptime_seconds": 42}, qos=0)
    doc = await eventually(lambda: fleet.rest_node("node-a"))
    await eventually(lambda: fleet.node_has("node-a", uptime_seconds=42))
    assert doc["status"] == "online"
    assert (await fleet.metrics())["fleetmq_broker_logins_accepted_total"] >= 3  # 2 links + A


async def test_read_key_subscribes_to_every_status_and_receives_them(fleet: AuthFleet) -> None:
    await fleet.node("node-a")
    identity, token = await fleet.key("read")
    dashboard = fleet.device(identity, identity, token)
    assert await dashboard.connect() == ACCEPTED
    assert await dashboard.subscribe(fleet.topics.status_filter) == 1
    assert await dashboard.subscribe(fleet.topics.manager_status) == 1
    await eventually(lambda: dashboard.json_on(fleet.topics.status("node-a")))
    await eventually(lambda: dashboard.json_on(fleet.topics.manager_status))
    # A read key writes nothing and reads no replies.
    assert await dashboard.subscribe(fleet.topics.reply("+")) == REFUSED
    assert dashboard.connected


async def test_write_key_publishes_another_nodes_heartbeat(fleet: AuthFleet) -> None:
    node = await fleet.node("node-a")
    identity, token = await fleet.key("write")
    gateway = fleet.device(identity, identity, token)
    assert await gateway.connect() == ACCEPTED
    await gateway.publish(fleet.topics.heartbeat("node-a"),
                          {"status": "degraded", "reason": "via_gateway"})
    await eventually(lambda: any(b.get("status") == "degraded"
                                 for b in node.json_on(fleet.topics.status("node-a"))))


# --- node B against node A: publishes, wills, subscriptions ---------------------------------


@pytest.mark.parametrize("target", ["heartbeat", "register", "retained_status",
                                    "manager_status"])
async def test_node_cannot_publish_as_another_node_or_the_manager(
        fleet: AuthFleet, target: str) -> None:
    a = await fleet.node("node-a")
    b = await fleet.node("node-b")
    t = fleet.topics
    before = await fleet.rest_node("node-a")
    topic, payload, retain = {
        "heartbeat": (t.heartbeat("node-a"), {"status": "offline", "reason": "forged"}, False),
        "register": (t.register("node-a"), {"type": "forged"}, False),
        "retained_status": (t.status("node-a"), {"node_id": "node-a", "status": "offline",
                                                 "reason": "forged"}, True),
        "manager_status": (t.manager_status, {"status": "offline", "reason": "forged"}, True),
    }[target]
    await b.publish(topic, payload, retain=retain)
    await eventually(lambda: fleet.metrics_value("fleetmq_broker_publishes_refused_total"))
    # B's own heartbeat after the forgery is applied, so the forgery was seen and dropped.
    await b.publish(t.heartbeat("node-b"), {"status": "degraded", "reason": "marker"})
    await eventually(lambda: any(x.get("status") == "degraded"
                                 for x in b.json_on(t.status("node-b"))))
    assert b.connected
    assert [x["status"] for x in a.json_on(t.status("node-a"))] == ["online"]
    after = await fleet.rest_node("node-a")
    assert after is not None
    assert before is not None
    assert (after["status"], after["type"]) == (before["status"], before["type"])
    # A newcomer sees the manager's retained statuses, not a forged one.
    identity, token = await fleet.key("read")
    watcher = fleet.device(identity, identity, token)
    assert await watcher.connect() == ACCEPTED
    await watcher.subscribe(t.status_filter)
    await eventually(lambda: watcher.json_on(t.manager_status)
                     and watcher.json_on(t.status("node-a")))
    assert watcher.json_on(t.manager_status)[-1]["status"] == "online"
    assert watcher.json_on(t.status("node-a"))[-1]["status"] == "online"
    await fleet.still_serves(a, "node-a")


@pytest.mark.parametrize("leaf", ["heartbeat", "status"])
async def test_will_on_another_nodes_topic_is_refused_at_connect(
        fleet: AuthFleet, leaf: str) -> None:
    a = await fleet.node("node-a")
    t = fleet.topics
    topic = t.heartbeat("node-a") if leaf == "heartbeat" else t.status("node-a")
    will = json.dumps({"node_id": "node-a", "status": "offline", "reason": "forged"}).encode()
    token_b = await fleet.node_token("node-b")
    refused_before = await refused_logins(fleet, "will")
    b = fleet.device("node-b", "node-b", token_b, will=(topic, will, leaf == "status"))
    assert await b.connect() == NOT_AUTHORISED
    b.kill()
    # The same over a raw socket that is then dropped without DISCONNECT.
    assert await raw_connect(fleet.port, "node-b", "node-b", token_b,
                             will=(topic, will, True)) == NOT_AUTHORISED
    assert await refused_logins(fleet, "will") == refused_before + 2
    # Its own heartbeat as a will is fine (the agent's normal will).
    own = fleet.device("node-b", "node-b", token_b,
                       will=(t.heartbeat("node-b"), b'{"status": "offline"}', False))
    assert await own.connect() == ACCEPTED
    assert [x["status"] for x in a.json_on(t.status("node-a"))] == ["online"]
    assert (await fleet.rest_node("node-a") or {}).get("status") == "online"
    await fleet.still_serves(a, "node-a")
    # Long after B's sockets went: no will of B's ever made A offline.
    assert "offline" not in [x["status"] for x in a.json_on(t.status("node-a"))]


@pytest.mark.parametrize("pattern", ["{root}/#", "{root}/+/reply", "$SYS/#", "#",
                                     "$share/x/{root}/+/heartbeat", "{root}/node-a/reply",
                                     "{root}/+/heartbeat", "$CONTROL/#"])
async def test_node_subscribing_beyond_its_own_topics_gets_suback_0x80_and_stays_connected(
        fleet: AuthFleet, pattern: str) -> None:
    a = await fleet.node("node-a")
    b = await fleet.node("node-b")
    assert await b.subscribe(pattern.format(root=fleet.root)) == REFUSED
    assert b.connected
    await fleet.register(b, "node-b")  # still served on its own subscriptions
    await fleet.still_serves(a, "node-a")
    assert not b.received(fleet.topics.reply("node-a"))
    assert not b.received(fleet.topics.status("node-a"))


# --- whose client id --------------------------------------------------------------------------


async def test_node_cannot_connect_with_another_nodes_client_id(fleet: AuthFleet) -> None:
    a = await fleet.node("node-a")
    token_b = await fleet.node_token("node-b")
    for clean in (True, False):
        assert await raw_connect(fleet.port, "node-a", "node-b", token_b,
                                 clean=clean) == NOT_AUTHORISED
        assert await raw_connect(fleet.port, "node-a", "node-a", token_b,
                                 clean=clean) == NOT_AUTHORISED
    await fleet.still_serves(a, "node-a")


@pytest.mark.parametrize("victim", ["node", "manager", "manager_out", "manager_prefix"])
async def test_key_holder_cannot_connect_with_a_node_or_manager_client_id(
        fleet: AuthFleet, victim: str) -> None:
    a = await fleet.node("node-a")
    identity, token = await fleet.key("admin")
    manager_id = fleet.svc.settings.mqtt_client_id
    client_id = {"node": "node-a", "manager": manager_id, "manager_out": f"{manager_id}-out",
                 "manager_prefix": "_fleetmq-other"}[victim]
    assert await raw_connect(fleet.port, client_id, identity, token) == NOT_AUTHORISED
    assert await raw_connect(fleet.port, client_id, client_id, token) in (
        BAD_USERNAME_OR_PASSWORD, NOT_AUTHORISED)
    # The manager's own username needs the manager's secret, which no token is.
    assert await raw_connect(fleet.port, client_id, "_fleetmq", token) == \
        BAD_USERNAME_OR_PASSWORD
    assert fleet.svc.ready
    await fleet.still_serves(a, "node-a")


@pytest.mark.parametrize("clean", [True, False])
async def test_wrong_password_naming_a_live_client_id_leaves_that_client_untouched(
        fleet: AuthFleet, clean: bool) -> None:
    a = await fleet.node("node-a", clean_session=False)
    manager_id = fleet.svc.settings.mqtt_client_id
    wrong = await fleet.node_token("node-z")  # valid, but another identity's
    for client_id, username, password in [
            ("node-a", "node-a", "fmq_node_" + "A" * 43),
            ("node-a", "node-a", None),
            ("node-a", "node-a", wrong),
            ("node-a", None, None),
            (manager_id, "_fleetmq", "guess"),
            (f"{manager_id}-out", "_fleetmq", "x" * 43)]:
        code = await raw_connect(fleet.port, client_id, username, password, clean=clean)
        assert code in (BAD_USERNAME_OR_PASSWORD, NOT_AUTHORISED), (client_id, code)
    assert fleet.svc.ready
    assert fleet.svc.link.connections == 1
    assert fleet.svc.out.connections == 1
    await fleet.still_serves(a, "node-a")


# --- tokens ----------------------------------------------------------------------------------


async def test_bad_tokens_are_refused_at_connect(fleet: AuthFleet) -> None:
    a = await fleet.node("node-a")
    token = await fleet.node_token("node-b")
    enr_identity, enroll = await fleet.key("enroll", max_uses=5)
    other = await fleet.node_token("node-c")
    altered = token[:-2] + ("B" if token[-2] != "B" else "C") + token[-1]
    cases = {
        "truncated": (token[:-1], "malformed"),
        "altered": (altered, "unknown"),
        "empty": ("", "missing"),
        "no password": (None, "missing"),
        "key prefix": ("fmq_key_" + token[len("fmq_node_"):], "unknown"),
    }
    for name, (password, reason) in cases.items():
        before = await refused_logins(fleet, reason)
        assert await raw_connect(fleet.port, "node-b", "node-b", password) == \
            BAD_USERNAME_OR_PASSWORD, name
        assert await refused_logins(fleet, reason) == before + 1, name
    # Another node's valid token is the wrong identity; an enroll key has no broker rights,
    # not even under its own identity.
    assert await raw_connect(fleet.port, "node-b", "node-b", other) == NOT_AUTHORISED
    assert await raw_connect(fleet.port, "node-b", "node-b", enroll) == NOT_AUTHORISED
    assert await raw_connect(fleet.port, enr_identity, enr_identity, enroll) == NOT_AUTHORISED
    assert await refused_logins(fleet, "role") == 1
    assert await raw_connect(fleet.port, "node-b", "node-b", token) == ACCEPTED
    await fleet.still_serves(a, "node-a")


async def test_expired_token_is_refused_at_connect_and_its_connection_closed(
        fleet: AuthFleet) -> None:
    a = await fleet.node("node-a")
    token = await fleet.node_token("node-e", expires_in_s=1.5)
    short = fleet.device("node-e", "node-e", token)
    assert await short.connect() == ACCEPTED
    await eventually(short.disconnected.is_set, timeout=4)
    before = await refused_logins(fleet, "expired")
    assert await raw_connect(fleet.port, "node-e", "node-e", token) == BAD_USERNAME_OR_PASSWORD
    assert await refused_logins(fleet, "expired") == before + 1
    await fleet.still_serves(a, "node-a")


async def test_revoked_node_token_live_connection_is_closed_within_a_second(
        fleet: AuthFleet) -> None:
    a = await fleet.node("node-a")
    b = await fleet.node("node-b")
    started = time.monotonic()
    assert await fleet.svc.auth.revoke_credentials("node-b", actor="test") == 1
    await eventually(b.disconnected.is_set, timeout=2, interval=0.005)
    assert time.monotonic() - started < 1.0
    # Its will is not published: a credential that ended speaks no more.
    assert (await fleet.rest_node("node-b") or {}).get("status") == "online"
    assert await raw_connect(fleet.port, "node-b", "node-b", "fmq_node_" + "x" * 43) == \
        BAD_USERNAME_OR_PASSWORD
    await fleet.still_serves(a, "node-a")
    assert (await fleet.metrics())["fleetmq_broker_connections_revoked_total"] >= 1


def hide_revocations_from_the_broker(fleet: AuthFleet) -> EmbeddedBroker:
    """Plays a session amqtt registered after the revoker looked: the broker's revoker no
    longer hears of ended credentials (its once-a-second sweep still runs)."""
    broker = fleet.svc.embedded_broker
    assert broker is not None
    fleet.svc.auth._listeners.remove(broker._credentials_changed)
    return broker


async def dropped_without_its_will(fleet: AuthFleet, broker: EmbeddedBroker, node_id: str,
                                   before: dict[str, Any] | None, witness: Device) -> None:
    """Once the node's dropped connection is handled, the manager shows it as it was: no will
    applied. The witness's heartbeats go through the broker after the drop (and its will, if
    any, was broadcast): once the manager has applied them, it would have applied the will."""

    def dropped() -> bool:
        entry = broker._broker._sessions.get(node_id)
        return entry is None or not entry[0].transitions.is_connected()

    await eventually(dropped, timeout=2, interval=0.005)
    await fleet.still_serves(witness, witness.client_id)
    after = await fleet.rest_node(node_id)
    assert after is not None
    assert before is not None
    assert (after["last_seen"], after["status"]) == (before["last_seen"], "online")


async def test_a_session_the_revoker_missed_can_do_nothing_once_its_credential_ended(
        fleet: AuthFleet) -> None:
    """amqtt may register a session up to a second after its login was checked, where the
    revoker does not see it. Played here by keeping the revocation from the broker's revoker:
    the revoked node's next publish is dropped, and the revoker's sweep ends its session
    (without its will)."""
    a = await fleet.node("node-a")
    b = await fleet.node("node-b")
    broker = hide_revocations_from_the_broker(fleet)
    before = await fleet.rest_node("node-b")
    assert await fleet.svc.auth.revoke_credentials("node-b", actor="test") == 1
    assert b.connected  # nobody told the broker

    await b.publish(fleet.topics.heartbeat("node-b"), {"uptime_seconds": 999}, qos=0)

    await eventually(b.disconnected.is_set, timeout=2, interval=0.005)
    assert "node-b" not in broker.session_ids()
    after = await fleet.rest_node("node-b")
    assert after is not None
    assert before is not None
    assert (after["last_seen"], after["status"]) == (before["last_seen"], "online")
    await fleet.still_serves(a, "node-a")


async def test_an_idle_session_the_revoker_missed_is_closed_by_its_sweep(
        fleet: AuthFleet) -> None:
    """The same missed session, idle: the revoker's once-a-second look at every session closes
    it (without its will) though nobody told the broker."""
    a = await fleet.node("node-a")
    b = await fleet.node("node-b")
    broker = hide_revocations_from_the_broker(fleet)
    before = await fleet.rest_node("node-b")
    revoked = time.monotonic()
    assert await fleet.svc.auth.revoke_credentials("node-b", actor="test") == 1

    await eventually(b.disconnected.is_set, timeout=3, interval=0.01)

    assert time.monotonic() - revoked < SWEEP_S + 0.5
    assert "node-b" not in broker.session_ids()
    assert await fleet.rest_node("node-b") == before
    await fleet.still_serves(a, "node-a")


async def test_a_session_the_revoker_missed_leaves_no_will_when_its_socket_drops(
        fleet: AuthFleet) -> None:
    """The same missed session, silent after the revocation: it drops its socket instead of
    publishing. Its will (its own heartbeat, allowed at CONNECT) is a publish of a credential
    that ended and must not reach the manager, however late the drop comes."""
    a = await fleet.node("node-a")
    will = json.dumps({"status": "degraded", "reason": "will-after-revocation"}).encode()
    b = await fleet.node("node-b", will=(fleet.topics.heartbeat("node-b"), will, False))
    broker = hide_revocations_from_the_broker(fleet)
    before = await fleet.rest_node("node-b")
    assert await fleet.svc.auth.revoke_credentials("node-b", actor="test") == 1
    assert b.connected  # nobody told the broker

    b.kill()

    await dropped_without_its_will(fleet, broker, "node-b", before, a)


async def test_a_node_whose_token_just_expired_leaves_no_will_when_its_socket_drops(
        fleet: AuthFleet) -> None:
    """An expiry is noticed at the manager's next poll (up to 0.2 s later). A node dropping
    its socket just after its token expired, before the revoker has closed its session, must
    not get its will published: it is a publish by a credential that has ended."""
    a = await fleet.node("node-a")
    cred, token = await fleet.svc.auth.issue_credential("node-e", actor="test",
                                                        expires_in_s=2.0)
    assert cred.expires_at is not None
    will = json.dumps({"status": "degraded", "reason": "will-after-expiry"}).encode()
    e = await fleet.node("node-e", token=token,
                         will=(fleet.topics.heartbeat("node-e"), will, False))
    before = await fleet.rest_node("node-e")
    await asyncio.sleep(max(0.0, cred.expires_at + 0.01 - time.time()))

    # The socket goes at once (paho's own kill first waits for its network thread).
    client = e._client
    assert client is not None
    sock = client.socket()
    assert sock is not None
    sock.shutdown(socket.SHUT_RDWR)
    client.loop_stop()
    sock.close()
    e._client = None

    broker = fleet.svc.embedded_broker
    assert broker is not None
    await dropped_without_its_will(fleet, broker, "node-e", before, a)


async def test_rotated_out_token_keeps_its_connection_for_the_grace_then_is_cut(
        fleet: AuthFleet) -> None:
    a = await fleet.node("node-a")
    old = a.password
    assert old is not None
    fresh = await fleet.node_token("node-a", grace_s=1.5)
    assert a.connected  # the grace lets the device fetch and switch to its new token
    await eventually(a.disconnected.is_set, timeout=4)
    assert await raw_connect(fleet.port, "node-a", "node-a", old) == BAD_USERNAME_OR_PASSWORD
    back = await fleet.node("node-a", token=fresh)
    await fleet.still_serves(back, "node-a")


async def test_revoked_keys_persistent_session_cannot_be_resumed(fleet: AuthFleet) -> None:
    a = await fleet.node("node-a")
    identity, token = await fleet.key("write")
    gateway = fleet.device(identity, identity, token, clean_session=False)
    assert await gateway.connect() == ACCEPTED
    assert await gateway.subscribe(fleet.topics.reply("+")) == 1
    gateway.close()
    await fleet.register(a, "node-a")  # a reply queued for the gateway's offline session
    key_id = identity.removeprefix("_key.")
    await fleet.svc.auth.revoke_key(key_id, actor="test")
    await eventually(lambda: identity not in fleet.svc.embedded_broker.session_ids())
    assert await raw_connect(fleet.port, identity, identity, token, clean=False) == \
        BAD_USERNAME_OR_PASSWORD
    other_identity, other_token = await fleet.key("write")
    assert await raw_connect(fleet.port, identity, other_identity, other_token,
                             clean=False) == NOT_AUTHORISED
    assert await raw_connect(fleet.port, identity, identity, other_token,
                             clean=False) == NOT_AUTHORISED
    await fleet.still_serves(a, "node-a")


async def test_node_session_of_a_revoked_credential_is_not_resumed_by_its_next_credential(
        fleet: AuthFleet) -> None:
    a = await fleet.node("node-a", clean_session=False)
    a.close()
    await queue_a_reply(fleet, "node-a")
    await fleet.svc.auth.revoke_credentials("node-a", actor="test")
    await eventually(lambda: "node-a" not in fleet.svc.embedded_broker.session_ids())
    fresh = await fleet.node_token("node-a")
    again = fleet.device("node-a", "node-a", fresh, clean_session=False)
    assert await again.connect() == ACCEPTED
    assert again.session_present is False
    assert await again.subscribe(fleet.topics.reply("node-a")) == 1
    await fleet.register(again, "node-a")
    # Only the reply to its own new register arrived, none queued for the old session.
    assert len(again.received(fleet.topics.reply("node-a"))) == 1


async def queue_a_reply(fleet: AuthFleet, node_id: str) -> None:
    """A write key registers the (offline) node: the manager's reply is queued for the node's
    persistent session. The key watches the reply topic to know it was sent."""
    identity, token = await fleet.key("write")
    gateway = fleet.device(identity, identity, token)
    assert await gateway.connect() == ACCEPTED
    assert await gateway.subscribe(fleet.topics.reply(node_id)) == 1
    await gateway.publish(fleet.topics.register(node_id), {"type": "picclaw"})
    await eventually(lambda: gateway.received(fleet.topics.reply(node_id)))


async def test_persistent_session_resumes_for_its_owner(fleet: AuthFleet) -> None:
    a = await fleet.node("node-a", clean_session=False)
    token = a.password
    a.close()
    await queue_a_reply(fleet, "node-a")
    back = fleet.device("node-a", "node-a", token, clean_session=False)
    assert await back.connect() == ACCEPTED
    assert back.session_present is True
    await eventually(lambda: back.json_on(fleet.topics.reply("node-a")))


# --- hostile input ---------------------------------------------------------------------------


async def test_hostile_client_ids_and_usernames_are_refused_cleanly(fleet: AuthFleet) -> None:
    a = await fleet.node("node-a")
    token = await fleet.node_token("node-b")
    big = "n" * 10_240
    for client_id, username, password in [
            ("node-b/+", "node-b", token), ("node-b#", "node-b", token),
            ("$SYS", "node-b", token), ("+", "+", token), ("#", "#", token),
            ("node-b\0x", "node-b", token), ("node-b", "node-b\0", token),
            ("node-b", "node-b", token + "\0"), (big, big, token),
            ("node-b", big, token), ("node-b", "node-b", big), (big, big, big),
            ("_key.x", "_key.x", token), ("", "node-b", token)]:
        code = await raw_connect(fleet.port, client_id, username, password)
        assert code in (BAD_USERNAME_OR_PASSWORD, NOT_AUTHORISED, None), \
            (client_id[:20], username[:20], code)
    # Garbage instead of a CONNECT, and a silent socket, neither hang nor break the broker.
    _reader, writer = await asyncio.open_connection("127.0.0.1", fleet.port)
    writer.write(b"\x10\xff\xff\xff\x7f" + b"\0" * 100)
    await writer.drain()
    writer.close()
    assert await raw_connect(fleet.port, "node-b", "node-b", token) == ACCEPTED
    await fleet.still_serves(a, "node-a")
    assert fleet.svc.ready


async def test_failed_logins_back_off_per_address_and_username_but_a_valid_token_passes(
        fleet: AuthFleet) -> None:
    token = await fleet.node_token("node-b")

    async def timed(username: str, password: str) -> tuple[int | None, float]:
        started = time.monotonic()
        code = await raw_connect(fleet.port, username, username, password)
        return code, time.monotonic() - started

    async def delayed() -> float:
        return await fleet.metrics_value("fleetmq_broker_logins_delayed_total")

    wrong = "fmq_node_" + "A" * 43
    for _ in range(10):
        code, _took = await timed("node-b", wrong)
        assert code == BAD_USERNAME_OR_PASSWORD
    assert await delayed() == 0
    code, took = await timed("node-b", wrong)  # the 11th in a minute waits
    assert code == BAD_USERNAME_OR_PASSWORD
    assert took >= 0.9
    assert await delayed() == 1
    code, _took = await timed("node-b", token)  # a valid token is never held back
    assert code == ACCEPTED
    code, _took = await timed("node-c", wrong)  # nor another username from that address
    assert code == BAD_USERNAME_OR_PASSWORD
    assert await delayed() == 1
