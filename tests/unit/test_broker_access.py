"""Login and topic decisions of the embedded broker over a real AuthService (memory store,
fake clock): no sockets."""

from __future__ import annotations

import pytest

from fleetmq.auth.rules import TopicRules
from fleetmq.auth.service import AuthService
from fleetmq.auth.store import MemoryAuthStore
from fleetmq.broker.access import (
    BAD_USERNAME_OR_PASSWORD,
    MANAGER_USERNAME,
    NOT_AUTHORISED,
    Admitted,
    BrokerAccess,
    Login,
    Refused,
    origin_allowed_without_auth,
)
from fleetmq.core.clock import FakeClock

SECRET = "s" * 43


@pytest.fixture
async def setup() -> tuple[BrokerAccess, AuthService, FakeClock]:
    clock = FakeClock()
    auth = AuthService(MemoryAuthStore(), clock)
    await auth.load()
    return BrokerAccess(auth, TopicRules("fleet"), SECRET, clock.monotonic), auth, clock


def login(client_id: str, username: str | None, password: str | None,
          will: str | None = None) -> Login:
    return Login("127.0.0.1", client_id, username, password, will)


async def test_a_node_logs_in_as_itself_only(setup: tuple[BrokerAccess, AuthService, FakeClock]
                                             ) -> None:
    access, auth, _ = setup
    _, token = await auth.issue_credential("node-a", actor="test")
    ok = access.check(login("node-a", "node-a", token, will="fleet/node-a/heartbeat"))
    assert isinstance(ok, Admitted)
    assert ok.owner == "node:node-a"
    assert access.check(login("node-a", "node-b", token)) == Refused("identity", NOT_AUTHORISED)
    assert access.check(login("node-b", "node-a", token)) == Refused("client_id", NOT_AUTHORISED)
    assert access.check(login("node-a", "node-a", token, will="fleet/node-b/heartbeat")) == \
        Refused("will", NOT_AUTHORISED)
    assert access.check(login("node-a", "node-a", token, will="fleet/node-a/status")) == \
        Refused("will", NOT_AUTHORISED)
    assert access.counters.logins_accepted == 1
    assert sum(access.counters.logins_refused.values()) == 4


async def test_keys_log_in_under_their_own_identity_with_a_broker_role(
        setup: tuple[BrokerAccess, AuthService, FakeClock]) -> None:
    access, auth, _ = setup
    cred, token = await auth.create_key("read", actor="test")
    identity = cred.broker_identity
    assert isinstance(access.check(login(identity, identity, token)), Admitted)
    assert access.check(login("node-a", identity, token)) == \
        Refused("client_id", NOT_AUTHORISED)
    broker_cred, broker_token = await auth.create_key("broker", actor="test")
    assert access.check(login(broker_cred.broker_identity, broker_cred.broker_identity,
                              broker_token)) == Refused("role", NOT_AUTHORISED)


async def test_the_manager_logs_in_with_the_process_secret_only(
        setup: tuple[BrokerAccess, AuthService, FakeClock]) -> None:
    access, auth, _ = setup
    ok = access.check(login("_fleetmq-fleet", MANAGER_USERNAME, SECRET))
    assert isinstance(ok, Admitted)
    assert ok.credential_id is None
    assert access.still_valid(ok)
    assert access.check(login("_fleetmq-fleet", MANAGER_USERNAME, SECRET[:-1] + "x")) == \
        Refused("manager", BAD_USERNAME_OR_PASSWORD)
    assert access.check(login("_fleetmq-fleet", "_fleetmq-fleet", SECRET)) == \
        Refused("manager", BAD_USERNAME_OR_PASSWORD)
    assert access.check(login("node-a", MANAGER_USERNAME, SECRET)) == \
        Refused("client_id", NOT_AUTHORISED)
    _, key = await auth.create_key("admin", actor="test")
    assert access.check(login("_fleetmq-fleet", MANAGER_USERNAME, key)) == \
        Refused("manager", BAD_USERNAME_OR_PASSWORD)


@pytest.mark.parametrize(("password", "reason"), [
    (None, "missing"), ("", "missing"), ("fmq_node_short", "malformed"),
    ("fmq_node_" + "A" * 43, "unknown"), ("x" * 10_240, "malformed")])
