"""Helpers for the high-availability tests (contract section 10): ``fleetmq serve`` processes
that share one store and one Mosquitto, seen from the outside only (REST, /metrics, MQTT, the
broker's log and the store's tables).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

import aiohttp
import asyncpg

from tests.conftest import MqttClient, Received, eventually
from tests.integration.test_cli import Manager
from tests.support import Mosquitto, metric_samples

PROBE_TIMEOUT = aiohttp.ClientTimeout(total=0.5)
"""A paused (SIGSTOP) manager never answers: every probe gives up quickly."""
SIM_TYPE = "simulated"
SIM_INTERVAL_S = 1
SIM_TIMEOUT_S = 3 * SIM_INTERVAL_S
"""The simulated nodes' timeout: a takeover gives each this much grace."""
QUIET_INTERVAL_S = 3600
"""The interval of the nodes the tests register themselves: they never time out in a test."""


class HaManager:
    """One ``fleetmq serve`` of an HA group, on its own HTTP port."""

    def __init__(self, name: str, manager: Manager, port: int) -> None:
        self.name = name
        self.manager = manager
        self.port = port

    @property
    def url(self) -> str:
        """Its HTTP URL, also its --advertise-url."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def api(self) -> str:
        return f"{self.url}/api/v1/fleet"

    @property
    def pid(self) -> int:
        assert self.manager.proc is not None
        return self.manager.proc.pid

    @property
    def log(self) -> str:
        return self.manager.log

    def alive(self) -> bool:
        return self.manager.proc is not None and self.manager.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL, and wait until the process is gone (its sockets closed)."""
        self.manager.kill()

    def signal(self, sig: int) -> None:
        self.manager.signal(sig)

    async def readyz(self, http: aiohttp.ClientSession) -> tuple[int, dict[str, Any]] | None:
        """``/readyz``'s status and body; None when it does not answer (stopped, paused)."""
        if not self.alive():
            return None
        try:
            async with http.get(f"{self.url}/readyz", timeout=PROBE_TIMEOUT) as resp:
                return resp.status, await resp.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return None

    async def role(self, http: aiohttp.ClientSession) -> str | None:
        """'active' (200), else the 503's status ('standby', 'not_ready'), None if silent."""
        answer = await self.readyz(http)
        if answer is None:
            return None
        status, body = answer
        if status == 200:
            return "active"
        return str(body.get("status"))

    async def wait_role(self, http: aiohttp.ClientSession, role: str,
                        timeout: float = 20.0) -> None:
        async def reached() -> bool:
            if not self.alive():
                code = self.manager.proc.poll() if self.manager.proc else None
                raise AssertionError(f"{self.name} exited with status {code}")
            return await self.role(http) == role

        try:
            await eventually(reached, timeout=timeout, interval=0.05)
        except AssertionError as exc:
            raise AssertionError(f"{self.name} not {role}: {exc}\nlog:\n{self.log}") from None

    async def get(self, http: aiohttp.ClientSession, path: str) -> tuple[int, Any]:
        async with http.get(f"{self.url}{path}") as resp:
            return resp.status, await resp.json(content_type=None)

    async def nodes(self, http: aiohttp.ClientSession, **params: str) -> dict[str, Any]:
        """Every node the manager shows (GET /nodes, no paging): id -> node."""
        async with http.get(f"{self.api}/nodes", params=params) as resp:
            assert resp.status == 200, f"{self.name}: {resp.status} {await resp.text()}"
            return {n["id"]: n for n in (await resp.json())["nodes"]}

    async def total(self, http: aiohttp.ClientSession, **filters: str) -> int:
        """How many nodes match ``filters`` (GET /nodes's ``total``)."""
        async with http.get(f"{self.api}/nodes", params={**filters, "limit": "1"}) as resp:
            assert resp.status == 200, f"{self.name}: {resp.status} {await resp.text()}"
            return int((await resp.json())["total"])

    async def node(self, http: aiohttp.ClientSession, node_id: str) -> dict[str, Any] | None:
        async with http.get(f"{self.api}/nodes/{node_id}") as resp:
            if resp.status == 404:
                return None
            assert resp.status == 200, f"{self.name}: {resp.status} {await resp.text()}"
            doc: dict[str, Any] = await resp.json()
            return doc

    async def register(self, http: aiohttp.ClientSession, node_id: str, **fields: Any) -> None:
        body = {"node_id": node_id, "node_type": "picclaw",
                "heartbeat_interval_seconds": QUIET_INTERVAL_S, **fields}
        async with http.post(f"{self.api}/register", json=body) as resp:
            assert resp.status == 200, f"{self.name}: {resp.status} {await resp.text()}"

    async def metrics(self, http: aiohttp.ClientSession) -> dict[str, float]:
        async with http.get(f"{self.url}/metrics") as resp:
            assert resp.status == 200, f"{self.name}: {resp.status} {await resp.text()}"
            return metric_samples(await resp.text())


