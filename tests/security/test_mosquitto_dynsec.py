"""Attacks on a real Mosquitto 2.0 whose dynamic security plugin fleetmq mirrors
(``--broker-auth dynsec``, contract section 8). Each asserts the attack fails AND the victim is
untouched: still connected, still subscribed, its node and status unchanged."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import aiohttp
import pytest
from paho.mqtt.enums import MQTTProtocolVersion

from fleetmq.app import FleetService
from fleetmq.auth.store import OutboxRow
from fleetmq.mqtt.dynsec import DynsecError
from tests.conftest import eventually
from tests.security.dynsec_support import (
    dynsec_broker,
    dynsec_settings,
    mirrored,
    peer_factory,
    settled,
)
from tests.security.peer import NOT_AUTHORIZED, V5, V311, Peer
from tests.support import Mosquitto

pytestmark = pytest.mark.mosquitto
Peers = Callable[..., Peer]
REGISTER = json.dumps({"type": "esp32", "heartbeat_interval_seconds": 30}).encode()
OFFLINE = json.dumps({"status": "offline", "reason": "connection_lost"}).encode()


@pytest.fixture(scope="session")
def dynsec_mosquitto() -> Iterator[Mosquitto]:
    """One dynsec broker for the tests that leave it running (each on its own root and with
    node ids of its own: usernames are global to the broker)."""
    with dynsec_broker() as broker:
        yield broker


@pytest.fixture
def own_dynsec(tmp_path: Path) -> Iterator[Mosquitto]:
    """A dynsec broker for one test that restarts it or edits its file."""
    with dynsec_broker(tmp_path / "broker") as broker:
        yield broker


@pytest.fixture
def peers() -> Iterator[Peers]:
    with peer_factory() as make:
        yield make


@dataclass
class Scene:
    service: FleetService
    root: str
    a: Peer
    """The victim: registered, connected, subscribed to its reply and status."""
    b: Peer
    """The attacker: a node with a valid credential of its own."""
    a_id: str
    b_id: str
    b_token: str

    def a_node(self) -> tuple[object, ...]:
        node = self.service.registry.get(self.a_id)
        assert node is not None
        return (node.status, node.status_reason, node.last_seen, node.type, node.session)

    async def assert_a_untouched(self, before: tuple[object, ...]) -> None:
        """A is still connected and subscribed (a fresh reply reaches it), its node unchanged."""
        assert self.a.connected
        assert self.a_node() == before
        replies = len(self.a.received(f"{self.root}/{self.a_id}/reply"))
        # A heartbeat of an unknown node earns a 404 reply; here A asks for one with a register.
        assert await self.a.publish(f"{self.root}/{self.a_id}/register", REGISTER) == 0
        await eventually(lambda: len(self.a.received(f"{self.root}/{self.a_id}/reply"))
                         > replies)


async def scene(service: FleetService, broker: Mosquitto, root: str, peers: Peers) -> Scene:
    a_id, b_id = f"a-{root}", f"b-{root}"
    _, a_token = await service.auth.issue_credential(a_id, actor="test")
    _, b_token = await service.auth.issue_credential(b_id, actor="test")
    await settled(service)
    a = peers(broker, a_id, a_id, a_token)
    assert await a.connect() == 0
    for topic in (f"{root}/{a_id}/reply", f"{root}/{a_id}/status"):
        assert await a.subscribe(topic) == 1
    assert await a.publish(f"{root}/{a_id}/register", REGISTER) == 0
    await eventually(lambda: a.received(f"{root}/{a_id}/reply"))
    await eventually(lambda: a.received(f"{root}/{a_id}/status"))
    b = peers(broker, b_id, b_id, b_token)
    assert await b.connect() == 0
    return Scene(service, root, a, b, a_id, b_id, b_token)


@pytest.fixture
async def attacked(dynsec_mosquitto: Mosquitto, root: str, tmp_path: Path, peers: Peers):  # type: ignore[no-untyped-def]
    async with mirrored(dynsec_settings(dynsec_mosquitto, root, tmp_path)) as service:
        yield await scene(service, dynsec_mosquitto, root, peers)


async def test_node_publishing_another_nodes_heartbeat_or_register_is_refused(
        attacked: Scene) -> None:
    s, before = attacked, attacked.a_node()
    for topic in (f"{s.root}/{s.a_id}/heartbeat", f"{s.root}/{s.a_id}/register"):
        assert await s.b.publish(topic, OFFLINE) == NOT_AUTHORIZED
    await s.assert_a_untouched(before)
    assert s.service.registry.get(s.b_id) is None  # nothing of B's reached the manager


async def test_node_forging_retained_statuses_is_refused(attacked: Scene, peers: Peers,
                                                         dynsec_mosquitto: Mosquitto) -> None:
    s, before = attacked, attacked.a_node()
    forged = json.dumps({"node_id": s.a_id, "status": "offline"}).encode()
    assert await s.b.publish(f"{s.root}/{s.a_id}/status", forged, retain=True) == NOT_AUTHORIZED
    assert await s.b.publish(f"{s.root}/_manager/status", forged,
                             retain=True) == NOT_AUTHORIZED
    assert await s.b.publish(f"{s.root}/{s.b_id}/status", forged,
                             retain=True) == NOT_AUTHORIZED
    await s.assert_a_untouched(before)
    assert forged not in s.a.received(f"{s.root}/{s.a_id}/status")
    # A newcomer reading A's retained status sees the manager's, not the forgery.
    _, key = await s.service.auth.create_key("read", actor="test")
    await settled(s.service)
    reader = peers(dynsec_mosquitto, f"_key.{s.service.auth.verify(key).principal.id}",  # type: ignore[union-attr]
                   f"_key.{s.service.auth.verify(key).principal.id}", key)  # type: ignore[union-attr]
    assert await reader.connect() == 0
    assert await reader.subscribe(f"{s.root}/+/status") == 1
    [status] = await eventually(lambda: reader.received(f"{s.root}/{s.a_id}/status"))
    assert json.loads(status)["status"] == s.a_node()[0]
    assert not reader.received(f"{s.root}/{s.b_id}/status")


async def test_will_naming_another_nodes_topic_never_reaches_the_manager(
        attacked: Scene, peers: Peers, dynsec_mosquitto: Mosquitto) -> None:
    s, before = attacked, attacked.a_node()
    s.b.close()
    for topic, retain in ((f"{s.root}/{s.a_id}/heartbeat", False),
                          (f"{s.root}/{s.a_id}/status", True)):
        attacker = peers(dynsec_mosquitto, s.b_id, s.b_id, s.b_token)
        code = await attacker.connect(will=(topic, OFFLINE, retain))
        if code == 0:  # Mosquitto 2.0 accepts the CONNECT and drops the will when it fires
            attacker.kill()
        else:
            assert code == NOT_AUTHORIZED
    await s.assert_a_untouched(before)
    last = json.loads(s.a.received(f"{s.root}/{s.a_id}/status")[-1])
    assert last["status"] == s.a_node()[0] != "offline"


@pytest.mark.parametrize("pattern", ["{root}/#", "{root}/+/reply", "{root}/{a}/reply", "$SYS/#",
                                     "$CONTROL/#", "$share/x/{root}/+/heartbeat", "#"])
async def test_node_subscribing_beyond_its_own_topics_is_refused(attacked: Scene,
                                                                 pattern: str) -> None:
    s, before = attacked, attacked.a_node()
    topic = pattern.format(root=s.root, a=s.a_id)
    assert await s.b.subscribe(topic) == NOT_AUTHORIZED
    await s.assert_a_untouched(before)
    assert not s.b.messages  # not even A's reply that followed


async def test_refused_subscription_over_mqtt311_gets_0x80_and_the_connection_stays(
        attacked: Scene, peers: Peers, dynsec_mosquitto: Mosquitto) -> None:
    s, before = attacked, attacked.a_node()
    s.b.close()
    old = peers(dynsec_mosquitto, s.b_id, s.b_id, s.b_token, protocol=V311)
    assert await old.connect() == 0
    assert await old.subscribe(f"{s.root}/+/reply") == 0x80
    assert await old.subscribe(f"{s.root}/{s.b_id}/reply") == 1
    assert old.connected
    await s.assert_a_untouched(before)


async def test_node_connecting_with_another_nodes_client_id_is_refused(
        attacked: Scene, peers: Peers, dynsec_mosquitto: Mosquitto) -> None:
    s, before = attacked, attacked.a_node()
    thief = peers(dynsec_mosquitto, s.a_id, s.b_id, s.b_token)
    assert await thief.connect() == NOT_AUTHORIZED
    await s.assert_a_untouched(before)


async def test_key_holder_connecting_as_a_node_or_the_manager_is_refused(
        attacked: Scene, peers: Peers, dynsec_mosquitto: Mosquitto) -> None:
    s, before = attacked, attacked.a_node()
    cred, key = await s.service.auth.create_key("admin", actor="test")
    await settled(s.service)
    manager_ids = [s.service.settings.mqtt_client_id, f"{s.service.settings.mqtt_client_id}-out"]
    for client_id in [s.a_id, *manager_ids]:
        thief = peers(dynsec_mosquitto, client_id, f"_key.{cred.id}", key)
        assert await thief.connect() == NOT_AUTHORIZED
    assert s.service.ready  # the manager's connections were never taken over
    await s.assert_a_untouched(before)
    own = peers(dynsec_mosquitto, f"_key.{cred.id}", f"_key.{cred.id}", key)
    assert await own.connect() == 0  # the key works under its own identity


async def test_wrong_password_with_a_live_client_id_leaves_that_client_connected(
        attacked: Scene, peers: Peers, dynsec_mosquitto: Mosquitto) -> None:
    s, before = attacked, attacked.a_node()
    for clean in (True, False):
        thief = peers(dynsec_mosquitto, s.a_id, s.a_id, "fmq_node_" + "x" * 43)
        assert await thief.connect(clean=clean, session_expiry=3600) == NOT_AUTHORIZED
    await s.assert_a_untouched(before)


async def test_revoked_keys_persistent_session_cannot_be_resumed(
        attacked: Scene, peers: Peers, dynsec_mosquitto: Mosquitto) -> None:
    s = attacked
    cred, key = await s.service.auth.create_key("read", actor="test")
    other, other_key = await s.service.auth.create_key("read", actor="test")
    await settled(s.service)
    ident = f"_key.{cred.id}"
    holder = peers(dynsec_mosquitto, ident, ident, key)
    assert await holder.connect(clean=False, session_expiry=3600) == 0
    assert await holder.subscribe(f"{s.root}/+/status") == 1
    holder.close()
    await s.service.auth.revoke_key(cred.id, actor="test")
    await settled(s.service)
    again = peers(dynsec_mosquitto, ident, ident, key)
    assert await again.connect(clean=False, session_expiry=3600) == NOT_AUTHORIZED
    taker = peers(dynsec_mosquitto, ident, f"_key.{other.id}", other_key)
    assert await taker.connect(clean=False, session_expiry=3600) == NOT_AUTHORIZED
    assert not again.messages
    assert not taker.messages


async def test_revocation_kicks_a_live_connection_within_one_second(
        attacked: Scene, peers: Peers, dynsec_mosquitto: Mosquitto) -> None:
    s, before = attacked, attacked.a_node()
    cred, key = await s.service.auth.create_key("write", actor="test")
    await settled(s.service)
    holder = peers(dynsec_mosquitto, f"_key.{cred.id}", f"_key.{cred.id}", key)
    assert await holder.connect() == 0
    started = time.monotonic()
    await s.service.auth.revoke_credentials(s.b_id, actor="test")
    await s.service.auth.revoke_key(cred.id, actor="test")
    await eventually(lambda: s.b.disconnected.is_set() and holder.disconnected.is_set(),
                     timeout=1.0, interval=0.01)
    assert time.monotonic() - started < 1.0
    again = peers(dynsec_mosquitto, s.b_id, s.b_id, s.b_token)
    assert await again.connect() == NOT_AUTHORIZED
    await s.assert_a_untouched(before)


@pytest.mark.parametrize("protocol", [V311, V5], ids=["mqtt311", "mqtt5"])
async def test_revoked_nodes_persistent_session_is_not_resumed_with_a_new_credential(
        attacked: Scene, peers: Peers, dynsec_mosquitto: Mosquitto,
        protocol: MQTTProtocolVersion) -> None:
    s, before = attacked, attacked.a_node()
    node = f"e{protocol.value}-{s.root}"
    reply = f"{s.root}/{node}/reply"
    _, token = await s.service.auth.issue_credential(node, actor="test")
    witness_cred, witness_key = await s.service.auth.create_key("write", actor="test")
    await settled(s.service)
    holder = peers(dynsec_mosquitto, node, node, token, protocol=protocol)
    assert await holder.connect(clean=False, session_expiry=3600) == 0
    assert await holder.subscribe(reply) == 1
    holder.close()
    back = peers(dynsec_mosquitto, node, node, token, protocol=protocol)
    assert await back.connect(clean=False, session_expiry=3600) == 0
    assert back.session_present  # the broker keeps this session: the attack has a target
    back.close()
    await s.service.auth.revoke_credentials(node, actor="test")
    await settled(s.service)
    # A reply to the node, published while it is away: the old session would queue it.
    ident = f"_key.{witness_cred.id}"
    witness = peers(dynsec_mosquitto, ident, ident, witness_key)
    assert await witness.connect() == 0
    assert await witness.subscribe(reply) == 1
    assert await witness.publish(f"{s.root}/{node}/register", REGISTER) == 0
    await eventually(lambda: witness.received(reply))
    resumed = await resumed_without_session(s, peers, dynsec_mosquitto, node, protocol=protocol)
    # What the old session held is gone: a fresh reply arrives, the queued one never does.
    assert await resumed.subscribe(reply) == 1
    assert await witness.publish(f"{s.root}/{node}/register", REGISTER) == 0
    await eventually(lambda: len(witness.received(reply)) == 2)
    await eventually(lambda: resumed.received(reply))
    assert resumed.received(reply) == witness.received(reply)[1:]
    await s.assert_a_untouched(before)


async def test_revoked_keys_session_is_discarded_and_its_client_is_gone(
        attacked: Scene, peers: Peers, dynsec_mosquitto: Mosquitto) -> None:
    s, before = attacked, attacked.a_node()
    assert s.service.dynsec is not None
    cred, key = await s.service.auth.create_key("write", actor="test")
    await settled(s.service)
    ident = f"_key.{cred.id}"
    holder = peers(dynsec_mosquitto, ident, ident, key)
    assert await holder.connect(clean=False, session_expiry=3600) == 0
    assert await holder.subscribe(f"{s.root}/+/reply") == 1
    holder.close()
    logged = len(dynsec_mosquitto.log.read_text())
    await s.service.auth.revoke_key(cred.id, actor="test")
    await settled(s.service)
    again = peers(dynsec_mosquitto, ident, ident, key)
    assert await again.connect(clean=False, session_expiry=3600) == NOT_AUTHORIZED
    names = {c["username"] for c in await s.service.dynsec.admin.list_clients()}
    assert ident not in names
    with pytest.raises(DynsecError, match="Client not found"):
        await s.service.dynsec.admin.get_client(ident)
    # The mirror logged in once as that client id with a clean session (c1), which is what
    # makes Mosquitto drop the old one, before it deleted the client.
    log = dynsec_mosquitto.log.read_text()[logged:]
    assert f"as {ident} (p2, c1," in log  # p2: MQTT 3.1.1 in its log
    assert log.index(f"as {ident} (p2, c1,") < log.index(f"deleteClient | username={ident}")
    assert not again.messages
    await s.assert_a_untouched(before)


async def resumed_without_session(s: Scene, peers: Peers, broker: Mosquitto, node: str,
                                  token: str | None = None,
                                  protocol: MQTTProtocolVersion = V5) -> Peer:
    """``node`` logs in again (with ``token``, else a credential issued now) asking for its
    persistent session, and finds none: what the revoked credential's session held is gone."""
    if token is None:
        _, token = await s.service.auth.issue_credential(node, actor="test")
    await settled(s.service)
    resumed = peers(broker, node, node, token, protocol=protocol)
    assert await resumed.connect(clean=False, session_expiry=3600) == 0
    assert resumed.session_present is False
    return resumed


