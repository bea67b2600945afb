"""The broker mirror's outbox in every auth store: written only while a mirror is active,
revocations first, superseded puts gone, tokens dropped when the mirror goes away."""

from __future__ import annotations

from pathlib import Path

import pytest

from fleetmq.auth.store import AuthStore, Credential, MemoryAuthStore, OutboxRow
from fleetmq.store.auth_sqlite import SqliteAuthStore


@pytest.fixture(params=["memory", "sqlite", "postgresql"])
async def store(request: pytest.FixtureRequest, tmp_path: Path):  # type: ignore[no-untyped-def]
    made: AuthStore
    if request.param == "memory":
        made = MemoryAuthStore()
    elif request.param == "sqlite":
        made = SqliteAuthStore(str(tmp_path / "auth.db"))
    else:
        from fleetmq.store.auth_postgres import PostgresAuthStore
        url = request.getfixturevalue("postgres_store_url")
        made = PostgresAuthStore(url, url)
    await made.open()
    yield made
    await made.close()


def put(identity: str, cred: str, not_before: float | None = None) -> OutboxRow:
    return OutboxRow(identity, "put", cred, f"token-{cred}", not_before, 1.0)


async def test_rows_are_dropped_while_no_mirror_is_active(store: AuthStore) -> None:
    await store.save([], [], outbox=[put("a", "c1")])
    assert await store.outbox(10) == []


async def test_revocations_come_first_and_a_newer_put_supersedes(store: AuthStore) -> None:
    await store.set_mirror(True)
    await store.save([Credential("c1", b"d1", 1.0, node_id="a")], [], outbox=[put("a", "c1")])
    await store.outbox_add([put("b", "c2"), put("a", "c3")])
    await store.outbox_add([OutboxRow("b", "remove", "c2", created_at=2.0)])
    await store.outbox_add([OutboxRow("b", "remove", "c2", created_at=3.0)])  # no twin
    rows = await store.outbox(10)
    assert [(r.action, r.identity, r.cred_id) for r in rows] == [("remove", "b", "c2"),
                                                                 ("put", "a", "c3")]
    assert rows[1].secret == "token-c3"
    await store.outbox_done([rows[0].id])
    assert [r.cred_id for r in await store.outbox(10)] == ["c3"]


async def test_a_deferred_removal_retry_does_not_swallow_a_new_removal(
        store: AuthStore) -> None:
    await store.set_mirror(True)
    await store.outbox_add([OutboxRow("b", "remove", None, not_before=99.0, created_at=1.0)])
    await store.outbox_add([OutboxRow("b", "remove", "c2", created_at=2.0)])  # due now
    await store.outbox_add([OutboxRow("b", "remove", "c3", created_at=3.0)])  # a twin: not
    rows = await store.outbox(10)
    assert [(r.cred_id, r.not_before) for r in rows] == [("c2", None), (None, 99.0)]


async def test_a_waiting_put_is_brought_forward(store: AuthStore) -> None:
    await store.set_mirror(True)
    await store.outbox_add([put("a", "c1", not_before=100.0)])
    assert await store.outbox_due(["c1"], 50.0) == 1
    assert (await store.outbox(1))[0].not_before == 50.0
    assert await store.outbox_due(["c1"], 60.0) == 0  # already due sooner


async def test_deactivating_the_mirror_drops_every_waiting_token(store: AuthStore) -> None:
    await store.set_mirror(True)
    await store.outbox_add([put("a", "c1")])
    await store.set_mirror(False)
    assert await store.outbox(10) == []


async def test_needs_reissue_round_trips(store: AuthStore) -> None:
    await store.save([Credential("c1", b"d1", 1.0, node_id="a", needs_reissue=True)], [])
    [cred] = (await store.changes(0)).credentials
    assert cred.needs_reissue is True