class RoleMonitor:
    """Probes every manager's /readyz all along (each on its own, so a paused one delays no
    other) and keeps what each said when: takeovers are timed and checked from this record."""

    def __init__(self, http: aiohttp.ClientSession, managers: list[HaManager]) -> None:
        self._http = http
        self.managers = managers
        self.samples: list[tuple[float, float, str, str | None]] = []
        """(probe sent, answer received, manager name, role), monotonic times."""
        self._tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> RoleMonitor:
        self._tasks = [asyncio.create_task(self._probe(m)) for m in self.managers]
        return self

    async def __aexit__(self, *_exc: object) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _probe(self, manager: HaManager) -> None:
        while True:
            sent = time.monotonic()
            role = await manager.role(self._http)
            self.samples.append((sent, time.monotonic(), manager.name, role))
            await asyncio.sleep(0.02)

    def roles(self, name: str, after: float = 0.0) -> list[str | None]:
        """What ``name`` answered to the probes sent after ``after``."""
        return [role for sent, _, who, role in self.samples if who == name and sent >= after]

    def became_active(self, name: str, after: float = 0.0) -> float | None:
        """When ``name`` was first seen active by a probe sent after ``after``."""
        return next((answered for sent, answered, who, role in self.samples
                     if who == name and role == "active" and sent >= after), None)

    async def next_active(self, candidates: list[HaManager], after: float,
                          timeout: float) -> tuple[HaManager, float]:
        """The first of ``candidates`` seen active by a probe sent after ``after``, and when
        (seconds after ``after``)."""
        def seen() -> tuple[HaManager, float] | None:
            times = [(t, m) for m in candidates
                     if (t := self.became_active(m.name, after)) is not None]
            if not times:
                return None
            at, manager = min(times, key=lambda pair: pair[0])
            return manager, at - after

        try:
            found: tuple[HaManager, float] = await eventually(seen, timeout=timeout,
                                                              interval=0.02)
        except AssertionError as exc:
            logs = "\n".join(f"--- {m.name}:\n{m.log}" for m in self.managers)
            raise AssertionError(f"no standby took over: {exc}\n{logs}") from None
        return found

    def two_actives(self) -> list[str]:
        """Every probe that found a manager active after a newer active had been seen: once
        one takes over, the one before never answers 200 again."""
        firsts = sorted((t, m.name) for m in self.managers
                        if (t := self.became_active(m.name)) is not None)
        found = []
        for i, (_, older) in enumerate(firsts):
            for newer_at, newer in firsts[i + 1:]:
                found += [f"{older} active at +{sent - newer_at:.3f}s after {newer} took over"
                          for sent, _, who, role in self.samples
                          if who == older and role == "active" and sent > newer_at]
        return found


# --- the fleet, seen through the active ---------------------------------------------------------

def sim_args(broker: Mosquitto, root: str, nodes: int, connections: int) -> list[str]:
    return ["--nodes", str(nodes), "--interval", str(SIM_INTERVAL_S), "--connections",
            str(connections), "--broker", broker.url, "--topic-root", root,
            "--node-type", SIM_TYPE]


async def all_sims_online(http: aiohttp.ClientSession, manager: HaManager, count: int) -> None:
    async def online() -> bool:
        return await manager.total(http, node_type=SIM_TYPE, status="online") == count
    await eventually(online, timeout=15, interval=0.2)


def wall_clock(monotonic_at: float) -> float:
    """A moment of ``time.monotonic()`` as seconds since the epoch."""
    return time.time() - (time.monotonic() - monotonic_at)


async def outlive_grace(http: aiohttp.ClientSession, manager: HaManager, took_over: float,
                        sims: int) -> None:
    """Wait until every simulated node was heard after the grace the takeover gave it had run
    out: had the new active missed their heartbeats, they would have gone offline by then."""
    after = wall_clock(took_over) + SIM_TIMEOUT_S + 0.5

    async def heard() -> float:
        nodes = await manager.nodes(http, node_type=SIM_TYPE)
        assert len(nodes) == sims
        oldest = min(wall(n["last_seen"]) for n in nodes.values())
        return oldest > after
    await eventually(heard, timeout=SIM_TIMEOUT_S + 10, interval=0.25)


