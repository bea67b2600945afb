"""High availability (contract section 10): several ``fleetmq serve`` on one store and one
Mosquitto; the active killed, paused or cut off from PostgreSQL while simulated nodes
heartbeat, and a standby that takes over without losing anything acknowledged or taking any
node offline.

Everything is real: PostgreSQL (a fresh database per test), a Mosquitto of the test's own from
the repo's mosquitto.conf (its queue settings, persistence on), the managers and
``fleetmq simulate`` as subprocesses, each killed at the end. Only the outside is read: /readyz,
REST, /metrics, the logs, MQTT, the broker's log and the store's tables.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import signal
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import _require_mosquitto, eventually
from tests.integration.ha_support import (
    HaManager,
    RoleMonitor,
    StatusWatch,
    all_sims_online,
    check_fleet,
    epoch_acquired,
    manager_connections,
    manager_disconnects,
    messages,
    outlive_grace,
    query,
    retained_statuses,
    sim_args,
    stop_task,
)
from tests.integration.test_cli import managers  # noqa: F401 (a fixture)
from tests.integration.test_simulate import simulation
from tests.support import Mosquitto, Postgres, free_port

RUN_IDS = 1_000_000_000
"""Each run of a manager numbers its events from a fresh block of this many (the store
writer's ``RUN_IDS``)."""
LEASE_S = 4
"""The shortest lease (--lease): a paused or cut-off active is replaced after it."""
KILL_TAKEOVER_S = 2.0
"""A standby is active within this of the active's kill -9."""


# --- fixtures ------------------------------------------------------------------------------------

@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    """A Mosquitto of this test's own, with the repo's queue settings and persistence on."""
    _require_mosquitto()
    workdir = tmp_path / "broker"
    workdir.mkdir()
    mosquitto = Mosquitto(workdir, persistence=True)
    mosquitto.start()
    try:
        yield mosquitto
    finally:
        mosquitto.stop()


@pytest.fixture
def start_manager(managers: Any, broker: Mosquitto, root: str) -> Any:  # noqa: F811
    """``start_manager(name, store, lease=..., advertise=...)``: a ``fleetmq serve`` of the
    group, on its own HTTP port; every one is killed at the end of the test."""

    def start(name: str, store: str, *extra: str, lease: int | None = LEASE_S,
              advertise: bool = True) -> HaManager:
        port = free_port()
        args = ["--broker", broker.url, "--http", f"127.0.0.1:{port}", "--topic-root", root,
                "--store", store, *extra]
        if lease is not None:
            args += ["--lease", str(lease)]
        if advertise:
            args += ["--advertise-url", f"http://127.0.0.1:{port}"]
        return HaManager(name, managers(*args), port)

    return start


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        yield session


@pytest.fixture
async def cut_role(postgres_server: Postgres, postgres_store_url: str) -> AsyncIterator[str]:
    """A login role of this test's own, so one manager can be cut off from PostgreSQL
    (``NOLOGIN`` and its backends terminated) while the others keep theirs."""
    role = f"ha_{uuid.uuid4().hex[:10]}"
    admin = postgres_server.url()
    await query(admin, f"CREATE ROLE {role} SUPERUSER LOGIN")
    try:
        yield role
    finally:
        await query(admin, f"ALTER ROLE {role} NOLOGIN")
        await query(admin, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                           "WHERE usename = $1", role)
        await query(postgres_store_url, f"REASSIGN OWNED BY {role} TO {postgres_server.user}")
        await query(admin, f"DROP ROLE {role}")


# --- 1. kill -9 under load ------------------------------------------------------------------------

async def test_kill_9_of_the_active_under_2000_nodes_a_standby_takes_over_in_2_s_losing_nothing(
    broker: Mosquitto, postgres_store_url: str, root: str, start_manager: Any,
    http: aiohttp.ClientSession, mqtt_clients: Any, tmp_path: Path
) -> None:
    sims = 2000
    # The default lease (10 s): a takeover within 2 s cannot come from the lease expiring.
    a = start_manager("A", postgres_store_url, lease=None)
    await a.wait_role(http, "active")
    b = start_manager("B", postgres_store_url, lease=None)
    await b.wait_role(http, "standby")
    watch = await StatusWatch(mqtt_clients(broker.port), root).start()
    agent = await mqtt_clients(broker.port, "ha-agent").connect()
    await agent.subscribe(f"{root}/+/reply")
    # Nodes that hear from nobody but the test: their telemetry says which heartbeat landed.
    gap_q1 = [f"gap-q1-{i}" for i in range(3)]
    gap_q0 = [f"gap-q0-{i}" for i in range(3)]
    for node_id in gap_q1 + gap_q0:
        await a.register(http, node_id)

    acked_rest: list[str] = []

    async def rest_registrations() -> None:
        for i in itertools.count():
            await a.register(http, f"reg-{i}", location=f"rack-{i}")
            acked_rest.append(f"reg-{i}")

    async def mqtt_registrations() -> None:
        for i in itertools.count():
            body = {"type": "microclaw", "location": f"shelf-{i}",
                    "heartbeat_interval_seconds": 3600}
            await agent.publish(f"{root}/mq-{i}/register", json.dumps(body))
            await asyncio.sleep(0.005)

    def mqtt_acked() -> list[str]:
        bodies = [json.loads(m.payload) for m in messages(agent) if m.topic.endswith("/reply")]
        return [b["node_id"] for b in bodies if b.get("status") == "registered"]

    async with simulation(tmp_path, *sim_args(broker, root, sims, 20)), \
            RoleMonitor(http, [a, b]) as roles:
        await all_sims_online(http, a, sims)
        loads = [asyncio.create_task(rest_registrations()),
                 asyncio.create_task(mqtt_registrations())]
        await eventually(lambda: len(acked_rest) >= 50 and len(mqtt_acked()) >= 20, timeout=10)

        disconnects = manager_disconnects(broker, root)
        killed_at = time.monotonic()
        a.kill()
        for task in loads:
            await stop_task(task)
        # During the gap: the broker queues these for the manager's persistent session.
        await eventually(lambda: manager_disconnects(broker, root) > disconnects, timeout=5)
        in_gap = roles.became_active("B", killed_at) is None
        for i, node_id in enumerate(gap_q1):
            await agent.publish(f"{root}/{node_id}/heartbeat",
                                json.dumps({"uptime_seconds": 900_000 + i,
                                            "free_memory_kb": 500 + i}), qos=1)
        for i, node_id in enumerate(gap_q0):
            await agent.publish(f"{root}/{node_id}/heartbeat",
                                json.dumps({"uptime_seconds": 910_000 + i,
                                            "free_memory_kb": 600 + i}), qos=0)
        assert in_gap, "B was active before the gap heartbeats went out: they test no queue"

        _, took = await roles.next_active([b], killed_at, timeout=10)
        assert took <= KILL_TAKEOVER_S, f"B took over {took:.2f}s after kill -9\n{b.log}"
        took_over = killed_at + took

        async def gap_applied() -> bool:
            for i, node_id in enumerate(gap_q1):
                node = await b.node(http, node_id)
                if node is None or (node["uptime_seconds"], node["free_memory_kb"]) != (
                        900_000 + i, 500 + i):
                    return False
            for i, node_id in enumerate(gap_q0):
                node = await b.node(http, node_id)
                if node is None or (node["uptime_seconds"], node["free_memory_kb"]) != (
                        910_000 + i, 600 + i):
                    return False
            return True
        try:
            await eventually(gap_applied, timeout=5, interval=0.1)
        except AssertionError:
            shown = {n: (await b.node(http, n)) for n in gap_q1 + gap_q0}
            raise AssertionError(f"heartbeats sent during the gap not applied: {shown}") \
                from None

        nodes = await b.nodes(http)
        lost = [n for n in acked_rest if n not in nodes]
        assert not lost, f"acknowledged REST registrations lost in the takeover: {lost}"
        assert all(nodes[f"reg-{i}"]["location"] == f"rack-{i}" for i in range(len(acked_rest)))
        lost = [n for n in mqtt_acked() if n not in nodes]
        assert not lost, f"registrations answered over MQTT lost in the takeover: {lost}"

        await outlive_grace(http, b, took_over, sims)
        nodes = await check_fleet(http, b, sims, [*acked_rest, *mqtt_acked(),
                                                  *gap_q1, *gap_q0], doubt=("reg-", "mq-"))
        assert watch.offline() == [], "a node or the manager went offline in the takeover"
        assert not roles.two_actives(), roles.two_actives()

    retained = await retained_statuses(mqtt_clients(broker.port), root,
                                       lambda found: set(found) >= set(nodes))
    missing = set(nodes) - set(retained)
    assert not missing, f"no retained status for {sorted(missing)[:10]} ({len(missing)})"
    assert {retained[n]["status"] for n in nodes} == {"online"}
    samples = await b.metrics(http)
    assert samples["fleetmq_active"] == 1
    assert samples["fleetmq_takeovers_total"] == 1


# --- 2. SIGSTOP past the lease, then SIGCONT -----------------------------------------------------

async def test_a_paused_active_is_replaced_after_its_lease_and_once_resumed_steps_down_silently(
    broker: Mosquitto, postgres_store_url: str, root: str, start_manager: Any,
    http: aiohttp.ClientSession, mqtt_clients: Any, tmp_path: Path
) -> None:
    sims = 300
    a = start_manager("A", postgres_store_url)
    await a.wait_role(http, "active")
    b = start_manager("B", postgres_store_url)
    await b.wait_role(http, "standby")
    watch = await StatusWatch(mqtt_clients(broker.port), root).start()
    agent = await mqtt_clients(broker.port, "ha-agent").connect()
    for node_id in ("keep-x", "keep-d", "keep-t"):
        await a.register(http, node_id)

    async with simulation(tmp_path, *sim_args(broker, root, sims, 6)), \
            RoleMonitor(http, [a, b]) as roles:
        await all_sims_online(http, a, sims)
        a_epoch = epoch_acquired(a, "no")
        a_block = (await query(postgres_store_url, "SELECT max(id) AS m FROM events"))[0]["m"] \
            // RUN_IDS
        # A applies this heartbeat and is paused before (most likely) writing it out: once
        # resumed, it must not write it over what the new active wrote meanwhile.
        await agent.publish(f"{root}/keep-t/heartbeat", json.dumps({"uptime_seconds": 111}))

        async def applied() -> bool:
            node = await a.node(http, "keep-t")
            return node is not None and node["uptime_seconds"] == 111
        await eventually(applied, timeout=5, interval=0.01)
        a.signal(signal.SIGSTOP)
        paused_at = time.monotonic()
        takeover = watch.mark()  # the paused one publishes nothing: what follows is B's

        _, took = await roles.next_active([b], paused_at, timeout=LEASE_S + 5)
        # Not before the paused one's lease ran out (renewed every lease/4), nor long after.
        assert LEASE_S * 3 / 4 - 0.2 <= took <= LEASE_S + 1.5, f"took over after {took:.2f}s"
        a_events = {r["id"] for r in await query(postgres_store_url, "SELECT id FROM events")
                    if r["id"] // RUN_IDS == a_block}

        # The new active republishes every status; then come changes only it makes (a paused
        # one that acted would undo them).
        everyone = set(await b.nodes(http))
        try:
            await eventually(lambda: everyone <= {n for n, _ in watch.since(takeover)},
                             timeout=10)
        except AssertionError:
            missing = everyone - {n for n, _ in watch.since(takeover)}
            raise AssertionError(f"no status republished after the takeover for {len(missing)}"
                                 f" nodes: {sorted(missing)[:5]}\nB's log:\n{b.log}") from None
        changes = watch.mark()
        async with http.delete(f"{b.api}/nodes/keep-x") as resp:
            assert resp.status == 204, await resp.text()
        for body in ({"node_id": "keep-d", "status": "degraded", "reason": "low_battery"},
                     {"node_id": "keep-t", "uptime_seconds": 222}):
            async with http.post(f"{b.api}/heartbeat", json=body) as resp:
                assert resp.status == 200, await resp.text()

        async def stored() -> bool:
            rows = {r["id"]: r for r in await query(
                postgres_store_url, "SELECT id, status, uptime_seconds FROM nodes "
                "WHERE id = ANY($1::text[])", ["keep-x", "keep-d", "keep-t"])}
            return ("keep-x" not in rows and rows["keep-d"]["status"] == "degraded"
                    and rows["keep-t"]["uptime_seconds"] == 222)
        await eventually(stored, timeout=5, interval=0.1)
        await eventually(lambda: ("keep-x", None) in watch.since(changes), timeout=5)
        connections = manager_connections(broker, root)

        a.signal(signal.SIGCONT)
        resumed_at = time.monotonic()
        await a.wait_role(http, "standby", timeout=LEASE_S + 5)
        await eventually(lambda: "stepping_down" in a.log and "standby store=" in a.log,
                         timeout=5)
        # The placeholder answers standby (active unknown) until the standby's own listener
        # is up; then it names the new active.
        full = (503, {"status": "standby", "active": b.url})

        async def following() -> bool:
            return await a.readyz(http) == full

        await eventually(following, timeout=10.0, interval=0.1)
        assert a.alive()
        # A barrier: a status the new active publishes after the old one stepped down; what the
        # old one published before it is in by then.
        await b.register(http, "keep-barrier")
        await eventually(lambda: any(n == "keep-barrier" for n, _ in watch.since(takeover)),
                         timeout=5)

        assert "active" not in roles.roles("A", after=resumed_at), \
            "the resumed active answered /readyz 200"
        assert not roles.two_actives(), roles.two_actives()
        after = watch.since(changes)
        x_at = after.index(("keep-x", None))
        assert [m for m in after[x_at + 1:] if m[0] == "keep-x"] == [], \
            "a status of the deleted node was published after it was cleared"
        d_statuses = [body["status"] for node, body in after if node == "keep-d" and body]
        assert d_statuses == ["degraded"], d_statuses
        assert watch.offline() == [], watch.offline()
        new_connections = manager_connections(broker, root)[len(connections):]
        assert new_connections == [], \
            f"a manager client id connected again after the takeover: {new_connections}"
        assert "broker_disconnected" not in b.log, b.log
        nodes = await b.nodes(http)
        assert "keep-x" not in nodes
        assert len(nodes) == sims + 3
        assert {i: n["status"] for i, n in nodes.items() if n["status"] != "online"} == {
            "keep-d": "degraded"}

    # The store: nothing from A after the takeover.
    rows = {r["id"]: r for r in await query(
        postgres_store_url, "SELECT id, status, uptime_seconds FROM nodes "
        "WHERE id = ANY($1::text[])", ["keep-x", "keep-d", "keep-t"])}
    assert "keep-x" not in rows, "the deleted node's row came back"
    assert rows["keep-d"]["status"] == "degraded"
    assert rows["keep-t"]["uptime_seconds"] == 222, "the old active wrote its telemetry"
    ids = {r["id"] for r in await query(postgres_store_url, "SELECT id FROM events")}
    late = {i for i in ids if i // RUN_IDS == a_block} - a_events
    assert not late, f"events of the old active's run written after the takeover: {late}"
    newer = sorted(i for i in ids if i // RUN_IDS != a_block)
    assert newer, "the new active recorded no event"
    assert all(i // RUN_IDS > a_block for i in newer), newer[:5]
    offline = await query(postgres_store_url,
                          "SELECT node_id, reason FROM events WHERE to_status = 'offline'")
    assert offline == [], offline
    lease = (await query(postgres_store_url, "SELECT epoch, advertise_url FROM fleetmq_lease "
                         "WHERE name = 'active'"))[0]
    assert (lease["epoch"], lease["advertise_url"]) == (a_epoch + 1, b.url)
    assert epoch_acquired(b, "yes") == a_epoch + 1


# --- 3. cut off from PostgreSQL ------------------------------------------------------------------

@pytest.mark.parametrize("cut", ["terminated", "refused"])
async def test_an_active_cut_off_from_postgresql_stops_within_the_lease_and_a_standby_takes_over(
    cut: str, cut_role: str, broker: Mosquitto, postgres_server: Postgres,
    postgres_store_url: str, root: str, start_manager: Any, http: aiohttp.ClientSession,
    mqtt_clients: Any, tmp_path: Path
) -> None:
    """``terminated``: every PostgreSQL backend of the active ended once (it may connect
    again); ``refused``: ended, and no new connection accepted until after the takeover."""
    sims = 300
    own_url = postgres_store_url.replace(f"//{postgres_server.user}@", f"//{cut_role}@", 1)
    assert own_url != postgres_store_url
    a = start_manager("A", own_url)
    await a.wait_role(http, "active")
    b = start_manager("B", postgres_store_url)
    await b.wait_role(http, "standby")
    watch = await StatusWatch(mqtt_clients(broker.port), root).start()
    admin = postgres_server.url()

    async with simulation(tmp_path, *sim_args(broker, root, sims, 6)), \
            RoleMonitor(http, [a, b]) as roles:
        await all_sims_online(http, a, sims)
        a_epoch = epoch_acquired(a, "no")
        backends = await query(admin, "SELECT pid, client_port FROM pg_stat_activity "
                                      "WHERE usename = $1", cut_role)
        assert backends, "A has no PostgreSQL backend of its role"
        if cut == "refused":
            await query(admin, f"ALTER ROLE {cut_role} NOLOGIN")
        cut_at = time.monotonic()
        ended = await query(admin, "SELECT pg_terminate_backend(pid) AS ok FROM "
                                   "pg_stat_activity WHERE usename = $1", cut_role)
        assert ended
        assert all(r["ok"] for r in ended)

        # The next epoch goes to a standby: B, or A itself once it stepped down and (its
        # backends ended once) came back as a standby quicker than B.
        def next_holder() -> HaManager | None:
            return next((m for m in (a, b)
                         if f"lease_acquired epoch={a_epoch + 1} " in m.log), None)
        new: HaManager = await eventually(next_holder, timeout=LEASE_S + 5)
        await new.wait_role(http, "active", timeout=5)
        took = time.monotonic() - cut_at
        assert took <= LEASE_S + 1.5, f"{new.name} took over {took:.2f}s after the cut"
        assert "stepping_down" in a.log, a.log
        if cut == "refused":
            assert new is b
        # A stopped answering as the active within the lease (it may come back as one).
        stopped = next((answered for sent, answered, who, role in roles.samples
                        if who == "A" and sent > cut_at and role != "active"), None)
        assert stopped is not None
        assert stopped - cut_at <= LEASE_S, f"A active {stopped - cut_at:.2f}s after the cut"
        assert not roles.two_actives(), roles.two_actives()
        # Let the new active publish (its publishing client connected) before counting
        # connections.
        await new.register(http, "after-cut")
        await eventually(lambda: any(n == "after-cut" for n, _ in watch.since()), timeout=5)
        connections = manager_connections(broker, root)

        if cut == "refused":
            await query(admin, f"ALTER ROLE {cut_role} LOGIN")
        standby = b if new is a else a
        await standby.wait_role(http, "standby", timeout=LEASE_S + 10)
        # While it waits for PostgreSQL, a placeholder answers standby with the reason and no
        # active; once it is in again, the standby names the new active (its start is retried
        # with a backoff of up to 30 s).
        full = (503, {"status": "standby", "active": new.url})

        async def following() -> bool:
            return await standby.readyz(http) == full

        await eventually(following, timeout=40.0, interval=0.2)

        await outlive_grace(http, new, cut_at + took, sims)
        await check_fleet(http, new, sims, ["after-cut"])
        assert watch.offline() == [], watch.offline()
        assert not roles.two_actives(), roles.two_actives()
        new_connections = manager_connections(broker, root)[len(connections):]
        assert new_connections == [], \
            f"a manager client id connected again after the takeover: {new_connections}"
        assert "broker_disconnected" not in b.log, b.log
    offline = await query(postgres_store_url,
                          "SELECT node_id, reason FROM events WHERE to_status = 'offline'")
    assert offline == [], offline


async def test_postgresql_lost_for_everyone_the_manager_waits_and_takes_the_lease_again(
    cut_role: str, broker: Mosquitto, postgres_server: Postgres, postgres_store_url: str,
    root: str, start_manager: Any, http: aiohttp.ClientSession, mqtt_clients: Any,
    tmp_path: Path
) -> None:
    """A lone manager whose PostgreSQL goes away (a restart, a failover) steps down, waits, and
    takes the lease again with the next epoch once PostgreSQL is back; no node went offline."""
    sims = 200
    own_url = postgres_store_url.replace(f"//{postgres_server.user}@", f"//{cut_role}@", 1)
    a = start_manager("A", own_url)
    await a.wait_role(http, "active")
    watch = await StatusWatch(mqtt_clients(broker.port), root).start()
    admin = postgres_server.url()

    async with simulation(tmp_path, *sim_args(broker, root, sims, 4)):
        await all_sims_online(http, a, sims)
        a_epoch = epoch_acquired(a, "no")
        await query(admin, f"ALTER ROLE {cut_role} NOLOGIN")
        await query(admin, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                           "WHERE usename = $1", cut_role)
        await eventually(lambda: "stepping_down" in a.log, timeout=LEASE_S + 2)

        def refused_since_stepping_down() -> bool:
            """PostgreSQL turned away one of its attempts after it stepped down."""
            return "not permitted to log in" in a.log.split("stepping_down", 1)[1]
        await eventually(refused_since_stepping_down, timeout=10)

        # Meanwhile it stays up as a standby does: /readyz 503 (a load balancer sends it
        # nothing), /healthz 200 (a liveness probe leaves it be). Watched for 2 s: longer than
        # its first retries to reach PostgreSQL.
        unanswered = []
        for _ in range(20):
            answer = await a.readyz(http)
            if answer is None or answer[0] != 503:
                unanswered.append(answer)
            else:
                async with http.get(f"{a.url}/healthz") as resp:
                    assert resp.status == 200
            await asyncio.sleep(0.1)
        await query(admin, f"ALTER ROLE {cut_role} LOGIN")

        def leased_again() -> bool:
            assert a.alive(), f"A exited with status {a.manager.proc and a.manager.proc.poll()}"
            return f"lease_acquired epoch={a_epoch + 1} " in a.log
        await eventually(leased_again, timeout=LEASE_S + 10)
        await a.wait_role(http, "active", timeout=5)
        await outlive_grace(http, a, time.monotonic(), sims)
        await check_fleet(http, a, sims, [])
        assert watch.offline() == [], watch.offline()
    assert not unanswered, (f"while PostgreSQL was away, {len(unanswered)} of 20 /readyz got "
                            f"no 503 (None: no answer at all): {unanswered[:3]}")


# --- 4. three managers, two kills ----------------------------------------------------------------

async def test_three_managers_the_active_killed_twice_the_fleet_stays_correct(
    broker: Mosquitto, postgres_store_url: str, root: str, start_manager: Any,
    http: aiohttp.ClientSession, mqtt_clients: Any, tmp_path: Path
) -> None:
    sims = 500
    a = start_manager("A", postgres_store_url)
    await a.wait_role(http, "active")
    b = start_manager("B", postgres_store_url)
    c = start_manager("C", postgres_store_url)
    await b.wait_role(http, "standby")
    await c.wait_role(http, "standby")
    watch = await StatusWatch(mqtt_clients(broker.port), root).start()
    registered: list[str] = []

    deleted: list[str] = []

    async def register(manager: HaManager, tag: str) -> None:
        for i in range(20):
            await manager.register(http, f"{tag}-{i}", location=tag)
            registered.append(f"{tag}-{i}")

    async def delete(manager: HaManager, tag: str) -> None:
        """Delete five of ``tag``'s nodes: the kill follows at once."""
        for i in range(5):
            async with http.delete(f"{manager.api}/nodes/{tag}-{i}") as resp:
                assert resp.status == 204, await resp.text()
            registered.remove(f"{tag}-{i}")
            deleted.append(f"{tag}-{i}")

    def deletes_kept(manager: HaManager, nodes: dict[str, Any]) -> None:
        """Every acknowledged delete holds: gone from REST, its retained status still cleared
        (a takeover's republish must not bring it back)."""
        assert not [n for n in deleted if n in nodes], f"{manager.name} shows deleted nodes"
        last = dict(watch.since())  # each node's last message
        assert {n: last.get(n, "never seen") for n in deleted} == dict.fromkeys(deleted), \
            "a deleted node's status came back"

    async with simulation(tmp_path, *sim_args(broker, root, sims, 10)), \
            RoleMonitor(http, [a, b, c]) as roles:
        await all_sims_online(http, a, sims)
        await register(a, "first")
        await check_fleet(http, a, sims, registered)
        a_epoch = epoch_acquired(a, "no")

        await delete(a, "first")
        killed_at = time.monotonic()
        a.kill()
        second, took = await roles.next_active([b, c], killed_at, timeout=10)
        assert took <= KILL_TAKEOVER_S, f"{second.name} took over {took:.2f}s after kill -9"
        other = c if second is b else b

        async def points_at(standby: HaManager, active: HaManager) -> bool:
            answer = await standby.readyz(http)
            return answer == (503, {"status": "standby", "active": active.url})
        await eventually(lambda: points_at(other, second), timeout=5)
        deletes_kept(second, await check_fleet(http, second, sims, registered))
        await register(second, "second")
        await check_fleet(http, second, sims, registered)
        assert watch.offline() == [], watch.offline()

        await delete(second, "second")
        killed_at = time.monotonic()
        second.kill()
        third, took = await roles.next_active([other], killed_at, timeout=10)
        assert took <= KILL_TAKEOVER_S, f"{third.name} took over {took:.2f}s after kill -9"
        deletes_kept(third, await check_fleet(http, third, sims, registered))
        await register(third, "third")
        await outlive_grace(http, third, killed_at + took, sims)
        nodes = await check_fleet(http, third, sims, registered)
        deletes_kept(third, nodes)
        assert watch.offline() == [], watch.offline()
        assert not roles.two_actives(), roles.two_actives()

    retained = await retained_statuses(mqtt_clients(broker.port), root,
                                       lambda found: set(found) - {"_manager"} == set(nodes))
    assert set(retained) - {"_manager"} == set(nodes)

    assert epoch_acquired(second, "yes") == a_epoch + 1
    assert epoch_acquired(third, "yes") == a_epoch + 2
    samples = await third.metrics(http)
    assert samples["fleetmq_active"] == 1
    assert samples["fleetmq_takeovers_total"] == 1
    assert samples["fleetmq_lease_epoch"] == a_epoch + 2


# --- 5. what a standby answers; the metrics ------------------------------------------------------

async def test_a_standby_answers_503_naming_the_active_and_the_metrics_tell_the_roles(
    broker: Mosquitto, postgres_store_url: str, root: str, start_manager: Any,
    http: aiohttp.ClientSession
) -> None:
    a = start_manager("A", postgres_store_url)
    await a.wait_role(http, "active")
    b = start_manager("B", postgres_store_url)
    await b.wait_role(http, "standby")

    assert await b.readyz(http) == (503, {"status": "standby", "active": a.url})
    async with http.get(f"{b.url}/healthz") as resp:
        assert resp.status == 200
    routes = [("GET", "/api/v1/fleet/nodes", None), ("GET", "/api/v1/fleet/nodes/n-1", None),
              ("GET", "/api/v1/fleet/nodes/n-1/events", None),
              ("POST", "/api/v1/fleet/register", {"node_id": "n-1", "node_type": "picclaw"}),
              ("POST", "/api/v1/fleet/heartbeat", {"node_id": "n-1"}),
              ("DELETE", "/api/v1/fleet/nodes/n-1", None), ("GET", "/api/v1/openapi.json", None)]
    for method, path, body in routes:
        async with http.request(method, f"{b.url}{path}", json=body) as resp:
            answer = await resp.json(content_type=None)
            assert resp.status == 503, (method, path, resp.status, answer)
        assert set(answer) == {"error", "message", "active"}, (path, answer)
        assert answer["error"] == "Standby"
        assert answer["active"] == a.url
        assert isinstance(answer["message"], str), answer
        assert answer["message"], answer

    status, ready = (await a.readyz(http)) or (0, {})
    assert status == 200, ready
    assert {k: ready.get(k) for k in ("status", "role", "nodes")} == {
        "status": "ready", "role": "active", "nodes": 0}
    assert ready.get("mqtt_protocol"), ready
    a_epoch = epoch_acquired(a, "no")
    samples = await a.metrics(http)
    assert (samples["fleetmq_active"], samples["fleetmq_takeovers_total"],
            samples["fleetmq_lease_epoch"]) == (1, 0, a_epoch)
    samples = await b.metrics(http)
    assert (samples["fleetmq_active"], samples["fleetmq_takeovers_total"]) == (0, 0)
    assert "standby store=" in b.log, b.log
    assert f"active={a.url}" in b.log, b.log
    assert "lease_acquired" not in b.log, b.log
    lease = (await query(postgres_store_url, "SELECT epoch, advertise_url FROM fleetmq_lease "
                         "WHERE name = 'active'"))[0]
    assert (lease["epoch"], lease["advertise_url"]) == (a_epoch, a.url)

    await a.register(http, "n-1")
    killed_at = time.monotonic()
    a.kill()
    await b.wait_role(http, "active", timeout=10)
    assert time.monotonic() - killed_at <= KILL_TAKEOVER_S + 0.5  # the poll's own delay
    status, ready = (await b.readyz(http)) or (0, {})
    assert (status, ready.get("role"), ready.get("nodes")) == (200, "active", 1), ready
    samples = await b.metrics(http)
    assert (samples["fleetmq_active"], samples["fleetmq_takeovers_total"],
            samples["fleetmq_lease_epoch"]) == (1, 1, a_epoch + 1)
    assert epoch_acquired(b, "yes") == a_epoch + 1
    assert re.search(rf"takeover_started epoch={a_epoch + 1} seconds=", b.log), b.log
    assert await b.node(http, "n-1") is not None

    c = start_manager("C", postgres_store_url)
    await c.wait_role(http, "standby")
    assert await c.readyz(http) == (503, {"status": "standby", "active": b.url})
    lease = (await query(postgres_store_url, "SELECT epoch, advertise_url FROM fleetmq_lease "
                         "WHERE name = 'active'"))[0]
    assert (lease["epoch"], lease["advertise_url"]) == (a_epoch + 1, b.url)


async def test_with_the_embedded_broker_a_second_manager_on_the_store_is_refused(
    postgres_store_url: str, root: str, managers: Any, http: aiohttp.ClientSession  # noqa: F811
) -> None:
    def start(port: int) -> Any:
        return managers("--broker", f"embedded://127.0.0.1:{free_port()}", "--broker-ws", "off",
                        "--http", f"127.0.0.1:{port}", "--topic-root", root, "--store",
                        postgres_store_url)

    first_port = free_port()
    await start(first_port).wait_ready(first_port, http)
    second = start(free_port())
    assert await second.wait_exit(timeout=30) == 1, second.log
    assert "--broker mqtt://" in second.log, second.log
    assert "Traceback" not in second.log, second.log
    async with http.get(f"http://127.0.0.1:{first_port}/readyz") as resp:
        assert resp.status == 200  # the first one is untouched


# --- 6. SQLite: a standby on the same host -------------------------------------------------------

async def test_a_second_manager_on_the_same_sqlite_file_waits_and_takes_over_when_the_first_dies(
    broker: Mosquitto, root: str, start_manager: Any, http: aiohttp.ClientSession,
    mqtt_clients: Any, tmp_path: Path
) -> None:
    sims = 300
    store = f"sqlite:///{tmp_path / 'fleet.db'}"
    a = start_manager("A", store, lease=None, advertise=False)
    await a.wait_role(http, "active")
    b = start_manager("B", store, lease=None, advertise=False)
    await b.wait_role(http, "standby")
    assert await b.readyz(http) == (503, {"status": "standby", "active": None})
    watch = await StatusWatch(mqtt_clients(broker.port), root).start()
    registered = [f"file-{i}" for i in range(20)]

    async with simulation(tmp_path, *sim_args(broker, root, sims, 6)), \
            RoleMonitor(http, [a, b]) as roles:
        await all_sims_online(http, a, sims)
        for node_id in registered:
            await a.register(http, node_id)
        assert await b.role(http) == "standby"

        killed_at = time.monotonic()
        a.kill()
        _, took = await roles.next_active([b], killed_at, timeout=10)
        assert took <= KILL_TAKEOVER_S, f"B took over {took:.2f}s after kill -9\n{b.log}"
        await check_fleet(http, b, sims, registered)
        await outlive_grace(http, b, killed_at + took, sims)
        await check_fleet(http, b, sims, registered)
        assert watch.offline() == [], watch.offline()
