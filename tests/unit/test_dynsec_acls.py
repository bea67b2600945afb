"""The dynsec roles fleetmq writes, and how reconciliation reads a broker's listing (pure)."""

from __future__ import annotations

from fleetmq.auth.dynsec_acls import (
    Wanted,
    acl_set,
    drift,
    key_acls,
    manager_acls,
    marker,
    node_acls,
    role_name,
)


def topics(acls: list[dict[str, object]], acltype: str) -> set[str]:
    return {str(a["topic"]) for a in acls if a["acltype"] == acltype and a["allow"]}


def test_a_node_publishes_only_its_own_ingest_topics_and_reads_only_its_own():
    acls = node_acls("fleet", "n1")
    assert topics(acls, "publishClientSend") == {"fleet/n1/register", "fleet/n1/heartbeat"}
    reads = {"fleet/n1/reply", "fleet/n1/status", "fleet/_manager/status"}
    assert topics(acls, "subscribeLiteral") == reads
    assert topics(acls, "publishClientReceive") == reads
    assert not topics(acls, "subscribePattern")  # no filter can widen a literal


def test_read_keys_read_statuses_and_write_keys_add_ingest_and_replies():
    read = key_acls("fleet", "read")
    assert topics(read, "subscribePattern") == {"fleet/+/status"}
    assert not topics(read, "publishClientSend")
    for role in ("write", "admin"):
        acls = key_acls("fleet", role)
        assert topics(acls, "publishClientSend") == {"fleet/+/register", "fleet/+/heartbeat"}
        assert topics(acls, "subscribePattern") == {"fleet/+/status", "fleet/+/reply"}
        assert topics(acls, "publishClientReceive") == {"fleet/+/status", "fleet/+/reply"}


def test_the_manager_writes_and_reads_nothing_outside_its_root():
    acls = manager_acls("fleet")
    assert all(str(a["topic"]).startswith("fleet/") for a in acls)
    assert topics(acls, "publishClientSend") == {"fleet/+/status", "fleet/+/reply",
                                                  "fleet/_manager/#"}
    assert "fleet/+/heartbeat" in topics(acls, "subscribePattern")


def listed(username: str, root: str = "fleet", **over: object) -> dict[str, object]:
    client: dict[str, object] = {"username": username, "clientid": username,
                                 "textname": marker(root),
                                 "roles": [{"rolename": role_name(root, username)}],
                                 "groups": []}
    return {**client, **over}


def role(identity: str, root: str = "fleet") -> dict[str, object]:
    return {"rolename": role_name(root, identity), "textname": marker(root),
            "acls": node_acls(root, identity)}


def test_drift_deletes_only_unknown_clients_of_its_own_root():
    wanted = {"a": Wanted("a", node_acls("fleet", "a"))}
    clients = [listed("a"), listed("ghost"), listed("other", root="elsewhere"),
               {"username": "admin", "roles": [{"rolename": "admin"}]}]
    found = drift("fleet", wanted, set(), clients, [role("a"), role("ghost")])
    assert found.delete_clients == ["ghost"]
    assert found.delete_roles == [role_name("fleet", "ghost")]
    assert not found.lost
    assert not found.fix_clients
    assert not found.fix_roles


def test_drift_reports_lost_identities_unless_a_put_is_pending():
    wanted = {n: Wanted(n, node_acls("fleet", n)) for n in ("a", "b")}
    found = drift("fleet", wanted, {"b"}, [], [])
    assert found.lost == ["a"]


def test_drift_fixes_unpinned_client_ids_extra_groups_and_edited_acls():
    wanted = {n: Wanted(n, node_acls("fleet", n)) for n in ("a", "b", "c")}
    edited = role("c")
    edited["acls"] = [{"acltype": "subscribePattern", "topic": "#", "allow": True}]
    clients = [listed("a", clientid=None), listed("b", groups=[{"groupname": "x"}]),
               listed("c")]
    found = drift("fleet", wanted, set(), clients, [role("a"), role("b"), edited])
    assert sorted(found.fix_clients) == ["a", "b"]
    assert [w.identity for w in found.fix_roles] == ["c"]


def test_acls_compare_without_priorities_or_case():
    assert acl_set([{"acltype": "publishClientSend", "topic": "t", "allow": True,
                     "priority": 3}]) == acl_set([{"acltype": "publishclientsend",
                                                    "topic": "t", "allow": True}])


def test_a_cleartext_admin_url_to_another_host_is_refused_at_start():
    import pytest

    from fleetmq.auth.startup import AuthSetupError
    from fleetmq.config import parse_broker
    from fleetmq.mqtt.dynsec import check_admin_url

    for url in ("mqtt://admin:pw@192.0.2.1:1883", "mqtt://127.0.0.1:1883"):
        with pytest.raises(AuthSetupError):
            check_admin_url(parse_broker(url))
    with pytest.raises(AuthSetupError):
        check_admin_url(None)
    assert check_admin_url(parse_broker("mqtts://admin:pw@192.0.2.1:8883")).scheme == "mqtts"
    assert check_admin_url(parse_broker("mqtt://admin:pw@127.0.0.1:1883")).username == "admin"