async def persistent_holder(s: Scene, peers: Peers, broker: Mosquitto,
                            node: str) -> None:
    """``node`` gets a credential, and a persistent session subscribed to its reply topic
    that the broker is seen to keep."""
    _, token = await s.service.auth.issue_credential(node, actor="test")
    await settled(s.service)
    holder = peers(broker, node, node, token)
    assert await holder.connect(clean=False, session_expiry=3600) == 0
    assert await holder.subscribe(f"{s.root}/{node}/reply") == 1
    holder.close()
    back = peers(broker, node, node, token)
    assert await back.connect(clean=False, session_expiry=3600) == 0
    assert back.session_present
    back.close()


async def test_revocation_followed_at_once_by_a_new_credential_still_discards_the_session(
        attacked: Scene, peers: Peers, dynsec_mosquitto: Mosquitto) -> None:
    s, mirror = attacked, attacked.service.dynsec
    assert mirror is not None
    node = f"quick-{s.root}"
    await persistent_holder(s, peers, dynsec_mosquitto, node)
    # The mirror is busy with another command while the node is revoked and re-issued: the
    # removal and the new credential's put wait in the outbox together.
    async with mirror.admin._lock:
        await s.service.auth.create_key("read", actor="test")
        await eventually(lambda: mirror.admin._lock._waiters)  # the mirror waits for it
        await s.service.auth.revoke_credentials(node, actor="test")
        _, new_token = await s.service.auth.issue_credential(node, actor="test")
    await resumed_without_session(s, peers, dynsec_mosquitto, node, new_token)