async def check_fleet(http: aiohttp.ClientSession, manager: HaManager, sims: int,
                      registered: list[str], doubt: tuple[str, ...] = ()) -> dict[str, Any]:
    """The manager shows every simulated node and every registered one, all online, and
    counts them right (GET /nodes, its total, /readyz). Ids that begin with one of ``doubt``
    may be there unacknowledged (sent when the active was killed)."""
    nodes = await manager.nodes(http)
    missing = [n for n in registered if n not in nodes]
    assert not missing, f"{manager.name} lost acknowledged registrations: {missing}"
    assert sum(1 for n in nodes.values() if n["type"] == SIM_TYPE) == sims
    extra = sorted(i for i in set(nodes) - set(registered)
                   if nodes[i]["type"] != SIM_TYPE and not i.startswith(doubt or ("\0",)))
    assert not extra, f"{manager.name} shows nodes nobody registered: {extra[:10]}"
    if not doubt:
        assert len(nodes) == sims + len(set(registered))
    not_online = {i: (n["status"], n["status_reason"]) for i, n in nodes.items()
                  if n["status"] != "online"}
    assert not not_online, f"{manager.name}: {not_online}"
    assert await manager.total(http) == len(nodes)
    answer = await manager.readyz(http)
    assert answer is not None
    assert answer[0] == 200, answer
    assert answer[1]["nodes"] == len(nodes), answer
    return nodes


def epoch_acquired(manager: HaManager, takeover: str) -> int:
    """The epoch of its ``lease_acquired`` log line with ``takeover=<takeover>``."""
    found = re.findall(rf"lease_acquired epoch=(\d+)[^\n]*? takeover={takeover}\b", manager.log)
    assert found, f"no lease_acquired ... takeover={takeover} in {manager.name}'s log:\n" \
                  f"{manager.log}"
    return int(found[-1])


async def stop_task(task: asyncio.Task[Any]) -> None:
    """Cancel a load task; a request cut short by a kill is not a failure, anything else is."""
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, aiohttp.ClientError, OSError):
        await task


# --- what the broker shows -----------------------------------------------------------------------

def messages(client: MqttClient) -> list[Received]:
    """A copy of everything the test client received so far (its thread appends)."""
    with client._lock:  # the test client's own list, appended to by its thread
        return list(client.messages)


class StatusWatch:
    """A dashboard: every message on ``<root>/+/status`` and ``<root>/_manager/status``, in
    arrival order; a position (``mark()``) splits before from after."""

    def __init__(self, client: MqttClient, root: str) -> None:
        self.client = client
        self.root = root

    async def start(self) -> StatusWatch:
        await self.client.connect()
        # The filter covers <root>/_manager/status too: a second one would double its messages.
        await self.client.subscribe(f"{self.root}/+/status")
        return self

    def mark(self) -> int:
        return len(messages(self.client))

    def since(self, mark: int = 0) -> list[tuple[str, dict[str, Any] | None]]:
        """(node id or '_manager', payload or None for a cleared status) after ``mark``."""
        return [(m.topic.split("/")[-2], json.loads(m.payload) if m.payload else None)
                for m in messages(self.client)[mark:]]

    def offline(self, mark: int = 0) -> list[tuple[str, dict[str, Any] | None]]:
        """Every offline status (a node's or the manager's) after ``mark``."""
        return [(node, body) for node, body in self.since(mark)
                if body is not None and body.get("status") == "offline"]


async def retained_statuses(client: MqttClient, root: str,
                            expected: Callable[[dict[str, Any]], bool],
                            timeout: float = 10.0) -> dict[str, Any]:
    """Subscribe anew to ``<root>/+/status`` and collect the retained statuses (node id ->
    payload) until ``expected(statuses)`` holds (MQTT has no end-of-retained marker)."""
    await client.connect()
    await client.subscribe(f"{root}/+/status")

    def statuses() -> dict[str, Any]:
        return {m.topic.split("/")[-2]: json.loads(m.payload)
                for m in messages(client) if m.retain and m.payload}

    with contextlib.suppress(AssertionError):
        await eventually(lambda: expected(statuses()), timeout=timeout, interval=0.1)
    return statuses()


def manager_connections(broker: Mosquitto, root: str) -> list[str]:
    """The broker's log lines of every connection made with one of the manager's client ids
    (``_fleetmq-<root>`` and ``-out``), and of every session taken over from one."""
    ids = rf"_fleetmq-{re.escape(root)}(?:-out)?"
    pattern = re.compile(rf"(New client connected from \S+ as {ids} \(|Client {ids} already "
                         "connected)")
    return [line for line in broker.log.read_text(errors="replace").splitlines()
            if pattern.search(line)]


def manager_disconnects(broker: Mosquitto, root: str) -> int:
    """How many times the broker saw the manager's ingest connection close."""
    line = f"Client _fleetmq-{root} closed its connection."
    return broker.log.read_text(errors="replace").count(line)


# --- what the store holds ------------------------------------------------------------------------

async def query(store_url: str, sql: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(store_url, timeout=10)
    try:
        rows: list[asyncpg.Record] = await conn.fetch(sql, *args, timeout=10)
        return rows
    finally:
        await conn.close()


def wall(timestamp: str) -> float:
    """An RFC 3339 timestamp of the API as seconds since the epoch."""
    return datetime.fromisoformat(timestamp.replace("Z", "+00:00")).timestamp()
