"""The static Mosquitto export's text (contract section 8, "Static export"): which credentials
get a password line, and the ACL's rules."""

from __future__ import annotations

import pytest

from fleetmq.auth.export import MANAGER_USERS, mosquitto_files
from fleetmq.auth.passwords import mosquitto_hash
from fleetmq.auth.store import Credential

NOW = 1_000_000.0


def node(cred_id: str, node_id: str, created: float = NOW - 100, **kw: object) -> Credential:
    return Credential(id=cred_id, digest=b"d" * 32, created_at=created, node_id=node_id,
                      broker_hash=f"$7$101$salt{cred_id}$hash{cred_id}", **kw)  # type: ignore[arg-type]


def key(cred_id: str, role: str, **kw: object) -> Credential:
    return Credential(id=cred_id, digest=b"k" * 32, created_at=NOW - 100, role=role,
                      broker_hash=f"$7$101$salt{cred_id}$hash{cred_id}", **kw)  # type: ignore[arg-type]


def users(passwd: str) -> dict[str, str]:
    return dict(line.split(":", 1) for line in passwd.splitlines())


def rules(acl: str) -> list[str]:
    return [line for line in acl.splitlines() if line and not line.startswith("#")]


def test_each_valid_node_gets_one_line_with_its_newest_token_during_a_rotation() -> None:
    passwd, _ = mosquitto_files([
        node("old", "sensor-a", created=NOW - 50, revoked_at=NOW + 60),  # in its grace
        node("new", "sensor-a", created=NOW - 10),
        node("b", "sensor-b"),
    ], "fleet", now=NOW)
    assert users(passwd) == {"sensor-a": "$7$101$saltnew$hashnew",
                             "sensor-b": "$7$101$saltb$hashb"}


def test_revoked_expired_and_rightless_credentials_get_no_line() -> None:
    passwd, acl = mosquitto_files([
        node("r", "revoked-node", revoked_at=NOW - 1),
        node("e", "expired-node", expires_at=NOW),
        node("bad", "bad/id"),
        key("brk", "broker"),
        key("enr", "enroll"),
        key("old", "admin", revoked_at=NOW - 5),
    ], "fleet", now=NOW)
    assert passwd == ""
    for gone in ("_key.brk", "_key.enr", "_key.old"):
        assert gone not in acl


def test_node_rules_are_patterns_on_the_username_never_the_client_id() -> None:
    _, acl = mosquitto_files([node("a", "sensor-a")], "site/fleet", now=NOW)
    assert "%c" not in acl
    assert "use_username_as_clientid true" in acl  # stated for the operator
    patterns = [r for r in rules(acl) if r.startswith("pattern")]
    assert patterns == [
        "pattern write site/fleet/%u/register",
        "pattern write site/fleet/%u/heartbeat",
        "pattern read site/fleet/%u/reply",
        "pattern read site/fleet/%u/status",
        "pattern read site/fleet/_manager/status",
    ]


def _block(acl: str, user: str) -> list[str]:
    lines = rules(acl)
    start = lines.index(f"user {user}") + 1
    block = []
    for line in lines[start:]:
        if line.startswith("user "):
            break
        block.append(line)
    return block


def test_keys_get_a_user_block_by_role() -> None:
    passwd, acl = mosquitto_files([key("r1", "read"), key("w1", "write"), key("a1", "admin")],
                                  "fleet", now=NOW)
    assert set(users(passwd)) == {"_key.r1", "_key.w1", "_key.a1"}
    assert _block(acl, "_key.r1") == ["topic read fleet/+/status"]
    write = ["topic read fleet/+/status", "topic write fleet/+/register",
             "topic write fleet/+/heartbeat", "topic read fleet/+/reply"]
    assert _block(acl, "_key.w1") == write
    assert _block(acl, "_key.a1") == write


def test_manager_users_read_ingest_and_write_statuses_with_the_given_hash() -> None:
    manager_hash = mosquitto_hash("manager-password")
    passwd, acl = mosquitto_files([], "fleet", manager_hash=manager_hash, now=NOW)
    assert users(passwd) == dict.fromkeys(MANAGER_USERS, manager_hash)
    for user in MANAGER_USERS:
        assert _block(acl, user) == [
            "topic read fleet/+/register", "topic read fleet/+/heartbeat",
            "topic readwrite fleet/+/status", "topic write fleet/+/reply",
            "topic readwrite fleet/_manager/sync"]
    # Without a hash the rights are there, the login is the operator's to add.
    passwd, acl = mosquitto_files([], "fleet", now=NOW)
    assert passwd == ""
    assert f"user {MANAGER_USERS[0]}" in acl


def test_a_credential_without_a_broker_hash_is_left_out_and_named() -> None:
    bare = Credential(id="x", digest=b"d" * 32, created_at=NOW, node_id="legacy-node")
    passwd, acl = mosquitto_files([bare], "fleet", now=NOW)
    assert passwd == ""
    left_out = next(line for line in acl.splitlines() if "Left out" in line)
    assert "legacy-node" in left_out


def test_a_key_name_cannot_inject_acl_rules() -> None:
    _, acl = mosquitto_files([key("r1", "read", name="x\ntopic readwrite #\nuser y")],
                             "fleet", now=NOW)
    assert "topic readwrite #" not in rules(acl)
    assert "user y" not in rules(acl)


@pytest.mark.parametrize("bad_root", ["", "fleet/#", "$SYS", "a//b"])
def test_an_invalid_root_is_refused(bad_root: str) -> None:
    with pytest.raises(ValueError, match="invalid topic root"):
        mosquitto_files([], bad_root)


def test_a_manager_hash_that_would_break_the_file_is_refused() -> None:
    with pytest.raises(ValueError, match="one line"):
        mosquitto_files([], "fleet", manager_hash="abc\n_fleetmq:other")