async def test_a_session_that_could_not_be_discarded_is_discarded_on_a_later_try(
        attacked: Scene, peers: Peers, dynsec_mosquitto: Mosquitto,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from fleetmq.mqtt import dynsec_outbox
    from tests.support import free_port

    s, mirror = attacked, attacked.service.dynsec
    assert mirror is not None
    monkeypatch.setattr(dynsec_outbox, "SESSION_RETRY_S", 0.5)
    node = f"retry-{s.root}"
    await persistent_holder(s, peers, dynsec_mosquitto, node)
    broker = mirror._broker
    mirror._broker = replace(broker, port=free_port())  # the clean-session login fails
    await s.service.auth.revoke_credentials(node, actor="test")

    async def removed_and_retry_waiting() -> bool:
        names = {c["username"] for c in await mirror.admin.list_clients()}
        rows = await s.service.auth.store.outbox(10)
        return node not in names and [(r.action, r.identity) for r in rows] == [
            ("remove", node)] and rows[0].not_before is not None
    await eventually(removed_and_retry_waiting, timeout=10)  # the removal was not held up
    mirror._broker = broker
    await settled(s.service)
    await resumed_without_session(s, peers, dynsec_mosquitto, node)


async def test_a_waiting_session_retry_does_not_delay_the_next_revocations_kick(
        attacked: Scene, peers: Peers, dynsec_mosquitto: Mosquitto) -> None:
    from tests.support import free_port

    s, mirror = attacked, attacked.service.dynsec
    assert mirror is not None
    node = f"again-{s.root}"
    await persistent_holder(s, peers, dynsec_mosquitto, node)
    broker = mirror._broker
    mirror._broker = replace(broker, port=free_port())  # the clean-session login fails
    await s.service.auth.revoke_credentials(node, actor="test")

    async def retry_waiting() -> bool:
        rows = await s.service.auth.store.outbox(10)
        return [(r.action, r.identity) for r in rows] == [("remove", node)] and \
            rows[0].not_before is not None
    await eventually(retry_waiting, timeout=10)
    mirror._broker = broker
    _, token = await s.service.auth.issue_credential(node, actor="test")

    async def logs_in() -> Peer | None:
        peer = peers(dynsec_mosquitto, node, node, token)
        return peer if await peer.connect() == 0 else None
    live = await eventually(logs_in, timeout=5)
    assert not live.disconnected.is_set()
    started = time.monotonic()
    await s.service.auth.revoke_credentials(node, actor="test")
    await eventually(live.disconnected.is_set, timeout=1.0, interval=0.01)
    assert time.monotonic() - started < 1.0


async def test_a_revocation_during_another_identitys_slow_session_discard_is_kicked_at_once(
        attacked: Scene, peers: Peers, dynsec_mosquitto: Mosquitto,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from fleetmq.mqtt import dynsec_outbox

    s, before, mirror = attacked, attacked.a_node(), attacked.service.dynsec
    assert mirror is not None
    monkeypatch.setattr(dynsec_outbox, "SESSION_RETRY_S", 0.5)
    slow = f"slow-{s.root}"
    await persistent_holder(s, peers, dynsec_mosquitto, slow)
    broker = mirror._broker
    with socket.socket() as silent:  # accepts TCP, never answers a CONNECT
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        mirror._broker = replace(broker, port=silent.getsockname()[1])
        await s.service.auth.revoke_credentials(slow, actor="test")

        async def discarding() -> bool:
            return f"enableClient | username={slow}" in dynsec_mosquitto.log.read_text()
        await eventually(discarding)  # the mirror now waits for a CONNACK that never comes
        started = time.monotonic()
        await s.service.auth.revoke_credentials(s.b_id, actor="test")
        await eventually(s.b.disconnected.is_set, timeout=1.0, interval=0.01)
        assert time.monotonic() - started < 1.0
        mirror._broker = broker
    await settled(s.service)  # the slow one's session is discarded on its retry
    await resumed_without_session(s, peers, dynsec_mosquitto, slow)
    await s.assert_a_untouched(before)


async def test_rotation_without_grace_keeps_the_nodes_persistent_session(
        attacked: Scene, peers: Peers, dynsec_mosquitto: Mosquitto) -> None:
    """A rotation's new token is the same identity: its session may resume (only a
    revocation that leaves the node without a valid token discards it)."""
    s = attacked
    node = f"rot-{s.root}"
    _, token = await s.service.auth.issue_credential(node, actor="test")
    await settled(s.service)
    holder = peers(dynsec_mosquitto, node, node, token)
    assert await holder.connect(clean=False, session_expiry=3600) == 0
    assert await holder.subscribe(f"{s.root}/{node}/reply") == 1
    _, new_token = await s.service.auth.issue_credential(node, actor="test")
    await settled(s.service)
    await eventually(holder.disconnected.is_set, timeout=2)  # the old password's session
    again = peers(dynsec_mosquitto, node, node, new_token)
    assert await again.connect(clean=False, session_expiry=3600) == 0
    assert again.session_present


# --- rotation, the CLI, reconciliation, the outbox across restarts -------------------------

async def test_rotation_keeps_the_broker_password_until_first_use_or_grace_end(
        dynsec_mosquitto: Mosquitto, root: str, tmp_path: Path, peers: Peers) -> None:
    async with mirrored(dynsec_settings(dynsec_mosquitto, root, tmp_path)) as service:
        node = f"r-{root}"
        _, token1 = await service.auth.issue_credential(node, actor="test")
        await settled(service)
        a = peers(dynsec_mosquitto, node, node, token1)
        assert await a.connect() == 0
        _, token2 = await service.auth.issue_credential(node, grace_s=60, actor="test")
        await service.auth.refresh()
        # Within the grace the broker still holds the old password: the device keeps working.
        early = peers(dynsec_mosquitto, node, node, token2)
        assert await early.connect() == NOT_AUTHORIZED
        assert a.connected
        # The new token's first REST use switches the broker now, and kicks the old session.
        assert service.auth.verify(token2).principal is not None
        await eventually(a.disconnected.is_set, timeout=2)
        fresh = peers(dynsec_mosquitto, node, node, token2)
        assert await fresh.connect() == 0
        stale = peers(dynsec_mosquitto, node, node, token1)
        assert await stale.connect() == NOT_AUTHORIZED
        # A rotation whose grace simply runs out switches at its end.
        _, token3 = await service.auth.issue_credential(node, grace_s=1.0, actor="test")
        assert fresh.connected
        await eventually(fresh.disconnected.is_set, timeout=4)
        last = peers(dynsec_mosquitto, node, node, token3)
        assert await last.connect() == 0


async def test_credentials_made_by_the_cli_while_the_manager_runs_reach_the_broker(
        dynsec_mosquitto: Mosquitto, root: str, tmp_path: Path, peers: Peers) -> None:
    from fleetmq.auth.service import AuthService
    from fleetmq.config import parse_store
    from fleetmq.core.clock import SystemClock
    from fleetmq.store.auth_sqlite import SqliteAuthStore

    db = tmp_path / "fleet.db"
    settings = dynsec_settings(dynsec_mosquitto, root, tmp_path)
    async with mirrored(replace(settings, store=parse_store(f"sqlite:///{db}"))):
        cli = AuthService(SqliteAuthStore(str(db)), SystemClock())
        await cli.store.open()
        try:
            await cli.load()
            node = f"c-{root}"
            _, token = await cli.issue_credential(node, actor="cli")
            a = peers(dynsec_mosquitto, node, node, token)

            async def logs_in() -> bool:
                if await a.connect() == 0:
                    return True
                a.connack = None
                return False
            await eventually(logs_in, timeout=5)
            await cli.revoke_credentials(node, actor="cli")
            await eventually(a.disconnected.is_set, timeout=2)
        finally:
            await cli.store.close()


async def test_reconcile_after_broker_restart_with_an_edited_file(
        own_dynsec: Mosquitto, root: str, tmp_path: Path, peers: Peers) -> None:
    async with mirrored(dynsec_settings(own_dynsec, root, tmp_path)) as service:
        assert service.dynsec is not None
        lost, drifted = f"lost-{root}", f"drift-{root}"
        lost_cred, _ = await service.auth.issue_credential(lost, actor="test")
        _, drifted_token = await service.auth.issue_credential(drifted, actor="test")
        await settled(service)
        done = service.dynsec.reconciliations
        own_dynsec.stop()
        config = json.loads(own_dynsec.dynsec_file.read_text())
        clients = {c["username"]: c for c in config["clients"]}
        ghost = dict(clients[drifted], username=f"ghost-{root}", clientid=f"ghost-{root}")
        clients[drifted]["clientid"] = f"ghost-{root}"  # drift: B's client id no longer pinned
        del clients[lost]  # the plugin lost A
        config["clients"] = [*clients.values(), ghost]
        own_dynsec.dynsec_file.write_text(json.dumps(config))
        own_dynsec.start()
        await eventually(lambda: service.dynsec is not None
                         and service.dynsec.reconciliations > done, timeout=20)
        await eventually(lambda: service.ready, timeout=20)
        names = {c["username"] for c in await service.dynsec.admin.list_clients()}
        assert f"ghost-{root}" not in names  # unknown to fleetmq: deleted
        flagged = [c for c in service.auth.credentials() if c.id == lost_cred.id]
        assert flagged[0].needs_reissue
        entries = await service.auth.store.audit(50, None)
        assert any(e.action == "needs_reissue" and lost in e.subject for e in entries)
        admin = (tmp_path / "admin-token").read_text().strip()
        async with aiohttp.ClientSession() as http, http.get(
                f"http://127.0.0.1:{service.http_port}/api/v1/fleet/nodes/{lost}/credentials",
                headers={"Authorization": f"Bearer {admin}"}) as resp:
            shown = (await resp.json())["credentials"]
        assert [c["needs_reissue"] for c in shown] == [True]  # the operator sees it
        fixed = peers(own_dynsec, drifted, drifted, drifted_token)
        assert await fixed.connect() == 0  # its client id pinned again
        thief = peers(own_dynsec, f"ghost-{root}", drifted, drifted_token)
        assert await thief.connect() == NOT_AUTHORIZED


async def test_reconcile_after_manager_restart_deletes_clients_it_does_not_know(
        dynsec_mosquitto: Mosquitto, root: str, tmp_path: Path, peers: Peers) -> None:
    settings = dynsec_settings(dynsec_mosquitto, root, tmp_path)  # memory store: forgets all
    node = f"m-{root}"
    async with mirrored(settings) as service:
        _, token = await service.auth.issue_credential(node, actor="test")
        await settled(service)
        a = peers(dynsec_mosquitto, node, node, token)
        assert await a.connect() == 0
    async with mirrored(settings) as service:
        assert service.dynsec is not None
        names = {c["username"] for c in await service.dynsec.admin.list_clients()}
        assert node not in names
        await eventually(a.disconnected.is_set, timeout=2)
        again = peers(dynsec_mosquitto, node, node, token)
        assert await again.connect() == NOT_AUTHORIZED


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
async def test_outbox_survives_a_manager_restart_and_sends_revocations_first(
        own_dynsec: Mosquitto, root: str, tmp_path: Path, peers: Peers, backend: str,
        request: pytest.FixtureRequest) -> None:
    from fleetmq.config import parse_store

    url = (f"sqlite:///{tmp_path / 'fleet.db'}" if backend == "sqlite"
           else request.getfixturevalue("postgres_store_url"))
    settings = replace(dynsec_settings(own_dynsec, root, tmp_path), store=parse_store(url))
    revoked, added = f"old-{root}", f"new-{root}"
    async with mirrored(settings) as service:
        _, old_token = await service.auth.issue_credential(revoked, actor="test")
        await settled(service)
        own_dynsec.stop()
        await eventually(lambda: not service.ready)
        await service.auth.revoke_credentials(revoked, actor="test")
        _, new_token = await service.auth.issue_credential(added, actor="test")
        pending = await service.auth.store.outbox(10)
        assert [(r.action, r.identity) for r in pending] == [("remove", revoked),
                                                             ("put", added)]
    own_dynsec.start()
    async with mirrored(settings) as service:
        await settled(service)
        assert await peers(own_dynsec, added, added, new_token).connect() == 0
        assert await peers(own_dynsec, revoked, revoked, old_token).connect() == NOT_AUTHORIZED
    log = own_dynsec.log.read_text()
    assert log.index(f"deleteClient | username={revoked}") < log.index(
        f"createClient | username={added}")


async def test_dynsec_with_the_embedded_broker_refuses_to_start(root: str,
                                                                  tmp_path: Path) -> None:
    from fleetmq.auth.startup import AuthSetupError
    from fleetmq.config import AuthSettings, parse_broker
    from tests.conftest import make_settings
    from tests.support import free_port

    settings = make_settings(
        f"embedded://127.0.0.1:{free_port()}", root,
        auth=AuthSettings(mode="on", admin_token_file=str(tmp_path / "admin-token"),
                          broker_auth="dynsec",
                          broker_admin=parse_broker("mqtt://admin:pw@127.0.0.1:1")))
    with pytest.raises(AuthSetupError, match="--broker-auth dynsec"):
        async with FleetService(settings):
            pass


async def test_a_broker_that_lost_its_whole_file_is_repaired_and_lost_nodes_flagged(
        own_dynsec: Mosquitto, root: str, tmp_path: Path, peers: Peers) -> None:
    async with mirrored(dynsec_settings(own_dynsec, root, tmp_path)) as service:
        assert service.dynsec is not None
        node = f"gone-{root}"
        await service.auth.issue_credential(node, actor="test")
        await settled(service)
        done = service.dynsec.reconciliations
        own_dynsec.stop()
        own_dynsec.init_dynsec()  # a fresh file: only the plugin's admin is left
        own_dynsec.start()
        # The manager's own clients come back (fresh logins through the admin) ...
        await eventually(lambda: service.dynsec is not None
                         and service.dynsec.reconciliations > done, timeout=20)
        await eventually(lambda: service.ready, timeout=40)
        # ... the node is flagged: fleetmq holds no token to re-create it ...
        [cred] = service.auth.node_credentials(node)
        assert cred.needs_reissue
        # ... and a new credential brings it back.
        _, token = await service.auth.issue_credential(node, actor="test")
        await settled(service)
        assert await peers(own_dynsec, node, node, token).connect() == 0
        assert not service.auth.node_credentials(node)[0].needs_reissue


async def test_a_flooding_node_is_disabled_for_a_minute_and_others_are_untouched(
        attacked: Scene, peers: Peers, dynsec_mosquitto: Mosquitto) -> None:
    s, before = attacked, attacked.a_node()
    heartbeat = f"{s.root}/{s.b_id}/heartbeat"
    started = time.monotonic()
    while not s.b.disconnected.is_set() and time.monotonic() - started < 20:
        await s.b.publish(heartbeat, b"{}")  # 100 a second: 20 x the default rate
        await asyncio.sleep(0.01)
    assert s.b.disconnected.is_set(), "the flooding node was not cut off within 20 s"
    cut_at = time.time()
    again = peers(dynsec_mosquitto, s.b_id, s.b_id, s.b_token)
    assert await again.connect() == NOT_AUTHORIZED  # its own valid token, disabled
    # Let back in a minute later, through the durable outbox (a restart keeps the promise).
    pending = [r for r in await s.service.auth.store.outbox(100)
               if r.identity == s.b_id and r.action == "enable"]
    assert len(pending) == 1
    assert pending[0].not_before is not None
    assert 55 <= pending[0].not_before - cut_at <= 61
    await s.assert_a_untouched(before)
    # When the minute is up (here: an enable row due now), B logs in again.
    assert s.service.dynsec is not None
    await s.service.auth.store.outbox_add([OutboxRow(s.b_id, "enable", created_at=cut_at)])
    s.service.dynsec.request_reconcile()

    async def back() -> bool:
        return await peers(dynsec_mosquitto, s.b_id, s.b_id, s.b_token).connect() == 0
    await eventually(back, timeout=10)