async def test_bad_passwords_are_refused_by_reason(
        setup: tuple[BrokerAccess, AuthService, FakeClock], password: str | None,
        reason: str) -> None:
    access, _, _ = setup
    assert access.check(login("node-a", "node-a", password)) == \
        Refused(reason, BAD_USERNAME_OR_PASSWORD)
    assert access.counters.logins_refused[reason] == 1


async def test_an_expired_or_revoked_credential_no_longer_logs_in_or_stays_valid(
        setup: tuple[BrokerAccess, AuthService, FakeClock]) -> None:
    access, auth, clock = setup
    _, token = await auth.issue_credential("node-a", actor="test", expires_in_s=10)
    ok = access.check(login("node-a", "node-a", token))
    assert isinstance(ok, Admitted)
    clock.advance(11)
    assert not access.still_valid(ok)
    assert access.check(login("node-a", "node-a", token)) == \
        Refused("expired", BAD_USERNAME_OR_PASSWORD)
    _, token = await auth.issue_credential("node-b", actor="test")
    ok = access.check(login("node-b", "node-b", token))
    assert isinstance(ok, Admitted)
    await auth.revoke_credentials("node-b", actor="test")
    assert not access.still_valid(ok)
    assert access.check(login("node-b", "node-b", token)) == \
        Refused("revoked", BAD_USERNAME_OR_PASSWORD)


async def test_publish_and_subscribe_refusals_are_counted(
        setup: tuple[BrokerAccess, AuthService, FakeClock]) -> None:
    access, auth, _ = setup
    _, token = await auth.issue_credential("node-a", actor="test")
    ok = access.check(login("node-a", "node-a", token))
    assert isinstance(ok, Admitted)
    assert access.may_publish(ok, "fleet/node-a/heartbeat")
    assert not access.may_publish(ok, "fleet/node-b/heartbeat")
    assert not access.may_publish(ok, "$SYS/x")
    assert access.may_subscribe(ok, "fleet/node-a/reply")
    assert not access.may_subscribe(ok, "$share/g/fleet/+/heartbeat")
    assert not access.may_subscribe(ok, "#")
    assert access.counters.publishes_refused == 2
    assert access.counters.subscriptions_refused == 2


async def test_a_cut_off_identity_is_refused_until_its_minute_is_over(
        setup: tuple[BrokerAccess, AuthService, FakeClock]) -> None:
    access, auth, clock = setup
    _, token = await auth.issue_credential("flooder", actor="t")
    access.cut_off("flooder", 60)
    assert access.check(login("flooder", "flooder", token)) == Refused("cut_off", NOT_AUTHORISED)
    clock.advance(59)
    assert isinstance(access.check(login("flooder", "flooder", token)), Refused)
    clock.advance(2)
    assert isinstance(access.check(login("flooder", "flooder", token)), Admitted)


async def test_the_broker_counts_what_each_node_itself_sent(
        setup: tuple[BrokerAccess, AuthService, FakeClock]) -> None:
    access, auth, clock = setup
    _, token = await auth.issue_credential("n1", actor="t")
    admitted = access.check(login("n1", "n1", token))
    assert isinstance(admitted, Admitted)
    for _ in range(30):
        assert access.may_publish(admitted, "fleet/n1/heartbeat")
    assert access.sent_recently("n1") == 30
    clock.advance(11)  # a new window: the last one still counts
    access.may_publish(admitted, "fleet/n1/heartbeat")
    assert access.sent_recently("n1") == 31
    clock.advance(25)
    assert access.sent_recently("n1") == 0
    assert access.sent_recently("n2") == 0


# --- auth off: which browser pages may use the WebSocket listener ------------------------------


@pytest.mark.parametrize("origin", [None, "http://localhost:5173", "http://127.0.0.1:8000",
                                    "https://127.0.0.2", "http://[::1]:3000",
                                    "http://dash.localhost:8080", "HTTP://LOCALHOST"])
def test_without_auth_pages_of_this_machine_and_non_browsers_may_use_websockets(
        origin: str | None) -> None:
    assert origin_allowed_without_auth(origin)


@pytest.mark.parametrize("origin", ["https://evil.example", "null", "", "http://10.0.0.5",
                                    "http://localhost.evil.example", "http://127.0.0.1.nip.io",
                                    "file://", "http://[::ffff:1.2.3.4]"])
def test_without_auth_pages_of_other_sites_may_not_use_websockets(origin: str) -> None:
    assert not origin_allowed_without_auth(origin)
