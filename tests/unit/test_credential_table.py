"""The packed credential table: found by id, digest and node, replaced by id, a last use only
moving forward, and the same answers as a plain dict of records for any sequence of puts."""

from __future__ import annotations

import hashlib
from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st

from fleetmq.auth.store import Credential
from fleetmq.auth.table import CredentialTable
from fleetmq.auth.tokens import new_key_id


def _node_cred(node_id: str, n: int, **fields: object) -> Credential:
    return Credential(id=f"{n:012x}", digest=hashlib.sha256(f"t{n}".encode()).digest(),
                      created_at=1000.0 + n, node_id=node_id, seq=n, **fields)  # type: ignore[arg-type]


def test_a_put_credential_is_found_by_id_digest_and_node() -> None:
    table = CredentialTable()
    cred = _node_cred("node-1", 1)
    row = table.put(cred)
    assert table.get(cred.id) == cred
    assert table.row_of_digest(cred.digest) == row
    assert table.node("node-1") == [cred]
    assert table.get("ffffffffffff") is None
    assert table.row_of_digest(hashlib.sha256(b"other").digest()) is None
    assert table.node("node-2") == []


def test_a_nodes_credentials_share_the_node_id_string_first_put() -> None:
    table = CredentialTable()
    held = "".join(["node-", "1"])
    table.put(_node_cred(held, 1))
    table.put(_node_cred("".join(["node-", "1"]), 2))
    assert table.node_id_held("node-1") is held
    assert all(c.node_id is held for c in table.node("node-1"))
    assert table.node_id_held("node-2") is None


def test_every_field_comes_back_as_it_went_in() -> None:
    table = CredentialTable()
    key = Credential(id="abc", digest=b"short", created_at=5.0, role="enroll", name="line 3",
                     expires_at=99.0, revoked_at=50.0, last_used_at=7.0, uses=2, max_uses=10,
                     id_pattern="esp32-*", node_type="sensor", allow_registered=True,
                     broker_hash="$7$hash", needs_reissue=True, seq=4)
    enrolled = _node_cred("esp32-a", 2, enrolled_by="abc")
    table.put(key)
    table.put(enrolled)
    assert table.get("abc") == key
    assert table.get("abc").last_used_at == 7.0  # type: ignore[union-attr]
    assert table.get(enrolled.id) == enrolled
    assert sorted(c.id for c in table.unusual()) == sorted([key.id, enrolled.id])


def test_a_rotation_keeps_both_records_of_the_node_and_a_revocation_replaces_by_id() -> None:
    table = CredentialTable()
    old = _node_cred("node-1", 1)
    new = _node_cred("node-1", 2)
    table.put(old)
    table.put(new)
    graced = old.revoked(1300.0)
    table.put(replace(graced, seq=3))
    assert table.node("node-1") == [replace(graced, seq=3), new]
    assert table.get(old.id).revoked_at == 1300.0  # type: ignore[union-attr]
    assert len(table) == 2


def test_a_last_use_only_moves_forward() -> None:
    table = CredentialTable()
    cred = _node_cred("node-1", 1)
    row = table.put(cred)
    assert table.last_used_at(row) is None
    table.note_use(row, 20.0)
    table.note_use(row, 10.0)
    assert table.last_used_at(row) == 20.0
    table.put(replace(cred, last_used_at=15.0, seq=2))  # an older use saved with a change
    assert table.get(cred.id).last_used_at == 20.0  # type: ignore[union-attr]
    table.put(replace(cred, last_used_at=30.0, seq=3))
    assert table.get(cred.id).last_used_at == 30.0  # type: ignore[union-attr]


def test_since_gives_the_credentials_written_after_a_sequence_number() -> None:
    table = CredentialTable()
    for n in range(1, 6):
        table.put(_node_cred(f"node-{n}", n))
    assert [c.seq for c in table.since(3)] == [4, 5]
    assert len(table.since(0)) == 5


def test_many_rows_grow_every_index_and_stay_found() -> None:
    table = CredentialTable()
    creds = [_node_cred(f"node-{n % 5000}", n) for n in range(20_000)]
    for n, c in enumerate(creds):
        table.put(c)
        earlier = creds[n // 2]  # found while a grown index's entries move over too
        assert table.get(earlier.id) == earlier
        assert table.row_of_digest(c.digest) == n
    assert len(table) == 20_000
    for c in creds[::97]:
        assert table.get(c.id) == c
        row = table.row_of_digest(c.digest)
        assert row is not None
        assert table.record(row) == c
    assert [c.seq for c in table.node("node-7")] == [7, 5007, 10007, 15007]


def test_a_changed_digest_or_node_is_found_by_the_new_one_only() -> None:
    table = CredentialTable()
    cred = _node_cred("node-1", 1)
    table.put(cred)
    moved = replace(cred, digest=hashlib.sha256(b"x").digest(), node_id="node-2", seq=2)
    table.put(moved)
    for n in range(2, 40):  # growths re-index the row by its current keys
        table.put(_node_cred("node-x", n))
    assert table.row_of_digest(cred.digest) is None
    assert table.get(cred.id) == moved
    assert table.node("node-1") == []
    assert table.node("node-2") == [moved]


_ids = st.sampled_from([new_key_id() for _ in range(6)] + ["k1", "admin"])
_puts = st.lists(st.tuples(
    _ids, st.sampled_from([b"a" * 32, b"b" * 32, b"c" * 32, b"short"]),
    st.sampled_from(["n1", "n2", None]), st.none() | st.floats(0, 100),
    st.none() | st.floats(0, 100), st.none() | st.sampled_from(["admin", "read"]),
    st.integers(0, 50)), max_size=40)


@settings(max_examples=200, deadline=None)
@given(_puts)
def test_the_table_answers_as_a_dict_of_records_does(puts: list[tuple[
        str, bytes, str | None, float | None, float | None, str | None, int]]) -> None:
    table = CredentialTable()
    model: dict[str, Credential] = {}
    for cred_id, dig, node_id, revoked_at, used_at, role, seq in puts:
        cred = Credential(id=cred_id, digest=dig, created_at=1.0, node_id=node_id,
                          role=role, revoked_at=revoked_at, last_used_at=used_at, seq=seq)
        held = model.get(cred_id)
        uses = [t for t in (used_at, held.last_used_at if held else None) if t is not None]
        model[cred_id] = replace(cred, last_used_at=max(uses) if uses else None)
        table.put(cred)
    assert len(table) == len(model)
    for cred_id, cred in model.items():
        got = table.get(cred_id)
        assert got == cred
        assert got is not None
        assert got.last_used_at == cred.last_used_at
    for node_id in ("n1", "n2"):
        assert sorted(c.id for c in table.node(node_id)) == sorted(
            c.id for c in model.values() if c.node_id == node_id)
    for dig in (b"a" * 32, b"b" * 32, b"c" * 32, b"short"):
        holders = {c.id for c in model.values() if c.digest == dig}
        row = table.row_of_digest(dig)
        assert (row is None) == (not holders)
        assert row is None or table.id_of(row) in holders
    assert sorted(c.id for c in table.unusual()) == sorted(
        c.id for c in model.values() if c.role is not None)
