"""What ``AuthService`` hands a broker mirror: each new token as a ``put`` in the same write as
its credential (deferred through a rotation's grace), each identity left without a valid token
as a ``remove``, and nothing at all while no mirror is active."""

from __future__ import annotations

from fleetmq.auth.service import AuthService
from fleetmq.auth.store import MemoryAuthStore
from fleetmq.core.clock import FakeClock


async def service(clock: FakeClock, mirror: bool = True) -> AuthService:
    store = MemoryAuthStore()
    await store.set_mirror(mirror)
    auth = AuthService(store, clock)
    await auth.load()
    return auth


async def test_nothing_waits_for_a_mirror_that_is_not_there(clock: FakeClock) -> None:
    auth = await service(clock, mirror=False)
    await auth.issue_credential("n1", actor="test")
    await auth.create_key("read", actor="test")
    assert await auth.store.outbox(10) == []


async def test_a_new_token_is_a_put_and_broker_less_keys_are_not(clock: FakeClock) -> None:
    auth = await service(clock)
    cred, token = await auth.issue_credential("n1", actor="test")
    key, key_token = await auth.create_key("write", actor="test")
    await auth.create_key("enroll", actor="test")
    await auth.create_key("broker", actor="test")
    pending = await auth.store.outbox(10)
    assert [(r.action, r.identity, r.secret) for r in pending] == [
        ("put", "n1", token), ("put", f"_key.{key.id}", key_token)]
    assert pending[0].cred_id == cred.id
    assert pending[0].not_before is None


async def test_a_rotation_with_grace_waits_for_the_grace_and_a_second_one_does_not(
        clock: FakeClock) -> None:
    auth = await service(clock)
    await auth.issue_credential("n1", actor="test")
    _, second = await auth.issue_credential("n1", grace_s=60, actor="test")
    [row] = await auth.store.outbox(10)
    assert (row.secret, row.not_before) == (second, clock.now().wall + 60)
    _, third = await auth.issue_credential("n1", grace_s=60, actor="test")
    [row] = await auth.store.outbox(10)  # the second's token is gone with its row
    assert (row.secret, row.not_before) == (third, None)


async def test_revoking_every_token_removes_the_identity_and_its_pending_put(
        clock: FakeClock) -> None:
    auth = await service(clock)
    await auth.issue_credential("n1", actor="test")
    await auth.revoke_credentials("n1", actor="test")
    assert [(r.action, r.identity, r.secret) for r in await auth.store.outbox(10)] == [
        ("remove", "n1", None)]


async def test_revoking_a_key_removes_it_and_cascades_to_the_nodes_it_enrolled(
        clock: FakeClock) -> None:
    auth = await service(clock)
    enroller, _ = await auth.create_key("enroll", actor="test")
    await auth.enroll(enroller, "n1", "esp32", registered=False, actor="test")
    read, _ = await auth.create_key("read", actor="test")
    await auth.revoke_key(enroller.id, cascade=True, actor="test")
    await auth.revoke_key(read.id, actor="test")
    removed = [(r.action, r.identity) for r in await auth.store.outbox(10)]
    assert removed == [("remove", "n1"), ("remove", f"_key.{read.id}")]


async def test_a_first_use_is_heard_once(clock: FakeClock) -> None:
    auth = await service(clock)
    _, token = await auth.issue_credential("n1", actor="test")
    heard: list[str] = []
    auth.add_first_use_listener(lambda cred: heard.append(cred.id))
    for _ in range(3):
        assert auth.verify(token).principal is not None
    assert len(heard) == 1
