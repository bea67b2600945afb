"""One contract for the access-control tables of every store (memory, SQLite, PostgreSQL), and
the ``AuthService`` on top of them: what a manager and the CLI see when both write.

Stores are built the way the manager and the CLI build them: ``make_auth_store(parse_store())``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path

import pytest

from fleetmq.auth.service import AuthError, AuthService
from fleetmq.auth.store import (
    AuditEntry,
    AuthChanges,
    AuthStore,
    Credential,
    LastAdminError,
    MemoryAuthStore,
)
from fleetmq.auth.tokens import digest
from fleetmq.auth.verifier import POLL_S
from fleetmq.config import parse_store
from fleetmq.core.clock import FakeClock
from fleetmq.store import make_auth_store
from tests.conftest import eventually


@pytest.fixture(params=["memory", "sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'fleet.db'}"
    if request.param == "postgresql":
        url: str = request.getfixturevalue("postgres_store_url")
        return url
    return "memory://"


@asynccontextmanager
async def opened(url: str) -> AsyncIterator[AuthStore]:
    store = make_auth_store(parse_store(url))
    await store.open()
    try:
        yield store
    finally:
        await store.close()


def credential(cred_id: str, **fields: object) -> Credential:
    return Credential(id=cred_id, digest=digest(cred_id), created_at=100.0,  # type: ignore[arg-type]
                      **fields)


@asynccontextmanager
async def loaded_auth(clock: FakeClock, poll_s: float = POLL_S) -> AsyncIterator[AuthService]:
    """An AuthService on a fresh memory store, its credentials loaded."""
    async with opened("memory://") as store:
        auth = AuthService(store, clock, poll_s=poll_s)
        await auth.load()
        yield auth


async def test_changes_are_read_back_by_sequence_number(store_url: str) -> None:
    async with opened(store_url) as store:
        first = await store.changes(0)
        assert (first.seq, first.required, first.credentials) == (0, False, [])
        key = credential("k1", role="admin", name="ops", expires_at=500.0, max_uses=3,
                         id_pattern="dev-*", node_type="picclaw", allow_registered=True,
                         broker_hash="$7$101$x$y")
        seq1 = await store.save([key], [AuditEntry(100.0, "key_created", "cli", None, "k1")],
                                require=True)
        node = credential("n1", node_id="node-1", enrolled_by="k1")
        seq2 = await store.save([node], [])
        assert seq2 == seq1 + 1
        everything = await store.changes(0)
        assert everything.required is True
        assert {c.id: c.seq for c in everything.credentials} == {"k1": seq1, "n1": seq2}
        [read_key] = [c for c in everything.credentials if c.id == "k1"]
        assert read_key == replace(key, seq=seq1)  # every field as written
        newer = await store.changes(seq1)
        assert [c.id for c in newer.credentials] == ["n1"]
        assert await store.seq() == seq2


async def test_the_last_valid_admin_key_cannot_be_revoked(store_url: str) -> None:
    async with opened(store_url) as store:
        admin = credential("a1", role="admin")
        await store.save([admin, credential("r1", role="read")], [], require=True)
        with pytest.raises(LastAdminError):
            await store.save([admin.revoked(200.0)], [AuditEntry(200.0, "x", "cli", None, "a1")],
                             keep_admin_at=200.0)
        unchanged = await store.changes(0)
        assert [c.revoked_at for c in unchanged.credentials if c.id == "a1"] == [None]
        assert await store.audit(10, None) == []  # the refused change wrote nothing
        await store.save([credential("a2", role="admin")], [])
        await store.save([admin.revoked(200.0)], [], keep_admin_at=200.0)


async def test_audit_is_newest_first_pages_and_prunes(store_url: str) -> None:
    async with opened(store_url) as store:
        await store.save([], [AuditEntry(float(t), f"a{t}", "cli", "10.0.0.1", "s")
                              for t in range(1, 6)])
        page = await store.audit(2, None)
        assert [e.action for e in page] == ["a5", "a4"]
        assert page[0].address == "10.0.0.1"
        older = await store.audit(10, page[-1].id)
        assert [e.action for e in older] == ["a3", "a2", "a1"]
        assert await store.prune_audit(3.0) == 2
        assert [e.action for e in await store.audit(10, None)] == ["a5", "a4", "a3"]


async def test_audit_ids_only_grow_across_pruning(store_url: str) -> None:
    """Contract section 11: a pruned entry's id is never given again (the memory store once
    numbered entries by how many it held)."""
    async with opened(store_url) as store:
        await store.save([], [AuditEntry(float(t), f"a{t}", "cli", None, "s") for t in (1, 2, 3)])
        given = [e.id for e in await store.audit(10, None)]
        assert await store.prune_audit(3.0) == 2
        await store.save([], [AuditEntry(4.0, "a4", "cli", None, "s")])
        assert await store.prune_audit(5.0) == 2
        await store.save([], [AuditEntry(5.0, "a5", "cli", None, "s")])
        [last] = await store.audit(10, None)
        assert last.id > max(given) + 1


async def test_last_use_is_written_behind_without_a_new_sequence_number(store_url: str) -> None:
    async with opened(store_url) as store:
        seq = await store.save([credential("k1", role="read")], [])
        await store.record_use([("k1", 321.0)])
        assert await store.seq() == seq
        [k1] = (await store.changes(0)).credentials
        assert k1.last_used_at == 321.0


async def test_the_latest_use_survives_older_writes(store_url: str) -> None:
    """Uses are written behind, beside records saved from snapshots: neither an older use nor
    a record saved from before the use takes the latest use back."""
    async with opened(store_url) as store:
        await store.save([credential("k1", role="read")], [])
        [snapshot] = (await store.changes(0)).credentials
        await store.record_use([("k1", 500.0)])
        await store.record_use([("k1", 400.0)])  # a slower process's older use
        [k1] = (await store.changes(0)).credentials
        assert k1.last_used_at == 500.0
        await store.save([replace(snapshot, revoked_at=600.0)], [])
        [k1] = (await store.changes(0)).credentials
        assert (k1.revoked_at, k1.last_used_at) == (600.0, 500.0)
        await store.save([replace(k1, last_used_at=700.0)], [])  # a newer use in the record
        [k1] = (await store.changes(0)).credentials
        assert k1.last_used_at == 700.0


async def test_a_use_stays_known_once_written_behind(store_url: str) -> None:
    """The flush notes each use in the record the verifier holds (no separate table of last
    uses): the use is still shown after it, in the store too, and a later save keeps it."""
    clock = FakeClock()
    async with opened(store_url) as store:
        auth = AuthService(store, clock)
        await auth.load()
        cred, token = await auth.issue_credential("node-1", actor="cli")
        assert auth.last_used_at(cred) is None
        assert auth.verify(token).principal is not None
        used = clock.now().wall
        clock.advance(60.0)
        await auth.flush_uses()
        [held] = auth.node_credentials("node-1")
        assert auth.last_used_at(held) == used
        assert [c.last_used_at for c in (await store.changes(0)).credentials] == [used]
        assert await auth.revoke_credentials("node-1", actor="cli") == 1
        assert [c.last_used_at for c in (await store.changes(0)).credentials] == [used]


@pytest.mark.parametrize("store_url", ["sqlite", "postgresql"], indirect=True)
async def test_a_second_service_on_the_same_store_sees_changes_and_revocations(
    store_url: str,
) -> None:
    # The manager and the CLI: each its own AuthService on one store, no lock between them.
    clock = FakeClock(wall=1000.0)
    async with opened(store_url) as manager_store, opened(store_url) as cli_store:
        manager = AuthService(manager_store, clock, poll_s=0.01)
        cli = AuthService(cli_store, clock)
        await manager.load()
        await cli.load()
        heard: list[list[str]] = []
        manager.add_listener(lambda creds: heard.append([c.broker_identity for c in creds]))
        poll = asyncio.create_task(manager.run())
        try:
            key, token = await cli.create_key("write", name="gw", actor="cli")
            await eventually(lambda: manager.verify(token).principal is not None, timeout=2)
            assert manager.required is False  # a write key does not make auth required
            _, node_token = await cli.issue_credential("node-1", actor="cli")
            await eventually(lambda: manager.verify(node_token).principal is not None, timeout=2)
            await cli.revoke_credentials("node-1", actor="cli")
            await eventually(lambda: manager.verify(node_token).failure == "revoked", timeout=2)
            assert ["node-1"] in heard
            assert manager.verify(token).principal is not None  # the key is untouched
            assert manager.key(key.id) is not None
        finally:
            poll.cancel()


async def test_only_a_store_another_process_reads_keeps_a_broker_hash(store_url: str) -> None:
    # `credentials export` reads the hashes from the store; memory:// has no other reader.
    async with opened(store_url) as store:
        auth = AuthService(store, FakeClock(wall=1000.0))
        await auth.load()
        cred, token = await auth.issue_credential("node-1", actor="cli")
        [stored] = (await store.changes(0)).credentials
        if store_url == "memory://":
            assert (cred.broker_hash, stored.broker_hash) == (None, None)
        else:
            assert stored.broker_hash is not None
            assert stored.broker_hash.startswith("$7$101$")
        await auth.revoke_credentials("node-1", actor="cli")  # a record saved again
        [stored] = (await store.changes(0)).credentials
        assert (stored.broker_hash is None) == (store_url == "memory://")
        assert auth.verify(token).failure == "revoked"


async def test_rotation_keeps_the_old_token_for_its_grace_and_two_at_most() -> None:
    clock = FakeClock(wall=1000.0)
    async with loaded_auth(clock) as auth:
        _, first = await auth.issue_credential("n1", actor="t")
        _, second = await auth.issue_credential("n1", grace_s=30, actor="t")
        assert auth.verify(first).principal is not None  # inside its grace
        _, third = await auth.issue_credential("n1", grace_s=30, actor="t")
        assert auth.verify(first).failure == "revoked"  # never three valid at once
        assert [auth.verify(t).principal is not None for t in (second, third)] == [True, True]
        clock.advance(31)
        assert auth.verify(second).failure == "revoked"
        assert auth.verify(third).principal is not None


async def test_enrollment_limits() -> None:
    clock = FakeClock(wall=1000.0)
    async with loaded_auth(clock) as auth:
        key, _ = await auth.create_key("enroll", max_uses=2, id_pattern="dev-*",
                                       node_type="picclaw", actor="t")
        with pytest.raises(AuthError) as outside:
            await auth.enroll(key, "other-1", "picclaw", registered=False, actor="t")
        assert outside.value.code == 403
        with pytest.raises(AuthError) as wrong_type:
            await auth.enroll(key, "dev-1", "nanoclaw", registered=False, actor="t")
        assert wrong_type.value.code == 403
        with pytest.raises(AuthError) as registered:
            await auth.enroll(key, "dev-1", "picclaw", registered=True, actor="t")
        assert registered.value.code == 403
        cred, token = await auth.enroll(key, "dev-1", "PicClaw", registered=False, actor="t")
        assert (cred.enrolled_by, auth.verify(token).principal.id) == (key.id, "dev-1")  # type: ignore[union-attr]
        used = auth.key(key.id)
        assert used is not None
        with pytest.raises(AuthError) as again:
            await auth.enroll(used, "dev-1", "picclaw", registered=False, actor="t")
        assert again.value.code == 409
        await auth.enroll(used, "dev-2", "picclaw", registered=False, actor="t")
        # A stale copy of the key (uses 1 of 2) cannot enroll a third: its uses are counted
        # from the store, not from what the caller holds.
        with pytest.raises(AuthError) as past_uses:
            await auth.enroll(used, "dev-3", "picclaw", registered=False, actor="t")
        assert past_uses.value.code == 403
        # A used-up key learns nothing of an id's credential: its own limit answers first.
        with pytest.raises(AuthError) as used_up:
            await auth.enroll(used, "dev-1", "picclaw", registered=False, actor="t")
        assert used_up.value.code == 403
        ended = await auth.revoke_key(key.id, cascade=True, actor="t")
        assert {c.broker_identity for c in ended} == {f"_key.{key.id}", "dev-1", "dev-2"}
        assert auth.verify(token).failure == "revoked"


async def test_concurrent_rotations_of_one_node_never_leave_three_tokens_valid() -> None:
    clock = FakeClock(wall=1000.0)
    async with loaded_auth(clock) as auth:
        _, first = await auth.issue_credential("n1", actor="t")
        made = await asyncio.gather(*(auth.issue_credential("n1", grace_s=60, actor="t")
                                      for _ in range(5)))
        tokens = [first, *(token for _, token in made)]
        valid = [t for t in tokens if auth.verify(t).principal is not None]
        assert len(valid) == 2
        assert valid[-1] == tokens[-1]  # the newest is one of them


async def test_expiry_is_audited_once_and_listeners_hear_of_it() -> None:
    clock = FakeClock(wall=1000.0)
    async with loaded_auth(clock, poll_s=0.01) as auth:
        heard: list[str] = []
        auth.add_listener(lambda creds: heard.extend(c.broker_identity for c in creds))
        await auth.issue_credential("n1", expires_in_s=5, actor="t")
        key, _ = await auth.create_key("read", expires_in_s=5, actor="t")
        heard.clear()
        clock.advance(6)
        poll = asyncio.create_task(auth.run())
        try:
            await eventually(lambda: len(heard) == 2, timeout=2)
            entries = await eventually(lambda: _expired(auth.store), timeout=2)
        finally:
            poll.cancel()
        assert sorted(e.subject for e in entries) == [f"key:{key.id}", "node:n1"]
        assert {e.actor for e in entries} == {"manager"}


async def _expired(store: AuthStore) -> list[AuditEntry]:
    return [e for e in await store.audit(50, None) if e.action.endswith("_expired")]


class LaggingStore(MemoryAuthStore):
    """A store that answers one read from an older snapshot (a replica behind, a reply that
    overtook another): our own protocol, faked."""

    def __init__(self) -> None:
        super().__init__()
        self.lagging: AuthChanges | None = None

    async def seq(self) -> int:
        return await super().seq() + (1 if self.lagging is not None else 0)

    async def changes(self, since: int) -> AuthChanges:
        if self.lagging is not None:
            answer, self.lagging = self.lagging, None
            return answer
        return await super().changes(since)


async def test_an_older_snapshot_never_overwrites_a_newer_record() -> None:
    store = LaggingStore()
    auth = AuthService(store, FakeClock(wall=1000.0))
    await auth.load()
    _, token = await auth.issue_credential("n1", actor="t")
    before = await store.changes(0)  # the credential as it was: valid
    await auth.revoke_credentials("n1", actor="t")
    store.lagging = before
    await auth.refresh()  # answered from the older snapshot
    assert auth.verify(token).failure == "revoked"
